"""Logging set-up: plain text or one JSON object a line, with secrets scrubbed from every record."""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
from typing import Any

# Dashboard tokens, public keys, and the signing parts of download URLs (ours and S3's).
_SECRETS = re.compile(
    r"(kbota_[A-Za-z0-9_-]{8})[A-Za-z0-9_-]*"
    r"|(pk_(?:live|test)_[0-9a-f]{4})[0-9a-f]*"
    r"|((?:signature|X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token)=)[^&\s\"']*",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """Keep enough of a secret to tell which one it was, never enough to use it."""

    def keep(match: re.Match[str]) -> str:
        prefix = next(group for group in match.groups() if group is not None)
        return prefix + "…" if not prefix.endswith("=") else prefix + "REDACTED"

    return _SECRETS.sub(keep, text)


class RedactingFilter(logging.Filter):
    """Formats the record's message once, scrubbed, so no handler sees the raw arguments."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        scrubbed = redact(message)
        if scrubbed != message or record.args:
            record.msg = scrubbed
            record.args = None
        return True


class TextFormatter(logging.Formatter):
    """One line a record; a traceback (its frames and exception message, which the filter
    does not see) scrubbed too."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatException(self, ei: Any) -> str:
        return redact(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return redact(super().formatStack(stack_info))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, ensure_ascii=False)


#: One line per request: never the query string, where download URLs carry their signature.
ACCESS_LOG_FORMAT = '%(addr)s "%(method)s %(path)s %(protocol)s" %(status)d %(dt_ms).3fms'


def logging_config(log_format: str = "text", level: str = "INFO") -> dict[str, Any]:
    """A `logging.config.dictConfig` for our loggers and uvicorn's, used by the CLI and workers."""
    formatter = {"()": JsonFormatter if log_format == "json" else TextFormatter}
    handler = {
        "class": "logging.StreamHandler",
        "formatter": "default",
        "filters": ["redact"],
        "stream": "ext://sys.stderr",
    }
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"redact": {"()": RedactingFilter}},
        "formatters": {"default": formatter},
        "handlers": {"default": handler},
        "loggers": {
            "koolbase_ota": {"level": level, "handlers": ["default"], "propagate": False},
            "uvicorn": {"level": level, "handlers": ["default"], "propagate": False},
            "uvicorn.access": {"level": level, "handlers": ["default"], "propagate": False},
            "_granian": {"level": level, "handlers": ["default"], "propagate": False},
            "granian.access": {"level": level, "handlers": ["default"], "propagate": False},
            "alembic": {"level": "WARNING", "handlers": ["default"], "propagate": False},
        },
        "root": {"level": "WARNING", "handlers": ["default"]},
    }
