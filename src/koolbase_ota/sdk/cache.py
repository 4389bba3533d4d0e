"""The checks' answers, cached per process so that a warm check does no I/O at all.

Three things are cached: public key -> project (unknown keys too), (project, channel) -> what the
channel offers (its head and the releases before it, up to MAX_HISTORY, and its recalled
versions), and each release's finished response bodies with their download URL. A URL is
reused for at most half its lifetime, so every URL handed out is valid for at least half the TTL.
Entries are dropped when the change log (`koolbase_ota.changes`) says they changed; a process
polls it every `refresh_seconds`. When the database is down, cached entries keep answering.

Cold lookups, the poll and the readiness probe run in worker threads and on database
connections of their own (`LOOKUP_THREADS`, `CHECK_CONNECTIONS`), not the dashboard's:
dashboard requests that hold all of theirs (writes waiting on a locked table) delay none of
them. A table the checks read themselves, locked, still holds up cold checks, each for at most
the database timeout (`answer_within_seconds`, its wait for a lookup thread included), then
503; warm ones answer from the cache.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import json
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio.to_thread
from sqlalchemy import func, select, text

from koolbase_ota import changes
from koolbase_ota.bundles import targeting
from koolbase_ota.bundles.models import Bundle
from koolbase_ota.bundles.targeting import VersionKey
from koolbase_ota.db import Database
from koolbase_ota.metrics import CHECK_LOOKUPS, RouteTally
from koolbase_ota.projects import service as projects
from koolbase_ota.projects.models import Channel
from koolbase_ota.sdk import service as sdk_service
from koolbase_ota.storage import BundleStore
from koolbase_ota.storage.signing import DOWNLOAD_PREFIX

logger = logging.getLogger(__name__)

NO_UPDATE = b'{"has_update":false}'
CODE_PUSH_NO_UPDATE = b'{"status":"no_update"}'
CHECK_ROUTE = "/v1/sdk/ota/check"
CODE_PUSH_ROUTE = "/v1/code-push/check"
DOWNLOAD_ROUTE = DOWNLOAD_PREFIX + "{key:path}"
#: Beyond this many entries a map is emptied: a flood of made-up keys or channels costs
#: memory up to this bound, then a cold cache, never unbounded growth.
MAX_ENTRIES = 200_000
#: A check's finished answer is reused for identical requests (same key and query) for at
#: most this long, and never across an invalidation; download URLs are renewed this much
#: early, so a reused answer still carries a URL valid for at least half its lifetime.
ANSWER_REUSE_SECONDS = 1.0
#: What a URL's expiry may lose to rounding: the embedded signer's `expires` and S3's
#: `X-Amz-Date` are whole seconds, rounded down. Renewal is this much earlier still.
EXPIRY_ROUNDING_SECONDS = 1.0
#: While the change log cannot be read, a line about it at most this often.
REFRESH_FAILURE_LOG_SECONDS = 60.0
#: After a logged failure, how many polls in a row must work for "works again" to be logged
#: (5 s at the default interval).
RECOVERED_AFTER_POLLS = 25
K = TypeVar("K")
V = TypeVar("V")


#: Worker threads a process's checks use for cold lookups, at most; the poll of the change log
#: and the readiness probe have one each. Each thread has a database connection of its own.
LOOKUP_THREADS = 4
CHECK_CONNECTIONS = LOOKUP_THREADS + 2


#: How many released bundles of a channel a check may walk back through, newest first from
#: the head; older releases are not offered. Bounds a cold load and a device's walk.
MAX_HISTORY = 100
#: How many recalled versions of a channel are remembered to send their devices back.
MAX_RECALLED = 1000
#: Up to this many releases of a channel rolled out to a share of devices, the devices each of
#: them reaches alike share reused answers (`ChannelState.rollouts`); beyond it, each device's
#: answer is kept on its own. It bounds the answers kept for one question at 2 ** 4 cohorts.
MAX_SHARED_ROLLOUTS = 4


@dataclass(frozen=True, slots=True)
class Device:
    """What a device says about itself; None where it says nothing."""

    platform: str | None = None
    app_version: VersionKey | None = None
    device_id: str | None = None


ANY_DEVICE = Device()


@dataclass(eq=False)
class Release:
    """A released, non-recalled bundle a check may offer, with its finished answers."""

    id: uuid.UUID
    version: int
    mandatory: bool
    #: The highest version of a released, non-recalled mandatory bundle of the channel for
    #: every device (no targeting, no rollout) up to this one, 0 if none: a device below it
    #: skipped a mandatory release. Beyond the walked history, any mandatory release counts.
    mandatory_floor: int
    #: The same for mandatory releases that reach only some devices: whether a device below
    #: it skipped one is decided by walking back (`ChannelState.mandatory_for`).
    targeted_floor: int
    storage_path: str
    checksum: str
    release_notes: str | None
    file_size: int
    platform: str | None
    min_app_version: VersionKey | None
    max_app_version: VersionKey | None
    rollout_percentage: int
    signature: str
    bodies: dict[tuple[str, bool], bytes] = field(default_factory=dict)
    renew_at: float = 0.0
    url: str = ""

    @property
    def everyone(self) -> bool:
        """No targeting and no rollout: every device matches."""
        return (
            self.rollout_percentage >= 100
            and self.platform is None
            and self.min_app_version is None
            and self.max_app_version is None
        )

    def matches(self, device: Device) -> bool:
        if self.platform is not None and device.platform != self.platform:
            return False
        if self.min_app_version is not None and (
            device.app_version is None or device.app_version < self.min_app_version
        ):
            return False
        if self.max_app_version is not None and (
            device.app_version is None or device.app_version > self.max_app_version
        ):
            return False
        return targeting.in_rollout(device.device_id, self.id, self.rollout_percentage)

    def body(self, kind: str, *, mandatory: bool, store: BundleStore, ttl_seconds: int) -> bytes:
        """The finished answer of `kind` ("seed", "seed-rollback" or "code-push")."""
        # Wall time, not monotonic: URLs expire by the wall clock (ours and the store's), so a
        # clock stepped forward must bring the renewal forward too.
        now = time.time()
        if now >= self.renew_at:
            self.url = store.download_url(self.storage_path, ttl_seconds=ttl_seconds)
            self.bodies = {}
            early = ANSWER_REUSE_SECONDS + EXPIRY_ROUNDING_SECONDS
            self.renew_at = now + max(ttl_seconds / 2 - early, 0.0)
        key = (kind, mandatory)
        body = self.bodies.get(key)
        if body is None:
            body = self.bodies[key] = self._render(kind, mandatory=mandatory)
        return body

    def _render(self, kind: str, *, mandatory: bool) -> bytes:
        if kind == "code-push":
            return _json(
                {
                    "status": "update_available",
                    "bundle": {
                        "bundle_id": str(self.id),
                        "version": self.version,
                        "download_url": self.url,
                        "checksum": self.checksum,
                        "signature": self.signature,
                        "size_bytes": self.file_size,
                        "mandatory": mandatory,
                    },
                }
            )
        answer: dict[str, object] = {
            "has_update": True,
            "version": self.version,
            "checksum": self.checksum,
            "mandatory": mandatory,
            "download_url": self.url,
            "release_notes": self.release_notes,
            "file_size": self.file_size,
        }
        if kind == "seed-rollback":
            answer["rollback"] = True
        return _json(answer)


@dataclass
class ChannelState:
    """What a channel offers: its releases from the head back, newest first, and its recalls."""

    releases: tuple[Release, ...] = ()
    recalled: frozenset[int] = frozenset()
    #: A channel without a head offers nothing, but still sends the devices on a recalled
    #: version back to the newest matching release older than it: these, newest first.
    fallback: tuple[Release, ...] = ()

    @property
    def offer(self) -> Release | None:
        """The head: the channel's active bundle."""
        return self.releases[0] if self.releases else None

    @functools.cached_property
    def rollouts(self) -> tuple[tuple[str, int], ...] | None:
        """(bundle id, percentage) of each release rolled out to a share of devices: the only
        part of an answer a device's id decides (`targeting.rollout_cohort`). Empty when a
        device's id changes no answer; None when more than MAX_SHARED_ROLLOUTS are, each a
        hash per check. (A state is never changed in place: a change loads a new one.)"""
        rollouts = tuple(
            (str(release.id), release.rollout_percentage)
            for release in (*self.releases, *self.fallback)
            if release.rollout_percentage < 100
        )
        return rollouts if len(rollouts) <= MAX_SHARED_ROLLOUTS else None

    def choose(self, current_version: int, device: Device) -> tuple[Release | None, bool]:
        """(release, rollback): what to offer a device on `current_version`.

        (None, False) is "no update"; (None, True) is "back to the built-in assets".
        """
        found = None
        for release in self.releases:
            if release.everyone or release.matches(device):
                found = release
                break
        if found is not None and found.version > current_version:
            return found, False
        if current_version in self.recalled:
            # The newest matching release is older than the device's recalled version.
            if found is None:
                for release in self.fallback:
                    if release.version < current_version and (
                        release.everyone or release.matches(device)
                    ):
                        return release, True
            return found, True
        return None, False

    def mandatory_for(self, release: Release, current_version: int, device: Device) -> bool:
        """Whether `release`, offered to a device on `current_version`, is a mandatory update:
        it is mandatory itself, or the device skipped a mandatory release it could have had.

        A mandatory release for another platform, app version range or share of a rollout was
        never the device's to skip, so it does not count.
        """
        if release.mandatory or release.mandatory_floor > current_version:
            return True
        if release.targeted_floor <= current_version:
            return False
        for skipped in self.releases:
            if skipped.version > release.version or skipped.everyone:
                continue
            if skipped.version <= current_version:
                break
            if skipped.mandatory and skipped.matches(device):
                return True
        return False


def set_floors(releases: list[Release], *, beyond: int = 0) -> None:
    """Set the floors of `releases` (newest first); `beyond`: the highest mandatory version
    older than all of them."""
    floor, targeted_floor = beyond, 0
    for release in reversed(releases):
        if release.mandatory:
            if release.everyone:
                floor = release.version
            else:
                targeted_floor = release.version
        release.mandatory_floor, release.targeted_floor = floor, targeted_floor


def _json(answer: dict[str, object]) -> bytes:
    # ASCII only (`\u00e9` for `é`): the answer is `application/json` without a charset, which
    # Dart's package:http decoded as Latin-1 until 2025 (dart-lang/http#175), so the apps in
    # the field would show UTF-8 release notes garbled; escaped, they read the same either way.
    return json.dumps(answer, separators=(",", ":")).encode()


@dataclass(frozen=True)
class _Threads:
    """The checks' worker threads on one event loop: cold lookups, the poll's, the probe's."""

    loop: asyncio.AbstractEventLoop
    lookups: anyio.CapacityLimiter
    poll: anyio.CapacityLimiter
    ping: anyio.CapacityLimiter


@dataclass(eq=False)
class _Flight:
    """One database load of a cache entry, which every check missing that entry awaits.

    After an activation, every device's check of that channel misses at once; without this,
    each one read the channel in its own worker thread (in `bench/check.py`, the first checks
    of a channel on 32 new connections held one worker's event loop for 110-130 ms).
    """

    generation: int
    loop: asyncio.AbstractEventLoop
    task: asyncio.Task[Any] = field(init=False)
    #: The checks awaiting it now.
    waiters: int = 0
    #: "queued", then "started" (a thread took it: it runs to its end, and fills the cache,
    #: awaited or not) or "abandoned" (every check gave up first: it never runs).
    state: str = "queued"
    _deciding: threading.Lock = field(default_factory=threading.Lock)

    def leave_queue(self, state: str) -> bool:
        """Whether the load was still queued, and is now in `state` (the thread that takes it
        and the last check giving up on it decide at once; the first one wins)."""
        with self._deciding:
            if self.state != "queued":
                return False
            self.state = state
            return True


class _Abandoned(Exception):
    """Raised in the thread that took a load every check had given up on just before."""


class CheckCache:
    def __init__(
        self,
        *,
        db: Database,
        store: BundleStore,
        url_ttl_seconds: int,
        signing_key: str = "",
        answer_within_seconds: float | None = None,
    ) -> None:
        #: The checks' own connections: at most `CHECK_CONNECTIONS` are used at once.
        self.db = db
        #: The longest a check waits for what it needs from the database (None: no bound).
        self.answer_within_seconds = answer_within_seconds
        self.store = store
        self.url_ttl_seconds = url_ttl_seconds
        #: Keys the code-push answer's `signature` (see `signature()`).
        self.signing_key = signing_key.encode()
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
        #: The loads in flight, by (kind of entry, key).
        self.loading: dict[tuple[str, object], _Flight] = {}
        self._threads: _Threads | None = None
        self.tally = RouteTally(CHECK_ROUTE)
        self.code_push_tally = RouteTally(CODE_PUSH_ROUTE)
        #: Downloads sent by this server (the embedded default's signed URLs).
        self.download_tally = RouteTally(DOWNLOAD_ROUTE)

    # Lookups: a hit is a dict read; a miss reads the database in a worker thread, once for
    # all the checks that miss the same entry at the same time (see `_Flight`).

    async def _lookup(
        self,
        kind: str,
        entries: dict[K, V],
        key: K,
        load: Callable[[], V],
        *,
        keep: Callable[[V], bool] = lambda _value: True,
        limiter: anyio.CapacityLimiter | None = None,
    ) -> V:
        """`entries[key]`, else `load()` run once in a worker thread (of `limiter`, by default
        the lookups') for every caller missing it at the same time."""
        try:
            return entries[key]
        except KeyError:
            pass
        loop = asyncio.get_running_loop()
        name = (kind, key)
        flight = self.loading.get(name)
        if flight is None or flight.generation != self.generation or flight.loop is not loop:
            flight = _Flight(self.generation, loop)
            loading = self._load(name, entries, load, keep, limiter, flight)
            flight.task = loop.create_task(loading)
            self.loading[name] = flight
            flight.task.add_done_callback(lambda _task: self._landed(name, flight))
        flight.waiters += 1
        try:
            # Shielded: a check that gives up (its client left, its wait ran out) does not
            # cancel the others' load.
            value: V = await asyncio.shield(flight.task)
        finally:
            flight.waiters -= 1
            if not flight.waiters and flight.leave_queue("abandoned"):
                self._abandon(name, flight)
        return value

    def _abandon(self, name: tuple[str, object], flight: _Flight) -> None:
        """Drops a load every check awaiting it gave up on before a thread took it.

        With the database not answering, the lookups of checks that had answered 503 long
        before still queued for the threads, one database timeout each, as many as cold keys
        and channels had come in (a flood of invented keys, a whole fleet after a restart).
        """
        if self.loading.get(name) is flight:
            del self.loading[name]  # the next check of it starts a load of its own
        flight.task.cancel()
        CHECK_LOOKUPS.labels(name[0], "abandoned").inc()

    async def _load(
        self,
        name: tuple[str, K],
        entries: dict[K, V],
        load: Callable[[], V],
        keep: Callable[[V], bool],
        limiter: anyio.CapacityLimiter | None,
        flight: _Flight,
    ) -> V:
        generation, key = self.generation, name[1]

        def run() -> V:
            if not flight.leave_queue("started"):
                raise _Abandoned
            return load()

        try:
            value = await anyio.to_thread.run_sync(run, limiter=limiter or self.threads().lookups)
        except _Abandoned:
            raise  # counted as such
        except Exception:
            CHECK_LOOKUPS.labels(name[0], "failed").inc()
            raise
        CHECK_LOOKUPS.labels(name[0], "loaded").inc()
        # Loaded across an invalidation: the database may have changed between our read and
        # now, so answer with it but do not keep it.
        if generation == self.generation and keep(value):
            if len(entries) >= MAX_ENTRIES:
                entries.clear()
            entries[key] = value
        return value

    def threads(self) -> _Threads:
        """This event loop's limits on the checks' threads (one loop in a server process)."""
        loop = asyncio.get_running_loop()
        threads = self._threads
        if threads is None or threads.loop is not loop:
            threads = _Threads(
                loop,
                lookups=anyio.CapacityLimiter(LOOKUP_THREADS),
                poll=anyio.CapacityLimiter(1),
                ping=anyio.CapacityLimiter(1),
            )
            self._threads = threads
        return threads

    def _landed(self, name: tuple[str, object], flight: _Flight) -> None:
        if self.loading.get(name) is flight:
            del self.loading[name]
        if not flight.task.cancelled():
            flight.task.exception()  # retrieved here too, when every waiter has given up

    async def project_for_key(self, key: str) -> uuid.UUID | None:
        return await self._lookup(
            "key", self.keys, key, lambda: projects.project_for_public_key(self.db, public_key=key)
        )

    async def channel(self, project_id: uuid.UUID, name: str) -> ChannelState | None:
        return await self._lookup(
            "channel",
            self.channels,
            (project_id, name),
            lambda: self._load_channel(project_id, name),
        )

    async def checksum_of(self, storage_path: str) -> str | None:
        """The checksum of the bundle stored at `storage_path`, or None once it is deleted.

        Not cached, it is read within the database timeout, as a cold check's entries are
        (raises TimeoutError after it); a cached one is a dict read, with no task or timer.
        """
        try:
            return self.downloads[storage_path]
        except KeyError:
            pass
        lookup = self._lookup(
            "download",
            self.downloads,
            storage_path,
            lambda: sdk_service.checksum_at(self.db, storage_path=storage_path),
            keep=lambda found: found is not None,  # a deleted bundle must stay gone
        )
        return await asyncio.wait_for(lookup, self.answer_within_seconds)

    def signature(self, checksum: str) -> str:
        """`hmac-sha256:` + hex HMAC-SHA-256 of the checksum under the server's secret key.

        Lets whoever holds the key tell that this server handed out that checksum; the clients
        parse the field but do not verify it.
        """
        digest = hmac.new(self.signing_key, checksum.encode(), hashlib.sha256).hexdigest()
        return "hmac-sha256:" + digest

    def _load_channel(self, project_id: uuid.UUID, name: str) -> ChannelState | None:
        of_channel = (Bundle.project_id == project_id, Bundle.channel == name)
        with self.db.read() as session:
            known = session.scalar(
                select(Channel.name).where(Channel.project_id == project_id, Channel.name == name)
            )
            if known is None:
                return None
            recalled = frozenset(
                session.scalars(
                    select(Bundle.version)
                    .where(*of_channel, Bundle.recalled_at.is_not(None))
                    .order_by(Bundle.version.desc())
                    .limit(MAX_RECALLED)
                )
            )
            head_version = session.scalar(select(Bundle.version).where(*of_channel, Bundle.active))
            released = (*of_channel, Bundle.released_at.is_not(None), Bundle.recalled_at.is_(None))
            if head_version is None:
                if not recalled:
                    return ChannelState()
                # The head was deleted: nothing is offered, but a recalled version's devices
                # still go back to an older release, as they would with a head.
                fallback = [
                    self._release(row)
                    for row in session.scalars(
                        select(Bundle)
                        .where(*released, Bundle.version < max(recalled))
                        .order_by(Bundle.version.desc())
                        .limit(MAX_HISTORY)
                    )
                ]
                set_floors(fallback)
                return ChannelState(recalled=recalled, fallback=tuple(fallback))
            serving = (*released, Bundle.version <= head_version)
            rows = list(
                session.scalars(
                    select(Bundle)
                    .where(*serving)
                    .order_by(Bundle.version.desc())
                    .limit(MAX_HISTORY)
                )
            )
            floor = 0
            if len(rows) == MAX_HISTORY:
                # Mandatory releases beyond the walked history still force the update.
                floor = (
                    session.scalar(
                        select(func.max(Bundle.version)).where(
                            *serving, Bundle.mandatory, Bundle.version < rows[-1].version
                        )
                    )
                    or 0
                )
        releases = [self._release(row) for row in rows]
        set_floors(releases, beyond=floor)
        return ChannelState(releases=tuple(releases), recalled=recalled)

    def _release(self, row: Bundle) -> Release:
        """The release of `row`, its floors left to `set_floors`."""
        return Release(
            id=row.id,
            version=row.version,
            mandatory=row.mandatory,
            mandatory_floor=0,
            targeted_floor=0,
            storage_path=row.storage_path,
            checksum=row.checksum,
            release_notes=row.release_notes,
            file_size=row.file_size,
            platform=row.platform,
            min_app_version=(
                targeting.version_key(row.min_app_version) if row.min_app_version else None
            ),
            max_app_version=(
                targeting.version_key(row.max_app_version) if row.max_app_version else None
            ),
            rollout_percentage=row.rollout_percentage,
            signature=self.signature(row.checksum),
        )

    def answer_for(
        self, state: ChannelState, current_version: int, device: Device = ANY_DEVICE
    ) -> bytes:
        """The seed check's body for a device on `current_version`."""
        release, rollback = state.choose(current_version, device)
        if release is None:
            # "Back to the built-in assets" has no seed answer: the SDK cannot drop a bundle,
            # and offering anything would install something. The device keeps what it has.
            return NO_UPDATE
        # A device that skipped a released mandatory bundle must still wait for the update.
        mandatory = state.mandatory_for(release, current_version, device)
        return release.body(
            "seed-rollback" if rollback else "seed",
            mandatory=mandatory,
            store=self.store,
            ttl_seconds=self.url_ttl_seconds,
        )

    def code_push_answer_for(
        self, state: ChannelState, current_version: int, device: Device
    ) -> bytes:
        """The code-push check's body for a device on `current_version`."""
        release, rollback = state.choose(current_version, device)
        if rollback:
            revert_to = 0 if release is None else release.version
            return b'{"status":"rollback","revert_to":%d}' % revert_to
        if release is None:
            return CODE_PUSH_NO_UPDATE
        mandatory = state.mandatory_for(release, current_version, device)
        return release.body(
            "code-push", mandatory=mandatory, store=self.store, ttl_seconds=self.url_ttl_seconds
        )

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

    def flush_tallies(self) -> None:
        """Add the hot routes' counts to their Prometheus metrics."""
        self.tally.flush()
        self.code_push_tally.flush()
        self.download_tally.flush()

    async def start(self) -> None:
        self.last_change = await anyio.to_thread.run_sync(
            changes.latest_id, self.db, limiter=self.threads().poll
        )

    async def ping(self) -> None:
        """Read the database on the checks' pool, in a thread of its own: cold lookups stuck on
        a locked table do not make a process whose database answers look unready.

        Probes at once share the read in flight (a lookup that keeps nothing), and each waits
        for it at most the database timeout: on a database that does not answer they queued
        for the one thread, and the eighth of eight probes answered after eight waits.
        """

        def select_one() -> None:
            with self.db.read() as session:
                session.execute(text("SELECT 1"))

        probe = self._lookup(
            "ping", {}, None, select_one, keep=lambda _read: False, limiter=self.threads().ping
        )
        await asyncio.wait_for(probe, self.answer_within_seconds)

    async def refresh(self, *, via: Database | None = None) -> None:
        """Apply every change logged since the last refresh.

        By default it reads as the poll does, in the poll's thread and on the checks' pool. A
        request that has just made a change passes its own database (`via`), and reads in one
        of the threads everything else shares, leaving the checks' alone.
        """
        db, limiter = (self.db, self.threads().poll) if via is None else (via, None)
        found = await anyio.to_thread.run_sync(
            changes.changes_since, db, self.last_change, limiter=limiter
        )
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
        """Refresh forever; a failing database leaves the cache as it is (stale if error).

        A failure is logged when its kind is new, else at most every
        `REFRESH_FAILURE_LOG_SECONDS`; the recovery once, when `RECOVERED_AFTER_POLLS` polls
        in a row have worked, and a failure after it at once. At the default interval an
        outage logged five lines a second from every worker; a database failing every other
        poll logged "works again" and then nothing while it went on failing.
        """
        failures = worked = 0  # failed since the last recovery; worked in a row
        logged_at, logged_kind, unresolved = -math.inf, "", False
        while True:
            await asyncio.sleep(every_seconds)
            try:
                self.flush_tallies()
            except Exception as exc:
                # Counting failed (a metrics file on a full disk): the loop goes on, or no
                # change would reach this process's checks again.
                logger.warning("could not count the checks served: %s", type(exc).__name__)
            try:
                await self.refresh()
            except Exception as exc:
                failures, worked = failures + 1, 0
                kind, now = type(exc).__name__, time.monotonic()
                if kind != logged_kind or now - logged_at >= REFRESH_FAILURE_LOG_SECONDS:
                    logged_at, logged_kind, unresolved = now, kind, True
                    logger.warning(
                        "cache refresh failed, serving cached answers: %s (%d failed)",
                        kind,
                        failures,
                    )
            else:
                worked += 1
                if not unresolved:
                    failures = 0
                elif worked >= RECOVERED_AFTER_POLLS:
                    logger.warning("cache refresh works again, after %d failed", failures)
                    failures, logged_kind, unresolved = 0, "", False
