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
- **A bounded backlog per socket.** A socket whose sends do not keep up queues
  at most `SOCKET_BACKLOG` messages. Beyond that its queue is dropped and it
  gets `{"type": "behind", "since": S, "until": U}`: messages S+1..U were not
  sent to it; it fetches them with `history` before it shows newer ones.
"""

import asyncio
import json
import logging

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer

from chatservice.env import env_float, env_int

from . import store
from .models import Room

log = logging.getLogger(__name__)

# Milliseconds are what operators think in; the module keeps seconds.
BATCH_WINDOW = env_float("CHAT_BATCH_WINDOW_MS", 5.0, minimum=0.0) / 1000
GAP_WAIT = env_float("CHAT_GAP_WAIT_MS", 200.0, minimum=0.0) / 1000
SOCKET_BACKLOG = env_int("CHAT_SOCKET_BACKLOG", 1000, minimum=1)
# A failed layer receive (Redis restarting) is retried after this pause.
RETRY_PAUSE = 1.0
# Matches CHAT_HISTORY_PAGE: one database read fills up to this many missing.
FILL_PAGE = 200

EVENT_TYPE = "chat.message"


def dumps(frame):
    return json.dumps(frame, ensure_ascii=False)


def batch_text(texts):
    """A batch frame built from message texts that are already encoded JSON."""
    return '{"type": "batch", "messages": [' + ", ".join(texts) + "]}"


def behind_text(since, until):
    return dumps({"type": "behind", "since": since, "until": until})


def group_name(room_name):
    return f"chat.{room_name}"


@database_sync_to_async
def _last_seq(room_name):
    return Room.objects.filter(name=room_name).values_list("last_seq", flat=True).first() or 0


@database_sync_to_async
def _frames_since(room_name, since, limit):
    return [m.as_frame() for m in store.messages_since(room_name, since, limit)]


class Subscriber:
    """One socket's view of its room: a bounded queue drained by its own task.

    `send` is the consumer's coroutine function taking a text frame. Each
    socket drains in its own task so that a socket whose send blocks (a slow
    reader behind a server with back-pressure) holds up only itself.
    """

    def __init__(self, send, backlog=None):
        self.send = send
        self.backlog = backlog or SOCKET_BACKLOG
        # Flushes not yet sent: (frame text, [(seq, message text), ...]).
        self.queue = []
        self.queued = 0
        # (since, until) of messages dropped from this socket's queue.
        self.behind = None
        self.paused = True
        self.task = None

    def offer(self, frame, items):
        if self.queued + len(items) > self.backlog:
            # Never drop silently: the socket learns exactly which seqs it lost.
            dropped = [seq for _, flush in self.queue for seq, _ in flush] + [seq for seq, _ in items]
            since, until = dropped[0] - 1, dropped[-1]
            if self.behind is not None:
                since = min(since, self.behind[0])
            self.behind = (since, until)
            self.queue, self.queued = [], 0
        else:
            self.queue.append((frame, items))
            self.queued += len(items)
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
        if not self.paused and self.task is None and (self.queue or self.behind):
            self.task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self):
        try:
            while not self.paused and (self.queue or self.behind):
                if self.behind is not None:
                    since, until = self.behind
                    self.behind = None
                    await self.send(behind_text(since, until))
                    continue
                queue, self.queue, self.queued = self.queue, [], 0
                if len(queue) == 1:
                    # The common case: the room's frame, shared by every socket.
                    text = queue[0][0]
                else:
                    text = batch_text([message for _, flush in queue for _, message in flush])
                await self.send(text)
        except asyncio.CancelledError:
            raise
        except Exception:
            # A socket that cannot be written to is closing; its consumer cleans up.
            log.debug("send to a subscriber failed", exc_info=True)
        finally:
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
        self.gap_timer = None
        self.filling = False
        # Message texts waiting for the batch window to close.
        self.pending = []
        self.flush_timer = None


class Hub:
    """One per event loop and channel layer: the process's member of every room group."""

    def __init__(self, layer):
        self.layer = layer
        self.loop = asyncio.get_running_loop()
        self.rooms = {}
        self.channel = None
        self.reader = None
        # Serializes group_add/group_discard so a room closed and reopened at
        # once never ends up discarded after its new add.
        self.membership = asyncio.Lock()

    # Membership -----------------------------------------------------------

    async def join(self, room_name, subscriber):
        """Adds a paused subscriber; returns once the room receives messages."""
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
        if self.channel is None:
            self.channel = await self.layer.new_channel()
        if self.reader is None or self.reader.done():
            self.reader = self.loop.create_task(self._read())
        async with self.membership:
            await self.layer.group_add(room.group, self.channel)
        # Read after joining the group: every later message reaches the hub,
        # every earlier one is in the history the consumer reads next.
        last = await _last_seq(room.name)
        room.expected = last + 1
        for seq in [seq for seq in room.held if seq < room.expected]:
            del room.held[seq]
        self._release(room)

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
        except Exception:
            log.warning("leaving group %s failed", room.group, exc_info=True)
        if not self.rooms and self.reader is not None:
            self.reader.cancel()
            self.reader = None

    # Receiving ------------------------------------------------------------

    async def _read(self):
        while True:
            try:
                event = await self.layer.receive(self.channel)
            except asyncio.CancelledError:
                raise
            except Exception:
                # Messages lost meanwhile are filled from the database when
                # the next one shows the hole.
                log.warning("channel layer receive failed; retrying", exc_info=True)
                await asyncio.sleep(RETRY_PAUSE)
                continue
            if event.get("type") == EVENT_TYPE:
                self.deliver(event["message"])

    def deliver(self, message):
        """Takes one message as posted (a dict with room and seq)."""
        room = self.rooms.get(message["room"])
        if room is None:
            return
        seq = message["seq"]
        if room.expected is not None and seq < room.expected:
            return  # a duplicate, or already filled from the database
        room.held[seq] = message
        if room.expected is not None:
            self._release(room)

    def _release(self, room):
        """Hands out the messages that follow without a hole; watches a remaining hole."""
        while room.expected in room.held:
            message = room.held.pop(room.expected)
            room.pending.append((room.expected, dumps(message)))
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

    async def _fill(self, room):
        try:
            while room.held and self.rooms.get(room.name) is room:
                before = room.expected
                messages = await _frames_since(room.name, room.expected - 1, FILL_PAGE)
                for message in messages:
                    if message["seq"] >= room.expected:
                        room.held.setdefault(message["seq"], message)
                self._release(room)
                if room.expected == before:
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

    def _flush(self, room):
        room.flush_timer = None
        pending, room.pending = room.pending, []
        if not pending:
            return
        frame = pending[0][1] if len(pending) == 1 else batch_text([text for _, text in pending])
        for subscriber in room.subscribers:
            subscriber.offer(frame, pending)


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
        hub = _hubs[loop] = Hub(layer)
    return hub


async def publish(room_name, message):
    """Sends a stored message to every process that has sockets in the room."""
    await get_channel_layer().group_send(
        group_name(room_name), {"type": EVENT_TYPE, "message": message}
    )
