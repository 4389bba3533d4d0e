"""The real `koolbase-ota serve` killed (SIGKILL, the whole process group) in the middle of an
upload's body: after a restart and `koolbase-ota gc`, nothing half-done is left anywhere."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

import httpx

from tests.api.test_upload import MULTIPART_TYPE, files_under, multipart, zip_of_size
from tests.conftest import eventually
from tests.test_cli import CONSOLE_SCRIPT, cli_env, query, run_cli
from tests.test_e2e import Server, auth, free_port, make_zip, serving, stop, wait_until_answering

BUNDLE_BYTES = 8 * 1024 * 1024


def launch_in_own_group(data_dir: Path) -> Server:
    """`serve` as the leader of a process group of its own, so the group can be killed whole
    (its workers included) without touching the test run."""
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    env = cli_env(data_dir, KOOLBASE_OTA_PUBLIC_URL=base_url)
    log_path = data_dir.parent / "killed.stderr.log"
    command = [str(CONSOLE_SCRIPT), "serve", "--host", "127.0.0.1", "--port", str(port)]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=log, start_new_session=True)
    return Server(process=process, base_url=base_url, data_dir=data_dir, log_path=log_path)


def test_a_server_killed_mid_upload_leaves_nothing_half_done(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    server = launch_in_own_group(data_dir)
    try:
        wait_until_answering(server)
        credentials = server.credentials()
        path = f"/v1/projects/{credentials['project_id']}/ota/upload"
        url = httpx.URL(server.base_url)
        assert url.port is not None
        head, tail = multipart({"channel": "production"})
        body = head + zip_of_size(BUNDLE_BYTES) + tail
        request = (
            f"POST {path} HTTP/1.1\r\nHost: {url.host}\r\n"
            f"Authorization: Bearer {credentials['dashboard_token']}\r\n"
            f"Content-Type: {MULTIPART_TYPE}\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        staged = data_dir / "tmp"
        with socket.create_connection((url.host, url.port), timeout=30) as sock:
            sock.sendall(request + body[: len(body) // 2])
            # Half the body is in: the bundle is being staged when the server dies.
            eventually(lambda: files_under(staged) != set(), "the upload being staged", within=10)
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait(timeout=10)
    finally:
        stop(server.process)
    # The staged file of the dead upload is still there: nobody was left to remove it.
    assert files_under(staged) != set()

    with serving(data_dir, "restarted") as restarted:
        token = auth(credentials["dashboard_token"])
        listing = httpx.get(
            f"{restarted.base_url}{path.removesuffix('/upload')}/bundles", headers=token
        )
        assert listing.json() == []
        result = run_cli(data_dir, "gc", "--grace-seconds", "0")
        assert result.returncode == 0, result.stdout + result.stderr
        assert files_under(staged) == set()
        assert files_under(data_dir / "bundles") == set()
        assert query(data_dir, "SELECT count(*) FROM bundles") == [(0,)]
        assert query(data_dir, "SELECT count(*) FROM pending_objects") == [(0,)]
        # The next upload works, and gets the first version: the dead one took nothing.
        response = httpx.post(
            restarted.base_url + path,
            headers=token,
            files={"bundle": ("b.zip", make_zip(), "application/zip")},
            timeout=30,
        )
        assert response.status_code == 201, response.text
        assert response.json()["version"] == 1
