"""Rate limits: the SDK check per client address and per public key, failed dashboard
authentication per address; 429 with `Retry-After`, bounded memory, trusted proxies."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from koolbase_ota.config import Settings
from koolbase_ota.ratelimit import FailureWindow, RateLimits, TokenBucket, limit_key
from tests.conftest import (
    Project,
    RunningServer,
    assert_error,
    make_zip,
    new_project,
    released,
    upload,
)

CHECK = "/v1/sdk/ota/check"
#: So slow a refill that no test run ever sees a token come back: no timing in any assertion.
NEVER = 0.0001


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def assert_rate_limited(response: httpx.Response) -> int:
    """A 429 JSON error with `Retry-After` in whole seconds; returns those seconds."""
    assert_error(response, 429, "rate_limited")
    retry_after = response.headers["retry-after"]
    assert retry_after.isdigit(), retry_after
    assert int(retry_after) >= 1
    return int(retry_after)


# The limiters on their own, with a clock the test moves


def test_token_bucket_allows_the_burst_then_refuses_until_a_token_comes_back() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=2, burst=3, max_entries=10, clock=clock)
    assert [bucket.take("a") for _ in range(3)] == [None, None, None]
    assert bucket.take("a") == 1  # half a second away, rounded up to whole seconds
    assert bucket.take("b") is None  # another key has its own bucket
    clock.now += 0.5
    assert bucket.take("a") is None
    assert bucket.take("a") == 1
    clock.now += 10  # long idle: full again, never more than the burst
    assert [bucket.take("a") for _ in range(4)] == [None, None, None, 1]


def test_token_bucket_retry_after_is_whole_seconds_rounded_up() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=0.1, burst=1, max_entries=10, clock=clock)
    assert bucket.take("a") is None
    assert bucket.take("a") == 10
    clock.now += 2.5
    assert bucket.take("a") == 8


def test_no_rounding_ever_refuses_a_new_key() -> None:
    """`now + interval - now` is not always `interval` in floating point."""
    clock = FakeClock()
    bucket = TokenBucket(rate=NEVER, burst=1, max_entries=10_000, clock=clock)
    for step in range(5000):
        clock.now = 10869.3 + step * 0.7
        assert bucket.take(f"key-{step}") is None


def test_token_bucket_memory_is_bounded_and_keeps_the_keys_in_use() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=1, burst=1, max_entries=1000, clock=clock)
    assert bucket.take("attacker") is None
    assert bucket.take("attacker") == 1
    for number in range(100_000):
        bucket.take(f"invented-{number}")
        if number % 400 == 0:
            # Still hammering: it stays remembered, and refused, however many keys come by.
            assert bucket.take("attacker") == 1
        assert len(bucket) <= 1000
    assert "invented-0" not in bucket
    assert "invented-99999" in bucket
    assert bucket.take("attacker") == 1
    clock.now += 1  # a forgotten key, or one whose time has passed, starts full
    assert bucket.take("invented-0") is None


def test_failure_window_refuses_after_the_limit_until_the_window_passes() -> None:
    clock = FakeClock()
    window = FailureWindow(limit=3, window_seconds=60, max_entries=10, clock=clock)
    for _ in range(3):
        assert window.retry_after("a") is None
        window.failed("a")
    assert window.retry_after("a") == 60
    assert window.retry_after("b") is None
    clock.now += 59.5
    assert window.retry_after("a") == 1
    clock.now += 0.5
    assert window.retry_after("a") is None
    window.failed("a")  # a new window starts with this failure
    assert window.retry_after("a") is None


def test_failure_window_failures_of_an_old_window_do_not_add_up() -> None:
    clock = FakeClock()
    window = FailureWindow(limit=3, window_seconds=60, max_entries=10, clock=clock)
    window.failed("a")
    window.failed("a")
    clock.now += 61
    window.failed("a")
    window.failed("a")
    assert window.retry_after("a") is None


def test_failure_window_counts_attempts_in_flight_as_failures() -> None:
    """Attempts begun and not yet ended count against the limit, so a burst cannot pass the
    check before the first of it fails; one that ends well frees its place."""
    window = FailureWindow(limit=3, window_seconds=60, max_entries=10, clock=FakeClock())
    for _ in range(3):
        assert window.begin("a") is None
    assert window.begin("a") == 1  # three in flight: wait for them
    assert window.begin("b") is None
    window.end("a", failed=False)
    assert window.begin("a") is None
    for _ in range(3):
        window.end("a", failed=True)
    assert window.begin("a") == 60  # three failed: the window's wait
    window.end("b", failed=False)
    assert window.pending == {}  # nothing kept for attempts that ended


def test_failure_window_memory_is_bounded() -> None:
    window = FailureWindow(limit=1, window_seconds=60, max_entries=100, clock=FakeClock())
    for number in range(10_000):
        window.failed(f"10.0.{number // 256}.{number % 256}")
        assert len(window) <= 100
    assert window.retry_after("10.0.39.15") == 60  # the newest is kept


def scope(peer: str | None, *forwarded: str) -> dict[str, Any]:
    return {
        "type": "http",
        "client": (peer, 50000) if peer is not None else None,
        "headers": [(b"x-forwarded-for", value.encode()) for value in forwarded],
    }


def test_client_address_is_the_peer_unless_the_peer_is_a_trusted_proxy() -> None:
    untrusting = RateLimits(Settings())
    assert untrusting.client_address(scope("198.51.100.1", "203.0.113.9")) == "198.51.100.1"
    assert untrusting.client_address(scope(None)) == ""

    limits = RateLimits(Settings(trusted_proxies="10.0.0.0/8, 192.0.2.1"))
    # A client that is not a proxy cannot choose its address with the header.
    assert limits.client_address(scope("198.51.100.1", "203.0.113.9")) == "198.51.100.1"
    # The rightmost entry no trusted proxy wrote: what the client put on the left is ignored.
    assert limits.client_address(scope("10.1.2.3", "1.1.1.1, 203.0.113.9")) == "203.0.113.9"
    assert (
        limits.client_address(scope("10.1.2.3", "1.1.1.1, 203.0.113.9, 192.0.2.1, 10.9.9.9"))
        == "203.0.113.9"
    )
    # Several headers count as one list, in order.
    assert limits.client_address(scope("10.1.2.3", "1.1.1.1", "203.0.113.7")) == "203.0.113.7"
    # A port some proxies add is not part of the address.
    assert limits.client_address(scope("10.1.2.3", "203.0.113.9:5678")) == "203.0.113.9"
    assert limits.client_address(scope("10.1.2.3", "[2001:db8::1]:443")) == "2001:db8::1"
    assert limits.client_address(scope("10.1.2.3", "2001:db8::1")) == "2001:db8::1"
    # Nothing forwarded, or only proxies: the peer itself.
    assert limits.client_address(scope("10.1.2.3")) == "10.1.2.3"
    assert limits.client_address(scope("10.1.2.3", "10.4.4.4")) == "10.1.2.3"


def test_ipv6_clients_are_limited_by_their_64() -> None:
    assert limit_key("203.0.113.9") == "203.0.113.9"
    assert limit_key("2001:db8:1:2:aaaa::1") == limit_key("2001:db8:1:2:ffff::9")
    assert limit_key("[2001:db8:1:2::7]") == limit_key("2001:db8:1:2::1")
    assert limit_key("fe80::1%eth0") == limit_key("fe80::2")
    assert limit_key("2001:db8:1:3::1") != limit_key("2001:db8:1:2::1")
    assert limit_key("::ffff:203.0.113.9") == "203.0.113.9"
    assert len(limit_key("x" * 10_000)) <= 64


def test_the_whole_64_shares_one_bucket() -> None:
    limits = RateLimits(Settings(check_rate_per_address=NEVER, check_burst_per_address=2))
    assert limits.check("pk", "2001:db8::1") is None
    assert limits.check("pk", "2001:db8::2") is None
    assert limits.check("pk", "2001:db8::3") is not None
    assert limits.check("pk", "2001:db8:0:1::1") is None


def test_trusted_proxies_must_be_addresses_or_networks() -> None:
    with pytest.raises(ValidationError, match="not an address or CIDR"):
        Settings(trusted_proxies="10.0.0.0/8, proxy.example.com")


def test_limits_set_to_zero_are_off() -> None:
    limits = RateLimits(
        Settings(check_rate_per_address=0, check_rate_per_key=0, auth_failure_limit=0)
    )
    assert limits.per_address is None
    assert limits.per_key is None
    assert limits.auth_failures is None
    for _ in range(10_000):
        assert limits.check("pk_live_x", "198.51.100.1") is None
        assert limits.auth_begin("198.51.100.1") is None
        limits.auth_end("198.51.100.1", failed=True)
    assert limits.auth_begin("198.51.100.1") is None


@pytest.mark.parametrize("rate", [1e-320, 5e-324, 1e-7])
def test_a_rate_too_small_to_have_an_interval_is_refused_not_turned_off(rate: float) -> None:
    """1 / 1e-320 is infinite: every request came in under an infinite tolerance (or a NaN
    one, for a burst of 1), so the smallest rates let everything through."""
    with pytest.raises(ValidationError, match="at least 1e-06"):
        Settings(check_rate_per_address=rate)
    with pytest.raises(ValidationError, match="at least 1e-06"):
        Settings(check_rate_per_key=rate)
    for burst in (1, 2):
        with pytest.raises(ValueError, match="finite interval"):
            TokenBucket(rate=rate if rate < 1e-308 else 1e-320, burst=burst, max_entries=2)


def test_the_smallest_rate_allowed_limits() -> None:
    clock = FakeClock()
    settings = Settings(check_rate_per_address=1e-6, check_burst_per_address=2)
    slowest = RateLimits(settings, clock=clock)
    assert slowest.check("pk_live_x", "198.51.100.1") is None
    assert slowest.check("pk_live_x", "198.51.100.1") is None
    assert slowest.check("pk_live_x", "198.51.100.1") == 1_000_000
    with pytest.raises(ValidationError, match="less than or equal to 1000000000"):
        Settings(check_burst_per_key=10**9 + 1)


def test_defaults_limit_the_address_and_auth_failures_but_not_the_key() -> None:
    defaults = Settings()
    assert defaults.check_rate_per_address > 0
    assert defaults.auth_failure_limit > 0
    assert defaults.check_rate_per_key == 0
    assert defaults.trusted_proxies == ""


# Against a real server


def check(
    client: httpx.Client, key: str | None, *, forwarded_for: str | None = None
) -> httpx.Response:
    headers = {"x-api-key": key} if key is not None else {}
    if forwarded_for is not None:
        headers["x-forwarded-for"] = forwarded_for
    return client.get(CHECK, params={"channel": "production", "version": "0"}, headers=headers)


def connect(server: RunningServer) -> httpx.Client:
    return httpx.Client(base_url=server.base_url, timeout=30)


def test_check_is_limited_per_address_with_429_and_retry_after(
    server_factory: Callable[..., RunningServer],
) -> None:
    server = server_factory(
        check_rate_per_address=NEVER, check_burst_per_address=3, trusted_proxies="127.0.0.1"
    )
    project = new_project(server.db)
    with connect(server) as client:
        released(client, project, channel="production")
        for _ in range(3):
            response = check(client, project.keys["production"])
            assert response.status_code == 200, response.text
            assert response.json()["has_update"] is True
        limited = check(client, project.keys["production"])
        assert_rate_limited(limited)
        assert limited.headers["cache-control"] == "no-store"
        assert limited.headers["x-content-type-options"] == "nosniff"
        # Another key from the same address: the address is what is limited.
        assert_rate_limited(check(client, project.keys["staging"]))
        # Another client address (through the trusted proxy) is still served.
        for _ in range(3):
            other = check(client, project.keys["production"], forwarded_for="203.0.113.7")
            assert other.status_code == 200, other.text
        assert_rate_limited(check(client, project.keys["production"], forwarded_for="203.0.113.7"))
        # A client that is not behind a trusted proxy cannot pick its own address.
        assert_rate_limited(check(client, project.keys["production"]))


def test_a_private_peer_that_is_not_a_trusted_proxy_is_not_limited_per_address(
    server_factory: Callable[..., RunningServer], caplog: pytest.LogCaptureFixture
) -> None:
    """An unconfigured load balancer (a private address) is not throttled as one client,
    and its X-Forwarded-For is not believed either; the log says what to set."""
    server = server_factory(check_rate_per_address=NEVER, check_burst_per_address=1)
    project = new_project(server.db)
    with connect(server) as client, caplog.at_level(logging.WARNING):
        released(client, project, channel="production")
        for forwarded in (None, "203.0.113.8", "203.0.113.8"):
            response = check(client, project.keys["production"], forwarded_for=forwarded)
            assert response.status_code == 200, response.text
    assert "KOOLBASE_OTA_TRUSTED_PROXIES" in caplog.text
    # A public peer is limited, and one named as a trusted proxy is taken at its word.
    limits = server.context.limits
    assert limits.check(None, "198.51.100.4") is None
    assert limits.check(None, "198.51.100.4") is not None
    assert limits.check(None, "2001:db8::1") is None
    assert limits.check(None, "2001:db8::2") is not None  # the same /64
    for private in ("10.1.2.3", "172.16.0.9", "192.168.1.1", "169.254.0.1", "::1", "fd00::1"):
        assert limits.check(None, private) is None
        assert limits.check(None, private) is None


def test_invented_keys_are_limited_before_any_database_work(
    server_factory: Callable[..., RunningServer],
) -> None:
    server = server_factory(
        check_rate_per_address=NEVER, check_burst_per_address=5, trusted_proxies="127.0.0.1"
    )
    cache = server.context.check_cache
    with connect(server) as client:
        answers = [
            check(client, f"pk_live_{uuid.uuid4().hex[:24]}", forwarded_for="203.0.113.9")
            for _ in range(50)
        ]
    assert [r.status_code for r in answers[:5]] == [401] * 5
    for response in answers[5:]:
        assert_rate_limited(response)
    # Only the five let through were looked up (and cached as unknown); the rest never were.
    assert len(cache.keys) == 5


def test_check_is_limited_per_key(server_factory: Callable[..., RunningServer]) -> None:
    server = server_factory(
        check_rate_per_key=NEVER, check_burst_per_key=2, trusted_proxies="127.0.0.1"
    )
    project = new_project(server.db)
    with connect(server) as client:
        released(client, project, channel="production")
        key = project.keys["production"]
        # The same key from two addresses shares one allowance.
        assert check(client, key, forwarded_for="203.0.113.1").status_code == 200
        assert check(client, key, forwarded_for="203.0.113.2").status_code == 200
        assert_rate_limited(check(client, key, forwarded_for="203.0.113.3"))
        # Another key (even of the same project) has its own.
        assert check(client, project.keys["staging"]).status_code == 200
        other = new_project(server.db, name="other")
        assert check(client, other.keys["production"]).status_code == 200


def rate_limited_total(client: httpx.Client) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith('koolbase_ota_errors_total{code="rate_limited"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_rate_limited_check_is_counted_in_the_metrics(
    server_factory: Callable[..., RunningServer],
) -> None:
    server = server_factory(
        check_rate_per_address=NEVER, check_burst_per_address=1, trusted_proxies="127.0.0.1"
    )
    with connect(server) as client:
        key, address = "pk_live_" + "0" * 24, "203.0.113.10"
        check(client, key, forwarded_for=address)
        before = rate_limited_total(client)
        assert_rate_limited(check(client, key, forwarded_for=address))
        assert_rate_limited(check(client, key, forwarded_for=address))
        assert rate_limited_total(client) == before + 2


def bad_token(client: httpx.Client, project: Project, **headers: str) -> httpx.Response:
    return client.get(
        project.path("/bundles"), headers={"Authorization": "Bearer kbota_wrong", **headers}
    )


def listing(client: httpx.Client, project: Project, **headers: str) -> httpx.Response:
    return client.get(project.path("/bundles"), headers={**project.auth, **headers})


def test_failed_dashboard_auth_is_limited_per_address(
    server_factory: Callable[..., RunningServer],
) -> None:
    server = server_factory(
        auth_failure_limit=3, auth_failure_window_seconds=3600, trusted_proxies="127.0.0.1"
    )
    project = new_project(server.db)
    with connect(server) as client:
        # Successes never count.
        for _ in range(10):
            assert listing(client, project).status_code == 200
        assert_error(bad_token(client, project), 401, "invalid_token")
        assert_error(client.get(project.path("/bundles")), 401, "missing_token")
        assert_error(bad_token(client, project), 401, "invalid_token")
        limited = bad_token(client, project)
        retry_after = assert_rate_limited(limited)
        assert 3500 < retry_after <= 3600
        # Throttled, the address cannot use a valid token either until the window passes:
        # otherwise a right guess would show as a 200 among the 429s.
        assert_rate_limited(listing(client, project))
        assert_rate_limited(client.get(f"/v1/projects/{project.id}/audit", headers=project.auth))
        # Another address is unaffected.
        assert listing(client, project, **{"x-forwarded-for": "203.0.113.5"}).status_code == 200
        # The check does not use dashboard auth and stays up for the same address.
        assert check(client, project.keys["production"]).status_code == 200


def test_failed_dashboard_auth_sent_at_once_is_limited_too(
    server_factory: Callable[..., RunningServer],
) -> None:
    """Guesses sent at once all passed the check before the first one failed: 200 of them
    got 200 token lookups under a limit of 3. At most the limit are looked up now."""
    server = server_factory(auth_failure_limit=3, auth_failure_window_seconds=3600)
    project = new_project(server.db)
    path = server.base_url + project.path("/bundles")

    def guess(number: int) -> int:
        headers = {"Authorization": f"Bearer kbota_guess{number:040d}"}
        return httpx.get(path, headers=headers, timeout=30).status_code

    with ThreadPoolExecutor(max_workers=50) as pool:
        statuses = list(pool.map(guess, range(200)))
    assert statuses.count(401) <= 3
    assert statuses.count(429) == 200 - statuses.count(401)


def test_a_valid_token_of_another_project_is_not_an_auth_failure(
    server_factory: Callable[..., RunningServer],
) -> None:
    server = server_factory(auth_failure_limit=2, auth_failure_window_seconds=3600)
    mine = new_project(server.db, name="mine")
    theirs = new_project(server.db, name="theirs")
    with connect(server) as client:
        for _ in range(5):
            response = client.get(theirs.path("/bundles"), headers=mine.auth)
            assert_error(response, 404, "project_not_found")
        assert listing(client, mine).status_code == 200


def test_a_throttled_upload_stores_nothing(server_factory: Callable[..., RunningServer]) -> None:
    server = server_factory(auth_failure_limit=1, auth_failure_window_seconds=3600)
    project = new_project(server.db)
    with connect(server) as client:
        assert_error(bad_token(client, project), 401)
        assert_rate_limited(upload(client, project, make_zip(), channel="production"))
    assert server.stored_keys() == set()
    fresh = new_project(server.db, name="fresh")  # a new project, same limited address
    with connect(server) as client:
        assert_rate_limited(listing(client, fresh))


def test_auth_errors_never_echo_the_token_or_key(
    server_factory: Callable[..., RunningServer],
) -> None:
    server = server_factory(auth_failure_limit=2, auth_failure_window_seconds=3600)
    project = new_project(server.db)
    wrong_token = project.token[:-4] + "beef"
    wrong_key = project.keys["production"][:-4] + "beef"
    with connect(server) as client:
        answers = [
            client.get(project.path("/bundles"), headers={"Authorization": f"Bearer {wrong_token}"})
            for _ in range(3)
        ]
        answers.append(check(client, wrong_key))
        answers.append(check(client, project.token))
    assert [r.status_code for r in answers] == [401, 401, 429, 401, 401]
    for response in answers:
        for secret in (wrong_token, wrong_key, project.token, project.keys["production"]):
            assert secret not in response.text
            assert secret not in str(response.headers)


def test_checks_served_from_the_cache_are_unaffected_when_limits_are_off(
    server: RunningServer, client: httpx.Client, project: Project
) -> None:
    limits = server.context.limits
    assert limits.per_address is None
    assert limits.per_key is None
    released(client, project, channel="production")
    answers = [check(client, project.keys["production"]) for _ in range(300)]
    assert {response.status_code for response in answers} == {200}
    assert len({response.content for response in answers}) == 1


def test_openapi_documents_429_with_retry_after(client: httpx.Client) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    operations = [
        paths["/v1/sdk/ota/check"]["get"],
        paths["/v1/projects/{project_id}/ota/upload"]["post"],
        paths["/v1/projects/{project_id}/ota/bundles"]["get"],
        paths["/v1/projects/{project_id}/ota/bundles/{bundle_id}/activate"]["post"],
        paths["/v1/projects/{project_id}/ota/bundles/{bundle_id}"]["patch"],
        paths["/v1/projects/{project_id}/ota/bundles/{bundle_id}"]["delete"],
        paths["/v1/projects/{project_id}/audit"]["get"],
    ]
    for operation in operations:
        answer = operation["responses"]["429"]
        assert "Retry-After" in answer["headers"]
        schema = answer["content"]["application/json"]["schema"]
        assert schema["$ref"].endswith("/ErrorOut")
