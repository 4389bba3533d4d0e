"""The SDK check against nginx serving the identical response bytes, side by side in one run.

Target (issue 4): with 2 server processes and wrk (2 threads, 64 connections) on this machine,
the check reaches at least 0.6 times nginx's requests per second, with no errors and p99 under
5 ms; the `has_update: false` path and a 401 for an unknown key are at least as fast. Run from
the repository root:

    .venv/bin/python bench/check.py [--seconds 10] [--workers 2] [--rounds 1] [--probe]

Every wrk run, ours and nginx's, also reports p99.9 (`bench/wrk_tail.lua`). wrk sends the same
bytes every time, which a server may answer without parsing them again (ours does, as it does for
devices of one app); the "varied" case makes every request different (`bench/wrk_vary.lua`,
on nginx too) to show the check without that, and the code-push case gives every request a
device id of its own (`bench/wrk_devices.lua`), as a fleet does, once with nothing rolled out
and once on a channel rolled out to 50% (nginx serves the larger of its two answers).
`--probe` loads `bench/stallprobe` into the server's processes and prints, after each case,
their event-loop iterations over 4 ms and garbage collections over 2 ms during our run.
`--rounds N` runs each pair N times, nginx first and ours first in turn, and sums up per case
how many runs met the p99 target, for ours and for nginx: on a shared machine the p99 moves run
to run by more than the difference between two servers. For the same reason each run of the two
paths held to "as fast as the offered path" is preceded by a run of the offered path, and is
compared with that run (it was compared with the median of the offered path's own runs, minutes
earlier, and failed when the host slowed in between); with `--rounds N` the rule is applied to
the medians of those runs and their bars (one run beside another of the same path moves by a
third here; each run's own comparison is printed).

The exit code is 0 when the issue's targets are met: in the three cases it names (offered, no
update, unknown key), every run at 0.6 of nginx or more, without errors and with p99 under 5 ms,
and the two "as fast" rules. The three cases whose requests never repeat go beyond the issue:
they are held to the same ratio, errors and p99, and a line at the end says how many of their
runs met them, without deciding the exit code.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import common
import httpx

TARGET_RATIO = 0.6
TARGET_P99_MS = 5.0
#: "At least as fast" as the offered path, within what two runs of one path differ by here.
AS_FAST = 0.95


@dataclass
class Case:
    name: str
    path: str
    headers: tuple[str, ...]
    status: int
    #: The wrk script of this case, for ours and nginx alike.
    script: Path = common.WRK_TAIL_SCRIPT
    #: Held to "at least as fast as the offered path" (the issue's rule for these two).
    as_fast_as_offered: bool = True
    #: Appended to the path, numbered from 0, until the answer offers a bundle: the bytes
    #: nginx serves are then the larger answer of a rollout's.
    sample_device: str = ""
    #: One of the issue's three cases (its targets decide the exit code); False for the cases
    #: whose requests never repeat, which go beyond it.
    named: bool = True


def publish(server: common.OtaServer) -> common.Project:
    """A project with one active bundle on production, nothing on staging, and one rolled
    out to half the devices on development."""
    project = server.create_project("bench-check")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("config.json", '{"banner": "hello"}')
    api = f"{server.base_url}/v1/projects/{project.project_id}/ota"
    auth = {"Authorization": f"Bearer {project.dashboard_token}"}
    with httpx.Client(timeout=60) as client:
        for channel, rollout in (("production", 100), ("development", 50)):
            uploaded = client.post(
                f"{api}/upload",
                headers=auth,
                files={"bundle": ("bundle.zip", buffer.getvalue(), "application/zip")},
                data={"release_notes": "Updated banner and config", "channel": channel},
            )
            uploaded.raise_for_status()
            bundle_id = uploaded.json()["id"]
            client.post(
                f"{api}/bundles/{bundle_id}/activate",
                headers=auth,
                json={"rollout_percentage": rollout},
            ).raise_for_status()
    return project


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10, help="per wrk run (default 10)")
    parser.add_argument("--workers", type=int, default=2, help="server processes (default 2)")
    parser.add_argument(
        "--rounds", type=int, default=1, help="runs of each pair, alternating (default 1)"
    )
    parser.add_argument(
        "--probe", action="store_true", help="log the server's event-loop stalls (slower)"
    )
    parser.add_argument(
        "--one-session",
        action="store_true",
        help="start our server and nginx in this script's session, so that where the kernel "
        "groups processes by session (sched_autogroup_enabled) they share one scheduling "
        "group with wrk; by default each has a session, and so a group, of its own",
    )
    args = parser.parse_args()
    common.require_nginx_and_wrk()
    print(common.machine_line())
    print(f"sessions: {common.session_line(own_session=not args.one_session)}")

    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        probe_dir = Path(tmp) / "probe"
        probe_dir.mkdir()
        extra = common.probe_env(probe_dir) if args.probe else None
        server = stack.enter_context(
            common.ota_server(
                workers=args.workers, extra_env=extra, own_session=not args.one_session
            )
        )
        return measure(
            server,
            Path(tmp),
            args.seconds,
            probe_dir if args.probe else None,
            max(1, args.rounds),
            own_session=not args.one_session,
        )


def measure(
    server: common.OtaServer,
    tmp: Path,
    seconds: int,
    probe_dir: Path | None,
    rounds: int = 1,
    *,
    own_session: bool = True,
) -> int:
    """Each case against nginx serving the same bytes, `rounds` times; 1 if the issue's
    targets are not met (see the module's docstring)."""
    project = publish(server)
    key = project.public_keys["production"]
    cases = [
        Case(
            "update offered",
            "/v1/sdk/ota/check?channel=production&version=0",
            (f"x-api-key: {key}",),
            200,
            as_fast_as_offered=False,
        ),
        Case(
            "no update",
            "/v1/sdk/ota/check?channel=staging&version=0",
            (f"x-api-key: {key}",),
            200,
        ),
        Case(
            "unknown key",
            "/v1/sdk/ota/check?channel=production&version=0",
            ("x-api-key: pk_live_000000000000000000000000",),
            401,
        ),
        # Every request different, so the server cannot skip parsing a repeated one.
        Case(
            "offered, varied",
            "/v1/sdk/ota/check?channel=production&version=0",
            (f"x-api-key: {key}",),
            200,
            script=common.WRK_VARY_SCRIPT,
            as_fast_as_offered=False,
            named=False,
        ),
        # The later SDKs' check, every request from another device (its `device_id`): no
        # answer of one is reused for the next, as in a fleet.
        Case(
            "code-push, devices",
            "/v1/code-push/check?channel=production&current_bundle=0&app_version=1.2.0"
            "&platform=android",
            (f"x-api-key: {key}",),
            200,
            script=common.WRK_DEVICES_SCRIPT,
            as_fast_as_offered=False,
            named=False,
        ),
        # The same during a staged rollout (50%): half the devices are offered the bundle.
        Case(
            "code-push, rollout",
            "/v1/code-push/check?channel=development&current_bundle=0&app_version=1.2.0"
            "&platform=android",
            (f"x-api-key: {key}",),
            200,
            script=common.WRK_DEVICES_SCRIPT,
            as_fast_as_offered=False,
            named=False,
            sample_device="&device_id=sample-",
        ),
    ]
    root = tmp / "static"
    root.mkdir()
    with httpx.Client(timeout=10) as client:
        for case in cases:
            headers = dict(h.split(": ", 1) for h in case.headers)
            response = client.get(server.base_url + case.path, headers=headers)
            for n in range(100 if case.sample_device else 0):
                url = f"{server.base_url}{case.path}{case.sample_device}{n}"
                response = client.get(url, headers=headers)
                if b"update_available" in response.content:
                    break
            assert response.status_code == case.status, response.text
            # nginx serves the very bytes our server answers, as a static file.
            (root / f"{case.name.replace(' ', '-')}.json").write_bytes(response.content)
    print(f"server: {server.describe()}")
    print(f"load:   {common.wrk_command(seconds=seconds, script=common.WRK_TAIL_SCRIPT)}")
    print(f"varied: {common.wrk_command(seconds=seconds, script=common.WRK_VARY_SCRIPT)}")
    print(f"devices: {common.wrk_command(seconds=seconds, script=common.WRK_DEVICES_SCRIPT)}")
    failed = False
    beyond_met = beyond_runs = 0  # runs of the cases beyond the issue, and those that met it
    # A short warm-up of ours first (imports, first allocations), as nginx needs none.
    common.run_wrk(server.base_url + cases[0].path, seconds=2, headers=cases[0].headers)
    with common.nginx_server(
        root, default_type="application/json", own_session=own_session
    ) as nginx:
        offered = cases[0]
        for case in cases:
            static = f"{nginx.base_url}/{case.name.replace(' ', '-')}.json"
            ours_p99: list[float] = []
            nginx_p99: list[float] = []
            ratios: list[float] = []
            #: Ours and the offered path's run just before it (the "as fast" cases only).
            ours_rps: list[float] = []
            bars: list[float] = []
            for round_ in range(rounds):
                # Each run of ours is next to nginx serving the same bytes: the machine is
                # shared, and only neighbouring runs see about the same load. Over rounds,
                # either goes first in turn.
                order = ["nginx", "ours"] if round_ % 2 == 0 else ["ours", "nginx"]
                stalls: list[str] = []
                offered_rps = 0.0
                if case.as_fast_as_offered:
                    # The bar, measured just before, on the same host's load.
                    bar = common.run_wrk(
                        server.base_url + offered.path,
                        seconds=seconds,
                        headers=offered.headers,
                        script=offered.script,
                    )
                    offered_rps = bar.requests_per_second
                    print(f"{'  ours, offered':18} {bar.summary()} (the bar)")
                for side in order:
                    if side == "nginx":
                        reference = common.run_wrk(static, seconds=seconds, script=case.script)
                        print(f"{'  nginx, same bytes':18} {reference.summary()}")
                        continue
                    started = time.time()
                    result = common.run_wrk(
                        server.base_url + case.path,
                        seconds=seconds,
                        headers=case.headers,
                        script=case.script,
                    )
                    if probe_dir is not None:
                        stalls = common.stall_report(probe_dir, server.pids(), started, time.time())
                errors = sum(result.socket_errors.values())
                wrong = result.non_2xx_3xx if case.status == 200 else 0
                ratio = result.requests_per_second / reference.requests_per_second
                p99 = result.latency_ms.get("99", float("inf"))
                ok = ratio >= TARGET_RATIO and not errors and not wrong and p99 < TARGET_P99_MS
                if case.named:
                    failed = failed or not ok
                else:
                    beyond_runs += 1
                    beyond_met += ok
                ours_p99.append(p99)
                nginx_p99.append(reference.latency_ms.get("99", float("inf")))
                ratios.append(ratio)
                summary = result.summary(expect_non_2xx=case.status != 200)
                against = ""
                if case.as_fast_as_offered:
                    ours_rps.append(result.requests_per_second)
                    bars.append(offered_rps)
                    against = f", {result.requests_per_second / offered_rps:.2f} of the bar"
                print(f"{case.name:18} {summary} ratio {ratio:.2f} {common.verdict(ok)}{against}")
                for line in stalls:
                    print(f"{'  stalls':18} {line}")
            if rounds > 1:
                print(
                    f"{'  ' + case.name:18} over {rounds} runs: ratio median "
                    f"{statistics.median(ratios):.2f}; p99 under {TARGET_P99_MS:g} ms in "
                    f"{sum(p < TARGET_P99_MS for p in ours_p99)} of {rounds} (median "
                    f"{statistics.median(ours_p99):.2f} ms), nginx's in "
                    f"{sum(p < TARGET_P99_MS for p in nginx_p99)} of {rounds} (median "
                    f"{statistics.median(nginx_p99):.2f} ms)"
                )
            if bars:
                # The rule on the medians (of one run each with one round): one run beside
                # another of the same path moves by a third on a shared host, medians less.
                ours_median, bar_median = statistics.median(ours_rps), statistics.median(bars)
                as_fast = ours_median >= AS_FAST * bar_median
                failed = failed or not as_fast
                print(
                    f"{'  ' + case.name:18} against the offered runs before them, by "
                    f"median: {ours_median:,.0f} against {bar_median:,.0f} req/s "
                    f"({ours_median / bar_median:.2f}) {common.verdict(as_fast)}"
                )
    print(
        f"beyond the issue (requests that never repeat): {beyond_met} of {beyond_runs} runs "
        f"at {TARGET_RATIO:g} of nginx or more, without errors, p99 under {TARGET_P99_MS:g} ms"
    )
    print(f"issue 4's targets for the check: {common.verdict(not failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
