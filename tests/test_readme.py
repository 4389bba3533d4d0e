"""The README's walk-through, run verbatim (but for the server's address) against a real server."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import RunningServer

README = Path(__file__).resolve().parent.parent / "README.md"


def doc_block(path: Path, marker: str) -> str:
    """The shell block between `<!-- {marker}:start -->` and `<!-- {marker}:end -->`."""
    pattern = rf"<!-- {marker}:start -->\n```bash\n(.*?)```\n<!-- {marker}:end -->"
    match = re.search(pattern, path.read_text(), re.S)
    assert match, f"{path.name} has no {marker} block"
    return match.group(1)


def run_doc_block(
    path: Path, marker: str, server: RunningServer, tmp_path: Path, *, timeout: float
) -> subprocess.CompletedProcess[str]:
    """A document's shell block, run verbatim (but for the server's address) from `tmp_path`."""
    script = doc_block(path, marker)
    assert script.startswith("OTA=http://127.0.0.1:8080\n")
    script = script.replace("OTA=http://127.0.0.1:8080", f"OTA={server.base_url}", 1)
    # The block runs from the checkout, where `make run` made .venv.
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))
    env = {k: v for k, v in os.environ.items() if not k.startswith("KOOLBASE_OTA_")}
    env.update(server.environment())
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, result.stderr + result.stdout
    return result


@pytest.mark.skipif(shutil.which("curl") is None, reason="the walk-through uses curl")
def test_readme_walkthrough_runs_verbatim(server: RunningServer, tmp_path: Path) -> None:
    result = run_doc_block(README, "walkthrough", server, tmp_path, timeout=120)
    assert "checksum OK" in result.stdout
    lines = result.stdout.strip().splitlines()
    assert lines[-2] == "204"
    assert json.loads(lines[-1]) == {"has_update": False}
    bundle = json.loads((tmp_path / "bundle.json").read_text())
    assert bundle["version"] == 1
    assert bundle["release_notes"] == "Updated banner and config"
    check = json.loads((tmp_path / "check.json").read_text())
    assert check["has_update"] is True
    assert check["checksum"] == bundle["checksum"]
    # The file with the dashboard token is the reader's alone.
    assert (tmp_path / "my-app.json").stat().st_mode & 0o777 == 0o600
