"""Settings read from the environment once at start-up and passed down, never a global."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import secrets
import tempfile
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

SECRET_KEY_FILE = "secret_key"  # noqa: S105  (a file name, not a secret)
MIN_SECRET_KEY_LENGTH = 32
CHANNELS = ("production", "staging", "development")
#: Settings whose default is taken when their variable is unset. Set but empty, it is refused:
#: `KOOLBASE_OTA_DATABASE_URL=$DATABASE_URL` with that variable missing started a server on a
#: SQLite file of its own (a secret key, a data dir of its own ...) without a word.
_NOT_EMPTY = frozenset(
    {
        "data_dir",
        "database_url",
        "storage_url",
        "public_url",
        "secret_key",
        "s3_endpoint",
        "s3_region",
    }
)
_SET_BUT_EMPTY = object()


class _Environment(EnvSettingsSource):
    """The `KOOLBASE_OTA_*` variables, with one of `_NOT_EMPTY` that is set but empty marked
    so, for its validator to refuse (an empty value given in code still means the default)."""

    def __call__(self) -> dict[str, Any]:
        return {
            name: _SET_BUT_EMPTY if name in _NOT_EMPTY and value == "" else value
            for name, value in super().__call__().items()
        }


#: The smallest rate limit: one request in about 11.6 days (0 turns a limit off).
MIN_RATE = 1e-6
#: The largest burst of a rate limit.
MAX_BURST = 1_000_000_000


class Settings(BaseSettings):
    """Every option of the server; each is also the environment variable `KOOLBASE_OTA_<NAME>`."""

    # No `inf` or `nan`: an infinite rate or timeout got past every bound and failed later,
    # with a traceback, where it was turned into an integer or a timedelta.
    model_config = SettingsConfigDict(
        env_prefix="KOOLBASE_OTA_", extra="ignore", allow_inf_nan=False
    )

    data_dir: Path = Path("./data")
    database_url: str = ""
    storage_url: str = ""
    public_url: str = "http://127.0.0.1:8080"
    url_ttl_seconds: int = Field(default=3600, ge=60, le=7 * 24 * 3600)
    secret_key: str = Field(default="", repr=False)
    max_bundle_bytes: int = Field(default=50 * 1024 * 1024, ge=1)
    # How long a backend may take before the request fails instead of waiting forever.
    # At most a day: PostgreSQL's statement_timeout and a timedelta have a ceiling, and a value
    # past it failed every connection, or the start with a traceback.
    database_timeout_seconds: float = Field(default=10.0, gt=0, le=24 * 3600)
    # How long `serve` keeps trying a PostgreSQL database it cannot use as it starts (not up
    # yet, unreachable) before it exits; 0: it exits at once.
    database_start_wait_seconds: float = Field(default=60.0, ge=0, le=24 * 3600)
    # The most database connections a process opens for everything but the checks (which have
    # 6 of their own); unset: 30 on PostgreSQL, 40 on SQLite. At least 2: on PostgreSQL a
    # start holds the migration lock on one while it migrates or looks for a project on another.
    database_connections: int | None = Field(default=None, ge=2, le=1000)
    storage_timeout_seconds: float = Field(default=10.0, gt=0, le=24 * 3600)
    # How long an upload's body may stall (no bytes arriving) before it is refused with 408.
    upload_idle_timeout_seconds: float = Field(default=30.0, gt=0, le=3600)
    # How long an upload's whole body may take (a trickle that never stalls), then 408.
    upload_timeout_seconds: float = Field(default=600.0, gt=0, le=24 * 3600)
    # How long a client may take to send a request's headers before `serve` hangs up.
    header_timeout_seconds: float = Field(default=30.0, ge=1, le=600)
    # How often each process reads the change log; a change reaches every process within it.
    cache_refresh_seconds: float = Field(default=0.2, ge=0.01, le=1.0)
    # S3-compatible storage (KOOLBASE_OTA_STORAGE_URL=s3://bucket/prefix); credentials come from
    # the standard AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN.
    s3_endpoint: str = ""
    s3_region: str = "auto"
    log_format: Literal["text", "json"] = "text"
    # One log line per request; off by default, since /metrics counts requests for free.
    access_log: bool = False
    # Comma-separated browser origins allowed to call the API (a web dashboard); empty: CORS off.
    cors_origins: str = ""
    # The HTTP server `serve` runs: "uvicorn" with our protocol (koolbase_ota.httpserver: warm
    # checks answered in the parser's callbacks, files sent with sendfile); or granian, on its
    # RSGI interface ("rsgi": files sent from Rust) or its ASGI one ("asgi").
    server_interface: Literal["uvicorn", "rsgi", "asgi"] = "uvicorn"
    # Rate limits, per process (N processes: up to N times these). 0 turns a limit off.
    # Per key is off: every device of an app shares its key, so a limit that bites an attacker
    # holding the (public) key bites the whole fleet just the same.
    check_rate_per_key: float = Field(default=0.0, ge=0)
    check_burst_per_key: int = Field(default=0, ge=0, le=MAX_BURST)  # 0: a second's worth
    check_rate_per_address: float = Field(default=20.0, ge=0)
    check_burst_per_address: int = Field(default=100, ge=0, le=MAX_BURST)
    auth_failure_limit: int = Field(default=10, ge=0)
    auth_failure_window_seconds: float = Field(default=60.0, gt=0, le=24 * 3600)
    # Most addresses or keys each limit remembers; the least recently seen go first.
    rate_limit_max_entries: int = Field(default=100_000, ge=2)
    # Comma-separated proxy addresses or CIDRs whose X-Forwarded-For names the client.
    trusted_proxies: str = ""
    # Largest body of any request but an upload (whose limit is max_bundle_bytes).
    max_request_body_bytes: int = Field(default=64 * 1024, ge=1)
    # The standard AWS variable names, without our prefix, as every S3 tool reads them.
    aws_access_key_id: str = Field(
        default="", validation_alias=AliasChoices("aws_access_key_id", "AWS_ACCESS_KEY_ID")
    )
    aws_secret_access_key: str = Field(
        default="",
        repr=False,
        validation_alias=AliasChoices("aws_secret_access_key", "AWS_SECRET_ACCESS_KEY"),
    )
    aws_session_token: str = Field(
        default="",
        repr=False,
        validation_alias=AliasChoices("aws_session_token", "AWS_SESSION_TOKEN"),
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, _Environment(settings_cls), dotenv_settings, file_secret_settings

    @field_validator(*_NOT_EMPTY, mode="before")
    @classmethod
    def _set_but_empty(cls, value: Any) -> Any:
        if value is _SET_BUT_EMPTY:
            raise ValueError("is set but empty; unset it for the default, or give a value")
        return value

    @field_validator("check_rate_per_key", "check_rate_per_address")
    @classmethod
    def _rate(cls, value: float) -> float:
        # A rate so small that its interval is no number (1e-320 a second) turned the limit
        # off instead of nearly closing it.
        if 0 < value < MIN_RATE:
            raise ValueError(f"must be 0 (off) or at least {MIN_RATE:g} a second")
        return value

    @field_validator("public_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        # Devices fetch the download URLs built on it: without a scheme and a host they were
        # relative URLs no device can follow, handed out without an error.
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
            raise ValueError(
                "must be an http:// or https:// URL with a host, e.g. https://ota.example.com"
            )
        if parts.fragment or "#" in value:
            raise ValueError("must not have a #fragment")
        return value.rstrip("/")

    @field_validator("storage_url")
    @classmethod
    def _store_url(cls, value: str) -> str:
        if not value:
            return value  # the bundles folder in the data dir
        parts = urlsplit(value)
        if (
            parts.scheme == "file"
            and parts.netloc in ("", "localhost")
            and parts.path.startswith("/")
        ):
            return value
        if parts.scheme == "s3" and parts.netloc:
            return value
        # `file://bundles` put the files in /, `s3://` had no bucket, a bare path or another
        # scheme failed in every worker with a traceback.
        raise ValueError("must be file:///ABSOLUTE/PATH or s3://BUCKET[/PREFIX]")

    @field_validator("s3_endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        parts = urlsplit(value)
        if value and (parts.scheme not in ("http", "https") or not parts.hostname):
            raise ValueError(
                "must be an http:// or https:// URL, e.g. https://<account>.r2.cloudflarestorage.com"
            )
        return value

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: str) -> str:
        for item in value.split(","):
            origin = item.strip().rstrip("/")
            if not origin:
                continue
            parts = urlsplit(origin)
            # A browser sends `scheme://host[:port]`: anything else never matched, so CORS stayed
            # off for it without a word; `*` opened the API to every origin.
            if not parts.scheme or not parts.netloc or parts.path or parts.query or parts.fragment:
                raise ValueError(f"not an origin (scheme://host[:port]): {origin!r}")
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: str) -> str:
        for item in value.split(","):
            if item.strip():
                try:
                    ipaddress.ip_network(item.strip(), strict=False)
                except ValueError:
                    raise ValueError(f"not an address or CIDR: {item.strip()!r}") from None
        return value

    @field_validator("secret_key")
    @classmethod
    def _strong_secret(cls, value: str) -> str:
        if value and len(value) < MIN_SECRET_KEY_LENGTH:
            raise ValueError(
                f"KOOLBASE_OTA_SECRET_KEY must be at least {MIN_SECRET_KEY_LENGTH} characters"
            )
        return value

    def s3_credentials(self) -> dict[str, str]:
        given = {
            "access_key_id": self.aws_access_key_id,
            "secret_access_key": self.aws_secret_access_key,
            "session_token": self.aws_session_token,
        }
        return {name: value for name, value in given.items() if value}

    def resolved(self, *, create: bool = True) -> Settings:
        """Fill the defaults that depend on the data dir; creates the dir and the secret key,
        unless `create` is false (a command that only reads an install: the key is then the
        variable's, or empty)."""
        data_dir = self.data_dir.expanduser().resolve()
        if create:
            # Owner-only: it holds the secret key and the credentials of the first project.
            data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        database_url = self.database_url or f"sqlite:///{data_dir / 'koolbase-ota.db'}"
        storage_url = self.storage_url or (data_dir / "bundles").as_uri()
        secret_key = self.secret_key or (load_or_create_secret_key(data_dir) if create else "")
        return self.model_copy(
            update={
                "data_dir": data_dir,
                "database_url": database_url,
                "storage_url": storage_url,
                "secret_key": secret_key,
            }
        )


def load_or_create_secret_key(data_dir: Path) -> str:
    """Return the key kept in the data dir, creating it (owner-only) on first run.

    The file appears whole or not at all: written and synced under another name, then linked
    into place only if no key is there yet (several processes may start at once; one key is
    kept, and every process reads it). A key file that is empty or short (a crash mid-write
    of an older version, a hand-made one) is refused, never used: an empty key signs download
    URLs that anyone can forge."""
    path = data_dir / SECRET_KEY_FILE
    if not path.exists():
        fd, temporary = tempfile.mkstemp(dir=data_dir, prefix=f".{SECRET_KEY_FILE}.")
        try:
            with os.fdopen(fd, "w") as handle:  # mkstemp's file is owner-only
                handle.write(secrets.token_urlsafe(48))
                handle.flush()
                os.fsync(handle.fileno())
            with contextlib.suppress(FileExistsError):
                os.link(temporary, path)
        finally:
            os.unlink(temporary)
    key = path.read_text().strip()
    if len(key) < MIN_SECRET_KEY_LENGTH:
        raise OSError(
            errno.EINVAL,
            f"{path} holds {len(key)} characters, not a key of at least "
            f"{MIN_SECRET_KEY_LENGTH}: remove it to have a new one made, or set "
            "KOOLBASE_OTA_SECRET_KEY",
        )
    return key
