"""Server workers reuse freed buffers instead of faulting in fresh pages for each (glibc)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from koolbase_ota import app, rsgi
from koolbase_ota.allocator import (
    MMAP_THRESHOLD_BYTES,
    OPERATOR_VARIABLES,
    TRIM_THRESHOLD_BYTES,
)

#: Blocks of 1 MiB, four at a time, freed and made again: what an upload's buffers do.
CHURN = """
import resource, sys
from koolbase_ota.allocator import reuse_freed_memory
tuned = reuse_freed_memory()
data = bytes(range(256)) * 4096 * 4
MIB = 1024 * 1024
def churn():
    for _ in range(50):
        held = [data[k * MIB : (k + 1) * MIB] for k in range(4)]
        del held
churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn()
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

GLIBC = (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")


def churn(**env: str) -> tuple[bool, int]:
    """(whether the thresholds were set, page faults while 200 MiB of blocks come and go)."""
    clean = {k: v for k, v in os.environ.items() if k not in OPERATOR_VARIABLES}
    clean.pop("GLIBC_TUNABLES", None)
    result = subprocess.run(
        [sys.executable, "-c", CHURN],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    tuned, faults = result.stdout.split()
    return tuned == "True", int(faults)


@pytest.mark.skipif(not GLIBC, reason="the thresholds are glibc's")
def test_freed_blocks_are_reused_without_page_faults() -> None:
    tuned, faults = churn()
    assert tuned
    # 200 MiB of blocks is 51,200 pages: glibc's defaults fault in nearly every one.
    _, untuned = churn(MALLOC_TRIM_THRESHOLD_="131072", MALLOC_MMAP_THRESHOLD_="131072")
    assert untuned > 20_000
    assert faults < 1_000


@pytest.mark.skipif(not GLIBC, reason="the thresholds are glibc's")
@pytest.mark.parametrize(
    "env",
    [
        {"MALLOC_TRIM_THRESHOLD_": "131072"},
        {"MALLOC_MMAP_THRESHOLD_": "131072"},
        {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"},
        {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0:glibc.malloc.mmap_threshold=131072"},
    ],
)
def test_the_operators_thresholds_win(env: dict[str, str]) -> None:
    tuned, _ = churn(**env)
    assert not tuned


@pytest.mark.skipif(not GLIBC, reason="the thresholds are glibc's")
def test_other_allocator_settings_leave_ours_in_place() -> None:
    """MALLOC_ARENA_MAX, common in container images, is about arenas, not these thresholds."""
    tuned, faults = churn(MALLOC_ARENA_MAX="2")
    assert tuned
    assert faults < 1_000


@pytest.mark.parametrize("entry", [app.create_app_from_env, rsgi.create_rsgi_app_from_env])
def test_each_server_worker_sets_them(
    entry: Callable[[], object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both entry points `serve` hands its workers (uvicorn and granian) set them first."""
    called: list[str] = []

    class Stop(Exception):
        pass

    def settings() -> None:
        raise Stop  # the app itself is not needed

    def recording(where: str) -> Callable[[], bool]:
        def reuse_freed_memory() -> bool:
            called.append(where)
            return True

        return reuse_freed_memory

    monkeypatch.setattr(app, "reuse_freed_memory", recording("app"))
    monkeypatch.setattr(rsgi, "reuse_freed_memory", recording("rsgi"))
    monkeypatch.setattr(app, "Settings", settings)
    monkeypatch.setattr(rsgi, "Settings", settings)
    with pytest.raises(Stop):
        entry()
    assert len(called) == 1


def test_the_deployment_guide_gives_the_thresholds_set() -> None:
    guide = (Path(__file__).resolve().parent.parent / "docs" / "DEPLOYMENT.md").read_text()
    mib = 1024 * 1024
    assert f"mmap threshold to {MMAP_THRESHOLD_BYTES // mib} MiB" in guide
    assert f"trim threshold to {TRIM_THRESHOLD_BYTES // mib} MiB" in guide
    for name in OPERATOR_VARIABLES:
        assert name in guide
