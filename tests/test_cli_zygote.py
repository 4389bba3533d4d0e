"""The CLI tests' launcher (`tests/cli_zygote.py`): the console script, as far as tests see."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import cli_zygote
from tests.cli_zygote import CONSOLE_SCRIPT
from tests.test_cli import cli_env

TIMEOUT = 60


@pytest.fixture
def launcher(monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("KOOLBASE_TEST_CLI_EXEC", raising=False)
    program = cli_zygote.launcher()
    assert program != CONSOLE_SCRIPT, "the zygote did not start"
    return program


def both(
    launcher: Path, args: list[str], env: dict[str, str], cwd: Path
) -> tuple[subprocess.CompletedProcess[bytes], subprocess.CompletedProcess[bytes]]:
    def run(program: Path) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [str(program), *args], env=env, cwd=cwd, capture_output=True, timeout=TIMEOUT
        )

    return run(launcher), run(CONSOLE_SCRIPT)


def test_commands_print_and_exit_as_the_console_script_does(launcher: Path, tmp_path: Path) -> None:
    env = cli_env(tmp_path / "data")
    created = subprocess.run(
        [str(launcher), "project", "create", "café", "--json"],
        env=env,
        capture_output=True,
        timeout=TIMEOUT,
        check=True,
    )
    project_id = json.loads(created.stdout)["project_id"]
    commands = [
        ["--help"],
        ["channel", "list", "--project", project_id, "--json"],
        ["bogus"],  # argparse: exit 2
        ["token", "revoke", "not-a-uuid"],  # one error line: exit 1
    ]
    codes = set()
    for args in commands:
        forked, real = both(launcher, args, env, tmp_path)
        assert (forked.returncode, forked.stdout, forked.stderr) == (
            real.returncode,
            real.stdout,
            real.stderr,
        ), args
        codes.add(real.returncode)
    assert codes == {0, 1, 2}
    # Relative paths and the environment are the command's own.
    relative = cli_env(Path("relative-data"))
    forked, real = both(launcher, ["project", "list", "--json"], relative, tmp_path)
    assert forked.returncode == real.returncode == 0
    assert forked.stdout == real.stdout == b"[]\n"
    assert (tmp_path / "relative-data" / "koolbase-ota.db").exists()


def test_a_start_up_setting_of_its_own_runs_the_console_script(
    launcher: Path, tmp_path: Path
) -> None:
    """The interpreter reads PYTHONIOENCODING only at start-up, so a fork would print UTF-8."""
    env = cli_env(tmp_path)
    subprocess.run(
        [str(launcher), "project", "create", "café"],
        env=env,
        capture_output=True,
        timeout=TIMEOUT,
        check=True,
    )
    latin = env | {"PYTHONIOENCODING": "latin-1"}
    forked, real = both(launcher, ["project", "list"], latin, tmp_path)
    assert b"caf\xe9" in real.stdout
    assert forked.stdout == real.stdout


@pytest.fixture
def silent_database() -> Iterator[tuple[socket.socket, str]]:
    """A PostgreSQL address that accepts connections and never answers: commands wait on it."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        yield listener, f"postgresql://user:secret@127.0.0.1:{port}/db"


def waiting_command(
    launcher: Path, tmp_path: Path, database: tuple[socket.socket, str]
) -> tuple[subprocess.Popen[bytes], socket.socket]:
    """A command stuck connecting to the silent database, and its end of the connection."""
    listener, url = database
    env = cli_env(
        tmp_path,
        KOOLBASE_OTA_DATABASE_URL=url,
        # Longer than a test waits: a command still there after TIMEOUT was not stopped.
        KOOLBASE_OTA_DATABASE_TIMEOUT_SECONDS="600",
    )
    process = subprocess.Popen(
        [str(launcher), "project", "list"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    listener.settimeout(TIMEOUT)
    connection, _ = listener.accept()
    connection.settimeout(TIMEOUT)
    return process, connection


def wait_closed(connection: socket.socket) -> None:
    """Return once the peer's process is gone (its socket closed: end of file, or reset);
    raise TimeoutError if it is still there after TIMEOUT."""
    with contextlib.suppress(ConnectionResetError):
        while connection.recv(4096):
            pass


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_launcher_reaches_the_command(
    launcher: Path,
    tmp_path: Path,
    silent_database: tuple[socket.socket, str],
    signum: signal.Signals,
) -> None:
    process, connection = waiting_command(launcher, tmp_path, silent_database)
    with connection:
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=TIMEOUT)
        wait_closed(connection)
    # As the console script ends on them: killed by SIGTERM; 130 after a KeyboardInterrupt.
    assert process.returncode == (-signal.SIGTERM if signum == signal.SIGTERM else 130)
    assert b"Traceback" not in stderr


def test_a_killed_launcher_takes_its_command_with_it(
    launcher: Path, tmp_path: Path, silent_database: tuple[socket.socket, str]
) -> None:
    process, connection = waiting_command(launcher, tmp_path, silent_database)
    with connection:
        process.kill()
        process.communicate(timeout=TIMEOUT)
        assert process.returncode == -signal.SIGKILL
        wait_closed(connection)


def test_serve_runs_the_console_script_itself(launcher: Path, tmp_path: Path) -> None:
    """`serve`'s signals, process group and workers are what its tests test."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [str(launcher), "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=cli_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10  # the launcher's first step
        command_line = b""
        while time.monotonic() < deadline and str(CONSOLE_SCRIPT).encode() not in command_line:
            command_line = Path(f"/proc/{process.pid}/cmdline").read_bytes()
            time.sleep(0.01)
        assert str(CONSOLE_SCRIPT).encode() in command_line.split(b"\0")
        assert str(launcher).encode() not in command_line
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=TIMEOUT)


def test_the_real_console_script_on_request(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KOOLBASE_TEST_CLI_EXEC", "1")
    assert cli_zygote.launcher() == CONSOLE_SCRIPT


def test_the_zygote_forks_from_a_single_thread(launcher: Path) -> None:
    zygote = cli_zygote.current()
    assert zygote is not None
    assert os.listdir(f"/proc/{zygote.process.pid}/task") == [str(zygote.process.pid)]
