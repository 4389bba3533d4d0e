"""Keyset pagination, as the bundle list and the audit trail answer it: an opaque cursor and
the `limit` query parameter. (A page's `X-Next-Cursor` and `Link` headers are the routes' part:
`koolbase_ota.deps`. Services use this module, and never import the web framework.)"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from koolbase_ota.errors import InvalidInput

_MAX_CURSOR_CHARS = 200  # a real cursor is far shorter; longer input is not ours


def encode_cursor(position: list[Any]) -> str:
    """The opaque text of a position in a list's order (JSON values, base64url unpadded)."""
    raw = json.dumps(position, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def invalid_cursor() -> InvalidInput:
    return InvalidInput("the cursor is malformed; ask again without it", code="invalid_cursor")


def decode_cursor(cursor: str, length: int) -> list[Any]:
    """The position a cursor holds: a JSON array of `length` values, in exactly the text
    `encode_cursor` gives (other paddings, alphabets or spacings are not ours). The caller
    checks each value."""
    if len(cursor) > _MAX_CURSOR_CHARS or not cursor.isascii():
        raise invalid_cursor()
    try:
        raw = base64.b64decode(cursor + "=" * (-len(cursor) % 4), altchars=b"-_", validate=True)
        position = json.loads(raw)
    except (binascii.Error, ValueError) as exc:
        raise invalid_cursor() from exc
    if not isinstance(position, list) or len(position) != length:
        raise invalid_cursor()
    if encode_cursor(position) != cursor:
        raise invalid_cursor()
    return position


def parse_limit(raw: str | None, *, default: int, maximum: int) -> int:
    """The `limit` query parameter: plain decimal digits; the service checks the range.

    Routes take it as text so that a bad value gets our own 400 `invalid_limit` rather than
    the generic validation error."""
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 7):
        raise InvalidInput(
            f"limit must be a whole number from 1 to {maximum}", code="invalid_limit"
        )
    return int(raw)
