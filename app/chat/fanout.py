"""Per-process fan-out of room messages to the WebSockets of this process.

Why not one channel-layer group member per socket (the Channels default): then
every message costs one Redis operation, one decode and one JSON encoding per
member, so a room of 1,000 turns 5 messages/s into 5,000 of each per second, and
the core layer drops the oldest message of a socket whose buffer is full
without telling anyone. Here each process joins a room's group once (one
channel per process: the hub's), encodes each message once, and hands the same
text to every local socket of the room.

What the hub guarantees to each socket:

- **Order without holes.** Messages leave the hub in `seq` order. Posters in
  other processes can publish out of order, and a channel layer can lose a
  message (the core layer's capacity, a Redis reconnect); the hub holds
  messages ahead of a hole for `GAP_WAIT` seconds and then reads the missing
  ones from the database, once per process rather than once per client.
- **Batches.** Messages of a room are collected for `BATCH_WINDOW` seconds
  (counted from the first one) and sent as one frame: a lone message as its
  usual `message` frame, several as `{"type": "batch", "messages": [...]}`.
  Frames per second then stop growing with the message rate.
- **Riding through Redis outages.** Messages are stored before anything else
  and handed to this process's own sockets at once; publishing to the other
  processes is what needs Redis. When the channel layer fails (a restart, an
  outage), the hub says so once in the log, keeps what it stored in a list,
  and probes the layer with jittered backoff until a message it sends to
  itself comes back. Then it joins its groups again (Redis kept nothing), reads
  from the database whatever the other processes stored meanwhile, and
  publishes its list, oldest first. Rooms not yet open in the process cannot
  be joined meanwhile (`LayerUnavailable`). A restart can go unnoticed by the
  layer (redis-py reconnects by itself) while it empties Redis of the core
  layer's group memberships, so a watchdog touches a key of its own every
  `WATCH_INTERVAL` seconds while the hub reads (with the commands the layer
  already needs): the key gone, or no answer, starts the same recovery.
- **A bounded backlog per socket.** A socket whose sends do not keep up queues
  at most `SOCKET_BACKLOG` messages. Beyond that its queue is dropped and it
  gets `{"type": "behind", "since": S, "until": U}`: messages S+1..U were not
  sent to it; it fetches them with `history` before it shows newer ones.
"""

import asyncio
import collections
import json
import logging
import random
import time
import uuid

from channels.layers import get_channel_layer
from django.conf import settings
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ResponseError as RedisResponseError

from chatservice import redisconn
from chatservice.env import env_float, env_int

from . import metrics, store
from .dbcalls import reads, writes

log = logging.getLogger(__name__)

# Milliseconds are what operators think in; the module keeps seconds.
BATCH_WINDOW = env_float("CHAT_BATCH_WINDOW_MS", 5.0, minimum=0.0) / 1000
GAP_WAIT = env_float("CHAT_GAP_WAIT_MS", 200.0, minimum=0.0) / 1000
SOCKET_BACKLOG = env_int("CHAT_SOCKET_BACKLOG", 1000, minimum=1)
# A failed layer receive (Redis restarting) is retried after this pause.
RETRY_PAUSE = 1.0
# Probing a failed channel layer: the first pause, doubling up to the cap,
# each drawn at random between half and all of it (clients and processes that
# lost Redis together must not all come back together).
RECOVER_PAUSE = 0.25
RECOVER_PAUSE_MAX = 2.0
# Seconds a probe waits for its own message to come back through the layer.
PROBE_TIMEOUT = 2.0
# Seconds between the watchdog's visits to its key (one round trip per process).
WATCH_INTERVAL = 1.0
# Seconds the key outlives the last visit: far more than an interval, so only
# a Redis that lost its data (a restart) loses it.
WATCH_TTL = 60
# Under the layer's prefix, which the app's Redis user may use.
WATCH_KEY = "asgi:chat-watchdog:"
# Matches CHAT_HISTORY_PAGE: one database read fills up to this many missing.
FILL_PAGE = 200
# Most posts stored in one transaction.
POST_BATCH = 500

EVENT_TYPE = "chat.message"
PROBE_TYPE = "chat.probe"


class LayerUnavailable(Exception):
    """The channel layer (Redis) does not answer: a room cannot be joined now."""


def describe(error):
    return f"{type(error).__name__}: {error}"[:200]


def dumps(frame):
    return json.dumps(frame, ensure_ascii=False)


def batch_text(texts):
    """A batch frame built from message texts that are already encoded JSON."""
    return '{"type": "batch", "messages": [' + ", ".join(texts) + "]}"


def behind_text(since, until):
    return dumps({"type": "behind", "since": since, "until": until})


def group_name(room_name):
    return f"chat.{room_name}"


def history_text(texts):
    return '{"type": "history", "messages": [' + ", ".join(texts) + "]}"


@reads
def _recent_frames(room_name, limit):
    return [m.as_frame() for m in store.recent_messages(room_name, limit)]


@writes
def _store_posts(posts):
    return [(m.as_frame(), m.repeat) for m in store.post_messages(posts)]


@reads
def _frames_since(room_name, since, limit):
    return [m.as_frame() for m in store.messages_since(room_name, since, limit)]


class Subscriber:
    """One socket's view of its room: what is still to be sent to it, bounded.

    `send` is a coroutine function taking a text frame. The room's sender task
    hands a fresh frame to every idle socket in one pass (no task per socket
    per frame: with Daphne a send completes without waiting); a socket that is
    still sending, or paused, queues, and drains in a task of its own so that
    it holds up only itself.
    """

    def __init__(self, send, backlog=None):
        self.send = send
        self.backlog = backlog or SOCKET_BACKLOG
        # Flushes not yet sent: (frame text, [(seq, message text), ...], stored_at).
        self.queue = []
        self.queued = 0
        # (since, until) of messages dropped from this socket's queue.
        self.behind = None
        self.paused = True
        # A send to this socket is under way (the room's pass or its own task).
        self.busy = False
        self.task = None

    def offer(self, frame, items, stored_at=None):
        """Takes a flush; True means: idle, the caller sends `frame` with send_now().

        stored_at: when the flush's oldest message was stored (time.time()),
        or None; for chat_fanout_delivery_seconds when the flush is sent from
        this socket's queue.
        """
        if not (self.paused or self.busy or self.queue or self.behind):
            self.busy = True
            return True
        if self.queued + len(items) > self.backlog:
            # Never drop silently: the socket learns exactly which seqs it lost.
            dropped = [seq for _, flush, _ in self.queue for seq, _ in flush] + [seq for seq, _ in items]
            since, until = dropped[0] - 1, dropped[-1]
            if self.behind is not None:
                since = min(since, self.behind[0])
            self.behind = (since, until)
            self.queue, self.queued = [], 0
        else:
            self.queue.append((frame, items, stored_at))
            self.queued += len(items)
        self._wake()
        return False

    async def send_now(self, frame):
        try:
            if not self.paused:
                await self.send(frame)
        except Exception:
            # A socket that cannot be written to is closing; its consumer cleans up.
            log.debug("send to a subscriber failed", exc_info=True)
        finally:
            self.busy = False
            self._wake()

    def start(self):
        """Begin sending; until then messages only queue (the join history goes first)."""
        self.paused = False
        self._wake()

    def stop(self):
        self.paused = True
        if self.task is not None:
            self.task.cancel()
            self.task = None

    def _wake(self):
        if not (self.paused or self.busy) and (self.queue or self.behind):
            self.busy = True
            self.task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self):
        try:
            while not self.paused and (self.queue or self.behind):
                if self.behind is not None:
                    since, until = self.behind
                    self.behind = None
                    await self.send(behind_text(since, until))
                    metrics.BEHIND_NOTICES.inc()
                    continue
                queue, self.queue, self.queued = self.queue, [], 0
                if len(queue) == 1:
                    # The room's frame, shared by every socket.
                    text = queue[0][0]
                else:
                    text = batch_text([message for _, flush, _ in queue for _, message in flush])
                await self.send(text)
                # A lagging socket's own send: one observation per send (it
                # carries every flush queued meanwhile), from the oldest.
                stored_at = min((at for *_, at in queue if at is not None), default=None)
                if stored_at is not None:
                    metrics.FANOUT_DELIVERY.observe(max(0.0, time.time() - stored_at))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.debug("send to a subscriber failed", exc_info=True)
        finally:
            self.busy = False
            self.task = None


class _Room:
    def __init__(self, name):
        self.name = name
        self.group = group_name(name)
        self.subscribers = set()
        self.opening = None
        # The next seq to hand out; None until the room is open.
        self.expected = None
        # Messages ahead of a hole, by seq.
        self.held = {}
        # When the held messages were stored (time.time()), by seq, for those
        # that came with it (not those read back from the database).
        self.held_at = {}
        self.gap_timer = None
        self.filling = False
        # Message texts waiting for the batch window to close, and when the
        # oldest of them that came with a time was stored.
        self.pending = []
        self.pending_at = None
        self.flush_timer = None
        # The newest messages handed out, as texts: the history a joining
        # socket gets, without a database read per handshake.
        self.recent = collections.deque(maxlen=settings.CHAT_HISTORY_ON_JOIN)
        self._history = None

    def history(self):
        if self._history is None:
            self._history = history_text(self.recent)
        return self._history


class Hub:
    """One per event loop and channel layer: the process's member of every room group."""

    def __init__(self, layer, redis=None):
        self.layer = layer
        # The layer's Redis (a redisconn.RedisTarget, or a URL), asked
        # directly by the watchdog; None: no watchdog.
        self.redis = redisconn.of(redis)
        self.watchdog = None
        self.loop = asyncio.get_running_loop()
        self.rooms = {}
        self.channel = None
        self.reader = None
        # Serializes group_add/group_discard so a room closed and reopened at
        # once never ends up discarded after its new add.
        self.membership = asyncio.Lock()
        # Posts waiting for the database: (room, nickname, body, client_id, future).
        self.posts = []
        self.poster = None
        # False from a failed layer operation until a probe came back.
        self.layer_ok = True
        self.layer_failed_at = None
        # Stored while the layer was away, to publish once it answers: (room, message, stored_at).
        self.unpublished = []
        self.recovery = None
        # Probes sent to the hub's own channel, by token.
        self.probes = {}

    # Membership -----------------------------------------------------------

    async def join(self, room_name, subscriber):
        """Adds a paused subscriber; once the room receives messages, returns its history frame.

        Everything handed out after the subscriber was added is queued for it;
        everything before is in the history (up to its length), so a joining
        socket misses nothing and may see a message twice (clients drop it by seq).
        """
        room = self.rooms.get(room_name)
        if room is None:
            room = self.rooms[room_name] = _Room(room_name)
            room.opening = self.loop.create_task(self._open(room))
        room.subscribers.add(subscriber)
        try:
            # shield: a handshake given up does not cancel the opening others await.
            await asyncio.shield(room.opening)
        except BaseException:
            self.leave(room_name, subscriber)
            raise
        return room.history()

    def leave(self, room_name, subscriber):
        subscriber.stop()
        room = self.rooms.get(room_name)
        if room is None or subscriber not in room.subscribers:
            return
        room.subscribers.discard(subscriber)
        if not room.subscribers:
            del self.rooms[room_name]
            for timer in (room.gap_timer, room.flush_timer):
                if timer is not None:
                    timer.cancel()
            self.loop.create_task(self._close(room))

    async def _open(self, room):
        if not self.layer_ok:
            # Known to be down: fail at once rather than after the retries.
            raise LayerUnavailable("the channel layer is recovering")
        try:
            await self._join_group(room)
        except Exception as error:
            self._layer_failed(error)
            raise LayerUnavailable(describe(error)) from error
        # Read after joining the group: every later message reaches the hub,
        # every earlier one is in this history.
        recent = await _recent_frames(room.name, room.recent.maxlen)
        room.recent.extend(dumps(message) for message in recent)
        room.expected = recent[-1]["seq"] + 1 if recent else 1
        for seq in [seq for seq in room.held if seq < room.expected]:
            del room.held[seq]
            room.held_at.pop(seq, None)
        self._release(room)

    async def _join_group(self, room):
        async with self.membership:
            if self.reader is None:
                # A fresh channel each time: the pub/sub layer forgets a
                # channel whose receive was cancelled (see _close).
                self.channel = await self.layer.new_channel()
                self.reader = self.loop.create_task(self._read())
                if self.redis is not None:
                    self.watchdog = self.loop.create_task(self._watch())
            await self.layer.group_add(room.group, self.channel)

    async def _close(self, room):
        try:
            await room.opening
        except Exception:
            return  # never joined the group
        try:
            async with self.membership:
                if room.name in self.rooms:
                    return  # reopened meanwhile: the group membership is still needed
                await self.layer.group_discard(room.group, self.channel)
                if not self.rooms and self.reader is not None:
                    # No room left (a room being opened is in self.rooms
                    # already): stop reading; the next room starts afresh.
                    self.reader.cancel()
                    self.reader = None
                    if self.watchdog is not None:
                        self.watchdog.cancel()
                        self.watchdog = None
        except Exception as error:
            # Harmless: a process in a group it no longer needs ignores its messages.
            log.warning("leaving group %s failed: %s", room.group, describe(error))

    # Receiving ------------------------------------------------------------

    async def _read(self):
        while True:
            try:
                event = await self.layer.receive(self.channel)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                # Messages lost meanwhile are read from the database once the
                # layer answers again (_recover).
                self._layer_failed(error)
                await asyncio.sleep(RETRY_PAUSE)
                continue
            if event.get("type") == EVENT_TYPE:
                # stored_at rides beside the message (processes of an older
                # release send none): the frame clients get never changes.
                self.deliver(event["message"], event.get("stored_at"))
            elif event.get("type") == PROBE_TYPE:
                probe = self.probes.pop(event.get("token"), None)
                if probe is not None and not probe.done():
                    probe.set_result(True)

    # Channel layer outages ---------------------------------------------------

    async def _watch(self):
        client = redisconn.async_client(
            self.redis, socket_timeout=WATCH_INTERVAL * 2, socket_connect_timeout=WATCH_INTERVAL * 2,
            # One question, one answer: the watchdog itself is the retry.
            retry=Retry(NoBackoff(), 0))
        key = WATCH_KEY + uuid.uuid4().hex
        # Whether a missing key, or another master named by the sentinels,
        # means news (not on the first visit, nor after a failure, which
        # started a recovery already).
        expect_key = False
        master = None
        try:
            while True:
                try:
                    # Closes this process's connections to a master the
                    # sentinels no longer name (see chatservice/redisconn.py).
                    named = await redisconn.follow_master(client)
                    added = await self._mark_alive(client, key)
                except asyncio.CancelledError:
                    raise
                except Exception as error:
                    expect_key = False
                    master = None
                    self._layer_failed(error)
                else:
                    if master is not None and named != master:
                        # What was published on the old master meanwhile is
                        # lost to this process: recover as after a restart.
                        self._layer_failed(f"Redis failed over to {redisconn.format_addresses([named])}")
                    elif added and expect_key:
                        self._layer_failed("Redis lost its data: restarted")
                    # Unwritten (None), a missing key next time is no news.
                    expect_key = added is not None
                    master = named
                await asyncio.sleep(WATCH_INTERVAL)
        finally:
            await client.aclose()

    @staticmethod
    async def _mark_alive(client, key):
        """Writes the watchdog's key: whether it was new, or None when the master refused the
        write with NOREPLICAS (min-replicas-to-write: no replica in sync, right after a failover
        or when cut off from the others). Such a master answers and still takes PUBLISH: for the
        layer it is up."""
        pipe = client.pipeline(transaction=False)
        try:
            added, _ = await pipe.zadd(key, {"alive": 1}).expire(key, WATCH_TTL).execute()
        except RedisResponseError as error:
            if "NOREPLICAS" not in str(error):
                raise
            return None
        return added

    def _layer_failed(self, error):
        """Notes a failed layer operation: logged once, then recovered in the background."""
        if self.layer_ok:
            self.layer_ok = False
            self.layer_failed_at = time.monotonic()
            log.warning(
                "channel layer unreachable (%s): messages are stored and reach this "
                "process's sockets; the others get them once it answers",
                error if isinstance(error, str) else describe(error))
        if self.recovery is None or self.recovery.done():
            self.recovery = self.loop.create_task(self._recover())

    async def _recover(self):
        pause = RECOVER_PAUSE
        while True:
            await asyncio.sleep(pause / 2 + random.random() * pause / 2)
            pause = min(pause * 2, RECOVER_PAUSE_MAX)
            try:
                await self._probe()
                await self._rejoin()
                await self._publish_unpublished()
            except Exception:
                continue  # still down: logged once already, by _layer_failed
            break
        self.layer_ok = True
        metrics.HUB_RECOVERIES.inc()
        log.warning("channel layer answers again after %.1f s", time.monotonic() - self.layer_failed_at)
        # What other processes published while this one could not hear them
        # is in the database.
        for room in list(self.rooms.values()):
            if room.expected is not None:
                self._fill_from(room)

    async def _probe(self):
        """Returns once the layer carries a message again (to this hub, when it reads)."""
        if self.reader is None or self.channel is None:
            await self.layer.group_send(group_name("-probe"), {"type": PROBE_TYPE})
            return
        token = uuid.uuid4().hex
        probe = self.probes[token] = self.loop.create_future()
        try:
            await self.layer.send(self.channel, {"type": PROBE_TYPE, "token": token})
            await asyncio.wait_for(probe, PROBE_TIMEOUT)
        finally:
            self.probes.pop(token, None)

    async def _rejoin(self):
        # The core layer keeps group memberships in Redis, which a restart
        # empties; adding again is harmless where they survived (pub/sub).
        async with self.membership:
            for room in list(self.rooms.values()):
                if room.expected is not None and self.channel is not None:
                    await self.layer.group_add(room.group, self.channel)

    async def _publish_unpublished(self):
        while self.unpublished:
            room_name, message, stored_at = self.unpublished[0]
            await self._publish_one(room_name, message, stored_at)
            self.unpublished.pop(0)

    def _fill_from(self, room):
        """Reads messages after the last one handed out, as for a hole."""
        if not room.filling:
            room.filling = True
            self.loop.create_task(self._fill(room, force=True))

    def deliver(self, message, stored_at=None):
        """Takes one message as posted (a dict with room and seq), and when it was stored."""
        room = self.rooms.get(message["room"])
        if room is None:
            return
        seq = message["seq"]
        if room.expected is not None and seq < room.expected:
            return  # a duplicate, or already filled from the database
        room.held[seq] = message
        if stored_at is not None:
            room.held_at[seq] = stored_at
        if room.expected is not None:
            self._release(room)

    def _release(self, room):
        """Hands out the messages that follow without a hole; watches a remaining hole."""
        while room.expected in room.held:
            text = dumps(room.held.pop(room.expected))
            stored_at = room.held_at.pop(room.expected, None)
            if stored_at is not None and (room.pending_at is None or stored_at < room.pending_at):
                room.pending_at = stored_at
            room.pending.append((room.expected, text))
            room.recent.append(text)
            room._history = None
            room.expected += 1
        if room.pending and room.flush_timer is None:
            room.flush_timer = self.loop.call_later(BATCH_WINDOW, self._flush, room)
        if room.held and room.gap_timer is None and not room.filling:
            room.gap_timer = self.loop.call_later(GAP_WAIT, self._start_fill, room)

    def _start_fill(self, room):
        room.gap_timer = None
        if room.held and not room.filling and self.rooms.get(room.name) is room:
            room.filling = True
            self.loop.create_task(self._fill(room))

    async def _fill(self, room, force=False):
        # force: read even without a known hole (after a layer outage), and
        # on while pages come back full.
        more = force
        try:
            while (room.held or more) and self.rooms.get(room.name) is room:
                before = room.expected
                messages = await _frames_since(room.name, room.expected - 1, FILL_PAGE)
                more = force and len(messages) == FILL_PAGE
                for message in messages:
                    if message["seq"] >= room.expected:
                        room.held.setdefault(message["seq"], message)
                self._release(room)
                if room.expected == before and room.held:
                    # Not in the database: a seq that no longer exists cannot
                    # be waited for, so skip to what is held.
                    log.warning("room %s: seq %d missing from the database", room.name, before)
                    room.expected = min(room.held)
                    self._release(room)
        except Exception:
            log.warning("filling a gap in room %s failed; retrying", room.name, exc_info=True)
        finally:
            room.filling = False
        if room.held:
            self._release(room)

    # Posting --------------------------------------------------------------

    async def post(self, room_name, nickname, body, client_id=None):
        """Stores a message and publishes it; returns (it as a frame dict, repeat).

        repeat: a message with this client_id was stored before (a resend);
        the stored one is returned and nothing new is written. It is handed
        out and published again all the same (each hub drops a seq it has
        handed out already): the process that stored it may have died before
        it published it.

        Posts that arrive while a write is running are stored together in the
        next one (group commit): one thread hop, connection and transaction
        for all of them instead of one each. A failed write raises (the
        message is not stored); once stored, a message is never lost: this
        process's sockets get it at once, the others through the layer, now
        or when it answers again.
        """
        future = self.loop.create_future()
        self.posts.append((room_name, nickname, body, client_id, future))
        if self.poster is None or self.poster.done():
            self.poster = self.loop.create_task(self._write_posts())
        return await future

    async def _write_posts(self):
        while self.posts:
            batch, self.posts = self.posts[:POST_BATCH], self.posts[POST_BATCH:]
            try:
                stored = await _store_posts([post for *post, _ in batch])
            except Exception as error:
                for *_, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            # The start of chat_fanout_delivery_seconds, here and in every
            # process the message reaches. A repeat was stored at some
            # earlier moment, unknown here: it is not timed.
            stored_at = time.time()
            fresh = 0
            for (message, repeat), (room_name, *_, future) in zip(stored, batch):
                if not repeat:
                    fresh += 1
                self.deliver(message, None if repeat else stored_at)
                if not future.done():
                    future.set_result((message, repeat))
            metrics.MESSAGES_STORED.inc(fresh)
            for (message, repeat), (room_name, *_) in zip(stored, batch):
                at = None if repeat else stored_at
                if not self.layer_ok:
                    self.unpublished.append((room_name, message, at))
                    continue
                try:
                    await self._publish_one(room_name, message, at)
                except Exception as error:
                    self.unpublished.append((room_name, message, at))
                    self._layer_failed(error)

    async def _publish_one(self, room_name, message, stored_at=None):
        event = {"type": EVENT_TYPE, "message": message}
        if stored_at is not None:
            event["stored_at"] = stored_at
        await self.layer.group_send(group_name(room_name), event)

    def _flush(self, room):
        room.flush_timer = None
        pending, room.pending = room.pending, []
        stored_at, room.pending_at = room.pending_at, None
        if not pending:
            return
        frame = pending[0][1] if len(pending) == 1 else batch_text([text for _, text in pending])
        idle = [subscriber for subscriber in room.subscribers if subscriber.offer(frame, pending, stored_at)]
        if idle:
            self.loop.create_task(self._send_to(idle, frame, stored_at))

    @staticmethod
    async def _send_to(subscribers, frame, stored_at=None):
        for subscriber in subscribers:
            await subscriber.send_now(frame)
        # chat_fanout_delivery_seconds: one observation per flush for all the
        # sockets it reached at once (not one per socket: 20,000 sends a
        # second would cost as many observations), taken after the last of
        # them, so an upper bound for each; from the flush's oldest message.
        if stored_at is not None:
            metrics.FANOUT_DELIVERY.observe(max(0.0, time.time() - stored_at))


_hubs = {}


def get_hub():
    """The hub of the running event loop for the default channel layer."""
    loop = asyncio.get_running_loop()
    layer = get_channel_layer()
    hub = _hubs.get(loop)
    if hub is None or hub.layer is not layer:
        # A new layer (settings changed, tests) or a new loop: start afresh.
        for old_loop in [old for old in _hubs if old.is_closed()]:
            del _hubs[old_loop]
        hosts = settings.CHANNEL_LAYERS.get("default", {}).get("CONFIG", {}).get("hosts") or [None]
        hub = _hubs[loop] = Hub(layer, redis=hosts[0])
    return hub


async def publish(room_name, message):
    """Sends a stored message to every process that has sockets in the room."""
    await get_channel_layer().group_send(
        group_name(room_name), {"type": EVENT_TYPE, "message": message}
    )
