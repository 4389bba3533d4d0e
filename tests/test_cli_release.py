"""`koolbase-ota channel ...` and `koolbase-ota bundle ...`, run as real processes against the
backends of a running server, whose checks must see what they change."""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import (
    BUNDLE_FIELDS,
    Project,
    RunningServer,
    eventually,
    make_zip,
    released,
    upload,
    uploaded,
)
from tests.test_cli import CliResult, cli_env, cli_error_problems, run_cli_all

CHECK = "/v1/sdk/ota/check"


class Cli:
    """The console script pointed at one server's database and store."""

    def __init__(self, server: RunningServer, data_dir: Path) -> None:
        self.env = cli_env(data_dir) | server.environment()
        self.data_dir = data_dir

    def all(self, *commands: Sequence[str]) -> list[CliResult]:
        return run_cli_all(self.data_dir, commands, env=self.env)

    def run(self, *args: str) -> CliResult:
        (result,) = self.all(args)
        return result

    def ok(self, *args: str) -> Any:
        """Run a command that must succeed with --json, and return what it printed."""
        result = self.run(*args, "--json")
        assert result.returncode == 0, result.stderr
        return result.json()


@pytest.fixture(scope="module")
def server(server_factory: Callable[..., RunningServer]) -> RunningServer:
    """A server of this module's own, which `project` and `client` use too.

    Not the session's shared one: other tests read that one's SQLite files directly, which drops
    the server process's POSIX locks on them (a close() of any descriptor of a file does), and
    then a CLI process closing its last connection believes it is alone, checkpoints and removes
    the write-ahead log under the server's feet.
    """
    return server_factory()


@pytest.fixture
def cli_both(server: RunningServer, tmp_path: Path) -> Cli:
    """The CLI on both backend pairs: for what touches the store (promote) or the release logic."""
    return Cli(server, tmp_path)


@pytest.fixture
def cli(server: RunningServer, backend: str, tmp_path: Path) -> Cli:
    """The CLI on the embedded default only: each run is a Python start-up, and the services
    behind these commands run on both pairs in the API suite."""
    if backend != "sqlite-local":
        pytest.skip("the command line layer is backend-independent; covered on sqlite-local")
    return Cli(server, tmp_path)


def api_bundles(client: httpx.Client, project: Project) -> list[dict[str, Any]]:
    response = client.get(project.path("/bundles"), headers=project.auth)
    assert response.status_code == 200, response.text
    found: list[dict[str, Any]] = response.json()
    return found


def audit_trail(client: httpx.Client, project: Project) -> list[dict[str, Any]]:
    response = client.get(f"/v1/projects/{project.id}/audit", headers=project.auth)
    assert response.status_code == 200, response.text
    found: list[dict[str, Any]] = response.json()
    return found


def check(client: httpx.Client, project: Project, **params: Any) -> dict[str, Any]:
    response = client.get(CHECK, params=params, headers=project.key())
    assert response.status_code == 200, response.text
    found: dict[str, Any] = response.json()
    return found


def assert_refused(results: list[CliResult], mentions: list[str]) -> None:
    problems = [
        problem
        for result, mention in zip(results, mentions, strict=True)
        for problem in cli_error_problems(result, mention)
    ]
    assert not problems, "\n".join(problems)


def test_channel_add_and_list(cli: Cli, client: httpx.Client, project: Project) -> None:
    pid = str(project.id)
    added = cli.ok("channel", "add", "--project", pid, "stable")

    assert set(added) == {"name", "created_at", "builtin"}
    assert (added["name"], added["builtin"]) == ("stable", False)
    listed, plain = cli.all(
        ("channel", "list", "--project", pid, "--json"), ("channel", "list", "--project", pid)
    )
    assert listed.returncode == plain.returncode == 0, listed.stderr + plain.stderr
    assert [row["name"] for row in listed.json()] == [
        "production",
        "staging",
        "development",
        "stable",
    ]
    assert listed.json()[3] == added
    assert plain.stdout.splitlines()[3].startswith("stable  added  created ")
    # The server's own list agrees, and the new channel takes uploads and checks.
    response = client.get(project.path("/channels"), headers=project.auth)
    assert response.json() == listed.json()
    bundle = released(client, project, channel="stable")
    eventually(
        lambda: check(client, project, channel="stable").get("version") == bundle["version"],
        "the channel added by the CLI",
    )
    (event,) = [e for e in audit_trail(client, project) if e["action"] == "channel.add"]
    assert (event["actor"], event["target"]) == ("cli", "stable")


def test_channel_commands_refuse_bad_input_with_one_error_line(cli: Cli, project: Project) -> None:
    pid = str(project.id)
    results = cli.all(
        ("channel", "add", "--project", pid, "production"),
        ("channel", "add", "--project", pid, "Bad Name"),
        ("channel", "add", "--project", str(uuid.uuid4()), "beta"),
        ("channel", "add", "--project", "nope", "beta"),
        ("channel", "list", "--project", str(uuid.uuid4())),
    )
    assert_refused(results, ["already has", "channel name", "not found", "nope", "not found"])
    listed = cli.ok("channel", "list", "--project", pid)
    assert [row["name"] for row in listed] == ["production", "staging", "development"]


def test_bundle_list_is_the_apis_list_and_filters_by_channel(
    cli: Cli, client: httpx.Client, project: Project
) -> None:
    pid = str(project.id)
    uploaded(client, project, channel="staging")
    uploaded(client, project, channel="production")
    uploaded(client, project, channel="production")

    everything = cli.ok("bundle", "list", "--project", pid)
    production = cli.ok("bundle", "list", "--project", pid, "--channel", "production")
    plain = cli.run("bundle", "list", "--project", pid, "--channel", "production")

    assert everything == api_bundles(client, project)
    assert all(set(bundle) == BUNDLE_FIELDS for bundle in everything)
    assert [(b["channel"], b["version"]) for b in production] == [
        ("production", 2),
        ("production", 1),
    ]
    lines = plain.stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{production[0]['id']}  production  v2  inactive")
    unknown, missing = cli.all(
        ("bundle", "list", "--project", pid, "--channel", "nightly"),
        ("bundle", "list", "--project", str(uuid.uuid4())),
    )
    assert_refused([unknown, missing], ["nightly", "not found"])


def test_activate_with_a_rollout_then_change_it(
    cli: Cli, client: httpx.Client, project: Project
) -> None:
    pid = str(project.id)
    bundle = uploaded(client, project)

    activated = cli.ok("bundle", "activate", "--project", pid, bundle["id"], "--rollout", "20")

    assert set(activated) == BUNDLE_FIELDS
    assert (activated["active"], activated["rollout_percentage"]) == (True, 20)
    assert activated["released_at"] is not None
    ramped = cli.ok("bundle", "rollout", "--project", pid, bundle["id"], "100")
    assert ramped["rollout_percentage"] == 100
    # At 100% every device is in, even one that sends no device id: the check sees the CLI.
    eventually(lambda: check(client, project).get("version") == 1, "activation by the CLI")
    actions = [(e["action"], e["actor"]) for e in audit_trail(client, project)[:2]]
    assert actions == [("bundle.update", "cli"), ("bundle.activate", "cli")]
    results = cli.all(
        ("bundle", "rollout", "--project", pid, bundle["id"], "0"),
        ("bundle", "rollout", "--project", pid, bundle["id"], "ten"),
        ("bundle", "activate", "--project", pid, bundle["id"], "--rollout", "101"),
        ("bundle", "activate", "--project", pid, str(uuid.uuid4())),
        ("bundle", "activate", "--project", pid, "not-a-uuid"),
        ("bundle", "rollout", "--project", pid, bundle["id"]),
    )
    assert_refused(
        results,
        ["rollout_percentage", "rollout_percentage", "rollout_percentage", "not found",
         "not-a-uuid", "N"],
    )  # fmt: skip
    assert api_bundles(client, project)[0]["rollout_percentage"] == 100


def test_target_sets_and_clears_platform_and_app_versions(
    cli: Cli, client: httpx.Client, project: Project
) -> None:
    pid = str(project.id)
    bundle_id = uploaded(client, project)["id"]

    targeted = cli.ok(
        "bundle", "target", "--project", pid, bundle_id,
        "--platform", "ios", "--min-app-version", "2.0", "--max-app-version", "2.9.9",
    )  # fmt: skip
    assert (targeted["platform"], targeted["min_app_version"], targeted["max_app_version"]) == (
        "ios",
        "2.0",
        "2.9.9",
    )
    widened = cli.ok("bundle", "target", "--project", pid, bundle_id, "--any-platform")
    assert (widened["platform"], widened["min_app_version"]) == (None, "2.0")
    cleared = cli.ok("bundle", "target", "--project", pid, bundle_id, "--any-app-version")
    assert (cleared["min_app_version"], cleared["max_app_version"]) == (None, None)

    results = cli.all(
        ("bundle", "target", "--project", pid, bundle_id),
        ("bundle", "target", "--project", pid, bundle_id, "--platform", "windows"),
        ("bundle", "target", "--project", pid, bundle_id, "--min-app-version", "two"),
        ("bundle", "target", "--project", pid, bundle_id, "--min-app-version", "3",
         "--max-app-version", "2"),
        ("bundle", "target", "--project", pid, bundle_id, "--platform", "ios", "--any-platform"),
    )  # fmt: skip
    mentions = [
        "nothing to change",
        "platform",
        "min_app_version",
        "min_app_version",
        "not allowed",
    ]
    assert_refused(results, mentions)
    assert api_bundles(client, project) == [cleared]


def test_recall_sends_the_channel_back_to_the_previous_release(
    cli_both: Cli, client: httpx.Client, project: Project
) -> None:
    cli, pid = cli_both, str(project.id)
    good = released(client, project)
    bad = released(client, project)
    eventually(lambda: check(client, project).get("version") == 2, "the bad release")

    recalled = cli.ok("bundle", "recall", "--project", pid, bad["id"])

    assert recalled["recalled_at"] is not None
    assert recalled["active"] is False
    eventually(lambda: check(client, project).get("version") == 1, "the recall by the CLI")
    assert check(client, project)["checksum"] == good["checksum"]
    (event,) = [e for e in audit_trail(client, project) if e["action"] == "bundle.recall"]
    assert (event["actor"], event["target"]) == ("cli", bad["id"])
    refused = cli.run("bundle", "promote", "--project", pid, bad["id"], "--channel", "staging")
    assert_refused([refused], ["recalled"])


def test_promote_copies_in_the_store_and_can_activate(
    server: RunningServer, cli_both: Cli, client: httpx.Client, project: Project
) -> None:
    cli, pid = cli_both, str(project.id)
    data = make_zip({"config.json": '{"banner": "promoted by the CLI"}'})
    response = upload(client, project, data, channel="staging", release_notes="From staging")
    assert response.status_code == 201, response.text
    source = response.json()
    released(client, project, channel="production")

    copy = cli.ok(
        "bundle", "promote", "--project", pid, source["id"],
        "--channel", "production", "--activate", "--rollout", "100",
    )  # fmt: skip

    assert set(copy) == BUNDLE_FIELDS
    assert (copy["channel"], copy["version"], copy["active"]) == ("production", 2, True)
    assert copy["promoted_from"] == source["id"]
    assert copy["checksum"] == source["checksum"] == "sha256:" + hashlib.sha256(data).hexdigest()
    assert copy["release_notes"] == "From staging"
    assert server.read_object(copy["storage_path"]) == data
    eventually(lambda: check(client, project).get("version") == 2, "the promoted copy")
    assert check(client, project)["checksum"] == source["checksum"]
    trail = audit_trail(client, project)
    assert [(e["action"], e["actor"]) for e in trail[:2]] == [
        ("bundle.activate", "cli"),
        ("bundle.promote", "cli"),
    ]
    assert dt.datetime.fromisoformat(trail[0]["at"]).tzinfo is not None

    plain = cli.run(
        "bundle", "promote", "--project", pid, source["id"], "--channel", "development",
        "--release-notes", "", "--mandatory",
    )  # fmt: skip
    assert plain.returncode == 0, plain.stderr
    assert "  development  v1  inactive  mandatory  from " + source["id"] in plain.stdout
    results = cli.all(
        ("bundle", "promote", "--project", pid, source["id"], "--channel", "nightly"),
        ("bundle", "promote", "--project", pid, source["id"]),
        ("bundle", "promote", "--project", pid, str(uuid.uuid4()), "--channel", "staging"),
        ("bundle", "promote", "--project", pid, source["id"], "--channel", "staging",
         "--rollout", "0"),
    )  # fmt: skip
    assert_refused(results, ["nightly", "--channel", "not found", "rollout_percentage"])
    assert len(api_bundles(client, project)) == 4
