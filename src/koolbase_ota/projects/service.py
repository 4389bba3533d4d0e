"""Projects, environments with their public keys, and dashboard tokens."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
import unicodedata
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from koolbase_ota import audit, changes
from koolbase_ota.clock import rfc3339
from koolbase_ota.config import CHANNELS
from koolbase_ota.db import Database, utcnow
from koolbase_ota.errors import InvalidInput, NotFound, Unauthorized
from koolbase_ota.projects.models import Channel, DashboardToken, Environment, Project

#: Recognisable by secret scanners, like PyPI's `pypi-` tokens.
TOKEN_PREFIX = "kbota_"  # noqa: S105  (a public prefix, not a secret)
ENVIRONMENTS = ("production", "staging", "development")
_MAX_NAME = 200


@dataclass(frozen=True)
class TokenOwner:
    """Who a live dashboard token is: its project and its own id."""

    project_id: uuid.UUID
    token_id: uuid.UUID


@dataclass(frozen=True)
class CreatedProject:
    project: Project
    dashboard_token: str
    token_id: uuid.UUID
    public_keys: dict[str, str]


def hash_secret(secret: str) -> str:
    """SHA-256 hex of a token or key: what the database keeps instead of the secret."""
    return hashlib.sha256(secret.encode()).hexdigest()


def new_public_key(environment: str) -> str:
    kind = "live" if environment == "production" else "test"
    return f"pk_{kind}_{secrets.token_hex(12)}"


def new_dashboard_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def _unprintable(char: str) -> bool:
    return unicodedata.category(char) in ("Cc", "Cs")


def create_project(
    db: Database,
    *,
    name: str,
    actor: str = audit.CLI,
    before_commit: Callable[[CreatedProject], None] | None = None,
) -> CreatedProject:
    """Create a project with its three environments, seed channels and one dashboard token.

    `before_commit` gets the project with its secrets before it is committed: should it fail
    (its credentials could not be written down), no project is made, so none exists whose
    token and keys nobody holds.
    """
    name = name.strip()
    # Control characters would break the one-line listings; a lone surrogate (what Python makes
    # of an argument that is not UTF-8) cannot be stored at all and failed with a traceback.
    if not name or len(name) > _MAX_NAME or any(_unprintable(char) for char in name):
        raise InvalidInput(
            f"project name must be 1 to {_MAX_NAME} characters, none of them control characters",
            code="invalid_name",
        )
    keys = {environment: new_public_key(environment) for environment in ENVIRONMENTS}
    token = new_dashboard_token()
    with db.write() as session:
        project = Project(id=uuid.uuid4(), name=name, created_at=utcnow())
        session.add(project)
        session.flush()
        for environment, key in keys.items():
            session.add(
                Environment(
                    project_id=project.id,
                    name=environment,
                    public_key_hash=hash_secret(key),
                    public_key_prefix=key[:12],
                )
            )
        for channel in CHANNELS:
            session.add(Channel(project_id=project.id, name=channel, last_version=0))
        token_row = _add_token(session, project_id=project.id, token=token, expires_at=None)
        # New keys: processes that cached them as unknown must look again.
        changes.record(session, project_id=project.id, kind=changes.KEYS)
        audit.record(
            session,
            project_id=project.id,
            actor=actor,
            action=audit.PROJECT_CREATE,
            target=str(project.id),
            details={
                "name": name,
                "token_id": str(token_row.id),
                "environments": list(ENVIRONMENTS),
            },
        )
        created = CreatedProject(
            project=project, dashboard_token=token, token_id=token_row.id, public_keys=keys
        )
        if before_commit is not None:
            before_commit(created)
    return created


def list_projects(db: Database) -> list[Project]:
    with db.read() as session:
        return list(session.scalars(select(Project).order_by(Project.created_at, Project.id)))


def get_project(db: Database, *, project_id: uuid.UUID) -> Project:
    with db.read() as session:
        project = session.get(Project, project_id)
    if project is None:
        raise NotFound("project not found", code="project_not_found")
    return project


def _add_token(
    session: Session, *, project_id: uuid.UUID, token: str, expires_at: dt.datetime | None
) -> DashboardToken:
    row = DashboardToken(
        id=uuid.uuid4(),
        project_id=project_id,
        token_hash=hash_secret(token),
        token_prefix=token[: len(TOKEN_PREFIX) + 6],
        created_at=utcnow(),
        expires_at=expires_at,
    )
    session.add(row)
    return row


#: The longest lifetime a token may be given (100 years); past it the date would overflow.
MAX_TOKEN_DAYS = 36_500


def create_token(
    db: Database,
    *,
    project_id: uuid.UUID,
    expires_in_days: int | None = None,
    actor: str = audit.CLI,
) -> tuple[DashboardToken, str]:
    """Create a dashboard token for the project; the plaintext is returned only here."""
    if expires_in_days is not None and not 1 <= expires_in_days <= MAX_TOKEN_DAYS:
        raise InvalidInput(
            f"expires-in must be from 1 to {MAX_TOKEN_DAYS} days", code="invalid_expiry"
        )
    expires_at = utcnow() + dt.timedelta(days=expires_in_days) if expires_in_days else None
    token = new_dashboard_token()
    with db.write() as session:
        if session.get(Project, project_id) is None:
            raise NotFound("project not found", code="project_not_found")
        row = _add_token(session, project_id=project_id, token=token, expires_at=expires_at)
        audit.record(
            session,
            project_id=project_id,
            actor=actor,
            action=audit.TOKEN_CREATE,
            target=str(row.id),
            details={
                "token_id": str(row.id),
                "expires_at": rfc3339(expires_at) if expires_at is not None else None,
            },
        )
    return row, token


def list_tokens(db: Database, *, project_id: uuid.UUID) -> list[DashboardToken]:
    with db.read() as session:
        query = select(DashboardToken).where(DashboardToken.project_id == project_id)
        return list(session.scalars(query.order_by(DashboardToken.created_at)))


def revoke_token(db: Database, *, token_id: uuid.UUID, actor: str = audit.CLI) -> DashboardToken:
    """Revoke a token; it stops working at once. Revoking twice keeps the first time."""
    with db.write() as session:
        # Locked, so that of two revocations at once the second sees the first (on PostgreSQL
        # both read "not revoked" before and both recorded a revocation).
        row = session.get(DashboardToken, token_id, with_for_update=True)
        if row is None:
            raise NotFound("token not found", code="token_not_found")
        if row.revoked_at is None:
            row.revoked_at = utcnow()
            changes.record(session, project_id=row.project_id, kind=changes.TOKENS)
            audit.record(
                session,
                project_id=row.project_id,
                actor=actor,
                action=audit.TOKEN_REVOKE,
                target=str(row.id),
                details={"token_id": str(row.id)},
            )
    return row


def rotate_key(
    db: Database, *, project_id: uuid.UUID, environment: str, actor: str = audit.CLI
) -> str:
    """Give the environment a new public key; the old one stops working at once."""
    key = new_public_key(environment)
    with db.write() as session:
        result = session.execute(
            update(Environment)
            .where(Environment.project_id == project_id, Environment.name == environment)
            .values(
                public_key_hash=hash_secret(key),
                public_key_prefix=key[:12],
                key_rotated_at=utcnow(),
            )
        )
        if result.rowcount != 1:  # type: ignore[attr-defined]
            raise NotFound("project or environment not found", code="environment_not_found")
        changes.record(session, project_id=project_id, kind=changes.KEYS)
        # The environment's name only: the new key is shown once, to whoever rotated it.
        audit.record(
            session,
            project_id=project_id,
            actor=actor,
            action=audit.KEY_ROTATE,
            target=environment,
            details={"environment": environment},
        )
    return key


def token_owner(db: Database, *, token: str) -> TokenOwner:
    """Return the project and id of a live dashboard token, or raise Unauthorized."""
    if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
        raise Unauthorized("invalid dashboard token", code="invalid_token")
    digest = hash_secret(token)
    with db.read() as session:
        row = session.scalar(select(DashboardToken).where(DashboardToken.token_hash == digest))
    # The lookup is by hash, so timing says nothing about the token; compare again in constant
    # time all the same so that no code path ever compares a secret with `==`.
    if row is None or not hmac.compare_digest(row.token_hash, digest):
        raise Unauthorized("invalid dashboard token", code="invalid_token")
    if row.revoked_at is not None:
        raise Unauthorized("dashboard token revoked", code="token_revoked")
    if row.expires_at is not None and row.expires_at <= utcnow():
        raise Unauthorized("dashboard token expired", code="token_expired")
    return TokenOwner(project_id=row.project_id, token_id=row.id)


#: Longer than any public key we hand out (32 characters), so never one.
MAX_PUBLIC_KEY_LENGTH = 100


def project_for_public_key(db: Database, *, public_key: str) -> uuid.UUID | None:
    """The project whose environment has this public key, or None."""
    if len(public_key) > MAX_PUBLIC_KEY_LENGTH:
        return None
    digest = hash_secret(public_key)
    with db.read() as session:
        row = session.execute(
            select(Environment.project_id, Environment.public_key_hash).where(
                Environment.public_key_hash == digest
            )
        ).first()
    if row is None or not hmac.compare_digest(row.public_key_hash, digest):
        return None
    project_id: uuid.UUID = row.project_id
    return project_id


def has_any_project(db: Database) -> bool:
    with db.read() as session:
        return session.scalar(select(Project.id).limit(1)) is not None
