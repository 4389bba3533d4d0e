"""`koolbase-ota move --jobs N` copies N bundle files at once (one after another, a large
install kept every server stopped for hours); after a failure, none starts and those under way
finish whole, for a rerun to read back."""

from __future__ import annotations

import asyncio
from pathlib import Path

import anyio
import pytest

from koolbase_ota.cli import DEFAULT_MOVE_JOBS
from koolbase_ota.storage import BundleStore
from koolbase_ota.storage.local import LocalStore
from koolbase_ota.transfer import MoveError, move_install
from tests.test_cli import run_cli
from tests.test_move_readback import embedded_install
from tests.test_move_safety import Target, target

__all__ = ["target"]

#: How long a copy waits for the one it expects to run beside it before the test fails.
OVERLAP_SECONDS = 30


class Overlapping:
    """The real target store, each put waiting until `together` puts are under way at once:
    copies made one after another never get there, and fail the test."""

    def __init__(self, store: BundleStore, together: int) -> None:
        self.store = store
        self.together = together
        self.under_way = 0
        self.most = 0
        self.all_there = anyio.Event()

    async def put_file(self, key: str, source: Path) -> None:
        self.under_way += 1
        self.most = max(self.most, self.under_way)
        if self.under_way >= self.together:
            self.all_there.set()
        try:
            with anyio.fail_after(OVERLAP_SECONDS):
                await self.all_there.wait()
            await self.store.put_file(key, source)
        finally:
            self.under_way -= 1

    async def checksum(self, key: str) -> str:
        return await self.store.checksum(key)


def test_files_are_copied_jobs_at_a_time(tmp_path: Path, target: Target) -> None:
    source, bundles = embedded_install(tmp_path / "embedded", 6)
    store = Overlapping(target.store, together=DEFAULT_MOVE_JOBS)
    try:
        report = asyncio.run(
            move_install(
                source_db=source.db,
                source_store=source.store,
                target_db=target.db,
                target_store=store,  # type: ignore[arg-type]
                jobs=DEFAULT_MOVE_JOBS,
            )
        )
    finally:
        source.db.dispose()
    assert store.most == DEFAULT_MOVE_JOBS
    assert report.objects_copied == report.objects_verified == 6
    assert target.count("bundles") == 6
    for bundle in bundles:
        stored = asyncio.run(target.store.checksum(bundle["storage_path"]))
        assert stored == bundle["checksum"]


class SaysWhenChecked(LocalStore):
    """The source's store, saying when it has read a given file (the damaged one)."""

    watched = ""
    checked: anyio.Event

    async def checksum(self, key: str) -> str:
        try:
            return await super().checksum(key)
        finally:
            if key == self.watched:
                self.checked.set()


class WaitsFor:
    """The real target store; the put of `key` waits until `event` is set."""

    def __init__(self, store: BundleStore, key: str, event: anyio.Event) -> None:
        self.store = store
        self.key = key
        self.event = event
        self.put: list[str] = []

    async def put_file(self, key: str, source: Path) -> None:
        if key == self.key:
            with anyio.fail_after(OVERLAP_SECONDS):
                await self.event.wait()
        self.put.append(key)
        await self.store.put_file(key, source)

    async def checksum(self, key: str) -> str:
        return await self.store.checksum(key)


def test_after_a_failure_copies_under_way_finish_and_no_other_starts(
    tmp_path: Path, target: Target
) -> None:
    data_dir = tmp_path / "embedded"
    source, bundles = embedded_install(data_dir, 3)
    first, damaged, last = sorted(bundle["storage_path"] for bundle in bundles)
    (data_dir / "bundles" / damaged).write_bytes(b"damaged")

    async def move() -> None:
        checked = anyio.Event()
        source_store = SaysWhenChecked(
            source.store.root,  # type: ignore[attr-defined]
            public_url="http://127.0.0.1:1",
            secret_key="k" * 32,
        )
        source_store.watched, source_store.checked = damaged, checked
        # The first file's copy is under way when the damaged one is found.
        store = WaitsFor(target.store, first, checked)
        try:
            await move_install(
                source_db=source.db,
                source_store=source_store,
                target_db=target.db,
                target_store=store,  # type: ignore[arg-type]
                jobs=2,
            )
        finally:
            assert store.put == [first]

    try:
        with pytest.raises(MoveError, match="does not match its checksum"):
            asyncio.run(move())
    finally:
        source.db.dispose()
    assert asyncio.run(target.store.exists(first))
    assert asyncio.run(target.store.checksum(first)) == next(
        b["checksum"] for b in bundles if b["storage_path"] == first
    )
    assert not asyncio.run(target.store.exists(last))
    assert target.count("bundles") == 0


def test_jobs_out_of_range_is_a_usage_error(tmp_path: Path, target: Target) -> None:
    args, env = target.move_command(tmp_path)
    for jobs in ("0", "33", "four"):
        result = run_cli(tmp_path, *args, "--jobs", jobs, env=env)
        assert result.returncode == 2
        assert "--jobs" in result.stderr
