"""Checks that an uploaded zip is safe for the SDK to unzip as it is, without extracting it.

The Flutter SDK writes every entry to `<documents>/koolbase_ota_bundle/<name>` with no guard of
its own, so this is the one place that keeps a bad name away from every device.
"""

from __future__ import annotations

import re
import stat
import struct
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

from zlib_ng import zlib_ng

from koolbase_ota.errors import Unprocessable

_DRIVE = re.compile(r"^[A-Za-z]:")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_LOCAL_HEADER = b"PK\x03\x04"
_END_OF_DIRECTORY = b"PK\x05\x06"
_ZIP64_END = b"PK\x06\x06"
_ZIP64_LOCATOR = b"PK\x06\x07"
_DESCRIPTOR = b"PK\x07\x08"
_EOCD_SIZE = 22
_LOCAL_HEADER_SIZE = 30
_DATA_DESCRIPTOR = 0x8
_UTF8_NAME = 0x800
_ENCRYPTED = 0x1
_ZIP64_END_SIZE = 56
_PATCHED_DATA = 0x20
_STRONG_ENCRYPTION = 0x40
_CHUNK = 1024 * 1024
#: zlib-ng's error (its type stub declares an instance, not the class).
_INFLATE_ERROR = cast(type[Exception], zlib_ng.error)
_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)


@dataclass(frozen=True)
class ZipLimits:
    max_entries: int = 10_000
    max_uncompressed_bytes: int = 512 * 1024 * 1024
    max_ratio: int = 1000
    #: Small files may compress absurdly well (a JSON of spaces); only big ones can be bombs.
    ratio_applies_above: int = 1024 * 1024
    max_name_length: int = 1024


def check_entry_name(name: str, *, max_length: int = 1024) -> None:
    """Refuse a name that could land outside the bundle root on any platform."""
    if not name or name in ("/", "."):
        raise Unprocessable("zip entry with an empty name", code="unsafe_entry_name")
    if len(name) > max_length or any(len(part) > 255 for part in name.split("/")):
        raise Unprocessable(f"zip entry name too long: {name[:80]!r}", code="unsafe_entry_name")
    if _CONTROL.search(name):
        raise Unprocessable(
            f"zip entry name has control characters: {name!r}", code="unsafe_entry_name"
        )
    if "\\" in name:
        raise Unprocessable(f"zip entry name has a backslash: {name!r}", code="unsafe_entry_name")
    if name.startswith("/") or _DRIVE.match(name):
        raise Unprocessable(f"zip entry name is absolute: {name!r}", code="unsafe_entry_name")
    if any(part == ".." for part in name.split("/")):
        raise Unprocessable(
            f"zip entry name leaves the bundle root: {name!r}", code="unsafe_entry_name"
        )


def validate_zip(path: Path, *, limits: ZipLimits | None = None) -> int:
    """Validate the zip at `path`, returning its entry count; raise Unprocessable if unsafe."""
    limits = limits or ZipLimits()
    with open(path, "rb") as handle:
        if handle.read(4) not in (_LOCAL_HEADER, _END_OF_DIRECTORY):
            # zipfile tolerates bytes glued in front of an archive; unzip tools on devices may
            # not.
            raise Unprocessable("the bundle is not a zip file", code="invalid_zip")
        try:
            with zipfile.ZipFile(handle) as archive:
                entries = archive.infolist()
            _check_entries(entries, limits)
            data_starts = _check_layout(handle, entries)
            for entry, data_at in zip(entries, data_starts, strict=True):
                _check_content(handle, entry, data_at)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, struct.error) as exc:
            raise _invalid(str(exc)) from exc
        except UnicodeDecodeError as exc:
            # An entry flagged as UTF-8 whose name is not.
            raise _invalid(f"an entry name is not valid UTF-8: {exc}") from exc
        except NotImplementedError as exc:
            raise Unprocessable(
                f"the bundle uses an unsupported zip feature: {exc}", code="unsupported_zip"
            ) from exc
    return len(entries)


def _invalid(message: str) -> Unprocessable:
    return Unprocessable(f"the bundle is not a valid zip file: {message}", code="invalid_zip")


def _check_layout(handle: BinaryIO, entries: list[zipfile.ZipInfo]) -> list[int]:
    """The archive is one zip from its first byte to its last, entries back to back.

    zipfile reads the last central directory it finds and forgives bytes around it; unzip tools
    on devices may instead read local headers from the start, or take offsets as written. So no
    byte may be left that one reader sees and another does not: nothing after the end record,
    no gap or overlap between entries (overlaps are also how the densest zip bombs are built),
    and every local header agreeing with the central directory about its entry, name included.

    Returns where each entry's data begins, in the order of `entries`.
    """
    size = handle.seek(0, 2)
    tail_at = max(0, size - _EOCD_SIZE - 0xFFFF)
    handle.seek(tail_at)
    tail = handle.read()
    found = tail.rfind(_END_OF_DIRECTORY)
    if found < 0 or len(tail) - found < _EOCD_SIZE:
        raise _invalid("no end of central directory record")
    eocd = tail_at + found
    cd_size, cd_offset, comment_length = struct.unpack_from("<IIH", tail, found + 12)
    if eocd + _EOCD_SIZE + comment_length != size:
        raise _invalid("data after the end of the archive")
    directory_end = eocd
    if eocd >= 20:
        handle.seek(eocd - 20)
        locator = handle.read(20)
        if locator[:4] == _ZIP64_LOCATOR:
            (record_at,) = struct.unpack_from("<Q", locator, 8)
            if record_at > eocd - 20 - _ZIP64_END_SIZE:
                raise _invalid("a Zip64 end record out of place")
            handle.seek(record_at)
            record = handle.read(_ZIP64_END_SIZE)
            if len(record) < _ZIP64_END_SIZE or record[:4] != _ZIP64_END:
                raise _invalid("a broken Zip64 end record")
            # Its size, then versions (2 + 2), disk numbers (4 + 4) and entry counts (8 + 8).
            record_size, cd_size, cd_offset = struct.unpack_from("<Q28xQQ", record, 4)
            if record_at + 12 + record_size != eocd - 20:
                raise _invalid("data inside the Zip64 end records")
            directory_end = record_at
    if cd_offset + cd_size != directory_end:
        raise _invalid("data before or inside the central directory")
    data_starts: dict[int, int] = {}
    expected = 0
    for entry in sorted(entries, key=lambda item: item.header_offset):
        if entry.header_offset != expected:
            raise _invalid(f"entries overlap or leave gaps at byte {entry.header_offset}")
        handle.seek(entry.header_offset)
        header = handle.read(_LOCAL_HEADER_SIZE)
        if len(header) < _LOCAL_HEADER_SIZE or header[:4] != _LOCAL_HEADER:
            raise _invalid(f"no local header for {entry.filename!r}")
        flags, method, crc, compressed, uncompressed, name_length, extra_length = (
            struct.unpack_from("<HH4xIIIHH", header, 6)
        )
        # How the data is read: a streaming unzipper goes by the local header, so it must say
        # what was checked.
        if method != entry.compress_type or (flags ^ entry.flag_bits) & _ENCRYPTED:
            raise _invalid(f"the local header of {entry.filename!r} disagrees with the directory")
        name_and_extra = handle.read(name_length + extra_length)
        if len(name_and_extra) != name_length + extra_length:
            raise _invalid(f"the local header of {entry.filename!r} is cut short")
        # Each name decoded by its own header's flag, as zipfile's reader does: the same name
        # to a reader of either header (UTF-8 flagged in one only is another name).
        encoding = "utf-8" if flags & _UTF8_NAME else "cp437"
        if name_and_extra[:name_length].decode(encoding) != entry.orig_filename:
            raise _invalid(f"the local header of {entry.filename!r} names another file")
        extra = name_and_extra[name_length:]
        data_at = entry.header_offset + _LOCAL_HEADER_SIZE + name_length + extra_length
        data_starts[entry.header_offset] = data_at
        end = data_at + entry.compress_size
        if end > size:
            raise _invalid(f"the data of {entry.filename!r} runs past the end of the archive")
        if flags & _DATA_DESCRIPTOR:
            # Sizes and CRC follow the data instead: 12 or 20 bytes (Zip64), each
            # optionally after a signature.
            handle.seek(end)
            signed = handle.read(4) == _DESCRIPTOR
            zip64 = any(header_id == 1 for header_id, _ in _extra_fields(extra))
            zip64 = zip64 or _is_zip64(entry)
            handle.seek(end + (4 if signed else 0))
            descriptor = handle.read(20 if zip64 else 12)
            if len(descriptor) != (20 if zip64 else 12) or struct.unpack(
                "<IQQ" if zip64 else "<III", descriptor
            ) != (entry.CRC, entry.compress_size, entry.file_size):
                raise _invalid(
                    f"the data descriptor of {entry.filename!r} disagrees with the directory"
                )
            end += (4 if signed else 0) + len(descriptor)
        else:
            if 0xFFFFFFFF in (compressed, uncompressed):
                compressed, uncompressed = _zip64_sizes(extra, compressed, uncompressed)
            if (crc, compressed, uncompressed) != (
                entry.CRC,
                entry.compress_size,
                entry.file_size,
            ):
                raise _invalid(
                    f"the local header of {entry.filename!r} disagrees with the directory"
                )
        expected = end
    if expected != cd_offset:
        raise _invalid("data between the entries and the central directory")
    return [data_starts[entry.header_offset] for entry in entries]


def _is_zip64(entry: zipfile.ZipInfo) -> bool:
    return entry.compress_size >= 0xFFFFFFFF or entry.file_size >= 0xFFFFFFFF


def _extra_fields(extra: bytes) -> list[tuple[int, bytes]]:
    fields = []
    at = 0
    while at + 4 <= len(extra):
        header_id, length = struct.unpack_from("<HH", extra, at)
        fields.append((header_id, extra[at + 4 : at + 4 + length]))
        at += 4 + length
    return fields


def _zip64_sizes(extra: bytes, compressed: int, uncompressed: int) -> tuple[int, int]:
    """A local header's real sizes, from its Zip64 extra field (uncompressed comes first)."""
    for header_id, data in _extra_fields(extra):
        if header_id == 1:
            values = list(struct.unpack_from(f"<{len(data) // 8}Q", data))
            if uncompressed == 0xFFFFFFFF and values:
                uncompressed = values.pop(0)
            if compressed == 0xFFFFFFFF and values:
                compressed = values.pop(0)
    return compressed, uncompressed


def _check_entries(entries: list[zipfile.ZipInfo], limits: ZipLimits) -> None:
    if len(entries) > limits.max_entries:
        raise Unprocessable(
            f"the bundle has more than {limits.max_entries} entries", code="too_many_entries"
        )
    seen: set[str] = set()
    total = 0
    for entry in entries:
        # zipfile cuts `filename` at a NUL; devices see the whole name, so check that one.
        check_entry_name(entry.orig_filename, max_length=limits.max_name_length)
        if entry.compress_type not in _METHODS:
            raise Unprocessable(
                f"zip entry {entry.filename!r} uses compression method {entry.compress_type};"
                " only stored and deflated entries unzip on every device",
                code="unsupported_zip",
            )
        if entry.filename in seen:
            raise Unprocessable(
                f"zip entry appears twice: {entry.filename!r}", code="duplicate_entry"
            )
        seen.add(entry.filename)
        # Whatever system wrote it, a symlink mode in the high bits is what unzip tools act on.
        if stat.S_ISLNK(entry.external_attr >> 16):
            raise Unprocessable(
                f"zip entry is a symbolic link: {entry.filename!r}", code="symlink_entry"
            )
        if entry.flag_bits & 0x1:
            raise Unprocessable(
                f"zip entry is encrypted: {entry.filename!r}", code="encrypted_entry"
            )
        if entry.flag_bits & (_PATCHED_DATA | _STRONG_ENCRYPTION):
            raise Unprocessable(
                f"zip entry {entry.filename!r} uses patched data or strong encryption",
                code="unsupported_zip",
            )
        total += entry.file_size
        if total > limits.max_uncompressed_bytes:
            raise Unprocessable(
                f"the bundle unpacks to more than {limits.max_uncompressed_bytes} bytes",
                code="zip_bomb",
            )
        if (
            entry.file_size > limits.ratio_applies_above
            and entry.file_size > limits.max_ratio * max(entry.compress_size, 1)
        ):
            raise Unprocessable(
                f"zip entry compresses more than {limits.max_ratio}:1: {entry.filename!r}",
                code="zip_bomb",
            )


def _check_content(handle: BinaryIO, entry: zipfile.ZipInfo, data_at: int) -> None:
    """Read the entry's data (inflating it into nothing): its size and CRC-32 must be the
    directory's. With zlib-ng's CRC-32 and inflate, several times zlib's (which zipfile's
    reader uses): this reads every byte of every upload."""
    if entry.is_dir():
        return
    handle.seek(data_at)
    try:
        if entry.compress_type == zipfile.ZIP_DEFLATED:
            crc, size, ended = _inflated(handle, entry)
        else:
            crc, size, ended = _stored(handle, entry)
    except _INFLATE_ERROR as exc:
        raise Unprocessable(
            f"zip entry data is corrupt: {entry.filename!r}", code="invalid_zip"
        ) from exc
    if size != entry.file_size or not ended:
        raise Unprocessable(
            f"zip entry size does not match its header: {entry.filename!r}", code="invalid_zip"
        )
    if crc != entry.CRC:
        raise _invalid(f"bad CRC-32 for {entry.filename!r}")


def _compressed(handle: BinaryIO, entry: zipfile.ZipInfo) -> Iterator[bytes]:
    """The entry's stored bytes, a chunk at a time."""
    left = entry.compress_size
    while left:
        chunk = handle.read(min(_CHUNK, left))
        if not chunk:
            raise _invalid(f"zip entry data is cut short: {entry.filename!r}")
        left -= len(chunk)
        yield chunk


def _stored(handle: BinaryIO, entry: zipfile.ZipInfo) -> tuple[int, int, bool]:
    """(CRC-32, size, True) of a stored entry's data."""
    crc = size = 0
    for chunk in _compressed(handle, entry):
        crc = zlib_ng.crc32(chunk, crc)
        size += len(chunk)
    return crc, size, True


def _inflated(handle: BinaryIO, entry: zipfile.ZipInfo) -> tuple[int, int, bool]:
    """(CRC-32, size, whether the stream ended) of a deflated entry's data, inflated a chunk at
    a time: a bomb never costs more than a chunk of memory, and inflating stops as soon as it
    passes the declared size. Bytes after the stream's end are ignored, as zipfile does."""
    inflater = zlib_ng.decompressobj(-15)
    crc = size = 0
    for chunk in _compressed(handle, entry):
        pending = chunk
        while True:
            out = inflater.decompress(pending, _CHUNK)
            crc = zlib_ng.crc32(out, crc)
            size += len(out)
            if inflater.eof or size > entry.file_size:
                return crc, size, inflater.eof
            pending = inflater.unconsumed_tail
            if not pending and len(out) < _CHUNK:
                break  # this chunk is used up, and no output is held back for the next call
    return crc, size, inflater.eof
