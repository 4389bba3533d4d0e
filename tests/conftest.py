"""Shared fixtures: a real server on a real socket, real projects, real zips."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import os
import socket
import ssl
import threading
import time
import uuid
import weakref
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import httpx._transports.default
import pytest
import uvicorn
from sqlalchemy import make_url

from koolbase_ota.app import OTAApp, create_app
from koolbase_ota.config import Settings
from koolbase_ota.db import Database, create_db_engine, upgrade_schema
from koolbase_ota.deps import AppContext
from koolbase_ota.httpserver import uvicorn_options
from koolbase_ota.projects import service as projects
from koolbase_ota.sdk.cache import Release
from koolbase_ota.storage import BundleStore
from tests.services import PostgresService, SeaweedService

_create_ssl_context = httpx.create_ssl_context


@functools.cache
def _default_ssl_context(cafile: str | None, capath: str | None) -> ssl.SSLContext:
    return _create_ssl_context()


def _shared_default_ssl_context(
    verify: ssl.SSLContext | str | bool = True, cert: Any = None, trust_env: bool = True
) -> ssl.SSLContext:
    """Every httpx client here speaks plain HTTP to 127.0.0.1, yet each one built a TLS
    context from certifi's bundle: 45 ms of CPU a client, in thousands of clients some 40% of
    the suite's CPU. Clients with the default settings share one; others ask httpx as before."""
    if verify is True and cert is None and trust_env:
        # One per set of the CA variables httpx reads, should a test ever set them.
        return _default_ssl_context(os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))
    return _create_ssl_context(verify=verify, cert=cert, trust_env=trust_env)


# httpx 0.28 builds a transport's context with this module's function (requirements-dev.lock
# pins it; a later httpx that moved it would fail the assertion rather than be slow quietly).
_transports: Any = httpx._transports.default
assert _transports.create_ssl_context is _create_ssl_context
_transports.create_ssl_context = _shared_default_ssl_context

#: The bundle object's keys, exactly as the API document shows them.
BUNDLE_FIELDS = {
    "id",
    "project_id",
    "channel",
    "version",
    "checksum",
    "storage_path",
    "file_size",
    "mandatory",
    "active",
    "release_notes",
    "created_at",
    "updated_at",
    # Added by issue 6 (release history); additive, so seed clients are unaffected.
    "platform",
    "min_app_version",
    "max_app_version",
    "rollout_percentage",
    "released_at",
    "recalled_at",
    "promoted_from",
}
#: The keys of a check answer that offers an update.
OFFER_FIELDS = {
    "has_update",
    "version",
    "checksum",
    "mandatory",
    "download_url",
    "release_notes",
    "file_size",
}


BACKENDS = ("sqlite-local", "postgres-s3")


@dataclass
class RunningServer:
    """A koolbase-ota app served by uvicorn on 127.0.0.1 in a thread of the test process."""

    base_url: str
    settings: Settings
    db: Database
    backend: str
    _server: uvicorn.Server
    _thread: threading.Thread

    @property
    def app(self) -> OTAApp:
        app = self._server.config.app
        assert isinstance(app, OTAApp)
        return app

    @property
    def context(self) -> AppContext:
        """The app's own database, store and settings."""
        context: AppContext = self.app.state.context
        return context

    @property
    def store(self) -> BundleStore:
        return self.context.store

    @property
    def serves_downloads(self) -> bool:
        """True on the embedded default, where this server signs and serves download URLs."""
        return self.store.serves_downloads

    def environment(self) -> dict[str, str]:
        """The variables that point a CLI or `serve` process at this server's backends."""
        settings = self.settings
        env = {
            "KOOLBASE_OTA_DATA_DIR": str(settings.data_dir),
            "KOOLBASE_OTA_DATABASE_URL": settings.database_url,
            "KOOLBASE_OTA_STORAGE_URL": settings.storage_url,
            "KOOLBASE_OTA_SECRET_KEY": settings.secret_key,
        }
        if settings.s3_endpoint:
            env |= {
                "KOOLBASE_OTA_S3_ENDPOINT": settings.s3_endpoint,
                "KOOLBASE_OTA_S3_REGION": settings.s3_region,
                "AWS_ACCESS_KEY_ID": settings.aws_access_key_id,
                "AWS_SECRET_ACCESS_KEY": settings.aws_secret_access_key,
            }
        return env

    def stored_keys(self) -> set[str]:
        """Every bundle object in the store, whatever the backend."""
        return {item.key for item in asyncio.run(self.store.list_keys("ota/"))}

    def object_exists(self, key: str) -> bool:
        return asyncio.run(self.store.exists(key))

    def read_object(self, key: str) -> bytes:
        """The stored bytes of a bundle, fetched the way a device fetches them."""
        response = httpx.get(self.store.download_url(key, ttl_seconds=60), timeout=30)
        assert response.status_code == 200, response.text
        return response.content

    def flush_metrics(self) -> None:
        """Add the counts its hot routes batch (`RouteTally`) to the process's metrics now,
        on its own event loop (a flush from another thread could race a count), instead of
        when its refresh loop next comes round."""
        cache = self.context.check_cache
        tallies = (cache.tally, cache.code_push_tally, cache.download_tally)
        if not self._thread.is_alive() or not any(tally.statuses for tally in tallies):
            return
        loop = next((server.get_loop() for server in self._server.servers), None)
        if loop is None or loop.is_closed() or not loop.is_running():
            return

        async def flush() -> None:
            cache.flush_tallies()

        with contextlib.suppress(Exception):  # a server stopping meanwhile: nothing to add
            asyncio.run_coroutine_threadsafe(flush(), loop).result(timeout=2)

    def should_exit(self) -> None:
        """Ask the server to stop, without waiting for it."""
        self._server.should_exit = True

    def stop(self) -> None:
        self.should_exit()
        self._thread.join(timeout=10)
        self.db.dispose()


@dataclass
class Project:
    id: uuid.UUID
    token: str
    token_id: uuid.UUID
    keys: dict[str, str]

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def key(self, environment: str = "production") -> dict[str, str]:
        return {"x-api-key": self.keys[environment]}

    def path(self, rest: str = "") -> str:
        return f"/v1/projects/{self.id}/ota{rest}"


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def start_server(
    data_dir: Path,
    *,
    backend: str = "sqlite-local",
    uvicorn_overrides: Any = None,
    **overrides: Any,
) -> RunningServer:
    sock = free_socket()
    port = sock.getsockname()[1]
    # Every test client is 127.0.0.1: rate limits stay off unless a test sets them.
    overrides = {"check_rate_per_address": 0, "auth_failure_limit": 0, **overrides}
    settings = Settings(
        data_dir=data_dir, public_url=f"http://127.0.0.1:{port}", **overrides
    ).resolved()
    engine = create_db_engine(settings.database_url)
    upgrade_schema(engine, lock_dir=settings.data_dir)
    # The protocol `serve` runs (warm checks in the parser's callbacks, files by sendfile).
    options = {**uvicorn_options(), **(uvicorn_overrides or {})}
    config = uvicorn.Config(create_app(settings), log_level="warning", **options)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.01)
    running = RunningServer(
        base_url=f"http://127.0.0.1:{port}",
        settings=settings,
        db=Database(engine),
        backend=backend,
        _server=server,
        _thread=thread,
    )
    _STARTED.append(weakref.ref(running))
    return running


#: Every server `start_server` started in this process. They all count into the process's one
#: Prometheus registry, each adding what its hot routes batched when its refresh loop comes
#: round: a count of one test's server arriving in the middle of the next test failed its exact
#: count of a metric now and then (the download and rate-limit metrics tests).
_STARTED: list[weakref.ref[RunningServer]] = []


@pytest.fixture(autouse=True)
def _metrics_of_each_test_counted_by_its_end() -> Iterator[None]:
    """After each test, every server still running adds the counts it batched."""
    yield
    alive = [running for ref in _STARTED if (running := ref()) is not None]
    _STARTED[:] = [weakref.ref(running) for running in alive]
    for running in alive:
        running.flush_metrics()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresService]:
    """A private PostgreSQL for the whole run, started on first use."""
    with PostgresService() as service:
        yield service


@pytest.fixture(scope="session")
def seaweed() -> Iterator[SeaweedService]:
    """A private SeaweedFS S3 server (signatures and expiry checked) for the whole run."""
    with SeaweedService() as service:
        yield service


@pytest.fixture(scope="session")
def migrated_database(postgres: PostgresService, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The name of a database migrated once, that each server's database is copied from:
    migrating took each a second of the run (it is still checked on every start)."""
    url = postgres.create_database()
    engine = create_db_engine(url)
    try:
        upgrade_schema(engine, lock_dir=tmp_path_factory.mktemp("template"))
    finally:
        engine.dispose()
    name: str = make_url(url).database or ""
    return name


def backend_settings(backend: str, request: pytest.FixtureRequest) -> dict[str, Any]:
    """Settings that point a new server at fresh backends of the given pair: an empty store
    and a database with the schema but no rows."""
    if backend == "sqlite-local":
        return {}
    postgres: PostgresService = request.getfixturevalue("postgres")
    seaweed: SeaweedService = request.getfixturevalue("seaweed")
    template: str = request.getfixturevalue("migrated_database")
    return {
        "database_url": postgres.create_database(template=template),
        "storage_url": f"s3://{seaweed.bucket}/{seaweed.unique_prefix()}",
        "s3_endpoint": seaweed.endpoint,
        "s3_region": seaweed.region,
        "aws_access_key_id": seaweed.access_key,
        "aws_secret_access_key": seaweed.secret_key,
    }


@pytest.fixture(scope="session", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The (database, store) pair the API suite runs on; every API test runs on each."""
    name: str = request.param
    return name


@pytest.fixture(scope="session")
def server_factory(
    backend: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., RunningServer]]:
    """Start a server with settings of its own; all are stopped at the end of the session."""
    started: list[RunningServer] = []

    def factory(**overrides: Any) -> RunningServer:
        settings = {**backend_settings(backend, request), **overrides}
        running = start_server(tmp_path_factory.mktemp("server"), backend=backend, **settings)
        started.append(running)
        return running

    yield factory
    for running in started:  # all told at once: each takes a few ticks of its loop to stop
        running.should_exit()
    for running in started:
        running.stop()


@pytest.fixture(scope="session")
def server(server_factory: Callable[..., RunningServer]) -> RunningServer:
    return server_factory()


@pytest.fixture
def client(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        yield http


@pytest.fixture
def isolated(server_factory: Callable[..., RunningServer]) -> RunningServer:
    """A server of its own, for tests that break it or look at everything it stores."""
    return server_factory()


@pytest.fixture
def isolated_client(isolated: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=isolated.base_url, timeout=30) as http:
        yield http


def new_project(db: Database, name: str = "test") -> Project:
    created = projects.create_project(db, name=name)
    return Project(
        id=created.project.id,
        token=created.dashboard_token,
        token_id=created.token_id,
        keys=created.public_keys,
    )


@pytest.fixture
def project(server: RunningServer) -> Project:
    """A fresh project per test, so tests never see each other's bundles."""
    return new_project(server.db)


def make_zip(files: dict[str, bytes | str] | None = None) -> bytes:
    files = files if files is not None else {"config.json": '{"banner": "hello"}'}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def upload(
    client: httpx.Client,
    project: Project,
    bundle: bytes | None = None,
    **fields: str,
) -> httpx.Response:
    return client.post(
        project.path("/upload"),
        headers=project.auth,
        files={
            "bundle": ("bundle.zip", make_zip() if bundle is None else bundle, "application/zip")
        },
        data=fields,
    )


def uploaded(client: httpx.Client, project: Project, **fields: str) -> dict[str, Any]:
    """Upload a bundle that must succeed, and return the bundle object."""
    response = upload(client, project, None, **fields)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def released(client: httpx.Client, project: Project, **fields: str) -> dict[str, Any]:
    """Upload and activate a bundle."""
    bundle = uploaded(client, project, **fields)
    response = client.post(project.path(f"/bundles/{bundle['id']}/activate"), headers=project.auth)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


#: The bound within which a change made elsewhere reaches a server's cached check answers.
PROPAGATION_SECONDS = 1.0


def eventually(probe: Callable[[], bool], what: str, within: float = PROPAGATION_SECONDS) -> None:
    """Wait until `probe()` holds, failing once `within` seconds have passed."""
    deadline = time.monotonic() + within
    while not probe():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not take effect within {within} s")
        time.sleep(0.02)


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> None:
    """Every error is `{"error": str, "code": str}` as JSON with the expected status."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error", "code"}
    assert isinstance(body["error"], str)
    assert body["error"]
    if code is not None:
        assert body["code"] == code, body


def assert_download_refused(
    server: RunningServer, response: httpx.Response, status: int, *, local: str, s3: str
) -> None:
    """A download URL that serves nothing, answered by whoever serves the downloads.

    `local` is our JSON error code (embedded default); `s3` is the store's XML `<Code>`.
    """
    if server.serves_downloads:
        assert_error(response, status, local)
    else:
        assert response.status_code == status, response.text
        assert f"<Code>{s3}</Code>" in response.text, response.text


def bare_release(version: int = 1, **fields: Any) -> Release:
    """A check cache release built in memory, for tests of the check's rules: untargeted, not
    mandatory, at 100% unless `fields` say otherwise."""
    values: dict[str, Any] = {
        "id": uuid.UUID(int=version, version=4),
        "version": version,
        "mandatory": False,
        "mandatory_floor": 0,
        "targeted_floor": 0,
        "storage_path": f"ota/p/production/v{version}.zip",
        "checksum": "sha256:" + "0" * 64,
        "release_notes": None,
        "file_size": 1,
        "platform": None,
        "min_app_version": None,
        "max_app_version": None,
        "rollout_percentage": 100,
        "signature": "",
    }
    return Release(**{**values, **fields})
