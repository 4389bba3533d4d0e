"""The rollout bucket and version comparison, in process: distribution, stability, the formula."""

from __future__ import annotations

import hashlib
import uuid

import pytest

from koolbase_ota.bundles import targeting
from koolbase_ota.errors import InvalidInput

BUNDLE = uuid.UUID("6f1c1a4e-5b7e-4b8e-9d7a-2f3c4d5e6f70")
DEVICES = [str(uuid.UUID(int=n * 7919 + 12345, version=4)) for n in range(10_000)]


@pytest.mark.parametrize(("percentage", "tolerance"), [(10, 1.5), (50, 2.5)])
def test_about_the_right_share_of_10000_devices_is_in(percentage: int, tolerance: float) -> None:
    share = 100 * sum(targeting.in_rollout(d, BUNDLE, percentage) for d in DEVICES) / len(DEVICES)
    assert abs(share - percentage) <= tolerance, share


def test_raising_the_percentage_never_drops_a_device() -> None:
    previous: set[str] = set()
    for percentage in (1, 10, 25, 50, 99, 100):
        current = {d for d in DEVICES if targeting.in_rollout(d, BUNDLE, percentage)}
        assert previous <= current, percentage
        previous = current
    assert previous == set(DEVICES)


def test_each_bundle_draws_its_own_devices() -> None:
    other = uuid.UUID("0d6b2c1e-0000-4000-8000-000000000001")
    first = {d for d in DEVICES if targeting.in_rollout(d, BUNDLE, 10)}
    second = {d for d in DEVICES if targeting.in_rollout(d, other, 10)}
    # Independent draws overlap by about 10% of 10%; the same draw would overlap entirely.
    assert len(first & second) < len(first) / 2


def test_the_documented_formula() -> None:
    for device in DEVICES[:200]:
        digest = hashlib.sha256(f"{device}:{BUNDLE}".encode()).digest()
        expected = int.from_bytes(digest[:4], "big") % 100
        assert targeting.rollout_bucket(device, BUNDLE) == expected
        assert targeting.in_rollout(device, BUNDLE, 37) == (expected < 37)


def test_a_cohort_has_one_bit_per_rollout_that_reaches_the_device() -> None:
    rollouts = tuple(
        (str(uuid.uuid5(uuid.NAMESPACE_URL, f"bundle-{pct}")), pct) for pct in (10, 50, 90)
    )
    cohorts = set()
    for n in range(2000):
        device = f"device-{n}"
        cohort = targeting.rollout_cohort(device, rollouts)
        expected = [targeting.in_rollout(device, bundle, pct) for bundle, pct in rollouts]
        assert [bool(cohort & (1 << bit)) for bit in range(3)] == expected
        cohorts.add(cohort)
    assert len(cohorts) == 8  # every combination occurs among 2,000 devices
    assert targeting.rollout_cohort("device-1", ()) == 0


def test_a_device_without_an_id_is_in_only_at_100() -> None:
    assert targeting.in_rollout(None, BUNDLE, 100)
    assert not targeting.in_rollout(None, BUNDLE, 99)
    assert not targeting.in_rollout("", BUNDLE, 99)


@pytest.mark.parametrize(
    ("low", "high"),
    [("2.9.0", "2.10.0"), ("2.4", "2.4.1"), ("1.999999", "2"), ("0", "0.0.0.1"), ("9", "10")],
)
def test_versions_compare_numerically(low: str, high: str) -> None:
    assert targeting.version_key(low) < targeting.version_key(high)


def test_missing_parts_are_zero() -> None:
    assert targeting.version_key("2.4") == targeting.version_key("2.4.0.0")


def test_a_device_app_version_is_parsed_once_and_the_kept_parses_are_bounded() -> None:
    """Every code-push check parses its `app_version`, and a fleet sends a few: each is kept,
    up to a bound, so a flood of invented versions costs bounded memory."""
    targeting.device_app_version.cache_clear()
    assert targeting.device_app_version("2.10.1") == (2, 10, 1, 0)
    assert targeting.device_app_version("2.10.1") == (2, 10, 1, 0)
    assert targeting.device_app_version.cache_info().hits == 1
    for n in range(targeting.DEVICE_APP_VERSIONS_KEPT + 10):
        assert targeting.device_app_version(f"1.{n}") == (1, n, 0, 0)
    assert targeting.device_app_version.cache_info().currsize == targeting.DEVICE_APP_VERSIONS_KEPT


@pytest.mark.parametrize(
    "text", ["", " ", "2.", ".2", "2..4", "a", "1.2.3.4.5", "1234567", "1.2.3.4.5rc", "v2.4.1"]
)
def test_bad_versions_are_refused(text: str) -> None:
    if text.strip():
        with pytest.raises(InvalidInput) as refused:
            targeting.parse_app_version(text, field="min_app_version")
        assert refused.value.code == "invalid_min_app_version"
    assert targeting.device_app_version(text) is None


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("2.4-b", (2, 4, 0, 0)),
        ("2.4.debug", (2, 4, 0, 0)),
        ("2.4.1+45", (2, 4, 1, 0)),
        ("2.4.1 (45)", (2, 4, 1, 0)),
        ("1.2.3.4~rc", (1, 2, 3, 4)),
        ("2.4.1rc1", (2, 4, 1, 0)),
        ("1.2.3.4b", (1, 2, 3, 4)),
    ],
)
def test_a_device_app_version_is_read_by_its_number_not_its_label(
    text: str, key: tuple[int, int, int, int]
) -> None:
    """A device's version may carry a label after its number; a bundle's bounds may not."""
    assert targeting.device_app_version(text) == key
    with pytest.raises(InvalidInput):
        targeting.parse_app_version(text, field="max_app_version")


@pytest.mark.parametrize("value", [0, 101, -1, "x", "", "1000", 5.0, True, None, "0"])
def test_bad_percentages_are_refused(value: object) -> None:
    with pytest.raises(InvalidInput) as refused:
        targeting.parse_rollout_percentage(value)
    assert refused.value.code == "invalid_rollout_percentage"


@pytest.mark.parametrize(("value", "expected"), [(1, 1), (100, 100), ("25", 25), (" 7 ", 7)])
def test_good_percentages(value: object, expected: int) -> None:
    assert targeting.parse_rollout_percentage(value) == expected
