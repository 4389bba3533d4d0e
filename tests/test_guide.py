"""docs/RELEASING.md's flow, run verbatim (but for the server's address) against a real server."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RunningServer
from tests.test_readme import run_doc_block

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "RELEASING.md"


@pytest.fixture(scope="module")
def server(server_factory: Callable[..., RunningServer]) -> RunningServer:
    """A server of its own, whose SQLite files no other test opens behind its back (see
    tests/test_cli_release.py); the CLI in the guide shares its database with it."""
    return server_factory()


def read(directory: Path, name: str) -> Any:
    return json.loads((directory / name).read_text())


@pytest.mark.skipif(shutil.which("curl") is None, reason="the guide uses curl")
def test_the_release_guide_runs_verbatim(server: RunningServer, tmp_path: Path) -> None:
    result = run_doc_block(GUIDE, "guide", server, tmp_path, timeout=300)
    out = result.stdout
    good, staged, release = (
        read(tmp_path, f"{name}.json") for name in ("good", "staged", "release")
    )
    # Targeting: the Android 2.4.1 test device is offered the staged bundle, the iOS one is not.
    offers = [json.loads(line) for line in out.splitlines() if line.startswith('{"has_update"')]
    assert offers[0]["has_update"] is True
    assert offers[0]["checksum"] == staged["checksum"]
    assert offers[1] == {"has_update": False}
    # The promoted copy: production's next version, same checksum, active at 10%.
    assert release["channel"] == "production"
    assert release["version"] == 2
    assert release["checksum"] == staged["checksum"]
    assert release["promoted_from"] == staged["id"]
    assert (release["active"], release["rollout_percentage"]) == (True, 10)
    # Ramping up: about 10%, about 50%, then every one of the 200 devices.
    counts = [
        int(n) for n in re.findall(r"^(\d+) of 200 devices are offered version 2$", out, re.M)
    ]
    assert len(counts) == 3
    assert 5 <= counts[0] <= 45
    assert counts[0] <= counts[1]
    assert 60 <= counts[1] <= 140
    assert counts[2] == 200
    # Watching: the checks are counted, and the audit trail shows the CLI's and the API's steps.
    assert 'route="/v1/sdk/ota/check"' in out
    assert "cli  bundle.update  " + release["id"] in out
    # Recall: back to v1, on both checks.
    rollback = read(tmp_path, "rollback.json")
    assert rollback["has_update"] is True
    assert rollback["rollback"] is True
    assert rollback["version"] == good["version"] == 1
    assert rollback["checksum"] == good["checksum"]
    assert read(tmp_path, "revert.json") == {"status": "rollback", "revert_to": 1}
    # Rolling forward: v1's content as version 3 reaches the device on the recalled version 2.
    rereleased = read(tmp_path, "rereleased.json")
    assert (rereleased["version"], rereleased["active"]) == (3, True)
    assert rereleased["promoted_from"] == good["id"]
    forward = read(tmp_path, "forward.json")
    assert (forward["version"], forward["checksum"]) == (3, good["checksum"])
    listing = out.strip().splitlines()[-3:]
    assert listing[0].startswith(f"{rereleased['id']}  production  v3  active 100%")
    assert listing[1].startswith(f"{release['id']}  production  v2  recalled")
    assert listing[2].startswith(f"{good['id']}  production  v1  released")
