"""Bundles in an S3-compatible store (Cloudflare R2, AWS S3, MinIO, SeaweedFS) through obstore.

Devices download straight from the store with presigned URLs; this server never proxies bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import logging
import re
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import obstore
from obstore.exceptions import AlreadyExistsError, BaseError, NotSupportedError
from obstore.store import S3Store

from koolbase_ota.errors import StorageUnavailable
from koolbase_ota.storage import ObjectExists, ObjectNotFound, StoredObject, StoreOutcomeUnknown

logger = logging.getLogger(__name__)

#: Parts of a multipart upload (S3's smallest); with `MAX_CONCURRENCY` parts in flight, this
#: bounds the memory one upload uses.
CHUNK_BYTES = 5 * 1024 * 1024
MAX_CONCURRENCY = 3
#: How much of the spooled file is read into Python at a time.
READ_BYTES = 1024 * 1024
PROBE_KEY = ".koolbase-ota-readyz"
_ZIP: dict[str, str] = {"Content-Type": "application/zip"}


class S3BundleStore:
    serves_downloads = False
    keeps_spooled_file = False

    def __init__(
        self,
        *,
        bucket: str,
        prefix: str = "",
        endpoint: str = "",
        region: str = "auto",
        timeout_seconds: float = 10.0,
        credentials: dict[str, str] | None = None,
    ) -> None:
        """`credentials`: access_key_id, secret_access_key and session_token, where given."""
        config: dict[str, Any] = {"region": region}
        if endpoint:
            config["endpoint"] = endpoint
            # Custom endpoints (R2, MinIO, SeaweedFS) address buckets by path.
            config["virtual_hosted_style_request"] = False
        config.update(credentials or {})
        client_options: dict[str, Any] = {
            "timeout": dt.timedelta(seconds=timeout_seconds),
            "connect_timeout": dt.timedelta(seconds=min(timeout_seconds, 5.0)),
            "allow_http": endpoint.startswith("http://"),
        }
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.timeout_seconds = timeout_seconds
        self._gates: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
            weakref.WeakKeyDictionary()
        )
        self._store = S3Store(
            bucket,
            prefix=self.prefix or None,
            client_options=client_options,  # type: ignore[arg-type]
            retry_config={"max_retries": 2, "retry_timeout": dt.timedelta(seconds=timeout_seconds)},
            **config,
        )

    async def put_file(self, key: str, source: Path) -> None:
        """Store create-only, holding at most a few parts of the file in memory.

        A conditional (`If-None-Match: *`) write is one PUT with the whole body in memory, so
        only files up to one part go that way. Bigger ones stream as a multipart upload, which
        S3 cannot make conditional; they are checked for first instead. Our keys carry versions
        that are never given out twice, so the check only has to catch a misconfiguration (two
        installs sharing one prefix), never a race of our own.
        """
        size = source.stat().st_size
        try:
            with open(source, "rb") as handle:
                if size <= CHUNK_BYTES:
                    await obstore.put_async(
                        self._store,
                        key,
                        handle,
                        mode="create",
                        attributes=_ZIP,
                        use_multipart=False,
                    )
                    return
                if await self.exists(key):
                    raise ObjectExists(f"an object is already stored at {key}")
                # A buffered writer fills one part while at most MAX_CONCURRENCY are on
                # their way. An error inside the block abandons the upload: no object appears.
                async with (
                    self._one_transfer(),
                    obstore.open_writer_async(
                        self._store,
                        key,
                        attributes=_ZIP,
                        buffer_size=CHUNK_BYTES,
                        max_concurrency=MAX_CONCURRENCY,
                    ) as writer,
                ):
                    while chunk := handle.read(READ_BYTES):
                        await writer.write(chunk)
        except AlreadyExistsError as exc:
            raise ObjectExists(f"an object is already stored at {key}") from exc
        except (BaseError, OSError) as exc:
            # A PUT that timed out may still land (a frozen store wakes up and finishes it).
            raise _unavailable("store the bundle", exc, kind=StoreOutcomeUnknown) from exc

    @contextlib.asynccontextmanager
    async def _one_transfer(self) -> AsyncIterator[None]:
        """One multipart transfer at a time per process: four uploads at once cost the
        memory of one, and take about as long in all, since they share the same link.

        Waiting is bounded like any store call, so a hung store cannot queue uploads forever.
        """
        loop = asyncio.get_running_loop()
        # Per event loop: the CLI and tests may use one store from several loops.
        gate = self._gates.setdefault(loop, asyncio.Semaphore(1))
        try:
            await asyncio.wait_for(gate.acquire(), timeout=self.timeout_seconds)
        except TimeoutError:
            raise StorageUnavailable(
                "could not store the bundle: the object store is busy; try again"
            ) from None
        try:
            yield
        finally:
            gate.release()

    async def copy(self, source_key: str, target_key: str) -> None:
        """Server-side copy; the target must not exist yet."""
        try:
            try:
                await obstore.copy_async(self._store, source_key, target_key, overwrite=False)
            except NotSupportedError:
                # Plain S3 has no copy-if-absent; our keys carry never-reused versions, so
                # looking first is enough to keep an existing object safe.
                if await self.exists(target_key):
                    raise ObjectExists(f"an object is already stored at {target_key}") from None
                await obstore.copy_async(self._store, source_key, target_key)
        except AlreadyExistsError as exc:
            raise ObjectExists(f"an object is already stored at {target_key}") from exc
        except FileNotFoundError as exc:
            raise ObjectNotFound(f"no object at {source_key}") from exc
        except (BaseError, OSError) as exc:
            # Like a PUT, a copy that timed out may still land.
            raise _unavailable("copy the bundle", exc, kind=StoreOutcomeUnknown) from exc

    async def delete(self, key: str) -> None:
        try:
            await obstore.delete_async(self._store, key)
        except FileNotFoundError:  # obstore's "not found", for keys and buckets alike
            return
        except (BaseError, OSError) as exc:
            raise _unavailable("delete the bundle", exc) from exc

    async def exists(self, key: str) -> bool:
        try:
            await obstore.head_async(self._store, key)
        except FileNotFoundError:  # obstore's "not found", for keys and buckets alike
            return False
        except (BaseError, OSError) as exc:
            raise _unavailable("look up the bundle", exc) from exc
        return True

    async def checksum(self, key: str) -> str:
        """Hash the object as it streams in, one part-sized ranged GET after another.

        The store's timeout bounds a whole request, body included, so one GET of a large
        object fails on a slow link where the upload, sent in parts, did not; each GET here
        moves no more than an upload part does. Its body reaches Python in chunks of a little
        over `READ_BYTES` (the stream's default is 10 MB).
        """
        digest = hashlib.sha256()
        try:
            size = (await obstore.head_async(self._store, key))["size"]
            for start in range(0, size, CHUNK_BYTES):
                part = await obstore.get_async(
                    self._store,
                    key,
                    options={"range": (start, min(start + CHUNK_BYTES, size))},
                )
                async for chunk in part.stream(min_chunk_size=READ_BYTES):
                    digest.update(chunk)
        except FileNotFoundError:  # obstore's "not found", for keys and buckets alike
            raise ObjectNotFound(f"no object at {key}") from None
        except (BaseError, OSError) as exc:
            raise _unavailable("read the bundle back", exc) from exc
        return "sha256:" + digest.hexdigest()

    async def list_keys(self, prefix: str) -> list[StoredObject]:
        found: list[StoredObject] = []
        try:
            async for batch in obstore.list(self._store, prefix, chunk_size=1000):
                found.extend(
                    StoredObject(key=meta["path"], modified_at=meta["last_modified"])
                    for meta in batch
                )
        except (BaseError, OSError) as exc:
            raise _unavailable("list bundles", exc) from exc
        return found

    def download_url(self, key: str, *, ttl_seconds: int) -> str:
        # Signing is local arithmetic with the credentials: no network call on the check path.
        return obstore.sign(self._store, "GET", key, dt.timedelta(seconds=ttl_seconds))

    async def check(self) -> None:
        """The bucket answers to these credentials: a GET of a key nobody writes is "no such
        key". It was a HEAD, whose 404 has no body to tell that from "no such bucket": with a
        misspelt bucket name /readyz said ready while every upload failed."""
        try:
            # Not read: an object someone put at the probe key is an answer all the same.
            await obstore.get_async(self._store, PROBE_KEY)
        except FileNotFoundError as exc:  # obstore's "not found", for keys and buckets alike
            if s3_error_code(exc) == "NoSuchBucket":
                raise _unavailable("reach the bucket", exc) from exc
        except (BaseError, OSError) as exc:
            raise _unavailable("reach the object store", exc) from exc


#: The code of an S3 error answer (`<Code>SignatureDoesNotMatch</Code>`), which obstore's
#: messages hold when the answer had a body.
_S3_CODE = re.compile(r"<Code>([A-Za-z0-9.]{1,64})</Code>")


def s3_error_code(exc: BaseException) -> str | None:
    """`NoSuchBucket`, `SignatureDoesNotMatch`, `InvalidAccessKeyId`, `AccessDenied`...: what
    the store said, or None (a HEAD's answer has no body; a network error none at all)."""
    match = _S3_CODE.search(str(exc))
    return match[1] if match else None


def _unavailable(
    action: str, exc: Exception, *, kind: type[StorageUnavailable] = StorageUnavailable
) -> StorageUnavailable:
    # obstore's messages name the URL but never the credentials; keep only the kind for clients.
    # The store's error code says which setting is wrong (a secret, a key id, a bucket name):
    # a fixed identifier, logged; the rest of the message is not.
    code = s3_error_code(exc)
    logger.warning(
        "object store: could not %s: %s%s", action, type(exc).__name__, f" ({code})" if code else ""
    )
    return kind(f"could not {action}: the object store is unavailable")
