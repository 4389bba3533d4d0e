"""What a command started through the zygote's launcher is given, beside what the real console
script is given when a test starts it the same way (a shell, `subprocess`). Found by review:
each of these differed."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

from tests import cli_zygote
from tests.cli_zygote import CONSOLE_SCRIPT
from tests.test_cli import cli_env
from tests.test_cli_zygote import TIMEOUT, launcher, silent_database, waiting_command

__all__ = ["launcher", "silent_database"]  # the fixtures


def in_shell(
    program: Path, setup: str, args: list[str], data_dir: Path, cwd: Path
) -> subprocess.CompletedProcess[str]:
    """`setup; exec PROGRAM ARGS` in a shell, as a test (or a user's script) runs a command."""
    return subprocess.run(
        ["/bin/sh", "-c", f'{setup}; exec "$0" "$@"', str(program), *args],
        env=cli_env(data_dir),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def test_the_command_gets_the_umask_it_was_started_with(launcher: Path, tmp_path: Path) -> None:
    """A fork keeps the zygote's umask: a command started under `umask 077` made its database
    file 0644, where the console script's is 0600. Another umask runs the console script."""
    modes = []
    for name, program in (("forked", launcher), ("real", CONSOLE_SCRIPT)):
        data_dir = tmp_path / name / "data"
        result = in_shell(program, "umask 077", ["project", "list", "--json"], data_dir, tmp_path)
        assert result.returncode == 0, result.stderr
        modes.append((stat.S_IMODE((data_dir / "koolbase-ota.db").stat().st_mode), name))
    assert modes[0][0] == modes[1][0], modes


def test_the_command_gets_the_resource_limits_it_was_started_with(
    launcher: Path, tmp_path: Path
) -> None:
    """A fork keeps the zygote's limits: under `ulimit -f 0` (no file may grow) the console
    script cannot write its database and fails; a forked command wrote it and succeeded."""
    results = []
    for name, program in (("forked", launcher), ("real", CONSOLE_SCRIPT)):
        data_dir = tmp_path / name / "data"
        result = in_shell(program, "ulimit -f 0", ["project", "create", "x"], data_dir, tmp_path)
        results.append((result.returncode, name, result.stderr.strip()[-200:]))
    assert results[0][0] == results[1][0], results


def test_a_command_started_in_a_removed_directory(launcher: Path, tmp_path: Path) -> None:
    """The console script needs no working directory when its data directory is absolute;
    the launcher asked for it before anything else and failed with a traceback."""
    results = []
    for name, program in (("forked", launcher), ("real", CONSOLE_SCRIPT)):
        gone = tmp_path / name / "gone"
        gone.mkdir(parents=True)
        data_dir = tmp_path / name / "data"
        setup = f'cd "{gone}" && rmdir "{gone}"'
        result = in_shell(program, setup, ["project", "list", "--json"], data_dir, tmp_path)
        results.append((result.returncode, name, result.stdout, result.stderr.strip()[-300:]))
        assert os.path.isdir(data_dir) or result.returncode != 0
    assert results[0][0] == results[1][0] == 0, results


def commands_of(zygote: cli_zygote.Zygote) -> list[int]:
    """Processes forked from `zygote` (a fork keeps its command line), the zygote itself apart."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == zygote.process.pid:
            continue
        try:
            command_line = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if str(zygote.socket).encode() in command_line.split(b"\0"):
            found.append(int(entry))
    return found


@contextlib.contextmanager
def own_zygote() -> Iterator[tuple[cli_zygote.Zygote, list[int]]]:
    """A zygote of the test's own, stopped at the end, and a list the caller fills with the
    pids to kill then (commands left over)."""
    zygote = cli_zygote.Zygote()
    leftovers: list[int] = []
    try:
        assert zygote.running
        yield zygote, leftovers
    finally:
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        zygote.stop()


def test_a_zygote_that_stops_takes_its_commands_with_it(
    tmp_path: Path, silent_database: tuple[socket.socket, str]
) -> None:
    """When the zygote goes (its test process ends, or it fails), a launcher whose command is
    still running exits; the command ran on, orphaned, holding the test's pipes (a
    `communicate()` waited for it) and its database session. It is killed with the zygote."""
    with own_zygote() as (zygote, leftovers):
        process, connection = waiting_command(zygote.launcher, tmp_path, silent_database)
        with connection:
            zygote.stop()
            process.wait(timeout=TIMEOUT)  # not communicate(): an orphan holds its pipes
            for pipe in (process.stdout, process.stderr):
                assert pipe is not None
                pipe.close()
            leftovers += commands_of(zygote)
            assert leftovers == [], "the command outlived its zygote and its launcher"


def test_a_command_killed_by_sigkill_is_minus_9(
    tmp_path: Path, silent_database: tuple[socket.socket, str]
) -> None:
    """The console script killed by SIGKILL ends -9; the launcher, told -9, called
    `signal.signal(SIGKILL, SIG_DFL)`, which raises: a traceback and exit status 1."""
    with own_zygote() as (zygote, _leftovers):
        process, connection = waiting_command(zygote.launcher, tmp_path, silent_database)
        with connection:
            (command,) = commands_of(zygote)
            os.kill(command, signal.SIGKILL)
            _, stderr = process.communicate(timeout=TIMEOUT)
            assert (process.returncode, stderr) == (-signal.SIGKILL, b"")
