"""`koolbase-ota audit`: the audit trail on the command line, run as a real process."""

from __future__ import annotations

import datetime as dt
import uuid
from pathlib import Path

from tests.test_cli import cli_error_problems, create_project, ok, run_cli_all


def test_audit_lists_command_line_changes_newest_first(tmp_path: Path) -> None:
    created = create_project(tmp_path)
    project_id = created["project_id"]
    token = ok(tmp_path, "token", "create", "--project", project_id, "--json").json()
    rotate = ("key", "rotate", "--project", project_id, "--environment", "production", "--json")
    new_key = ok(tmp_path, *rotate).json()["public_key"]
    ok(tmp_path, "token", "revoke", token["token_id"])

    as_json, plain, limited = run_cli_all(
        tmp_path,
        [
            ("audit", "--project", project_id, "--json"),
            ("audit", "--project", project_id),
            ("audit", "--project", project_id, "--limit", "2", "--json"),
        ],
    )

    for result in (as_json, plain, limited):
        assert result.returncode == 0, result.stderr
    trail = as_json.json()
    assert [event["action"] for event in trail] == [
        "token.revoke",
        "key.rotate",
        "token.create",
        "project.create",
    ]
    for event in trail:
        assert set(event) == {"id", "at", "actor", "action", "target", "details"}
        assert event["actor"] == "cli"
        assert dt.datetime.fromisoformat(event["at"]).tzinfo is not None
    revoked, rotated, token_created, project_created = trail
    assert revoked["target"] == token["token_id"]
    assert rotated["target"] == "production"
    assert rotated["details"] == {"environment": "production"}
    assert token_created["target"] == token["token_id"]
    assert project_created["target"] == project_id
    assert project_created["details"]["name"] == "demo"
    assert limited.json() == trail[:2]
    lines = plain.stdout.strip().splitlines()
    assert len(lines) == 4
    assert "cli  token.revoke  " + token["token_id"] in lines[0]
    assert "cli  project.create  " + project_id in lines[3]
    secrets = [created["dashboard_token"], token["dashboard_token"], new_key]
    for secret in [*secrets, *created["public_keys"].values()]:
        assert secret not in as_json.stdout + plain.stdout


def test_audit_refuses_bad_input_with_one_error_line(tmp_path: Path) -> None:
    project_id = create_project(tmp_path)["project_id"]
    cases: list[tuple[tuple[str, ...], str]] = [
        (("audit", "--project", "not-a-uuid"), "not-a-uuid"),
        (("audit", "--project", str(uuid.uuid4())), "not found"),
        (("audit", "--project", project_id, "--limit", "0"), "limit"),
        (("audit", "--project", project_id, "--limit", "1001"), "limit"),
        (("audit", "--project", project_id, "--limit", "many"), "many"),
    ]

    results = run_cli_all(tmp_path, [args for args, _ in cases])

    problems = [
        problem
        for result, (_, mention) in zip(results, cases, strict=True)
        for problem in cli_error_problems(result, mention)
    ]
    assert not problems, "\n".join(problems)


def test_audit_pages_through_a_trail_with_the_cursor_it_prints(tmp_path: Path) -> None:
    project_id = create_project(tmp_path)["project_id"]
    for _ in range(2):
        ok(tmp_path, "key", "rotate", "--project", project_id, "--environment", "staging")
    audit_trail = ("audit", "--project", project_id)
    whole, plain, first, refused = run_cli_all(
        tmp_path,
        [
            (*audit_trail, "--json"),
            (*audit_trail, "--limit", "2"),
            (*audit_trail, "--limit", "2", "--json"),
            (*audit_trail, "--cursor", "nope!"),
        ],
    )

    assert whole.returncode == 0, whole.stderr
    assert len(whole.json()) == 3
    assert whole.stderr == ""  # nothing follows the whole trail
    assert not cli_error_problems(refused, "cursor")
    # The plain form pages as --json does, its hint on stderr too.
    assert plain.returncode == 0, plain.stderr
    assert len(plain.stdout.strip().splitlines()) == 2
    assert "--cursor" in plain.stderr
    # --json still prints one JSON array; the next page's command is on stderr.
    assert first.returncode == 0, first.stderr
    (hint,) = first.stderr.strip().splitlines()
    prefix = "older events follow: koolbase-ota "
    assert hint.startswith(prefix)
    rest = ok(tmp_path, *hint.removeprefix(prefix).split(), "--json")
    assert rest.stderr == ""
    assert first.json() + rest.json() == whole.json()
    assert [len(first.json()), len(rest.json())] == [2, 1]
