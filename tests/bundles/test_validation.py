"""Unit tests of the zip checks: entry names, zip structure, and the limits against zip bombs."""

from __future__ import annotations

import warnings
import zipfile
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
