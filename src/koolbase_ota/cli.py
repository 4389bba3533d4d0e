"""The `koolbase-ota` command: serve, project, token, key, channel, bundle, audit, db, gc, move."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import logging
import logging.config
import os
import shutil
import signal
import socket
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from pydantic import ValidationError
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from koolbase_ota import __version__, audit, starting
from koolbase_ota.clock import rfc3339
from koolbase_ota.config import SECRET_KEY_FILE, Settings
from koolbase_ota.db import (
    Database,
    DatabaseUnreachable,
    create_db_engine,
    is_sqlite,
    migration_lock,
    upgrade_schema,
)
from koolbase_ota.errors import OTAError
from koolbase_ota.logs import ACCESS_LOG_FORMAT, logging_config, redact
from koolbase_ota.projects import channels
from koolbase_ota.projects import service as projects
from koolbase_ota.projects.channels import ChannelInfo
from koolbase_ota.projects.models import DashboardToken
from koolbase_ota.projects.service import CreatedProject
from koolbase_ota.storage import open_store

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from koolbase_ota.bundles.models import Bundle

logger = logging.getLogger("koolbase_ota")
CREDENTIALS_FILE = "credentials.json"


class CliError(Exception):
    """A failure to report on one line, without a traceback."""


def _settings(*, create: bool = True) -> Settings:
    try:
        return Settings().resolved(create=create)
    except ValidationError as exc:
        # Name the variable and the rule, never the value: it may be a secret.
        problems = "; ".join(
            "KOOLBASE_OTA_"
            + "_".join(str(part) for part in error["loc"]).upper()
            + f": {error['msg']}"
            for error in exc.errors(include_input=False)
        )
        raise CliError(f"invalid configuration: {problems}") from None
    except OSError as exc:
        raise CliError(f"cannot use the data directory: {exc.strerror}") from None


def _database(settings: Settings, *, announce: bool = False, wait: bool = False) -> Database:
    """The database, migrated to the newest schema first; with `wait` (serve), a PostgreSQL
    database that cannot be used yet is tried again for up to `database_start_wait_seconds`."""
    engine = create_db_engine(
        settings.database_url,
        timeout_seconds=settings.database_timeout_seconds,
        connections=settings.database_connections,
    )
    _ENGINES.append(engine)
    if wait and not is_sqlite(engine):
        revision = _upgrade_when_reachable(engine, settings)
    else:
        revision = upgrade_schema(engine, lock_dir=settings.data_dir)
    if revision is not None and announce:
        logger.info("migrated the database to revision %s", revision)
    return Database(engine)


#: The longest pause between two tries of a database `serve` cannot reach as it starts.
START_RETRY_MAX_SECONDS = 5.0


def _upgrade_when_reachable(engine: Engine, settings: Settings) -> str | None:
    """`upgrade_schema`, tried again while the database cannot be connected to, for up to
    `database_start_wait_seconds` (0.5 s, then twice as long each time up to 5 s apart), plus
    the attempt under way then.

    A server and its database started together (a compose file, a host booting) found it not
    yet accepting connections, exited, and a service manager that gives up after a few quick
    failures (systemd's default) left it down. The reason is logged when it is new, so a wrong
    password is in the log at the first try. Only a connection that could not be made is tried
    again: not a migration that failed, a URL libpq refuses, or a schema a newer version
    migrated. SIGTERM ends the wait also where it is ignored by default (PID 1 in a container).
    """
    began = time.monotonic()
    deadline = began + settings.database_start_wait_seconds
    pause, logged = 0.5, ""
    with _exiting_on(signal.SIGTERM):
        while True:
            try:
                revision = upgrade_schema(engine, lock_dir=settings.data_dir)
            except DatabaseUnreachable as exc:
                left = deadline - time.monotonic()
                if left <= 0:
                    if not logged:
                        raise
                    waited = time.monotonic() - began
                    raise DatabaseUnreachable(f"{exc} (tried for {waited:.1f} s)") from None
                if str(exc) != logged:
                    logged = str(exc)
                    logger.warning(
                        "%s; trying again for up to %.1f s"
                        " (KOOLBASE_OTA_DATABASE_START_WAIT_SECONDS)",
                        logged,
                        left,
                    )
                time.sleep(min(pause, left))
                pause = min(pause * 2, START_RETRY_MAX_SECONDS)
                continue
            if logged:
                logger.info("the database can be used now")
            return revision


@contextlib.contextmanager
def _exiting_on(*signals: signal.Signals) -> Iterator[None]:
    """Inside the block, each of `signals` exits (status 128 + its number) by SystemExit, so
    cleanups run; also as PID 1 in a container, where SIGTERM is otherwise ignored."""

    def exit_(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = {number: signal.signal(number, exit_) for number in signals}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


#: Every engine this command opened, closed by `run` before it exits (SQLite checkpoints its
#: write-ahead log when the last connection closes).
_ENGINES: list[Engine] = []


def _uuid(raw: str, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        # Redacted: a token or key given where its id belongs must not reach the CI log.
        raise CliError(f"{what} must be a UUID, got {redact(raw)!r}") from None


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


def _created_json(created: CreatedProject) -> dict[str, Any]:
    return {
        "project_id": str(created.project.id),
        "name": created.project.name,
        "dashboard_token": created.dashboard_token,
        "public_keys": created.public_keys,
    }


def write_private_json(path: Path, data: Any) -> None:
    """Write a file only its owner can read; it is created with those rights, never widened,
    and is on disk when this returns."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())


def ensure_default_project(settings: Settings, db: Database) -> Path | None:
    """On a server with no project at all, create `default` and write its credentials."""
    with migration_lock(db.engine, settings.data_dir):
        if projects.has_any_project(db):
            return None
        path = settings.data_dir / CREDENTIALS_FILE

        def write_down(created: CreatedProject) -> None:
            # Before the commit: a project whose credentials could not be written (a full
            # disk) is not made, and the next start tries again.
            try:
                path.unlink(missing_ok=True)  # one of a start that failed to commit
                write_private_json(path, _created_json(created))
            except OSError as exc:
                with contextlib.suppress(OSError):
                    if path.is_file():
                        path.unlink()  # ours, written in part
                raise CliError(f"could not write {path}: {exc.strerror}") from None

        projects.create_project(db, name="default", before_commit=write_down)
        return path


def _set_in_environment(name: str) -> bool:
    """Whether the variable is set (settings are read from it in any letter case)."""
    return any(variable.upper() == name for variable in os.environ)


#: Addresses that mean "every address of this machine" when served on, and the loopback
#: address that answers there (`::` takes IPv4 too only where the system allows it).
_WILDCARD_HOSTS = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}


def _served_public_url(args: argparse.Namespace, settings: Settings) -> Settings:
    """`settings` with the public URL at the address and port served on, unless it is set.

    Its default was fixed at port 8080: served on another port (`make run PORT=8091`), the
    download URLs handed out pointed at port 8080, which answered nothing, or another
    server's 403. The workers read it from the environment, so it is set there too.
    """
    if _set_in_environment("KOOLBASE_OTA_PUBLIC_URL"):
        return settings
    host = _WILDCARD_HOSTS.get(args.host, args.host)
    public_url = f"http://{f'[{host}]' if ':' in host else host}:{args.port}"
    os.environ["KOOLBASE_OTA_PUBLIC_URL"] = public_url
    if args.host in _WILDCARD_HOSTS:
        logger.warning(
            "KOOLBASE_OTA_PUBLIC_URL is not set: the URLs the server hands out (downloads on "
            "local storage, pagination links) point at %s, which only this machine reaches; "
            "set it to the address devices and the dashboard use",
            public_url,
        )
    return settings.model_copy(update={"public_url": public_url})


def cmd_serve(args: argparse.Namespace) -> None:
    # First, so that connections taken while the database gets ready count against it too.
    _raise_open_file_limit()
    try:
        sockets = starting.listening_sockets(args.host, args.port)
    except OSError as exc:
        raise CliError(f"cannot listen on {args.host}:{args.port}: {exc.strerror}") from None
    try:
        _serve_on(args, sockets)
    finally:
        for sock in sockets:
            sock.close()  # the workers' copies are theirs; this process has served


def _serve_on(args: argparse.Namespace, sockets: list[socket.socket]) -> None:
    settings = _served_public_url(args, _settings())
    if settings.s3_endpoint and not settings.storage_url.startswith("s3://"):
        # A deployment that set up its bucket but not the storage URL would otherwise keep
        # every bundle on this machine's disk without a word.
        logger.warning(
            "KOOLBASE_OTA_S3_ENDPOINT is set but KOOLBASE_OTA_STORAGE_URL is not an s3:// URL: "
            "bundles are stored in %s (set KOOLBASE_OTA_STORAGE_URL=s3://BUCKET/PREFIX to "
            "store them in S3)",
            settings.storage_url,
        )
    # Until the workers take the sockets, health probes and clients get answers (503 but for
    # /healthz), not refused connections, however long the database takes.
    responder = starting.Responder(sockets)
    responder.start()
    try:
        _make_ready(settings)
    finally:
        responder.stop()
    if args.workers > 1:
        # Each worker counts in files here; /metrics on any worker adds them all up.
        metrics_dir = settings.data_dir / "metrics"
        shutil.rmtree(metrics_dir, ignore_errors=True)
        metrics_dir.mkdir(mode=0o700)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    logger.info(
        "serving on http://%s:%s with %d worker(s) (data in %s)",
        args.host,
        args.port,
        args.workers,
        settings.data_dir,
    )
    if settings.server_interface == "uvicorn":
        _serve_uvicorn(args, settings, sockets)
    else:
        # granian binds the address itself: it is free again a moment before it does.
        for sock in sockets:
            sock.close()
        _serve_granian(args, settings)


def _make_ready(settings: Settings) -> None:
    """The database migrated (waited for, on PostgreSQL) and a first project made."""
    db = _database(settings, announce=True, wait=True)
    if not is_sqlite(db.engine) and not _set_in_environment("KOOLBASE_OTA_SECRET_KEY"):
        # Processes each with a data dir of their own made a key each: every one signed the
        # code-push answers (and embedded download URLs) with its own, without a word.
        logger.warning(
            "KOOLBASE_OTA_SECRET_KEY is not set: this process signs with the key in %s; "
            "every process sharing this database must sign with the same key, so set it to "
            "the same value in each",
            settings.data_dir / SECRET_KEY_FILE,
        )
    credentials = ensure_default_project(settings, db)
    if credentials is not None:
        logger.info("created project 'default'; its credentials are in %s", credentials)
    db.dispose()


#: Where the hard limit is unlimited, the soft one is raised this far.
OPEN_FILES_WANTED = 65536


def _raise_open_file_limit() -> None:
    """Every connection is an open file. Services often start with a soft limit of 1024, which
    a thousand devices kept alive (75 s) would use up, and then no check is accepted at all:
    the soft limit is raised to the hard one, as Go's runtime and nginx's workers do. Workers
    inherit it."""
    try:
        import resource
    except ImportError:  # not on Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = OPEN_FILES_WANTED if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError):  # a hard limit we may not reach (macOS's kern.maxfiles)
            logger.warning("could not raise the open file limit from %d", soft)


def _serve_uvicorn(
    args: argparse.Namespace, settings: Settings, sockets: list[socket.socket]
) -> None:
    """uvicorn with our protocol (`koolbase_ota.httpserver`), on the sockets `serve` listens
    on: warm checks answered inside the HTTP parser's callbacks, files sent with sendfile(2).

    What `uvicorn.run` does, given sockets: its workers (`--workers N`) or its one server
    take the sockets listened on since the start, with the connections queued on them.
    """
    import uvicorn
    from uvicorn.config import STARTUP_FAILURE
    from uvicorn.supervisors import Multiprocess

    from koolbase_ota.httpserver import uvicorn_options

    config = uvicorn.Config(
        "koolbase_ota.app:create_app_from_env",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        backlog=starting.BACKLOG,
        log_config=logging_config(settings.log_format),
        timeout_graceful_shutdown=10,
        timeout_worker_healthcheck=WORKER_HEALTHCHECK_SECONDS,
        **uvicorn_options(),
    )
    server = uvicorn.Server(config)
    with contextlib.suppress(KeyboardInterrupt):
        if config.workers > 1:
            Multiprocess(config, sockets=sockets).run()
        else:
            server.run(sockets=sockets)
    if config.workers == 1 and not server.started:
        sys.exit(STARTUP_FAILURE)


#: How long uvicorn's supervisor waits for a worker (`--workers N`) to answer its health ping
#: before it kills and replaces it. Its default, 5 s, replaced workers that were only starved
#: of CPU (a first start on a loaded host, a burst of traffic): a cold worker in their place
#: cost more CPU and database reads, just when the host had the least to give.
WORKER_HEALTHCHECK_SECONDS = 30


def _serve_granian(args: argparse.Namespace, settings: Settings) -> None:
    """granian, a Rust HTTP server: on its RSGI interface (koolbase_ota.rsgi) it sends download
    files and ranges without their bytes passing through Python."""
    from granian.constants import HTTPModes, Interfaces, RuntimeModes
    from granian.http import HTTP1Settings
    from granian.server import Server

    from koolbase_ota.httpserver import MAX_HEAD_BYTES

    rsgi = settings.server_interface == "rsgi"
    Server(
        "koolbase_ota.rsgi:create_rsgi_app_from_env"
        if rsgi
        else "koolbase_ota.app:create_app_from_env",
        factory=True,
        interface=Interfaces.RSGI if rsgi else Interfaces.ASGI,
        # Devices speak HTTP/1.1 (h2 needs TLS, which a load balancer terminates), and one
        # runtime thread per worker measured faster on the check than several.
        http=HTTPModes.http1,
        # A client that never finishes its headers (slowloris) is cut off. The read buffer
        # bounds a request head: at MAX_HEAD_BYTES, a head over two to three times that is 431
        # (at granian's 408 KiB, heads of up to a megabyte were read); its parser's 100
        # headers are ours.
        http1_settings=HTTP1Settings(
            header_read_timeout=int(settings.header_timeout_seconds * 1000),
            max_buffer_size=MAX_HEAD_BYTES,
        ),
        runtime_mode=RuntimeModes.st,
        address=args.host,
        port=args.port,
        workers=args.workers,
        log_dictconfig=logging_config(settings.log_format),
        log_access=settings.access_log,
        log_access_format=ACCESS_LOG_FORMAT,
        workers_kill_timeout=10,
    ).serve()


def cmd_project_create(args: argparse.Namespace) -> None:
    created = projects.create_project(_database(_settings()), name=args.name)
    if args.json:
        _print_json(_created_json(created))
        return
    print(f"project:         {created.project.id} ({created.project.name})")
    print(f"dashboard token: {created.dashboard_token}   (shown only now)")
    for environment, key in created.public_keys.items():
        print(f"{environment + ' key:':17}{key}")


def cmd_project_list(args: argparse.Namespace) -> None:
    found = projects.list_projects(_database(_settings()))
    rows = [
        {"project_id": str(p.id), "name": p.name, "created_at": rfc3339(p.created_at)}
        for p in found
    ]
    if args.json:
        _print_json(rows)
        return
    for row in rows:
        print(f"{row['project_id']}  {row['name']}  {row['created_at']}")


def cmd_token_create(args: argparse.Namespace) -> None:
    row, token = projects.create_token(
        _database(_settings()),
        project_id=_uuid(args.project, "--project"),
        expires_in_days=args.expires_in,
    )
    data = {
        "token_id": str(row.id),
        "project_id": str(row.project_id),
        "dashboard_token": token,
        "expires_at": rfc3339(row.expires_at) if row.expires_at else None,
    }
    if args.json:
        _print_json(data)
        return
    print(f"token id:        {data['token_id']}")
    print(f"dashboard token: {token}   (shown only now)")
    print(f"expires:         {data['expires_at'] or 'never'}")


def _token_json(row: DashboardToken) -> dict[str, Any]:
    now = dt.datetime.now(dt.UTC)
    state = "active"
    if row.revoked_at is not None:
        state = "revoked"
    elif row.expires_at is not None and row.expires_at <= now:
        state = "expired"
    return {
        "token_id": str(row.id),
        "prefix": row.token_prefix + "...",
        "created_at": rfc3339(row.created_at),
        "expires_at": rfc3339(row.expires_at) if row.expires_at else None,
        "revoked_at": rfc3339(row.revoked_at) if row.revoked_at else None,
        "state": state,
    }


def cmd_token_list(args: argparse.Namespace) -> None:
    db = _database(_settings())
    project_id = _uuid(args.project, "--project")
    projects.get_project(db, project_id=project_id)
    rows = [_token_json(row) for row in projects.list_tokens(db, project_id=project_id)]
    if args.json:
        _print_json(rows)
        return
    for row in rows:
        expires = f"expires {row['expires_at']}" if row["expires_at"] else "never expires"
        print(
            f"{row['token_id']}  {row['prefix']}  {row['state']}  created {row['created_at']}"
            f"  {expires}"
        )


def cmd_token_revoke(args: argparse.Namespace) -> None:
    row = projects.revoke_token(_database(_settings()), token_id=_uuid(args.token_id, "TOKEN_ID"))
    print(f"revoked token {row.id}")


def cmd_key_rotate(args: argparse.Namespace) -> None:
    key = projects.rotate_key(
        _database(_settings()),
        project_id=_uuid(args.project, "--project"),
        environment=args.environment,
    )
    if args.json:
        _print_json({"environment": args.environment, "public_key": key})
        return
    print(f"new {args.environment} key: {key}   (the old key no longer works)")


def cmd_audit(args: argparse.Namespace) -> None:
    db = _database(_settings())
    project_id = _uuid(args.project, "--project")
    projects.get_project(db, project_id=project_id)
    page = audit.list_event_page(db, project_id=project_id, limit=args.limit, cursor=args.cursor)
    rows = [
        {
            "id": str(event.id),
            "at": rfc3339(event.at),
            "actor": event.actor,
            "action": event.action,
            "target": event.target,
            "details": event.details,
        }
        for event in page.events
    ]
    if args.json:
        _print_json(rows)
    else:
        for row in rows:
            details = json.dumps(row["details"], sort_keys=True)
            print(f"{row['at']}  {row['actor']}  {row['action']}  {row['target']}  {details}")
    if page.next_cursor is not None:
        # On stderr, so that --json still prints one JSON array and nothing else.
        sys.stdout.flush()
        print(
            f"older events follow: koolbase-ota audit --project {project_id} --limit "
            f"{args.limit} --cursor {page.next_cursor}",
            file=sys.stderr,
        )


def _channel_json(info: ChannelInfo) -> dict[str, Any]:
    return {"name": info.name, "created_at": rfc3339(info.created_at), "builtin": info.builtin}


def cmd_channel_add(args: argparse.Namespace) -> None:
    info = channels.add_channel(
        _database(_settings()), project_id=_uuid(args.project, "--project"), name=args.name
    )
    if args.json:
        _print_json(_channel_json(info))
        return
    print(f"added channel {info.name}")


def cmd_channel_list(args: argparse.Namespace) -> None:
    found = channels.list_channels(
        _database(_settings()), project_id=_uuid(args.project, "--project")
    )
    rows = [_channel_json(info) for info in found]
    if args.json:
        _print_json(rows)
        return
    for row in rows:
        kind = "built-in" if row["builtin"] else "added"
        print(f"{row['name']}  {kind}  created {row['created_at']}")


# The bundle commands import the bundle modules when they run, as `gc` does: every other
# command starts faster without them.


def _bundle_json(bundle: Bundle) -> dict[str, Any]:
    """The bundle object exactly as the API answers it."""
    from koolbase_ota.bundles.schemas import BundleOut

    data: dict[str, Any] = BundleOut.of(bundle).model_dump(mode="json")
    return data


def _bundle_line(bundle: Bundle) -> str:
    parts = [str(bundle.id), bundle.channel, f"v{bundle.version}"]
    if bundle.recalled_at is not None:
        parts.append("recalled")
    elif bundle.active:
        parts.append(f"active {bundle.rollout_percentage}%")
    elif bundle.released_at is not None:
        parts.append("released")
    else:
        parts.append("inactive")
    if bundle.mandatory:
        parts.append("mandatory")
    if bundle.platform:
        parts.append(bundle.platform)
    if bundle.min_app_version or bundle.max_app_version:
        parts.append(f"app {bundle.min_app_version or '*'}-{bundle.max_app_version or '*'}")
    if bundle.promoted_from is not None:
        parts.append(f"from {bundle.promoted_from}")
    return "  ".join(parts)


def _show_bundle(bundle: Bundle, args: argparse.Namespace) -> None:
    if args.json:
        _print_json(_bundle_json(bundle))
        return
    print(_bundle_line(bundle))


def cmd_bundle_list(args: argparse.Namespace) -> None:
    from koolbase_ota.bundles import service as bundles

    db = _database(_settings())
    project_id = _uuid(args.project, "--project")
    projects.get_project(db, project_id=project_id)
    if args.channel is not None:
        bundles.check_channel(db, project_id=project_id, channel=args.channel)
    found = [
        bundle
        for bundle in bundles.list_bundles(db, project_id=project_id)
        if args.channel is None or bundle.channel == args.channel
    ]
    if args.json:
        _print_json([_bundle_json(bundle) for bundle in found])
        return
    for bundle in found:
        print(_bundle_line(bundle))


def cmd_bundle_activate(args: argparse.Namespace) -> None:
    from koolbase_ota.bundles import service as bundles
    from koolbase_ota.bundles import targeting

    bundle = bundles.activate_bundle(
        _database(_settings()),
        project_id=_uuid(args.project, "--project"),
        bundle_id=_uuid(args.bundle_id, "BUNDLE_ID"),
        rollout_percentage=(
            None if args.rollout is None else targeting.parse_rollout_percentage(args.rollout)
        ),
    )
    _show_bundle(bundle, args)


def cmd_bundle_rollout(args: argparse.Namespace) -> None:
    from koolbase_ota.bundles import service as bundles

    bundle = bundles.update_bundle(
        _database(_settings()),
        project_id=_uuid(args.project, "--project"),
        bundle_id=_uuid(args.bundle_id, "BUNDLE_ID"),
        fields={"rollout_percentage": args.percentage},
    )
    _show_bundle(bundle, args)


def cmd_bundle_target(args: argparse.Namespace) -> None:
    from koolbase_ota.bundles import service as bundles

    fields: dict[str, object] = {}
    if args.any_platform:
        fields["platform"] = None
    elif args.platform is not None:
        fields["platform"] = args.platform
    if args.any_app_version:
        fields["min_app_version"] = fields["max_app_version"] = None
    if args.min_app_version is not None:
        fields["min_app_version"] = args.min_app_version
    if args.max_app_version is not None:
        fields["max_app_version"] = args.max_app_version
    if not fields:
        raise CliError(
            "nothing to change: give --platform, --any-platform, --min-app-version, "
            "--max-app-version or --any-app-version"
        )
    bundle = bundles.update_bundle(
        _database(_settings()),
        project_id=_uuid(args.project, "--project"),
        bundle_id=_uuid(args.bundle_id, "BUNDLE_ID"),
        fields=fields,
    )
    _show_bundle(bundle, args)


def cmd_bundle_recall(args: argparse.Namespace) -> None:
    from koolbase_ota.bundles import service as bundles

    bundle = bundles.recall_bundle(
        _database(_settings()),
        project_id=_uuid(args.project, "--project"),
        bundle_id=_uuid(args.bundle_id, "BUNDLE_ID"),
    )
    _show_bundle(bundle, args)


def cmd_bundle_promote(args: argparse.Namespace) -> None:
    from koolbase_ota.bundles import promote, targeting

    settings = _settings()
    project_id = _uuid(args.project, "--project")
    bundle_id = _uuid(args.bundle_id, "BUNDLE_ID")
    promotion = promote.Promotion(
        channel=args.channel,
        activate=args.activate,
        rollout_percentage=(
            None if args.rollout is None else targeting.parse_rollout_percentage(args.rollout)
        ),
        release_notes=promote.KEEP if args.release_notes is None else args.release_notes,
        mandatory=args.mandatory,
    )
    bundle = asyncio.run(
        promote.promote_bundle(
            db=_database(settings),
            store=open_store(settings),
            project_id=project_id,
            bundle_id=bundle_id,
            promotion=promotion,
        )
    )
    _show_bundle(bundle, args)


def cmd_db_upgrade(_args: argparse.Namespace) -> None:
    _database(_settings(), announce=True)
    print("the database schema is up to date")


def cmd_gc(args: argparse.Namespace) -> None:
    from koolbase_ota.bundles.gc import collect_garbage

    settings = _settings()
    db = _database(settings)
    store = open_store(settings)
    report = asyncio.run(
        collect_garbage(
            db=db,
            store=store,
            grace=dt.timedelta(seconds=args.grace_seconds),
            tmp_dir=settings.data_dir / "tmp",
        )
    )
    if args.json:
        _print_json({"removed": report.removed, "missing": report.missing, "failed": report.failed})
    else:
        for path in report.removed:
            print(f"removed  {path}")
        for path in report.failed:
            print(f"FAILED   {path} (still there; run gc again)")
        for path in report.missing:
            print(f"MISSING  {path} (a bundle row whose file is gone)")
        print(
            f"{len(report.removed)} removed, {len(report.failed)} failed, "
            f"{len(report.missing)} missing"
        )
    if report.failed or report.missing:
        raise SystemExit(1)


def cmd_backup(args: argparse.Namespace) -> None:
    import sqlite3

    from koolbase_ota.backup import back_up

    # Neither the data dir nor a key is made for a command that only reads an install (a
    # mistyped KOOLBASE_OTA_DATA_DIR got a new key); nor is the database migrated first: a
    # backup is what one takes before an upgrade, so it copies it at the revision it is at.
    settings = _settings(create=False)
    target = Path(args.directory).expanduser().absolute()
    try:
        # Stopped by a service manager or `timeout` (SIGTERM), as by Ctrl-C: the partial
        # copy, up to the size of every bundle, is removed on the way out.
        with _exiting_on(signal.SIGTERM, signal.SIGHUP):
            report = back_up(settings, target)
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        raise CliError(
            f"could not make the backup in {target}: {exc.strerror or exc}{where}"
        ) from None
    except sqlite3.Error as exc:
        raise CliError(f"could not copy the database: {exc}") from None
    if args.json:
        _print_json(
            {
                "directory": str(target),
                "projects": report.projects,
                "bundles": report.bundles,
                "files": report.files,
                "missing": report.missing,
                "files_in_s3": report.files_in_s3,
                "copied": report.copied,
            }
        )
    else:
        for path in report.missing:
            print(f"MISSING  {path} (a bundle whose file is not in the install either)")
        if report.files_in_s3:
            files = "the bundle files stay in the S3 store"
        else:
            files = f"{_counted(report.files, 'bundle file')}, each matching its checksum"
        extras = f"; with {' and '.join(report.copied)}" if report.copied else ""
        print(
            f"backed up {_counted(report.projects, 'project')} and"
            f" {_counted(report.bundles, 'bundle')} to {target} ({files}{extras})"
        )
        if _set_in_environment("KOOLBASE_OTA_SECRET_KEY"):
            print(
                "the server signs with KOOLBASE_OTA_SECRET_KEY, which is not in the backup: keep"
                " it with the backup (a restore without it signs with another key)"
            )
        keep = (
            "KOOLBASE_OTA_DATABASE_URL unset (and the S3 settings as they are)"
            if report.files_in_s3
            else "KOOLBASE_OTA_DATABASE_URL and KOOLBASE_OTA_STORAGE_URL unset"
        )
        print(
            f"to restore: stop the server, then serve with KOOLBASE_OTA_DATA_DIR={target} (or"
            f" with the directory put in the data dir's place) and {keep}"
        )
    if report.missing:
        raise SystemExit(1)


def _counted(count: int, thing: str) -> str:
    return f"{count} {thing}" if count == 1 else f"{count} {thing}s"


def _whole_number(low: int, high: int) -> Callable[[str], int]:
    """An argparse `type`: a whole number from `low` to `high`, else a usage error (past
    `high`, a port or a grace period only failed later, with a traceback)."""

    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{raw!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not from {low} to {high}")
        return value

    return parse


#: Longest `gc --grace-seconds` (about 100 years): past it the cut-off date overflows.
MAX_GRACE_SECONDS = 100 * 366 * 24 * 3600
#: Bundle files `move` copies at once by default, and at most (`--jobs`); each copy to S3
#: holds up to three 5 MiB parts in memory.
DEFAULT_MOVE_JOBS = 4
MAX_MOVE_JOBS = 32


class _Parser(argparse.ArgumentParser):
    """Usage mistakes are one `error: ...` line, like every other failure of the command."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see --help)\n")


def cmd_move(args: argparse.Namespace) -> None:
    from koolbase_ota.db import normalise_url
    from koolbase_ota.transfer import move_install

    source = _settings()
    target = source.model_copy(
        update={
            "database_url": args.database_url,
            "storage_url": args.storage_url,
            "s3_endpoint": args.s3_endpoint if args.s3_endpoint is not None else source.s3_endpoint,
            "s3_region": args.s3_region if args.s3_region is not None else source.s3_region,
        }
    )
    if normalise_url(target.database_url) == normalise_url(source.database_url):
        raise CliError("--database-url names the database you are moving from")
    try:
        target_store = open_store(target)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    report = asyncio.run(
        move_install(
            source_db=_database(source),
            source_store=open_store(source),
            target_db=_database(target),
            target_store=target_store,
            jobs=args.jobs,
        )
    )
    copied = ", ".join(f"{count} {table}" for table, count in report.rows.items())
    print(f"copied {report.objects_copied} bundle files", end="")
    if report.objects_already_there:
        print(f" (and {report.objects_already_there} already there)", end="")
    print(f"; read back {report.objects_verified}, each matching its checksum; rows: {copied}")
    backends = "KOOLBASE_OTA_DATABASE_URL and KOOLBASE_OTA_STORAGE_URL"
    if target.storage_url.startswith("s3://"):
        backends += " (with the S3 endpoint, region and credentials)"
    print(
        f"done: point {backends} at the new backends, set KOOLBASE_OTA_SECRET_KEY on every"
        f" server to this install's key (in {source.data_dir / SECRET_KEY_FILE} unless it was"
        " set) so that code-push signatures stay the same, and restart the servers; keys,"
        " tokens and versions are unchanged"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="koolbase-ota",
        description="Self-hostable OTA update server for Flutter apps. Configured through "
        "KOOLBASE_OTA_* environment variables (see the README).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )

    def command(
        group: Any, name: str, handler: Callable[[argparse.Namespace], None], help_: str
    ) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = group.add_parser(name, help=help_, description=help_)
        sub.set_defaults(handler=handler)
        return sub

    serve = command(commands, "serve", cmd_serve, "migrate the database if needed, then serve")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=_whole_number(1, 65535), default=8080)
    serve.add_argument(
        "--workers", type=_whole_number(1, 256), default=1, help="server processes (default 1)"
    )

    project = commands.add_parser("project", help="create and list projects").add_subparsers(
        dest="action", required=True, metavar="ACTION", parser_class=_Parser
    )
    create = command(project, "create", cmd_project_create, "create a project")
    create.add_argument("name")
    create.add_argument("--json", action="store_true", help="print one JSON object")
    listing = command(project, "list", cmd_project_list, "list projects")
    listing.add_argument("--json", action="store_true")

    token = commands.add_parser("token", help="dashboard tokens").add_subparsers(
        dest="action", required=True, metavar="ACTION", parser_class=_Parser
    )
    token_create = command(token, "create", cmd_token_create, "create a dashboard token")
    token_create.add_argument("--project", required=True, metavar="ID")
    token_create.add_argument("--expires-in", type=int, metavar="DAYS")
    token_create.add_argument("--json", action="store_true")
    token_list = command(token, "list", cmd_token_list, "list a project's dashboard tokens")
    token_list.add_argument("--project", required=True, metavar="ID")
    token_list.add_argument("--json", action="store_true")
    token_revoke = command(token, "revoke", cmd_token_revoke, "revoke a token at once")
    token_revoke.add_argument("token_id", metavar="TOKEN_ID")

    key = commands.add_parser("key", help="environment public keys").add_subparsers(
        dest="action", required=True, metavar="ACTION", parser_class=_Parser
    )
    rotate = command(key, "rotate", cmd_key_rotate, "replace a public key; the old one stops")
    rotate.add_argument("--project", required=True, metavar="ID")
    rotate.add_argument("--environment", required=True, choices=projects.ENVIRONMENTS)
    rotate.add_argument("--json", action="store_true")

    channel = commands.add_parser("channel", help="a project's channels").add_subparsers(
        dest="action", required=True, metavar="ACTION", parser_class=_Parser
    )
    channel_add = command(channel, "add", cmd_channel_add, "add a channel to a project")
    channel_add.add_argument("--project", required=True, metavar="ID")
    channel_add.add_argument("name", metavar="NAME")
    channel_add.add_argument("--json", action="store_true", help="print one JSON object")
    channel_list = command(channel, "list", cmd_channel_list, "list a project's channels")
    channel_list.add_argument("--project", required=True, metavar="ID")
    channel_list.add_argument("--json", action="store_true", help="print one JSON array")

    bundle = commands.add_parser("bundle", help="list and release bundles").add_subparsers(
        dest="action", required=True, metavar="ACTION", parser_class=_Parser
    )

    def bundle_command(
        name: str, handler: Callable[[argparse.Namespace], None], help_: str
    ) -> argparse.ArgumentParser:
        sub = command(bundle, name, handler, help_)
        sub.add_argument("--project", required=True, metavar="ID")
        if name != "list":
            sub.add_argument("bundle_id", metavar="BUNDLE_ID")
        sub.add_argument(
            "--json",
            action="store_true",
            help="print the bundle object as JSON (list: an array of them)",
        )
        return sub

    bundle_list = bundle_command(
        "list", cmd_bundle_list, "list a project's bundles, by channel, newest version first"
    )
    bundle_list.add_argument("--channel", metavar="C", help="only this channel's bundles")
    bundle_activate = bundle_command(
        "activate", cmd_bundle_activate, "make a bundle its channel's head"
    )
    bundle_activate.add_argument(
        "--rollout", metavar="N", help="release to N%% of devices (1-100; default 100)"
    )
    bundle_rollout = bundle_command(
        "rollout", cmd_bundle_rollout, "set a bundle's rollout percentage"
    )
    bundle_rollout.add_argument("percentage", metavar="N", help="1 to 100")
    bundle_target = bundle_command(
        "target", cmd_bundle_target, "set which platforms and app versions a bundle is served to"
    )
    platform = bundle_target.add_mutually_exclusive_group()
    platform.add_argument("--platform", metavar="P", help="ios or android")
    platform.add_argument("--any-platform", action="store_true", help="every platform")
    bundle_target.add_argument("--min-app-version", metavar="V", help="lowest, inclusive")
    bundle_target.add_argument("--max-app-version", metavar="V", help="highest, inclusive")
    bundle_target.add_argument(
        "--any-app-version", action="store_true", help="clear both app version bounds"
    )
    bundle_command("recall", cmd_bundle_recall, "never serve a bundle again; devices go back")
    bundle_promote = bundle_command(
        "promote", cmd_bundle_promote, "copy a bundle into a channel as a new version"
    )
    bundle_promote.add_argument("--channel", required=True, metavar="C", help="copy into")
    bundle_promote.add_argument("--activate", action="store_true", help="make the copy the head")
    bundle_promote.add_argument("--rollout", metavar="N", help="the copy's rollout (1-100)")
    bundle_promote.add_argument(
        "--release-notes", metavar="TEXT", help="the copy's notes (default: the source's)"
    )
    bundle_promote.add_argument("--mandatory", action="store_true", help="make the copy mandatory")

    audit_trail = command(
        commands, "audit", cmd_audit, "show a project's audit trail, newest change first"
    )
    audit_trail.add_argument("--project", required=True, metavar="ID")
    audit_trail.add_argument(
        "--limit",
        type=int,
        default=audit.DEFAULT_LIMIT,
        metavar="N",
        help=f"at most N events, 1 to {audit.MAX_LIMIT} (default {audit.DEFAULT_LIMIT})",
    )
    audit_trail.add_argument(
        "--cursor",
        metavar="C",
        help="the events older than this position (printed after a page that has more)",
    )
    audit_trail.add_argument("--json", action="store_true", help="print one JSON array")

    db = commands.add_parser("db", help="database schema").add_subparsers(
        dest="action", required=True, metavar="ACTION", parser_class=_Parser
    )
    command(db, "upgrade", cmd_db_upgrade, "apply every pending migration")

    gc = command(commands, "gc", cmd_gc, "remove orphaned bundle files, report missing ones")
    gc.add_argument(
        "--grace-seconds",
        type=_whole_number(0, MAX_GRACE_SECONDS),
        default=3600,
        help="leave unreferenced files younger than this alone (default 3600)",
    )
    gc.add_argument("--json", action="store_true")

    backup = command(
        commands,
        "backup",
        cmd_backup,
        "copy the embedded default (database, bundle files, secret key) to a new directory,"
        " while it serves",
    )
    backup.add_argument("directory", metavar="DIR", help="a new directory outside the data dir")
    backup.add_argument("--json", action="store_true", help="print the report as JSON")

    move = command(
        commands,
        "move",
        cmd_move,
        "copy this install (its database and bundle files) to new, empty backends",
    )
    move.add_argument("--database-url", required=True, metavar="URL", help="postgresql://...")
    move.add_argument(
        "--storage-url", required=True, metavar="URL", help="s3://BUCKET[/PREFIX] or file:///PATH"
    )
    move.add_argument("--s3-endpoint", metavar="URL", help="default: KOOLBASE_OTA_S3_ENDPOINT")
    move.add_argument("--s3-region", metavar="NAME", help="default: KOOLBASE_OTA_S3_REGION")
    move.add_argument(
        "--jobs",
        type=_whole_number(1, MAX_MOVE_JOBS),
        default=DEFAULT_MOVE_JOBS,
        metavar="N",
        help=f"bundle files copied at once, 1 to {MAX_MOVE_JOBS} (default {DEFAULT_MOVE_JOBS})",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    log_config = logging_config(os.environ.get("KOOLBASE_OTA_LOG_FORMAT", "text"))
    logging.config.dictConfig(log_config)
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except (CliError, OTAError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except (OperationalError, InterfaceError, PoolTimeoutError) as exc:
        # A database that failed after the command started (down, locked past the timeout).
        # The driver's first line says why; the statement and its parameters (a token's hash
        # among them) are not shown.
        reason = str(getattr(exc, "orig", None) or type(exc).__name__).strip().splitlines()
        print(
            f"error: the database is unavailable: {reason[0] if reason else 'unknown'}",
            file=sys.stderr,
        )
        raise SystemExit(1) from None


def run() -> NoReturn:
    """The console script: `main()`, then an exit that skips the interpreter's finalisation.

    With an S3 store, obstore's background runtime threads could abort the process (SIGABRT)
    while Python shut down, after the command had done its work and printed its report: a
    finished `gc` then looked failed. Output is flushed first, so nothing is lost by skipping it.
    """
    code = 1
    try:
        main()
        code = 0
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
    except KeyboardInterrupt:
        code = 130
    except BaseException:
        traceback.print_exc()
    finally:
        for engine in _ENGINES:
            with contextlib.suppress(Exception):
                engine.dispose()
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


if __name__ == "__main__":
    run()
