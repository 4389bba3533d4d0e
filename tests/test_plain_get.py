"""The server's own reading of the plainest check requests (`httpserver.read_plain_get`).

It answers a check without httptools only where httptools would make exactly the same of the
bytes: one whole GET head, the same target and headers, no body, keep-alive. A disagreement
on where a request ends is how requests are smuggled, so every read it accepts is parsed
again here by httptools and compared, over seeded mutations of real heads and hypothesis'
own; and what it refuses goes to httptools unchanged (see tests/test_httpserver.py).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import httptools
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from koolbase_ota.httpserver import MAX_HEADERS, read_plain_get
from koolbase_ota.sdk.check import CHECK_PATH
from koolbase_ota.sdk.codepush import CODE_PUSH_PATH

KEY = "kb_live_0123456789abcdef0123456789abcdef"


@dataclass
class Parse:
    """What httptools made of one read. The method, version and keep-alive are read when the
    message completes: once `feed_data` returns, llhttp has reset them for the next one."""

    url: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    begun: int = 0
    complete: int = 0
    method: bytes = b""
    version: str = ""
    keep_alive: bool = False
    error: str | None = None
    parser: httptools.HttpRequestParser = field(init=False)

    def on_message_begin(self) -> None:
        self.begun += 1

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_message_complete(self) -> None:
        self.complete += 1
        self.method = self.parser.get_method()
        self.version = self.parser.get_http_version()
        self.keep_alive = self.parser.should_keep_alive()


def httptools_parse(data: bytes) -> Parse:
    parse = Parse()
    parse.parser = httptools.HttpRequestParser(parse)
    try:
        parse.parser.feed_data(data)
    except httptools.HttpParserError as exc:
        parse.error = type(exc).__name__
    return parse


def assert_agrees(data: bytes) -> bool:
    """If `read_plain_get` reads `data`, httptools makes the same of it: one whole GET, the
    same target and headers, HTTP/1.1, keep-alive. Whether it read it."""
    read = read_plain_get(data)
    if read is None:
        return False
    target, headers, api_key = read
    parse = httptools_parse(data)
    assert parse.error is None, (data, parse.error)
    assert (parse.begun, parse.complete) == (1, 1), data
    assert (parse.method, parse.version, parse.keep_alive) == (b"GET", "1.1", True), data
    assert parse.url == target, data
    assert parse.headers == headers, data
    keys = [value for name, value in headers if name == b"x-api-key"]
    assert api_key == (keys[-1] if keys else None), data
    return True


def head(target: str, *lines: str) -> bytes:
    return "".join(
        [f"GET {target} HTTP/1.1\r\n", *(f"{line}\r\n" for line in lines), "\r\n"]
    ).encode("latin-1")


#: Heads as clients send them: the SDK's, wrk's, a proxy's.
REAL_HEADS = [
    head(
        CHECK_PATH + "?channel=production&version=3",
        "user-agent: Dart/3.5 (dart:io)",
        "accept-encoding: gzip",
        "content-length: 0",
        f"x-api-key: {KEY}",
        "host: ota.example.com",
    ),
    head(
        CODE_PUSH_PATH + "?channel=production&current_bundle=0&app_version=1.2.0&platform=ios"
        "&device_id=9f1c2e",
        "Host: 127.0.0.1:8080",
        f"X-API-Key: {KEY}",
        "X-Forwarded-For: 203.0.113.7, 10.0.0.2",
        "X-Request-Id: 4bf92f3577b34da6",
    ),
    head(CHECK_PATH, f"x-api-key:{KEY}"),
    head(CHECK_PATH + "?channel=staging"),
]


def test_real_heads_are_read_as_httptools_reads_them() -> None:
    for data in REAL_HEADS:
        assert assert_agrees(data), data
    target, headers, api_key = read_plain_get(REAL_HEADS[1]) or (b"", [], None)
    assert target.endswith(b"&device_id=9f1c2e")
    assert (b"x-forwarded-for", b"203.0.113.7, 10.0.0.2") in headers
    assert api_key == KEY.encode()


@pytest.mark.parametrize(
    "data",
    [
        # Another method, version or target form; escapes go to the parser.
        REAL_HEADS[3].replace(b"GET", b"POST"),
        REAL_HEADS[3].replace(b"HTTP/1.1", b"HTTP/1.0"),
        head("http://ota.example.com" + CHECK_PATH),
        head(CHECK_PATH + "?channel=pro%64uction"),
        head(CHECK_PATH + "#top"),
        head("/api/v1/sdk/ota/check?channel=a b"),
        # A body, or a say in the connection.
        head(CHECK_PATH, "content-length: 5") + b"hello",
        head(CHECK_PATH, "content-length: 0", "content-length: 0"),
        head(CHECK_PATH, "content-length: 00"),
        head(CHECK_PATH, "Transfer-Encoding: chunked") + b"0\r\n\r\n",
        head(CHECK_PATH, "Connection: close"),
        head(CHECK_PATH, "connection: keep-alive"),
        head(CHECK_PATH, "Proxy-Connection: close"),
        head(CHECK_PATH, "Upgrade: websocket"),
        head(CHECK_PATH, "Expect: 100-continue"),
        # Header lines httptools reads otherwise, or refuses.
        head(CHECK_PATH, "x-api-key : k"),
        head(CHECK_PATH, "x-api-key: k", " folded"),
        head(CHECK_PATH, "x-api-key: k\x80"),
        head(CHECK_PATH, "x-api-key: k\x7f"),
        head(CHECK_PATH, "x-api-key: k\x00"),
        head(CHECK_PATH, ": empty name"),
        head(CHECK_PATH, "no colon"),
        head(CHECK_PATH).replace(b"\r\n\r\n", b"\n\n"),
        head(CHECK_PATH, "a: b").replace(b"a: b\r\n", b"a: b\n"),
        head(CHECK_PATH, "a: b").replace(b"a: b\r\n", b"a: b\r\r\n"),
        # Not exactly one whole head.
        head(CHECK_PATH)[:-2],
        head(CHECK_PATH) + head(CHECK_PATH),
        head(CHECK_PATH) + b"\r\n",
        b"\r\n" + head(CHECK_PATH),
        head(CHECK_PATH, *["a: b"] * (MAX_HEADERS + 1)),
    ],
)
def test_anything_else_is_left_to_the_parser(data: bytes) -> None:
    assert read_plain_get(data) is None


def test_the_header_bound_is_the_servers() -> None:
    at_bound = head(CHECK_PATH, *["a: b"] * MAX_HEADERS)
    assert assert_agrees(at_bound)


def mutated(data: bytes, rng: random.Random) -> bytes:
    """`data` with one to three bytes changed, inserted or removed, drawn from the bytes that
    matter to a parser."""
    interesting = b"\r\n\t :;,%?#/\\\"'()<>@[]{}=\x00\x01\x7f\x80\xffaAzZ09-_.~"
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        at = rng.randrange(len(out) + 1)
        byte = interesting[rng.randrange(len(interesting))]
        kind = rng.randrange(3)
        if kind == 0 and at < len(out):
            out[at] = byte
        elif kind == 1:
            out.insert(at, byte)
        elif at < len(out):
            del out[at]
    return bytes(out)


def test_seeded_mutations_of_real_heads_agree_with_httptools() -> None:
    rng = random.Random(20261126)  # noqa: S311 - reproducible, not a secret
    read = 0
    tried = 0
    for _ in range(20_000):
        data = mutated(rng.choice(REAL_HEADS), rng)
        tried += 1
        read += assert_agrees(data)
    # Both sides were exercised: most mutations are read, a good share refused.
    assert tried * 0.2 < read < tried * 0.9, (read, tried)


_NAME = st.text(alphabet="abcXYZ-_!~ :\t\x7f\x80", min_size=0, max_size=6)
_VALUE = st.text(alphabet="ab, \t:\r\n\x00\x7f\x80\xff%", min_size=0, max_size=8)


@settings(max_examples=1_000, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    target=st.sampled_from(["/", CHECK_PATH, CHECK_PATH + "?channel=a&version=1", "/a?b#c"]),
    lines=st.lists(st.tuples(_NAME, st.sampled_from([":", ": ", " :", ""]), _VALUE), max_size=5),
    framing=st.sampled_from(
        [
            "",
            "content-length: 0",
            "content-length: 1\r\n\r\nx",
            "connection: close",
            "proxy-connection: close",
        ]
    ),
)
def test_generated_heads_agree_with_httptools(
    target: str, lines: list[tuple[str, str, str]], framing: str
) -> None:
    header_lines = [name + sep + value for name, sep, value in lines]
    if framing:
        header_lines.append(framing)
    assert_agrees(head(target, *header_lines))
