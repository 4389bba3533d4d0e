"""Run `koolbase-ota` commands as forks of a process that has imported the CLI already.

A command started as the console script spends about 0.6 s of CPU importing SQLAlchemy,
pydantic and the rest before it does anything, and the suite starts some two hundred of them.
Here one process per test worker (the zygote) imports all that once and then only forks: each
command still runs in a process of its own, through the console script's own `run()`, with its
own argument list, environment, working directory, standard streams and exit status. What a
command is given is a small launcher script (`launcher()`), so tests start it as any program
(`subprocess`, a shell) and see what they would see of the console script.

The launcher runs the real console script instead for `serve` (its signals, process group and
workers are what those tests test), for an environment whose Python start-up settings differ
from the zygote's (`PYTHON*`, the locale), and whenever the zygote is not there.
`KOOLBASE_TEST_CLI_EXEC=1` runs every command as the real console script.
"""

from __future__ import annotations

import atexit
import contextlib
import inspect
import io
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import TextIO

CONSOLE_SCRIPT = Path(sys.executable).parent / "koolbase-ota"

#: Commands that always run as the real console script.
EXEC_COMMANDS = frozenset({"serve"})

#: What the interpreter reads from the environment only when it starts (a fork keeps the
#: zygote's): a command given other values than the zygote had runs as the real console script.
START_UP_PREFIXES = ("PYTHON", "LC_", "LANG", "TZ")

#: What the zygote imports before it forks, beyond the CLI itself: what commands import lazily.
PRELOAD = (
    "koolbase_ota.cli",
    "koolbase_ota.bundles.gc",
    "koolbase_ota.bundles.promote",
    "koolbase_ota.bundles.schemas",
    "koolbase_ota.bundles.service",
    "koolbase_ota.bundles.targeting",
    "koolbase_ota.storage.local",
    "koolbase_ota.storage.s3",
    "koolbase_ota.transfer",
    "alembic.command",
    "alembic.config",
    "alembic.runtime.migration",
    "sqlalchemy.dialects.postgresql.psycopg",
    "sqlalchemy.dialects.sqlite.pysqlite",
)

#: Request size bound (the environment and the argument list, as JSON).
MAX_REQUEST_BYTES = 1 << 20

LAUNCHER = '''\
#!{python} -S
"""koolbase-ota, forked from the test suite's zygote (tests/cli_zygote.py)."""
import json, os, resource, signal, socket, sys

SOCKET = {socket!r}
REAL = {real!r}
EXEC_COMMANDS = {exec_commands!r}
PROCESS = {process!r}
PREFIXES = {prefixes!r}


{process_state}

def run_real():
    os.execv(REAL, [REAL, *sys.argv[1:]])


env = dict(os.environ)
if sys.argv[1:2] and sys.argv[1] in EXEC_COMMANDS or process_state(env, PREFIXES) != PROCESS:
    run_real()
conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
try:
    request = json.dumps({{"argv": [REAL, *sys.argv[1:]], "env": env, "cwd": os.getcwd()}})
    conn.connect(SOCKET)
    socket.send_fds(conn, [request.encode()], [0, 1, 2])
except OSError:  # no working directory, or no zygote: nothing was started
    conn.close()
    run_real()
try:
    pid = int(conn.recv(64))
except (OSError, ValueError):
    # The request reached the zygote: the command may have started, so it is not run again.
    print("koolbase-ota (tests/cli_zygote.py): no word from the zygote", file=sys.stderr)
    sys.exit(70)


def forward(signum, frame):
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT"):
    signal.signal(getattr(signal, name), forward)
answer = conn.recv(64)
code = int(answer) if answer else -signal.SIGKILL
if code < 0:
    if -code not in (signal.SIGKILL, signal.SIGSTOP):
        signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
sys.exit(code)
'''


def process_state(env: dict[str, str], prefixes: tuple[str, ...]) -> dict[str, object]:
    """What a fork keeps of the zygote, and the console script would take from whoever started
    it: the start-up settings of the environment, the umask and the resource limits."""
    import resource

    mask = os.umask(0)
    os.umask(mask)
    limits = {
        name: list(resource.getrlimit(getattr(resource, name)))
        for name in sorted(dir(resource))
        if name.startswith("RLIMIT_")
    }
    settings = {name: value for name, value in env.items() if name.startswith(prefixes)}
    return {"environment": settings, "umask": mask, "limits": limits}


class Zygote:
    """One zygote process and its launcher, in a directory of their own."""

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="koolbase-cli-zygote-"))
        self.socket = self.directory / "zygote.sock"
        self.process = subprocess.Popen(
            [sys.executable, __file__, str(self.socket)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=os.environ.copy(),
        )
        assert self.process.stdout is not None
        ready = self.process.stdout.readline()
        self.running = ready == b"ready\n"
        self.launcher = self.directory / "koolbase-ota"
        self.launcher.write_text(
            LAUNCHER.format(
                python=sys.executable,
                socket=str(self.socket),
                real=str(CONSOLE_SCRIPT),
                exec_commands=tuple(sorted(EXEC_COMMANDS)),
                process=process_state(dict(os.environ), START_UP_PREFIXES),
                prefixes=START_UP_PREFIXES,
                process_state=inspect.getsource(process_state),
            )
        )
        self.launcher.chmod(0o755)

    def stop(self) -> None:
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)


_zygote: Zygote | None = None
_lock = threading.Lock()


def launcher() -> Path:
    """The program to start for `koolbase-ota`: the zygote's launcher, started on first use,
    or the real console script when `KOOLBASE_TEST_CLI_EXEC=1` or the zygote could not start."""
    global _zygote
    if os.environ.get("KOOLBASE_TEST_CLI_EXEC") == "1":
        return CONSOLE_SCRIPT
    with _lock:
        if _zygote is None:
            _zygote = Zygote()
            atexit.register(_zygote.stop)
        return _zygote.launcher if _zygote.running else CONSOLE_SCRIPT


def current() -> Zygote | None:
    """This process's zygote, if it started one."""
    return _zygote


# The zygote itself, run as `python tests/cli_zygote.py SOCKET`. It stays single-threaded (a
# fork copies only the thread that forks), never opens a database and never runs a command.


def _stdio(fd: int, like: TextIO, *, line_buffering: bool) -> TextIO:
    return io.TextIOWrapper(
        open(fd, "rb" if fd == 0 else "wb", closefd=False),
        encoding=like.encoding,
        errors=like.errors,
        newline="\n",
        line_buffering=line_buffering,
    )


def _child(request: dict[str, object], fds: list[int]) -> None:
    """In the forked process: become the command, then run it. Never returns."""
    try:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        os.chdir(str(request["cwd"]))
        env = request["env"]
        assert isinstance(env, dict)
        os.environ.clear()
        os.environ.update(env)
        argv = request["argv"]
        assert isinstance(argv, list)
        sys.argv = [str(arg) for arg in argv]
        # Standard streams as the interpreter makes them at start-up (Python/pylifecycle.c,
        # create_stdio), on the command's files. Signals need nothing: the zygote never
        # changes Python's start-up dispositions.
        sys.stdin = _stdio(0, sys.stdin, line_buffering=False)
        sys.stdout = _stdio(1, sys.stdout, line_buffering=os.isatty(1))
        sys.stderr = _stdio(2, sys.stderr, line_buffering=True)
        from koolbase_ota.cli import run

        run()
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        os._exit(70)


def _serve(path: str) -> None:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    if len(os.listdir("/proc/self/task")) != 1:
        return  # an import started a thread: forking would not be safe, so do not serve
    try:
        os.close(os.pidfd_open(os.getpid()))  # Linux 5.3 and later: else the commands exec
    except (AttributeError, OSError):
        return
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(128)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, "accept")
    # The test process holds the other end of stdin: when it goes, so does the zygote.
    selector.register(sys.stdin.fileno(), selectors.EVENT_READ, "parent")
    children: dict[int, tuple[socket.socket, int]] = {}  # pidfd -> (connection, pid)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    try:
        _loop(listener, selector, children)
    finally:
        # Commands do not outlive their zygote: their launchers could not report on them.
        for _conn, pid in children.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for _conn, pid in children.values():
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


def _loop(
    listener: socket.socket,
    selector: selectors.BaseSelector,
    children: dict[int, tuple[socket.socket, int]],
) -> None:
    while True:
        for key, _ in selector.select():
            if key.data == "parent":
                return
            if key.data == "accept":
                conn, _ = listener.accept()
                conn.settimeout(5)  # a launcher stopped before it sent holds up no other
                try:
                    message, fds, _flags, _address = socket.recv_fds(conn, MAX_REQUEST_BYTES, 3)
                    request = json.loads(message)
                except (OSError, ValueError):
                    conn.close()
                    continue
                if len(fds) != 3:
                    for fd in fds:
                        os.close(fd)
                    conn.close()
                    continue
                pid = os.fork()
                if pid == 0:
                    selector.close()
                    listener.close()
                    conn.close()
                    for pidfd, (other, _pid) in children.items():
                        os.close(pidfd)
                        other.close()
                    _child(request, fds)
                for fd in fds:
                    os.close(fd)
                pidfd = os.pidfd_open(pid)
                children[pidfd] = (conn, pid)
                selector.register(pidfd, selectors.EVENT_READ, "child")
                # The launcher's connection closing first means it was killed: so is the command.
                selector.register(conn, selectors.EVENT_READ, ("launcher", pid))
                with contextlib.suppress(OSError):
                    conn.send(str(pid).encode())
                continue
            if key.data == "child":
                pidfd = key.fd
                conn, pid = children.pop(pidfd)
                selector.unregister(pidfd)
                with contextlib.suppress(KeyError):  # gone already if its launcher was killed
                    selector.unregister(conn)
                os.close(pidfd)
                _, status = os.waitpid(pid, 0)
                with contextlib.suppress(OSError):
                    conn.send(str(os.waitstatus_to_exitcode(status)).encode())
                conn.close()
                continue
            _, pid = key.data
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            selector.unregister(key.fileobj)


if __name__ == "__main__":
    # Where the console script's interpreter starts: the script's directory, not tests/.
    sys.path[0] = str(CONSOLE_SCRIPT.parent)
    _serve(sys.argv[1])
