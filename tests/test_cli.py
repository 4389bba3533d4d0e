"""The `koolbase-ota` console script, run as a real process the way a user or a script runs it.

Each command is a process of its own, forked from one that imported the CLI already
(`tests/cli_zygote.py`; `KOOLBASE_TEST_CLI_EXEC=1` starts the console script itself every time).
Commands that do not depend on each other still run side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import sqlite3
import stat
import subprocess
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from koolbase_ota import cli
from koolbase_ota.config import Settings, load_or_create_secret_key
from tests import cli_zygote
from tests.cli_zygote import CONSOLE_SCRIPT

__all__ = ["CONSOLE_SCRIPT"]

DB_FILE = "koolbase-ota.db"
CLI_TIMEOUT_SECONDS = 60
LIVE_KEY = re.compile(r"pk_live_[0-9a-f]{24}")
TEST_KEY = re.compile(r"pk_test_[0-9a-f]{24}")


@dataclass(frozen=True)
class CliResult:
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


def cli_env(data_dir: Path, **extra: str) -> dict[str, str]:
    """The inherited environment without any KOOLBASE_OTA_* setting, plus this data dir."""
    env = {
        name: value for name, value in os.environ.items() if not name.startswith("KOOLBASE_OTA_")
    }
    env["KOOLBASE_OTA_DATA_DIR"] = str(data_dir)
    env.update(extra)
    return env


def run_cli_all(
    data_dir: Path, commands: Sequence[Sequence[str]], env: dict[str, str] | None = None
) -> list[CliResult]:
    """Run every `koolbase-ota ARGS` of `commands` at once against `data_dir`; never raises."""
    env = env if env is not None else cli_env(data_dir)
    program = str(cli_zygote.launcher())
    started = [
        (
            tuple(args),
            subprocess.Popen(
                [program, *args],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            ),
        )
        for args in commands
    ]
    results = []
    for args, process in started:
        try:
            stdout, stderr = process.communicate(timeout=CLI_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            raise
        results.append(CliResult(args, process.returncode, stdout, stderr))
    return results


def run_cli(data_dir: Path, *args: str, env: dict[str, str] | None = None) -> CliResult:
    """Run `koolbase-ota ARGS` against `data_dir`; never raises on a non-zero exit."""
    (result,) = run_cli_all(data_dir, [args], env=env)
    return result


def terminated_once(
    env: dict[str, str], args: Sequence[str], ready: Callable[[subprocess.Popen[bytes]], None]
) -> tuple[int, bytes]:
    """Start `koolbase-ota ARGS`, send it SIGTERM once `ready(process)` returns, and give its
    exit status and what it wrote to stderr after that; it is killed if it outlives the test."""
    process = subprocess.Popen(
        [str(CONSOLE_SCRIPT), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        ready(process)
        process.terminate()
        _, stderr = process.communicate(timeout=CLI_TIMEOUT_SECONDS)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return process.returncode, stderr


def ok(data_dir: Path, *args: str) -> CliResult:
    """Run a command that must succeed."""
    result = run_cli(data_dir, *args)
    assert result.returncode == 0, result.stderr
    return result


def create_project(data_dir: Path, name: str = "demo") -> dict[str, Any]:
    created: dict[str, Any] = ok(data_dir, "project", "create", name, "--json").json()
    return created


def database_bytes(data_dir: Path) -> bytes:
    """Everything SQLite keeps for the database: the main file and any WAL beside it."""
    files = sorted(data_dir.glob(DB_FILE + "*"))
    assert data_dir / DB_FILE in files
    return b"".join(path.read_bytes() for path in files)


def query(data_dir: Path, sql: str) -> list[tuple[Any, ...]]:
    """Read the CLI's SQLite file directly, read-only."""
    uri = f"file:{data_dir / DB_FILE}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as connection:
        return connection.execute(sql).fetchall()


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def cli_error_problems(result: CliResult, mention: str) -> list[str]:
    """Why `result` is not a clean refusal: non-zero exit, one `error: ...` line, no traceback."""
    problems = []
    if result.returncode == 0:
        problems.append("exit status 0")
    if "Traceback" in result.stderr:
        problems.append("a traceback")
    lines = result.stderr.strip().splitlines()
    if len(lines) != 1 or not lines[0].startswith("error: "):
        problems.append(f"{len(lines)} stderr lines, not one `error: ...` line")
    elif mention not in lines[0]:
        problems.append(f"the error does not mention {mention!r}")
    return [f"{' '.join(result.args)}: {problem}\n{result.stderr}" for problem in problems]


def test_project_create_json_prints_one_object_with_the_contract_keys(tmp_path: Path) -> None:
    result = ok(tmp_path, "project", "create", "my app", "--json")

    created = json.loads(result.stdout)  # the whole stdout is one JSON document
    assert set(created) == {"project_id", "name", "dashboard_token", "public_keys"}
    assert uuid.UUID(created["project_id"])
    assert created["name"] == "my app"
    assert isinstance(created["dashboard_token"], str)
    assert created["dashboard_token"].startswith("kbota_")
    assert len(created["dashboard_token"]) >= len("kbota_") + 43  # 32 random bytes, base64
    keys = created["public_keys"]
    assert list(keys) == ["production", "staging", "development"]
    assert LIVE_KEY.fullmatch(keys["production"])
    assert TEST_KEY.fullmatch(keys["staging"])
    assert TEST_KEY.fullmatch(keys["development"])
    assert len(set(keys.values())) == 3

    # Only hashes are stored: neither the token nor a key appears anywhere in the database.
    stored = database_bytes(tmp_path)
    for secret in [created["dashboard_token"], *keys.values()]:
        assert secret.encode() not in stored
        assert sha256_hex(secret).encode() in stored  # so this is the file that holds them


def test_project_list_shows_created_projects(tmp_path: Path) -> None:
    first, second = run_cli_all(
        tmp_path, [("project", "create", "first", "--json"), ("project", "create", "second")]
    )
    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    created = first.json()
    # Without --json the token and keys are shown once, for a person to copy.
    assert re.search(r"kbota_\S{43}", second.stdout)
    assert LIVE_KEY.search(second.stdout)
    assert len(TEST_KEY.findall(second.stdout)) == 2

    plain, as_json = run_cli_all(tmp_path, [("project", "list"), ("project", "list", "--json")])

    assert plain.returncode == 0, plain.stderr
    assert as_json.returncode == 0, as_json.stderr
    listed = as_json.json()
    assert sorted(row["name"] for row in listed) == ["first", "second"]
    by_name = {row["name"]: row for row in listed}
    assert by_name["first"]["project_id"] == created["project_id"]
    assert by_name["second"]["project_id"] in second.stdout
    for row in listed:
        assert set(row) == {"project_id", "name", "created_at"}
        assert dt.datetime.fromisoformat(row["created_at"]).tzinfo is not None
        assert f"{row['project_id']}  {row['name']}" in plain.stdout
    assert created["dashboard_token"] not in plain.stdout + as_json.stdout


def test_token_create_list_and_revoke(tmp_path: Path) -> None:
    project_id = create_project(tmp_path)["project_id"]
    before = dt.datetime.now(dt.UTC)

    args = ("token", "create", "--project", project_id, "--expires-in", "7", "--json")
    created = ok(tmp_path, *args).json()

    assert set(created) == {"token_id", "project_id", "dashboard_token", "expires_at"}
    assert created["project_id"] == project_id
    assert created["dashboard_token"].startswith("kbota_")
    expires_at = dt.datetime.fromisoformat(created["expires_at"])
    week_later = before + dt.timedelta(days=7)
    assert abs(expires_at - week_later) < dt.timedelta(minutes=1)
    stored = database_bytes(tmp_path)
    assert created["dashboard_token"].encode() not in stored
    assert sha256_hex(created["dashboard_token"]).encode() in stored

    revoked = ok(tmp_path, "token", "revoke", created["token_id"])
    assert created["token_id"] in revoked.stdout

    as_json, plain = run_cli_all(
        tmp_path,
        [
            ("token", "list", "--project", project_id, "--json"),
            ("token", "list", "--project", project_id),
        ],
    )
    assert as_json.returncode == 0, as_json.stderr
    assert plain.returncode == 0, plain.stderr
    states = {row["token_id"]: row["state"] for row in as_json.json()}
    assert len(states) == 2  # the token `project create` made, and this one
    assert states.pop(created["token_id"]) == "revoked"
    assert list(states.values()) == ["active"]
    for token_id in [created["token_id"], *states]:
        assert token_id in plain.stdout
    assert "revoked" in plain.stdout
    # When each expires: the one made with --expires-in, and the first (never).
    lines = {line.split()[0]: line for line in plain.stdout.splitlines()}
    assert lines[created["token_id"]].endswith(f"expires {created['expires_at']}")
    assert all(lines[token_id].endswith("never expires") for token_id in states)
    assert created["dashboard_token"] not in plain.stdout + as_json.stdout


def test_key_rotate_replaces_only_that_environment_key(tmp_path: Path) -> None:
    created = create_project(tmp_path)
    old_keys = created["public_keys"]

    args = ("key", "rotate", "--project", created["project_id"], "--environment", "staging")
    rotated = ok(tmp_path, *args, "--json").json()

    assert rotated == {"environment": "staging", "public_key": rotated["public_key"]}
    new_key = rotated["public_key"]
    assert TEST_KEY.fullmatch(new_key)
    assert new_key != old_keys["staging"]
    stored = database_bytes(tmp_path)
    assert new_key.encode() not in stored
    assert sha256_hex(new_key).encode() in stored
    assert sha256_hex(old_keys["staging"]).encode() not in stored
    for environment in ("production", "development"):
        assert sha256_hex(old_keys[environment]).encode() in stored


def test_db_upgrade_on_an_empty_data_dir(tmp_path: Path) -> None:
    data_dir = tmp_path / "fresh"  # does not exist yet

    ok(data_dir, "db", "upgrade")

    tables = {name for (name,) in query(data_dir, "SELECT name FROM sqlite_master")}
    assert {"alembic_version", "projects", "environments", "dashboard_tokens"} <= tables
    assert query(data_dir, "SELECT version_num FROM alembic_version")[0][0]
    # Only `serve` creates the `default` project.
    assert query(data_dir, "SELECT count(*) FROM projects") == [(0,)]
    assert not (data_dir / "credentials.json").exists()


def test_secret_key_is_generated_owner_only_and_reused(tmp_path: Path) -> None:
    key_file = tmp_path / "secret_key"

    ok(tmp_path, "db", "upgrade")

    assert mode(key_file) == 0o600
    first = key_file.read_text()
    assert len(first.strip()) >= 32
    ok(tmp_path, "db", "upgrade")  # a second run, on a migrated database
    assert key_file.read_text() == first
    assert mode(key_file) == 0o600


def test_bad_input_is_refused_with_one_error_line(tmp_path: Path) -> None:
    created = create_project(tmp_path)
    project_id = created["project_id"]
    unknown = str(uuid.uuid4())
    cases: list[tuple[tuple[str, ...], str]] = [
        (("token", "create", "--project", "not-a-uuid"), "not-a-uuid"),
        (("key", "rotate", "--project", unknown, "--environment", "staging"), "not found"),
        (("token", "revoke", unknown), "not found"),
        (("key", "rotate", "--project", project_id, "--environment", "qa"), "qa"),
    ]

    token = created["dashboard_token"]
    key = created["public_keys"]["production"]
    cases += [
        # A secret given where its id belongs is named, never shown whole (CI keeps stderr).
        (("token", "revoke", token), token[:14] + "…"),
        (("token", "create", "--project", key), key[:12] + "…"),
        (("token", "create", "--project", project_id, "--expires-in", "0"), "expires-in"),
        (("token", "create", "--project", project_id, "--expires-in", "3000000"), "expires-in"),
    ]

    results = run_cli_all(tmp_path, [args for args, _ in cases])
    for result in results:
        assert token not in result.stderr + result.stdout
        assert key not in result.stderr + result.stdout

    problems = [
        problem
        for result, (_, mention) in zip(results, cases, strict=True)
        for problem in cli_error_problems(result, mention)
    ]
    assert not problems, "\n".join(problems)
    # None of them changed anything.
    stored = database_bytes(tmp_path)
    for key in created["public_keys"].values():
        assert sha256_hex(key).encode() in stored
    assert query(tmp_path, "SELECT count(*), count(revoked_at) FROM dashboard_tokens") == [(1, 0)]


@pytest.mark.parametrize("content", ["", "\n", "short-but-not-empty"])
def test_a_secret_key_file_without_a_usable_key_is_refused(tmp_path: Path, content: str) -> None:
    """An empty key file (an older version's crash between creating and writing it) was
    used as it was: download URLs signed with an empty key, which anyone can forge."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "secret_key").write_text(content)
    result = run_cli(data_dir, "db", "upgrade")
    assert not cli_error_problems(result, "secret_key")
    assert (data_dir / "secret_key").read_text() == content  # left for the operator to see


def test_processes_starting_at_once_make_one_whole_secret_key(tmp_path: Path) -> None:
    with ThreadPoolExecutor(max_workers=8) as pool:
        keys = set(pool.map(lambda _: load_or_create_secret_key(tmp_path), range(32)))
    assert len(keys) == 1
    assert len(keys.pop()) >= 32
    assert [path.name for path in tmp_path.iterdir()] == ["secret_key"]  # no temporary left
    assert mode(tmp_path / "secret_key") == 0o600


def test_a_bad_setting_is_named_without_its_value(tmp_path: Path) -> None:
    secret = "a-short-but-real-secret"
    env = cli_env(tmp_path / "data", KOOLBASE_OTA_SECRET_KEY=secret)
    result = run_cli(tmp_path / "data", "project", "list", env=env)
    assert result.returncode == 1
    assert result.stderr.startswith("error: invalid configuration: KOOLBASE_OTA_SECRET_KEY")
    assert secret not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("host", "expected", "warned"),
    [
        ("127.0.0.1", "http://127.0.0.1:8091", False),
        ("10.1.2.3", "http://10.1.2.3:8091", False),
        ("::1", "http://[::1]:8091", False),
        ("0.0.0.0", "http://127.0.0.1:8091", True),
        # uvicorn's one worker binds `::` as IPv6 only: 127.0.0.1 answered nothing there.
        ("::", "http://[::1]:8091", True),
    ],
)
def test_serve_without_a_public_url_takes_the_address_served_on(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    host: str,
    expected: str,
    warned: bool,
) -> None:
    """What `serve --host HOST --port 8091` hands its workers (in the environment) and signs
    download URLs with when `KOOLBASE_OTA_PUBLIC_URL` is unset; on every address, a warning
    that the default reaches this machine only."""
    # Set through monkeypatch first, so that what `serve` sets itself is undone at the end.
    monkeypatch.setenv("KOOLBASE_OTA_PUBLIC_URL", "http://undone")
    for name in [name for name in os.environ if name.upper().startswith("KOOLBASE_OTA_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("KOOLBASE_OTA_DATA_DIR", str(tmp_path))
    args = argparse.Namespace(host=host, port=8091)
    settings = cli._served_public_url(args, Settings().resolved())
    assert settings.public_url == expected
    assert os.environ["KOOLBASE_OTA_PUBLIC_URL"] == expected
    assert Settings().public_url == expected  # as a worker reads it
    assert ("KOOLBASE_OTA_PUBLIC_URL is not set" in caplog.text) is warned
    # Set, it is left as it is.
    monkeypatch.setenv("KOOLBASE_OTA_PUBLIC_URL", "https://ota.example.com")
    chosen = cli._served_public_url(args, Settings().resolved())
    assert chosen.public_url == "https://ota.example.com"
    assert os.environ["KOOLBASE_OTA_PUBLIC_URL"] == "https://ota.example.com"
