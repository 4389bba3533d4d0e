"""Per-process rate limits: the SDK check per client address and per public key, and failed
dashboard authentication per client address, answered with 429 and `Retry-After`.

Everything lives in this process's memory and is touched only from its event loop, so there is
no lock and no I/O: a limit costs a clock read and a dict update. Each table holds at most
`max_entries` keys and forgets those unseen the longest, so a flood of invented addresses or
keys costs bounded memory (a forgotten key merely starts again with a full allowance), while
a key still in use stays remembered. With N server processes the effective limit is up to N
times the configured one.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import math
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from starlette.types import Scope

from koolbase_ota.config import Settings
from koolbase_ota.errors import OTAError

logger = logging.getLogger(__name__)

Clock = Callable[[], float]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
#: Longest address (or forwarded value) used as a table key; longer ones are cut.
_MAX_ADDRESS = 64
#: At most one "throttled" warning per process in this many seconds.
_WARN_EVERY_SECONDS = 60.0


class RateLimited(OTAError):
    """429: too many requests from one address or for one key; retry after `retry_after` s."""

    status_code = 429
    default_code = "rate_limited"

    def __init__(self, retry_after: int, message: str = "too many requests; retry later") -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})
        self.retry_after = retry_after


def _seconds(delay: float) -> int:
    """`Retry-After` is whole seconds; rounding up never invites a retry that would fail."""
    return max(1, math.ceil(delay))


class TokenBucket:
    """Token buckets, one per key, `rate` tokens a second up to `burst`, in one float each.

    Stored as the GCRA "theoretical arrival time": the moment the key's bucket is full again.
    A key whose time has passed is the same as an absent one, which is what makes forgetting
    safe. Keys live in two generations of plain dicts (a dict read and write is the whole cost
    of a known key): new keys go to `recent`; when it holds half of `max_entries`, it becomes
    `older` and the previous `older` is dropped. A key seen again moves back to `recent`, so
    only keys unseen for a whole generation are forgotten, and memory never passes the cap.
    """

    def __init__(
        self, *, rate: float, burst: int, max_entries: int, clock: Clock = time.monotonic
    ) -> None:
        if rate <= 0 or burst < 1 or max_entries < 2:
            raise ValueError("rate and burst must be positive, max_entries at least 2")
        self.interval = 1.0 / rate
        #: How far ahead of now a key's full time may be and still allow one more request.
        #: (Compared as `full_at - now`, which is exactly 0 for a new key: no rounding can
        #: refuse the first request.)
        self.tolerance = (burst - 1) * self.interval
        if not math.isfinite(self.tolerance):
            # An infinite interval (or NaN, 0 times it) lets every request through.
            raise ValueError("rate too small, or burst too large, for a finite interval")
        self.generation_size = max_entries // 2
        self.clock = clock
        self.recent: dict[str, float] = {}
        self.older: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self.recent) + len(self.older)

    def __contains__(self, key: str) -> bool:
        return key in self.recent or key in self.older

    def take(self, key: str) -> int | None:
        """Spend one token of `key`: None if it had one, else the seconds until it has."""
        now = self.clock()
        recent = self.recent
        previous = recent.get(key)
        if previous is None:
            previous = self.older.get(key)
            if len(recent) >= self.generation_size:
                self.older, self.recent = recent, {}
                recent = self.recent
        if previous is None or previous < now:
            previous = now
        ahead = previous - now
        if ahead > self.tolerance:
            recent[key] = previous
            return _seconds(ahead - self.tolerance)
        recent[key] = previous + self.interval
        return None


class FailureWindow:
    """At most `limit` failures per key in a window of `window_seconds` from the first one;
    past that the key is refused until the window ends.

    Attempts still in flight (`begin` to `end`) count against the limit as failures do: a
    burst of attempts sent at once all passed the check before the first of them failed, so
    200 guesses at once all reached the database under a limit of 3."""

    def __init__(
        self, *, limit: int, window_seconds: float, max_entries: int, clock: Clock = time.monotonic
    ) -> None:
        if limit < 1 or window_seconds <= 0 or max_entries < 1:
            raise ValueError("limit, window_seconds and max_entries must be positive")
        self.limit = limit
        self.window_seconds = window_seconds
        self.max_entries = max_entries
        self.clock = clock
        #: key -> [when its window ends, failures in it]
        self.windows: OrderedDict[str, list[float]] = OrderedDict()
        #: key -> attempts begun and not yet ended (as many entries as requests in flight)
        self.pending: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.windows)

    def retry_after(self, key: str) -> int | None:
        """None if `key` may try, else the seconds until its window ends."""
        window = self.windows.get(key)
        if window is None or window[1] < self.limit:
            return None
        left = window[0] - self.clock()
        if left <= 0:
            del self.windows[key]
            return None
        return _seconds(left)

    def begin(self, key: str) -> int | None:
        """None, with one attempt of `key` in flight until `end`, if it may try; else the
        seconds until it may (1 while attempts in flight fill what its window leaves)."""
        retry_after = self.retry_after(key)
        if retry_after is not None:
            return retry_after
        window = self.windows.get(key)
        failures = window[1] if window is not None and window[0] > self.clock() else 0
        pending = self.pending.get(key, 0)
        if failures + pending >= self.limit:
            return 1
        self.pending[key] = pending + 1
        return None

    def end(self, key: str, *, failed: bool) -> None:
        """The attempt `begin` let through is over; `failed` counts it as a failure."""
        pending = self.pending.pop(key, 0) - 1
        if pending > 0:
            self.pending[key] = pending
        if failed:
            self.failed(key)

    def failed(self, key: str) -> None:
        """Count one failure of `key`."""
        now = self.clock()
        windows = self.windows
        window = windows.get(key)
        if window is None or window[0] <= now:
            if window is None and len(windows) >= self.max_entries:
                windows.popitem(last=False)
            windows[key] = [now + self.window_seconds, 1.0]
        else:
            window[1] += 1
        windows.move_to_end(key)


def parse_networks(setting: str) -> tuple[Network, ...]:
    """`KOOLBASE_OTA_TRUSTED_PROXIES`: comma-separated addresses or CIDRs; empty: none."""
    items = [item.strip() for item in setting.split(",")]
    return tuple(ipaddress.ip_network(item, strict=False) for item in items if item)


def _parse(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        parsed = ipaddress.ip_address(address.strip().strip("[]"))
    except ValueError:
        return None
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        return parsed.ipv4_mapped
    return parsed


def _without_port(hop: str) -> str:
    """Some proxies forward `1.2.3.4:5678` or `[2001:db8::1]:5678`; the port is not the client."""
    if hop.startswith("["):
        return hop[1:].partition("]")[0]
    if hop.count(":") == 1:
        return hop.partition(":")[0]
    return hop


_V4_MAPPED = bytes(10) + b"\xff\xff"
#: Where load balancers and proxies live: private (RFC 1918, RFC 4193), loopback, link-local.
_PRIVATE_NETWORKS = tuple(
    ipaddress.ip_network(network)
    for network in (
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "::1/128",
        "fc00::/7",
        "fe80::/10",
    )
)
#: Starts of the IPv4 ones, to pass every other IPv4 address without parsing it.
_PRIVATE_PREFIXES = ("10.", "127.", "169.254.", "172.", "192.168.")


def limit_key(address: str) -> str:
    """The key an address is limited under: IPv4 as it is, IPv6 by its /64 (as hex).

    One IPv6 subscriber is routinely given a whole /64; limiting each of its 2^64 addresses
    apart would be no limit at all. (`inet_pton` rather than `ipaddress`: 50 times faster.)
    """
    if ":" not in address:
        return address[:_MAX_ADDRESS]
    try:
        packed = socket.inet_pton(socket.AF_INET6, address)
    except OSError:
        # A forwarded value may come bracketed or with a zone; anything else is kept as it is.
        try:
            packed = socket.inet_pton(socket.AF_INET6, address.strip("[] ").partition("%")[0])
        except OSError:
            return address[:_MAX_ADDRESS]
    if packed[:12] == _V4_MAPPED:
        return socket.inet_ntop(socket.AF_INET, packed[12:])
    return packed[:8].hex() + "/64"


class RateLimits:
    """Every limit of one process, built from the settings; a limit set to 0 is off."""

    def __init__(self, settings: Settings, *, clock: Clock = time.monotonic) -> None:
        entries = settings.rate_limit_max_entries

        def bucket(rate: float, burst: int) -> TokenBucket | None:
            if rate <= 0:
                return None
            # A burst of 0 means one second's worth of the rate.
            burst = burst or math.ceil(rate)
            return TokenBucket(rate=rate, burst=burst, max_entries=entries, clock=clock)

        self.per_address = bucket(settings.check_rate_per_address, settings.check_burst_per_address)
        self.per_key = bucket(settings.check_rate_per_key, settings.check_burst_per_key)
        self.auth_failures = (
            FailureWindow(
                limit=settings.auth_failure_limit,
                window_seconds=settings.auth_failure_window_seconds,
                max_entries=entries,
                clock=clock,
            )
            if settings.auth_failure_limit > 0
            else None
        )
        self.trusted_proxies: Sequence[Network] = parse_networks(settings.trusted_proxies)
        # The few proxy addresses come back on every request: parse each once.
        self._trusted = functools.lru_cache(maxsize=4096)(self._is_trusted)
        #: Whether the check has any limit at all; if not, a check endpoint may skip the call.
        self.limits_checks = self.per_address is not None or self.per_key is not None
        self._private = functools.lru_cache(maxsize=4096)(self._is_private)
        self.clock = clock
        self._warned_at = -math.inf
        self._hinted_at = -math.inf

    # The client's address

    def client_address(self, scope: Scope) -> str:
        """The ASGI connection's peer, or, when that peer is a trusted proxy, the rightmost
        `X-Forwarded-For` entry that is not a trusted proxy itself."""
        return self.peer_address(scope.get("client"), scope["headers"])

    def peer_address(
        self, client: tuple[str, int] | None, headers: Sequence[tuple[bytes, bytes]]
    ) -> str:
        """`client_address` from a connection's peer and a request's headers (lowercased)."""
        peer: str = client[0] if client else ""
        if not self.trusted_proxies or not self._trusted(peer):
            return peer
        forwarded = [
            value.decode("latin-1") for name, value in headers if name == b"x-forwarded-for"
        ]
        return self._forwarded_client(peer, forwarded)

    def rsgi_client_address(self, scope: Any) -> str:
        """`client_address` for granian's RSGI scope (`client` is `host:port`)."""
        peer = scope.client.rpartition(":")[0].strip("[]")
        if not self.trusted_proxies or not self._trusted(peer):
            return str(peer)
        forwarded = [value for name, value in scope.headers.items() if name == "x-forwarded-for"]
        return self._forwarded_client(peer, forwarded)

    def _forwarded_client(self, peer: str, headers: list[str]) -> str:
        forwarded = [entry for header in headers for entry in header.split(",")]
        for entry in reversed(forwarded):
            hop = _without_port(entry.strip())
            if hop and not self._trusted(hop):
                return hop[:_MAX_ADDRESS]
        return peer

    def _is_trusted(self, address: str) -> bool:
        parsed = _parse(address)
        return parsed is not None and any(parsed in network for network in self.trusted_proxies)

    # The check: the one call a check endpoint makes before any other work

    def check(self, api_key: str | None, address: str) -> int | None:
        """None if this check may go on, else the seconds the client should wait (429)."""
        if self.per_address is not None:
            if self._unknown_proxy(address):
                # A private-network peer that is not a trusted proxy is almost always a load
                # balancer nobody told us about: limiting it would throttle the whole fleet
                # behind it as one client, silently (a device reads a 429 as "no update").
                self._hint(address)
            else:
                wait = self.per_address.take(address if ":" not in address else limit_key(address))
                if wait is not None:
                    self._warn(address)
                    return wait
        if self.per_key is not None and api_key:
            return self.per_key.take(api_key[:_MAX_ADDRESS])
        return None

    def _unknown_proxy(self, address: str) -> bool:
        """A private, loopback or link-local peer that is not a trusted proxy (or no peer)."""
        if not address:
            return True
        if ":" not in address and not address.startswith(_PRIVATE_PREFIXES):
            return False  # the common case, a public IPv4 client, without parsing
        return self._private(address) and not (self.trusted_proxies and self._trusted(address))

    @staticmethod
    def _is_private(address: str) -> bool:
        parsed = _parse(address)
        return parsed is not None and any(parsed in network for network in _PRIVATE_NETWORKS)

    def _hint(self, address: str) -> None:
        now = self.clock()
        if now - self._hinted_at >= _WARN_EVERY_SECONDS:
            self._hinted_at = now
            logger.warning(
                "checks from %s are not limited per address: it is a private address, most "
                "likely a load balancer or proxy; set KOOLBASE_OTA_TRUSTED_PROXIES to its "
                "address so that each device behind it is limited on its own",
                address[:_MAX_ADDRESS],
            )

    def _warn(self, address: str) -> None:
        # Behind a load balancer that is not trusted, every device shares its address and the
        # whole fleet is throttled as one client: say so, now and then, in the log.
        now = self.clock()
        if now - self._warned_at >= _WARN_EVERY_SECONDS:
            self._warned_at = now
            logger.warning(
                "throttling checks from %s; if that is your load balancer or proxy, set "
                "KOOLBASE_OTA_TRUSTED_PROXIES to its address",
                address[:_MAX_ADDRESS],
            )

    # Dashboard authentication

    def auth_begin(self, address: str) -> int | None:
        """None if `address` may try to authenticate (one attempt in flight until
        `auth_end`), else the seconds it must wait."""
        if self.auth_failures is None:
            return None
        return self.auth_failures.begin(limit_key(address))

    def auth_end(self, address: str, *, failed: bool) -> None:
        if self.auth_failures is not None:
            self.auth_failures.end(limit_key(address), failed=failed)
