"""STYLE.md: services "raise domain errors and never import the web framework". The cursor
code the services share (`koolbase_ota.paging`) once held the page headers too, with FastAPI's
`Request` and `Response`, so every service that pages loaded FastAPI and Starlette."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "module",
    ["koolbase_ota.audit", "koolbase_ota.bundles.service", "koolbase_ota.projects.service"],
)
def test_a_service_does_not_import_the_web_framework(module: str) -> None:
    probe = (
        f"import sys, {module}\n"
        "print(sorted({name.split('.')[0] for name in sys.modules}"
        " & {'fastapi', 'starlette'}))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert loaded.stdout.strip() == "[]", (module, loaded.stdout)
