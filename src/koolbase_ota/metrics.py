"""Prometheus metrics, defined once per process and shared by the modules that count."""

from __future__ import annotations

import bisect

from prometheus_client import Counter, Histogram

REQUESTS = Counter(
    "koolbase_ota_requests_total", "HTTP requests answered.", ["method", "route", "status"]
)
LATENCY = Histogram(
    "koolbase_ota_request_duration_seconds",
    "Time to answer an HTTP request.",
    ["method", "route"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
CHECK_CACHE = Counter(
    "koolbase_ota_check_cache_total", "Update checks by cache outcome.", ["result"]
)
#: The scope's entry holding when (`time.perf_counter()`) a request passed on to the app was
#: received in front of it, where it may have waited for the database already: the app's
#: metrics time it from then.
RECEIVED = "koolbase_ota.received"
CHECK_LOOKUPS = Counter(
    "koolbase_ota_check_lookups_total",
    "Database reads of the checks' cache (kind: key, channel, download, ping) by outcome:"
    " loaded, failed, or abandoned (every request awaiting it gave up before it ran).",
    ["kind", "result"],
)
UPLOADS = Counter("koolbase_ota_uploads_total", "Bundle uploads by outcome.", ["result"])
UPLOAD_BYTES = Counter("koolbase_ota_upload_bytes_total", "Bytes of bundles stored.")
ERRORS = Counter("koolbase_ota_errors_total", "Error answers by code.", ["code"])


class RouteTally:
    """A hot route's per-request counts in plain integers, pushed to Prometheus in batches.

    Every prometheus_client update takes a lock and walks label maps; at tens of thousands of
    checks a second per process that was a fifth of the check's cost (and the download's
    counters a twentieth of a range download's Python time). The route counts here and `flush()`
    (called by the cache's refresh loop and by /metrics) adds the totals.
    """

    def __init__(self, route: str) -> None:
        self.route = route
        self.statuses: dict[int, int] = {}
        self.errors: dict[str, int] = {}
        self.hits = 0
        self.misses = 0
        self._bounds = list(LATENCY._upper_bounds)
        self._buckets = [0] * len(self._bounds)
        self._seconds = 0.0

    def record(
        self, status: int, seconds: float, *, hit: bool | None = None, error: str | None = None
    ) -> None:
        """`hit`: the check cache's outcome, None for a route that has none."""
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if error is not None:
            self.errors[error] = self.errors.get(error, 0) + 1
        if hit:
            self.hits += 1
        elif hit is not None:
            self.misses += 1
        self._buckets[bisect.bisect_left(self._bounds, seconds)] += 1
        self._seconds += seconds

    def flush(self) -> None:
        statuses, self.statuses = self.statuses, {}
        errors, self.errors = self.errors, {}
        buckets, self._buckets = self._buckets, [0] * len(self._bounds)
        seconds, self._seconds = self._seconds, 0.0
        hits, misses, self.hits, self.misses = self.hits, self.misses, 0, 0
        for status, count in statuses.items():
            REQUESTS.labels("GET", self.route, str(status)).inc(count)
        for code, count in errors.items():
            ERRORS.labels(code).inc(count)
        if hits:
            CHECK_CACHE.labels("hit").inc(hits)
        if misses:
            CHECK_CACHE.labels("miss").inc(misses)
        if any(buckets):
            # A histogram has no public way to add many observations at once; its buckets and
            # sum are plain value objects, stable across prometheus_client releases.
            child = LATENCY.labels("GET", self.route)
            for index, count in enumerate(buckets):
                if count:
                    child._buckets[index].inc(count)
            child._sum.inc(seconds)
