"""Property tests of the bundle rules against pure models, on a real SQLite file (through the
service layer) and, in a smaller run, over HTTP on each backend pair.

* Version allocation: whatever the uploads and deletes across channels, a channel's versions
  are handed out 1, 2, 3... and never again after a delete.
* The one-active rule: after any activations and deletes, each channel has at most one active
  bundle: the last one activated, if it still exists.
* The mandatory answer: for any releases, rollbacks and mandatory flags, and any device version,
  the check says `mandatory` exactly when a released mandatory bundle lies in
  (device version, offered version].

Runs are deterministic (derandomized) and bounded, so the suite stays quick and repeatable.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from koolbase_ota.bundles import service
from koolbase_ota.bundles.models import Bundle
from koolbase_ota.bundles.multipart import StagedUpload
from koolbase_ota.config import CHANNELS, Settings
from koolbase_ota.db import Database, create_db_engine, upgrade_schema
from koolbase_ota.sdk.cache import CheckCache
from koolbase_ota.sdk.check import CheckEndpoint
from koolbase_ota.storage import BundleStore, open_store
from tests.conftest import Project, RunningServer, make_zip, new_project, upload

#: Channels the sequences use: two are enough to catch one channel leaking into another.
USED_CHANNELS = CHANNELS[:2]
SERVICE_RUN = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
HTTP_RUN = settings(
    max_examples=8,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@dataclass
class Backend:
    """The service layer on a SQLite file and a local store, as `serve` builds it."""

    db: Database
    store: BundleStore
    bundle_file: Path
    sha256: str

    def project(self) -> uuid.UUID:
        return new_project(self.db).id

    async def upload(self, project_id: uuid.UUID, channel: str, mandatory: bool = False) -> Bundle:
        staged = StagedUpload(
            fields={"channel": channel, "mandatory": "true" if mandatory else "false"},
            bundle_path=self.bundle_file,
            bundle_size=self.bundle_file.stat().st_size,
            sha256=self.sha256,
        )
        return await service.upload_bundle(
            db=self.db, store=self.store, project_id=project_id, staged=staged
        )

    async def delete(self, project_id: uuid.UUID, bundle_id: uuid.UUID) -> None:
        await service.delete_bundle(
            db=self.db, store=self.store, project_id=project_id, bundle_id=bundle_id
        )

    def activate(self, project_id: uuid.UUID, bundle_id: uuid.UUID) -> None:
        service.activate_bundle(self.db, project_id=project_id, bundle_id=bundle_id)

    def rows(self, project_id: uuid.UUID) -> list[Bundle]:
        with self.db.read() as session:
            return list(session.scalars(select(Bundle).where(Bundle.project_id == project_id)))


@pytest.fixture(scope="module")
def backend_on_disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    data_dir = tmp_path_factory.mktemp("properties")
    resolved = Settings(data_dir=data_dir).resolved()
    engine = create_db_engine(resolved.database_url)
    upgrade_schema(engine, lock_dir=resolved.data_dir)
    bundle = make_zip()
    # The one staged file every upload stores: the local store links it, never moves it.
    bundle_file = data_dir / "staged.zip"
    bundle_file.write_bytes(bundle)
    yield Backend(
        db=Database(engine),
        store=open_store(resolved),
        bundle_file=bundle_file,
        sha256=hashlib.sha256(bundle).hexdigest(),
    )
    engine.dispose()


# --- strategies: sequences of operations ---------------------------------------------------

channels = st.sampled_from(USED_CHANNELS)
#: ("upload", channel) or (verb, n): n picks an existing bundle (modulo how many there are).
uploads_and_deletes = st.lists(
    st.one_of(
        st.tuples(st.just("upload"), channels),
        st.tuples(st.just("delete"), st.integers(0, 7)),
    ),
    min_size=1,
    max_size=14,
)
activations = st.lists(
    st.one_of(
        st.tuples(st.just("upload"), channels),
        st.tuples(st.sampled_from(["activate", "delete"]), st.integers(0, 7)),
    ),
    min_size=1,
    max_size=16,
)
releases = st.lists(
    st.one_of(
        st.tuples(st.just("upload"), st.booleans()),  # a new bundle, mandatory or not
        st.tuples(st.just("activate"), st.integers(0, 7)),  # release, or roll back
        st.tuples(st.just("mandatory"), st.integers(0, 7), st.booleans()),
        st.tuples(st.just("delete"), st.integers(0, 7)),
    ),
    min_size=1,
    max_size=12,
)


# --- the models ----------------------------------------------------------------------------


@dataclass
class VersionModel:
    handed_out: dict[str, list[int]] = field(default_factory=dict)

    def next_version(self, channel: str) -> int:
        return len(self.handed_out.get(channel, [])) + 1

    def record(self, channel: str, version: int) -> None:
        self.handed_out.setdefault(channel, []).append(version)


@dataclass
class ModelBundle:
    id: uuid.UUID
    channel: str
    version: int
    mandatory: bool
    released: bool = False


def mandatory_expected(bundles: list[ModelBundle], active: ModelBundle | None, device: int) -> Any:
    """The check's answer in the model: None for no update, else the mandatory flag."""
    if active is None or active.version <= device:
        return None
    return any(
        bundle.released and bundle.mandatory and device < bundle.version <= active.version
        for bundle in bundles
    )


# --- service layer on SQLite ---------------------------------------------------------------


@SERVICE_RUN
@given(operations=uploads_and_deletes)
def test_versions_grow_and_are_never_reused(
    backend_on_disk: Backend, operations: list[tuple[str, Any]]
) -> None:
    async def run() -> None:
        project_id = backend_on_disk.project()
        model = VersionModel()
        alive: list[Bundle] = []
        for verb, arg in operations:
            if verb == "upload":
                bundle = await backend_on_disk.upload(project_id, arg)
                assert bundle.version == model.next_version(arg)
                model.record(arg, bundle.version)
                assert bundle.storage_path == f"ota/{project_id}/{arg}/v{bundle.version}.zip"
                alive.append(bundle)
            elif alive:
                gone = alive.pop(arg % len(alive))
                await backend_on_disk.delete(project_id, gone.id)
        rows = backend_on_disk.rows(project_id)
        assert sorted((row.channel, row.version) for row in rows) == sorted(
            (bundle.channel, bundle.version) for bundle in alive
        )
        for channel, versions in model.handed_out.items():
            assert versions == list(range(1, len(versions) + 1)), channel

    asyncio.run(run())


@SERVICE_RUN
@given(operations=activations)
def test_at_most_one_active_per_channel_the_last_activated_survivor(
    backend_on_disk: Backend, operations: list[tuple[str, Any]]
) -> None:
    async def run() -> None:
        project_id = backend_on_disk.project()
        alive: list[Bundle] = []
        active: dict[str, uuid.UUID | None] = {}
        for verb, arg in operations:
            if verb == "upload":
                alive.append(await backend_on_disk.upload(project_id, arg))
            elif not alive:
                continue
            elif verb == "activate":
                chosen = alive[arg % len(alive)]
                backend_on_disk.activate(project_id, chosen.id)
                active[chosen.channel] = chosen.id
            else:
                gone = alive.pop(arg % len(alive))
                await backend_on_disk.delete(project_id, gone.id)
                if active.get(gone.channel) == gone.id:
                    active[gone.channel] = None
            rows = backend_on_disk.rows(project_id)
            for channel in USED_CHANNELS:
                actives = [row.id for row in rows if row.channel == channel and row.active]
                expected = active.get(channel)
                assert actives == ([] if expected is None else [expected]), (channel, verb)

    asyncio.run(run())


@SERVICE_RUN
@given(operations=releases, devices=st.lists(st.integers(0, 14), min_size=1, max_size=4))
# A mandatory release rolled back to an older bundle: not in (device, offered], so not counted.
@example(
    operations=[("upload", False), ("upload", True), ("activate", 1), ("activate", 0)],
    devices=[0],
)
def test_mandatory_exactly_when_a_released_mandatory_bundle_is_in_range(
    backend_on_disk: Backend, operations: list[tuple[Any, ...]], devices: list[int]
) -> None:
    async def run() -> None:
        created = new_project(backend_on_disk.db)
        project_id = created.id
        key = created.keys["production"]
        bundles: list[ModelBundle] = []
        active: ModelBundle | None = None
        for verb, *args in operations:
            if verb == "upload":
                row = await backend_on_disk.upload(project_id, "production", mandatory=args[0])
                bundles.append(ModelBundle(row.id, row.channel, row.version, args[0]))
                continue
            if not bundles:
                continue
            chosen = bundles[args[0] % len(bundles)]
            if verb == "activate":
                backend_on_disk.activate(project_id, chosen.id)
                chosen.released = True
                active = chosen
            elif verb == "mandatory":
                service.set_mandatory(
                    backend_on_disk.db,
                    project_id=project_id,
                    bundle_id=chosen.id,
                    mandatory=args[1],
                )
                chosen.mandatory = args[1]
            else:
                await backend_on_disk.delete(project_id, chosen.id)
                bundles.remove(chosen)
                if active is chosen:
                    active = None
        # A fresh cache: every answer is read from the database as it is now.
        cache = CheckCache(db=backend_on_disk.db, store=backend_on_disk.store, url_ttl_seconds=3600)
        for device in [*devices, 0]:
            status, body, _, _ = await CheckEndpoint(cache).respond(
                key, {"channel": "production", "version": str(device)}
            )
            assert status == 200
            got = json.loads(body)
            expected = mandatory_expected(bundles, active, device)
            if expected is None:
                assert got == {"has_update": False}, (device, got)
            else:
                assert active is not None
                assert got["version"] == active.version
                assert got["mandatory"] is expected, (device, operations)

    asyncio.run(run())


# --- a smaller run over HTTP, on each backend pair -----------------------------------------


def http_bundles(client: httpx.Client, project: Project) -> list[dict[str, Any]]:
    response = client.get(project.path("/bundles"), headers=project.auth)
    assert response.status_code == 200, response.text
    listed: list[dict[str, Any]] = response.json()
    return listed


@HTTP_RUN
@given(operations=activations)
def test_versions_and_the_one_active_rule_over_http(
    server: RunningServer, client: httpx.Client, operations: list[tuple[str, Any]]
) -> None:
    project = new_project(server.db)
    model = VersionModel()
    alive: list[dict[str, Any]] = []
    active: dict[str, str | None] = {}
    for verb, arg in operations:
        if verb == "upload":
            response = upload(client, project, None, channel=arg)
            assert response.status_code == 201, response.text
            bundle = response.json()
            assert bundle["version"] == model.next_version(arg)
            model.record(arg, bundle["version"])
            alive.append(bundle)
        elif not alive:
            continue
        elif verb == "activate":
            chosen = alive[arg % len(alive)]
            path = project.path(f"/bundles/{chosen['id']}/activate")
            assert client.post(path, headers=project.auth).status_code == 200
            active[chosen["channel"]] = chosen["id"]
        else:
            gone = alive.pop(arg % len(alive))
            path = project.path(f"/bundles/{gone['id']}")
            assert client.delete(path, headers=project.auth).status_code == 204
            if active.get(gone["channel"]) == gone["id"]:
                active[gone["channel"]] = None
    listed = http_bundles(client, project)
    assert sorted(bundle["id"] for bundle in listed) == sorted(bundle["id"] for bundle in alive)
    for channel in USED_CHANNELS:
        actives = [b["id"] for b in listed if b["channel"] == channel and b["active"]]
        expected = active.get(channel)
        assert actives == ([] if expected is None else [expected]), channel
