"""A skipped mandatory release forces the update only on devices it was for.

A mandatory release for another platform, app version range or share of a rollout was never a
device's to skip: the next release it gets is not made mandatory by it.
"""

from __future__ import annotations

import uuid

import httpx
from hypothesis import given, settings
from hypothesis import strategies as st

from koolbase_ota.bundles.targeting import VersionKey, in_rollout
from koolbase_ota.sdk import cache
from tests.api.release import code_push, release, seed_check
from tests.conftest import Project, bare_release, released

DEVICES = [str(uuid.UUID(int=n * 7919 + 3, version=4)) for n in range(40)]


def mandatory(client: httpx.Client, project: Project, version: int, **params: str | int) -> bool:
    """Whether both checks offer `version` as mandatory, asserting they agree."""
    current = params.pop("current_bundle", 0)
    seed = seed_check(client, project, version=current, **params)
    push = code_push(client, project, current_bundle=current, **params)
    assert seed["has_update"] is True, seed
    assert push["status"] == "update_available", push
    assert seed["version"] == push["bundle"]["version"] == version
    assert seed["mandatory"] is push["bundle"]["mandatory"]
    answer: bool = seed["mandatory"]
    return answer


def test_a_mandatory_release_for_another_platform_is_not_skipped_by_this_one(
    client: httpx.Client, project: Project
) -> None:
    release(client, project)
    release(client, project, platform="ios", mandatory="true")
    head = release(client, project)["version"]
    assert mandatory(client, project, head, platform="ios", current_bundle=1) is True
    assert mandatory(client, project, head, platform="android", current_bundle=1) is False
    # A device that sends no platform only ever gets releases for every platform.
    assert mandatory(client, project, head, current_bundle=1) is False
    # An iOS device that has the mandatory release skipped nothing.
    assert mandatory(client, project, head, platform="ios", current_bundle=2) is False


def test_a_mandatory_release_for_other_app_versions_is_not_skipped_by_this_one(
    client: httpx.Client, project: Project
) -> None:
    release(client, project)
    release(client, project, min_app_version="2.0", max_app_version="2.9", mandatory="true")
    head = release(client, project)["version"]
    assert mandatory(client, project, head, app_version="2.4.1", current_bundle=1) is True
    assert mandatory(client, project, head, app_version="3.0", current_bundle=1) is False
    assert mandatory(client, project, head, app_version="1.9", current_bundle=1) is False
    assert mandatory(client, project, head, current_bundle=1) is False


def test_a_mandatory_release_rolled_out_to_a_share_counts_only_for_that_share(
    client: httpx.Client, project: Project
) -> None:
    release(client, project)
    partial = release(client, project, rollout=50, mandatory="true")
    head = release(client, project)["version"]
    reached = {d for d in DEVICES if in_rollout(d, partial["id"], 50)}
    # Both kinds of device are asked about below.
    assert reached
    assert reached != set(DEVICES)
    for device in DEVICES:
        forced = mandatory(client, project, head, device_id=device, current_bundle=1)
        assert forced is (device in reached), device
    # Without a device id, a device is in no partial rollout.
    assert mandatory(client, project, head, current_bundle=1) is False


def test_a_mandatory_release_for_every_device_still_counts_behind_targeted_ones(
    client: httpx.Client, project: Project
) -> None:
    release(client, project, mandatory="true")
    release(client, project, platform="ios", mandatory="true")
    release(client, project, platform="android")
    head = release(client, project)["version"]
    for platform in ("ios", "android", "flutter"):
        assert mandatory(client, project, head, platform=platform) is True, platform
    assert mandatory(client, project, head, platform="android", current_bundle=1) is False
    assert mandatory(client, project, head, platform="ios", current_bundle=1) is True


def test_a_targeted_mandatory_release_can_be_the_offer_itself(
    client: httpx.Client, project: Project
) -> None:
    """The walk back starts at the offered release: a targeted mandatory one newer than the
    offer (a head the device does not match) does not count."""
    release(client, project)
    android = release(client, project, platform="android")["version"]
    release(client, project, platform="ios", mandatory="true")
    assert mandatory(client, project, android, platform="android") is False
    assert mandatory(client, project, 3, platform="ios") is True


def test_beyond_the_walked_history_any_mandatory_release_still_counts(
    client: httpx.Client, project: Project
) -> None:
    """The check holds the newest MAX_HISTORY releases; one older than those counts for every
    device, targeted or not: forcing an update too often is the safe side."""
    release(client, project, platform="ios", mandatory="true")
    for _ in range(cache.MAX_HISTORY):
        released(client, project)
    head = cache.MAX_HISTORY + 1
    assert mandatory(client, project, head, platform="android") is True
    assert mandatory(client, project, head, platform="android", current_bundle=1) is False


# The rule itself, against a model: for any releases (targeted or not, mandatory or not) and any
# device, the offer is mandatory exactly when a release the device matches, from above its
# version up to the offer, is mandatory.

_PLATFORMS = st.sampled_from([None, "ios", "android"])
_RELEASES = st.lists(
    st.tuples(
        st.booleans(), _PLATFORMS, st.sampled_from([None, (2, 0, 0, 0)]), st.sampled_from([100, 50])
    ),
    min_size=1,
    max_size=8,
)


def _release(
    version: int, mandatory: bool, platform: str | None, minimum: VersionKey | None, rollout: int
) -> cache.Release:
    return bare_release(
        version,
        mandatory=mandatory,
        platform=platform,
        min_app_version=minimum,
        rollout_percentage=rollout,
    )


@settings(max_examples=400, deadline=None)
@given(
    specs=_RELEASES,
    platform=_PLATFORMS,
    app_version=st.sampled_from([None, (1, 0, 0, 0), (3, 0, 0, 0)]),
    device_id=st.sampled_from([None, *DEVICES[:6]]),
    current=st.integers(0, 9),
)
def test_the_mandatory_answer_matches_the_model(
    specs: list[tuple[bool, str | None, VersionKey | None, int]],
    platform: str | None,
    app_version: VersionKey | None,
    device_id: str | None,
    current: int,
) -> None:
    releases = [_release(n, *spec) for n, spec in reversed(list(enumerate(specs, start=1)))]
    cache.set_floors(releases)
    state = cache.ChannelState(releases=tuple(releases))
    device = cache.Device(platform=platform, app_version=app_version, device_id=device_id)
    offer, rollback = state.choose(current, device)
    if offer is None or rollback:
        return
    expected = any(
        release.mandatory and release.matches(device)
        for release in releases
        if current < release.version <= offer.version
    )
    assert state.mandatory_for(offer, current, device) is expected
