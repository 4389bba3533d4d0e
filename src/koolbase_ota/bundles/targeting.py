"""Which devices a release reaches: platform, app version range and percentage rollout.

Pure functions, shared by the dashboard (to validate what is set) and the check (to match a
device). App versions are dotted numbers (`2.4.1`): 1 to 4 parts of 0 to 999999, compared
numerically part by part with missing parts as 0, so `2.10.0 > 2.9.0` and `2.4 == 2.4.0`.
"""

from __future__ import annotations

import functools
import hashlib
import re
import uuid

from koolbase_ota.errors import InvalidInput

PLATFORMS = ("ios", "android")
MAX_APP_VERSION_CHARS = 31  # 4 parts of 6 digits and 3 dots; the column's width
_APP_VERSION = re.compile(r"[0-9]{1,6}(?:\.[0-9]{1,6}){0,3}")
#: The longest a device's app version can be: the number (4 parts of 6 digits, 3 dots) and
#: a label of at most 64 characters.
MAX_DEVICE_APP_VERSION_CHARS = 4 * 6 + 3 + 64
#: A device's app version may carry a label after its number, as Android flavors add one to
#: `versionName` (`2.4.1-staging`, `2.4.1.debug`), builds to it (`2.4.1+45`) and pre-releases
#: (`2.4.1rc1`, `2.4.1b3`): the label starts with a letter, one of `-+_~ (` or a dot before a
#: letter, is printable ASCII, and is not compared. A fifth number part (`1.2.3.4.5`) is not
#: a label, nor a seventh digit (`1234567`): either could be read as another number.
_DEVICE_APP_VERSION = re.compile(
    r"([0-9]{1,6}(?:\.[0-9]{1,6}){0,3})(?:(?:[-+_~ (A-Za-z]|\.(?=[A-Za-z]))[ -~]{0,63})?"
)
#: What a device may send as its id: a UUID in practice; anything of these characters is taken.
MAX_DEVICE_ID_CHARS = 128
_DEVICE_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
#: A device's platform as sent: `ios`, `android`, or a fallback such as `flutter`.
_DEVICE_PLATFORM = re.compile(r"[A-Za-z0-9._\-]{1,32}")

VersionKey = tuple[int, int, int, int]


def parse_platform(value: object) -> str | None:
    """A bundle's platform restriction: None (all), `ios` or `android`, any case."""
    if value is None or value == "":
        return None
    if isinstance(value, str) and value.strip().lower() in PLATFORMS:
        return value.strip().lower()
    raise InvalidInput(
        "platform must be ios or android (or empty for all)", code="invalid_platform"
    )


def parse_app_version(value: object, *, field: str) -> str | None:
    """A bound of the app version range, in canonical form (`02.4` -> `2.4`), or None."""
    if value is None or value == "":
        return None
    if isinstance(value, str) and value.isascii() and _APP_VERSION.fullmatch(value.strip()):
        return ".".join(str(int(part)) for part in value.strip().split("."))
    raise InvalidInput(
        f"{field} must be a dotted numeric version like 2.4.1 (1 to 4 parts of 0 to 999999)",
        code=f"invalid_{field}",
    )


def version_key(text: str) -> VersionKey:
    """`2.4` -> (2, 4, 0, 0): the form versions are compared in."""
    parts = [int(part) for part in text.split(".")]
    parts += [0] * (4 - len(parts))
    return parts[0], parts[1], parts[2], parts[3]


def check_range(min_app_version: str | None, max_app_version: str | None) -> None:
    """The range must not be empty: min above max is refused."""
    if (
        min_app_version is not None
        and max_app_version is not None
        and version_key(min_app_version) > version_key(max_app_version)
    ):
        raise InvalidInput(
            "min_app_version is above max_app_version", code="invalid_app_version_range"
        )


def parse_rollout_percentage(value: object) -> int:
    """A whole number from 1 to 100 (a JSON integer, or decimal digits in a form field)."""
    number: int | None = None
    if type(value) is int:
        number = value
    elif isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        number = int(value.strip()) if len(value.strip()) <= 3 else None
    if number is None or not 1 <= number <= 100:
        raise InvalidInput(
            "rollout_percentage must be a whole number from 1 to 100",
            code="invalid_rollout_percentage",
        )
    return number


#: Distinct `app_version` strings whose parse is kept: a fleet runs a few versions of its app,
#: and a code-push check parses one on every call.
DEVICE_APP_VERSIONS_KEPT = 1024


@functools.lru_cache(maxsize=DEVICE_APP_VERSIONS_KEPT)
def device_app_version(value: str) -> VersionKey | None:
    """A device's `app_version` as sent, by its number (a label after it is not compared), or
    None when it does not start with a dotted numeric version."""
    if not value.isascii():
        return None
    match = _DEVICE_APP_VERSION.fullmatch(value)
    return None if match is None else version_key(match[1])


def valid_device_id(value: str) -> bool:
    return _DEVICE_ID.fullmatch(value) is not None


def valid_device_platform(value: str) -> bool:
    return _DEVICE_PLATFORM.fullmatch(value) is not None


def rollout_bucket(device_id: str, bundle_id: uuid.UUID | str) -> int:
    """0 to 99: the first 4 bytes of SHA-256 of `<device_id>:<bundle_id>`, big-endian, mod 100.

    Stable per device and bundle, so raising a bundle's percentage only ever adds devices; and
    salted by the bundle, so the first 10% of one release are not always the first of the next.
    """
    digest = hashlib.sha256(f"{device_id}:{bundle_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100


def in_rollout(device_id: str | None, bundle_id: uuid.UUID | str, percentage: int) -> bool:
    """Whether a device is among the `percentage` of devices a bundle reaches.

    A device that sends no id is in only at 100%.
    """
    if percentage >= 100:
        return True
    if not device_id:
        return False
    return rollout_bucket(device_id, bundle_id) < percentage


def rollout_cohort(device_id: str, rollouts: tuple[tuple[str, int], ...]) -> int:
    """Which of `rollouts` ((bundle id, percentage) pairs) reach a device, one bit each.

    Two devices of one cohort get the same answer to the same question; cohort 0 (in none of
    them) is also the answer of a device that sends no id.
    """
    cohort = 0
    for bit, (bundle_id, percentage) in enumerate(rollouts):
        if rollout_bucket(device_id, bundle_id) < percentage:
            cohort |= 1 << bit
    return cohort
