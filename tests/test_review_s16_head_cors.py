"""Review s16: HEAD of a dashboard read from a configured browser origin.

f34e278 made every GET route answer HEAD. A browser's HEAD with `Authorization` is preceded by
a CORS preflight naming HEAD; CORSMiddleware is configured with GET, POST, PATCH and DELETE
only (app.py), so the preflight is refused with 400 "Disallowed CORS method" and the browser
never sends the HEAD, while the same preflight for GET is 200.
"""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.conftest import new_project, start_server

DASHBOARD = "https://dash.example"


def test_a_cors_preflight_for_head_is_allowed_as_for_get(tmp_path: Path) -> None:
    server = start_server(tmp_path / "data", cors_origins=DASHBOARD)
    try:
        project = new_project(server.db)
        with httpx.Client(base_url=server.base_url, timeout=30) as http:

            def preflight(method: str) -> httpx.Response:
                return http.options(
                    project.path("/bundles"),
                    headers={
                        "Origin": DASHBOARD,
                        "Access-Control-Request-Method": method,
                        "Access-Control-Request-Headers": "authorization",
                    },
                )

            get = preflight("GET")
            head = preflight("HEAD")
            actual = http.head(
                project.path("/bundles"), headers={**project.auth, "Origin": DASHBOARD}
            )
    finally:
        server.stop()
    assert get.status_code == 200, get.text
    assert actual.status_code == 200  # the HEAD itself is answered ...
    assert head.status_code == 200, head.text  # ... but a browser is never allowed to send it


def test_a_refused_cors_preflight_is_a_json_error(tmp_path: Path) -> None:
    """Starlette answered a refused preflight with plain text ("Disallowed CORS origin"); every
    error here is JSON (found comparing the interfaces, helper-41)."""
    server = start_server(tmp_path / "data", cors_origins=DASHBOARD)
    try:
        project = new_project(server.db)
        with httpx.Client(base_url=server.base_url, timeout=30) as http:

            def preflight(origin: str, headers: str) -> httpx.Response:
                return http.options(
                    project.path("/bundles"),
                    headers={
                        "Origin": origin,
                        "Access-Control-Request-Method": "GET",
                        "Access-Control-Request-Headers": headers,
                    },
                )

            allowed = preflight(DASHBOARD, "authorization")
            other_origin = preflight("https://elsewhere.example", "authorization")
            other_header = preflight(DASHBOARD, "x-api-key")
    finally:
        server.stop()
    assert allowed.status_code == 200, allowed.text
    for refused, what in [(other_origin, "origin"), (other_header, "headers")]:
        assert refused.status_code == 400
        assert refused.headers["content-type"] == "application/json"
        assert refused.json() == {
            "error": f"CORS preflight refused: {what} not allowed",
            "code": "cors_refused",
        }
        assert refused.headers["access-control-allow-methods"]  # still a preflight answer
