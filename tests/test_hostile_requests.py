"""Hostile requests over real sockets: broken forms, lying lengths, stalled and vanishing
uploads, invalid UTF-8 everywhere, huge headers. Each gets a clear answer (never a 5xx), nothing
is left stored, and the server goes on serving everyone else meanwhile."""

from __future__ import annotations

import contextlib
import json
import select
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.api.test_bundles import pending_paths
from tests.api.test_upload import (
    BOUNDARY,
    MULTIPART_TYPE,
    assert_nothing_stored,
    files_under,
    host_port,
    multipart,
    multipart_body,
    snapshot,
    zip_of_size,
)
from tests.conftest import (
    Project,
    RunningServer,
    assert_error,
    eventually,
    make_zip,
    new_project,
    upload,
    uploaded,
)
from tests.test_e2e import serving

CHECK = "/v1/sdk/ota/check"
#: The bundle size limit of the `hostile` server.
LIMIT = 64 * 1024
#: Its upload idle timeout: short, so that stalled uploads are refused quickly.
IDLE_SECONDS = 2.0


@pytest.fixture(scope="module")
def hostile(server_factory: Callable[..., RunningServer]) -> RunningServer:
    return server_factory(max_bundle_bytes=LIMIT, upload_idle_timeout_seconds=IDLE_SECONDS)


@pytest.fixture
def hostile_client(hostile: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=hostile.base_url, timeout=30) as http:
        yield http


@pytest.fixture
def hostile_project(hostile: RunningServer) -> Project:
    return new_project(hostile.db)


@dataclass
class Answer:
    """One HTTP answer read off a raw socket; `status` 0 when the server closed without one."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, str]:
        data: dict[str, str] = json.loads(self.body)
        return data


def read_answer(sock: socket.socket) -> Answer:
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except ConnectionResetError:
        pass
    if b"\r\n\r\n" not in data:
        return Answer(status=0, headers={}, body=data)
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return Answer(status=int(status_line.split()[1]), headers=headers, body=body[:length])


def raw_request(
    base_url: str, method: str, target: str, headers: list[tuple[str, str]] | None = None
) -> Answer:
    """One request on a connection of its own, its header lines sent exactly as given
    (repeats too)."""
    url = httpx.URL(base_url)
    assert url.port is not None
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{name}: {value}" for name, value in headers or []]
    with socket.create_connection((url.host, url.port), timeout=30) as sock:
        send(sock, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        return read_answer(sock)


def send(sock: socket.socket, data: bytes) -> None:
    """Send what the server will take; one that has answered and hung up takes no more."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(data)


def request_head(
    server: RunningServer, path: str, *, method: str = "POST", headers: dict[str, str]
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host_port(server)[0]}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def upload_head(server: RunningServer, project: Project, **headers: str) -> bytes:
    return request_head(
        server,
        project.path("/upload"),
        headers={
            "Authorization": f"Bearer {project.token}",
            "Content-Type": MULTIPART_TYPE,
            **headers,
        },
    )


def exchange(server: RunningServer, data: bytes, *, timeout: float = 30) -> Answer:
    with socket.create_connection(host_port(server), timeout=timeout) as sock:
        send(sock, data)
        return read_answer(sock)


def assert_no_pending_record(server: RunningServer) -> None:
    assert pending_paths(server) == {}


def form(*parts: tuple[str, bytes], boundary: str = BOUNDARY) -> bytes:
    """A multipart body of exactly these (part headers, value) pairs."""
    body = b""
    for headers, value in parts:
        body += f"--{boundary}\r\n{headers}\r\n\r\n".encode() + value + b"\r\n"
    return body + f"--{boundary}--\r\n".encode()


def field(name: str, value: bytes) -> tuple[str, bytes]:
    return f'Content-Disposition: form-data; name="{name}"', value


def bundle_part(bundle: bytes | None = None) -> tuple[str, bytes]:
    return (
        'Content-Disposition: form-data; name="bundle"; filename="b.zip"\r\n'
        "Content-Type: application/zip",
        make_zip() if bundle is None else bundle,
    )


def post_form(client: httpx.Client, project: Project, body: bytes) -> httpx.Response:
    return client.post(
        project.path("/upload"),
        headers={**project.auth, "Content-Type": MULTIPART_TYPE},
        content=body,
    )


# --- broken forms --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [
        "multipart/form-data; boundary=",
        "multipart/form-data; boundary=" + "b" * 201,
        "multipart/form-data; boundary=another-boundary",
        "multipart/form-data; boundary=" + BOUNDARY[:-1],
    ],
    ids=["empty", "too-long", "not-in-the-body", "a-prefix-of-the-real-one"],
)
def test_a_broken_boundary_is_400(
    client: httpx.Client, project: Project, server: RunningServer, content_type: str
) -> None:
    before = snapshot(client, project, server)
    response = client.post(
        project.path("/upload"),
        headers={**project.auth, "Content-Type": content_type},
        content=multipart_body(make_zip()),
    )
    assert_error(response, 400, "invalid_multipart")
    assert_nothing_stored(client, project, server, before)


def test_more_form_fields_than_the_bound_is_400(
    client: httpx.Client, project: Project, server: RunningServer
) -> None:
    before = snapshot(client, project, server)
    extras = [field(f"extra{index}", b"x") for index in range(16)]
    response = post_form(client, project, form(bundle_part(), *extras))
    assert_error(response, 400, "too_many_fields")
    assert_nothing_stored(client, project, server, before)
    # A few extra fields are tolerated (and ignored).
    accepted = post_form(client, project, form(bundle_part(), *extras[:8]))
    assert accepted.status_code == 201, accepted.text


def file_part(name: str, value: bytes) -> tuple[str, bytes]:
    return f'Content-Disposition: form-data; name="{name}"; filename="{name}.zip"', value


@pytest.mark.parametrize(
    "parts",
    [
        pytest.param([file_part("file", make_zip())], id="the-bundle-misnamed"),
        pytest.param([bundle_part(), file_part("attachment", make_zip())], id="another-file"),
    ],
)
def test_a_file_in_another_field_than_the_bundle_is_named_in_the_400(
    client: httpx.Client, project: Project, server: RunningServer, parts: list[tuple[str, bytes]]
) -> None:
    """`-F file=@bundle.zip` was read as a text field: 400 "form field 'file' is not valid
    UTF-8" (or "too long"), which says nothing of the field the bundle goes in."""
    before = snapshot(client, project, server)
    response = post_form(client, project, form(*parts))
    assert_error(response, 400, "unexpected_file")
    assert "'bundle'" in response.json()["error"]
    assert_nothing_stored(client, project, server, before)


def test_an_empty_file_field_is_ignored_and_a_bundle_in_a_text_field_is_named(
    client: httpx.Client, project: Project, server: RunningServer
) -> None:
    """A browser form's optional file input left empty sends `filename=""` and nothing else:
    ignored, as any extra field. The bundle sent in a text field (`-F channel=@bundle.zip`)
    is refused as that field's value, with where the bundle goes (found by review,
    helper-40)."""
    before = snapshot(client, project, server)
    misplaced = post_form(client, project, form(bundle_part(), file_part("channel", make_zip())))
    assert_error(misplaced, 400, "invalid_encoding")
    assert "the bundle goes in the 'bundle' field" in misplaced.json()["error"]
    assert_nothing_stored(client, project, server, before)
    empty = ('Content-Disposition: form-data; name="screenshot"; filename=""', b"")
    accepted = post_form(client, project, form(bundle_part(), empty))
    assert accepted.status_code == 201, accepted.text


def test_text_fields_sent_as_files_are_read_as_text(client: httpx.Client, project: Project) -> None:
    """`-F release_notes=@notes.txt` sends a file part: its text is the field's value."""
    notes = ("Notes from a file \u00e9\n" * 3).encode()
    parts = [bundle_part(), file_part("release_notes", notes), file_part("channel", b"staging")]
    response = post_form(client, project, form(*parts))
    assert response.status_code == 201, response.text
    assert response.json()["release_notes"] == notes.decode()
    assert response.json()["channel"] == "staging"


@pytest.mark.parametrize(
    ("name", "size"),
    [
        ("channel", 4097),
        ("mandatory", 100_000),
        ("something_else", 4097),
        ("release_notes", 40_001),
    ],
)
def test_a_text_field_over_its_bound_is_400(
    client: httpx.Client, project: Project, server: RunningServer, name: str, size: int
) -> None:
    before = snapshot(client, project, server)
    response = post_form(client, project, form(field(name, b"a" * size), bundle_part()))
    assert_error(response, 400, "field_too_long")
    assert_nothing_stored(client, project, server, before)


def test_release_notes_of_the_most_characters_in_wide_utf8_are_accepted(
    client: httpx.Client, project: Project
) -> None:
    """The byte bound of `release_notes` leaves room for 10,000 characters of 4 bytes each."""
    notes = "\N{ROCKET}" * 10_000
    response = upload(client, project, None, release_notes=notes)
    assert response.status_code == 201, response.text
    assert response.json()["release_notes"] == notes


@pytest.mark.parametrize(
    "headers",
    [
        'Content-Disposition: form-data; name="channel"; x="' + "a" * 10_000 + '"',
        'Content-Disposition: form-data; name="channel"\r\n'
        + "\r\n".join(f"X-Filler-{index}: x" for index in range(20)),
    ],
    ids=["one-huge-part-header", "many-part-headers"],
)
def test_huge_part_headers_are_400(
    client: httpx.Client, project: Project, server: RunningServer, headers: str
) -> None:
    before = snapshot(client, project, server)
    response = post_form(client, project, form((headers, b"production"), bundle_part()))
    assert_error(response, 400, "invalid_multipart")
    assert_nothing_stored(client, project, server, before)


# --- lying and missing lengths ---------------------------------------------------------------


def test_a_content_length_shorter_than_the_body_is_400(
    hostile: RunningServer, hostile_client: httpx.Client, hostile_project: Project
) -> None:
    """The server reads only what was declared: the form ends early and is refused; the rest
    of the body arrives as a next request, which is garbage and refused too (never a 5xx)."""
    before = snapshot(hostile_client, hostile_project, hostile)
    body = multipart_body(make_zip(), {"channel": "production"})
    declared = len(body) - 40
    head = upload_head(hostile, hostile_project, **{"Content-Length": str(declared)})
    with socket.create_connection(host_port(hostile), timeout=30) as sock:
        send(sock, head + body[:declared])
        answer = read_answer(sock)
        assert answer.status == 400, answer
        assert answer.json()["code"] == "invalid_multipart"
        send(sock, body[declared:])
        rest = read_answer(sock)
    assert rest.status in (0, 400), rest
    assert_nothing_stored(hostile_client, hostile_project, hostile, before)
    assert_no_pending_record(hostile)


def test_a_content_length_longer_than_the_body_is_408_after_the_idle_timeout(
    hostile: RunningServer, hostile_client: httpx.Client, hostile_project: Project
) -> None:
    """The server waits for bytes that never come, for the idle timeout and no longer."""
    before = snapshot(hostile_client, hostile_project, hostile)
    body = multipart_body(make_zip(), {"channel": "production"})
    head = upload_head(hostile, hostile_project, **{"Content-Length": str(len(body) + 1000)})
    answer = exchange(hostile, head + body)
    assert answer.status == 408, answer
    assert answer.json()["code"] == "upload_timeout"
    assert answer.headers["connection"] == "close"
    assert_nothing_stored(hostile_client, hostile_project, hostile, before)
    assert_no_pending_record(hostile)


def test_an_endless_body_without_content_length_is_413(
    hostile: RunningServer, hostile_client: httpx.Client, hostile_project: Project
) -> None:
    """A valid form followed by an epilogue that never ends: the whole body is bounded, not
    only the bundle in it."""
    before = snapshot(hostile_client, hostile_project, hostile)

    def chunk(data: bytes) -> bytes:
        return b"%x\r\n" % len(data) + data + b"\r\n"

    head = upload_head(hostile, hostile_project, **{"Transfer-Encoding": "chunked"})
    with socket.create_connection(host_port(hostile), timeout=30) as sock:
        send(sock, head + chunk(multipart_body(make_zip())))
        piece = b"epilogue " * 2048
        for _ in range(2 * (LIMIT + 200 * 1024) // len(piece)):
            send(sock, chunk(piece))
        send(sock, b"0\r\n\r\n")
        answer = read_answer(sock)
    assert answer.status == 413, answer
    assert answer.json()["code"] == "bundle_too_large"
    assert_nothing_stored(hostile_client, hostile_project, hostile, before)


# --- stalled and vanishing clients ---------------------------------------------------------


def started_upload(server: RunningServer, project: Project) -> tuple[bytes, bytes]:
    """A request whose body the server can parse into a staged file, cut in two.

    The server feeds the parser in pieces of up to 1 MiB or a quarter of the size limit, so the
    part sent is more than that and the staged file exists before the rest is due.
    """
    head, tail = multipart({"channel": "production"})
    size = min(server.settings.max_bundle_bytes * 3 // 4, 2 * 1024 * 1024)
    body = head + zip_of_size(size) + tail
    request = upload_head(server, project, **{"Content-Length": str(len(body))}) + body
    cut = len(request) - 8 * 1024
    return request[:cut], request[cut:]


def test_a_stalled_upload_is_408_and_discarded_while_others_are_served(
    hostile: RunningServer, hostile_client: httpx.Client, hostile_project: Project
) -> None:
    before = snapshot(hostile_client, hostile_project, hostile)
    tmp = hostile.settings.data_dir / "tmp"
    sent, _never_sent = started_upload(hostile, hostile_project)
    with socket.create_connection(host_port(hostile), timeout=30) as sock:
        send(sock, sent)
        eventually(lambda: files_under(tmp) != set(), "the upload being staged", within=5)
        # While that upload is stuck, devices and the dashboard are served as usual.
        check = hostile_client.get(CHECK, headers=hostile_project.key())
        assert check.status_code == 200, check.text
        assert check.json() == {"has_update": False}
        assert hostile_client.get("/healthz").status_code == 200
        other = uploaded(hostile_client, new_project(hostile.db))
        assert other["version"] == 1
        answer = read_answer(sock)
    assert answer.status == 408, answer
    assert answer.json()["code"] == "upload_timeout"
    assert answer.headers["connection"] == "close"
    assert snapshot(hostile_client, hostile_project, hostile).bundles == before.bundles
    assert hostile.stored_keys() == before.stored | {other["storage_path"]}
    assert files_under(tmp) == set()
    assert_no_pending_record(hostile)
    # The stalled upload took no version.
    assert uploaded(hostile_client, hostile_project)["version"] == 1


def test_a_trickling_upload_is_408_at_the_total_timeout_and_discarded(
    server_factory: Callable[..., RunningServer],
) -> None:
    """A client that never stalls (a few bytes now and then) is still bounded in time."""
    server = server_factory(upload_idle_timeout_seconds=30, upload_timeout_seconds=2)
    project = new_project(server.db)
    tmp = server.settings.data_dir / "tmp"
    sent, rest = started_upload(server, project)
    with socket.create_connection(host_port(server), timeout=30) as sock:
        send(sock, sent)
        eventually(lambda: files_under(tmp) != set(), "the upload being staged", within=5)
        # Far below the idle timeout between writes, so only the total one can end it.
        for offset in range(0, len(rest), 16):
            readable, _, _ = select.select([sock], [], [], 0.2)
            if readable:
                break
            send(sock, rest[offset : offset + 16])
        answer = read_answer(sock)
    assert answer.status == 408, answer
    assert answer.json()["code"] == "upload_timeout"
    assert "took longer than 2 s" in answer.json()["error"]
    eventually(lambda: files_under(tmp) == set(), "the staged upload being discarded", within=5)
    assert_no_pending_record(server)
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        assert http.get(CHECK, headers=project.key()).status_code == 200
        assert uploaded(http, project)["version"] == 1


def test_a_client_that_hangs_up_mid_upload_leaves_nothing(
    server: RunningServer, client: httpx.Client, project: Project
) -> None:
    """The default (long) idle timeout: the staged file goes because the client went."""
    before = snapshot(client, project, server)
    tmp = server.settings.data_dir / "tmp"
    sent, _ = started_upload(server, project)
    with socket.create_connection(host_port(server), timeout=30) as sock:
        send(sock, sent)
        eventually(lambda: files_under(tmp) != set(), "the upload being staged", within=5)
    eventually(lambda: files_under(tmp) == set(), "the staged upload being discarded", within=5)
    assert_nothing_stored(client, project, server, before)
    assert_no_pending_record(server)
    assert client.get(CHECK, headers=project.key()).status_code == 200
    assert uploaded(client, project)["version"] == 1


# --- invalid UTF-8 -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "status", "code"),
    [
        ("channel=%FF%FE", 400, "invalid_channel"),
        ("channel=\xff\xfe", 400, "invalid_channel"),
        ("version=%FF", 400, "invalid_version"),
        ("version=1%C0%80", 400, "invalid_version"),
    ],
)
def test_invalid_utf8_in_the_check_query_is_400(
    server: RunningServer, project: Project, query: str, status: int, code: str
) -> None:
    head = request_head(
        server,
        f"{CHECK}?{query}",
        method="GET",
        headers={"x-api-key": project.keys["production"], "Connection": "close"},
    )
    answer = exchange(server, head)
    assert answer.status == status, answer
    if "%" in query:
        assert answer.json()["code"] == code
    else:
        # A raw byte over 0x7f is not allowed in a request target: the app answers it, or the
        # HTTP server refuses the request line itself with its own JSON 400.
        assert answer.json()["code"] in (code, "bad_request")


@pytest.mark.parametrize(
    ("query", "code"),
    [("cursor=%FF%FE", "invalid_cursor"), ("limit=%FF", "invalid_limit")],
)
def test_invalid_utf8_in_the_list_query_is_400(
    client: httpx.Client, project: Project, query: str, code: str
) -> None:
    response = client.get(project.path(f"/bundles?{query}"), headers=project.auth)
    assert_error(response, 400, code)


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({"x-api-key": "pk_live_\xff\xfe"}, "invalid_api_key"),
        ({"x-api-key": "\xc3("}, "invalid_api_key"),
    ],
)
def test_invalid_utf8_in_the_api_key_header_is_401(
    server: RunningServer, headers: dict[str, str], code: str
) -> None:
    head = request_head(server, CHECK, method="GET", headers={**headers, "Connection": "close"})
    answer = exchange(server, head)
    assert answer.status == 401, answer
    assert answer.json()["code"] == code


@pytest.mark.parametrize("token", ["kbota_\xff\xfe", "\xc3(", "\xff"])
def test_invalid_utf8_in_the_authorization_header_is_401(
    server: RunningServer, project: Project, token: str
) -> None:
    head = request_head(
        server,
        project.path("/bundles"),
        method="GET",
        headers={"Authorization": f"Bearer {token}", "Connection": "close"},
    )
    answer = exchange(server, head)
    assert answer.status == 401, answer
    assert answer.headers["content-type"].startswith("application/json")


@pytest.mark.parametrize(
    "parts",
    [
        pytest.param([field("channel", b"prod\xffuction")], id="field-value"),
        pytest.param([field("release_notes", b"\xc3(")], id="release-notes"),
        pytest.param([field("mandatory", b"\xed\xa0\x80")], id="surrogate"),
        pytest.param([('Content-Disposition: form-data; name="\xff"', b"x")], id="field-name"),
    ],
)
def test_invalid_utf8_in_form_fields_is_400(
    client: httpx.Client,
    project: Project,
    server: RunningServer,
    parts: list[tuple[str, bytes]],
) -> None:
    before = snapshot(client, project, server)
    body = b""
    for headers, value in [*parts, bundle_part()]:
        body += f"--{BOUNDARY}\r\n".encode() + headers.encode("latin-1") + b"\r\n\r\n"
        body += value + b"\r\n"
    body += f"--{BOUNDARY}--\r\n".encode()
    assert_error(post_form(client, project, body), 400, "invalid_encoding")
    assert_nothing_stored(client, project, server, before)


@pytest.mark.parametrize(
    "body", [b'{"mandatory": "\xff"}', b"\xff\xfe", b'{"mandatory\xc3(": true}']
)
def test_invalid_utf8_in_a_json_body_is_400_and_changes_nothing(
    client: httpx.Client, project: Project, body: bytes
) -> None:
    bundle = uploaded(client, project)
    response = client.patch(
        project.path(f"/bundles/{bundle['id']}"),
        headers={**project.auth, "Content-Type": "application/json"},
        content=body,
    )
    assert_error(response, 400, "invalid_json")
    listed = client.get(project.path("/bundles"), headers=project.auth).json()
    assert listed == [bundle]


@pytest.mark.parametrize("raw", [False, True], ids=["percent-encoded", "raw-bytes"])
def test_invalid_utf8_in_path_parameters_is_404(
    server: RunningServer, project: Project, raw: bool
) -> None:
    bad = "\xff\xfe" if raw else "%FF%FE"
    auth = {"Authorization": f"Bearer {project.token}", "Connection": "close"}
    for method, path in [
        ("GET", f"/v1/projects/{bad}/ota/bundles"),
        ("POST", project.path(f"/bundles/{bad}/activate")),
        ("PATCH", project.path(f"/bundles/{bad}")),
        ("DELETE", project.path(f"/bundles/{bad}")),
    ]:
        extra = {"Content-Length": "0"} if method != "GET" else {}
        answer = exchange(server, request_head(server, path, method=method, headers=auth | extra))
        # A raw byte over 0x7f is not allowed in a request target: the HTTP server may refuse
        # the request line itself (400); past it, the id cannot exist (404). Never a 5xx.
        assert answer.status in ((400, 404) if raw else (404,)), (method, path, answer)
        if answer.status == 404:
            assert answer.json()["code"] in ("project_not_found", "bundle_not_found")


# --- huge headers --------------------------------------------------------------------------

HUGE_HEADERS = {
    "one-64-KiB-header": {"X-Huge": "a" * 64 * 1024},
    "one-1-MiB-header": {"X-Huge": "a" * 1024 * 1024},
    "a-thousand-headers": {f"X-Many-{index}": "b" * 64 for index in range(1000)},
    "a-64-KiB-api-key": {"x-api-key": "pk_live_" + "c" * 64 * 1024},
}


def assert_huge_headers_are_no_5xx(base_url: str, key: str) -> None:
    url = httpx.URL(base_url)
    assert url.port is not None
    for name, headers in HUGE_HEADERS.items():
        lines = [f"GET {CHECK} HTTP/1.1", f"Host: {url.host}", "Connection: close"]
        if "x-api-key" not in headers:
            lines.append(f"x-api-key: {key}")
        lines += [f"{header}: {value}" for header, value in headers.items()]
        with socket.create_connection((url.host, url.port), timeout=30) as sock:
            send(sock, ("\r\n".join(lines) + "\r\n\r\n").encode())
            answer = read_answer(sock)
        # Refused by the HTTP server (4xx or a closed connection) or answered: never a 5xx.
        assert answer.status < 500, (name, answer)
        # And the server is still there for everyone else.
        check = httpx.get(f"{base_url}{CHECK}", headers={"x-api-key": key}, timeout=30)
        assert check.status_code == 200, (name, check.text)


def test_huge_headers_are_no_5xx_in_process(server: RunningServer, project: Project) -> None:
    assert_huge_headers_are_no_5xx(server.base_url, project.keys["production"])


def test_huge_headers_are_no_5xx_on_the_real_server(tmp_path: Path) -> None:
    with serving(tmp_path / "data", "huge-headers") as real:
        key = real.credentials()["public_keys"]["production"]
        assert_huge_headers_are_no_5xx(real.base_url, key)


def test_a_stalled_upload_on_the_real_server_is_408(tmp_path: Path) -> None:
    """`serve`, as shipped, delivers the 408 and keeps serving meanwhile."""
    env = {"KOOLBASE_OTA_UPLOAD_IDLE_TIMEOUT_SECONDS": str(IDLE_SECONDS)}
    with serving(tmp_path / "data", "stalled", env=env) as real:
        credentials = real.credentials()
        url = httpx.URL(real.base_url)
        assert url.port is not None
        head, tail = multipart({"channel": "production"})
        body = head + make_zip() + tail
        request = (
            f"POST /v1/projects/{credentials['project_id']}/ota/upload HTTP/1.1\r\n"
            f"Host: {url.host}\r\nAuthorization: Bearer {credentials['dashboard_token']}\r\n"
            f"Content-Type: {MULTIPART_TYPE}\r\nContent-Length: {len(body) + 100}\r\n\r\n"
        ).encode() + body
        with socket.create_connection((url.host, url.port), timeout=30) as sock:
            send(sock, request)
            key = {"x-api-key": credentials["public_keys"]["production"]}
            assert httpx.get(real.base_url + CHECK, headers=key).status_code == 200
            answer = read_answer(sock)
        assert answer.status == 408, answer
        assert answer.json()["code"] == "upload_timeout"
        listing = httpx.get(
            f"{real.base_url}/v1/projects/{credentials['project_id']}/ota/bundles",
            headers={"Authorization": f"Bearer {credentials['dashboard_token']}"},
        )
        assert listing.json() == []
        assert files_under(tmp_path / "data" / "tmp") == set()
