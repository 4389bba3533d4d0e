"""Streaming parser for the upload form: the bundle goes to a temporary file as it arrives.

The size limit is enforced while reading, and SHA-256 and size are computed in the same pass,
so a 50 MiB upload never costs 50 MiB of memory. The form around the bundle is bounded too (how
many fields, how long each), and so is how long the client may leave the body waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import tempfile
import time
from collections.abc import AsyncGenerator, AsyncIterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import anyio
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from koolbase_ota.errors import InvalidInput, OTAError, PayloadTooLarge, UnsupportedMediaType

BUNDLE_FIELD = "bundle"
#: The form's text fields (`bundles.service.upload_bundle` reads them).
TEXT_FIELDS = frozenset(
    {"channel", "mandatory", "release_notes", "platform", "min_app_version", "max_app_version"}
)
_FEED_BYTES = 1024 * 1024
#: The form has a few fields; a few more text fields (a client's own extras) are tolerated and
#: ignored, and so are empty file fields (a browser form's optional file input left empty).
MAX_PARTS = 16
#: A text field's bytes: `channel` and `mandatory` are a few bytes long.
MAX_FIELD_BYTES = 4 * 1024
MAX_RELEASE_NOTES = 10_000
#: `release_notes` may hold MAX_RELEASE_NOTES characters of up to four UTF-8 bytes each.
_FIELD_BYTES = {"release_notes": 4 * MAX_RELEASE_NOTES}
#: What the form may add to the bundle's bytes: boundaries and part headers (a real client's
#: are well under 1 KiB a part; the parser itself refuses one over 8 headers of 4224 bytes),
#: and the text fields.
FORM_OVERHEAD_BYTES = MAX_PARTS * 1024 + MAX_PARTS * MAX_FIELD_BYTES + 4 * MAX_RELEASE_NOTES
#: A bundle that must reach the disk is synced in the background each time this much more of
#: it has been written, while the rest arrives: the disk works alongside the network, and the
#: last fsync has only the tail left (a 50 MiB bundle's was ~90 ms here, now ~5 ms).
SYNC_EVERY_BYTES = 8 * 1024 * 1024
_SYNCS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="koolbase-upload-sync")
_datasync = getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync


class UploadTimeout(OTAError):
    """The client stopped sending the upload's body for longer than the idle timeout."""

    status_code = 408
    default_code = "upload_timeout"


@dataclass
class StagedUpload:
    """The parsed form: the bundle in a temporary file, and the text fields."""

    fields: dict[str, str] = field(default_factory=dict)
    bundle_path: Path | None = None
    bundle_size: int = 0
    sha256: str = ""

    def discard(self) -> None:
        if self.bundle_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.bundle_path.unlink()
            self.bundle_path = None


class _FormReader:
    """Callbacks for python-multipart's parser, one part at a time."""

    def __init__(
        self, *, max_bundle_bytes: int, tmp_dir: Path, staged: StagedUpload, durable: bool
    ) -> None:
        self.max_bundle_bytes = max_bundle_bytes
        self.durable = durable
        self.tmp_dir = tmp_dir
        self.staged = staged
        self.parts = 0
        self.finished = False
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers: dict[str, bytes] = {}
        self._name: str | None = None
        #: The part being read came as a file (a `filename` in its Content-Disposition).
        self._sent_as_file = False
        self._value = bytearray()
        self._file: IO[bytes] | None = None
        self._hash = hashlib.sha256()
        #: The background sync in flight (durable only), and the bytes written since it began.
        self._syncing: Future[None] | None = None
        self._unsynced = 0

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_end": self.on_end,
        }

    def on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise InvalidInput("too many form fields", code="too_many_fields")
        self._headers = {}
        self._name = None
        self._value = bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._header_field.decode("latin-1").lower()] = bytes(self._header_value)
        self._header_field = bytearray()
        self._header_value = bytearray()

    def on_headers_finished(self) -> None:
        disposition, options = parse_options_header(self._headers.get("content-disposition", b""))
        if disposition != b"form-data" or b"name" not in options:
            raise InvalidInput("form part without a field name", code="invalid_multipart")
        name = _decode(options[b"name"], "form field name")
        self._sent_as_file = bool(options.get(b"filename"))
        if self._sent_as_file and name != BUNDLE_FIELD and name not in TEXT_FIELDS:
            # A file under another name (`-F file=@bundle.zip`) was read as a text field, and
            # refused as one: "form field 'file' is not valid UTF-8".
            raise InvalidInput(
                f"form field {name!r} is a file: the bundle goes in the 'bundle' field",
                code="unexpected_file",
            )
        if name in self.staged.fields or (name == BUNDLE_FIELD and self._file is not None):
            raise InvalidInput(f"form field {name!r} given twice", code="duplicate_field")
        if name == BUNDLE_FIELD:
            if self.staged.bundle_path is not None:
                raise InvalidInput("form field 'bundle' given twice", code="duplicate_field")
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
            fd, path = tempfile.mkstemp(dir=self.tmp_dir, prefix="upload-", suffix=".zip")
            self.staged.bundle_path = Path(path)
            self._file = os.fdopen(fd, "wb")
        self._name = name

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = memoryview(data)[start:end]  # no copy: hashed and written as it is
        if self._file is not None:
            self.staged.bundle_size += len(chunk)
            if self.staged.bundle_size > self.max_bundle_bytes:
                raise _too_large(self.max_bundle_bytes)
            self._hash.update(chunk)
            self._file.write(chunk)
            if self.durable:
                self._unsynced += len(chunk)
                if self._unsynced >= SYNC_EVERY_BYTES:
                    self._sync_in_background(self._file)
            return
        self._value += chunk
        if len(self._value) > _FIELD_BYTES.get(self._name or "", MAX_FIELD_BYTES):
            raise InvalidInput(f"{self._field()} is too long", code="field_too_long")

    def _field(self) -> str:
        """The text field being read, as errors name it."""
        if self._sent_as_file:  # `-F channel=@bundle.zip`, say
            return f"form field {self._name!r} (a file: the bundle goes in the 'bundle' field)"
        return f"form field {self._name!r}"

    def _sync_in_background(self, file: IO[bytes]) -> None:
        """Start syncing what is written so far, unless a sync is still running."""
        if self._syncing is not None:
            if not self._syncing.done():
                return
            self._syncing.result()  # a failed sync fails the upload
        file.flush()
        self._syncing = _SYNCS.submit(_datasync, file.fileno())
        self._unsynced = 0

    def _sync_finished(self) -> None:
        """Wait for the background sync: the file must not be closed under it."""
        syncing, self._syncing = self._syncing, None
        if syncing is not None:
            syncing.result()

    def on_part_end(self) -> None:
        if self._file is not None:
            self._file.flush()
            if self.durable:
                self._sync_finished()
                os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            self.staged.sha256 = self._hash.hexdigest()
        elif self._name is not None:
            self.staged.fields[self._name] = _decode(bytes(self._value), self._field())

    def on_end(self) -> None:
        self.finished = True

    def close(self) -> None:
        """Closes the bundle's file, which is being discarded: its errors do not matter."""
        with contextlib.suppress(OSError):
            self._sync_finished()
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None


def _decode(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"{what} is not valid UTF-8", code="invalid_encoding") from exc


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"bundle is larger than the limit of {limit} bytes", code="bundle_too_large"
    )


def check_declared_length(content_length: str | None, *, max_bundle_bytes: int) -> None:
    """Refuse at once, before reading, a body that says it is over the limit."""
    if content_length is None:
        return
    try:
        declared = int(content_length)
    except ValueError as exc:
        raise InvalidInput("invalid Content-Length", code="invalid_content_length") from exc
    if declared > max_bundle_bytes + FORM_OVERHEAD_BYTES:
        raise _too_large(max_bundle_bytes)


def boundary_of(content_type: str | None) -> bytes:
    if not content_type:
        raise UnsupportedMediaType(
            "the upload must be multipart/form-data", code="unsupported_media_type"
        )
    kind, options = parse_options_header(content_type)
    if kind != b"multipart/form-data":
        raise UnsupportedMediaType(
            "the upload must be multipart/form-data", code="unsupported_media_type"
        )
    boundary = options.get(b"boundary", b"")
    if not boundary or len(boundary) > 200:
        raise InvalidInput("multipart body without a valid boundary", code="invalid_multipart")
    return boundary


async def read_upload_form(
    chunks: AsyncIterable[bytes],
    *,
    content_type: str | None,
    max_bundle_bytes: int,
    tmp_dir: Path,
    idle_timeout_seconds: float | None = None,
    total_timeout_seconds: float | None = None,
    durable: bool = True,
) -> StagedUpload:
    """Parse the multipart body; the caller must `discard()` the result when done with it.

    A client that sends nothing for `idle_timeout_seconds`, or whose whole body takes longer
    than `total_timeout_seconds` (a trickle that never stalls), gets UploadTimeout (408) and its
    partial upload is discarded. The whole body, not only the bundle, is bounded: without a
    `Content-Length` a client could otherwise stream an endless preamble or epilogue.

    `durable`: the bundle is synced to disk as it arrives and fsynced at its end; a store that
    keeps the spooled file itself needs it on disk, one that copies it elsewhere does not.
    """
    boundary = boundary_of(content_type)
    staged = StagedUpload()
    reader = _FormReader(
        max_bundle_bytes=max_bundle_bytes, tmp_dir=tmp_dir, staged=staged, durable=durable
    )
    parser = MultipartParser(boundary, reader.callbacks())  # type: ignore[arg-type]
    max_body_bytes = max_bundle_bytes + FORM_OVERHEAD_BYTES
    loop = asyncio.get_running_loop()
    # Parsing, hashing and writing run in a worker thread, one batch at a time, while the
    # event loop receives the next batch: checks are never stalled behind an upload, and the
    # network and the disk work side by side.
    writing: asyncio.Future[Any] | None = None

    def write(batch: list[bytes]) -> None:
        for data in batch:
            parser.write(data)

    async def feed(batch: list[bytes]) -> None:
        nonlocal writing
        if writing is not None:
            await writing  # the parser's error, if any, is raised here
        writing = loop.run_in_executor(None, write, batch)

    try:
        # The server hands the body over in pieces of up to a few hundred KiB; each trip to
        # the thread costs a round of the event loop, so send it up to a megabyte of them at a
        # time (as they are: joining them would copy every byte once more), and never much past
        # the size limit.
        feed_bytes = min(_FEED_BYTES, max(16 * 1024, max_bundle_bytes // 4))
        pending: list[bytes] = []
        pending_bytes = 0
        body_bytes = 0
        async with contextlib.aclosing(
            _time_bounded(chunks, idle_timeout_seconds, total_timeout_seconds)
        ) as body:
            async for chunk in body:
                body_bytes += len(chunk)
                if body_bytes > max_body_bytes:
                    raise _too_large(max_bundle_bytes)
                pending.append(chunk)
                pending_bytes += len(chunk)
                if pending_bytes >= feed_bytes:
                    await feed(pending)
                    pending, pending_bytes = [], 0
                    if body_bytes > max_bundle_bytes - feed_bytes and writing is not None:
                        # Near the size limit the parser may refuse this very batch: answer
                        # now, not after a next batch that a refused client may never send.
                        await writing
        if pending_bytes:
            await feed(pending)
        if writing is not None:
            await writing
        # The last part's end flushes and fsyncs the bundle: in the thread too.
        await loop.run_in_executor(None, parser.finalize)
        if not reader.finished:
            raise InvalidInput("the multipart body ended early", code="invalid_multipart")
    except MultipartParseError as exc:
        await _discarded(reader, staged, writing)
        raise InvalidInput(f"malformed multipart body: {exc}", code="invalid_multipart") from exc
    except BaseException:
        await _discarded(reader, staged, writing)
        raise
    return staged


async def _discarded(
    reader: _FormReader, staged: StagedUpload, writing: asyncio.Future[Any] | None
) -> None:
    """Closes and removes a refused upload's file once nothing is writing or syncing it."""
    await _settled(writing)
    # In a thread: closing waits for a background sync, which must not stall the event loop.
    await _settled(asyncio.get_running_loop().run_in_executor(None, reader.close))
    staged.discard()


async def _settled(job: asyncio.Future[Any] | None) -> None:
    """Waits for a job still running (a batch being written, the file being closed), and reads
    its error if it failed: the upload is refused for another reason already, and an error
    never read is logged by asyncio ("Future exception was never retrieved") as if unhandled.
    """
    if job is None:
        return
    if not job.done():
        with contextlib.suppress(BaseException):
            await asyncio.wait([job])
    if job.done() and not job.cancelled():
        job.exception()


async def _time_bounded(
    chunks: AsyncIterable[bytes],
    idle_timeout_seconds: float | None,
    total_timeout_seconds: float | None,
) -> AsyncGenerator[bytes]:
    """The chunks, failing with UploadTimeout when the next one takes longer than the idle
    timeout, or the body as a whole longer than the total one."""
    iterator = aiter(chunks)
    deadline = None if total_timeout_seconds is None else time.monotonic() + total_timeout_seconds
    while True:
        wait, total_bound = idle_timeout_seconds, False
        if deadline is not None:
            left = max(deadline - time.monotonic(), 0.0)
            if wait is None or left <= wait:
                wait, total_bound = left, True
        with anyio.move_on_after(wait) as waiting:
            chunk = await anext(iterator, None)
        if waiting.cancelled_caught:
            # (Which bound it was is known from the wait: timers may fire a hair early.)
            if total_bound:
                message = f"the upload took longer than {total_timeout_seconds:g} s"
            else:
                message = f"no upload data arrived for {idle_timeout_seconds:g} s"
            raise UploadTimeout(
                message + "; the upload was discarded",
                # The body was not read to its end, so this connection cannot carry another
                # request.
                headers={"Connection": "close"},
            )
        if chunk is None:
            return
        yield chunk
