"""WebSocket consumers. The protocol is described in README.md."""

import logging
import socket

from channels.consumer import get_handler_name
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

from . import addressrate, fanout, health, metrics, store
from .dbcalls import reads
from .models import is_valid_room_name
from .protocol import (ProtocolError, clean_body, clean_client_id, clean_nickname, clean_since, client_id_of,
                       parse_frame)
from .ratelimit import TokenBucket

# Sent after accepting, because closing before accept() can only answer the
# handshake with HTTP 403, which a browser cannot tell apart from a refused Origin.
CLOSE_NOT_FOUND = 4004
# "Try again later" (RFC 6455): the room cannot be joined now (Redis or the
# database does not answer). Accepted and closed rather than refused, so the
# proxy never turns it into a 500 and the page retries with jitter.
CLOSE_TRY_AGAIN_LATER = 1013

log = logging.getLogger(__name__)


_dumps = fanout.dumps


_history_since = reads(store.history_frame)


class LoopConsumer(AsyncWebsocketConsumer):
    """A consumer that never touches the database on the event loop's thread.

    Channels' dispatch() runs close_old_connections() on its one sync thread
    before every event: a thread hop per handshake, per frame received and per
    close, shared by every socket of the process, to close connections that
    only that thread could have opened. Nothing here opens one there: the
    database is read and written on chat/dbcalls.py's own threads, which close
    their old connections themselves. Under a room of 100 posting 200
    messages/s the hop took 8-16 % of a Daphne instance's Python time (py-spy,
    docs/benchmark.md)."""

    async def dispatch(self, message):
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)


class ChatConsumer(LoopConsumer):
    # No channel of its own: room messages reach this socket through the
    # process's hub (fanout.py), which saves a channel, a pending receive and,
    # with the pub/sub layer, a Redis subscription per socket.
    channel_layer_alias = None
    room_name = None
    subscriber = None

    async def connect(self):
        self.room_name = self.scope["url_route"]["kwargs"]["room"]
        if not is_valid_room_name(self.room_name):
            metrics.HANDSHAKES_NOT_FOUND.inc()
            await self.accept()
            await self.close(code=CLOSE_NOT_FOUND)
            return
        self.bucket = TokenBucket(settings.CHAT_RATE_PER_SECOND, settings.CHAT_RATE_BURST)
        # Keepalive pings draw on a bucket of their own: a page's pings never
        # cost it a message, and a flood of pings is still bounded.
        self.ping_bucket = TokenBucket(settings.CHAT_RATE_PER_SECOND, settings.CHAT_RATE_BURST)
        self.hub = fanout.get_hub()
        # The client's address (Daphne and uvicorn take it from the proxy's
        # X-Forwarded-For), for the per-address message rate.
        self.address = (self.scope.get("client") or [None])[0]
        # The hub hands back the room's recent history at the moment the socket
        # joined (read once per process, not per handshake); the subscriber
        # stays paused until that history is sent.
        subscriber = fanout.Subscriber(self._send_text)
        try:
            history = await self.hub.join(self.room_name, subscriber)
        except Exception as error:
            # One line, not a traceback per handshake: the hub has logged the cause.
            log.info("room %s cannot be joined now: %s", self.room_name, fanout.describe(error))
            metrics.HANDSHAKES_UNAVAILABLE.inc()
            await self.accept()
            await self.close(code=CLOSE_TRY_AGAIN_LATER)
            return
        self.subscriber = subscriber
        # Counted up and down with self.subscriber: disconnect() evens it out.
        metrics.WEBSOCKETS_OPEN.inc()
        metrics.HANDSHAKES_ACCEPTED.inc()
        await self.accept()
        await self.send(text_data=history)
        subscriber.start()

    async def disconnect(self, code):
        if self.subscriber is not None:
            self.hub.leave(self.room_name, self.subscriber)
            self.subscriber = None
            metrics.WEBSOCKETS_OPEN.dec()

    async def _send_text(self, text):
        # The ASGI send itself: the same message self.send() builds, without
        # its wrappers, as this runs once per socket per frame.
        await self.base_send({"type": "websocket.send", "text": text})

    async def receive(self, text_data=None, bytes_data=None):
        try:
            try:
                if text_data is None:
                    raise ProtocolError("binary_not_supported", "send JSON in text frames")
                frame, refused = parse_frame(text_data), None
            except ProtocolError as error:
                # A frame that is not valid still costs a token.
                frame, refused = None, error
            is_ping = frame is not None and frame["type"] == "ping"
            if not (self.ping_bucket if is_ping else self.bucket).allow():
                raise ProtocolError("rate_limited", "too many frames; slow down")
            if refused is not None:
                raise refused
            if frame["type"] == "message" and not await addressrate.allow(
                    self.hub.redis, self.address, settings.CHAT_MESSAGES_PER_ADDRESS_PER_SECOND):
                raise ProtocolError("rate_limited", "too many messages from your address; slow down")
            await getattr(self, f"handle_{frame['type']}")(frame)
        except ProtocolError as error:
            metrics.refused(error.code)
            # A refused post is named by its client_id, so the client knows which one.
            await self.send(text_data=_dumps(error.as_frame(client_id_of(frame))))

    async def handle_message(self, frame):
        nickname = clean_nickname(frame.get("nickname"))
        body = clean_body(frame.get("body"), settings.CHAT_MAX_BODY_LENGTH)
        client_id = clean_client_id(frame.get("client_id"))
        # Stored before it is broadcast, so everything a client sees live can
        # also be fetched again by seq.
        metrics.MESSAGES_POSTED.inc()
        try:
            message, repeat = await self.hub.post(self.room_name, nickname, body, client_id)
        except Exception as error:
            log.warning("storing a message in room %s failed: %s", self.room_name, fanout.describe(error))
            raise ProtocolError(
                "store_failed", "the message could not be stored and was not sent; try again"
            ) from error
        if repeat:
            # Stored before (a resend after a drop): the sender gets that
            # message as its answer; the room had it already.
            await self.send(text_data=_dumps(message))

    async def handle_history(self, frame):
        since = clean_since(frame.get("since"))
        try:
            history = await _history_since(self.room_name, since, settings.CHAT_HISTORY_PAGE)
        except Exception as error:
            log.warning("reading history of room %s failed: %s", self.room_name, fanout.describe(error))
            raise ProtocolError("history_failed", "history cannot be read now; ask again") from error
        await self.send(text_data=_dumps(history))

    async def handle_ping(self, frame):
        await self.send(text_data=_dumps({"type": "pong"}))


class HealthConsumer(LoopConsumer):
    """Proves that the ASGI server, routing and origin check work end to end."""

    async def connect(self):
        await self.accept()
        forwarded_for = dict(self.scope.get("headers", [])).get(b"x-forwarded-for", b"").decode("latin-1")
        frame = {"status": "ok"}
        if health.detail_allowed(forwarded_for):
            frame.update({"interface": "asgi", "server": health.server_software(asgi=True),
                          "release": settings.RELEASE, "host": socket.gethostname()})
        await self.send(text_data=_dumps(frame))
        await self.close(code=1000)


class NotFoundConsumer(LoopConsumer):
    async def connect(self):
        # The same close code as an invalid room name, and counted alike.
        metrics.HANDSHAKES_NOT_FOUND.inc()
        await self.accept()
        await self.close(code=CLOSE_NOT_FOUND)
