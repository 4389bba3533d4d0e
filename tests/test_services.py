"""The test services are real: PostgreSQL takes SQL, SeaweedFS checks S3 signatures.

These tests also pin down how SeaweedFS and obstore behave in the cases the S3 bundle store
relies on (overwrite refusal, missing keys, presigned URLs, server-side copy). They use the
servers the whole run shares (the `postgres` and `seaweed` fixtures of conftest); the two tests
that freeze, stop and restart a server start one of their own, so the shared ones stay up.
"""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import obstore
import psycopg
import pytest
from obstore.exceptions import (
    AlreadyExistsError,
    GenericError,
    NotSupportedError,
    PermissionDeniedError,
)

from tests.services import PostgresService, SeaweedService, ServiceError

LOOPBACK = "0100007F"  # 127.0.0.1 as /proc/net/tcp writes it


@pytest.fixture
def prefix(seaweed: SeaweedService) -> str:
    return seaweed.unique_prefix()


@pytest.fixture
def own_postgres() -> Iterator[PostgresService]:
    """A server of the test's own, for a test that freezes and stops it."""
    with PostgresService() as service:
        yield service


@pytest.fixture
def own_seaweed() -> Iterator[SeaweedService]:
    """A server of the test's own, for a test that freezes and stops it."""
    with SeaweedService() as service:
        yield service


def fetch(url: str, method: str = "GET", data: bytes | None = None) -> tuple[int, bytes]:
    """Status and body of a plain HTTP request, without raising on 4xx/5xx."""
    request = urllib.request.Request(url, data=data, method=method)  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def listening_ports(pid: int) -> dict[int, str]:
    """TCP ports that process ``pid`` listens on, mapped to their hex local address."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = str(fd.readlink())
        except OSError:  # closed since the listing
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    ports: dict[int, str] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, port = fields[1].split(":")
            if fields[3] == "0A" and fields[9] in inodes:  # 0A is LISTEN
                ports[int(port, 16)] = address
    return ports


# --------------------------------------------------------------------------------------------
# PostgreSQL


def test_postgres_creates_databases_and_takes_sql(postgres: PostgresService) -> None:
    url = postgres.create_database()
    assert url.startswith(f"postgresql://postgres@127.0.0.1:{postgres.port}/test_")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, name text)")
        conn.execute("INSERT INTO t VALUES (1, 'ü')")
        assert conn.execute("SELECT name FROM t").fetchone() == ("ü",)
        assert conn.execute("SHOW server_encoding").fetchone() == ("UTF8",)
        assert conn.execute("SHOW fsync").fetchone() == ("off",)
    other = postgres.create_database("second_db")
    assert other.endswith("/second_db")
    postgres.drop_database("second_db")
    with pytest.raises(ValueError, match="plain database name"):
        postgres.create_database('x"; DROP DATABASE postgres; --')


def test_postgres_listens_on_loopback_only(postgres: PostgresService) -> None:
    assert listening_ports(postgres.pid) == {postgres.port: LOOPBACK}


def test_postgres_pause_resume_stop_start(own_postgres: PostgresService) -> None:
    postgres = own_postgres
    url = postgres.create_database()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE kept (id int)")

    postgres.pause()
    try:
        with pytest.raises(psycopg.OperationalError, match="timeout"):
            psycopg.connect(url, connect_timeout=1)
    finally:
        postgres.resume()
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)

    postgres.stop()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url, connect_timeout=1)
    postgres.start()
    with psycopg.connect(url) as conn:  # same port, same data
        assert conn.execute("SELECT count(*) FROM kept").fetchone() == (0,)


# --------------------------------------------------------------------------------------------
# SeaweedFS: the server


def test_seaweed_listens_on_loopback_only_on_chosen_ports(seaweed: SeaweedService) -> None:
    ports = listening_ports(seaweed.pid)
    assert set(ports.values()) == {LOOPBACK}
    assert set(ports) == set(seaweed.ports.values())


def test_seaweed_checks_signatures(seaweed: SeaweedService, prefix: str) -> None:
    key = f"{prefix}/object"
    obstore.put(seaweed.store(), key, b"secret bytes")

    with pytest.raises(PermissionDeniedError, match="403") as wrong_secret:
        obstore.get(seaweed.store(secret_access_key="not-the-secret"), key)
    assert "SignatureDoesNotMatch" in str(wrong_secret.value)

    with pytest.raises(PermissionDeniedError, match="403") as wrong_key:
        obstore.get(seaweed.store(access_key_id="nobody"), key)
    assert "InvalidAccessKeyId" in str(wrong_key.value)

    status, body = fetch(f"{seaweed.endpoint}/{seaweed.bucket}/{key}")
    assert (status, b"<Code>AccessDenied</Code>" in body) == (403, True)


def test_seaweed_creates_buckets(seaweed: SeaweedService) -> None:
    bucket = seaweed.create_bucket()
    store = seaweed.store(bucket)
    assert obstore.list(store).collect() == []
    obstore.put(store, "a", b"1")
    assert [meta["path"] for meta in obstore.list(store).collect()] == ["a"]
    with pytest.raises(ServiceError, match=r"(?s)409 .*BucketAlreadyOwnedByYou"):
        seaweed.create_bucket(bucket)


def test_seaweed_pause_resume_stop_start(own_seaweed: SeaweedService) -> None:
    seaweed = own_seaweed
    key = f"{seaweed.unique_prefix()}/kept"
    obstore.put(seaweed.store(), key, b"kept")
    impatient = seaweed.store(
        client_options={"allow_http": True, "connect_timeout": "1s", "timeout": "1s"},
        retry_config={"max_retries": 0},
    )

    seaweed.pause()
    try:
        with pytest.raises(GenericError, match="error sending request"):
            obstore.get(impatient, key)
    finally:
        seaweed.resume()
    assert bytes(obstore.get(impatient, key).bytes()) == b"kept"

    endpoint = seaweed.endpoint
    seaweed.stop()
    with pytest.raises(GenericError, match="error sending request"):
        obstore.get(impatient, key)
    seaweed.start()
    assert seaweed.endpoint == endpoint
    assert bytes(obstore.get(impatient, key).bytes()) == b"kept"


# --------------------------------------------------------------------------------------------
# SeaweedFS + obstore: the behaviours the S3 bundle store relies on


def test_presigned_get_works_with_plain_http(seaweed: SeaweedService, prefix: str) -> None:
    key = f"{prefix}/bundle.zip"
    obstore.put(seaweed.store(), key, b"zip bytes")
    url = obstore.sign(seaweed.store(), "GET", key, timedelta(minutes=5))
    assert fetch(url) == (200, b"zip bytes")

    missing = obstore.sign(seaweed.store(), "GET", f"{prefix}/missing", timedelta(minutes=5))
    status, body = fetch(missing)
    assert (status, b"<Code>NoSuchKey</Code>" in body) == (404, True)


def test_tampered_presigned_url_is_refused(seaweed: SeaweedService, prefix: str) -> None:
    key = f"{prefix}/bundle.zip"
    obstore.put(seaweed.store(), key, b"zip bytes")
    url = obstore.sign(seaweed.store(), "GET", key, timedelta(minutes=5))
    head, signature = url.split("X-Amz-Signature=")
    flipped = ("0" if signature[0] != "0" else "1") + signature[1:]
    status, body = fetch(f"{head}X-Amz-Signature={flipped}")
    assert status == 403
    assert b"<Code>SignatureDoesNotMatch</Code>" in body

    # The signature covers the path: it does not open another key.
    obstore.put(seaweed.store(), f"{prefix}/other.zip", b"other")
    status, body = fetch(url.replace("bundle.zip", "other.zip"))
    assert (status, b"<Code>SignatureDoesNotMatch</Code>" in body) == (403, True)


def test_expired_presigned_url_is_refused(seaweed: SeaweedService, prefix: str) -> None:
    key = f"{prefix}/bundle.zip"
    obstore.put(seaweed.store(), key, b"zip bytes")
    signed_at = time.monotonic()
    # X-Amz-Date has whole seconds, so a 2 s URL is good for at least 1 s.
    url = obstore.sign(seaweed.store(), "GET", key, timedelta(seconds=2))
    assert fetch(url) == (200, b"zip bytes")
    time.sleep(max(0.0, signed_at + 3.2 - time.monotonic()))
    status, body = fetch(url)
    assert status == 403
    assert b"<Code>AccessDenied</Code>" in body
    assert b"Request has expired" in body


def test_presigned_put_uploads(seaweed: SeaweedService, prefix: str) -> None:
    key = f"{prefix}/upload"
    url = obstore.sign(seaweed.store(), "PUT", key, timedelta(minutes=1))
    assert fetch(url, "PUT", b"uploaded")[0] == 200
    assert bytes(obstore.get(seaweed.store(), key).bytes()) == b"uploaded"


def test_put_create_refuses_to_overwrite(seaweed: SeaweedService, prefix: str) -> None:
    store, key = seaweed.store(), f"{prefix}/bundle.zip"
    obstore.put(store, key, b"first", mode="create")
    with pytest.raises(AlreadyExistsError, match="412 Precondition Failed"):
        obstore.put(store, key, b"second", mode="create")
    assert bytes(obstore.get(store, key).bytes()) == b"first"
    obstore.put(store, key, b"third")  # the default mode overwrites
    assert bytes(obstore.get(store, key).bytes()) == b"third"


def test_missing_keys(seaweed: SeaweedService, prefix: str) -> None:
    store, key = seaweed.store(), f"{prefix}/missing"
    # obstore raises the builtin FileNotFoundError; its own NotFoundError is deprecated and
    # never raised, so `except obstore.exceptions.NotFoundError` does not catch a miss.
    with pytest.raises(FileNotFoundError, match="404 Not Found") as get_error:
        obstore.get(store, key)
    assert not isinstance(get_error.value, obstore.exceptions.NotFoundError)
    with pytest.raises(FileNotFoundError, match="404 Not Found"):
        obstore.head(store, key)
    obstore.delete(store, key)  # deleting a missing key is not an error: no exception
    with pytest.raises(FileNotFoundError, match="NoSuchBucket"):
        obstore.get(seaweed.store(f"nope-{uuid.uuid4().hex[:8]}"), key)


def test_server_side_copy(seaweed: SeaweedService, prefix: str) -> None:
    store = seaweed.store()
    obstore.put(store, f"{prefix}/src", b"source")
    obstore.copy(store, f"{prefix}/src", f"{prefix}/dst")
    assert bytes(obstore.get(store, f"{prefix}/dst").bytes()) == b"source"

    async def copy_async() -> None:
        await obstore.copy_async(store, f"{prefix}/src", f"{prefix}/dst-async")

    asyncio.run(copy_async())
    assert bytes(obstore.get(store, f"{prefix}/dst-async").bytes()) == b"source"

    obstore.put(store, f"{prefix}/existing", b"old")
    obstore.copy(store, f"{prefix}/src", f"{prefix}/existing")  # copy overwrites by default
    assert bytes(obstore.get(store, f"{prefix}/existing").bytes()) == b"source"
    with pytest.raises(NotSupportedError, match="copy-if-not-exists"):
        obstore.copy(store, f"{prefix}/src", f"{prefix}/existing", overwrite=False)
    with pytest.raises(FileNotFoundError):
        obstore.copy(store, f"{prefix}/missing", f"{prefix}/dst2")


def test_copy_if_not_exists_with_if_none_match(seaweed: SeaweedService, prefix: str) -> None:
    """SeaweedFS honours If-None-Match: * on CopyObject, so copies can refuse to overwrite."""
    store = seaweed.store(copy_if_not_exists="header:If-None-Match:*")
    obstore.put(store, f"{prefix}/src", b"source")
    obstore.copy(store, f"{prefix}/src", f"{prefix}/new", overwrite=False)
    assert bytes(obstore.get(store, f"{prefix}/new").bytes()) == b"source"
    obstore.put(store, f"{prefix}/existing", b"old")
    with pytest.raises(AlreadyExistsError, match="412 Precondition Failed"):
        obstore.copy(store, f"{prefix}/src", f"{prefix}/existing", overwrite=False)
    assert bytes(obstore.get(store, f"{prefix}/existing").bytes()) == b"old"


def test_startup_is_quick(
    postgres: PostgresService,
    seaweed: SeaweedService,
    record_property: Callable[[str, object], None],
) -> None:
    assert postgres.startup_seconds is not None
    assert seaweed.startup_seconds is not None
    record_property("postgres_startup_seconds", round(postgres.startup_seconds, 2))
    record_property("seaweed_startup_seconds", round(seaweed.startup_seconds, 2))
    assert postgres.startup_seconds < 15
    assert seaweed.startup_seconds < 30
