"""The API describes itself: OpenAPI at /openapi.json and interactive docs at /docs."""

from __future__ import annotations

import httpx


def test_openapi_lists_every_endpoint(client: httpx.Client) -> None:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    spec = response.json()
    paths = spec["paths"]
    assert set(paths["/v1/projects/{project_id}/ota/upload"]) == {"post"}
    assert set(paths["/v1/projects/{project_id}/ota/bundles"]) == {"get"}
    assert set(paths["/v1/projects/{project_id}/ota/bundles/{bundle_id}/activate"]) == {"post"}
    assert set(paths["/v1/projects/{project_id}/ota/bundles/{bundle_id}"]) == {"patch", "delete"}
    assert set(paths["/v1/sdk/ota/check"]) == {"get"}
    upload = paths["/v1/projects/{project_id}/ota/upload"]["post"]
    form = upload["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["required"] == ["bundle"]
    schemes = spec["components"]["securitySchemes"]
    assert schemes["APIKeyHeader"]["name"] == "x-api-key"
    assert schemes["HTTPBearer"]["scheme"] == "bearer"


def test_docs_page_is_served(client: httpx.Client) -> None:
    response = client.get("/docs")
    assert response.status_code == 200
    assert "text/html" in response.headers["content-type"]
    assert "/openapi.json" in response.text
