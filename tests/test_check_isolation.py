"""The checks keep their own threads and connections: a dashboard stuck on the database (a
table locked by someone else) holds every thread it shares, and checks are answered all the
same, the change log is still polled, and the process still reports ready."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import anyio.to_thread
import httpx
import pytest
from sqlalchemy import text

from koolbase_ota.projects import service as projects
from koolbase_ota.sdk.cache import LOOKUP_THREADS
from tests.conftest import (
    Project,
    RunningServer,
    assert_error,
    eventually,
    new_project,
    released,
)

T = TypeVar("T")
#: More dashboard requests than a process has worker threads to share (anyio's 40).
STUCK_REQUESTS = 60


def on_server_loop(server: RunningServer, read: Callable[[], T]) -> T:
    """`read()` run on the server's event loop, where its thread limits live."""
    loop = server._server.servers[0].get_loop()

    async def call() -> T:
        return read()

    return asyncio.run_coroutine_threadsafe(call(), loop).result(timeout=10)


def shared_threads_in_use(server: RunningServer) -> tuple[int, int]:
    """(borrowed, total) of the server's shared worker threads."""

    def count() -> tuple[int, int]:
        limiter = anyio.to_thread.current_default_thread_limiter()
        return int(limiter.borrowed_tokens), int(limiter.total_tokens)

    return on_server_loop(server, count)


def test_checks_and_the_poll_go_on_while_the_dashboard_waits_on_a_locked_table(
    server_factory: Callable[..., RunningServer],
) -> None:
    # Long enough that the stuck requests outlast the test's own waits.
    server = server_factory(database_timeout_seconds=60)
    project: Project = new_project(server.db)
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        bundle = released(client, project)
    check = "/v1/sdk/ota/check?current_bundle=0&channel=production"

    def set_mandatory() -> int:
        with httpx.Client(base_url=server.base_url, timeout=120) as http:
            response = http.patch(
                project.path(f"/bundles/{bundle['id']}"),
                headers=project.auth,
                json={"mandatory": True},
            )
            return response.status_code

    with ThreadPoolExecutor(max_workers=STUCK_REQUESTS) as pool:
        with server.db.write() as session:
            # Another program holds the bundles: every write to them waits, reads go on.
            if server.backend == "postgres-s3":
                session.execute(text("LOCK TABLE bundles IN EXCLUSIVE MODE"))
            else:
                session.execute(text("SELECT 1"))  # SQLite: the write lock, taken first
            stuck = [pool.submit(set_mandatory) for _ in range(STUCK_REQUESTS)]
            deadline = time.monotonic() + 30
            while (held := shared_threads_in_use(server))[0] < held[1]:
                assert time.monotonic() < deadline, f"the dashboard holds {held} threads"
                time.sleep(0.05)
            assert not any(future.done() for future in stuck)

            with httpx.Client(base_url=server.base_url, timeout=15) as devices:
                # Never checked before: the key and the channel are read from the database.
                answer = devices.get(check, headers=project.key())
                assert answer.status_code == 200, answer.text
                assert answer.json()["version"] == bundle["version"]
                assert devices.get("/readyz").status_code == 200

                if server.backend == "postgres-s3":
                    # A change made by another process reaches this one's checks in time.
                    projects.rotate_key(server.db, project_id=project.id, environment="production")

                    def old_key_refused() -> bool:
                        return devices.get(check, headers=project.key()).status_code == 401

                    eventually(old_key_refused, "a key rotation during the stall")
                    assert_error(devices.get(check, headers=project.key()), 401)
            assert not any(future.done() for future in stuck)

        # The lock is gone: every stuck request finishes, none is lost.
        assert [future.result(timeout=60) for future in stuck] == [200] * STUCK_REQUESTS
    listed = httpx.get(server.base_url + project.path("/bundles"), headers=project.auth)
    assert [item["mandatory"] for item in listed.json()] == [True]


def test_readyz_does_not_queue_behind_cold_checks_stuck_on_a_lock(
    server_factory: Callable[..., RunningServer],
) -> None:
    """Cold checks of unknown keys wait on a table the key lookup reads, locked as a
    migration's `ALTER TABLE` locks it, and hold every lookup thread. The database still
    answers `SELECT 1`: the process is ready, and says so before they finish (found by review:
    the probe shared their threads and waited out the database timeout)."""
    server = server_factory(database_timeout_seconds=60)
    if server.backend != "postgres-s3":
        pytest.skip("a SQLite reader never waits on a lock (WAL)")
    cache = server.context.check_cache
    check = "/v1/sdk/ota/check?current_bundle=0&channel=production"

    def cold_check() -> int:
        with httpx.Client(base_url=server.base_url, timeout=120) as device:
            unknown = {"x-api-key": "kbota_pk_" + uuid.uuid4().hex}
            return device.get(check, headers=unknown).status_code

    with ThreadPoolExecutor(max_workers=2 * LOOKUP_THREADS) as pool:
        with server.db.write() as session:
            session.execute(text("LOCK TABLE environments IN ACCESS EXCLUSIVE MODE"))
            stuck = [pool.submit(cold_check) for _ in range(2 * LOOKUP_THREADS)]
            deadline = time.monotonic() + 30
            while on_server_loop(server, lambda: cache.threads().lookups.borrowed_tokens) < (
                LOOKUP_THREADS
            ):
                assert time.monotonic() < deadline, "the cold checks never held every thread"
                time.sleep(0.05)

            with httpx.Client(base_url=server.base_url, timeout=15) as probe:
                assert probe.get("/readyz").status_code == 200
            assert not any(future.done() for future in stuck)
        assert [future.result(timeout=60) for future in stuck] == [401] * (2 * LOOKUP_THREADS)
