"""HMAC-signed download URLs for bundles served by this server itself."""

from __future__ import annotations

import functools
import hashlib
import hmac
import time
from urllib.parse import urlencode

DOWNLOAD_PREFIX = "/v1/downloads/"


#: Devices download through the URL the check handed out, reused for half its lifetime: the
#: same few URLs are verified over and over, so their signatures are remembered. Only short
#: ones (ours are about 100 characters), so that made-up URLs cannot fill memory.
_REMEMBERED = 4096
_REMEMBERED_LENGTH = 512


def _signature(secret_key: str, path: str, params: list[tuple[str, str]]) -> str:
    if len(path) + sum(len(name) + len(value) for name, value in params) > _REMEMBERED_LENGTH:
        return _sign(secret_key, path, tuple(params))
    return _remembered_sign(secret_key, path, tuple(params))


def _sign(secret_key: str, path: str, params: tuple[tuple[str, str], ...]) -> str:
    # Every query parameter but the signature goes into the message, sorted, so no parameter
    # can be added, removed or changed without breaking the signature.
    canonical = path + "?" + urlencode(sorted(params))
    return hmac.new(secret_key.encode(), canonical.encode(), hashlib.sha256).hexdigest()


_remembered_sign = functools.lru_cache(maxsize=_REMEMBERED)(_sign)


def signed_path(secret_key: str, key: str, *, ttl_seconds: int, now: float | None = None) -> str:
    """The path and query of a download URL for `key` that expires after `ttl_seconds`."""
    expires = int((time.time() if now is None else now) + ttl_seconds)
    path = DOWNLOAD_PREFIX + key
    params = [("expires", str(expires))]
    return path + "?" + urlencode([*params, ("signature", _signature(secret_key, path, params))])


def verify(
    secret_key: str, path: str, query: list[tuple[str, str]], *, now: float | None = None
) -> str | None:
    """Return why the request is refused ("invalid_signature" or "url_expired"), or None."""
    signatures = [value for name, value in query if name == "signature"]
    params = [(name, value) for name, value in query if name != "signature"]
    if len(signatures) != 1:
        return "invalid_signature"
    expected = _signature(secret_key, path, params)
    if not hmac.compare_digest(expected.encode(), signatures[0].encode()):
        return "invalid_signature"
    expires = [value for name, value in params if name == "expires"]
    if len(expires) != 1 or not expires[0].isdigit():
        return "invalid_signature"
    if int(expires[0]) < (time.time() if now is None else now):
        return "url_expired"
    return None
