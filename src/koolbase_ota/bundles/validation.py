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
