"""Operations under review: settings that are refused at start with one line instead of being
used wrongly or failing later, and metrics whose series a client cannot multiply."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import httpx
import pytest
import uvicorn

from koolbase_ota.app import create_app
from koolbase_ota.httpserver import uvicorn_options
from tests.conftest import (
    assert_error,
    eventually,
    free_socket,
    new_project,
    released,
    start_server,
)
from tests.services import PostgresService
from tests.test_cli import CONSOLE_SCRIPT, CliResult, cli_env, cli_error_problems, run_cli
from tests.test_e2e import serving
from tests.test_hostile_requests import raw_request

#: Each bad setting, and what its one error line must name.
BAD_SETTINGS: list[tuple[dict[str, str], str]] = [
    # Refused only in each server worker, with a traceback, after `serve` had said it served.
    ({"KOOLBASE_OTA_STORAGE_URL": "ftp://bundles.example.com/x"}, "KOOLBASE_OTA_STORAGE_URL"),
    ({"KOOLBASE_OTA_STORAGE_URL": "/srv/bundles"}, "KOOLBASE_OTA_STORAGE_URL"),
    ({"KOOLBASE_OTA_STORAGE_URL": "s3://"}, "KOOLBASE_OTA_STORAGE_URL"),
    ({"KOOLBASE_OTA_CHECK_RATE_PER_KEY": "inf"}, "KOOLBASE_OTA_CHECK_RATE_PER_KEY"),
    # So small a rate that its interval was infinite: the limit was off.
    ({"KOOLBASE_OTA_CHECK_RATE_PER_ADDRESS": "1e-320"}, "KOOLBASE_OTA_CHECK_RATE_PER_ADDRESS"),
    ({"KOOLBASE_OTA_CHECK_RATE_PER_KEY": "1e-7"}, "KOOLBASE_OTA_CHECK_RATE_PER_KEY"),
    (
        {"KOOLBASE_OTA_CHECK_BURST_PER_ADDRESS": "1" + "0" * 12},
        "KOOLBASE_OTA_CHECK_BURST_PER_ADDRESS",
    ),
    ({"KOOLBASE_OTA_STORAGE_TIMEOUT_SECONDS": "inf"}, "KOOLBASE_OTA_STORAGE_TIMEOUT_SECONDS"),
    ({"KOOLBASE_OTA_STORAGE_TIMEOUT_SECONDS": "1e15"}, "KOOLBASE_OTA_STORAGE_TIMEOUT_SECONDS"),
    ({"KOOLBASE_OTA_DATABASE_TIMEOUT_SECONDS": "1e15"}, "KOOLBASE_OTA_DATABASE_TIMEOUT_SECONDS"),
    ({"KOOLBASE_OTA_DATABASE_CONNECTIONS": "0"}, "KOOLBASE_OTA_DATABASE_CONNECTIONS"),
    # A start on PostgreSQL holds two at once (found by review): one would never start.
    ({"KOOLBASE_OTA_DATABASE_CONNECTIONS": "1"}, "KOOLBASE_OTA_DATABASE_CONNECTIONS"),
    ({"KOOLBASE_OTA_DATABASE_CONNECTIONS": "1001"}, "KOOLBASE_OTA_DATABASE_CONNECTIONS"),
    ({"KOOLBASE_OTA_DATABASE_CONNECTIONS": "ten"}, "KOOLBASE_OTA_DATABASE_CONNECTIONS"),
    # Accepted, and then wrong without a word.
    ({"KOOLBASE_OTA_STORAGE_URL": "file://bundles/here"}, "KOOLBASE_OTA_STORAGE_URL"),
    ({"KOOLBASE_OTA_PUBLIC_URL": "ota.example.com"}, "KOOLBASE_OTA_PUBLIC_URL"),
    ({"KOOLBASE_OTA_PUBLIC_URL": "ftp://ota.example.com"}, "KOOLBASE_OTA_PUBLIC_URL"),
    ({"KOOLBASE_OTA_S3_ENDPOINT": "r2.example.com"}, "KOOLBASE_OTA_S3_ENDPOINT"),
    ({"KOOLBASE_OTA_CORS_ORIGINS": "dash.example.com"}, "KOOLBASE_OTA_CORS_ORIGINS"),
    ({"KOOLBASE_OTA_CORS_ORIGINS": "*"}, "KOOLBASE_OTA_CORS_ORIGINS"),
    # Set but empty (`KOOLBASE_OTA_X=$MISSING`): the default was used as if it were unset.
    ({"KOOLBASE_OTA_DATABASE_URL": ""}, "KOOLBASE_OTA_DATABASE_URL"),
    ({"KOOLBASE_OTA_STORAGE_URL": ""}, "KOOLBASE_OTA_STORAGE_URL"),
    ({"KOOLBASE_OTA_SECRET_KEY": ""}, "KOOLBASE_OTA_SECRET_KEY"),
    ({"KOOLBASE_OTA_PUBLIC_URL": ""}, "KOOLBASE_OTA_PUBLIC_URL"),
    ({"KOOLBASE_OTA_S3_REGION": ""}, "KOOLBASE_OTA_S3_REGION"),
]


@pytest.mark.parametrize(
    ("setting", "mention"), BAD_SETTINGS, ids=[str(setting) for setting, _ in BAD_SETTINGS]
)
def test_a_bad_setting_is_one_error_line_at_start(
    tmp_path: Path, setting: dict[str, str], mention: str
) -> None:
    data_dir = tmp_path / "data"
    result = run_cli(data_dir, "project", "list", env=cli_env(data_dir, **setting))
    assert not cli_error_problems(result, mention)
    assert not data_dir.exists()  # nothing was made with it


def test_an_empty_data_dir_is_refused_not_taken_as_the_working_directory(tmp_path: Path) -> None:
    env = cli_env(tmp_path, KOOLBASE_OTA_DATA_DIR="")
    # Run in tmp_path: before the fix, the database and the secret key went to the cwd.
    process = subprocess.run(
        [str(CONSOLE_SCRIPT), "project", "list"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    result = CliResult(("project", "list"), process.returncode, process.stdout, process.stderr)
    assert not cli_error_problems(result, "KOOLBASE_OTA_DATA_DIR")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "setting",
    [
        {"KOOLBASE_OTA_STORAGE_URL": "ftp://bundles.example.com/x"},
        {"KOOLBASE_OTA_CHECK_RATE_PER_KEY": "inf"},
    ],
    ids=str,
)
def test_serve_refuses_a_bad_setting_before_it_serves(
    tmp_path: Path, setting: dict[str, str]
) -> None:
    """Both were a traceback from the server worker, after the migration had run."""
    data_dir = tmp_path / "data"
    env = cli_env(data_dir, **setting)
    result = run_cli(data_dir, "serve", "--host", "127.0.0.1", "--port", "1", env=env)
    assert not cli_error_problems(result, next(iter(setting)))


def test_good_settings_of_each_checked_kind_are_still_taken(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    env = cli_env(
        data_dir,
        KOOLBASE_OTA_STORAGE_URL=f"file://localhost{tmp_path / 'bundles'}",
        KOOLBASE_OTA_PUBLIC_URL="https://ota.example.com/updates/",
        KOOLBASE_OTA_CORS_ORIGINS="https://dash.example.com/, capacitor://localhost",
        KOOLBASE_OTA_S3_ENDPOINT="http://127.0.0.1:9000",
        KOOLBASE_OTA_CHECK_RATE_PER_KEY="1e6",
        KOOLBASE_OTA_STORAGE_TIMEOUT_SECONDS="86400",
        KOOLBASE_OTA_TRUSTED_PROXIES="",
    )
    result = run_cli(data_dir, "project", "list", env=env)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("interface", ["asgi", "rsgi"])
def test_an_invented_method_adds_no_metrics_series(tmp_path: Path, interface: str) -> None:
    """granian hands on any token as the method: each one a client invented was a new series
    of the request counter and of the latency histogram, without end."""
    env = {"KOOLBASE_OTA_SERVER_INTERFACE": interface}
    with serving(tmp_path / "data", f"serve-{interface}", env=env) as server:
        for number in range(3):
            answer = raw_request(server.base_url, f"INVENTED{number}", "/healthz")
            assert answer.status == 405, answer
        metrics = httpx.get(server.base_url + "/metrics", timeout=30).text
    assert "INVENTED" not in metrics
    assert (
        'koolbase_ota_requests_total{method="other",route="/healthz",status="405"} 3.0' in metrics
    )


def test_a_server_started_while_the_database_is_down_serves_and_catches_up(
    tmp_path: Path,
) -> None:
    """Its start failed with a traceback (reading the change log's position), so a worker
    restarted during an outage served nothing, not even /healthz."""
    with PostgresService() as postgres:
        first = start_server(
            tmp_path, database_url=postgres.create_database(), database_timeout_seconds=2
        )
        project = new_project(first.db)
        with httpx.Client(base_url=first.base_url, timeout=30) as client:
            bundle = released(client, project)
        first.stop()
        postgres.stop()

        sock = free_socket()
        base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        app = create_app(first.settings.model_copy(update={"public_url": base_url}))
        server = uvicorn.Server(uvicorn.Config(app, log_level="critical", **uvicorn_options()))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        try:
            eventually(lambda: server.started or not thread.is_alive(), "the start", within=30)
            assert server.started, "the server did not start with the database down"
            with httpx.Client(base_url=base_url, timeout=30) as client:
                assert client.get("/healthz").status_code == 200
                assert client.get("/readyz").status_code == 503
                check = "/v1/sdk/ota/check?channel=production&version=0"
                assert_error(client.get(check, headers=project.key()), 503)
                postgres.start()

                def offered() -> bool:
                    response = client.get(check, headers=project.key())
                    return (
                        response.status_code == 200
                        and response.json()["checksum"] == bundle["checksum"]
                    )

                eventually(offered, "the check once the database is back", within=60)
                assert client.get("/readyz").status_code == 200
        finally:
            server.should_exit = True
            thread.join(timeout=10)
