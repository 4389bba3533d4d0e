"""Regression tests from a review of b94f01d (the zip data read with zlib-ng, not zipfile's
reader), and of what the same review found in the checks before it.

zipfile's reader decoded the local header's name by the local header's own UTF-8 flag (0x800)
and compared it with the directory's name, decoded by the directory's flag. The new check decodes
the local name by the directory's flag, so the two flags may now disagree: a streaming unzipper
(which reads local headers) and a central-directory one then see different names for the entry.
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import pytest

from koolbase_ota.bundles.validation import ZipLimits, validate_zip
from tests.bundles.test_validation import break_utf8_name, refused, simple
from tests.bundles.test_zip_layout import Unseekable

_UTF8_NAME = 0x800


def _set_utf8_flags(data: bytearray, *, local: bool, central: bool) -> None:
    for signature, flags_at, utf8 in ((b"PK\x03\x04", 6, local), (b"PK\x01\x02", 8, central)):
        at = data.index(signature) + flags_at
        (flags,) = struct.unpack_from("<H", data, at)
        struct.pack_into("<H", data, at, flags | _UTF8_NAME if utf8 else flags & ~_UTF8_NAME)


@pytest.mark.parametrize(
    ("local", "central"),
    [(True, False), (False, True)],
    ids=["only-the-local-header-says-utf8", "only-the-directory-says-utf8"],
)
def test_a_local_header_whose_utf8_flag_disagrees_with_the_directory(
    tmp_path: Path, local: bool, central: bool
) -> None:
    """Same name bytes, different flags: 'café.json' to one reader, 'caf├⌐.json' to another."""
    valid = simple(tmp_path / "valid.zip", {"caf\u00e9.json": b"{}"})
    assert validate_zip(valid) == 1
    data = bytearray(valid.read_bytes())
    _set_utf8_flags(data, local=local, central=central)
    path = tmp_path / "flags.zip"
    path.write_bytes(bytes(data))
    refused(path, "invalid_zip")


def test_a_local_name_flagged_utf8_that_is_not(tmp_path: Path) -> None:
    """The directory reads the bytes as cp437; the local header says UTF-8, and they are not.
    Before b94f01d a UnicodeDecodeError (a 500); since, accepted."""
    valid = simple(tmp_path / "valid.zip", {"caf\u00e9.json": b"{}"})
    data = bytearray(valid.read_bytes())
    _set_utf8_flags(data, local=True, central=False)
    break_utf8_name(data)
    path = tmp_path / "utf8.zip"
    path.write_bytes(bytes(data))
    refused(path, "invalid_zip")


# --- found by the same review in code older than b94f01d -----------------------------------


def _with_zip64_end(data: bytes, *, record_at: int | None = None) -> bytes:
    """The archive with a Zip64 end record and locator before its end record, whose fields
    then say "see Zip64" (what `zip -fz` writes). `record_at`: a locator pointing elsewhere."""
    eocd = data.rindex(b"PK\x05\x06")
    entries, cd_size, cd_offset = struct.unpack_from("<10xHII", data, eocd)
    here = eocd
    record = b"PK\x06\x06" + struct.pack(
        "<QHHIIQQQQ", 44, 45, 45, 0, 0, entries, entries, cd_size, cd_offset
    )
    locator = b"PK\x06\x07" + struct.pack("<IQI", 0, here if record_at is None else record_at, 1)
    end = bytearray(data[eocd:])
    struct.pack_into("<HHII", end, 8, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF)
    return data[:eocd] + record + locator + bytes(end)


def test_an_archive_with_a_zip64_end_record(tmp_path: Path) -> None:
    """Refused before: the record was read with 32 bytes skipped before the directory's
    size and offset, where there are 28."""
    honest = _with_zip64_end(simple(tmp_path / "plain.zip", {"a.json": b"{}"}).read_bytes())
    path = tmp_path / "zip64.zip"
    path.write_bytes(honest)
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
    assert validate_zip(path) == 1


def test_a_zip64_locator_pointing_past_any_file(tmp_path: Path) -> None:
    """Seeking to 2**64 - 1 was a ValueError: a 500 on upload."""
    plain = simple(tmp_path / "plain.zip", {"a.json": b"{}"}).read_bytes()
    path = tmp_path / "far.zip"
    path.write_bytes(_with_zip64_end(plain, record_at=2**64 - 1))
    refused(path, "invalid_zip")


def test_a_data_descriptor_entry_claiming_an_impossible_size(tmp_path: Path) -> None:
    """A streamed entry (data descriptor) whose Zip64 size says 2**63: seeking past it was a
    ValueError, a 500."""
    stream = Unseekable()
    with zipfile.ZipFile(stream, "w") as archive:  # written as a stream: data descriptors
        archive.writestr(zipfile.ZipInfo("a.bin"), b"x" * 100)
    data = bytearray(stream.data)
    central = data.index(b"PK\x01\x02")
    name_length, extra_length = struct.unpack_from("<HH", data, central + 28)
    # The directory's sizes become "see Zip64", and its Zip64 extra gives 2**63 for both.
    struct.pack_into("<II", data, central + 20, 0xFFFFFFFF, 0xFFFFFFFF)
    zip64_extra = struct.pack("<HHQQ", 1, 16, 2**63, 2**63)
    at = central + 46 + name_length + extra_length
    data[at:at] = zip64_extra
    struct.pack_into("<H", data, central + 30, extra_length + len(zip64_extra))
    eocd = data.rindex(b"PK\x05\x06")
    (cd_size,) = struct.unpack_from("<I", data, eocd + 12)
    struct.pack_into("<I", data, eocd + 12, cd_size + len(zip64_extra))
    path = tmp_path / "huge.zip"
    path.write_bytes(bytes(data))
    refused(path, "invalid_zip", ZipLimits(max_uncompressed_bytes=2**64, max_ratio=2**64))


@pytest.mark.parametrize(
    ("field_at", "value"),
    [(8, zipfile.ZIP_DEFLATED), (6, 0x1)],
    ids=["compression-method", "encryption-flag"],
)
def test_a_local_header_that_reads_the_data_otherwise(
    tmp_path: Path, field_at: int, value: int
) -> None:
    """A streaming unzipper goes by the local header: one saying deflated where the directory
    says stored (or encrypted where it is not) has the device read other bytes than those
    checked."""
    data = bytearray(simple(tmp_path / "valid.zip", {"a.json": b"{}" * 100}).read_bytes())
    at = data.index(b"PK\x03\x04") + field_at
    (old,) = struct.unpack_from("<H", data, at)
    struct.pack_into("<H", data, at, old | value if field_at == 6 else value)
    path = tmp_path / "local.zip"
    path.write_bytes(bytes(data))
    refused(path, "invalid_zip")
