"""Daphne as a systemd service: ``python -m chatservice.serve_daphne [daphne options]``.

Takes the same options as the ``daphne`` command and adds what a service
under systemd socket activation needs, which Daphne itself does not do:

- **Readiness**: tells systemd ``READY=1`` (sd_notify) once the application
  is imported and the adopted socket is being served, so a ``Type=notify``
  unit's ``systemctl restart`` returns only when the instance answers. A
  rolling restart can then move to the next instance without a gap.
- **A socket that stays systemd's**: Twisted treats a unix socket it adopts
  as its own. It calls ``listen()`` again with its default backlog of 50
  (overriding the socket unit's ``Backlog=``: a burst of more than 50
  handshakes is refused, 502 from Nginx), makes the file world-writable
  (0666, overriding ``SocketMode=``), and on stop calls ``shutdown()`` on it
  and unlinks its path: systemd then sees the socket fail ("Got POLLHUP on a
  listening socket") and the next instance cannot start ("No such file").
  The adopted port here keeps ``CHAT_LISTEN_BACKLOG`` and the file's mode,
  and leaves the socket open and in place when the process stops, so
  connections queue in it while the instance restarts.
- **A clean goodbye on stop**: on SIGTERM the process first stops accepting
  (its listening sockets stay open, and systemd's, so new connections wait
  in their queue for the next process), then every open WebSocket gets a
  close frame with code 1012 (service restart, RFC 6455 / IANA) before the
  process exits, instead of a dropped TCP connection (1006 on the client).
  The page reconnects and catches up from history by seq. Stopping to
  accept comes first because a client that reconnects at once would
  otherwise be accepted by the stopping process during its grace time and
  cut without a close frame when it exits. Daphne cannot
  send 1012 through ASGI (autobahn's ``sendClose`` only allows 1000 and
  3000-4999), so the frame is sent on the protocol directly.
- **WebSockets moved off Nginx's retired workers**: a reload of Nginx starts
  new workers, and the old ones keep the WebSockets they proxy until
  ``worker_shutdown_timeout`` (10 min here), then cut them all at once
  without a close frame. On SIGUSR1 (``chat-daphne-rehome``, run by the
  playbooks after each reload they make) every WebSocket open at that moment
  gets 1012, each at a random moment within ``CHAT_REHOME_WINDOW`` seconds:
  its page reconnects through the new workers, and the reconnects are spread
  instead of arriving as one burst. Sockets opened after the signal already
  go through the new workers and are left alone.
- **Server close codes through ASGI**: the app closes a handshake it cannot
  serve now with 1013 (try again later); Daphne hands every close code to
  autobahn's ``sendClose``, which raises for it (a traceback and a dropped
  connection instead). The codes a server may send by RFC 6455 and IANA
  (``SERVER_CLOSE_CODES``) go out as a close frame directly.
- **Metrics for Prometheus**: with ``CHAT_METRICS_LISTEN`` (ADDRESS:PORT),
  ``/metrics`` on that address serves the process's registry (the chat's
  metrics, ``chat/metrics.py``, and prometheus_client's process and Python
  ones), from the same reactor and thread as the app: no server thread, and
  rendering a scrape takes well under a millisecond.
- **The message size limit is for what clients send**: Daphne passes
  ``--websocket-max-message-size`` to autobahn, which applies it to outgoing
  messages too, so a history page or a catch-up batch larger than it failed
  the socket with 1011, and the client, asking again for the same page after
  reconnecting, could never catch up. Outgoing messages are not limited here;
  what the server sends is bounded by the app (history pages, backlogs).
- **Text frames written directly**: a room's message goes to every socket of
  the room, so the path from the app's send to the socket's write runs
  thousands of times a second. Through Daphne and autobahn it took half of
  that work (py-spy, docs/benchmark.md): autobahn's ``sendMessage`` checks
  and counts, and its ``sendData`` formats a debug line's arguments (with
  colours) for every frame even when nothing logs them. A text message to an
  open socket with none of autobahn's options that change the frame
  (compression, fragmentation, masking, frame logging, a queue of chopped
  writes) is framed here (RFC 6455 5.2: FIN and opcode 1, the length in 1, 3
  or 9 bytes) and handed to the same transport; anything else still goes
  through autobahn.
- **Frames sent at once**: Twisted's ``write`` only buffers; it registers
  the socket with the loop for writing (an ``epoll_ctl``, asyncio's
  selector bookkeeping and a callback) and sends on the loop's next turn,
  then unregisters it (another ``epoll_ctl``). A frame written while
  Twisted holds nothing for the socket is sent here at once, and only what
  the socket does not take goes through Twisted's buffer, as does every
  frame behind it, so the order holds. In the room of 1,000 (one frame per
  message and socket) that bookkeeping was 43 % of the process's Python,
  and the server side's CPU per 1,000 deliveries went from 87-100 ms to
  48-67 ms (docs/benchmark.md, "Where Daphne's time goes").
"""

import os
import random
import signal
import socket
import stat
import struct
import sys
import time

# Importing daphne.server installs Twisted's asyncio reactor: it must come
# before anything imports twisted.internet.reactor.
from daphne.cli import CommandLineInterface
from daphne.server import Server
from daphne.ws_protocol import WebSocketProtocol
from django.core.exceptions import ImproperlyConfigured
from prometheus_client import REGISTRY
from prometheus_client.exposition import choose_encoder
from twisted.internet import defer, reactor, task, tcp, unix
from twisted.internet.error import CannotListenError
from twisted.web.resource import Resource
from twisted.web.server import Site

from .env import env_float, env_int
from .metrics_listen import metrics_listen

CLOSE_SERVICE_RESTART = 1012
# Internal error, service restart, try again later: codes only a server sends.
SERVER_CLOSE_CODES = {1011: b"internal error", 1012: b"service restart", 1013: b"try again later"}
DEFAULT_BACKLOG = 2048
DEFAULT_CLOSE_GRACE = 2.0
DEFAULT_REHOME_WINDOW = 30.0
# How often the stop checks whether the clients have answered the close.
CLOSE_POLL_SECONDS = 0.05


def notify_systemd(state):
    """Send one sd_notify message; a no-op when not started by systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(address)
        sock.sendall(state.encode())
    return True


class AdoptedUnixPort(unix.Port):
    """A unix socket that systemd holds: served here, never reshaped or removed."""

    # No shutdown() on stop: it would end the listening socket for systemd too.
    _shouldShutdown = False

    def connectionLost(self, reason):
        # unix.Port.connectionLost unlinks the path first: skip to the close.
        tcp.Port.connectionLost(self, reason)


def adopt_unix_sockets_as_systemds(backlog):
    """Make Twisted serve adopted unix sockets as AdoptedUnixPort, with ``backlog``."""

    def adopted(cls, reactor, fd, factory):
        sock = socket.fromfd(fd, cls.addressFamily, cls.socketType)
        path = sock.getsockname()
        port = AdoptedUnixPort(path, factory, backlog=backlog, reactor=reactor)
        if unix._inFilesystemNamespace(port._bindPath):
            # startListening chmods the file to port.mode: keep SocketMode=.
            port.mode = stat.S_IMODE(os.stat(port._bindPath).st_mode)
        port._preexistingSocket = sock
        return port

    unix.Port._fromListeningDescriptor = classmethod(adopted)


def allow_server_close_codes():
    """Let the application close with SERVER_CLOSE_CODES, which autobahn's sendClose refuses."""
    original = WebSocketProtocol.serverClose

    def server_close(protocol, code=None):
        if code in SERVER_CLOSE_CODES:
            protocol.sendCloseFrame(code=code, reasonUtf8=SERVER_CLOSE_CODES[code])
        else:
            original(protocol, code)

    WebSocketProtocol.serverClose = server_close


def unlimit_outgoing_messages():
    """Keep autobahn's maxMessagePayloadSize for received messages only."""
    original = WebSocketProtocol.sendMessage

    def send_message(protocol, *args, **kwargs):
        limit = protocol.maxMessagePayloadSize
        protocol.maxMessagePayloadSize = 0  # 0: no limit, for this send only
        try:
            return original(protocol, *args, **kwargs)
        finally:
            protocol.maxMessagePayloadSize = limit

    WebSocketProtocol.sendMessage = send_message


def text_frame(payload):
    """An unfragmented, unmasked text frame (RFC 6455 5.2) carrying ``payload`` (UTF-8 bytes)."""
    length = len(payload)
    if length <= 125:
        return bytes((0x81, length)) + payload
    if length <= 0xFFFF:
        return struct.pack("!BBH", 0x81, 126, length) + payload
    return struct.pack("!BBQ", 0x81, 127, length) + payload


def _is_open(protocol):
    return getattr(protocol, "state", None) == getattr(protocol, "STATE_OPEN", object())


def _frames_as_autobahn_would(protocol):
    """Whether autobahn would send a text message to protocol as one plain frame, now."""
    return (_is_open(protocol) and protocol._perMessageCompress is None
            and not protocol.autoFragmentSize and not protocol.maskServerFrames and not protocol.logFrames
            and not protocol.trackedTimings and not protocol.send_queue)


def send_at_once(transport, frame):
    """Send frame on transport's socket now if Twisted holds nothing for it, else behind what it holds.

    Only for Twisted's own stream sockets (TCP and unix) with nothing queued:
    a TLS transport, a unix socket with descriptors to pass, a connection
    closing or half-closed, or data still buffered all take Twisted's write.
    """
    if (not isinstance(transport, tcp.Connection) or getattr(transport, "_sendmsgQueue", None)
            or not transport.connected or transport.disconnecting or transport._writeDisconnected
            or transport._tempDataBuffer or transport.offset != len(transport.dataBuffer)):
        transport.write(frame)
        return
    try:
        sent = transport.socket.send(frame)
    except BlockingIOError:
        sent = 0
    except OSError:
        # The connection is failing: Twisted's own write meets the same
        # error on the next turn and closes it the way it always does.
        transport.write(frame)
        return
    if sent < len(frame):
        transport.write(frame[sent:])


def write_text_frames_directly():
    """Send the app's text messages as frames written here (see the module's docstring)."""
    original = WebSocketProtocol.serverSend

    def server_send(protocol, content, binary=False):
        if binary or not _frames_as_autobahn_would(protocol):
            return original(protocol, content, binary)
        send_at_once(protocol.transport, text_frame(content.encode("utf8")))
        return None

    WebSocketProtocol.serverSend = server_send


class MetricsResource(Resource):
    """A registry in Prometheus's text format, rendered in the reactor's thread.

    prometheus_client.twisted.MetricsResource renders in the reactor's
    thread pool instead (a WSGI resource).
    """

    isLeaf = True

    def __init__(self, registry=REGISTRY):
        super().__init__()
        self.registry = registry

    def render_GET(self, request):
        accept = request.getHeader("accept")
        encoder, content_type = choose_encoder(accept or "")
        request.setHeader("Content-Type", content_type)
        return encoder(self.registry)


class _QuietSite(Site):
    """No access log line per scrape (Daphne's -v 2 would print them), no factory notices."""

    noisy = False

    def log(self, request):
        pass


def listen_for_metrics(address, port, registry=REGISTRY, reactor=reactor):
    """Serves ``registry`` at ``http://address:port/metrics``; returns the listening port."""
    root = Resource()
    root.putChild(b"metrics", MetricsResource(registry))
    return reactor.listenTCP(port, _QuietSite(root), interface=address)


def _open_websockets(server):
    return [protocol for protocol in list(server.connections) if _is_open(protocol)]


def _tell_restart(protocol):
    """A 1012 close frame: the page reconnects and catches up."""
    protocol.sendCloseFrame(code=CLOSE_SERVICE_RESTART, reasonUtf8=SERVER_CLOSE_CODES[CLOSE_SERVICE_RESTART])


def stop_accepting(reactor=reactor):
    """Stop reading every listening port; returns how many.

    Not stopListening(): that would close the socket. Unread, it keeps
    queueing connections, which the next process (given the same socket by
    systemd) accepts.
    """
    ports = [reader for reader in reactor.getReaders() if isinstance(reader, tcp.Port)]
    for port in ports:
        port.stopReading()
    return len(ports)


def close_websockets(server, grace, clock=reactor):
    """Stop accepting, send 1012 to every open WebSocket; wait up to ``grace`` s for them to go.

    Returns a Deferred, which holds reactor shutdown (a "before" trigger)
    until the clients have answered the close or the grace time is over.
    """
    stop_accepting()
    sockets = _open_websockets(server)
    for protocol in sockets:
        _tell_restart(protocol)
    if not sockets:
        return defer.succeed(0)
    deadline = time.monotonic() + grace

    def wait():
        if not _open_websockets(server) or time.monotonic() >= deadline:
            poller.stop()

    poller = task.LoopingCall(wait)
    poller.clock = clock
    return poller.start(CLOSE_POLL_SECONDS, now=False).addCallback(lambda _: len(sockets))


def rehome_websockets(server, window, clock=reactor, rng=random):
    """Tell every WebSocket open now 1012, each at a random moment within ``window`` s.

    Returns how many were told. A socket that closes meanwhile is skipped;
    asked again before the window is over, the sockets told already keep
    their moment and only the new ones are added.
    """
    told = server.__dict__.setdefault("_chat_rehoming", set())
    sockets = [protocol for protocol in _open_websockets(server) if id(protocol) not in told]

    def tell(protocol):
        told.discard(id(protocol))
        if _is_open(protocol):
            _tell_restart(protocol)

    for protocol in sockets:
        told.add(id(protocol))
        clock.callLater(rng.uniform(0, window), tell, protocol)
    return len(sockets)


def on_rehome_signal(server, window, reactor=reactor):
    """The SIGUSR1 handler: the work is done in the reactor's loop, not in the handler."""

    def rehome():
        count = rehome_websockets(server, window)
        print(f"chatservice.serve_daphne: SIGUSR1: {count} WebSockets told 1012 within {window:g} s "
              "(to reconnect through Nginx's new workers)", file=sys.stderr, flush=True)

    def handler(signum, frame):
        reactor.callFromThread(rehome)

    return handler


def main():
    # SIGUSR1 would end the process until the server installs its handler.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        backlog = env_int("CHAT_LISTEN_BACKLOG", DEFAULT_BACKLOG, minimum=1)
        grace = env_float("CHAT_CLOSE_GRACE", DEFAULT_CLOSE_GRACE, minimum=CLOSE_POLL_SECONDS)
        rehome_window = env_float("CHAT_REHOME_WINDOW", DEFAULT_REHOME_WINDOW, minimum=0)
        metrics_address = metrics_listen()
    except ImproperlyConfigured as error:
        sys.exit(f"chatservice.serve_daphne: {error}")
    if metrics_address is not None:
        # Before Daphne starts: a port taken stops the start, with one line.
        try:
            listen_for_metrics(*metrics_address)
        except CannotListenError as error:
            sys.exit(f"chatservice.serve_daphne: cannot serve metrics on CHAT_METRICS_LISTEN: {error}")
    adopt_unix_sockets_as_systemds(backlog)
    allow_server_close_codes()
    unlimit_outgoing_messages()
    write_text_frames_directly()

    original_run = Server.run

    def run(server):
        # Registered before Daphne's own trigger, which cancels the
        # applications: the sockets are told first.
        reactor.addSystemEventTrigger("before", "shutdown", close_websockets, server, grace)
        signal.signal(signal.SIGUSR1, on_rehome_signal(server, rehome_window))
        # Daphne starts listening in run(), before the reactor runs: by the
        # time this fires, the application is imported and the socket served.
        reactor.callWhenRunning(notify_systemd, "READY=1")
        original_run(server)

    Server.run = run
    CommandLineInterface.entrypoint()


if __name__ == "__main__":
    main()
