"""How the cost of the check, the list and an upload grows with bundles and projects.

Target (issue 4): with 1k and 10k bundles in a project and with 1k projects, the check stays
flat and the list grows linearly (a page of the paginated list stays flat). Each size gets a
fresh data dir, seeded straight into SQLite, and a real `koolbase-ota serve` of its own; all of
them run at once and are timed in turn over HTTP with sequential keep-alive requests, so that
the other load on the machine falls on every size alike. Run from the repository root:

    .venv/bin/python bench/growth.py [--checks 200] [--lists 20] [--uploads 10]
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import io
import os
import statistics
import sys
import tempfile
import time
import uuid
import zipfile
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import common
import httpx
from sqlalchemy import Table, update

from koolbase_ota.bundles.service import encode_cursor, storage_path
from koolbase_ota.config import CHANNELS, Settings
from koolbase_ota.db import Base, Database, create_db_engine, upgrade_schema
from koolbase_ota.projects import service as projects
from koolbase_ota.projects.models import Channel

CHECK_FLAT = 1.5  # the check's median at any size is at most this times the baseline's
PAGE_FLAT = 1.5  # a deep page at 10k bundles costs at most this times one at 1k
LINEAR = (5.0, 15.0)  # the whole list at 10k bundles costs 5-15 times what it costs at 1k
PAGE_SIZE = 100
WARM_UP = 20


@dataclass(frozen=True)
class Scenario:
    """One data set: the measured project's bundles, plus other projects of `others_bundles`."""

    name: str
    bundles: int
    other_projects: int = 0
    others_bundles: int = 0

    @property
    def total_bundles(self) -> int:
        return self.bundles + self.other_projects * self.others_bundles


SCENARIOS = (
    Scenario("baseline", bundles=10),
    Scenario("1k bundles", bundles=1_000),
    Scenario("10k bundles", bundles=10_000),
    Scenario("1k projects", bundles=10, other_projects=999, others_bundles=10),
)


@dataclass
class Result:
    scenario: Scenario
    seed_seconds: float
    list_bytes: int = 0
    timings: dict[str, list[float]] = field(default_factory=dict)  # milliseconds per request

    def median(self, what: str) -> float:
        return statistics.median(self.timings[what])

    def p95(self, what: str) -> float:
        values = sorted(self.timings[what])
        return values[min(len(values) - 1, round(0.95 * (len(values) - 1)))]


# --------------------------------------------------------------------------------------------
# seeding, straight into the database


def _table(name: str) -> Table:
    return Base.metadata.tables[name]


def bundle_rows(project_id: uuid.UUID, count: int, now: dt.datetime) -> list[dict[str, Any]]:
    """`count` bundles spread over the channels, each once released, every tenth mandatory."""
    rows: list[dict[str, Any]] = []
    last = dict.fromkeys(CHANNELS, 0)
    for index in range(count):
        channel = CHANNELS[index % len(CHANNELS)]
        last[channel] += 1
        version = last[channel]
        path = storage_path(project_id=project_id, channel=channel, version=version)
        rows.append(
            {
                "id": uuid.uuid4(),
                "project_id": project_id,
                "channel": channel,
                "version": version,
                "checksum": "sha256:" + hashlib.sha256(path.encode()).hexdigest(),
                "storage_path": path,
                "file_size": 630,
                "mandatory": version % 10 == 0,
                "active": False,
                "release_notes": f"seeded {version}",
                "created_at": now,
                "updated_at": now,
                "released_at": now,
            }
        )
    return rows


def last_versions(rows: list[dict[str, Any]]) -> dict[tuple[uuid.UUID, str], int]:
    found: dict[tuple[uuid.UUID, str], int] = {}
    for row in rows:
        key = (row["project_id"], row["channel"])
        found[key] = max(found.get(key, 0), row["version"])
    return found


def filler_projects(count: int, now: dt.datetime) -> dict[str, list[dict[str, Any]]]:
    """Rows of `count` projects as `create_project` makes them, without their secrets."""
    rows: dict[str, list[dict[str, Any]]] = {
        "projects": [],
        "environments": [],
        "channels": [],
        "dashboard_tokens": [],
    }
    for index in range(count):
        project_id = uuid.uuid4()
        rows["projects"].append({"id": project_id, "name": f"filler {index}", "created_at": now})
        for environment in projects.ENVIRONMENTS:
            key = projects.new_public_key(environment)
            rows["environments"].append(
                {
                    "id": uuid.uuid4(),
                    "project_id": project_id,
                    "name": environment,
                    "public_key_hash": projects.hash_secret(key),
                    "public_key_prefix": key[:12],
                    "key_rotated_at": now,
                }
            )
        rows["channels"] += [
            {"project_id": project_id, "name": channel, "last_version": 0} for channel in CHANNELS
        ]
        token = projects.new_dashboard_token()
        rows["dashboard_tokens"].append(
            {
                "id": uuid.uuid4(),
                "project_id": project_id,
                "token_hash": projects.hash_secret(token),
                "token_prefix": token[:12],
                "created_at": now,
            }
        )
    return rows


def seed(data_dir: Path, scenario: Scenario) -> common.Project:
    """Create the schema, the measured project and every bundle; return the project."""
    settings = Settings(data_dir=data_dir, database_url="", storage_url="").resolved()
    engine = create_db_engine(settings.database_url)
    try:
        upgrade_schema(engine, lock_dir=settings.data_dir)
        created = projects.create_project(Database(engine), name="measured")
        now = dt.datetime.now(dt.UTC)
        fillers = filler_projects(scenario.other_projects, now)
        bundles = bundle_rows(created.project.id, scenario.bundles, now)
        for project in fillers["projects"]:
            bundles += bundle_rows(project["id"], scenario.others_bundles, now)
        with engine.begin() as connection:
            for name in ("projects", "environments", "channels", "dashboard_tokens"):
                if fillers[name]:
                    connection.execute(_table(name).insert(), fillers[name])
            if bundles:
                connection.execute(_table("bundles").insert(), bundles)
            # Uploads after seeding must get the next numbers, as they would have.
            for (project_id, channel), version in last_versions(bundles).items():
                connection.execute(
                    update(Channel)
                    .where(Channel.project_id == project_id, Channel.name == channel)
                    .values(last_version=version)
                )
    finally:
        engine.dispose()
    return common.Project(
        project_id=str(created.project.id),
        dashboard_token=created.dashboard_token,
        public_keys=created.public_keys,
    )


# --------------------------------------------------------------------------------------------
# measuring, over HTTP


def small_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("config.json", '{"banner": "growth"}')
    return buffer.getvalue()


def timed(call: Callable[[], httpx.Response], count: int, status: int) -> list[float]:
    """`count` sequential calls, each one's milliseconds; any other status stops the run."""
    times: list[float] = []
    for _ in range(count):
        start = time.perf_counter()
        response = call()
        times.append((time.perf_counter() - start) * 1000)
        if response.status_code != status:
            raise common.BenchError(
                f"{response.request.url}: {response.status_code} {response.text}"
            )
    return times


class Target:
    """One scenario's running server, its client and the four requests that are timed."""

    def __init__(
        self, scenario: Scenario, server: common.OtaServer, project: common.Project
    ) -> None:
        self.scenario = scenario
        self.result = Result(scenario, seed_seconds=0.0)
        self.client = httpx.Client(timeout=120)
        self._base = server.base_url
        self._api = f"{server.base_url}/v1/projects/{project.project_id}/ota"
        self._auth = {"Authorization": f"Bearer {project.dashboard_token}"}
        self._key = {"x-api-key": project.public_keys["production"]}
        self._zip = small_zip()
        # A page from the middle of the production channel: keyset, so as cheap as the first.
        middle = max(1, (scenario.bundles // len(CHANNELS)) // 2)
        self._cursor = encode_cursor(channel="production", version=middle)
        self.calls: dict[str, tuple[Callable[[], httpx.Response], int]] = {
            "check": (self.check, 200),
            "list": (self.whole, 200),
            "page": (self.deep_page, 200),
            "upload": (lambda: self.upload("staging"), 201),
        }

    def check(self) -> httpx.Response:
        return self.client.get(
            f"{self._base}/v1/sdk/ota/check",
            params={"channel": "production", "version": "0"},
            headers=self._key,
        )

    def whole(self) -> httpx.Response:
        return self.client.get(f"{self._api}/bundles", headers=self._auth)

    def deep_page(self) -> httpx.Response:
        params: dict[str, str | int] = {"limit": PAGE_SIZE, "cursor": self._cursor}
        return self.client.get(f"{self._api}/bundles", headers=self._auth, params=params)

    def upload(self, channel: str) -> httpx.Response:
        return self.client.post(
            f"{self._api}/upload",
            headers=self._auth,
            files={"bundle": ("bundle.zip", self._zip, "application/zip")},
            data={"channel": channel, "release_notes": "growth"},
        )

    def prepare(self) -> None:
        """Upload and activate the check's bundle through the API; check what is answered."""
        stored = self.upload("production")
        stored.raise_for_status()
        version = stored.json()["version"]
        activate = f"{self._api}/bundles/{stored.json()['id']}/activate"
        self.client.post(activate, headers=self._auth).raise_for_status()
        deadline = time.monotonic() + 10  # the activation reaches the cache within its poll
        while self.check().json().get("version") != version:
            if time.monotonic() > deadline:
                raise common.BenchError(f"the check never offered version {version}")
            time.sleep(0.05)
        answer = self.check().json()
        if not answer.get("has_update") or not answer.get("download_url"):
            raise common.BenchError(f"unexpected check answer {answer}")
        listed = self.whole()
        if len(listed.json()) != self.scenario.bundles + 1:
            raise common.BenchError(f"listed {len(listed.json())} bundles")
        self.result.list_bytes = len(listed.content)
        page = self.deep_page().json()
        # Only large sets have a full page after the middle of production; at the baseline
        # only staging's few bundles follow it.
        full = self.scenario.bundles > 3 * PAGE_SIZE
        if not page or len(page) > PAGE_SIZE or (full and len(page) != PAGE_SIZE):
            raise common.BenchError(f"a page of {len(page)} bundles")


def interleaved(
    targets: list[Target], what: str, *, rounds: int, per_round: int, warm_up: int
) -> None:
    """Time `what` on every target, a few requests each in turn, so that a busy moment of the
    machine falls on every size alike rather than on whichever was measured then."""
    for target in targets:
        call, status = target.calls[what]
        timed(call, warm_up, status)
    for _ in range(rounds):
        for target in targets:
            call, status = target.calls[what]
            target.result.timings.setdefault(what, []).extend(timed(call, per_round, status))


def run(args: argparse.Namespace) -> list[Result]:
    """Seed every scenario, start a server for each, and time them side by side."""
    with tempfile.TemporaryDirectory(prefix="koolbase-growth-") as tmp, ExitStack() as stack:
        targets: list[Target] = []
        for index, scenario in enumerate(SCENARIOS):
            data_dir = Path(tmp) / f"data-{index}"
            start = time.perf_counter()
            project = seed(data_dir, scenario)
            seconds = time.perf_counter() - start
            print(
                f"{scenario.name}: seeded {scenario.total_bundles} bundles in "
                f"{1 + scenario.other_projects} projects in {seconds:.1f} s",
                flush=True,
            )
            # The server's own (empty) data dir is replaced by the seeded one.
            extra = {"KOOLBASE_OTA_DATA_DIR": str(data_dir)}
            server = stack.enter_context(common.ota_server(workers=1, extra_env=extra))
            target = Target(scenario, server, project)
            stack.callback(target.client.close)
            target.prepare()
            target.result.seed_seconds = seconds
            targets.append(target)
        check_rounds = 10
        interleaved(
            targets,
            "check",
            rounds=check_rounds,
            per_round=max(1, args.checks // check_rounds),
            warm_up=WARM_UP,
        )
        interleaved(targets, "list", rounds=args.lists, per_round=1, warm_up=2)
        interleaved(targets, "page", rounds=args.lists, per_round=1, warm_up=2)
        interleaved(targets, "upload", rounds=args.uploads, per_round=1, warm_up=1)
        return [target.result for target in targets]


# --------------------------------------------------------------------------------------------
# report


def report(results: list[Result]) -> bool:
    print(
        "\nmilliseconds per request, median / p95; `bundles` is the measured project's, `all` "
        "every project's"
    )
    header = ("scenario", "bundles", "all", "projects", "check", "list", "list KiB", "page")
    print(
        f"{header[0]:12} {header[1]:>7} {header[2]:>6} {header[3]:>8} | {header[4]:>13} | "
        f"{header[5]:>15} {header[6]:>8} | {header[7]:>13} | {'upload':>13}"
    )
    for result in results:
        scenario = result.scenario
        cells = {
            what: f"{result.median(what):.2f} / {result.p95(what):.2f}"
            for what in ("check", "list", "page", "upload")
        }
        print(
            f"{scenario.name:12} {scenario.bundles:>7} {scenario.total_bundles:>6} "
            f"{1 + scenario.other_projects:>8} | {cells['check']:>13} | {cells['list']:>15} "
            f"{result.list_bytes / 1024:8.0f} | {cells['page']:>13} | {cells['upload']:>13}"
        )
    by_name = {result.scenario.name: result for result in results}
    base, thousand, ten_thousand = (by_name[n] for n in ("baseline", "1k bundles", "10k bundles"))
    print(f"\nverdicts (baseline check median {base.median('check'):.2f} ms)")
    all_ok = True
    for result in results[1:]:
        ratio = result.median("check") / base.median("check")
        ok = ratio <= CHECK_FLAT
        all_ok &= ok
        print(
            f"  check flat at {result.scenario.name:12} {ratio:5.2f}x baseline "
            f"(<= {CHECK_FLAT})  {common.verdict(ok)}"
        )
    growth = ten_thousand.median("list") / thousand.median("list")
    ok = LINEAR[0] <= growth <= LINEAR[1]
    all_ok &= ok
    per_bundle = [
        1000 * r.median("list") / (r.scenario.bundles + 1) for r in (thousand, ten_thousand)
    ]
    print(
        f"  list linear 1k -> 10k bundles: {growth:5.2f}x for 10x the bundles "
        f"({per_bundle[0]:.0f} -> {per_bundle[1]:.0f} us a bundle; "
        f"{LINEAR[0]:.0f}-{LINEAR[1]:.0f}x)  {common.verdict(ok)}"
    )
    page = ten_thousand.median("page") / thousand.median("page")
    ok = page <= PAGE_FLAT
    all_ok &= ok
    print(
        f"  page of {PAGE_SIZE} flat 1k -> 10k bundles: {page:5.2f}x (<= {PAGE_FLAT})  "
        f"{common.verdict(ok)}"
    )
    for result in results[1:]:
        ratio = result.median("upload") / base.median("upload")
        print(f"  upload at {result.scenario.name:12} {ratio:5.2f}x baseline (informational)")
    print(f"overall: {common.verdict(all_ok)}")
    return all_ok


def load_line() -> str:
    """The load average: sequential timings are only as quiet as the machine."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checks", type=int, default=200, help="timed checks at each size")
    parser.add_argument("--lists", type=int, default=20, help="timed lists (and pages) per size")
    parser.add_argument("--uploads", type=int, default=10, help="timed uploads at each size")
    args = parser.parse_args()
    print(common.machine_line())
    print(load_line())
    print(
        "sequential requests over one keep-alive connection per size, 1 server process per "
        "size, all sizes running at once and timed in turn; per size: "
        f"{args.checks} checks (after {WARM_UP} warm-up), {args.lists} whole lists, "
        f"{args.lists} pages of {PAGE_SIZE} from the middle of a channel, {args.uploads} uploads"
    )
    results = run(args)
    ok = report(results)
    print(load_line())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
