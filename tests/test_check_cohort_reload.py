"""A reused check answer is never another device's, even when the channel's entry is loaded
again (its map emptied at its bound) before the change behind it is polled: the answer was kept
under the cohort worked out against the earlier state's rollouts, where the bits mean others."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import httpx
import pytest

from koolbase_ota.bundles import service as bundles
from koolbase_ota.bundles import targeting
from koolbase_ota.sdk import cache as cache_module
from koolbase_ota.sdk import check as check_module
from koolbase_ota.sdk.cache import CheckCache
from koolbase_ota.sdk.check import CheckEndpoint
from tests.api.release import release
from tests.conftest import Project, RunningServer, uploaded


def _device(wanted: dict[str, bool]) -> str:
    """A device id in (True) or out of (False) the rollout of each bundle id of `wanted`."""
    for n in range(100_000):
        device = f"device-{n}"
        if all(
            (targeting.rollout_bucket(device, bundle_id) < 50) == inside
            for bundle_id, inside in wanted.items()
        ):
            return device
    raise AssertionError("no such device")


def test_a_cohorts_answer_kept_across_a_reload_of_the_channel_is_not_given_to_another_cohort(
    server: RunningServer,
    client: httpx.Client,
    project: Project,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The bug does not depend on the reuse window; a long one only keeps the steps below
    # inside it on a stalled machine (at the real 1 s they take milliseconds).
    monkeypatch.setattr(check_module, "ANSWER_REUSE_SECONDS", 60.0)
    # The map's bound, small enough to reach with two made-up channel names (the real one,
    # 200,000, is reached the same way by a flood of them: any holder of the public key).
    monkeypatch.setattr(cache_module, "MAX_ENTRIES", 2)

    base = release(client, project)  # v1, every device
    first = release(client, project, rollout=50)  # v2, the head, half the devices
    second = uploaded(client, project)  # v3, released below by "another process"
    in_first = _device({first["id"]: True})
    new_only = _device({first["id"]: False, second["id"]: True})
    in_neither = _device({first["id"]: False, second["id"]: False})

    # A server process that has not polled the change log since the change below (its
    # refresh interval has not come round yet): the real cache and endpoint, not started.
    cache = CheckCache(
        db=server.db,
        store=server.store,
        url_ttl_seconds=server.settings.url_ttl_seconds,
        signing_key=server.settings.secret_key,
    )
    endpoint = CheckEndpoint(cache)
    key = project.keys["production"]

    async def ask(device: str | None, channel: str = "production") -> dict[str, Any]:
        query = f"channel={channel}&version=0"
        if device is not None:
            query += f"&device_id={device}"
        status, body, _hit, _error, _retry = await endpoint.outcome(key, lambda: "", query.encode())
        answer: dict[str, Any] = json.loads(body)
        answer["status"] = status
        return answer

    async def scenario() -> dict[str, Any]:
        await ask(in_first)  # cold: the channel is loaded
        assert (await ask(in_first))["version"] == first["version"]  # kept for its cohort
        # Another process releases v3 to half the devices (as the CLI would).
        bundles.activate_bundle(
            server.db,
            project_id=project.id,
            bundle_id=uuid.UUID(second["id"]),
            rollout_percentage=50,
        )
        # Checks of made-up channels fill the map to its bound: it is emptied, and the
        # production entry with it.
        assert (await ask(None, "made-up-1"))["status"] == 400
        assert (await ask(None, "made-up-2"))["status"] == 400
        assert (project.id, "production") not in cache.channels
        # A device of the other cohort: the channel is read again, now with v3 rolled out.
        assert (await ask(new_only))["version"] == second["version"]
        assert (await ask(new_only))["version"] == second["version"]
        # A device in neither rollout gets v1 and nothing else.
        return await ask(in_neither)

    answer = asyncio.run(scenario())
    assert answer["has_update"] is True
    assert answer["version"] == base["version"], (
        f"a device in neither rollout was given v{answer['version']}: the answer kept for "
        "another device's cohort"
    )
