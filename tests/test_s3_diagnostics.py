"""A store set up wrong says which setting: /readyz finds a bucket that does not exist, and the
log names the store's error code (a wrong secret, an unknown key id), on a real SeaweedFS."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import httpx
import pytest

from koolbase_ota.errors import StorageUnavailable
from koolbase_ota.storage.s3 import S3BundleStore, s3_error_code
from tests.services import SeaweedService
from tests.test_e2e import serving


def s3_store(
    seaweed: SeaweedService, *, bucket: str | None = None, secret: str | None = None
) -> S3BundleStore:
    return S3BundleStore(
        bucket=bucket or seaweed.bucket,
        prefix=seaweed.unique_prefix(),
        endpoint=seaweed.endpoint,
        region=seaweed.region,
        timeout_seconds=5,
        credentials={
            "access_key_id": seaweed.access_key,
            "secret_access_key": secret or seaweed.secret_key,
        },
    )


def test_the_check_passes_on_a_bucket_that_answers(seaweed: SeaweedService) -> None:
    asyncio.run(s3_store(seaweed).check())


def test_the_check_fails_on_a_bucket_that_does_not_exist(
    seaweed: SeaweedService, caplog: pytest.LogCaptureFixture
) -> None:
    """A HEAD's 404 has no body: a misspelt bucket looked like a missing probe key, and
    /readyz said ready while every upload failed."""
    with (
        caplog.at_level(logging.WARNING, "koolbase_ota.storage.s3"),
        pytest.raises(StorageUnavailable),
    ):
        asyncio.run(s3_store(seaweed, bucket="no-such-bucket-here").check())
    assert caplog.messages == [
        "object store: could not reach the bucket: FileNotFoundError (NoSuchBucket)"
    ]


def test_the_log_names_the_stores_error_code(
    seaweed: SeaweedService, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """A wrong secret was `PermissionDeniedError` in the log, as a key id the store does not
    know or a policy refusing the bucket: the code says which to fix. Never the secret."""
    bundle = tmp_path / "b.zip"
    bundle.write_bytes(b"PK\x05\x06" + bytes(18))
    store = s3_store(seaweed, secret="wrong-secret-" + "x" * 27)
    with caplog.at_level(logging.WARNING, "koolbase_ota.storage.s3"):
        with pytest.raises(StorageUnavailable):
            asyncio.run(store.check())
        with pytest.raises(StorageUnavailable):
            asyncio.run(store.put_file("ota/p/production/v1.zip", bundle))
    assert caplog.messages == [
        "object store: could not reach the object store: PermissionDeniedError"
        " (SignatureDoesNotMatch)",
        "object store: could not store the bundle: PermissionDeniedError (SignatureDoesNotMatch)",
    ]
    assert "wrong-secret" not in caplog.text


def test_s3_error_code_reads_only_a_code() -> None:
    assert s3_error_code(OSError("...<Code>NoSuchKey</Code><Message>m</Message>")) == "NoSuchKey"
    assert s3_error_code(OSError("connection refused")) is None
    assert s3_error_code(OSError("<Code>two words</Code>")) is None


def test_readyz_is_503_on_a_bucket_that_does_not_exist(
    seaweed: SeaweedService, tmp_path: Path
) -> None:
    env = {
        "KOOLBASE_OTA_STORAGE_URL": "s3://no-such-bucket-here/ota",
        "KOOLBASE_OTA_S3_ENDPOINT": seaweed.endpoint,
        "KOOLBASE_OTA_S3_REGION": seaweed.region,
        "AWS_ACCESS_KEY_ID": seaweed.access_key,
        "AWS_SECRET_ACCESS_KEY": seaweed.secret_key,
    }
    with serving(tmp_path / "data", "nobucket", env=env) as server:
        answer = httpx.get(server.base_url + "/readyz", timeout=30)
        log = server.log()
    assert answer.status_code == 503
    assert answer.json() == {
        "status": "unavailable",
        "checks": {"database": "ok", "storage": "unavailable"},
    }
    assert "could not reach the bucket: FileNotFoundError (NoSuchBucket)" in log
