"""Downloads on the embedded default against nginx serving the same file, in one run.

Target (issue 4): downloads use zero-copy file sending and reach at least half of nginx's
throughput on the same file, ranges included. Run from the repository root:

    .venv/bin/python bench/download.py [--seconds 10] [--workers 2]
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import common
import httpx

TARGET = 0.5
BUNDLE_BYTES = 5 * common.MIB
RANGE = "bytes=1000000-1999999"
RANGE_LENGTH = 1_000_000
WRK_TIMEOUT = 30


@dataclass
class Case:
    """One kind of request, sent to both servers."""

    name: str
    headers: tuple[str, ...]
    status: int
    length: int


def build_bundle(path: Path, size: int) -> None:
    """A zip holding ``size`` random bytes, stored uncompressed (so it is about ``size``)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("assets/random.bin", os.urandom(size - 200))


def publish(server: common.OtaServer, bundle: Path) -> str:
    """Upload and activate ``bundle``; return the signed download URL the check hands out."""
    project = server.create_project("bench-download")
    auth = {"Authorization": f"Bearer {project.dashboard_token}"}
    api = f"{server.base_url}/v1/projects/{project.project_id}/ota"
    with httpx.Client(timeout=120) as client, open(bundle, "rb") as handle:
        uploaded = client.post(
            f"{api}/upload",
            headers=auth,
            files={"bundle": (bundle.name, handle, "application/zip")},
            data={"channel": "production", "mandatory": "false", "release_notes": "bench"},
        )
        uploaded.raise_for_status()
        client.post(f"{api}/bundles/{uploaded.json()['id']}/activate", headers=auth)
        check = client.get(
            f"{server.base_url}/v1/sdk/ota/check",
            params={"channel": "production", "version": "0"},
            headers={"x-api-key": project.public_keys["production"]},
        )
        check.raise_for_status()
        answer = check.json()
        if not answer.get("has_update"):
            raise common.BenchError(f"the check offers nothing: {answer}")
        return str(answer["download_url"])


def verify(url: str, case: Case, expected: bytes) -> dict[str, str]:
    """One request of ``case``: right status and bytes; returns the response headers."""
    headers = dict(header.split(": ", 1) for header in case.headers)
    with httpx.Client(timeout=60) as client:
        response = client.get(url, headers=headers)
    if response.status_code != case.status or len(response.content) != case.length:
        raise common.BenchError(
            f"{case.name} on {url}: {response.status_code}, {len(response.content)} bytes; "
            f"expected {case.status}, {case.length} bytes"
        )
    start = 1_000_000 if case.headers else 0
    if response.content != expected[start : start + case.length]:
        raise common.BenchError(f"{case.name} on {url}: the bytes differ from the file")
    return dict(response.headers)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10, help="length of each wrk run")
    parser.add_argument("--workers", type=int, default=2, help="server worker processes")
    parser.add_argument(
        "--timeout",
        type=int,
        default=WRK_TIMEOUT,
        help="wrk's per-request timeout in seconds (its default of 2 s is shorter than one "
        "5 MiB response takes when 64 of them share the loopback)",
    )
    args = parser.parse_args()
    common.require_nginx_and_wrk()
    print(common.machine_line())
    cases = [
        Case("full GET", (), 200, BUNDLE_BYTES),
        Case("range 1 MB", (f"Range: {RANGE}",), 206, RANGE_LENGTH),
    ]
    results: list[tuple[Case, common.WrkResult, common.WrkResult]] = []
    with tempfile.TemporaryDirectory(prefix="koolbase-bench-files-") as tmp:
        bundle = Path(tmp) / "bundle.zip"
        build_bundle(bundle, BUNDLE_BYTES)
        data = bundle.read_bytes()
        cases[0].length = len(data)
        root = Path(tmp) / "www"
        root.mkdir()
        shutil.copyfile(bundle, root / "bundle.zip")
        print(f"bundle: {len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()[:16]}...")
        with (
            common.ota_server(workers=args.workers) as server,
            common.nginx_server(root, default_type="application/zip") as nginx,
        ):
            ours_url = publish(server, bundle)
            nginx_url = f"{nginx.base_url}/bundle.zip"
            print(f"server: {server.describe()}")
            for case in cases:
                got = verify(ours_url, case, data)
                verify(nginx_url, case, data)
                print(f"{case.name}: ours answers {case.status} with {sorted(got)}")
            for case in cases:
                wrk = functools.partial(
                    common.run_wrk,
                    seconds=args.seconds,
                    headers=case.headers,
                    timeout_seconds=args.timeout,
                )
                command = common.wrk_command(
                    seconds=args.seconds, headers=case.headers, timeout_seconds=args.timeout
                )
                print(f"\n{case.name}: {command}")
                ours = wrk(ours_url)
                print(f"  ours  {ours.summary()}")
                reference = wrk(nginx_url)
                print(f"  nginx {reference.summary()}")
                results.append((case, ours, reference))
    print(f"\nsummary (target: ours/nginx >= {TARGET} requests/s, no errors)")
    all_ok = True
    for case, ours, reference in results:
        ratio = ours.requests_per_second / reference.requests_per_second
        ok = ratio >= TARGET and ours.errors == 0
        all_ok &= ok
        print(
            f"  {case.name:11} ours {ours.requests_per_second:8.0f} req/s "
            f"{ours.mib_per_second:7.0f} MiB/s | nginx {reference.requests_per_second:8.0f} req/s "
            f"{reference.mib_per_second:7.0f} MiB/s | ratio {ratio:.2f} "
            f"errors {ours.errors}/{reference.errors}  {common.verdict(ok)}"
        )
    print(f"overall: {common.verdict(all_ok)}")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
