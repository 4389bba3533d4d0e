"""Uploads: memory under 4 concurrent 50 MiB uploads, and one upload's time against a reference.

Targets (issue 4): with 4 concurrent 50 MiB uploads the server's peak resident memory grows by
at most 64 MiB over idle; one 50 MiB upload takes at most 2 times as long as hashing and
writing the same bytes locally (embedded default) or putting them with the store client
directly (S3, ``--s3``: a private SeaweedFS), measured side by side. Run from the repository
root:

    .venv/bin/python bench/upload.py [--workers 2] [--runs 3] [--s3]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import os
import statistics
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import common
import httpx

MEMORY_TARGET_MIB = 64
TIME_TARGET = 2.0
BUNDLE_BYTES = 50 * common.MIB
MAX_BUNDLE_BYTES = 60 * common.MIB
CONCURRENT = 4
CHUNK = common.MIB
S3_PREFIX = "bench"


# --------------------------------------------------------------------------------------------
# memory


@dataclass
class RssSampler:
    """Samples VmRSS of ``pids`` every ``interval`` seconds in a thread; keeps the peaks."""

    pids: list[int]
    interval: float = 0.02
    peak_total_kib: int = 0
    peak_kib: dict[int, int] = field(default_factory=dict)
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def sample(self) -> None:
        """Take one sample now."""
        values = {pid: common.rss_kib(pid) for pid in self.pids}
        self.samples += 1
        self.peak_total_kib = max(self.peak_total_kib, sum(values.values()))
        for pid, value in values.items():
            self.peak_kib[pid] = max(self.peak_kib.get(pid, 0), value)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()


def sample_for(pids: list[int], seconds: float) -> RssSampler:
    """Peaks over ``seconds`` of sampling while nothing else happens."""
    with RssSampler(pids) as sampler:
        time.sleep(seconds)
    return sampler


# --------------------------------------------------------------------------------------------
# uploads and references


def build_bundle(path: Path, size: int) -> None:
    """A zip of ``size`` random bytes, stored uncompressed so validation checks every byte."""
    with (
        zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive,
        archive.open("assets/random.bin", "w") as entry,
    ):
        left = size
        while left:
            chunk = os.urandom(min(CHUNK, left))
            entry.write(chunk)
            left -= len(chunk)


@dataclass
class Uploader:
    """Uploads bundles to one project of a running server."""

    server: common.OtaServer
    project: common.Project

    def upload(self, bundle: Path, client: httpx.Client) -> float:
        """Upload ``bundle`` as a streamed multipart form; return the seconds it took."""
        url = f"{self.server.base_url}/v1/projects/{self.project.project_id}/ota/upload"
        began = time.perf_counter()
        with open(bundle, "rb") as handle:
            response = client.post(
                url,
                headers={"Authorization": f"Bearer {self.project.dashboard_token}"},
                files={"bundle": (bundle.name, handle, "application/zip")},
                data={"channel": "production", "mandatory": "false", "release_notes": "bench"},
            )
        elapsed = time.perf_counter() - began
        if response.status_code != 201:
            raise common.BenchError(f"upload answered {response.status_code}: {response.text}")
        return elapsed


def local_reference(bundle: Path, directory: Path) -> float:
    """Seconds to hash (SHA-256) the bundle and write it to ``directory`` with fsync."""
    target = directory / "reference.bin"
    began = time.perf_counter()
    digest = hashlib.sha256()
    with open(bundle, "rb") as source, open(target, "wb") as sink:
        while chunk := source.read(CHUNK):
            digest.update(chunk)
            sink.write(chunk)
        sink.flush()
        os.fsync(sink.fileno())
    digest.hexdigest()
    elapsed = time.perf_counter() - began
    target.unlink()
    return elapsed


def s3_reference(config: dict[str, object]) -> Callable[[Path, int], float]:
    """A reference that puts the bundle with obstore on the server's S3 store configuration,
    with obstore's own defaults for parts (up to 12 in flight): a client's fastest plain put."""
    import obstore
    from obstore.store import S3Store

    store = S3Store(**config)  # type: ignore[arg-type]

    def put(bundle: Path, run: int) -> float:
        key = f"reference/{run}.zip"
        began = time.perf_counter()
        with open(bundle, "rb") as handle:
            obstore.put(
                store,
                key,
                handle,
                attributes={"Content-Type": "application/zip"},
            )
        elapsed = time.perf_counter() - began
        obstore.delete(store, key)
        return elapsed

    return put


# --------------------------------------------------------------------------------------------
# the two measurements


def measure_memory(uploader: Uploader, bundle: Path) -> bool:
    """4 concurrent uploads; print idle and peak RSS; True when growth <= the target."""
    pids = uploader.server.pids()
    idle = sample_for(pids, 1.0)
    clients = [httpx.Client(timeout=300) for _ in range(CONCURRENT)]
    try:
        with RssSampler(pids) as busy, ThreadPoolExecutor(CONCURRENT) as pool:
            began = time.perf_counter()
            seconds = list(pool.map(lambda client: uploader.upload(bundle, client), clients))
            wall = time.perf_counter() - began
    finally:
        for client in clients:
            client.close()
    growth_mib = (busy.peak_total_kib - idle.peak_total_kib) / 1024
    print(
        f"\n{CONCURRENT} concurrent uploads of {bundle.stat().st_size / common.MIB:.1f} MiB: "
        f"{wall:.2f} s wall, each {', '.join(f'{s:.2f}' for s in seconds)} s "
        f"({busy.samples} RSS samples, every {busy.interval * 1000:.0f} ms)"
    )
    for pid in pids:
        print(
            f"  pid {pid:>7}: idle {idle.peak_kib.get(pid, 0) / 1024:7.1f} MiB, "
            f"peak {busy.peak_kib.get(pid, 0) / 1024:7.1f} MiB  {common.cmdline(pid)[:60]}"
        )
    ok = growth_mib <= MEMORY_TARGET_MIB
    print(
        f"  sum    : idle {idle.peak_total_kib / 1024:7.1f} MiB, "
        f"peak {busy.peak_total_kib / 1024:7.1f} MiB, growth {growth_mib:.1f} MiB "
        f"(target <= {MEMORY_TARGET_MIB} MiB)  {common.verdict(ok)}"
    )
    return ok


def measure_time(
    uploader: Uploader, bundle: Path, reference: Callable[[Path, int], float], name: str, runs: int
) -> bool:
    """One upload at a time against the reference, interleaved; True when the ratio <= 2."""
    uploads: list[float] = []
    references: list[float] = []
    with httpx.Client(timeout=300) as client:
        uploader.upload(bundle, client)  # warm-up: first-use imports, connection, caches
        reference(bundle, -1)
        for run in range(runs):
            uploads.append(uploader.upload(bundle, client))
            references.append(reference(bundle, run))
    upload_s, reference_s = statistics.median(uploads), statistics.median(references)
    ratio = upload_s / reference_s
    ok = ratio <= TIME_TARGET
    print(f"\none upload vs {name}, median of {runs} (after one warm-up each)")
    print(f"  upload     {upload_s:6.3f} s  runs {', '.join(f'{s:.3f}' for s in uploads)}")
    print(f"  reference  {reference_s:6.3f} s  runs {', '.join(f'{s:.3f}' for s in references)}")
    print(f"  ratio {ratio:.2f} (target <= {TIME_TARGET})  {common.verdict(ok)}")
    return ok


# --------------------------------------------------------------------------------------------
# modes


@contextlib.contextmanager
def embedded(workers: int) -> Iterator[tuple[common.OtaServer, Callable[[Path, int], float], str]]:
    """The embedded default: SQLite and bundles on local disk."""
    extra = {"KOOLBASE_OTA_MAX_BUNDLE_BYTES": str(MAX_BUNDLE_BYTES)}
    with common.ota_server(workers=workers, extra_env=extra) as server:

        def reference(bundle: Path, run: int) -> float:
            # The same filesystem as the server's bundle directory.
            return local_reference(bundle, server.data_dir)

        yield server, reference, "sha256 + write + fsync on the same filesystem"


@contextlib.contextmanager
def with_s3(workers: int) -> Iterator[tuple[common.OtaServer, Callable[[Path, int], float], str]]:
    """SQLite for metadata and a private SeaweedFS for the bundles."""
    common.repo_on_path()
    from tests.services import SeaweedService

    with SeaweedService() as seaweed:
        extra = {
            "KOOLBASE_OTA_MAX_BUNDLE_BYTES": str(MAX_BUNDLE_BYTES),
            "KOOLBASE_OTA_STORAGE_URL": f"s3://{seaweed.bucket}/{S3_PREFIX}",
            "KOOLBASE_OTA_S3_ENDPOINT": seaweed.endpoint,
            "KOOLBASE_OTA_S3_REGION": seaweed.region,
            "AWS_ACCESS_KEY_ID": seaweed.access_key,
            "AWS_SECRET_ACCESS_KEY": seaweed.secret_key,
        }
        # What koolbase_ota.storage.s3.S3BundleStore builds from those settings.
        config: dict[str, object] = {
            "bucket": seaweed.bucket,
            "prefix": f"{S3_PREFIX}-reference",
            "endpoint": seaweed.endpoint,
            "region": seaweed.region,
            "access_key_id": seaweed.access_key,
            "secret_access_key": seaweed.secret_key,
            "virtual_hosted_style_request": False,
            "client_options": {
                "timeout": dt.timedelta(seconds=10),
                "connect_timeout": dt.timedelta(seconds=5),
                "allow_http": True,
            },
            "retry_config": {"max_retries": 2, "retry_timeout": dt.timedelta(seconds=10)},
        }
        with common.ota_server(workers=workers, extra_env=extra) as server:
            yield server, s3_reference(config), "obstore.put to the same SeaweedFS"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="server worker processes")
    parser.add_argument("--runs", type=int, default=3, help="timed uploads (the median counts)")
    parser.add_argument("--s3", action="store_true", help="store bundles in a private SeaweedFS")
    args = parser.parse_args()
    print(common.machine_line())
    mode = with_s3 if args.s3 else embedded
    print(f"mode: {'S3 (SeaweedFS) + SQLite' if args.s3 else 'embedded default'}")
    with tempfile.TemporaryDirectory(prefix="koolbase-bench-files-") as tmp:
        bundle = Path(tmp) / "bundle50.zip"
        build_bundle(bundle, BUNDLE_BYTES)
        with mode(args.workers) as (server, reference, name):
            print(f"server: {server.describe()}")
            uploader = Uploader(server, server.create_project("bench-upload"))
            memory_ok = measure_memory(uploader, bundle)
            time_ok = measure_time(uploader, bundle, reference, name, args.runs)
    print(f"\noverall: {common.verdict(memory_ok and time_ok)}")
    return 0 if memory_ok and time_ok else 1


if __name__ == "__main__":
    sys.exit(main())
