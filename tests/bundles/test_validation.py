"""Unit tests of the zip checks: entry names, zip structure, and the limits against zip bombs."""

from __future__ import annotations

import os
import warnings
import zipfile
import zlib
from pathlib import Path

import pytest

from koolbase_ota.bundles.validation import ZipLimits, check_entry_name, validate_zip
from koolbase_ota.errors import Unprocessable

FIXED_TIME = (2026, 1, 1, 0, 0, 0)


def entry(
    name: str,
    *,
    compress_type: int = zipfile.ZIP_STORED,
    external_attr: int | None = None,
) -> zipfile.ZipInfo:
    """A ZipInfo named exactly `name`: zipfile would cut a name at NUL, so set it afterwards."""
    info = zipfile.ZipInfo("placeholder", date_time=FIXED_TIME)
    info.filename = name
    info.compress_type = compress_type
    if external_attr is not None:
        info.external_attr = external_attr
    return info


def write_zip(path: Path, entries: list[tuple[zipfile.ZipInfo, bytes]]) -> Path:
    with warnings.catch_warnings():
        # zipfile warns about duplicate names; one test wants exactly that.
        warnings.simplefilter("ignore")
        with zipfile.ZipFile(path, "w") as archive:
            for info, data in entries:
                archive.writestr(info, data)
    return path


def simple(path: Path, files: dict[str, bytes]) -> Path:
    return write_zip(path, [(entry(name), data) for name, data in files.items()])


def refused(path: Path, code: str, limits: ZipLimits | None = None) -> Unprocessable:
    with pytest.raises(Unprocessable) as caught:
        validate_zip(path, limits=limits)
    assert caught.value.code == code, caught.value.message
    assert caught.value.status_code == 422
    return caught.value


# --- check_entry_name ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "config.json",
        "assets/images/logo.png",
        "assets/",
        "a..b.json",
        "..hidden",
        "dir/..b",
        "fonts/Überschrift.ttf",
        "i18n/日本語.json",
        "x" * 255,
        "/".join(["d" * 200] * 5),
    ],
)
def test_safe_names_pass(name: str) -> None:
    check_entry_name(name)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("", id="empty"),
        pytest.param("/", id="root"),
        pytest.param(".", id="dot"),
        pytest.param("..", id="dotdot"),
        pytest.param("../evil", id="parent"),
        pytest.param("a/../../evil", id="nested-parent"),
        pytest.param("a/b/../c", id="inner-parent"),
        pytest.param("assets/..", id="trailing-parent"),
        pytest.param("/etc/passwd", id="absolute"),
        pytest.param("//server/share/x", id="unc-slashes"),
        pytest.param("C:/x", id="drive-slash"),
        pytest.param("c:x", id="drive-relative"),
        pytest.param("C:\\x", id="drive-backslash"),
        pytest.param("a\\..\\b", id="backslash-parent"),
        pytest.param("..\\evil", id="backslash-escape"),
        pytest.param("\\\\server\\share", id="unc-backslashes"),
        pytest.param("a\x00b", id="nul"),
        pytest.param("a\x01b", id="control"),
        pytest.param("a\nb", id="newline"),
        pytest.param("a\rb", id="carriage-return"),
        pytest.param("a\tb", id="tab"),
        pytest.param("a\x1fb", id="unit-separator"),
        pytest.param("a\x7fb", id="delete"),
        pytest.param("x" * 256, id="segment-too-long"),
        pytest.param("/".join(["d" * 200] * 6), id="name-too-long"),
    ],
)
def test_unsafe_names_are_refused(name: str) -> None:
    with pytest.raises(Unprocessable) as caught:
        check_entry_name(name)
    assert caught.value.code == "unsafe_entry_name"


def test_the_length_limit_is_a_parameter() -> None:
    check_entry_name("a" * 10, max_length=10)
    with pytest.raises(Unprocessable):
        check_entry_name("a" * 11, max_length=10)


# --- validate_zip: accepted ----------------------------------------------------------------


def test_a_valid_zip_returns_its_entry_count(tmp_path: Path) -> None:
    path = write_zip(
        tmp_path / "ok.zip",
        [
            (entry("assets/"), b""),
            (entry("config.json"), b'{"banner": "hello"}'),
            (entry("assets/big.json", compress_type=zipfile.ZIP_DEFLATED), b" " * 100_000),
        ],
    )
    assert validate_zip(path) == 3


def test_an_empty_zip_has_no_entries(tmp_path: Path) -> None:
    path = write_zip(tmp_path / "empty.zip", [])
    assert path.read_bytes().startswith(b"PK\x05\x06")
    assert validate_zip(path) == 0


# --- validate_zip: structure ---------------------------------------------------------------


def test_not_a_zip(tmp_path: Path) -> None:
    path = tmp_path / "bundle.zip"
    path.write_bytes(b"just some text, not a zip")
    refused(path, "invalid_zip")


def test_an_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "bundle.zip"
    path.write_bytes(b"")
    refused(path, "invalid_zip")


def test_data_glued_before_the_archive(tmp_path: Path) -> None:
    valid = simple(tmp_path / "valid.zip", {"config.json": b"{}"})
    path = tmp_path / "glued.zip"
    path.write_bytes(b"MZ\x90\x00 a self-extractor stub" + valid.read_bytes())
    # zipfile itself would read it; the server must not.
    with zipfile.ZipFile(path) as archive:
        assert archive.namelist() == ["config.json"]
    refused(path, "invalid_zip")


@pytest.mark.parametrize("keep", [0.5, 0.95])
def test_a_truncated_zip(tmp_path: Path, keep: float) -> None:
    data = simple(tmp_path / "valid.zip", {"config.json": b"{}" * 100}).read_bytes()
    path = tmp_path / "truncated.zip"
    path.write_bytes(data[: int(len(data) * keep)])
    refused(path, "invalid_zip")


def test_a_corrupt_crc_is_found(tmp_path: Path) -> None:
    content = b"the exact bytes of a stored entry"
    data = bytearray(simple(tmp_path / "valid.zip", {"config.json": content}).read_bytes())
    at = data.index(content) + 5
    data[at] ^= 0xFF
    path = tmp_path / "corrupt.zip"
    path.write_bytes(bytes(data))
    # The headers are untouched: only reading the data shows the damage.
    with zipfile.ZipFile(path) as archive:
        assert archive.namelist() == ["config.json"]
    refused(path, "invalid_zip")


@pytest.mark.parametrize(
    "method",
    [zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA],
    ids=["deflate", "bzip2", "lzma"],
)
def test_corrupt_compressed_data_is_invalid_zip(tmp_path: Path, method: int) -> None:
    """Each decompressor has its own error (zlib.error, OSError, LZMAError): all are refusals.

    Refusing bzip2 and lzma outright (the SDK's unzipper may not read them) is fine too.
    """
    path = write_zip(
        tmp_path / "valid.zip", [(entry("data.json", compress_type=method), b"abcdefgh" * 5000)]
    )
    data = bytearray(path.read_bytes())
    start = 30 + len("data.json")  # the first local header, then the compressed data
    for offset in range(start + 5, start + 25):
        data[offset] ^= 0x55
    path.write_bytes(bytes(data))
    with pytest.raises(Unprocessable) as caught:
        validate_zip(path)
    allowed = (
        {"invalid_zip"} if method == zipfile.ZIP_DEFLATED else {"invalid_zip", "unsupported_zip"}
    )
    assert caught.value.code in allowed, caught.value.message


def test_an_unsupported_compression_method(tmp_path: Path) -> None:
    data = bytearray(simple(tmp_path / "valid.zip", {"config.json": b"{}"}).read_bytes())
    for signature, method_at in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):
        at = data.index(signature) + method_at
        data[at : at + 2] = (99).to_bytes(2, "little")
    path = tmp_path / "method.zip"
    path.write_bytes(bytes(data))
    refused(path, "unsupported_zip")


# --- validate_zip: entries -----------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "../evil",
        "a/../../evil",
        "/etc/passwd",
        "C:/x",
        "C:\\x",
        "a\\..\\b",
        "a\x01b",
        # zipfile cuts names at NUL when reading; the name a device sees still has it.
        "a\x00b",
        "ok.json\x00/../../evil",
    ],
)
def test_an_unsafe_entry_name_in_a_zip(tmp_path: Path, name: str) -> None:
    path = write_zip(tmp_path / "bad.zip", [(entry("config.json"), b"{}"), (entry(name), b"x")])
    refused(path, "unsafe_entry_name")


def test_a_symlink_entry(tmp_path: Path) -> None:
    path = write_zip(
        tmp_path / "link.zip",
        [(entry("assets/link", external_attr=0o120777 << 16), b"/etc/passwd")],
    )
    refused(path, "symlink_entry")


def test_a_regular_file_mode_is_not_a_symlink(tmp_path: Path) -> None:
    path = write_zip(
        tmp_path / "file.zip", [(entry("assets/file", external_attr=0o100644 << 16), b"x")]
    )
    assert validate_zip(path) == 1


def test_a_duplicate_entry(tmp_path: Path) -> None:
    path = write_zip(tmp_path / "dup.zip", [(entry("a.json"), b"{}"), (entry("a.json"), b"[]")])
    refused(path, "duplicate_entry")


def test_an_encrypted_entry(tmp_path: Path) -> None:
    data = bytearray(simple(tmp_path / "valid.zip", {"secret.json": b"{}"}).read_bytes())
    data[data.index(b"PK\x03\x04") + 6] |= 0x01
    data[data.index(b"PK\x01\x02") + 8] |= 0x01
    path = tmp_path / "encrypted.zip"
    path.write_bytes(bytes(data))
    refused(path, "encrypted_entry")


# --- ZipLimits -----------------------------------------------------------------------------


def test_max_entries(tmp_path: Path) -> None:
    limits = ZipLimits(max_entries=2)
    at_limit = simple(tmp_path / "two.zip", {"a": b"1", "b": b"2"})
    assert validate_zip(at_limit, limits=limits) == 2
    over = simple(tmp_path / "three.zip", {"a": b"1", "b": b"2", "c": b"3"})
    refused(over, "too_many_entries", limits)


def test_max_uncompressed_bytes(tmp_path: Path) -> None:
    limits = ZipLimits(max_uncompressed_bytes=100)
    at_limit = simple(tmp_path / "ok.zip", {"a": b"x" * 60, "b": b"y" * 40})
    assert validate_zip(at_limit, limits=limits) == 2
    over = simple(tmp_path / "over.zip", {"a": b"x" * 60, "b": b"y" * 41})
    refused(over, "zip_bomb", limits)


def test_the_default_uncompressed_cap_applies(tmp_path: Path) -> None:
    """A small archive that claims to unpack to more than the default cap is refused."""
    default = ZipLimits().max_uncompressed_bytes
    data = bytearray(simple(tmp_path / "valid.zip", {"big.bin": b"x"}).read_bytes())
    central = data.index(b"PK\x01\x02")
    data[central + 24 : central + 28] = (default + 1).to_bytes(4, "little")
    path = tmp_path / "claims.zip"
    path.write_bytes(bytes(data))
    refused(path, "zip_bomb")


def test_compression_ratio(tmp_path: Path) -> None:
    limits = ZipLimits(max_ratio=10, ratio_applies_above=1000)
    bomb = write_zip(
        tmp_path / "bomb.zip",
        [(entry("zeros.bin", compress_type=zipfile.ZIP_DEFLATED), b"\0" * 100_000)],
    )
    with zipfile.ZipFile(bomb) as archive:
        info = archive.getinfo("zeros.bin")
        assert info.file_size > 10 * info.compress_size
    refused(bomb, "zip_bomb", limits)


def test_compression_ratio_ignores_small_entries(tmp_path: Path) -> None:
    """Up to `ratio_applies_above` bytes, any ratio is fine: a JSON of spaces is no bomb."""
    limits = ZipLimits(max_ratio=10, ratio_applies_above=1000)
    small = write_zip(
        tmp_path / "small.zip",
        [(entry("spaces.json", compress_type=zipfile.ZIP_DEFLATED), b" " * 1000)],
    )
    assert validate_zip(small, limits=limits) == 1


def test_compression_ratio_within_the_limit(tmp_path: Path) -> None:
    limits = ZipLimits(max_ratio=1000, ratio_applies_above=1000)
    path = write_zip(
        tmp_path / "ok.zip",
        [(entry("zeros.bin", compress_type=zipfile.ZIP_DEFLATED), b"\0" * 100_000)],
    )
    assert validate_zip(path, limits=limits) == 1


def test_the_name_length_limit_comes_from_the_limits(tmp_path: Path) -> None:
    path = simple(tmp_path / "long.zip", {"a" * 20: b"x"})
    assert validate_zip(path, limits=ZipLimits(max_name_length=20)) == 1
    refused(path, "unsafe_entry_name", ZipLimits(max_name_length=19))


# --- validate_zip: reading the data --------------------------------------------------------
# The data is read by our own loop (zlib-ng's CRC-32 and inflate), not zipfile's reader: each
# refusal zipfile's reader made is pinned here.


def _deflated(path: Path, content: bytes) -> bytearray:
    data = write_zip(path, [(entry("data.json", compress_type=zipfile.ZIP_DEFLATED), content)])
    return bytearray(data.read_bytes())


def _set_sizes(data: bytearray, *, crc: int | None = None, size: int | None = None) -> None:
    """Rewrite the CRC-32 or uncompressed size in both the local header and the directory."""
    for signature, crc_at in ((b"PK\x03\x04", 14), (b"PK\x01\x02", 16)):
        at = data.index(signature) + crc_at
        if crc is not None:
            data[at : at + 4] = crc.to_bytes(4, "little")
        if size is not None:
            data[at + 8 : at + 12] = size.to_bytes(4, "little")


def test_a_deflated_entry_with_a_wrong_crc(tmp_path: Path) -> None:
    content = b"abcdefgh" * 5000
    data = _deflated(tmp_path / "valid.zip", content)
    _set_sizes(data, crc=zlib.crc32(content) ^ 1)
    path = tmp_path / "crc.zip"
    path.write_bytes(bytes(data))
    assert "CRC" in refused(path, "invalid_zip").message


@pytest.mark.parametrize("delta", [-1, 1], ids=["inflates-to-more", "inflates-to-less"])
def test_a_deflated_entry_whose_size_is_not_the_declared_one(tmp_path: Path, delta: int) -> None:
    content = b"abcdefgh" * 5000
    data = _deflated(tmp_path / "valid.zip", content)
    _set_sizes(data, size=len(content) + delta)
    path = tmp_path / "size.zip"
    path.write_bytes(bytes(data))
    refused(path, "invalid_zip")


def test_a_deflate_stream_cut_short(tmp_path: Path) -> None:
    """Compressed sizes agree everywhere, but the stream ends before its last block."""
    content = os.urandom(20_000) * 3
    path = tmp_path / "full.zip"
    write_zip(path, [(entry("data.bin", compress_type=zipfile.ZIP_DEFLATED), content)])
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("data.bin")
    stream = zlib.compressobj(6, zlib.DEFLATED, -15)
    cut = (stream.compress(content) + stream.flush(zlib.Z_SYNC_FLUSH))[: info.compress_size - 5]
    truncated = tmp_path / "cut.zip"
    with zipfile.ZipFile(truncated, "w") as archive:
        archive.writestr(entry("data.bin"), cut)  # stored: we patch the method afterwards
    data = bytearray(truncated.read_bytes())
    for signature, method_at in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):
        at = data.index(signature) + method_at
        data[at : at + 2] = zipfile.ZIP_DEFLATED.to_bytes(2, "little")
    _set_sizes(data, crc=zlib.crc32(content), size=len(content))
    truncated.write_bytes(bytes(data))
    refused(truncated, "invalid_zip")


def test_a_local_header_naming_another_file(tmp_path: Path) -> None:
    """A streaming unzipper writes the local header's name; it must be the one checked."""
    data = bytearray(simple(tmp_path / "valid.zip", {"config.json": b"{}"}).read_bytes())
    at = data.index(b"PK\x03\x04") + 30
    data[at : at + len("config.json")] = b"../evil.sh\x00"
    path = tmp_path / "renamed.zip"
    path.write_bytes(bytes(data))
    refused(path, "invalid_zip")


def break_utf8_name(data: bytearray) -> None:
    """In both headers of a zip of one `café.json`, the é (bytes 3-4 of the name) becomes
    bytes that are not UTF-8."""
    for signature, name_at in ((b"PK\x03\x04", 30), (b"PK\x01\x02", 46)):
        at = data.index(signature) + name_at
        data[at + 3 : at + 5] = b"\xff\xfe"


def test_a_name_flagged_utf8_that_is_not(tmp_path: Path) -> None:
    """It was a UnicodeDecodeError out of zipfile, and a 500 on upload."""
    data = bytearray(simple(tmp_path / "valid.zip", {"caf\u00e9.json": b"{}"}).read_bytes())
    for signature, flags_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        # zipfile flagged the name as UTF-8 (0x800) in both headers.
        assert data[data.index(signature) + flags_at + 1] & 0x08
    break_utf8_name(data)
    path = tmp_path / "utf8.zip"
    path.write_bytes(bytes(data))
    refused(path, "invalid_zip")


@pytest.mark.parametrize("flag", [0x20, 0x40], ids=["patched-data", "strong-encryption"])
def test_flags_zip_readers_do_not_implement(tmp_path: Path, flag: int) -> None:
    data = bytearray(simple(tmp_path / "valid.zip", {"config.json": b"{}"}).read_bytes())
    for signature, flags_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        data[data.index(signature) + flags_at] |= flag
    path = tmp_path / "flags.zip"
    path.write_bytes(bytes(data))
    refused(path, "unsupported_zip")


@pytest.mark.parametrize("method", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_entries_bigger_than_a_read_are_read_whole(tmp_path: Path, method: int) -> None:
    """Entries over the 1 MiB read size, a flipped byte near the end found in each."""
    content = os.urandom(1024 * 1024) * 2 + b"tail"
    path = write_zip(
        tmp_path / "big.zip",
        [(entry("a.bin", compress_type=method), content), (entry("b.json"), b"{}")],
    )
    assert validate_zip(path) == 2
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("a.bin")
    data[info.header_offset + 30 + len("a.bin") + info.compress_size - 3] ^= 0x01
    flipped = tmp_path / "flipped.zip"
    flipped.write_bytes(bytes(data))
    refused(flipped, "invalid_zip")


@pytest.mark.parametrize("chunk", [1, 7, 64, 4096])
def test_small_reads_accept_honest_entries_and_find_a_flipped_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    """With reads and inflated pieces far smaller than the entries, every boundary case comes
    up: input used up with output still held back, a stream ending mid-read, long runs."""
    from koolbase_ota.bundles import validation

    monkeypatch.setattr(validation, "_CHUNK", chunk)
    contents = {
        "zeros.bin": b"\0" * 70_000,
        "text.json": b'{"key": "value", "n": 12345}' * 2_000,
        "mixed.bin": os.urandom(3_000) + b"a" * 5_000 + os.urandom(1_000),
        "empty.txt": b"",
    }
    path = write_zip(
        tmp_path / "many.zip",
        [(entry(name, compress_type=zipfile.ZIP_DEFLATED), data) for name, data in contents.items()]
        + [(entry("stored.bin"), os.urandom(10_000))],
    )
    assert validate_zip(path) == len(contents) + 1
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("text.json")
    data[info.header_offset + 30 + len("text.json") + info.compress_size // 2] ^= 0x10
    flipped = tmp_path / "flipped.zip"
    flipped.write_bytes(bytes(data))
    refused(flipped, "invalid_zip")
