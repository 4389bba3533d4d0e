"""Prometheus metrics, defined once per process and shared by the modules that count."""

from __future__ import annotations

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
UPLOADS = Counter("koolbase_ota_uploads_total", "Bundle uploads by outcome.", ["result"])
UPLOAD_BYTES = Counter("koolbase_ota_upload_bytes_total", "Bytes of bundles stored.")
ERRORS = Counter("koolbase_ota_errors_total", "Error answers by code.", ["code"])
