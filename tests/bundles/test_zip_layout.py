"""The archive is one zip from its first byte to its last (nothing glued after it, no entries
that overlap or leave gaps, no local header that disagrees with the central directory), and
the default entry cap.

Readers differ: zipfile (and the server) read the last central directory; streaming unzippers
read local headers from the start; some take offsets as written. A byte that one of them sees
and another does not is a way to smuggle an unchecked entry past validation.
"""

from __future__ import annotations

import io
import shutil
import struct
import subprocess
import zipfile
from pathlib import Path

import httpx
import pytest

from koolbase_ota.bundles.validation import validate_zip
from tests.bundles.test_validation import refused
from tests.conftest import Project, RunningServer, assert_error, upload, uploaded


def zip_of(files: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", method) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def write(tmp_path: Path, data: bytes, name: str = "bundle.zip") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


GOOD = zip_of({"config.json": b'{"banner": "hello"}' * 20})


class Unseekable(io.RawIOBase):
    """A write-only stream: zipfile then writes data descriptors after each entry."""

    def __init__(self) -> None:
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, chunk: bytes) -> int:  # type: ignore[override]
        self.data += chunk
        return len(chunk)


# --- refused ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tail", [b"x", b"JUNK" * 100, b"PK\x05\x06"], ids=["one-byte", "junk", "end-signature"]
)
def test_data_glued_after_the_archive(tmp_path: Path, tail: bytes) -> None:
    refused(write(tmp_path, GOOD + tail), "invalid_zip")


def test_an_archive_hidden_in_front_of_another(tmp_path: Path) -> None:
    """zipfile would check only the benign last archive; a streaming unzipper on a device
    would extract the first one's `../` entry."""
    evil = zip_of({"../../evil.sh": b"rm -rf ~"})
    refused(write(tmp_path, evil + GOOD), "invalid_zip")


def test_a_local_header_that_lies_about_the_size(tmp_path: Path) -> None:
    data = bytearray(zip_of({"config.json": b"{}" * 50}, zipfile.ZIP_STORED))
    struct.pack_into("<I", data, 22, 10)  # the local header's uncompressed size
    refused(write(tmp_path, bytes(data)), "invalid_zip")


def test_a_local_header_that_lies_about_the_crc(tmp_path: Path) -> None:
    data = bytearray(zip_of({"config.json": b"{}" * 50}))
    struct.pack_into("<I", data, 14, 0xDEADBEEF)
    refused(write(tmp_path, bytes(data)), "invalid_zip")


@pytest.mark.parametrize("field", [20, 24], ids=["compressed-size", "uncompressed-size"])
@pytest.mark.parametrize("delta", [-5, 7], ids=["smaller", "larger"])
def test_a_central_directory_that_lies_about_sizes(tmp_path: Path, field: int, delta: int) -> None:
    data = bytearray(GOOD)
    central = data.index(b"PK\x01\x02")
    (value,) = struct.unpack_from("<I", data, central + field)
    struct.pack_into("<I", data, central + field, value + delta)
    refused(write(tmp_path, bytes(data)), "invalid_zip")


def test_a_zip64_extra_that_lies_about_the_size(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with (
        zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive,
        archive.open("config.json", "w", force_zip64=True) as member,
    ):
        member.write(b"{}" * 50)
    data = bytearray(buffer.getvalue())
    extra_at = 30 + len("config.json")
    assert data[extra_at : extra_at + 2] == b"\x01\x00"  # the Zip64 extra field
    struct.pack_into("<Q", data, extra_at + 4, 5)  # its uncompressed size
    refused(write(tmp_path, bytes(data)), "invalid_zip")


def test_a_data_descriptor_that_lies_about_the_size(tmp_path: Path) -> None:
    stream = Unseekable()
    with (
        zipfile.ZipFile(stream, "w", zipfile.ZIP_STORED) as archive,
        archive.open("config.json", "w") as member,
    ):
        member.write(b"{}" * 50)
    data = bytearray(stream.data)
    descriptor = data.index(b"PK\x07\x08")
    struct.pack_into("<I", data, descriptor + 12, 7)  # its uncompressed size
    refused(write(tmp_path, bytes(data)), "invalid_zip")


def test_two_entries_sharing_one_local_file(tmp_path: Path) -> None:
    """Overlapping entries: how the densest zip bombs are built."""
    data = GOOD
    central = data.index(b"PK\x01\x02")
    end = data.index(b"PK\x05\x06")
    record = bytearray(data[central:end])
    record[46:57] = b"config.jsoo"  # same length, another name, same local header offset
    directory = data[central:end] + bytes(record)
    eocd = bytearray(data[end:])
    struct.pack_into("<HHII", eocd, 8, 2, 2, len(directory), central)
    refused(write(tmp_path, data[:central] + directory + bytes(eocd)), "invalid_zip")


def test_a_gap_between_the_entries_and_the_directory(tmp_path: Path) -> None:
    central = GOOD.index(b"PK\x01\x02")
    end = GOOD.index(b"PK\x05\x06")
    hidden = zip_of({"../evil": b"x"})[: central // 2]
    eocd = bytearray(GOOD[end:])
    struct.pack_into("<I", eocd, 16, central + len(hidden))
    refused(
        write(tmp_path, GOOD[:central] + hidden + GOOD[central:end] + bytes(eocd)), "invalid_zip"
    )


def test_an_archive_glued_after_is_refused_over_http_and_nothing_is_stored(
    client: httpx.Client, project: Project, server: RunningServer
) -> None:
    before = server.stored_keys()
    assert_error(upload(client, project, GOOD + b"trailing"), 422, "invalid_zip")
    assert_error(upload(client, project, zip_of({"../x": b"x"}) + GOOD), 422, "invalid_zip")
    assert client.get(project.path("/bundles"), headers=project.auth).json() == []
    assert server.stored_keys() == before
    assert uploaded(client, project)["version"] == 1


# --- accepted -----------------------------------------------------------------------------


def test_nested_archives_are_plain_files(tmp_path: Path) -> None:
    nested = zip_of({"inner.zip": zip_of({"../not-unpacked": b"x"}), "config.json": b"{}"})
    assert validate_zip(write(tmp_path, nested)) == 2


def test_a_comment_is_part_of_the_archive(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("config.json", b"{}")
        archive.comment = b"built by the release pipeline"
    assert validate_zip(write(tmp_path, buffer.getvalue())) == 1


@pytest.mark.parametrize("method", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
@pytest.mark.parametrize("force_zip64", [False, True], ids=["zip32", "zip64"])
def test_streamed_archives_with_data_descriptors(
    tmp_path: Path, method: int, force_zip64: bool
) -> None:
    stream = Unseekable()
    with zipfile.ZipFile(stream, "w", method) as archive:
        archive.writestr("config.json", b"{}" * 100)
        with archive.open("assets/blob.bin", "w", force_zip64=force_zip64) as member:
            member.write(bytes(range(256)) * 40)
    data = bytes(stream.data)
    assert struct.unpack_from("<H", data, 6)[0] & 0x8  # really has data descriptors
    assert validate_zip(write(tmp_path, data)) == 2


def test_an_honest_zip64_archive(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with (
        zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive,
        archive.open("config.json", "w", force_zip64=True) as member,
    ):
        member.write(b"{}" * 50)
    assert validate_zip(write(tmp_path, buffer.getvalue())) == 1


@pytest.mark.parametrize(
    ("streamed", "options"),
    [(False, ()), (True, ()), (False, ("-fz",))],
    ids=["file", "streamed", "file-zip64"],
)
def test_archives_made_by_the_zip_command(
    tmp_path: Path, streamed: bool, options: tuple[str, ...]
) -> None:
    """`-fz` (Zip64 records throughout, and a Zip64 end record) was refused: the end record
    was misread. (Zip 3.0's `-fz` to a stream writes an end record that points to a Zip64
    one it never wrote; `unzip -t` refuses that archive too.)"""
    zip_command = shutil.which("zip")
    if zip_command is None:
        pytest.skip("no zip command on this machine")
    source = tmp_path / "bundle"
    (source / "assets").mkdir(parents=True)
    (source / "config.json").write_text('{"banner": "hello"}' * 50)
    (source / "assets" / "strings.json").write_text("{}")
    target = tmp_path / "made.zip"
    if streamed:
        with open(target, "wb") as out:
            subprocess.run(
                [zip_command, "-q", "-fd", *options, "-", "config.json", "assets/strings.json"],
                cwd=source,
                stdout=out,
                check=True,
            )
    else:
        subprocess.run([zip_command, "-qr", *options, str(target), "."], cwd=source, check=True)
    assert validate_zip(target) >= 2


# --- the default entry cap (the other caps have their tests in test_validation.py) ----------


def test_the_default_entry_cap_applies(tmp_path: Path) -> None:
    names = [f"a/{number}.json" for number in range(10_001)]
    at_cap = zip_of(dict.fromkeys(names[:10_000], b""), zipfile.ZIP_STORED)
    assert validate_zip(write(tmp_path, at_cap, "at-cap.zip")) == 10_000
    over = zip_of(dict.fromkeys(names, b""), zipfile.ZIP_STORED)
    refused(write(tmp_path, over, "over.zip"), "too_many_entries")
