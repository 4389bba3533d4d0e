"""The check's cache: a warm check does no I/O, unknown keys are cached, URLs stay valid for
at least half their lifetime, changes invalidate, and a database outage leaves warm answers up."""

from __future__ import annotations

import datetime as dt
import json
import logging
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import httpx
import pytest
from sqlalchemy import event, func, insert, select
from sqlalchemy.exc import OperationalError

from koolbase_ota import changes
from koolbase_ota.bundles import targeting
from koolbase_ota.bundles.models import Bundle
from koolbase_ota.db import Database, utcnow
from koolbase_ota.projects.service import MAX_PUBLIC_KEY_LENGTH
from koolbase_ota.sdk import cache as cache_module
from koolbase_ota.sdk import check as check_module
from koolbase_ota.sdk.cache import ANSWER_REUSE_SECONDS, EXPIRY_ROUNDING_SECONDS
from koolbase_ota.sdk.check import CheckEndpoint, without_device
from koolbase_ota.storage.local import LocalStore
from tests.conftest import (
    Project,
    RunningServer,
    bare_release,
    eventually,
    new_project,
    released,
    start_server,
)
from tests.services import PostgresService

CHECK = "/v1/sdk/ota/check"


class StatementLog:
    """Every SQL statement the server's engines run, but the change-log poll: the checks' own
    and the one everything else uses."""

    def __init__(self, server: RunningServer) -> None:
        self.engines = (server.context.check_cache.db.engine, server.context.db.engine)
        self.statements: list[str] = []
        for engine in self.engines:
            event.listen(engine, "before_cursor_execute", self._record)

    def _record(self, _conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        # The poll's own BEGIN (SQLite) carries no table name; a lookup always has a SELECT.
        if "change_events" not in statement and statement.lstrip().upper().startswith("SELECT"):
            self.statements.append(statement)

    def close(self) -> None:
        for engine in self.engines:
            event.remove(engine, "before_cursor_execute", self._record)


@pytest.fixture
def statements(server: RunningServer) -> Iterator[StatementLog]:
    log = StatementLog(server)
    yield log
    log.close()


def test_a_warm_check_reads_nothing_from_the_database(
    server: RunningServer, client: httpx.Client, project: Project, statements: StatementLog
) -> None:
    released(client, project)
    # Let the change log's news of this new project (and its keys) reach the cache first.
    time.sleep(server.settings.cache_refresh_seconds * 3)
    statements.statements.clear()
    assert client.get(CHECK, headers=project.key()).status_code == 200
    assert client.get(CHECK, headers=project.key("staging")).status_code == 200
    # The log sees the checks' reads: those cold checks read the key and the channel.
    assert any("FROM channels" in statement for statement in statements.statements)
    statements.statements.clear()
    for version in (0, 1, 0, 5) * 10:
        assert (
            client.get(CHECK, params={"version": version}, headers=project.key()).status_code == 200
        )
    assert client.get(CHECK, headers=project.key("staging")).status_code == 200
    assert statements.statements == []


def test_a_warm_targeted_rolled_out_check_reads_nothing_on_either_endpoint(
    server: RunningServer, client: httpx.Client, project: Project, statements: StatementLog
) -> None:
    """Issue 6: history walks, targeting, rollouts and recalls are answered from the cache."""
    auth = project.auth
    first = released(client, project)
    recalled = released(client, project, platform="android")
    released(client, project, platform="ios", min_app_version="2.0")
    head = released(client, project)
    path = project.path(f"/bundles/{head['id']}")
    assert client.patch(path, headers=auth, json={"rollout_percentage": 30}).status_code == 200
    assert client.post(project.path(f"/bundles/{recalled['id']}/recall"), headers=auth).is_success
    time.sleep(server.settings.cache_refresh_seconds * 3)
    devices = [
        {"device_id": f"device-{n}", "platform": platform, "app_version": app}
        for n in range(10)
        for platform, app in (("ios", "2.1"), ("android", "1.0"), ("flutter", "3"))
    ]

    def ask_all() -> list[bytes]:
        bodies = []
        for device in devices:
            for version in (0, first["version"], recalled["version"]):
                seed = client.get(
                    CHECK, params={"version": version, **device}, headers=project.key()
                )
                push = client.get(
                    "/v1/code-push/check",
                    params={"channel": "production", "current_bundle": version, **device},
                    headers=project.key(),
                )
                assert seed.status_code == push.status_code == 200
                bodies += [seed.content, push.content]
        return bodies

    warm = ask_all()
    statements.statements.clear()
    assert ask_all() == warm
    assert statements.statements == []


def test_unknown_keys_are_cached_too(
    server: RunningServer, client: httpx.Client, statements: StatementLog
) -> None:
    time.sleep(server.settings.cache_refresh_seconds * 3)  # other tests' new projects
    bad = {"x-api-key": "pk_live_" + "0" * 24}
    assert client.get(CHECK, headers=bad).status_code == 401
    statements.statements.clear()
    for _ in range(20):
        assert client.get(CHECK, headers=bad).status_code == 401
    assert statements.statements == []


@pytest.mark.parametrize("length", [MAX_PUBLIC_KEY_LENGTH + 1, 60_000])
def test_a_key_longer_than_any_is_refused_without_being_kept(
    server: RunningServer, client: httpx.Client, statements: StatementLog, length: int
) -> None:
    """Unknown keys are kept so a flood of them never reaches the database, each costing its
    length: made-up keys of 60 KB grew a server by 57 KB a request, up to the map's bound of
    200,000. One longer than any key we hand out is refused as it is, and not kept."""
    key = "pk_live_" + "0" * (length - 8)
    for _ in range(3):
        answer = client.get(CHECK, headers={"x-api-key": key})
        assert answer.status_code == 401
        assert answer.json()["code"] == "invalid_api_key"
    assert key not in server.context.check_cache.keys
    assert statements.statements == []


def test_checks_missing_the_same_entry_at_once_share_one_database_read(
    server: RunningServer, client: httpx.Client, project: Project
) -> None:
    """After an activation every device's check of the channel misses at once: one read of
    the database answers them all, not one read per check (each a worker thread's time)."""
    released(client, project)
    time.sleep(server.settings.cache_refresh_seconds * 3)
    assert client.get(CHECK, headers=project.key()).status_code == 200  # the key is warm
    reads: list[str] = []

    def slow_channel_read(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if "FROM channels" in statement:
            reads.append(statement)
            time.sleep(0.3)  # long enough for every check below to miss while it runs

    engine = server.context.check_cache.db.engine
    event.listen(engine, "before_cursor_execute", slow_channel_read)
    try:
        barrier = threading.Barrier(16)

        def check(_n: int) -> tuple[int, bytes]:
            with httpx.Client(base_url=server.base_url, timeout=30) as own:
                barrier.wait()
                query = {"version": "0", "channel": "staging"}  # a channel not asked before
                answer = own.get(CHECK, params=query, headers=project.key())
                return answer.status_code, answer.content

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(check, range(16)))
    finally:
        event.remove(engine, "before_cursor_execute", slow_channel_read)
    assert answers == [(200, b'{"has_update":false}')] * 16
    assert len(reads) == 1, reads
    assert server.context.check_cache.loading == {}


def test_a_failed_shared_read_fails_every_check_waiting_on_it_and_is_not_kept(
    tmp_path: Path,
) -> None:
    """A database that refuses connections: the checks that shared the read all get its
    error, nothing is cached, and the next miss reads again."""
    import asyncio

    from koolbase_ota.db import Database, create_db_engine
    from koolbase_ota.sdk.cache import CheckCache
    from koolbase_ota.storage.local import LocalStore

    with socket.socket() as unused:  # a port nothing listens on
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    engine = create_db_engine(f"postgresql://u:p@127.0.0.1:{port}/none", timeout_seconds=2)
    attempts: list[object] = []
    event.listen(engine, "do_connect", lambda *args: attempts.append(args))
    cache = CheckCache(
        db=Database(engine),
        store=LocalStore(tmp_path, public_url="http://127.0.0.1", secret_key="k"),
        url_ttl_seconds=60,
    )

    async def five_at_once() -> list[Any]:
        asks = [cache.project_for_key("pk_live_" + "1" * 24) for _ in range(5)]
        return await asyncio.gather(*asks, return_exceptions=True)

    try:
        failures = asyncio.run(five_at_once())
        assert len(attempts) == 1
        assert all(isinstance(failure, OperationalError) for failure in failures), failures
        assert cache.keys == {}
        assert cache.loading == {}
        assert isinstance(asyncio.run(five_at_once())[0], OperationalError)
        assert len(attempts) == 2
    finally:
        engine.dispose()


def test_a_new_projects_keys_work_at_once_though_unknown_before(
    server: RunningServer, client: httpx.Client
) -> None:
    project = new_project(server.db)
    # Another process could have asked with a key before it existed; the change log clears it.
    assert client.get(CHECK, headers=project.key()).status_code == 200


def test_every_url_handed_out_is_valid_for_at_least_half_the_ttl(
    server: RunningServer, client: httpx.Client, project: Project
) -> None:
    released(client, project)
    first = client.get(CHECK, headers=project.key()).json()["download_url"]
    second = client.get(CHECK, headers=project.key()).json()["download_url"]
    assert first == second  # reused, not re-signed per check
    ttl = server.settings.url_ttl_seconds
    query = parse_qs(urlparse(first).query)
    if "expires" in query:
        remaining = int(query["expires"][0]) - time.time()
    else:
        signed_at = time.mktime(time.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ"))
        remaining = signed_at - time.timezone + int(query["X-Amz-Expires"][0]) - time.time()
    assert ttl / 2 <= remaining <= ttl + 1
    offer = server.context.check_cache.channels[(project.id, "production")]
    assert offer is not None
    assert offer.offer is not None
    # Renewed early enough that an answer reused for up to ANSWER_REUSE_SECONDS after its
    # URL's renewal is due still carries at least half the lifetime, though its expiry was
    # rounded down to a whole second (a URL was seen with 29.93 s left of a 60 s TTL).
    early = ANSWER_REUSE_SECONDS + EXPIRY_ROUNDING_SECONDS
    assert offer.offer.renew_at - time.time() <= ttl / 2 - early


def test_a_wall_clock_stepped_forward_brings_the_url_renewal_forward(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """URLs expire by the wall clock, so their renewal follows it: a clock stepped forward
    (NTP after a suspend) must not leave the check handing out a URL already expired.
    The step is faked: it cannot be caused on this machine without disturbing it."""
    ttl = 600
    store = LocalStore(tmp_path, public_url="http://127.0.0.1", secret_key="k" * 32)
    release = bare_release()

    def url() -> str:
        answer = release.body("seed", mandatory=False, store=store, ttl_seconds=ttl)
        return str(json.loads(answer)["download_url"])

    first = url()
    stepped = time.time() + ttl
    monkeypatch.setattr(time, "time", lambda: stepped)
    second = url()
    assert second != first
    expires = int(parse_qs(urlparse(second).query)["expires"][0])
    assert expires - stepped >= ttl / 2


def test_identical_checks_reuse_the_answer_for_at_most_a_second_and_not_across_a_change(
    server: RunningServer, client: httpx.Client, project: Project
) -> None:
    bundle = released(client, project)
    endpoint = server.app.check_endpoint
    assert endpoint is not None
    client.get(CHECK, headers=project.key())  # cold: loads the channel
    first = client.get(CHECK, headers=project.key())
    (generation, until, rollouts, answers) = endpoint.answers[(project.keys["production"], b"")]
    assert answers[0][1] == first.content
    assert generation == server.context.check_cache.generation
    assert 0 < until - time.monotonic() <= ANSWER_REUSE_SECONDS
    assert rollouts == ()  # no release rolled out to a share of devices
    path = project.path(f"/bundles/{bundle['id']}")
    assert client.patch(path, headers=project.auth, json={"mandatory": True}).status_code == 200
    # The change bumped the generation: the reused answer is not handed out again.
    assert client.get(CHECK, headers=project.key()).json()["mandatory"] is True


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"channel=a&device_id=d-1&platform=ios", (b"channel=a&platform=ios", "d-1")),
        (b"device_id=d-1", (b"", "d-1")),
        (b"device_id=", (b"", "")),
        (b"channel=a", None),
        (b"xdevice_id=d-1", None),
        (b"device_id=d-1&device_id=d-2", None),
        (b"device_id=d-1&device_id", None),
        (b"device_id=d%2D1", None),
        (b"channel=a+b&device_id=d-1", None),
        ("device_id=d-1", None),
    ],
)
def test_a_query_without_its_device_id(
    raw: bytes | str, expected: tuple[bytes, str] | None
) -> None:
    assert without_device(raw) == expected


def test_a_query_without_its_device_id_is_its_parts_less_the_one_id() -> None:
    """Against the plain definition, on seeded random queries of tricky parts."""

    def reference(raw: bytes) -> tuple[bytes, str] | None:
        if b"%" in raw or b"+" in raw:
            return None
        parts = raw.split(b"&")
        ids = [part for part in parts if part.startswith(b"device_id=")]
        if len(ids) != 1 or b"device_id" in parts:
            return None
        others = [part for part in parts if part is not ids[0]]
        return b"&".join(others), ids[0].removeprefix(b"device_id=").decode("latin-1")

    rng = random.Random(20261126)  # noqa: S311 - reproducible, not a secret
    parts = [b"a=1", b"device_id=d-1", b"", b"device_id", b"xdevice_id=2", b"b=device_id=3"]
    parts += [b"device_id=", b"device_idx=4", b"c=%41", b"device_id=d-2", b"channel=production"]
    for _ in range(20_000):
        raw = b"&".join(rng.choice(parts) for _ in range(rng.randint(0, 5)))
        assert without_device(raw) == reference(raw), raw


def kept_per_device(endpoint: CheckEndpoint) -> list[bytes | str]:
    """The queries of the kept answers that name one of the tests' `device-N` devices."""
    return [query for (_key, query) in endpoint.answers if "device_id=device-" in str(query)]


def test_devices_share_a_reused_answer_with_their_rollout_cohort(
    server: RunningServer, client: httpx.Client, project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fleet's code-push checks differ by device id alone: the answer is kept once for all
    of them while no release is rolled out to a share of devices, and once for the devices
    inside the rollout and once for those outside it when one is, never per device and
    without ever handing one device's answer to another."""
    # A renewed answer starts without the cohorts asked before it: the checks below must not
    # outlast the second an answer is reused for, on however busy a machine.
    monkeypatch.setattr(check_module, "ANSWER_REUSE_SECONDS", 3600.0)
    bundle = released(client, project)
    endpoint = server.app.code_push_endpoint
    assert endpoint is not None
    base = {"channel": "production", "current_bundle": "0"}
    devices = [f"device-{n}" for n in range(40)]

    def ask(device: str) -> httpx.Response:
        return client.get(
            "/v1/code-push/check", params={**base, "device_id": device}, headers=project.key()
        )

    ask(devices[0])  # cold: loads the channel
    endpoint.answers.clear()
    answers = {ask(device).content for device in devices}
    assert len(answers) == 1
    assert b"update_available" in answers.pop()
    assert kept_per_device(endpoint) == []
    assert endpoint.answers[(project.keys["production"], b"channel=production&current_bundle=0")]
    # A device id the check refuses is refused though the shared answer is kept.
    refused = ask("d" * (targeting.MAX_DEVICE_ID_CHARS + 1))
    assert refused.status_code == 400
    assert refused.json()["code"] == "invalid_device_id"

    path = project.path(f"/bundles/{bundle['id']}")
    patched = client.patch(path, headers=project.auth, json={"rollout_percentage": 50})
    assert patched.status_code == 200
    inside = [d for d in devices if targeting.in_rollout(d, bundle["id"], 50)]
    outside = [d for d in devices if d not in inside]
    assert inside
    assert outside
    for _ in range(3):
        for device in [*inside[:5], *outside[:5]]:
            status = ask(device).json()["status"]
            assert status == ("update_available" if device in inside else "no_update"), device
    assert kept_per_device(endpoint) == []
    shared = endpoint.answers[(project.keys["production"], b"channel=production&current_bundle=0")]
    (_generation, _until, rollouts, by_cohort) = shared
    assert rollouts == ((bundle["id"], 50),)
    assert sorted(by_cohort) == [0, 1]
    assert b"no_update" in by_cohort[0][1]
    assert b"update_available" in by_cohort[1][1]
    # A check without a device id is cohort 0's (outside every rollout), and reuses it.
    anonymous = client.get("/v1/code-push/check", params=base, headers=project.key())
    assert anonymous.content == by_cohort[0][1]


def test_devices_in_two_rollouts_get_their_cohorts_answer_and_many_rollouts_are_kept_apart(
    server: RunningServer, client: httpx.Client, project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two releases rolled out to 60% and 30%: each device gets the newest release that
    reaches it, the answers are kept per cohort (at most 4); over MAX_SHARED_ROLLOUTS they
    are kept per device instead."""
    # A renewed answer starts without the cohorts asked before it: the 120 checks below must
    # not outlast the second an answer is reused for, on however busy a machine (CI's did).
    monkeypatch.setattr(check_module, "ANSWER_REUSE_SECONDS", 3600.0)
    older = released(client, project)
    newer = released(client, project)
    for bundle, percentage in ((older, 60), (newer, 30)):
        path = project.path(f"/bundles/{bundle['id']}")
        rollout = {"rollout_percentage": percentage}
        assert client.patch(path, headers=project.auth, json=rollout).status_code == 200
    endpoint = server.app.code_push_endpoint
    assert endpoint is not None
    devices = [f"device-{n}" for n in range(60)]
    shared_key = (project.keys["production"], b"channel=production&current_bundle=0")

    def offered(device: str) -> int | None:
        params = {"channel": "production", "current_bundle": "0", "device_id": device}
        answer = client.get("/v1/code-push/check", params=params, headers=project.key())
        assert answer.status_code == 200, answer.text
        body = answer.json()
        return body["bundle"]["version"] if body["status"] == "update_available" else None

    def expected(device: str) -> int | None:
        for bundle, percentage in ((newer, 30), (older, 60)):
            if targeting.in_rollout(device, bundle["id"], percentage):
                return int(bundle["version"])
        return None

    offered(devices[0])  # cold: loads the channel
    for _ in range(2):
        assert [offered(device) for device in devices] == [expected(d) for d in devices]
    (_generation, _until, rollouts, by_cohort) = endpoint.answers[shared_key]
    assert rollouts == ((newer["id"], 30), (older["id"], 60))
    cohorts = {targeting.rollout_cohort(device, rollouts) for device in devices}
    assert sorted(by_cohort) == sorted(cohorts)
    assert len(cohorts) == 4  # all four occur among 60 devices
    assert kept_per_device(endpoint) == []

    monkeypatch.setattr(cache_module, "MAX_SHARED_ROLLOUTS", 1)
    path = project.path(f"/bundles/{older['id']}")
    patched = client.patch(path, headers=project.auth, json={"rollout_percentage": 70})
    assert patched.status_code == 200
    endpoint.answers.clear()
    for _ in range(2):
        answers = [offered(device) for device in devices]
        assert answers == [
            int(newer["version"])
            if targeting.in_rollout(device, newer["id"], 30)
            else int(older["version"])
            if targeting.in_rollout(device, older["id"], 70)
            else None
            for device in devices
        ]
    assert len(kept_per_device(endpoint)) == len(devices)


def test_shared_answers_never_cross_devices_as_a_rollout_comes_and_goes(
    server: RunningServer, client: httpx.Client, project: Project
) -> None:
    """Checks with and without device ids, refused ids and a rollout switched on and off, in a
    seeded random order: every answer is the one the device's own check would get."""
    bundle = released(client, project)
    path = project.path(f"/bundles/{bundle['id']}")
    rng = random.Random(20261126)  # noqa: S311 - a reproducible order, not a secret
    devices = [f"device-{n}" for n in range(12)]
    percentage = 100
    for step in range(160):
        if step % 40 == 20:
            percentage = 30 if percentage == 100 else 100
            rollout = {"rollout_percentage": percentage}
            assert client.patch(path, headers=project.auth, json=rollout).status_code == 200
        params = {"channel": "production", "current_bundle": "0", "platform": "android"}
        roll = rng.random()
        device = rng.choice(devices)
        if roll < 0.1:
            params["device_id"] = "x" * (targeting.MAX_DEVICE_ID_CHARS + 1)
        elif roll < 0.25:
            device = ""
        else:
            params["device_id"] = device
        answer = client.get("/v1/code-push/check", params=params, headers=project.key())
        if roll < 0.1:
            assert answer.status_code == 400, (step, answer.text)
            assert answer.json()["code"] == "invalid_device_id"
            continue
        inside = targeting.in_rollout(device or None, bundle["id"], percentage)
        assert answer.json()["status"] == ("update_available" if inside else "no_update"), (
            step,
            device,
            percentage,
        )


def test_changes_reach_the_cached_answer_at_once_in_this_process(
    client: httpx.Client, project: Project
) -> None:
    bundle = released(client, project)
    assert client.get(CHECK, headers=project.key()).json()["mandatory"] is False
    path = project.path(f"/bundles/{bundle['id']}")
    assert client.patch(path, headers=project.auth, json={"mandatory": True}).status_code == 200
    assert client.get(CHECK, headers=project.key()).json()["mandatory"] is True
    newer = released(client, project)
    assert client.get(CHECK, headers=project.key()).json()["version"] == newer["version"]
    assert (
        client.delete(project.path(f"/bundles/{newer['id']}"), headers=project.auth).status_code
        == 204
    )
    assert client.get(CHECK, headers=project.key()).json() == {"has_update": False}


def logged(db: Database, count: int, *, age_seconds: float = 0) -> None:
    """`count` changes of a channel nobody has, made `age_seconds` ago."""
    made = utcnow() - dt.timedelta(seconds=age_seconds)
    row = {"project_id": uuid.uuid4(), "kind": changes.BUNDLES, "channel": "elsewhere"}
    with db.write() as session:
        session.execute(insert(changes.ChangeEvent), [{**row, "created_at": made}] * count)


def test_a_busy_change_log_does_not_hide_a_new_change(
    server_factory: Callable[..., RunningServer],
) -> None:
    """Every poll looks back a minute for late commits. With more changes in that minute
    than a poll reads (10,000), they filled every poll and a new change reached no process,
    not even the one that made it, until they aged out: 60 s of stale answers."""
    server = server_factory()
    project = new_project(server.db)
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        bundle = released(client, project)
        assert client.get(CHECK, headers=project.key()).json()["mandatory"] is False
        logged(server.db, 10_100)
        time.sleep(server.settings.cache_refresh_seconds * 3)  # polled: all applied
        path = project.path(f"/bundles/{bundle['id']}")
        assert client.patch(path, headers=project.auth, json={"mandatory": True}).status_code == 200
        assert client.get(CHECK, headers=project.key()).json()["mandatory"] is True


def test_the_refresh_goes_on_when_counting_the_checks_fails(
    server_factory: Callable[..., RunningServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The refresh loop also adds the hot routes' counts to the metrics. When that failed (a
    metrics file on a full disk: injected, it cannot be caused here) the loop ended, and no
    change made elsewhere reached this process's checks again."""
    server = server_factory()
    project = new_project(server.db)
    cache = server.context.check_cache

    def full_disk() -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache.tally, "flush", full_disk)
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        bundle = released(client, project)
        assert client.get(CHECK, headers=project.key()).json()["mandatory"] is False
        time.sleep(server.settings.cache_refresh_seconds * 3)  # the loop has counted, and failed
        # The change another process would make: the row and its change-log entry.
        with server.db.write() as session:
            row = session.get(Bundle, uuid.UUID(bundle["id"]))
            assert row is not None
            row.mandatory = True
            changes.record(
                session, project_id=project.id, kind=changes.BUNDLES, channel="production"
            )
        eventually(
            lambda: client.get(CHECK, headers=project.key()).json()["mandatory"] is True,
            "the change made elsewhere reaching the check",
        )


def test_the_change_log_reads_every_new_change_and_the_newest_recent_ones(
    server: RunningServer,
) -> None:
    db = server.db
    logged(db, 5)
    seen = changes.latest_id(db)
    logged(db, 7)
    found = [change.id for change in changes.changes_since(db, seen, limit=3)]
    assert found == [seen - 2, seen - 1, seen, *range(seen + 1, seen + 8)]


def test_pruning_the_change_log_keeps_its_newest_change(
    server_factory: Callable[..., RunningServer],
) -> None:
    """On SQLite the next id is one past the largest left: an emptied log would hand out ids
    every process has already seen."""
    db = server_factory().db
    logged(db, 3, age_seconds=2 * 3600)
    newest = changes.latest_id(db)
    changes.prune(db)
    with db.read() as session:
        assert session.scalar(select(func.count()).select_from(changes.ChangeEvent)) == 1
    assert changes.latest_id(db) == newest


@pytest.fixture
def own_postgres() -> Iterator[PostgresService]:
    with PostgresService() as service:
        yield service


def test_warm_answers_survive_a_database_outage(
    own_postgres: PostgresService, tmp_path: Path
) -> None:
    server = start_server(
        tmp_path, database_url=own_postgres.create_database(), database_timeout_seconds=2
    )
    try:
        project = new_project(server.db)
        other = new_project(server.db)
        with httpx.Client(base_url=server.base_url, timeout=30) as client:
            released(client, project)
            warm = client.get(CHECK, headers=project.key()).json()
            assert client.get(CHECK, headers={"x-api-key": "pk_live_nope"}).status_code == 401
            own_postgres.stop()
            # Devices already seen keep getting their answer: the SDK takes any error as
            # "no update", so a 5xx here would silently freeze every device.
            assert client.get(CHECK, headers=project.key()).json() == warm
            assert client.get(CHECK, headers={"x-api-key": "pk_live_nope"}).status_code == 401
            cold = client.get(CHECK, headers=other.key())
            assert cold.status_code == 503
            assert cold.json()["code"] == "database_unavailable"
            own_postgres.start()
            assert client.get(CHECK, headers=other.key()).status_code == 200
    finally:
        server.stop()


def test_an_outage_is_logged_once_and_its_end_once(
    own_postgres: PostgresService, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The change log is polled every 0.2 s: during an outage every failed poll was a warning,
    five lines a second from every worker (found by an operator's walk-through, helper-39)."""
    caplog.set_level(logging.WARNING, logger="koolbase_ota.sdk.cache")

    def lines(text: str) -> list[str]:
        return [r.getMessage() for r in caplog.records if text in r.getMessage()]

    server = start_server(tmp_path, database_url=own_postgres.create_database())
    try:
        own_postgres.stop()
        try:
            eventually(lambda: len(lines("cache refresh failed")) == 1, "a failure", within=30)
            time.sleep(2)  # ten more polls
            assert len(lines("cache refresh failed")) == 1, lines("cache refresh failed")
        finally:
            own_postgres.start()
        eventually(lambda: bool(lines("works again")), "the recovery", within=30)
        (recovered,) = lines("works again")
        assert int(recovered.split("after ")[1].split()[0]) >= 5
    finally:
        server.stop()


def test_a_load_given_up_on_as_a_thread_takes_it_runs_in_full_or_not_at_all(
    tmp_path: Path,
) -> None:
    """The last check giving up on a queued load and a thread taking it decide at once, the
    first one winning: a thread that took a load just abandoned (its check's wait ran out a
    moment before) ran it anyway, a fifth lookup on the checks' connections beside the four
    threads' (found by review, helper-37). Both orders, as each side sees them."""
    import asyncio

    from koolbase_ota.db import create_db_engine
    from koolbase_ota.sdk.cache import CheckCache

    engine = create_db_engine(f"sqlite:///{tmp_path / 'cache.db'}")
    cache = CheckCache(
        db=Database(engine),
        store=LocalStore(tmp_path, public_url="http://127.0.0.1", secret_key="k"),
        url_ttl_seconds=60,
    )
    ran: list[str] = []

    def load(key: str) -> Callable[[], uuid.UUID]:
        def run() -> uuid.UUID:
            ran.append(key)
            return uuid.UUID(int=1)

        return run

    async def both_orders() -> None:
        loop = asyncio.get_running_loop()
        given_up = cache_module._Flight(cache.generation, loop)
        assert given_up.leave_queue("abandoned")  # the check gave up first
        with pytest.raises(cache_module._Abandoned):
            await cache._load(("key", "a"), cache.keys, load("a"), bool, None, given_up)
        taken = cache_module._Flight(cache.generation, loop)
        assert await cache._load(("key", "b"), cache.keys, load("b"), bool, None, taken)
        assert not taken.leave_queue("abandoned")  # the thread took it first

    try:
        asyncio.run(both_orders())
    finally:
        engine.dispose()
    assert ran == ["b"]
    assert cache.keys == {"b": uuid.UUID(int=1)}
