"""Shared harness for the bench scripts: our server, nginx, wrk, and the machine they ran on.

The scripts run from the repository root as ``.venv/bin/python bench/<name>.py``; Python then
puts ``bench/`` first on ``sys.path``, so they import this module as ``import common``. Every
process started here listens on 127.0.0.1 only and is stopped by the PID it was started with.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
APT_INSTALL = ["apt-get", "install", "-y", "nginx", "wrk"]
#: Where Debian puts nginx; /usr/sbin is not on every user's PATH.
_SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")
LOG_TAIL_CHARS = 3000
WRK_TAIL_SCRIPT = REPO / "bench" / "wrk_tail.lua"
WRK_VARY_SCRIPT = REPO / "bench" / "wrk_vary.lua"
WRK_DEVICES_SCRIPT = REPO / "bench" / "wrk_devices.lua"
STALL_PROBE = REPO / "bench" / "stallprobe"
MIB = 1024 * 1024


class BenchError(RuntimeError):
    """A service could not be started, or a measurement could not be made."""


# --------------------------------------------------------------------------------------------
# the machine


def machine_line() -> str:
    """One line naming the CPU, cores, RAM, kernel, date (UTC) and Python version."""
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram = "unknown RAM"
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB RAM"
                break
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"machine: {cpu}, {os.cpu_count()} cores, {ram}, Linux {platform.release()}, "
        f"{now}, Python {platform.python_version()}"
    )


def repo_on_path() -> None:
    """Make the repository root importable (for ``tests.services``)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))


repo_on_path()
# The /proc walk that finds a server's worker processes is the test harness's own.
from tests.services import descendants  # noqa: E402

# --------------------------------------------------------------------------------------------
# tools


def find_tool(name: str) -> str | None:
    """The path of ``name`` on PATH or in the sbin directories, or None."""
    found = shutil.which(name)
    if found:
        return found
    for directory in _SBIN_DIRS:
        candidate = Path(directory) / name
        if os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def require_nginx_and_wrk() -> tuple[str, str]:
    """Paths of nginx and wrk; install them when root with apt, else explain and exit 2."""
    nginx, wrk = find_tool("nginx"), find_tool("wrk")
    if nginx and wrk:
        return nginx, wrk
    missing = " and ".join(name for name, path in (("nginx", nginx), ("wrk", wrk)) if not path)
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"{missing} not found; installing as root with: {' '.join(APT_INSTALL)}", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        if subprocess.run(APT_INSTALL, env=env, check=False).returncode != 0:
            subprocess.run(["apt-get", "update"], env=env, check=False)
            subprocess.run(APT_INSTALL, env=env, check=False)
        nginx, wrk = find_tool("nginx"), find_tool("wrk")
        if nginx and wrk:
            return nginx, wrk
    print(
        f"{missing} not found. Install them with:\n    sudo {' '.join(APT_INSTALL)}\n"
        "(the Debian/Ubuntu packages), then run this script again.",
        file=sys.stderr,
    )
    sys.exit(2)


def venv_tool(name: str) -> str:
    """A console script of the environment running this script (e.g. ``koolbase-ota``)."""
    for directory in (Path(sys.executable).parent, REPO / ".venv" / "bin"):
        candidate = directory / name
        if os.access(candidate, os.X_OK):
            return str(candidate)
    raise BenchError(
        f"no {name} next to {sys.executable} or in {REPO / '.venv/bin'}: run `make test` or "
        "`make run` once, then `.venv/bin/python bench/<script>.py`"
    )


# --------------------------------------------------------------------------------------------
# processes


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _stat_fields(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name (field 3, the state, comes first)."""
    line = Path(f"/proc/{pid}/stat").read_text()
    return line[line.rfind(")") + 2 :].split()


def _start_time(pid: int) -> str | None:
    """When ``pid`` started (clock ticks since boot), or None once it is gone or a zombie."""
    try:
        fields = _stat_fields(pid)
        return None if fields[0] in ("Z", "X") else fields[19]  # field 22: start time
    except (OSError, IndexError):
        return None


def _parent_death_signal() -> None:
    """Ask Linux to SIGTERM the child if this script dies without stopping it."""
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


def start_process(
    args: Sequence[str], *, log: Path, env: dict[str, str], own_session: bool = True
) -> subprocess.Popen[bytes]:
    """Start ``args`` in a session of its own, its output appended to ``log``.

    A session of its own is also a scheduling group of its own where the kernel groups by
    session (``/proc/sys/kernel/sched_autogroup_enabled``): the CPU is then shared between
    this script's group (wrk) and the server's before it is shared between their threads.
    ``own_session=False`` keeps them in one group, as peers (``check.py --one-session``).
    """
    with open(log, "ab") as handle:
        return subprocess.Popen(
            list(args),
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=env,
            # A Ctrl+C reaches this script alone, which stops it properly.
            start_new_session=own_session,
            preexec_fn=_parent_death_signal,
        )


def session_line(*, own_session: bool) -> str:
    """How the servers are grouped for the scheduler, for the report."""
    try:
        autogroup = Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip()
    except OSError:
        autogroup = "unknown"
    where = "each server in a session of its own" if own_session else "servers in wrk's session"
    return f"{where} (sched_autogroup_enabled={autogroup})"


def stop_process(
    process: subprocess.Popen[bytes], *, signum: int = signal.SIGTERM, timeout: float = 15.0
) -> None:
    """Stop ``process`` by its PID, then SIGKILL any of its descendants still alive.

    The descendants are listed before the signal is sent: once the parent exits they are
    re-parented and could no longer be found. A PID is only killed if it still has the start
    time it had when listed, so a recycled PID is never hit.
    """
    if process.poll() is not None:
        return
    tree = {pid: _start_time(pid) for pid in descendants(process.pid)}
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, signum)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout)
    deadline = time.monotonic() + timeout
    for pid, started in tree.items():
        while _start_time(pid) == started and started is not None:
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.05)


def log_tail(path: Path) -> str:
    """The end of a log file, for error messages."""
    try:
        return path.read_text(errors="replace")[-LOG_TAIL_CHARS:] or "(log is empty)"
    except OSError:
        return "(no log)"


def wait_until(
    ready: Callable[[], bool], *, process: subprocess.Popen[bytes], log: Path, timeout: float
) -> None:
    """Poll ``ready`` until it returns True; fail if ``process`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise BenchError(
                f"{process.args!r} exited with status {process.returncode}; log {log}:\n"
                f"{log_tail(log)}"
            )
        with contextlib.suppress(OSError):
            if ready():
                return
        if time.monotonic() > deadline:
            raise BenchError(f"not ready after {timeout:.0f} s; log {log}:\n{log_tail(log)}")
        time.sleep(0.05)


def http_ok(url: str) -> bool:
    """True when a GET of ``url`` answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - http only
            return int(response.status) == 200
    except urllib.error.URLError:
        return False


def rss_kib(pid: int) -> int:
    """Resident memory of ``pid`` in KiB (VmRSS), 0 when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def cmdline(pid: int) -> str:
    """The command line of ``pid``, shortened for reports."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return " ".join(part.decode(errors="replace") for part in raw.split(b"\0") if part)[:100]


# --------------------------------------------------------------------------------------------
# our server


@dataclass
class Project:
    """A project made with ``koolbase-ota project create NAME --json``."""

    project_id: str
    dashboard_token: str
    public_keys: dict[str, str]


@dataclass
class OtaServer:
    """A running ``koolbase-ota serve`` with a data directory of its own."""

    process: subprocess.Popen[bytes]
    base_url: str
    env: dict[str, str]
    data_dir: Path
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def pids(self) -> list[int]:
        """The serve process and every process it started (workers, supervisors)."""
        return [self.process.pid, *descendants(self.process.pid)]

    def create_project(self, name: str) -> Project:
        """Create a project with the real CLI, against this server's data."""
        result = subprocess.run(
            [venv_tool("koolbase-ota"), "project", "create", name, "--json"],
            env=self.env,
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        if result.returncode != 0:
            raise BenchError(f"project create failed: {result.stdout}{result.stderr}")
        data = json.loads(result.stdout)
        return Project(
            project_id=str(data["project_id"]),
            dashboard_token=str(data["dashboard_token"]),
            public_keys={str(k): str(v) for k, v in data["public_keys"].items()},
        )

    def describe(self) -> str:
        """Which HTTP server runs underneath, and its processes, as seen in /proc and the log."""
        text = log_tail(self.log).lower()
        kind = next((name for name in ("granian", "uvicorn") if name in text), "unknown server")
        return f"{kind}, processes: " + "; ".join(f"{p} {cmdline(p)}" for p in self.pids())


def server_env(
    data_dir: Path, public_url: str, extra: dict[str, str] | None = None
) -> dict[str, str]:
    """This process's environment without any koolbase/AWS settings, plus ours."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("KOOLBASE_OTA_", "AWS_", "PROMETHEUS_"))
    }
    env.update(
        KOOLBASE_OTA_DATA_DIR=str(data_dir),
        KOOLBASE_OTA_PUBLIC_URL=public_url,
        KOOLBASE_OTA_LOG_FORMAT="text",
    )
    env.update(extra or {})
    return env


@contextlib.contextmanager
def ota_server(
    *,
    workers: int,
    extra_env: dict[str, str] | None = None,
    timeout: float = 60.0,
    own_session: bool = True,
) -> Iterator[OtaServer]:
    """Start ``koolbase-ota serve`` on a free port with a fresh data dir; stop it afterwards."""
    port = free_port()
    base_url = f"http://{HOST}:{port}"
    with tempfile.TemporaryDirectory(prefix="koolbase-bench-") as tmp:
        data_dir = Path(tmp) / "data"
        log = Path(tmp) / "server.log"
        env = server_env(data_dir, base_url, extra_env)
        args = [venv_tool("koolbase-ota"), "serve", "--host", HOST, "--port", str(port)]
        process = start_process(
            [*args, "--workers", str(workers)], log=log, env=env, own_session=own_session
        )
        try:
            # Not /healthz: it answers 200 from serve's first moment, before any worker runs.
            wait_until(
                lambda: http_ok(base_url + "/readyz"), process=process, log=log, timeout=timeout
            )
            yield OtaServer(process, base_url, env, data_dir, log)
        finally:
            stop_process(process)


# --------------------------------------------------------------------------------------------
# nginx


@dataclass
class Nginx:
    """A running nginx serving ``root`` on ``base_url``."""

    process: subprocess.Popen[bytes]
    base_url: str
    root: Path


NGINX_CONF = """\
{user}worker_processes 2;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    default_type {default_type};
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen {host}:{port};
        root {root};
        location / {{ }}
    }}
}}
"""


@contextlib.contextmanager
def nginx_server(
    root: Path,
    *,
    default_type: str = "application/octet-stream",
    timeout: float = 20.0,
    own_session: bool = True,
) -> Iterator[Nginx]:
    """Start nginx (2 workers, sendfile, no access log) serving ``root``; stop it afterwards.

    ``keepalive_requests`` is raised so that wrk's connections stay open for the whole run, as
    they do against our server.
    """
    nginx = find_tool("nginx")
    if nginx is None:
        raise BenchError("nginx not found; call require_nginx_and_wrk() first")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="koolbase-bench-nginx-") as tmp:
        conf = Path(tmp) / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(
                user="user root;\n" if os.geteuid() == 0 else "",
                tmp=tmp,
                host=HOST,
                port=port,
                root=root,
                default_type=default_type,
            )
        )
        log = Path(tmp) / "stdout.log"
        args = [nginx, "-p", tmp, "-e", f"{tmp}/error.log", "-c", str(conf)]
        process = start_process(args, log=log, env=dict(os.environ), own_session=own_session)
        base_url = f"http://{HOST}:{port}"
        try:
            wait_until(
                lambda: _listens(port),
                process=process,
                log=Path(tmp) / "error.log",
                timeout=timeout,
            )
            yield Nginx(process, base_url, root)
        finally:
            stop_process(process, signum=signal.SIGQUIT)  # graceful: finish open responses


def _listens(port: int) -> bool:
    with socket.create_connection((HOST, port), timeout=1):
        return True


# --------------------------------------------------------------------------------------------
# wrk


@dataclass
class WrkResult:
    """What one wrk run reported."""

    url: str
    requests: int
    seconds: float
    requests_per_second: float
    transfer_bytes_per_second: float
    latency_ms: dict[str, float] = field(default_factory=dict)  # "avg", "max", "50", ... "99"
    non_2xx_3xx: int = 0
    socket_errors: dict[str, int] = field(default_factory=dict)  # connect, read, write, timeout
    output: str = ""

    @property
    def errors(self) -> int:
        return self.non_2xx_3xx + sum(self.socket_errors.values())

    @property
    def mib_per_second(self) -> float:
        return self.transfer_bytes_per_second / MIB

    def summary(self, *, expect_non_2xx: bool = False) -> str:
        """One line: requests/s, MiB/s, p50/p99 and errors (socket errors only when the
        answers measured are meant to be 4xx, such as a 401 for an unknown key)."""
        p50 = self.latency_ms.get("50", float("nan"))
        p99 = self.latency_ms.get("99", float("nan"))
        errors = sum(self.socket_errors.values()) if expect_non_2xx else self.errors
        tail = f" p99.9 {self.latency_ms['99.9']:6.2f} ms" if "99.9" in self.latency_ms else ""
        return (
            f"{self.requests_per_second:10.0f} req/s {self.mib_per_second:9.1f} MiB/s "
            f"p50 {p50:7.2f} ms p99 {p99:7.2f} ms{tail} errors {errors}"
        )


_TIME_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_SIZE_UNITS = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if match is None:
        raise BenchError(f"unreadable wrk duration {text!r}")
    return float(match[1]) * _TIME_UNITS[match[2]]


def _bytes(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(B|KB|MB|GB|TB)", text)
    if match is None:
        raise BenchError(f"unreadable wrk size {text!r}")
    return float(match[1]) * _SIZE_UNITS[match[2]]


def parse_wrk(output: str, url: str) -> WrkResult:
    """Read requests/s, transfer/s, latency (with --latency percentiles) and errors."""
    total = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h)", output)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    transfer = re.search(r"Transfer/sec:\s+(\S+)", output)
    if total is None or rps is None or transfer is None:
        raise BenchError(f"unreadable wrk output:\n{output}")
    result = WrkResult(
        url=url,
        requests=int(total[1]),
        seconds=_ms(total[2] + total[3]) / 1000,
        requests_per_second=float(rps[1]),
        transfer_bytes_per_second=_bytes(transfer[1]),
        output=output,
    )
    latency = re.search(r"Latency\s+(\S+)\s+\S+\s+(\S+)", output)
    if latency:
        result.latency_ms["avg"] = _ms(latency[1])
        result.latency_ms["max"] = _ms(latency[2])
    for percent, value in re.findall(r"^\s+(\d+)%\s+(\S+)\s*$", output, flags=re.MULTILINE):
        result.latency_ms[percent] = _ms(value)
    errors = re.search(r"connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if errors:
        result.socket_errors = dict(
            zip(("connect", "read", "write", "timeout"), map(int, errors.groups()), strict=True)
        )
    tail = re.search(r"^tail: (.*)$", output, flags=re.MULTILINE)
    for percent, micros in re.findall(r"([\d.]+)% (\d+)us", tail[1] if tail else ""):
        result.latency_ms[percent] = int(micros) / 1000
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if non_2xx:
        result.non_2xx_3xx = int(non_2xx[1])
    return result


def run_wrk(
    url: str,
    *,
    seconds: int,
    headers: Sequence[str] = (),
    threads: int = 2,
    connections: int = 64,
    timeout_seconds: int | None = None,
    script: Path | None = None,
) -> WrkResult:
    """``wrk -t2 -c64 -dNs --latency [-s script] [-H header]... URL`` and its parsed report.

    ``WRK_TAIL_SCRIPT`` adds p99.9 and p99.99 to the report; it defines no per-request function,
    so the load is the same. ``WRK_VARY_SCRIPT`` and ``WRK_DEVICES_SCRIPT`` do too, and make
    every request different (a counting header; a device id of its own in the query).
    """
    wrk = find_tool("wrk")
    if wrk is None:
        raise BenchError("wrk not found; call require_nginx_and_wrk() first")
    args = [wrk, f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency"]
    if timeout_seconds is not None:
        args.append(f"--timeout={timeout_seconds}s")
    if script is not None:
        args += ["-s", str(script)]
    for header in headers:
        args += ["-H", header]
    result = subprocess.run(
        [*args, url], capture_output=True, text=True, check=False, timeout=seconds + 60
    )
    if result.returncode != 0:
        raise BenchError(f"wrk failed ({result.returncode}): {result.stdout}{result.stderr}")
    return parse_wrk(result.stdout, url)


def wrk_command(
    *,
    seconds: int,
    headers: Sequence[str] = (),
    timeout_seconds: int | None = None,
    script: Path | None = None,
) -> str:
    """The wrk command line as a reader would type it, for reports."""
    parts = ["wrk", "-t2", "-c64", f"-d{seconds}s", "--latency"]
    if timeout_seconds is not None:
        parts.append(f"--timeout={timeout_seconds}s")
    if script is not None:
        parts += ["-s", str(script.relative_to(REPO))]
    parts += [f"-H '{header}'" for header in headers]
    return " ".join(parts) + " URL"


def verdict(ok: bool) -> str:
    """PASS or FAIL."""
    return "PASS" if ok else "FAIL"


# --------------------------------------------------------------------------------------------
# the stall probe (bench/stallprobe)


def probe_env(directory: Path) -> dict[str, str]:
    """What a server's environment needs for `bench/stallprobe` to log into ``directory``."""
    path = os.pathsep.join(filter(None, [str(STALL_PROBE), os.environ.get("PYTHONPATH")]))
    return {"PYTHONPATH": path, "KOOLBASE_BENCH_PROBE_DIR": str(directory)}


def stall_report(directory: Path, pids: Sequence[int], start: float, end: float) -> list[str]:
    """One line a process: what its stall log holds between ``start`` and ``end`` (epoch s).

    Processes that never logged an event-loop iteration (the supervisor and the resource
    tracker run none; a worker's start-up always logs one) are left out. A long iteration whose
    longest callback took most of it is counted as "one callback": that callback was slow, or
    the process lost its core while running it.
    """
    lines = []
    for pid in pids:
        log = directory / f"stalls.{pid}.jsonl"
        logged = log.read_text().splitlines() if log.exists() else []
        events = [json.loads(line) for line in logged if line]
        if not any(event["kind"] == "busy" for event in events):
            continue
        events = [event for event in events if start <= event["at"] <= end]
        busy = [event for event in events if event["kind"] == "busy"]
        collections = [event for event in events if event["kind"] == "gc"]
        one = sum(1 for event in busy if event["worst_ms"] > event["ms"] / 2)
        longest = max((event["ms"] for event in busy), default=0.0)
        slowest_gc = max((event["ms"] for event in collections), default=0.0)
        lines.append(
            f"pid {pid}: {len(busy)} iterations over 4 ms "
            f"({sum(1 for event in busy if event['ms'] > 12)} over 12 ms, longest "
            f"{longest:.1f} ms, {one} of them one callback); {len(collections)} collections "
            f"over 2 ms (longest {slowest_gc:.1f} ms)"
        )
    return lines
