"""The check's answers, cached per process so that a warm check does no I/O at all.

Three things are cached: public key -> project (unknown keys too), (project, channel) -> what the
channel offers, and each offer's finished response bodies with their download URL. A URL is
reused for at most half its lifetime, so every URL handed out is valid for at least half the TTL.
Entries are dropped when the change log (`koolbase_ota.changes`) says they changed; a process
polls it every `refresh_seconds`. When the database is down, cached entries keep answering.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import anyio.to_thread
from sqlalchemy import func, select

from koolbase_ota import changes
from koolbase_ota.bundles.models import Bundle
from koolbase_ota.db import Database
from koolbase_ota.metrics import CheckTally
from koolbase_ota.projects import service as projects
from koolbase_ota.projects.models import Channel
from koolbase_ota.sdk import service as sdk_service
from koolbase_ota.storage import BundleStore

logger = logging.getLogger(__name__)

NO_UPDATE = b'{"has_update":false}'
CHECK_ROUTE = "/v1/sdk/ota/check"
#: Beyond this many entries a map is emptied: a flood of made-up keys or channels costs
#: memory up to this bound, then a cold cache, never unbounded growth.
MAX_ENTRIES = 200_000
PRUNE_EVERY_SECONDS = 600
K = TypeVar("K")
V = TypeVar("V")


@dataclass
class Offer:
    """A channel's active bundle and the finished answers for it."""

    version: int
    mandatory: bool
    storage_path: str
    fields: dict[str, object]
    #: The highest version of a released mandatory bundle of the channel (0 if none).
    mandatory_up_to: int
    bodies: dict[bool, bytes] = field(default_factory=dict)
    renew_at: float = 0.0

    def body(self, *, mandatory: bool, store: BundleStore, ttl_seconds: int) -> bytes:
        now = time.monotonic()
        if now >= self.renew_at:
            url = store.download_url(self.storage_path, ttl_seconds=ttl_seconds)
            self.bodies = {
                flag: _dumps({**self.fields, "mandatory": flag, "download_url": url})
                for flag in (False, True)
            }
            self.renew_at = now + ttl_seconds / 2
        return self.bodies[mandatory]


@dataclass
class ChannelState:
    offer: Offer | None


def _dumps(answer: dict[str, object]) -> bytes:
    ordered = {
        key: answer[key]
        for key in (
            "has_update",
            "version",
            "checksum",
            "mandatory",
            "download_url",
            "release_notes",
            "file_size",
        )
    }
    return json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()


class CheckCache:
    def __init__(self, *, db: Database, store: BundleStore, url_ttl_seconds: int) -> None:
        self.db = db
        self.store = store
        self.url_ttl_seconds = url_ttl_seconds
        self.keys: dict[str, uuid.UUID | None] = {}
        #: None: the project has no such channel.
        self.channels: dict[tuple[uuid.UUID, str], ChannelState | None] = {}
        #: Stored bundle path -> its checksum, for downloads served by this server.
        self.downloads: dict[str, str | None] = {}
        self.last_change = 0
        #: Bumped by every invalidation: an entry loaded across one is not kept, since the
        #: database may have changed between reading it and storing it.
        self.generation = 0
        #: Change ids applied recently, with when: each change is applied once.
        self.applied: dict[int, float] = {}
        self.tally = CheckTally(CHECK_ROUTE)

    # Lookups: a hit is a dict read; a miss reads the database in a worker thread. Each
    # returns (value, hit) so callers can count cache outcomes per request.

    async def _lookup(
        self,
        entries: dict[K, V],
        key: K,
        load: Callable[[], V],
        *,
        keep: Callable[[V], bool] = lambda _value: True,
    ) -> tuple[V, bool]:
        try:
            return entries[key], True
        except KeyError:
            pass
        generation = self.generation
        value = await anyio.to_thread.run_sync(load)
        # Loaded across an invalidation: the database may have changed between our read and
        # now, so answer with it but do not keep it.
        if generation == self.generation and keep(value):
            if len(entries) >= MAX_ENTRIES:
                entries.clear()
            entries[key] = value
        return value, False

    async def project_for_key(self, key: str) -> tuple[uuid.UUID | None, bool]:
        return await self._lookup(
            self.keys, key, lambda: projects.project_for_public_key(self.db, public_key=key)
        )

    async def channel(self, project_id: uuid.UUID, name: str) -> tuple[ChannelState | None, bool]:
        return await self._lookup(
            self.channels, (project_id, name), lambda: self._load_channel(project_id, name)
        )

    async def checksum_of(self, storage_path: str) -> str | None:
        """The checksum of the bundle stored at `storage_path`, or None once it is deleted."""
        checksum, _hit = await self._lookup(
            self.downloads,
            storage_path,
            lambda: sdk_service.checksum_at(self.db, storage_path=storage_path),
            keep=lambda found: found is not None,  # a deleted bundle must stay gone
        )
        return checksum

    def _load_channel(self, project_id: uuid.UUID, name: str) -> ChannelState | None:
        with self.db.read() as session:
            known = session.scalar(
                select(Channel.name).where(Channel.project_id == project_id, Channel.name == name)
            )
            if known is None:
                return None
            active = session.scalar(
                select(Bundle).where(
                    Bundle.project_id == project_id, Bundle.channel == name, Bundle.active
                )
            )
            if active is None:
                return ChannelState(offer=None)
            mandatory_up_to = session.scalar(
                select(func.max(Bundle.version)).where(
                    Bundle.project_id == project_id,
                    Bundle.channel == name,
                    Bundle.mandatory,
                    Bundle.released_at.is_not(None),
                    # A rolled-back mandatory release above the offer is not what the device
                    # gets, so it does not make the offer mandatory.
                    Bundle.version <= active.version,
                )
            )
        return ChannelState(
            offer=Offer(
                version=active.version,
                mandatory=active.mandatory,
                storage_path=active.storage_path,
                mandatory_up_to=mandatory_up_to or 0,
                fields={
                    "has_update": True,
                    "version": active.version,
                    "checksum": active.checksum,
                    "release_notes": active.release_notes,
                    "file_size": active.file_size,
                },
            )
        )

    def answer_for(self, state: ChannelState, current_version: int) -> bytes:
        """The check's body for a device on `current_version`."""
        offer = state.offer
        if offer is None or offer.version <= current_version:
            return NO_UPDATE
        # A device that skipped a released mandatory bundle must still wait for the update.
        mandatory = offer.mandatory or offer.mandatory_up_to > current_version
        return offer.body(mandatory=mandatory, store=self.store, ttl_seconds=self.url_ttl_seconds)

    # Invalidation

    def forget(self, change: changes.Change) -> None:
        self.generation += 1
        if change.kind == changes.BUNDLES and change.channel is not None:
            self.channels.pop((change.project_id, change.channel), None)
            prefix = f"ota/{change.project_id}/{change.channel}/"
            for path in [path for path in self.downloads if path.startswith(prefix)]:
                del self.downloads[path]
        elif change.kind == changes.KEYS:
            # A rotated key must stop working, and a new one must not stay "unknown".
            self.keys = {
                key: project
                for key, project in self.keys.items()
                if project is not None and project != change.project_id
            }

    async def start(self) -> None:
        self.last_change = await anyio.to_thread.run_sync(changes.latest_id, self.db)

    async def refresh(self) -> None:
        """Apply every change logged since the last refresh."""
        found = await anyio.to_thread.run_sync(changes.changes_since, self.db, self.last_change)
        now = time.monotonic()
        for change in found:
            # Polls look back a while (see changes.LOOK_BACK), and two refreshes may overlap
            # (the poll, and one after a change in this process): apply each change once, so
            # one applied already does not drop entries loaded since.
            if change.id in self.applied:
                continue
            self.applied[change.id] = now
            self.forget(change)
            self.last_change = max(self.last_change, change.id)
        horizon = now - 2 * changes.LOOK_BACK.total_seconds()
        for change_id in [key for key, seen in self.applied.items() if seen < horizon]:
            del self.applied[change_id]

    async def run(self, *, every_seconds: float) -> None:
        """Refresh forever; a failing database leaves the cache as it is (stale if error)."""
        next_prune = time.monotonic() + PRUNE_EVERY_SECONDS
        while True:
            await asyncio.sleep(every_seconds)
            self.tally.flush()
            try:
                await self.refresh()
                if time.monotonic() >= next_prune:
                    next_prune = time.monotonic() + PRUNE_EVERY_SECONDS
                    await anyio.to_thread.run_sync(changes.prune, self.db)
            except Exception as exc:
                logger.warning(
                    "cache refresh failed, serving cached answers: %s", type(exc).__name__
                )
