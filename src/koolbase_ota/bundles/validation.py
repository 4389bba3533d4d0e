"""Checks that an uploaded zip is safe for the SDK to unzip as it is, without extracting it.

The Flutter SDK writes every entry to `<documents>/koolbase_ota_bundle/<name>` with no guard of
its own, so this is the one place that keeps a bad name away from every device.
"""

from __future__ import annotations

import re
import stat
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

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
_CHUNK = 1024 * 1024
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
        head = handle.read(4)
    if head not in (_LOCAL_HEADER, _END_OF_DIRECTORY):
        # zipfile tolerates bytes glued in front of an archive; unzip tools on devices may not.
        raise Unprocessable("the bundle is not a zip file", code="invalid_zip")
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
            _check_entries(entries, limits)
            _check_layout(path, entries)
            for entry in entries:
                _check_content(archive, entry)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, struct.error) as exc:
        raise Unprocessable(
            f"the bundle is not a valid zip file: {exc}", code="invalid_zip"
        ) from exc
    except NotImplementedError as exc:
        raise Unprocessable(
            f"the bundle uses an unsupported zip feature: {exc}", code="unsupported_zip"
        ) from exc
    return len(entries)


def _invalid(message: str) -> Unprocessable:
    return Unprocessable(f"the bundle is not a valid zip file: {message}", code="invalid_zip")


def _check_layout(path: Path, entries: list[zipfile.ZipInfo]) -> None:
    """The archive is one zip from its first byte to its last, entries back to back.

    zipfile reads the last central directory it finds and forgives bytes around it; unzip tools
    on devices may instead read local headers from the start, or take offsets as written. So no
    byte may be left that one reader sees and another does not: nothing after the end record,
    no gap or overlap between entries (overlaps are also how the densest zip bombs are built),
    and every local header agreeing with the central directory about its entry.
    """
    with open(path, "rb") as handle:
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
                handle.seek(record_at)
                record = handle.read(56)
                if len(record) < 56 or record[:4] != _ZIP64_END:
                    raise _invalid("a broken Zip64 end record")
                record_size, cd_size, cd_offset = struct.unpack_from("<Q32xQQ", record, 4)
                if record_at + 12 + record_size != eocd - 20:
                    raise _invalid("data inside the Zip64 end records")
                directory_end = record_at
        if cd_offset + cd_size != directory_end:
            raise _invalid("data before or inside the central directory")
        expected = 0
        for entry in sorted(entries, key=lambda item: item.header_offset):
            if entry.header_offset != expected:
                raise _invalid(f"entries overlap or leave gaps at byte {entry.header_offset}")
            handle.seek(entry.header_offset)
            header = handle.read(_LOCAL_HEADER_SIZE)
            if len(header) < _LOCAL_HEADER_SIZE or header[:4] != _LOCAL_HEADER:
                raise _invalid(f"no local header for {entry.filename!r}")
            flags, crc, compressed, uncompressed, name_length, extra_length = struct.unpack_from(
                "<H6xIIIHH", header, 6
            )
            handle.seek(entry.header_offset + _LOCAL_HEADER_SIZE + name_length)
            extra = handle.read(extra_length)
            end = entry.header_offset + _LOCAL_HEADER_SIZE + name_length + extra_length
            end += entry.compress_size
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


def _check_content(archive: zipfile.ZipFile, entry: zipfile.ZipInfo) -> None:
    """Decompress the entry into nothing; zipfile checks its size and CRC at the end."""
    if entry.is_dir():
        return
    read = 0
    try:
        with archive.open(entry) as member:
            while chunk := member.read(_CHUNK):
                read += len(chunk)
    except zlib.error as exc:
        raise Unprocessable(
            f"zip entry data is corrupt: {entry.filename!r}", code="invalid_zip"
        ) from exc
    if read != entry.file_size:
        raise Unprocessable(
            f"zip entry size does not match its header: {entry.filename!r}", code="invalid_zip"
        )
