#!/usr/bin/env python3
"""mindmeld: reach a TCP port on another machine through a relay both can reach.

    python3 mindmeld.py router                      # on a host everyone can reach
    python3 mindmeld.py share   web localhost:8000  # next to the service
    python3 mindmeld.py forward web 9000            # where you want to use it
    curl http://127.0.0.1:9000/

One file, standard library only, CPython 3.6 to 3.13.  Each peer holds one TCP
(optionally TLS) connection to the router; every stream is multiplexed on it as
length-prefixed frames with per-stream, credit-based flow control.  The protocol
is documented in README.md ("Protocol").

Table of contents (grep -n '^# ###'), from the bottom layer up:
  1. compatibility shims: every version difference, once
  2. constants and errors
  3. sans-IO core, no I/O: 3a frames, 3b preamble and peer text, 3c WebSocket
     framing, 3d stream ends (state table, credit, windows, ids), 3e handshake
     phases and proofs, 3f end to end (--secret): SPAKE2 pairing and stream proofs
  4. asyncio plumbing: 4a link, 4b local streams, 4c stdio transport,
     4d WebSocket and TLS layers, 4e end to end: TLS inside one stream
  5. TLS trust: certificates, pins, known routers
  6. the router: 6a front door, session, relayed streams, registry;
     6b status page and metrics
  7. clients (share, forward, connect, list) and proxy egress
  8. bench
  9. command line
"""

import argparse
import asyncio
import base64
import binascii
import collections
import datetime
import errno
import hashlib
import heapq
import hmac
import html
import ipaddress
import itertools
import json
import logging
import math
import os
import random
import re
import secrets
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time

try:  # a few locked-down builds ship without OpenSSL
    import ssl
except ImportError:  # pragma: no cover
    ssl = None

__version__ = "1.0.0"
__all__ = ["Router", "Sharer", "Forwarder", "Connector", "list_services", "TlsOptions",
           "router_tls_context", "MindmeldError", "PermanentError", "ProtocolError"]

log = logging.getLogger("mindmeld")


# ###########################################################################
# ### 1. Compatibility shims: every version difference is settled here.
# ###########################################################################

PY37 = sys.version_info >= (3, 7)   # get_running_loop, create_task, BufferedProtocol

if PY37:
    _get_loop = asyncio.get_running_loop
    _all_tasks = asyncio.all_tasks
    _current_task = asyncio.current_task
else:  # 3.6: only the loop-global spellings exist
    _get_loop = asyncio.get_event_loop
    _all_tasks = asyncio.Task.all_tasks
    _current_task = asyncio.Task.current_task


# BufferedProtocol (3.7+) lets links receive straight into their frame buffer;
# on 3.6 Link.data_received() copies into the same buffer instead.
BufferedProtocol = getattr(asyncio, "BufferedProtocol", asyncio.Protocol)

# Before 3.11 a transport starts reading after connection_made() returns, undoing
# a pause_reading() made there; pausing from a call_soon() then holds.
PAUSE_IN_CONNECTION_MADE_HOLDS = sys.version_info >= (3, 11)

# From 3.12 the selector transport keeps a reference to what write() is given
# (earlier ones copy it into a bytearray); TLS transports always keep it.
TRANSPORT_KEEPS_BUFFERS = sys.version_info >= (3, 12)

# ssl features.  `ssl` is None on builds without OpenSSL; then these catch and set nothing.
# A hostname mismatch: a ValueError (not an SSLError, nor an OSError) on 3.6, an alias of
# SSLCertVerificationError from 3.7.
SSL_CERTIFICATE_ERROR = ssl.CertificateError if ssl is not None else ()
# Certificate verification failing has its own exception from 3.7; 3.6 says
# CERTIFICATE_VERIFY_FAILED in an SSLError's reason only.
SSL_VERIFY_ERROR = getattr(ssl, "SSLCertVerificationError", ())
# Refusing renegotiation: 3.7+ with OpenSSL 1.1.0h+; elsewhere nothing to set.
SSL_OP_NO_RENEGOTIATION = getattr(ssl, "OP_NO_RENEGOTIATION", 0)
# SSLContext.minimum_version (3.7+); 3.6 turns old versions off with OP_NO_* flags instead.
SSL_HAS_MINIMUM_VERSION = hasattr(getattr(ssl, "SSLContext", None), "minimum_version")


def _raw_socket(transport):
    """The socket under a plain selector TCP transport, for direct sendmsg(); else None."""
    if type(transport).__name__ != "_SelectorSocketTransport" or not hasattr(socket.socket, "sendmsg"):
        return None
    return getattr(transport, "_sock", None)


def _callback_error_handler():
    """A loop exception handler: an exception that escaped a callback (a Protocol's, a
    timer's, a task nobody awaited) is a bug, so it is said in one line at every log
    level, with the traceback under -v.  Once per distinct error: a bug on the data path
    would otherwise repeat for every connection that meets it."""
    reported = set()

    def handle(loop, context):
        exc = context.get("exception")
        where = str(context.get("message") or "in a callback")
        where = where.replace("Fatal error: ", "").rstrip(".")
        if isinstance(exc, OSError):
            # A socket error, not a bug (3.6 hands some here; 3.7+ drop them all).
            log.debug("%s: %s", where, _os_error_text(exc))
            return
        what = "%s: %s (%s)" % (type(exc).__name__, exc, where) if exc is not None else where
        key = (type(exc), str(exc), where)
        if key in reported:
            log.debug("internal error again: %s", what)
            return
        reported.add(key)
        log.error("internal error: %s; run with -v for a traceback", what,
                  exc_info=exc if log.isEnabledFor(logging.DEBUG) else None)
    return handle


def _run(main_coro):
    """asyncio.run() for 3.6 too: a fresh loop, leftover tasks cancelled, and errors
    that escape callbacks reported (see _callback_error_handler)."""
    loop = asyncio.new_event_loop()
    loop.set_exception_handler(_callback_error_handler())
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(main_coro)
    finally:
        try:
            leftovers = [t for t in _all_tasks(loop) if not t.done()]
            for task in leftovers:
                task.cancel()
            if leftovers:
                loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()


def _spawn(coro, owner):
    """Start a task that belongs to `owner` (a set): it leaves the set when done.

    No task runs without an owner; owners cancel what is left when they close."""
    task = _get_loop().create_task(coro)
    owner.add(task)
    task.add_done_callback(owner.discard)
    return task


async def _cancel_all(tasks):
    """Cancel tasks and wait for them, never raising their errors."""
    tasks = [t for t in tasks if not t.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks)


async def _close_server(server):
    """Stop listening.  Server.wait_closed() waits for every client from 3.12.1 on,
    so it is bounded here; our own sessions are closed by their owners."""
    server.close()
    try:
        await asyncio.wait_for(server.wait_closed(), SERVER_CLOSE_WAIT)
    except asyncio.TimeoutError:
        pass


def _dual_stack_socket(port):
    """A listening socket on [::] that takes IPv4 too, where the OS allows it (set
    explicitly: the default differs between systems); None where IPv6 is missing."""
    if not socket.has_ipv6:
        return None
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        if os.name != "nt":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        except (OSError, AttributeError):
            pass                        # IPv6 only, then
        sock.bind(("::", port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
        return sock
    except OSError:
        sock.close()
        raise


async def _create_server(factory, host, port, **options):
    """loop.create_server, with '::' meaning dual-stack and '' meaning every interface."""
    loop = _get_loop()
    if host == "::":
        sock = _dual_stack_socket(port)
        if sock is not None:
            return await loop.create_server(factory, sock=sock, **options)
    return await loop.create_server(factory, host or None, port, reuse_address=True,
                                    backlog=LISTEN_BACKLOG, **options)


def _set_nodelay(transport):
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # pragma: no cover - some platforms refuse on odd sockets
            pass


# TCP_NOTSENT_LOWAT keeps what a socket has not yet sent small, so that a queue forms in
# userspace, where streams take turns, rather than in the kernel, first come first served.
# The socket module names it only on some versions (3.6 does not): the values are Linux's
# and macOS's.
TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT",
                            {"linux": 25, "darwin": 0x201}.get(sys.platform))


def _set_notsent_lowat(transport, limit):
    """Where the platform has it, at most `limit` unsent bytes in the socket's buffer."""
    sock = transport.get_extra_info("socket")
    if TCP_NOTSENT_LOWAT is None or sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, limit)
    except OSError:  # pragma: no cover - an older kernel
        pass


def _abort(transport):
    """transport.abort(), and nothing for a transport that is already gone.  One closed
    with data still buffered calls connection_lost once that data is written without
    counting itself lost, and an abort() after that fails inside asyncio with
    "'NoneType' object has no attribute 'call_soon'" (every CPython, 3.6 to 3.13)."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.fileno() == -1:
        return
    transport.abort()


def _abort_with_reset(transport):
    """Close so that the peer sees a TCP reset, as a RESET frame asks for."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.fileno() != -1:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:  # pragma: no cover
            pass
    _abort(transport)


def _add_signal_handlers(loop, callback):
    """SIGINT/SIGTERM call `callback(signum)`; Windows has no add_signal_handler."""
    for signum in (signal.SIGINT, getattr(signal, "SIGTERM", None)):
        if signum is None:
            continue
        try:
            loop.add_signal_handler(signum, callback, signum)
        except (NotImplementedError, RuntimeError, ValueError):
            signal.signal(signum, lambda s, _frame: loop.call_soon_threadsafe(callback, s))


def _take_stdio():
    """Own stdin/stdout as private descriptors, leaving /dev/null in their place, so that
    closing ours is an EOF the reader sees, and nothing else writes into the stream."""
    read_fd, write_fd = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)
    return read_fd, write_fd


def _os_error_text(exc):
    """'Connection refused' rather than "[Errno 111] Connect call failed ('1.2.3.4', 5)"."""
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno).lower()
    return str(exc) or type(exc).__name__


# ###########################################################################
# ### 2. Constants and errors
# ###########################################################################

DEFAULT_PORT = 7700
DEFAULT_ROUTER = "localhost:%d" % DEFAULT_PORT
MAGIC = b"MINDMELD"                 # the client's first bytes, then one version byte
PROTOCOL_VERSION = 1
PREAMBLE = MAGIC + bytes([PROTOCOL_VERSION])
AGENT = "mindmeld/" + __version__   # what the router says it is (to strangers only "mindmeld")

# Frame header: payload length, type, flags, stream (or request) id; network order.
HEADER = struct.Struct("!IBBI")
HEADER_SIZE = HEADER.size           # 10 bytes
WINDOW_INCREMENT = struct.Struct("!I")

MAX_DATA = 256 * 1024               # largest DATA payload: one socket read
MAX_CONTROL = 16 * 1024             # largest JSON control payload
MAX_LIST_REPLY = 1024 * 1024        # a LIST_REPLY may describe many services
NAME_MAX = 64
REASON_MAX = 200

INITIAL_WINDOW = 256 * 1024         # credit each side grants a new stream, per direction
MAX_WINDOW = 16 * 1024 * 1024       # auto-tuning stops here
PEER_WINDOW_BUDGET = 32 * 1024 * 1024   # growth beyond INITIAL_WINDOW, all streams of a link
MAX_CREDIT = 2 * MAX_WINDOW         # a sender's credit beyond this is the granter's error
LINK_HIGH_WATER = 512 * 1024        # link write buffer: pause local reads above this
LINK_LOW_WATER = 128 * 1024
LONG_LINK_RTT = 0.02                # seconds: a link this long gets the smaller write buffer
LONG_LINK_WATER = (32 * 1024, 8 * 1024)     # ... these limits: the pipe is full without it (the
                                    # rest waits in local sockets, or per stream in the router)
LONG_LINK_NOTSENT_LOWAT = 16 * 1024  # ... and its kernel holds this much unsent (first come,
                                    # first served: 1.3 ms at 100 Mbit/s) while streams share it;
                                    # LINK_NOTSENT_LOWAT while one has it to itself (TCP under loss
                                    # keeps its window open only with data waiting)
LINK_NOTSENT_LOWAT = 128 * 1024     # a client's link socket: unsent bytes the kernel holds; the rest
                                    # waits in the local sockets, where streams take turns
SCHEDULER_QUANTUM = 16 * 1024       # bytes of DATA a stream sends per turn while others wait
PEER_BUFFER_SLACK = 4 * 1024 * 1024    # router: queued beyond a peer's windows, for control frames
PEER_INITIAL_BUDGET = 24 * 1024 * 1024  # router: full initial windows toward one peer, in all ...
MIN_STREAM_WINDOW = 512             # ... beyond it a new stream starts with this window (it grows)
# So the router holds for one peer at most 24 MiB + 16,384 x 512 B + 32 MiB of growth = 64 MiB of
# stream data (PEER_MEMORY_BUDGET), plus PEER_BUFFER_SLACK of control frames.
PEER_MEMORY_BUDGET = PEER_INITIAL_BUDGET + 16384 * MIN_STREAM_WINDOW + PEER_WINDOW_BUDGET
# And for all peers together: first windows up to GLOBAL_INITIAL_BUDGET (past it new streams are
# refused with code busy), and growth shared out in HELLO (or AUTH) as each peer's window_budget.
GLOBAL_INITIAL_BUDGET = 512 * 1024 * 1024
GLOBAL_GROWTH_BUDGET = 512 * 1024 * 1024
ROUTER_MEMORY_BUDGET = GLOBAL_INITIAL_BUDGET + GLOBAL_GROWTH_BUDGET
OPEN_DATA_MAX = 8 * 1024            # bytes: a stream's first bytes may ride in its OPEN ...
OPEN_DATA_WAIT = 0.005              # s: ... so a forwarder waits this long for them (a server that
                                    # speaks first, as sshd does, pays it once per connection)
NOT_READING_TIMEOUT = 20.0          # s: a peer with data queued that reads none of it is dropped
NOT_READING_CHECK = 1.0             # s between the router's checks for such peers (one timer)

HANDSHAKE_TIMEOUT = 15.0            # preamble + hello (+ auth) must complete in this time
DIAL_TIMEOUT = 10.0                 # sharer dialling its target
OPEN_TIMEOUT = 30.0                 # a stream that is not accepted in time is dropped
PENDING_TIMEOUT = 30.0              # forwarder: how long a local connection waits for the router
KEEPALIVE_INTERVAL = 20.0           # ping after this much silence; dead after 3 silent intervals
KEEPALIVE_MISSES = 3
GRACE_PERIOD = 5.0                  # shutdown: how long open streams may finish
BACKOFF_FIRST, BACKOFF_MAX = 0.5, 30.0
BACKOFF_RESET_AFTER = 60.0          # a link that stayed up this long resets the backoff
LIVENESS_PROBE = 3.0                # router: how long a name's owner has to answer a ping
OWNER_CHAIN_LENGTH = 10000          # sharer: reconnects one owner chain lasts, then a new one
OWNER_CHAIN_SKIP = 64               # router: chain links a reconnect may skip (REGISTERs lost
                                    # with their link before the router read them)

# End to end (--secret, sections 3f and 4e).
E2E_EXPONENT_BITS = 256             # SPAKE2 exponents: 2s bits for a safe-prime group of strength s
                                    # (s = 112 for 2048 bits; NIST SP 800-56A rev. 3, 5.6.1.1.4)
E2E_PAIR_ID_DIGITS = 32             # hex digits of a pairing's id (16 random bytes)
E2E_PAIRS_OFFERED = 4               # forwarder: confirmed pairings it keeps and offers in an OPEN
E2E_SHARER_PAIRS_MAX = 1024         # sharer: confirmed pairings kept per service (least recent go)
E2E_FAILURES_PER_MINUTE = 10        # sharer: failed attempts at a secret before new pairings wait
E2E_PROOF_BYTES = 32                # each side's first plaintext: an HMAC-SHA256 of tls-unique
E2E_READ_CHUNK = 256 * 1024         # bytes decrypted at a time

# Internal timings, in seconds (as all times here).
CLOSE_FLUSH_TIMEOUT = 2.0           # a closed link whose peer stops reading is aborted after this
LINK_CLOSE_WAIT = 1.0               # a client's close waits this long for its link to go, then aborts
SERVER_CLOSE_WAIT = 0.5             # bounds Server.wait_closed(): from 3.12.1 it waits for every client
SERVICE_RETRY_INTERVAL = 0.25       # a forwarder asks again this often for a name not registered yet
RTT_INITIAL = 0.001                 # a link's round-trip estimate until it has measured one
RTT_MIN = 0.0001                    # a measured round trip is at least this (loopback can read 0)
RTT_MAX = 60.0                      # a PONG claiming a longer round trip is nonsense, ignored
WINDOW_GROWTH_FLOOR = 0.002         # windows grow when updated within max(4 RTT, this): loopback
                                    # RTTs are microseconds, shorter than one busy loop turn
WINDOW_RATE_MEMORY = 0.75           # the best delivery rate seen is kept, times this per update:
                                    # one slow update (a retransmission) does not stop growth
WARM_START_MEMORY = 60.0            # s: a long link remembers how far its streams' windows grew,
WARM_START_SHARE = 4                # and a new stream starts there, with at most 1/4 of the budget
                                    # left (on a short link windows grow in milliseconds anyway)

HTTP_HEAD_MAX = 16 * 1024           # bytes: the most of an HTTP head read (a request to the router,
                                    # the answer to an upgrade or a CONNECT); longer is not our HTTP

LISTEN_BACKLOG = 1024               # pending connections a listening socket holds (bursts of streams)
MAX_STREAMS_PER_PEER = 16384
MAX_STREAM_ID = 2 ** 32 - 3
MAX_SERVICES_PER_PEER = 64
MAX_PENDING_HANDSHAKES = 4096       # unfinished handshakes in all; past it, the source (IPv4 address
                                    # or IPv6 /64) with the most loses its oldest.  A restart storm
                                    # from one place is served at the rate the router can, not refused
HANDSHAKE_FD_SHARE = 0.25           # ... and never more than this share of RLIMIT_NOFILE (256 of
                                    # 1,024), so a flood is evicted before accept() runs out of them
STRANGER_LOG_BURST = 10            # warnings a minute about one source's failed handshakes; the rest
STRANGER_LOG_WINDOW = 60.0          # ... are counted and said in one line when the minute is over
STRANGER_LOG_SOURCES = 1024         # sources counted apart; past it, the others share one count
ROUTER_READ_BUFFER = 512           # bytes: a new peer's first buffer (it grows as reads fill it)
MAX_STREAMS_PER_SERVICE = 4096      # sharer: streams of one service at once (each dials a socket)
MAX_STREAMS_PER_OPENER = 1024       # sharer: ... opened through one forwarder link (at most half the above)
SHARER_FD_SHARE = 0.5               # sharer: all its streams hold at most this share of RLIMIT_NOFILE
REFUSAL_LOG_INTERVAL = 10.0         # s: after one line, like refusals are logged as a count this often
LIST_PAGE_MAX = 1000                # services per LIST_REPLY: under 256 KiB, well within MAX_LIST_REPLY
LIST_PAGES_MAX = 10000              # `list` gives up on a router that keeps saying "more" past this
LIST_SERVICES_MAX = 100000          # ... or that lists more services than this (memory it would hold)

# Frame types.  Stream frames are relayed end to end by the router.  CHALLENGE and PROOF
# (17, 18) are retired: secrets are proved inside the stream now (section 4e).
HELLO, AUTH, REGISTER, REGISTERED, OPEN, OPEN_OK, OPEN_REFUSED, DATA, WINDOW, \
    EOF, RESET, PING, PONG, GOAWAY, LIST, LIST_REPLY, CHALLENGE, PROOF = range(1, 19)
FRAME_NAMES = {
    HELLO: "HELLO", AUTH: "AUTH", REGISTER: "REGISTER", REGISTERED: "REGISTERED",
    OPEN: "OPEN", OPEN_OK: "OPEN_OK", OPEN_REFUSED: "OPEN_REFUSED", DATA: "DATA",
    WINDOW: "WINDOW", EOF: "EOF", RESET: "RESET", PING: "PING", PONG: "PONG",
    GOAWAY: "GOAWAY", LIST: "LIST", LIST_REPLY: "LIST_REPLY",
    CHALLENGE: "CHALLENGE", PROOF: "PROOF",
}
FRAME_LIMITS = {t: MAX_CONTROL for t in FRAME_NAMES}
FRAME_LIMITS.update({DATA: MAX_DATA, LIST_REPLY: MAX_LIST_REPLY, WINDOW: 4, EOF: 0,
                     PING: 8, PONG: 8})


class MindmeldError(Exception):
    """A failure a user can cause or meet; str() is the one line to show them."""


class PermanentError(MindmeldError):
    """A refusal that retrying cannot fix: a client prints it and exits 1."""


class ProtocolError(MindmeldError):
    """The remote peer broke the protocol; `code` goes into the GOAWAY we send back."""

    def __init__(self, message, code="protocol"):
        MindmeldError.__init__(self, message)
        self.code = code


class UsageError(MindmeldError):
    """The command line is wrong: usage and exit 2, like argparse's own errors."""


class StreamError(MindmeldError):
    """The far end of one stream broke the rules (a malformed nonce or proof): that stream
    is reset, and the link and its other streams carry on."""


class LocalProtocolError(MindmeldError):
    """We misused the protocol (h11's LocalProtocolError): a bug in this file, never the peer's."""


class LinkLost(MindmeldError):
    """The link to the router went away; clients retry."""


# ###########################################################################
# ### 3. Sans-IO core: frames, preamble, WebSocket framing, stream ends, handshake. No I/O.
# ###########################################################################

# ### 3a. Frames: the codec

def encode_frame(ftype, stream_id=0, payload=b""):
    """A whole frame as bytes (control frames; DATA goes out as header + payload)."""
    return HEADER.pack(len(payload), ftype, 0, stream_id) + payload


def encode_json(ftype, stream_id, obj):
    return encode_frame(ftype, stream_id, json.dumps(obj, separators=(",", ":")).encode())


def decode_far_json(ftype, payload):
    """decode_json() for what the far end of a stream wrote and the router only relayed."""
    try:
        return decode_json(ftype, payload)
    except ProtocolError as exc:
        raise StreamError(str(exc))


def decode_json(ftype, payload):
    """A control payload as a dict; anything else is the peer's protocol error."""
    try:
        obj = json.loads(bytes(payload).decode("utf-8"))
    except ValueError:
        raise ProtocolError("%s frame carries malformed JSON" % FRAME_NAMES[ftype])
    if not isinstance(obj, dict):
        raise ProtocolError("%s frame payload is not an object" % FRAME_NAMES[ftype])
    return obj


class FrameBuffer:
    """A link's receive buffer and frame parser: bytes in, frames out, no I/O.

        view = buf.writable()      # recv_into(view) -> n
        buf.advance(n)
        for ftype, flags, stream_id, payload in buf.frames(): ...

    Payloads are memoryviews into the buffer, valid until the next writable():
    use them at once or copy.  Sizes are checked against FRAME_LIMITS before
    anything is buffered, so a hostile length never allocates.  The buffer
    starts small and doubles (up to `maximum`) while reads keep filling it."""

    def __init__(self, limits=FRAME_LIMITS, initial=64 * 1024, maximum=1024 * 1024):
        self.limits = limits
        self.data = bytearray(initial)
        self.view = memoryview(self.data)
        self.start = self.end = 0       # unparsed bytes are data[start:end]
        self.need = HEADER_SIZE         # bytes from `start` that the next frame needs
        self.maximum = maximum
        self._offered = 0
        self._busy = False

    @property
    def buffered(self):
        return self.end - self.start

    def writable(self):
        """Free space for the next read, making room first when the next frame needs it."""
        start, end = self.start, self.end
        if start == end:
            self.start = self.end = start = end = 0
        if len(self.data) - start < self.need or end == len(self.data):
            self._make_room(start, end)
        view = self.view[self.end:]
        self._offered = len(view)
        return view

    def _make_room(self, start, end):
        held, size = end - start, len(self.data)
        if self.need > size:
            size = self.need
        elif self._busy and size < self.maximum:
            size = min(size * 2, self.maximum)
        self._busy = False
        if size != len(self.data):
            data = bytearray(size)
            data[:held] = self.view[start:end]
            self.data, self.view = data, memoryview(data)
        else:
            self.view[:held] = self.view[start:end]     # memmove
        self.start, self.end = 0, held

    def advance(self, n):
        self.end += n
        if n == self._offered:
            self._busy = True

    def skip(self, n):
        self.start += n

    def peek(self):
        return bytes(self.view[self.start:self.end])

    def frames(self):
        data, view, limits = self.data, self.view, self.limits
        pos, end = self.start, self.end
        unpack_from = HEADER.unpack_from
        out = []
        while end - pos >= HEADER_SIZE:
            length, ftype, flags, stream_id = unpack_from(data, pos)
            limit = limits.get(ftype)
            if limit is None:
                raise ProtocolError("unknown frame type %d" % ftype)
            if length > limit:
                raise ProtocolError("%s frame of %d bytes exceeds the limit of %d"
                                    % (FRAME_NAMES[ftype], length, limit), "frame-size")
            stop = pos + HEADER_SIZE + length
            if stop > end:
                self.need = stop - pos
                break
            out.append((ftype, flags, stream_id, view[pos + HEADER_SIZE:stop]))
            pos = stop
        else:
            self.need = HEADER_SIZE
        self.start = pos
        return out


class FrameDecoder:
    """FrameBuffer for callers that feed bytes (tests, tools): payloads come back as bytes."""

    def __init__(self, limits=FRAME_LIMITS):
        self._buffer = FrameBuffer(limits)

    @property
    def buffered(self):
        return self._buffer.buffered

    def feed(self, data):
        out, view = [], memoryview(data)
        while True:
            space = self._buffer.writable()
            n = min(len(space), len(view))
            space[:n] = view[:n]
            view = view[n:]
            self._buffer.advance(n)
            out.extend((t, f, i, bytes(p)) for t, f, i, p in self._buffer.frames())
            if not view:
                return out


# ### 3b. The preamble, HTTP heads, names and peer text

class PreambleError(MindmeldError):
    """What a non-mindmeld client sent, as a short description for the log."""


HTTP_METHODS = (b"GET ", b"HEAD ", b"POST ", b"PUT ", b"OPTIONS ", b"DELETE ", b"CONNECT ", b"PATCH ")


def classify_preamble(first):
    """Classify a connection's first bytes: 'mindmeld', 'http', or None (need more).

    Raises PreambleError for TLS, a wrong version or anything else."""
    if first[:1] == b"\x16":
        raise PreambleError("a TLS handshake (is the client using --tls against a plain router?)")
    head = first[:8]
    if any(head.startswith(m) for m in HTTP_METHODS):
        return "http"
    if len(first) < len(PREAMBLE):
        if MAGIC.startswith(first[:len(MAGIC)]) or any(m.startswith(head) for m in HTTP_METHODS):
            return None
        raise PreambleError("bytes that are not a mindmeld client: %r" % bytes(first[:16]))
    if first[:len(MAGIC)] != MAGIC:
        raise PreambleError("bytes that are not a mindmeld client: %r" % bytes(first[:16]))
    version = first[len(MAGIC)]
    if version != PROTOCOL_VERSION:
        failure = PreambleError("protocol version %d (this router speaks %d)"
                                % (version, PROTOCOL_VERSION))
        failure.version = version
        raise failure
    return "mindmeld"


def parse_http_head(head):
    """b"GET /x HTTP/1.1\r\nA: b\r\n\r\n" -> ("GET /x HTTP/1.1", {"a": "b"})."""
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if colon:
            headers[name.strip().lower()] = value.strip()
    return lines[0], headers


NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")


def valid_name(name):
    return isinstance(name, str) and 0 < len(name) <= NAME_MAX and NAME_CHARS.issuperset(name)


def check_name(name):
    if not valid_name(name):
        raise MindmeldError("invalid service name %r: use 1 to %d letters, digits, '.', '_' or '-'"
                            % (name, NAME_MAX))
    return name


# What a terminal or a page would act on, or hide: C0/C1 controls, zero-width and bidi marks.
_UNPRINTABLE = re.compile("[\\x00-\\x1f\\x7f-\\x9f\\u200b-\\u200f\\u2028-\\u202e\\u2066-\\u2069\\ufeff]")


def printable(text):
    """Text a peer chose, safe to print: control characters shown as \\xNN or \\uNNNN."""
    return _UNPRINTABLE.sub(lambda m: ("\\x%02x" if ord(m.group()) < 256 else "\\u%04x")
                            % ord(m.group()), str(text))


def short_reason(text):
    """A peer's reason or message, one printable line of at most REASON_MAX characters."""
    text = printable(str(text).replace("\n", " "))
    return text if len(text) <= REASON_MAX else text[:REASON_MAX - 3] + "..."


# ### 3c. WebSocket framing (RFC 6455)

# WebSocket (RFC 6455) framing, for routers behind HTTP-only front ends.  The
# mindmeld byte stream rides in binary messages; message boundaries mean nothing.
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
WS_PATH = "/mindmeld"
WS_CONTINUATION, WS_TEXT, WS_BINARY, WS_CLOSE, WS_PING, WS_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
WS_MAX_FRAME = 2 * 1024 * 1024      # bytes in one WebSocket frame, once a peer is authenticated
WS_MAX_FRAME_BEFORE_AUTH = 16 * 1024    # ... before: HELLO and AUTH fit, a stranger's 2 MiB does not
WS_PONG_BACKLOG = 16 * 1024         # bytes queued to a peer above which its pings go unanswered


def ws_accept_key(key):
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + WS_GUID).digest()).decode("ascii")


def ws_mask(data, mask):
    """XOR with the 4-byte mask, as one big-integer operation (fast in C)."""
    n = len(data)
    if not n:
        return b""
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


def ws_encode(opcode, payload=b"", masked=False):
    """One final frame.  Clients mask (RFC 6455 5.3); servers do not."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, (0x80 if masked else 0) | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, (0x80 if masked else 0) | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, (0x80 if masked else 0) | 127, n)
    if masked:
        mask = os.urandom(4)
        return head + mask + ws_mask(bytes(payload), mask)
    return head + bytes(payload)


class WsDecoder:
    """Bytes in, (opcode, payload) out.  Lengths are checked before buffering."""

    def __init__(self, expect_masked, max_frame=WS_MAX_FRAME):
        self.expect_masked = expect_masked
        self.max_frame = max_frame
        self.buffer = bytearray()

    def feed(self, data):
        self.buffer += data
        out, buf = [], self.buffer
        while len(buf) >= 2:
            first, second = buf[0], buf[1]
            opcode, masked, n, pos = first & 0x0F, bool(second & 0x80), second & 0x7F, 2
            if first & 0x70:
                raise ProtocolError("WebSocket frame with reserved bits set")
            if masked != self.expect_masked:
                raise ProtocolError("WebSocket frame masking is wrong for this direction")
            if n == 126:
                if len(buf) < 4:
                    break
                n, pos = struct.unpack_from("!H", buf, 2)[0], 4
            elif n == 127:
                if len(buf) < 10:
                    break
                n, pos = struct.unpack_from("!Q", buf, 2)[0], 10
            if n > self.max_frame:
                raise ProtocolError("WebSocket frame of %d bytes is over the limit of %d"
                                    % (n, self.max_frame), "frame-size")
            if opcode >= 0x8 and (n > 125 or not first & 0x80):
                raise ProtocolError("malformed WebSocket control frame")
            mask_at, pos = pos, pos + (4 if masked else 0)
            if len(buf) < pos + n:
                break
            payload = bytes(buf[pos:pos + n])
            if masked:
                payload = ws_mask(payload, bytes(buf[mask_at:mask_at + 4]))
            out.append((opcode, payload))
            del buf[:pos + n]
        return out


# ### 3d. One end of a stream (h2's H2Stream): state, credit and window

# One row per state: the frames this end may send or receive there, and the
# state each leads to.  The opener starts in OPEN_SENT, the acceptor (and the
# router's leg toward the opener) in OPEN_RECEIVED.  Anything not in the table
# is the peer's protocol error (received) or our own bug (sent).
OPEN_SENT, OPEN_RECEIVED, OPEN_STATE, LOCAL_EOF, REMOTE_EOF, CLOSED = (
    "open-sent", "open-received", "open", "local-eof", "remote-eof", "closed")
SEND, RECV = "send", "recv"
_RESETS = {(SEND, RESET): CLOSED, (RECV, RESET): CLOSED}
STREAM_TRANSITIONS = {
    OPEN_SENT: {
        **_RESETS, (RECV, OPEN_OK): OPEN_STATE, (RECV, OPEN_REFUSED): CLOSED},
    OPEN_RECEIVED: {
        **_RESETS, (SEND, OPEN_OK): OPEN_STATE, (SEND, OPEN_REFUSED): CLOSED},
    OPEN_STATE: {
        **_RESETS, (SEND, DATA): OPEN_STATE, (RECV, DATA): OPEN_STATE,
        (SEND, WINDOW): OPEN_STATE, (RECV, WINDOW): OPEN_STATE,
        (SEND, EOF): LOCAL_EOF, (RECV, EOF): REMOTE_EOF},
    LOCAL_EOF: {                    # we sent EOF: we still receive, and grant credit
        **_RESETS, (RECV, DATA): LOCAL_EOF, (SEND, WINDOW): LOCAL_EOF, (RECV, WINDOW): LOCAL_EOF,
        (RECV, EOF): CLOSED},
    REMOTE_EOF: {                   # the peer sent EOF: we still send
        **_RESETS, (SEND, DATA): REMOTE_EOF, (SEND, WINDOW): REMOTE_EOF, (RECV, WINDOW): REMOTE_EOF,
        (SEND, EOF): CLOSED},
    CLOSED: {},
}
OPENING_STATES = frozenset((OPEN_SENT, OPEN_RECEIVED))
# The data path asks these instead of the table; they are read off the table.
CAN_SEND_DATA = frozenset(s for s, row in STREAM_TRANSITIONS.items() if (SEND, DATA) in row)
CAN_RECV_DATA = frozenset(s for s, row in STREAM_TRANSITIONS.items() if (RECV, DATA) in row)


class WindowBudget:
    """How much window growth one link may still hand out, over all its streams, and how
    far their windows grew lately (`warm_size`).  A new stream starts there (warm_growth):
    the bandwidth-delay product belongs to the link, not to one stream, and a stream that
    starts small leaves the link idle between bursts.  Under loss that idle time makes
    TCP (BBR) measure a low rate and send at it for seconds.  Warm starts not yet used
    (`idle_warm`: their streams have not moved half a window) hold at most a quarter of
    the budget, so streams opened and left idle, a stranger's say, cannot take it all."""
    __slots__ = ("available", "total", "warm_size", "warm_at", "idle_warm")

    def __init__(self, total=PEER_WINDOW_BUDGET):
        self.available = self.total = total
        self.warm_size = 0
        self.warm_at = -WARM_START_MEMORY
        self.idle_warm = 0

    def remember(self, size, now):
        """A grown window of `size` is in use."""
        if size >= self.warm_size or now - self.warm_at > WARM_START_MEMORY:
            self.warm_size, self.warm_at = size, now

    def warm_growth(self, size, now):
        """Growth for a new stream's window of `size`, taken from the budget: up to the size
        remembered, at most 1/WARM_START_SHARE of what is left, and while the warm starts
        not yet used stay within 1/WARM_START_SHARE of the whole."""
        if now - self.warm_at > WARM_START_MEMORY:
            return 0
        growth = min(self.warm_size - size, self.available // WARM_START_SHARE,
                     self.total // WARM_START_SHARE - self.idle_warm)
        if growth <= 0:
            return 0
        self.available -= growth
        self.idle_warm += growth
        return growth

    def warm_used(self, growth):
        """A warm start's stream moved half a window, or ended: it is idle no more."""
        self.idle_warm -= growth

    def take(self, amount):
        if amount > self.available:
            return False
        self.available -= amount
        return True

    def give(self, amount):
        self.available += amount


class ReceiveWindow:
    """Receiver-side credit for one stream direction (h2's WindowManager, auto-tuned).

    `size` is what the sender may have in flight.  Credit goes back only for
    bytes the application really took (`delivered`), in batches of half a
    window.  The window grows (up to MAX_WINDOW, within the link's budget) when
    the window is what limits the sender:

    - rate: half a window at the best recent delivery rate takes at most 4 round
      trips.  So it grows toward a few times the bandwidth-delay product it
      measures and stops there.  The best rate decays slowly, so one slow batch
      (a retransmission) does not stop growth.
    - starving: the sender stopped exactly at a limit we had granted, with
      everything before it handed on, and sent nothing for a quarter round trip.
      Under loss, credit takes many round trips to come back, and this is the
      sign that the window is what holds the sender back.

    A reader that does not keep up never grows it: its credit goes back late.  A new
    stream on a link whose windows grew lately starts at their size (warm_start)."""
    __slots__ = ("size", "initial", "available", "unreturned", "last_update", "budget",
                 "best_rate", "taken", "returned", "limits", "last_arrival", "starved", "warm")

    def __init__(self, budget=None, size=INITIAL_WINDOW, grown=0):
        self.size = size
        self.initial = size - grown     # growth beyond it came from `budget`
        self.warm = grown               # a warm start not used yet (WindowBudget.idle_warm)
        self.available = size      # what the sender may still send
        self.unreturned = 0        # delivered but not yet credited back
        self.last_update = 0.0
        self.budget = budget
        self.best_rate = 0.0       # bytes/s: the best batch lately, decaying
        self.taken = 0             # bytes received in all
        self.returned = 0          # bytes delivered and credited back, in all
        self.limits = (size,)      # the last limits (taken + available) we granted
        self.last_arrival = 0.0
        self.starved = False       # the sender waited on credit since the last batch

    def received(self, n, now=None, rtt=0.0):
        if n > self.available:
            raise ProtocolError("peer sent %d bytes with only %d bytes of window left"
                                % (n, self.available), "flow-control")
        self.available -= n
        if now is not None:
            if self.taken in self.limits and now - self.last_arrival >= rtt / 4 \
                    and self.taken == self.returned + self.unreturned:
                self.starved = True
            self.last_arrival = now
        self.taken += n

    def delivered(self, n, now, rtt):
        """n more bytes were handed on; returns the credit to send back (0: none yet)."""
        self.unreturned += n
        if self.unreturned < self.size // 2:
            return 0
        self.warm_is_used()
        increment = self.unreturned
        self.returned += increment
        if self.budget is not None:
            size = self.wanted_size(now, rtt)
            while size > self.size and not self.budget.take(size - self.size):
                size //= 2                  # what the link's budget still allows
            if size > self.size:
                increment += size - self.size
                self.size = size
            if self.size > self.initial:
                self.budget.remember(self.size, now)
        self.last_update = now
        self.unreturned = 0
        self.available += increment
        self.limits = self.limits[-3:] + (self.taken + self.available,)
        return increment

    def warm_start(self, now):
        """Before any data: grow to the size the link's windows reached lately (within the
        budget).  Returns the growth, to be granted (0: none)."""
        if self.budget is None or self.taken:
            return 0
        growth = self.budget.warm_growth(self.size, now)
        if growth:
            self.size += growth
            self.available += growth
            self.warm += growth
            self.last_update = now
            self.limits = (self.taken + self.available,)
        return growth

    def warm_is_used(self):
        if self.warm:
            self.budget.warm_used(self.warm)
            self.warm = 0

    def wanted_size(self, now, rtt):
        """Half a window was just delivered: the size it should have now, up to 8 times
        this one (and MAX_WINDOW)."""
        rate = self.unreturned / max(now - self.last_update, 1e-9)
        self.best_rate = max(rate, self.best_rate * WINDOW_RATE_MEMORY)
        reach = self.best_rate * max(4 * rtt, WINDOW_GROWTH_FLOOR)   # bytes per 4 round trips
        starved, self.starved = self.starved, False
        size = self.size * 2 if starved else self.size
        for _ in range(2 if starved else 3):           # 8 times at most, either way
            if size >= MAX_WINDOW or reach <= size // 2:
                break
            size *= 2
        return min(size, MAX_WINDOW)

    def release(self):
        """The stream is gone: give its growth back to the link's budget."""
        self.warm_is_used()
        if self.budget is not None and self.size > self.initial:
            self.budget.give(self.size - self.initial)
            self.size = self.initial


def add_credit(credit, increment):
    """Sender-side credit after a WINDOW frame; absurd totals are a protocol error."""
    credit += increment
    if increment == 0 or credit > MAX_CREDIT:
        raise ProtocolError("invalid window increment %d" % increment, "flow-control")
    return credit


class StreamEnd:
    """One end of one stream, as one side of a link sees it: no I/O.

    `receive(type)` and the recv_* methods take what the peer sent and raise
    ProtocolError when it broke the rules; `send(type)` and the send_* methods
    account for a frame and return its bytes (DATA excepted: the link writes its
    header and payload itself).  `credit` is what this end may still send,
    `window` what the other end may still send here."""
    __slots__ = ("id", "state", "credit", "window")

    def __init__(self, stream_id, state, window=None, credit=INITIAL_WINDOW):
        self.id = stream_id
        self.state = state
        self.credit = credit
        self.window = window if window is not None else ReceiveWindow()

    def start_with(self, credit, window_size, grown=0):
        """The initial credit and window the router chose (OPEN, OPEN_OK); before any data.
        `grown` of the window is the warm start this end asked for in its OPEN; what the
        router did not take goes back to the budget."""
        old = self.window
        asked = old.size - old.initial
        if grown > asked:
            raise ProtocolError("a grow of %d in an opening frame, but this end asked for %d"
                                % (grown, asked), "flow-control")
        if old.budget is not None:
            old.budget.give(asked - grown)
            old.budget.warm_used(asked - grown)
        self.credit = credit
        self.window = ReceiveWindow(old.budget, window_size, grown)

    def __repr__(self):
        return "<StreamEnd %d %s credit=%d window=%d>" % (
            self.id, self.state, self.credit, self.window.available)

    def allows(self, direction, ftype):
        return (direction, ftype) in STREAM_TRANSITIONS[self.state]

    def _fire(self, direction, ftype):
        new = STREAM_TRANSITIONS[self.state].get((direction, ftype))
        if new is None:
            what = "%s on stream %d in state %s" % (FRAME_NAMES[ftype], self.id, self.state)
            if direction == RECV:
                raise ProtocolError(what)
            raise LocalProtocolError("bug: sending " + what)
        self.state = new
        return new

    # -- what the peer sent -------------------------------------------------------
    def receive(self, ftype):
        """A control frame arrived (OPEN_OK, OPEN_REFUSED, EOF); the new state."""
        return self._fire(RECV, ftype)

    def recv_data(self, n, now=None, rtt=0.0):
        if self.state not in CAN_RECV_DATA:
            raise ProtocolError("DATA on stream %d in state %s" % (self.id, self.state))
        self.window.received(n, now, rtt)

    def recv_window(self, payload):
        """A WINDOW frame: the credit it adds (checked: 4 bytes, non-zero, no overflow)."""
        if len(payload) != WINDOW_INCREMENT.size:
            raise ProtocolError("WINDOW frame of %d bytes (must be 4)" % len(payload))
        self._fire(RECV, WINDOW)
        increment = WINDOW_INCREMENT.unpack(payload)[0]
        self.credit = add_credit(self.credit, increment)
        return increment

    def recv_reset(self, payload):
        """A RESET: its reason, as text."""
        self._fire(RECV, RESET)
        return short_reason(decode_json(RESET, payload).get("reason", "reset") if payload else "reset")

    # -- what this end sends ------------------------------------------------------
    def send(self, ftype, payload=b""):
        self._fire(SEND, ftype)
        return encode_frame(ftype, self.id, payload)

    def send_json(self, ftype, obj):
        return self.send(ftype, json.dumps(obj, separators=(",", ":")).encode())

    def send_data(self, n):
        if self.state not in CAN_SEND_DATA or n > self.credit:
            raise LocalProtocolError("bug: %d bytes of DATA on %r" % (n, self))
        self.credit -= n

    def send_reset(self, reason):
        """RESET with a reason, or b"" if this end has already closed."""
        if self.state == CLOSED:
            return b""
        return self.send_json(RESET, {"reason": short_reason(reason)})

    def delivered(self, n, now, rtt):
        """n received bytes were handed on: a WINDOW frame returning credit, or b""."""
        increment = self.window.delivered(n, now, rtt)
        if not increment or not self.allows(SEND, WINDOW):
            return b""
        self._fire(SEND, WINDOW)
        return encode_frame(WINDOW, self.id, WINDOW_INCREMENT.pack(increment))

    def grant(self, increment):
        """A relay passes on credit the far end granted: a WINDOW frame, or b"" once closed."""
        if not self.allows(SEND, WINDOW):
            return b""
        self.window.available += increment
        return self.send(WINDOW, WINDOW_INCREMENT.pack(increment))

    def release(self):
        """The stream is gone: its window's growth goes back to the link's budget."""
        self.window.release()


def open_data(info):
    """The first bytes an OPEN carries ("data", base64), or b"": they consume no window."""
    text = info.get("data")
    if text is None:
        return b""
    try:
        data = base64.b64decode(text.encode("ascii") if isinstance(text, str) else b"!", validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        data = None
    if data is None or len(data) > OPEN_DATA_MAX:
        raise ProtocolError("OPEN with data that is not base64 of at most %d bytes" % OPEN_DATA_MAX)
    return data


def _window_field(info, field, default, low, high):
    value = info.get(field, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ProtocolError("%s of %r in an opening frame (must be %d to %d)"
                            % (field, value, low, high), "flow-control")
    return value


def initial_windows(info):
    """(credit, window, grow) from an OPEN or OPEN_OK: what this end may send first, what it
    grants the other end, and how much of that is the warm start its OPEN asked for ("grow",
    OPEN_OK only).  Absent: INITIAL_WINDOW each (peers from before the router chose), 0."""
    credit, window = (_window_field(info, field, INITIAL_WINDOW, MIN_STREAM_WINDOW, MAX_WINDOW)
                      for field in ("credit", "window"))
    return credit, window, _window_field(info, "grow", 0, 0, window - MIN_STREAM_WINDOW)


def opening_growth(info, first_window):
    """The warm start an opener's OPEN asks for ("grow"): growth of its window beyond the
    first one the router picks, from its window_budget."""
    return _window_field(info, "grow", 0, 0, MAX_WINDOW - first_window)


class StreamIds:
    """Who opens which stream ids on one link.  The side that connected opens odd
    ids, the router even ones, each in increasing order; an id is never reused."""
    __slots__ = ("next_local", "highest_remote")

    def __init__(self, odd):
        self.next_local = 1 if odd else 2
        self.highest_remote = 0

    @property
    def exhausted(self):
        return self.next_local > MAX_STREAM_ID

    def allocate(self):
        stream_id = self.next_local
        self.next_local += 2
        return stream_id

    def opened_by_peer(self, stream_id):
        """Check the id of an OPEN the peer sent, and remember it."""
        if stream_id % 2 == self.next_local % 2 or stream_id <= self.highest_remote:
            raise ProtocolError("OPEN with stream id %d (must be %s and increasing)"
                                % (stream_id, "even" if self.next_local % 2 else "odd"))
        self.highest_remote = stream_id

    def check_unknown(self, stream_id, ftype):
        """A frame for an id with no live stream: late frames of ended streams are normal;
        a stream that was never opened is a protocol error."""
        if stream_id % 2 == self.next_local % 2:
            opened = 0 < stream_id < self.next_local
        else:
            opened = 0 < stream_id <= self.highest_remote
        if not opened:
            raise ProtocolError("%s for stream %d, which was never opened"
                                % (FRAME_NAMES[ftype], stream_id))


# ### 3e. Handshake phases and proofs; addresses and backoff

# Router-side handshake phases: which frames a peer may send in each (others are errors).
PEER_PHASES = {
    "hello": (HELLO,),
    "auth": (AUTH, PING),
    "ready": (PING, PONG, REGISTER, OPEN, LIST, GOAWAY, DATA, WINDOW, EOF, RESET,
              OPEN_OK, OPEN_REFUSED),
}
def _auth_mac(token, nonce):
    return hmac.new(token.encode(), b"mindmeld-auth:" + nonce, hashlib.sha256).hexdigest()


def _owner_hash(value):
    return hashlib.sha256(value).digest()


class OwnerChain:
    """A sharer's proof that a reconnect is the same process, one per name: a hash chain
    (S/KEY, RFC 1760).  Links are SHA-256 applied 0, 1, 2 ... times to a random seed; each
    REGISTER sends the next link down the chain, and the router gives the name back at once
    to a link that hashes to the last one it accepted.  A link is worth nothing once sent:
    the router has moved past it, so whoever saw a REGISTER cannot replay it."""

    CHECKPOINT = 100                    # one link in this many is kept; the rest recomputed

    def __init__(self, length=OWNER_CHAIN_LENGTH):
        self.length = length
        self.chains = {}                # name -> (checkpoints, index of the last link sent)

    def next_link(self, name):
        """The next link down the chain of `name`, as hex (a new chain when it is used up)."""
        checkpoints, index = self.chains.get(name, (None, 0))
        if index == 0:
            checkpoints, value = [], os.urandom(32)
            for i in range(self.length):
                if i % self.CHECKPOINT == 0:
                    checkpoints.append(value)
                value = _owner_hash(value)
            index = self.length
        index -= 1
        self.chains[name] = (checkpoints, index)
        value = checkpoints[index // self.CHECKPOINT]
        for _ in range(index % self.CHECKPOINT):
            value = _owner_hash(value)
        return value.hex()


def owner_link_follows(link, accepted, skip=OWNER_CHAIN_SKIP):
    """Is `link` (a REGISTER's owner, hex) 1 to `skip` links before `accepted` on one
    chain, so that hashing it that many times gives `accepted`?"""
    if not (isinstance(link, str) and len(link) == 64 and len(accepted or "") == 64
            and all(c in "0123456789abcdef" for c in link)):
        return False
    value, accepted = binascii.unhexlify(link), accepted.encode()
    for _ in range(skip):
        value = _owner_hash(value)
        if hmac.compare_digest(value.hex().encode(), accepted):
            return True
    return False


def backoff_delays(first=BACKOFF_FIRST, cap=BACKOFF_MAX, rng=random.random):
    """Exponential backoff with full jitter in [delay/2, delay]: 0.5 s, 1 s, ... 30 s."""
    delay = first
    while True:
        yield delay * (0.5 + rng() / 2)
        delay = min(cap, delay * 2)


def parse_hostport(text, default_host, default_port=None, what="address"):
    """'HOST:PORT', 'PORT', ':PORT', '[v6]:PORT' or 'HOST' (with default_port) -> (host, port)."""
    text = text.strip()
    host, port = default_host, None
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise MindmeldError("bad %s %r: missing ']'" % (what, text))
        host, rest = text[1:close], text[close + 1:]
        if rest.startswith(":"):
            port = rest[1:]
        elif rest:
            raise MindmeldError("bad %s %r" % (what, text))
    elif text.count(":") == 1:
        host, port = text.split(":")
        host = host or ""
    elif text.count(":") > 1:
        raise MindmeldError("bad %s %r: write IPv6 addresses as [ADDR]:PORT" % (what, text))
    elif text.isdigit():
        port = text
    else:
        host = text
    if port is None or port == "":
        if default_port is None:
            raise MindmeldError("bad %s %r: a port is needed" % (what, text))
        port = default_port
    try:
        port = int(port)
        if not 0 <= port <= 65535:
            raise ValueError
    except ValueError:
        raise MindmeldError("bad %s %r: the port must be a number from 0 to 65535" % (what, text))
    return host, port


def format_hostport(host, port):
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


# ### 3f. End to end (--secret): SPAKE2 pairing and per-stream confirmation

# A forwarder and a sharer that share a secret pair up once with SPAKE2 (RFC 9382's
# shape) over the RFC 3526 2048-bit MODP group; every stream between them is then TLS
# inside the stream (section 4e), accepted only when each side's MAC of that TLS
# channel's tls-unique (RFC 5929) checks out under the pair's keys.  Neither a passive
# nor an active router can test a guess of the secret offline: all it sees of the secret
# is X = g^x M^w and Y = g^y N^w, which fit every w, and MACs under keys it cannot derive
# without x or y.  An active router gets one online guess per pairing it joins, and the
# sharer counts those (GuessLimiter).
SPAKE2_P = int(
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74020BBEA63B139B22514A08798E3404DD"
    "EF9519B3CD3A431B302B0A6DF25F14374FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7ED"
    "EE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF0598DA48361C55D39A69163FA8FD24CF5F"
    "83655D23DCA3AD961C62F356208552BB9ED529077096966D670C354E4ABC9804F1746C08CA18217C32905E462E36CE3B"
    "E39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF6955817183995497CEA956AE515D2261898FA0510"
    "15728E5A8AACAA68FFFFFFFFFFFFFFFF", 16)
SPAKE2_Q = (SPAKE2_P - 1) // 2          # p is a safe prime: the squares have prime order q
SPAKE2_G = 2                            # a square mod p, so it generates the order-q subgroup
SPAKE2_BYTES = 256
FORWARDER, SHARER = "forwarder", "sharer"


def _length_prefixed(*parts):
    """RFC 9382's transcript encoding: each part after its length, 8 bytes little-endian."""
    return b"".join(len(part).to_bytes(8, "little") + part for part in parts)


def _hash_to_group(label):
    """An element of the order-q subgroup that nobody knows a discrete log of: SHA-512
    in counter mode, reduced mod p, squared."""
    stream = b"".join(hashlib.sha512(label + bytes([i])).digest() for i in range(5))
    return pow(int.from_bytes(stream, "big") % SPAKE2_P, 2, SPAKE2_P)


SPAKE2_M = _hash_to_group(b"mindmeld SPAKE2 M")
SPAKE2_N = _hash_to_group(b"mindmeld SPAKE2 N")


def _element_bytes(n):
    return n.to_bytes(SPAKE2_BYTES, "big")


class SecretPassword:
    """w for one secret and one service name, and its masks, worked out once."""
    __slots__ = ("service", "w", "masks", "unmasks")

    def __init__(self, secret, service):
        self.service = service.encode()
        digest = hashlib.sha512(_length_prefixed(b"mindmeld SPAKE2 w v1", self.service,
                                                 secret.encode())).digest()
        self.w = int.from_bytes(digest, "big") % SPAKE2_Q
        self.masks = {FORWARDER: pow(SPAKE2_M, self.w, SPAKE2_P), SHARER: pow(SPAKE2_N, self.w, SPAKE2_P)}
        self.unmasks = {side: _inv(mask, SPAKE2_P) for side, mask in self.masks.items()}


class Spake2:
    """One side of one pairing.  The forwarder masks with M, the sharer with N; each sends
    `message` and turns the other's into PairKeys with finish()."""
    __slots__ = ("password", "side", "pair", "exponent", "message")

    def __init__(self, password, side, pair, exponent=None):
        self.password, self.side, self.pair = password, side, pair
        self.exponent = exponent or (secrets.randbits(E2E_EXPONENT_BITS) | 1)
        self.message = pow(SPAKE2_G, self.exponent, SPAKE2_P) * password.masks[side] % SPAKE2_P

    def finish(self, peer_message):
        """PairKeys from the other side's message; StreamError if it cannot be one."""
        if not 1 < peer_message < SPAKE2_P - 1:
            raise StreamError("a pairing message out of range")
        other = SHARER if self.side == FORWARDER else FORWARDER
        unmasked = peer_message * self.password.unmasks[other] % SPAKE2_P
        shared = pow(unmasked, 2 * self.exponent, SPAKE2_P)     # 2: into the order-q subgroup
        if shared == 1:
            raise StreamError("a pairing message that gives no key")
        ours, theirs = _element_bytes(self.message), _element_bytes(peer_message)
        forwarder_message, sharer_message = (ours, theirs) if self.side == FORWARDER else (theirs, ours)
        transcript = _length_prefixed(b"mindmeld SPAKE2 v1", self.password.service, self.pair.encode(),
                                      forwarder_message, sharer_message, _element_bytes(shared),
                                      _element_bytes(self.password.w))
        return PairKeys(self.pair, hashlib.sha256(transcript).digest())


class PairKeys:
    """What a pairing leaves: one confirmation key per side.  A stream's proof is a MAC of
    its TLS channel binding, so it is worth nothing on any other stream."""
    __slots__ = ("pair", "keys", "new", "started")

    def __init__(self, pair, secret):
        self.pair = pair
        self.new = True                 # made by this stream's pairing, not yet confirmed
        self.started = None             # when that pairing began (a sharer's GuessLimiter)
        self.keys = {side: hmac.new(secret, b"mindmeld e2e v1 " + side.encode() + b" key",
                                    hashlib.sha256).digest() for side in (FORWARDER, SHARER)}

    def proof(self, side, channel_binding):
        return hmac.new(self.keys[side], b"mindmeld e2e v1 " + side.encode() + b" proof:" + channel_binding,
                        hashlib.sha256).digest()


def _hex_id(value):
    return isinstance(value, str) and len(value) == E2E_PAIR_ID_DIGITS and \
        all(c in "0123456789abcdef" for c in value)


def checked_e2e(ftype, info):
    """The `e2e` field of an OPEN or OPEN_OK, checked (StreamError if malformed), or None."""
    e2e = info.get("e2e")
    if e2e is None:
        return None
    out = {}
    pairs = e2e.get("pairs", []) if isinstance(e2e, dict) else None
    if not isinstance(pairs, list) or len(pairs) > E2E_PAIRS_OFFERED or not all(map(_hex_id, pairs)):
        raise StreamError("%s with a malformed e2e field" % FRAME_NAMES[ftype])
    if pairs:
        out["pairs"] = pairs
    if "pair" in e2e:
        if not _hex_id(e2e["pair"]):
            raise StreamError("%s with a malformed e2e pair" % FRAME_NAMES[ftype])
        out["pair"] = e2e["pair"]
    if "pake" in e2e:
        pake = e2e["pake"]
        if not (isinstance(pake, str) and len(pake) == 2 * SPAKE2_BYTES and "pair" in out):
            raise StreamError("%s with a malformed e2e pairing message" % FRAME_NAMES[ftype])
        try:
            int(pake, 16)
        except ValueError:
            raise StreamError("%s with a malformed e2e pairing message" % FRAME_NAMES[ftype])
        out["pake"] = pake
    if not out:
        raise StreamError("%s with an empty e2e field" % FRAME_NAMES[ftype])
    return out


class E2ERefused(Exception):
    """A sharer turns an OPEN down: reason and code for its OPEN_REFUSED."""

    def __init__(self, reason, code=None):
        Exception.__init__(self, reason)
        self.reason, self.code = reason, code


class GuessLimiter:
    """At most `limit` attempts at a secret per `period` seconds that did not succeed.  An
    attempt counts from the moment it starts, and is forgiven once it succeeds, so that
    attempts made all at once are limited too."""
    __slots__ = ("limit", "period", "failures")

    def __init__(self, limit=E2E_FAILURES_PER_MINUTE, period=60.0):
        self.limit, self.period = limit, period
        # the newest `limit` are all it takes to know: a flood of failures holds no more
        self.failures = collections.deque(maxlen=limit)

    def _expire(self, now):
        while self.failures and self.failures[0] <= now - self.period:
            self.failures.popleft()

    def failed(self, now):
        self._expire(now)
        self.failures.append(now)

    def exhausted(self, now):
        self._expire(now)
        return len(self.failures) >= self.limit

    def forgive(self, started):
        """The attempt that started at `started` succeeded."""
        try:
            self.failures.remove(started)
        except ValueError:              # it had expired already
            pass


class OpenerPairings:
    """A forwarder's pairings with the sharers of one service: the confirmed ones, newest
    last, and the offer an OPEN makes.  One new pairing at a time: a burst of first
    connections waits for it (`waiting`) rather than each costing the sharer one."""

    def __init__(self, secret, service, clock=time.monotonic):
        self.service = service
        self.password = SecretPassword(secret, service)
        self.pairs = collections.OrderedDict()      # pair id -> PairKeys, confirmed
        self.in_flight = None                       # the Spake2 of the pairing under way
        self.started = None                         # ... and when it began
        self.waiting = []                           # callbacks for when it ends
        self.limiter = GuessLimiter()               # a router posing as the sharer guesses too
        self.clock = clock
        self.tls_session = None                     # of the last stream a sharer proved

    def offer(self, fresh=False):
        """(the OPEN's e2e field, the Spake2 of a new pairing or None); (None, None) if
        the caller must wait for the pairing under way (it is called back, see wait).
        E2ERefused after too many pairings that failed."""
        if self.pairs and not fresh:
            return {"pairs": list(self.pairs)[-E2E_PAIRS_OFFERED:]}, None
        if self.in_flight is not None:
            return None, None
        now = self.clock()
        if self.limiter.exhausted(now):
            raise E2ERefused("%d pairings with the sharer of %r failed in the last minute (a wrong "
                             "secret, or a router guessing it); try again in a minute"
                             % (self.limiter.limit, self.service))
        self.limiter.failed(now)                    # until it succeeds
        self.started = now
        spake = self.in_flight = Spake2(self.password, FORWARDER, os.urandom(E2E_PAIR_ID_DIGITS // 2).hex())
        return {"pair": spake.pair, "pake": "%0512x" % spake.message}, spake

    def wait(self, callback):
        self.waiting.append(callback)

    def accepted(self, spake, e2e):
        """The keys for this stream, from the OPEN_OK's e2e field; StreamError if unusable."""
        if e2e is None:
            raise StreamError("the sharer answered without end-to-end encryption")
        pair = e2e.get("pair")
        if spake is not None:
            if pair != spake.pair or "pake" not in e2e:
                raise StreamError("the sharer did not answer the pairing")
            return spake.finish(int(e2e["pake"], 16))
        keys = self.pairs.get(pair)
        if keys is None:
            raise StreamError("the sharer chose a pairing this forwarder does not hold")
        return keys

    def confirmed(self, keys, tls_session=None):
        keys.new = False
        if tls_session is not None:
            self.tls_session = tls_session
        self.pairs[keys.pair] = keys
        self.pairs.move_to_end(keys.pair)
        while len(self.pairs) > E2E_PAIRS_OFFERED:
            self.pairs.popitem(last=False)
        if self.in_flight is not None and self.in_flight.pair == keys.pair:
            self.limiter.forgive(self.started)
            self.ended(self.in_flight)

    def ended(self, spake):
        """The pairing under way is over (confirmed, failed or abandoned): the streams that
        waited for it go on (with it, or one of them pairs anew)."""
        if spake is not None and spake is self.in_flight:
            self.in_flight = None
            waiting, self.waiting = self.waiting, []
            for callback in waiting:
                callback()

    def forget(self, keys):
        self.pairs.pop(keys.pair, None)
        self.tls_session = None


class AcceptorPairings:
    """A sharer's pairings for one service: confirmed pairs (bounded, least recently used
    go first), and a limit on attempts at the secret.  A pairing counts as a failed attempt
    from its start until the opener's proof checks out, so pairings made all at once are
    limited too (each would let its maker test one guess)."""

    def __init__(self, secret, service):
        self.service = service
        self.password = SecretPassword(secret, service)
        self.pairs = collections.OrderedDict()      # pair id -> PairKeys, confirmed
        self.limiter = GuessLimiter()

    def open(self, e2e, now):
        """(PairKeys, the OPEN_OK's e2e field) for an OPEN's e2e field, or E2ERefused."""
        for pair in e2e.get("pairs", ()):
            keys = self.pairs.get(pair)
            if keys is not None:
                self.pairs.move_to_end(pair)
                return keys, {"pair": pair}
        if "pake" not in e2e:
            raise E2ERefused("the sharer holds none of these pairings; pair again", "e2e-rekey")
        if self.limiter.exhausted(now):
            raise E2ERefused("too many failed attempts at the secret of %r; try again in a minute"
                             % self.service, "busy")
        spake = Spake2(self.password, SHARER, e2e["pair"])
        keys = spake.finish(int(e2e["pake"], 16))
        keys.started = now
        self.limiter.failed(now)                    # until the opener proves it
        return keys, {"pair": spake.pair, "pake": "%0512x" % spake.message}

    def confirmed(self, keys):
        if keys.new:
            keys.new = False
            self.limiter.forgive(keys.started)
        self.pairs[keys.pair] = keys
        self.pairs.move_to_end(keys.pair)
        while len(self.pairs) > E2E_SHARER_PAIRS_MAX:
            self.pairs.popitem(last=False)

    def failed(self, keys, now):
        """A stream with these keys ended without the opener's proof."""
        if keys.new:
            keys.new = False                        # counted when it began
        else:
            self.limiter.failed(now)


class EndToEndError(Exception):
    """An end-to-end check failed on one stream: it is reset, and both ends say why."""


class StreamProofs:
    """The two proofs of one end-to-end stream: ours, sent once its TLS handshake is done,
    and the far end's, the first E2E_PROOF_BYTES of its plaintext, which must match the
    MAC of our channel binding under its key before anything else passes."""
    __slots__ = ("keys", "side", "peer_side", "received", "sent", "confirmed")

    def __init__(self, server_side, keys=None):
        self.keys = keys                # PairKeys; a forwarder's come with the OPEN_OK
        self.side, self.peer_side = (SHARER, FORWARDER) if server_side else (FORWARDER, SHARER)
        self.received = b""
        self.sent = False
        self.confirmed = False          # the far end's proof checked out

    def ours(self, channel_binding):
        """Our proof, to send once."""
        self.sent = True
        return self.keys.proof(self.side, channel_binding)

    def take(self, data, channel_binding):
        """Plaintext that came before the far end was confirmed: what follows its proof (b""
        while the proof is incomplete).  EndToEndError if the proof does not match."""
        need = E2E_PROOF_BYTES - len(self.received)
        self.received += data[:need]
        if len(self.received) < E2E_PROOF_BYTES:
            return b""
        if not hmac.compare_digest(self.received, self.keys.proof(self.peer_side, channel_binding)):
            raise EndToEndError("the %s could not prove the secret" % self.peer_side)
        self.confirmed = True
        return data[need:]


# ###########################################################################
# ### 4. Asyncio plumbing: the link, local streams, stdio, WebSocket and TLS layers
# ###########################################################################

# ### 4a. The link: one multiplexed connection

PING_PAYLOAD = struct.Struct("!d")


def _peer_name(transport):
    peer = transport.get_extra_info("peername") if transport is not None else None
    return format_hostport(peer[0], peer[1]) if isinstance(peer, tuple) else "?"


def _write_parts(transport, sock, header, payload):
    """Write header + payload, copying as little as possible.

    While the transport has nothing queued, sendmsg() goes straight to the
    socket (what transport.write() would do, without joining the parts).  What
    the kernel does not take is queued as a copy if the transport would keep a
    reference (`sock is None` means "maybe"), since payloads may be views of a
    receive buffer that is about to be reused.  A layer (WebSocket, TLS) encodes at once."""
    if sock is None and isinstance(transport, _Layer):
        transport.write_parts(header, payload)
        return
    if sock is not None and not transport.get_write_buffer_size() and not transport.is_closing():
        try:
            sent = sock.sendmsg((header, payload)) if header else sock.send(payload)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            sent = 0                    # transport.write() below meets the error and reports it
        if sent:
            if sent >= len(header) + len(payload):
                return
            if sent >= len(header):
                payload, header = memoryview(payload)[sent - len(header):], b""
            else:
                header = header[sent:]
    if sock is None or TRANSPORT_KEEPS_BUFFERS:
        transport.write(b"".join((header, payload)) if header else bytes(payload))
    else:                               # the transport copies into its own buffer
        if header:
            transport.write(header)
        transport.write(payload)


def _pending_size(stream):
    return len(stream.pending) if stream.pending is not None else 0


class Liveness:
    """Is the peer still there?  Counts what arrives (`heard`); after each `interval` of
    silence, a PING; after KEEPALIVE_MISSES silent intervals, the link is aborted.  Also
    the one-off probe `answers`."""

    def __init__(self, link, interval):
        self.link = link
        self.interval = interval        # s between checks; 0 or None: no keepalive
        self.received = self.seen = self.silent = 0
        self.waiter = None              # a future for "anything arrived" (liveness probes)
        self.timer = None

    def start(self):
        if self.interval:
            self.timer = self.link.loop.call_later(self.interval, self._tick)

    def stop(self):
        if self.timer is not None:
            self.timer.cancel()

    def heard(self):
        self.received += 1
        if self.waiter is not None:
            if not self.waiter.done():
                self.waiter.set_result(True)
            self.waiter = None

    async def answers(self, timeout):
        """Does the peer still answer?  One PING, and anything back within `timeout`.
        Concurrent callers share one probe."""
        link = self.link
        if link.closing:
            return False
        if self.waiter is None:
            self.waiter = link.loop.create_future()
            link.ping()
        try:
            return await asyncio.wait_for(asyncio.shield(self.waiter), timeout)
        except asyncio.TimeoutError:
            return False

    def _tick(self):
        link = self.link
        if link.closing:
            return
        if self.received != self.seen:
            self.seen, self.silent = self.received, 0
        else:
            self.silent += 1
            if self.silent >= KEEPALIVE_MISSES:
                link.abort("no answer to keepalive pings for %.0f s" % (self.silent * self.interval))
                return
            link.ping()
        self.timer = link.loop.call_later(self.interval, self._tick)


class Link(BufferedProtocol):
    """One multiplexed connection: frame codec, write path, keepalive (`liveness`), shutdown.

    Subclasses route frames through `dispatch`, a dict {frame type: handler(id, payload)}.
    Writes go straight to the transport; the transport's own buffer is the
    queue, kept small by per-stream credit and by pausing local reads above
    LINK_HIGH_WATER."""

    role = "link"
    notsent_lowat = None    # TCP_NOTSENT_LOWAT for the socket, where local streams take turns
    frame_max = MAX_DATA    # largest DATA frame it writes; on a long link a quantum, so that
                            # one frame never fills the short write buffer by itself
    long_link = False       # round trip of LONG_LINK_RTT or more: short queues (rtt_measured)
    lowat = None            # the TCP_NOTSENT_LOWAT set now on a long link
    half_close = False      # close() waits for the peer's EOF (see there)

    def __init__(self, keepalive=KEEPALIVE_INTERVAL):
        self.loop = _get_loop()
        self.transport = None
        self.peer = "?"
        self.frames = FrameBuffer()
        self.sock = None                # for direct writes (plain TCP only)
        self.liveness = Liveness(self, keepalive)
        self.write_paused = False
        self.blocked = []            # local streams that wait for resume_writing()
        self.closing = False
        self.lost = self.loop.create_future()   # result: the reason it ended (str)
        self.rtt = RTT_INITIAL
        self.dispatch = {PING: self.on_ping, PONG: self.on_pong}
        self._resume_pending = False
        self._close_reason = None

    # -- asyncio.Protocol ------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport
        self.peer = _peer_name(transport)
        _set_nodelay(transport)
        if self.notsent_lowat:
            _set_notsent_lowat(transport, self.notsent_lowat)
        self.sock = _raw_socket(transport)
        transport.set_write_buffer_limits(LINK_HIGH_WATER, LINK_LOW_WATER)
        self.liveness.start()

    def get_buffer(self, sizehint):
        return self.frames.writable()

    def buffer_updated(self, nbytes):
        self.liveness.heard()
        if self.closing:
            return
        self.frames.advance(nbytes)
        self.process_frames()

    def data_received(self, data):
        """3.6 (no BufferedProtocol): copy into the frame buffer."""
        view = memoryview(data)
        while view and not self.closing:
            space = self.get_buffer(len(view))
            n = min(len(space), len(view))
            space[:n] = view[:n]
            view = view[n:]
            self.buffer_updated(n)

    def process_frames(self):
        try:
            for ftype, _flags, stream_id, payload in self.frames.frames():
                handler = self.dispatch.get(ftype)
                if handler is None:
                    raise ProtocolError("unexpected %s frame" % FRAME_NAMES[ftype])
                handler(stream_id, payload)
                if self.closing:
                    break
        except ProtocolError as exc:
            self.fail(exc)
        except Exception as exc:    # a bug: drop this link, keep the process serving
            log.error("%s %s: internal error: %r; dropping the link (run with -v for a traceback)",
                      self.role, self.peer, exc)
            log.debug("traceback", exc_info=True)
            self.abort("internal error")

    def eof_received(self):
        self._close_reason = self._close_reason or "the peer closed the connection"
        return False

    def connection_lost(self, exc):
        self.closing = True
        self.liveness.stop()
        reason = self._close_reason or (
            "connection lost: %s" % (exc or "closed by the peer"))
        self.on_lost(reason)
        if not self.lost.done():
            self.lost.set_result(reason)

    def pause_writing(self):
        self.write_paused = True
        self._resume_pending = False        # a resume still to come is void

    def resume_writing(self):
        # Writing resumes a loop turn later, not inside the transport's call: a write that
        # fails there makes 3.12 and 3.13 call connection_lost twice, the second time into
        # a torn-down transport.  Until then the link stays paused, so that nothing sent
        # meanwhile goes before the streams that waited (writable(): shortest first).
        if not self._resume_pending:
            self._resume_pending = True
            self.loop.call_soon(self._resumed)

    def _resumed(self):
        if not self._resume_pending:        # paused again meanwhile
            return
        self._resume_pending = False
        self.write_paused = False
        if not self.closing:
            self.writable()

    def writable(self):
        """Writing may go on: the streams that waited for it, shortest queue first."""
        blocked, self.blocked = self.blocked, []
        blocked.sort(key=_pending_size)     # a short answer goes before the next bulk read
        for stream in blocked:
            stream.link_resumed()

    def known_stream(self, streams, stream_id, ftype):
        """streams[stream_id], or None for a late frame of a stream that has ended;
        a frame for a stream that was never opened is a protocol error."""
        stream = streams.get(stream_id)
        if stream is None:
            self.ids.check_unknown(stream_id, ftype)
        return stream

    # -- to be overridden ------------------------------------------------
    def on_lost(self, reason):
        pass

    def log_failure(self, message, *args):
        log.warning(message, *args)

    # -- writing ------------------------------------------------------------
    def send(self, frame):
        if not self.closing:
            self.transport.write(frame)

    def send_data(self, stream_id, payload):
        if not self.closing:
            _write_parts(self.transport, self.sock, HEADER.pack(len(payload), DATA, 0, stream_id), payload)

    def send_json(self, ftype, stream_id, obj):
        self.send(encode_json(ftype, stream_id, obj))

    # -- keepalive and round trip ----------------------------------------------
    def ping(self):
        self.send(encode_frame(PING, 0, PING_PAYLOAD.pack(time.monotonic())))

    def on_ping(self, _id, payload):
        self.send(encode_frame(PONG, 0, bytes(payload)))

    def on_pong(self, _id, payload):
        if len(payload) == PING_PAYLOAD.size:
            rtt = time.monotonic() - PING_PAYLOAD.unpack(payload)[0]
            if 0 <= rtt < RTT_MAX:
                self.rtt_measured(rtt)

    def rtt_measured(self, rtt):
        self.rtt = rtt
        if (rtt >= LONG_LINK_RTT) != self.long_link:
            self.set_long_link(not self.long_link)

    def set_long_link(self, long_link):
        """On a long link the kernel's data in flight keeps the pipe full: what waits here
        beyond that only delays other streams' data, so the write buffer is smaller, the
        frames are cut to SCHEDULER_QUANTUM and the rest waits where streams take turns."""
        if self.transport is None or self.closing:
            return
        self.long_link, self.lowat = long_link, None
        self.frame_max = SCHEDULER_QUANTUM if long_link else MAX_DATA
        if long_link:
            self.sharing_changed()
        elif self.notsent_lowat:
            _set_notsent_lowat(self.transport, self.notsent_lowat)
        self.transport.set_write_buffer_limits(*LONG_LINK_WATER if long_link else
                                               (LINK_HIGH_WATER, LINK_LOW_WATER))

    def stream_count(self):
        return len(self.streams)

    def sharing_changed(self):
        """A stream came or went.  On a long link the kernel holds little unsent while
        streams share it, so that they take turns here; more while one has it to itself."""
        if self.long_link and not self.closing and self.transport is not None:
            limit = LONG_LINK_NOTSENT_LOWAT if self.stream_count() > 1 else LINK_NOTSENT_LOWAT
            if limit != self.lowat:
                self.lowat = limit
                _set_notsent_lowat(self.transport, limit)

    # -- closing ------------------------------------------------------------
    def close(self, code=None, message=None):
        """Say why (GOAWAY), flush, close; abort if the peer does not read within 2 s.

        With `half_close` (clients, on TCP) it is a half-close, and what arrives meanwhile
        is read and dropped until the peer closes too: a socket closed with bytes unread
        sends a reset, and a reset can cost the peer the last frames it had not read yet
        (a `connect` that exits once its upload is sent)."""
        if self.closing:
            return
        if code is not None:
            self.send_json(GOAWAY, 0, {"code": code, "message": short_reason(message or code)})
        self._close_reason = self._close_reason or message or "closed"
        self.closing = True
        if self.transport is not None:
            if self.half_close and self.transport.can_write_eof():
                self.transport.write_eof()      # eof_received() then closes
            else:
                self.transport.close()
            self.loop.call_later(CLOSE_FLUSH_TIMEOUT, _abort, self.transport)

    def abort(self, reason):
        self._close_reason = self._close_reason or reason
        self.closing = True
        if self.transport is not None:
            _abort(self.transport)

    def fail(self, exc):
        """The peer broke the protocol: tell it, log one line, drop it."""
        self.log_failure("%s %s: %s; disconnecting", self.role, self.peer, short_reason(exc))
        self._close_reason = "protocol error: %s" % short_reason(exc)  # it may quote the peer
        self.close(getattr(exc, "code", "protocol"), str(exc))


# ### 4b. Local streams: one TCP connection joined to one stream

E2E_FAILURE = "end-to-end check failed"


class Upstream:
    """The local -> link half of a LocalStream: reads go out as DATA while credit lasts
    and the link is not paused; the rest waits in `pending`, with local reading paused,
    until a WINDOW (credit) or the link's resume_writing lets it go.  A mixin: it uses
    the stream's link, end, id, transport, local_eof, closed and _finish."""

    pending = None                  # what credit or a paused link held back, sent first
    reading = True                  # the local transport is not paused

    # -- reading control ------------------------------------------------
    def pause_reading(self):
        if self.reading and self.transport is not None:
            self.reading = False
            self.transport.pause_reading()

    def resume_reading(self):
        if not self.reading and self.transport is not None and not self.local_eof \
                and not self.transport.is_closing():
            self.reading = True
            self.transport.resume_reading()

    # -- sending ---------------------------------------------------------------
    def send_upstream(self, data):
        link, end = self.link, self.end
        n = len(data)
        if n <= end.credit and n <= link.frame_max and not link.write_paused:
            end.send_data(n)                # the common case: one read, one frame
            link.send_data(self.id, data)
            return
        view = memoryview(data)
        while view and end.credit and not link.write_paused:
            n = min(len(view), end.credit, link.frame_max)
            end.send_data(n)
            link.send_data(self.id, view[:n])
            view = view[n:]
        if view:
            self.pending = view
            self.pause_reading()
            if link.write_paused:
                link.blocked.append(self)

    def _flush_pending(self):
        if self.pending is not None:
            data, self.pending = self.pending, None
            self.send_upstream(data)
        if self.pending is None:
            if self.local_eof:
                if self.end.allows(SEND, EOF):
                    self._send_eof()
            else:
                self.resume_reading()

    def link_resumed(self):
        if not self.closed:
            self._flush_pending()

    def _send_eof(self):
        self.link.send(self.end.send(EOF))
        if self.end.state == CLOSED:
            self._finish()

    def on_window(self, payload):
        self.end.recv_window(payload)
        if self.pending is not None:
            self._flush_pending()           # or joins link.blocked if the link is paused


class LocalStream(Upstream, asyncio.Protocol):
    """One local TCP connection joined to one stream of a ClientLink.

    The stream's rules live in `end` (a StreamEnd); this class does the I/O.
    Local -> link: see Upstream.  Link -> local: credit goes back only
    when the local write buffer has drained (write buffer limits are 0, so
    resume_writing() means "everything written has been handed to the kernel")."""

    reads_before_open = False       # a forwarder reads the client's first bytes, for its OPEN
    early = None                    # those bytes, until the stream is accepted
    e2e = None                      # an EndToEndLayer (--secret): it is the transport then
    role = "stream"                 # what its log lines start with

    def __init__(self, link=None, stream_id=0):
        self.link = None
        self.end = None                 # a StreamEnd once attached to a link
        self.id = stream_id
        self.transport = None
        self.sock = None
        if link is not None:            # the router opened it: we accept
            self.attach(link, stream_id, OPEN_RECEIVED)
        self.local_eof = False       # the local side sent FIN
        self.write_paused = False
        self.undelivered = 0
        self.label = ""
        self.closed = False

    def attach(self, link, stream_id, state):
        self.link, self.id = link, stream_id
        self.end = StreamEnd(stream_id, state, ReceiveWindow(link.budget))
        link.streams[stream_id] = self
        link.sharing_changed()

    def detach(self):
        """Back to unattached, for another OPEN later (never after data flowed)."""
        if self.link is not None and self.link.streams.get(self.id) is self:
            del self.link.streams[self.id]
        if self.end is not None:
            self.end.release()
        self.link = self.end = None

    # -- local socket ------------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport
        self.sock = _raw_socket(transport)
        _set_nodelay(transport)
        transport.set_write_buffer_limits(0, 0)
        if self._unaccepted() and not self.reads_before_open:
            if PAUSE_IN_CONNECTION_MADE_HOLDS:
                self.pause_reading()
            else:
                _get_loop().call_soon(self._hold_until_accepted)

    def _unaccepted(self):
        return self.end is None or self.end.state in OPENING_STATES

    def _hold_until_accepted(self):
        """Before 3.11 the pause comes a callback late, and by then the stream may have
        been accepted (a link read already queued in this loop turn can bring OPEN_OK):
        pausing then would stop it for good."""
        if self._unaccepted() and not self.closed and not self.transport.is_closing():
            self.pause_reading()

    def data_received(self, data):
        if self.closed:
            return
        if self.pending is not None or self._unaccepted():
            # A read that raced pause_reading() (3.6's connection_made, stdio threads)
            self.pending = data if self.pending is None else bytes(self.pending) + data
            self.pause_reading()
            return
        self.send_upstream(data)

    def eof_received(self):
        self.local_eof = True
        if self.pending is None and self.end is not None and self.end.allows(SEND, EOF):
            self._send_eof()
        return True             # keep our writing half open: half-close

    def connection_lost(self, exc):
        if not self.closed and self.end is not None:
            why = "local connection reset" if exc else "local connection closed"
            self.link.send(self.end.send_reset(why))
        self._forget()

    def pause_writing(self):
        self.write_paused = True

    def resume_writing(self):
        self.write_paused = False
        n, self.undelivered = self.undelivered, 0
        if n:
            self._delivered(n)

    # -- link -> local (called by ClientLink) -------------------------------
    def on_data(self, payload):
        n = len(payload)
        link = self.link
        self.end.recv_data(n, link.loop.time(), link.rtt)
        _write_parts(self.transport, self.sock, b"", payload)
        if self.write_paused:
            self.undelivered += n
        else:
            self._delivered(n)

    def _delivered(self, n):
        if self.closed:                 # (resume_writing comes after close too): its window is released
            return
        window = self.end.window
        if window.unreturned + n < window.size // 2:
            window.unreturned += n          # the common case: not yet worth a WINDOW frame
            return
        frame = self.end.delivered(n, self.link.loop.time(), self.link.rtt)
        if frame and not self.closed:
            self.link.send(frame)

    def on_eof(self, _payload):
        if self.e2e is not None and not self.e2e.check_end():
            return                          # a truncation: reset
        if self.end.receive(EOF) == CLOSED:
            self._finish()
        elif self.transport.can_write_eof():
            try:
                self.transport.write_eof()
            except OSError:             # the local peer reset, and its reset is not read yet
                self.reset("local connection reset")

    def on_reset(self, payload):
        self.reset_by_peer(self.end.recv_reset(payload))
        self._forget()
        if self.transport is not None:
            _abort_with_reset(self.transport)

    def reset_by_peer(self, reason):
        if reason.startswith(E2E_FAILURE):      # the far end's check failed: say so here too
            log.warning("%s: stream %s reset by the far end: %s", self.role, self.label, reason)
        else:
            log.debug("stream %s reset by the peer: %s", self.label, reason)

    def e2e_failed(self, why):
        """An end-to-end check failed (EndToEndLayer): one line, and the stream is reset."""
        log.warning("%s: stream %s: %s: %s; stream reset", self.role, self.label, E2E_FAILURE, why)
        self.reset("%s: %s" % (E2E_FAILURE, why))

    # The opening frames.  Each role overrides the ones it expects; the rest are
    # refused by the state table (an acceptor never receives OPEN_OK, say).
    def on_open_ok(self, payload):
        self.end.receive(OPEN_OK)
        info = decode_far_json(OPEN_OK, payload) if payload else {}
        self.end.start_with(*initial_windows(info))
        if self.accepted(info):
            self._flush_pending()

    def accepted(self, _info):
        """Does the opener take this OPEN_OK?  (A forwarder with a secret checks its pairing.)"""
        return True

    def on_open_refused(self, _info):
        self.end.receive(OPEN_REFUSED)

    def accept(self, info):
        """The acceptor's side: tell the opener (OPEN_OK), with the window's warm start
        right after it, then let data flow."""
        self.link.send(self.end.send_json(OPEN_OK, info))
        growth = self.link.warm_start(self.end)
        if growth:
            self.link.send(self.end.send(WINDOW, WINDOW_INCREMENT.pack(growth)))
        self._flush_pending()

    def reset(self, reason):
        """Abort from this side: RESET upstream (once it has a stream), RST locally."""
        if not self.closed and self.link is not None:
            self.link.send(self.end.send_reset(reason))
        self._forget()
        if self.transport is not None:
            _abort_with_reset(self.transport)

    def link_lost(self, _reason):
        """The link is gone, and every stream on it: RST locally."""
        self._forget()
        if self.transport is not None:
            _abort_with_reset(self.transport)

    # -- ending --------------------------------------------------------------
    def _finish(self):
        """Both directions ended cleanly: flush what is buffered, then close."""
        self._forget()
        if self.transport is not None:
            self.transport.close()

    def _forget(self):
        if not self.closed:
            self.closed = True
            if self.end is not None:
                self.end.release()
                self.link.stream_closed(self)


# ### 4c. Standard input and output as a transport (connect)

class _StdioTransport(asyncio.Transport):
    """Standard input and output as a transport, through two threads.

    Threads work on every platform and every kind of stdin (pipe, file, tty,
    socket), where the loop's pipe support does not.  Reading pauses between
    reads (at most one read beyond a pause), writes are queued and reported
    drained, so a LocalStream's flow control works unchanged."""

    def __init__(self, loop, protocol, read_fd, write_fd):
        import threading
        import queue
        asyncio.Transport.__init__(self)
        self._loop, self._protocol = loop, protocol
        self._read_fd, self._write_fd = read_fd, write_fd
        self._reading = threading.Event()
        self._reading.set()
        self._writes = queue.Queue()
        self._queued = 0
        self._closing = False
        self._paused_writing = False
        self._lost = False
        protocol.connection_made(self)
        for target in (self._reader, self._writer):
            threading.Thread(target=target, daemon=True).start()

    def _reader(self):
        while True:
            self._reading.wait()
            try:
                data = os.read(self._read_fd, MAX_DATA)
            except OSError:
                data = b""
            self._call(self._protocol.data_received if data else self._protocol.eof_received,
                       *([data] if data else []))
            if not data:
                return

    _EOF, _CLOSE = object(), object()

    def _writer(self):
        while True:
            item = self._writes.get()
            if item is self._EOF or item is self._CLOSE:
                if self._write_fd is not None:      # EOF for whoever reads our stdout
                    try:
                        os.close(self._write_fd)
                    except OSError:
                        pass
                    self._write_fd = None
                if item is self._CLOSE:
                    self._call(self._connection_lost)
                    return
                continue
            try:
                view = memoryview(item)
                while view:
                    view = view[os.write(self._write_fd, view):]
            except OSError as exc:
                self._call(self._connection_lost, exc)
                return
            self._call(self._drained, len(item))

    def _call(self, callback, *args):
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:            # the loop has closed: the process is ending
            pass

    def _drained(self, n):
        self._queued -= n
        if self._queued == 0 and self._paused_writing:
            self._paused_writing = False
            self._protocol.resume_writing()

    def _connection_lost(self, exc=None):
        if not self._lost:
            self._lost = self._closing = True
            self._protocol.connection_lost(exc)

    def get_extra_info(self, name, default=None):
        return default

    def set_write_buffer_limits(self, high=None, low=None):
        pass

    def get_write_buffer_size(self):
        return self._queued

    def is_closing(self):
        return self._closing

    def pause_reading(self):
        self._reading.clear()

    def resume_reading(self):
        self._reading.set()

    def write(self, data):
        if self._closing:
            return
        data = bytes(data)
        self._queued += len(data)
        self._writes.put(data)
        if not self._paused_writing:
            self._paused_writing = True
            self._protocol.pause_writing()

    def can_write_eof(self):
        return True

    def write_eof(self):
        self._writes.put(self._EOF)

    def close(self):
        if not self._closing:
            self._closing = True
            self._writes.put(self._CLOSE)

    def abort(self):
        self.close()


# ### 4d. Layers under a link: WebSocket and TLS

class _Layer:
    """What a layer (WebSocket, TLS, end-to-end TLS) passes straight to the transport under
    it; it is the protocol of that transport and the transport of the Link (or stream)
    above.  An end-to-end layer may have no transport under it yet."""

    def write_parts(self, header, payload):
        """What _write_parts() asks of a layer: it encodes (copies) at once."""
        self.write(b"".join((header, payload)))

    def abort(self):
        self.closing = True
        if self.transport is not None:
            _abort(self.transport)

    def is_closing(self):
        return self.closing or (self.transport is not None and self.transport.is_closing())

    def can_write_eof(self):
        return False        # a link over a layer closes whole (EndToEndLayer can half-close)

    def get_write_buffer_size(self):
        return self.transport.get_write_buffer_size() if self.transport is not None else 0

    def set_write_buffer_limits(self, high=None, low=None):
        self.transport.set_write_buffer_limits(high, low)

    def pause_reading(self):
        self.transport.pause_reading()

    def resume_reading(self):
        self.transport.resume_reading()

    def get_extra_info(self, name, default=None):
        if self.transport is None:
            return default
        return self.transport.get_extra_info(name, default)


class WebSocketLayer(_Layer, asyncio.Protocol):
    """Puts a Link inside a WebSocket: the protocol of the real transport, and the
    transport the Link writes to.  Binary messages carry the mindmeld byte
    stream; pings are answered; a close is answered and ends the link."""

    def __init__(self, link, transport, client_side):
        self.link, self.transport = link, transport
        self.masked = client_side             # clients mask what they send
        self.decoder = WsDecoder(not client_side,
                                 WS_MAX_FRAME if client_side else WS_MAX_FRAME_BEFORE_AUTH)
        self.closing = False
        transport.set_protocol(self)

    # -- protocol of the real transport -------------------------------------------
    def data_received(self, data):
        try:
            for opcode, payload in self.decoder.feed(data):
                if opcode in (WS_BINARY, WS_CONTINUATION, WS_TEXT):
                    if payload:
                        self.link.data_received(payload)
                elif opcode == WS_PING:     # a peer that does not read gets no more pongs
                    if self.transport.get_write_buffer_size() < WS_PONG_BACKLOG:
                        self.transport.write(ws_encode(WS_PONG, payload, self.masked))
                elif opcode == WS_CLOSE:
                    self.close()
                    return
        except ProtocolError as exc:
            self.link.fail(exc)

    def eof_received(self):
        return self.link.eof_received()

    def connection_lost(self, exc):
        self.link.connection_lost(exc)

    def pause_writing(self):
        self.link.pause_writing()

    def resume_writing(self):
        self.link.resume_writing()

    # -- transport of the Link ----------------------------------------------------------
    def write(self, data):
        if not self.closing:
            self.transport.write(ws_encode(WS_BINARY, data, self.masked))

    def writelines(self, parts):
        self.write(b"".join(parts))

    def close(self):
        if not self.closing:
            self.closing = True
            self.transport.write(ws_encode(WS_CLOSE, struct.pack("!H", 1000), self.masked))
            self.transport.close()


TLS_CHUNK = 256 * 1024              # most ciphertext read at once
TLS_FIRST_CHUNK = 16 * 1024         # ... and to begin with (handshakes are small)
TLS_RECORD_SIZE = 16 * 1024         # the most plaintext one TLS record holds


class TlsLayer(_Layer, BufferedProtocol):
    """TLS done by hand with ssl.SSLObject and memory BIOs: the protocol of the TCP
    transport, and the transport of the Link (or WebSocketLayer) above.

    Rather than asyncio's own TLS transport: plaintext is decrypted straight into
    the Link's frame buffer, ciphertext goes straight to the socket, and 3.6 to 3.13
    behave alike.  A server's app is connected at once, so that its own handshake
    deadline covers TLS too (3.6's asyncio cannot bound a TLS handshake); a client's
    app is connected once the handshake is done, so it can check the certificate.

    `handshake` is a future whose result is None once the handshake is done, or the
    exception that ended it (a result, not an exception: a router awaits nobody)."""

    def __init__(self, app, context, server_side, server_hostname=None):
        self.app = app
        self._app_buffered = hasattr(app, "get_buffer")
        self._app_connected = False
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_side=server_side,
                                    server_hostname=server_hostname)
        self.server_side = server_side
        self.handshake = _get_loop().create_future()
        self.transport = self.sock = None
        self.closing = False
        self.reading = True
        self.error = None
        self._ciphertext = memoryview(bytearray(TLS_FIRST_CHUNK))

    # -- protocol of the TCP transport ------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport
        self.sock = _raw_socket(transport)
        _set_nodelay(transport)
        if self.server_side:
            self._connect_app()
        if not self.closing:
            self._shake()

    def get_buffer(self, sizehint):
        return self._ciphertext

    def buffer_updated(self, nbytes):
        buf = self._ciphertext
        self.incoming.write(buf[:nbytes])
        if nbytes == len(buf) and nbytes < TLS_CHUNK:   # busy: read more at once
            self._ciphertext = memoryview(bytearray(min(2 * nbytes, TLS_CHUNK)))
        self._received()

    def data_received(self, data):      # 3.6: no BufferedProtocol
        self.incoming.write(data)
        self._received()

    def _received(self):
        if self.closing:
            return
        if self.handshake.done():
            self._read_app()
        else:
            self._shake()

    def eof_received(self):
        if self._app_connected:
            return self.app.eof_received()
        return False

    def connection_lost(self, exc):
        self.closing = True
        self._end_handshake(exc or ConnectionResetError(
            "the connection closed during the TLS handshake"))
        if self._app_connected:
            self.app.connection_lost(exc or self.error)

    def pause_writing(self):
        if self._app_connected:
            self.app.pause_writing()

    def resume_writing(self):
        if self._app_connected:
            self.app.resume_writing()

    # -- TLS ----------------------------------------------------------------------
    def _connect_app(self):
        self._app_connected = True
        self.app.connection_made(self)

    def _shake(self):
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, SSL_CERTIFICATE_ERROR, OSError) as exc:
            self._flush()               # the alert tells the peer why
            self.error = exc
            self._end_handshake(exc)
            self.closing = True
            self.transport.close()
            return
        self._flush()
        self._end_handshake(None)
        if not self._app_connected:
            self._connect_app()
        if self.incoming.pending and not self.closing:
            self._read_app()            # application data that came with the last flight

    def _end_handshake(self, exc):
        if not self.handshake.done():
            self.handshake.set_result(exc)

    def _read_app(self):
        tls = self.tls
        try:
            while self.reading and not self.closing:
                app = self.app          # which may change as it reads (a WebSocket upgrade)
                if self._app_buffered:  # fill the app's buffer record by record, then hand it up
                    space = app.get_buffer(-1)
                    size, filled = len(space), 0
                    try:
                        while filled < size:
                            count = tls.read(size - filled, space[filled:])
                            if not count:
                                break
                            filled += count
                    finally:
                        if filled:
                            app.buffer_updated(filled)
                    if filled < size:
                        break
                else:
                    data = tls.read(TLS_CHUNK)
                    if not data:
                        break
                    app.data_received(data)
            else:
                return
        except ssl.SSLWantReadError:
            self._flush()               # post-handshake messages may want an answer
            return
        except ssl.SSLZeroReturnError:
            pass
        except ssl.SSLError as exc:     # a damaged or forged record
            self._fail(exc)
            return
        self._flush()                   # close_notify: the peer has finished
        if not self.app.eof_received():
            self.close()

    def _fail(self, exc):
        app = getattr(self.app, "link", self.app)       # under a WebSocketLayer, its Link
        log.warning("%s %s: TLS error (%s); disconnecting", getattr(app, "role", "link"),
                    _peer_name(self.transport), getattr(exc, "reason", None) or exc)
        self.error = exc
        self.abort()

    def _flush(self):
        data = self.outgoing.read()
        if data and self.transport is not None:
            _write_parts(self.transport, self.sock, b"", data)

    # -- transport of the app -------------------------------------------------------
    def _encrypt(self, *parts):
        if self.closing or not self.handshake.done():
            return                      # nothing to say before TLS is up
        try:
            for part in parts:
                self.tls.write(part)
        except ssl.SSLError as exc:
            self._fail(exc)
            return
        self._flush()

    def write(self, data):
        self._encrypt(data)

    def writelines(self, parts):
        self._encrypt(b"".join(parts))

    def write_parts(self, header, payload):
        """A large payload goes as records of its own: cheaper than joining it to its header."""
        if header and len(payload) >= TLS_RECORD_SIZE:
            self._encrypt(header, payload)
        else:
            self._encrypt(b"".join((header, payload)))

    def close(self):
        if self.closing:
            return
        self.closing = True
        if self.handshake.done() and self.error is None:
            try:
                self.tls.unwrap()       # queues close_notify
            except (ssl.SSLError, ValueError):
                pass
            self._flush()
        self.transport.close()

    def pause_reading(self):
        if self.reading:
            self.reading = False
            self.transport.pause_reading()

    def resume_reading(self):
        if not self.reading:
            self.reading = True
            self.transport.resume_reading()
            _get_loop().call_soon(self._received)       # what the BIO already holds

    def set_protocol(self, protocol):
        self.app = protocol
        self._app_buffered = hasattr(protocol, "get_buffer")

    def get_extra_info(self, name, default=None):
        if name == "ssl_object":
            return self.tls
        return _Layer.get_extra_info(self, name, default)


# ### 4e. End to end: TLS inside one stream (--secret)

# TLS needs a certificate, and ssl loads one only from a file; this one is public on
# purpose (it authenticates nothing: the pairing's proofs do, section 3f), so any copy
# of mindmeld can be the TLS server of a stream.  ECDHE still gives every stream keys of
# its own, which is forward secrecy: a secret learned later decrypts nothing recorded.
E2E_KEY_PEM = b"""-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgRrJLSxBZHggjSQZp
rgi6QEo/ztPU4HME+PtVbunGpKehRANCAATez4bduiQy2mqHdPXeAXXxrzRQ/G+D
RLs5AdndbpkFmhsyn1W3Xyjh5II2AnIZx3FCzMSjpaHlO9F2yg7SYD7k
-----END PRIVATE KEY-----
"""
E2E_CERT_PEM = b"""-----BEGIN CERTIFICATE-----
MIIBvTCCAWOgAwIBAgIUSEqkssyzrxgOvlm/tpspdRhP2hswCgYIKoZIzj0EAwIw
MzExMC8GA1UEAwwobWluZG1lbGQgZW5kLXRvLWVuZCAodGhpcyBrZXkgaXMgcHVi
bGljKTAgFw0yNjEyMDIxNDM3MThaGA8yMTI2MTEwODE0MzcxOFowMzExMC8GA1UE
AwwobWluZG1lbGQgZW5kLXRvLWVuZCAodGhpcyBrZXkgaXMgcHVibGljKTBZMBMG
ByqGSM49AgEGCCqGSM49AwEHA0IABN7Pht26JDLaaod09d4BdfGvNFD8b4NEuzkB
2d1umQWaGzKfVbdfKOHkgjYCchnHcULMxKOloeU70XbKDtJgPuSjUzBRMB0GA1Ud
DgQWBBQwD4KNoxhz++iy5XDY9FZBWbE2hzAfBgNVHSMEGDAWgBQwD4KNoxhz++iy
5XDY9FZBWbE2hzAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0gAMEUCIQDi
okpN+rRwaphjIhgk2QQhJNiwmB7gM0SF/jwzswROLwIgRO7dPGK8GcGYIXUPNHlQ
RoMSxmgheBcJQ4C/Mwn7MYQ=
-----END CERTIFICATE-----
"""
# TLS 1.2 because tls-unique (the first Finished message) is its channel binding; with the
# extended master secret (OpenSSL's default) and ECDHE only, no man in the middle can make
# both its legs share one.  Python has no tls-exporter for TLS 1.3.
E2E_CIPHERS = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES256-GCM-SHA384"
_e2e_contexts = {}


def e2e_context(server_side):
    """The (cached) SSLContext of one side of an end-to-end stream."""
    context = _e2e_contexts.get(server_side)
    if context is not None:
        return context
    if ssl is None:
        raise MindmeldError("--secret needs Python's ssl module, which this Python lacks")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    _tls_policy(context)
    if SSL_HAS_MINIMUM_VERSION:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    else:  # 3.6
        context.options |= ssl.OP_NO_TLSv1_3
    try:
        context.set_ciphers(E2E_CIPHERS)
    except ssl.SSLError as exc:     # an OpenSSL without them (a FIPS build, say)
        raise MindmeldError("--secret needs TLS 1.2 with ECDHE-ECDSA ciphers, which this "
                            "Python's OpenSSL refuses (%s)" % (exc.reason or exc))
    if server_side:
        folder = tempfile.mkdtemp(prefix="mindmeld-e2e-")
        try:
            path = os.path.join(folder, "e2e.pem")
            with open(path, "wb") as f:
                f.write(E2E_KEY_PEM + E2E_CERT_PEM)
            context.load_cert_chain(path)
        except ssl.SSLError as exc:
            raise MindmeldError("--secret needs an ECDSA P-256 key, which this Python's OpenSSL "
                                "refuses (%s)" % (exc.reason or exc))
        except OSError as exc:
            raise MindmeldError("cannot write a temporary file for end-to-end TLS in %s: %s"
                                % (tempfile.gettempdir(), exc.strerror or exc))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE    # the proofs authenticate, not the certificate
    _e2e_contexts[server_side] = context
    return context


class MemoryTls:
    """One TLS connection held in memory (ssl's SSLObject): records in with feed(), records
    out with records(), and ssl's failures as EndToEndError."""

    def __init__(self, server_side, session=None):
        context = e2e_context(server_side)      # first: without ssl it says so in one line
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing,
                                                     server_side=server_side, session=session)
        self.handshaken = False

    @property
    def session(self):
        return self.tls.session

    @property
    def session_reused(self):
        return self.tls.session_reused

    def channel_binding(self):
        return self.tls.get_channel_binding("tls-unique")

    def feed(self, records):
        self.incoming.write(records)

    def records(self):
        return self.outgoing.read()

    def shake(self):
        """Go on with the handshake: True once it is done."""
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            return False
        except ssl.SSLError as exc:
            raise EndToEndError("the TLS handshake failed (%s)" % (exc.reason or exc))
        self.handshaken = True
        return True

    def read(self):
        """(the plaintext of the records fed so far, one piece a record; whether the far
        end's close_notify came; an EndToEndError if a record was altered, or None).  The
        pieces before an altered record are authentic."""
        pieces = []
        while True:
            try:
                data = self.tls.read(E2E_READ_CHUNK)
            except ssl.SSLWantReadError:
                return pieces, False, None
            except ssl.SSLZeroReturnError:
                return pieces, True, None
            except ssl.SSLError as exc:
                return pieces, False, EndToEndError("the data was altered on the way (%s)"
                                                    % (exc.reason or exc))
            if not data:
                return pieces, True, None
            pieces.append(data)

    def send(self, data):
        try:
            self.tls.write(data)
        except ssl.SSLError as exc:
            raise EndToEndError("TLS refused to send (%s)" % (exc.reason or exc))

    def close_notify(self):
        try:
            self.tls.unwrap()
        except ssl.SSLError:                    # WantRead: the far end's close_notify comes later
            pass


class EndToEndLayer(_Layer, asyncio.Protocol):
    """TLS between the two ends of one stream: the transport of a LocalStream, which so
    carries only TLS records, and the protocol of the local socket, which sees plaintext.

    After the handshake the sharer sends its proof (PairKeys.proof of tls-unique) as its
    first plaintext and the forwarder checks it before it sends its own and then the
    user's bytes; the sharer lets nothing through, and dials nothing, until the
    forwarder's proof checks out.  Half-close: a local EOF is a TLS close_notify, then the
    stream's EOF; a stream EOF that no close_notify announced is a truncation.  What
    differs by role is in ForwarderEndToEnd and SharerEndToEnd."""

    def __init__(self, stream, server_side, keys=None, on_confirmed=None, session=None):
        self.stream = stream
        stream.e2e = self
        # session: a forwarder's TLS session from a stream the sharer proved (resumption)
        self.tls = MemoryTls(server_side, session)
        self.proofs = StreamProofs(server_side, keys)
        self.on_confirmed = on_confirmed
        self.transport = None           # the local socket (a sharer's comes once confirmed)
        self.closing = False
        self.sending = False            # the local side's bytes may go
        self.held = []                  # plaintext that may not pass yet
        self.local_eof = False          # the local side ended: close_notify sent, or to send
        self.close_notify_received = False
        self.delivered_any = False
        self.stream_paused = False      # the stream asked: pause_reading()
        self.failed = None

    # -- the local socket ---------------------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport
        _set_nodelay(transport)
        transport.set_write_buffer_limits(0, 0)

    def data_received(self, data):
        if self.closing:
            return
        if not self.sending:
            self.held.append(bytes(data))       # until the sharer has proved the secret
            self._update_reading()
            return
        self._send(data)

    def eof_received(self):
        self.local_eof = True
        if self.sending and not self.closing:
            self._send_close_notify()
        return True                             # the other direction goes on: half-close

    def connection_lost(self, exc):
        self.closing = True
        self.stream.connection_lost(exc)

    def pause_writing(self):
        self.stream.pause_writing()

    def resume_writing(self):
        self.stream.resume_writing()

    # -- the transport of the stream ----------------------------------------------------
    def write(self, data):
        """TLS records from the far end."""
        if self.closing or self.failed:
            return
        self.tls.feed(data)
        try:
            if not self.tls.handshaken:
                self._shake()
            if self.tls.handshaken:
                self._read_plaintext()
        except EndToEndError as exc:
            self.fail(str(exc))

    def write_parts(self, header, payload):
        if header:
            self.write(header)
        self.write(payload)

    def can_write_eof(self):
        return True

    def write_eof(self):
        """The far end's stream EOF: fine only after its close_notify."""
        if self.check_end() and self.transport is not None:
            self._write_local_eof()

    def check_end(self):
        """The far end ended its direction: was that announced inside TLS?  Else the
        stream is reset (a truncation) and the answer is False."""
        if self.close_notify_received or self.closing or self.failed:
            return True
        self.fail("the stream was cut short on the way")
        return False

    def _write_local_eof(self):
        if self.transport.can_write_eof() and not self.transport.is_closing():
            try:
                self.transport.write_eof()
            except OSError:
                self.stream.reset("local connection reset")

    def close(self):
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    def set_write_buffer_limits(self, high=None, low=None):
        pass                                    # the local socket's are 0: see connection_made

    def pause_reading(self):
        self.stream_paused = True
        self._update_reading()

    def resume_reading(self):
        self.stream_paused = False
        self._update_reading()

    def _update_reading(self):
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self.stream_paused or (self.held and not self.sending):
            transport.pause_reading()
        else:
            transport.resume_reading()

    # -- TLS --------------------------------------------------------------------------
    def _flush(self):
        data = self.tls.records()
        if data and not self.stream.closed:
            self.stream.data_received(data)

    def _shake(self):
        try:
            done = self.tls.shake()
        finally:
            self._flush()
        if not done:
            return
        if self.proofs.keys is None:
            raise EndToEndError("the TLS handshake ended before the pairing")
        self._handshaken()

    def _send_proof(self):
        self.tls.send(self.proofs.ours(self.tls.channel_binding()))
        self._flush()

    def _read_plaintext(self):
        # The records that came together go to the local socket in one write, not a send()
        # each; those before an altered one were authentic, and its alert goes back.
        records, ended, error = self.tls.read()
        if ended:
            self.close_notify_received = True
        pieces = []
        for data in records:
            if self.closing or self.failed:
                break
            if not self.proofs.confirmed:
                data = self._take_proof(data)
            if data:
                pieces.append(data)
        if pieces:
            self._deliver(pieces[0] if len(pieces) == 1 else b"".join(pieces))
        self._flush()
        if error is not None:
            raise error

    def _take_proof(self, data):
        """The far end's proof, the first bytes of its plaintext; what follows."""
        data = self.proofs.take(data, self.tls.channel_binding())
        if self.proofs.confirmed:
            if not self.proofs.sent:
                self._send_proof()
            if self.on_confirmed is not None:
                self.on_confirmed(self)
            self._start_sending()
        return data

    def _start_sending(self):
        """The local side's bytes may go from now on."""
        self.sending = True

    def _release_held(self, write):
        held, self.held = self.held, []
        for data in held:
            write(data)

    def _deliver(self, data):
        self.delivered_any = True
        if self.transport is None:              # the sharer's target is not connected yet
            self.held.append(data)
            self.stream.pause_writing()         # no credit back until it is written
        else:
            self.transport.write(data)

    def _send(self, data):
        try:
            self.tls.send(data)
        except EndToEndError as exc:
            self.fail(str(exc))
            return
        self._flush()

    def _send_close_notify(self):
        self.tls.close_notify()
        self._flush()
        self.stream.eof_received()

    def fail(self, why):
        """An end-to-end check failed: one line, the stream reset, the local socket reset."""
        if self.failed:
            return
        self.failed = why
        self.stream.e2e_failed(why)


class ForwarderEndToEnd(EndToEndLayer):
    """A forwarder's end, the TLS client: its local connection starts the stream (the
    ClientHello rides the OPEN), and the user's bytes wait for the sharer's proof."""

    def __init__(self, stream, session=None, on_confirmed=None):
        EndToEndLayer.__init__(self, stream, False, on_confirmed=on_confirmed, session=session)

    def connection_made(self, transport):
        EndToEndLayer.connection_made(self, transport)
        self.stream.connection_made(self)
        try:
            self._shake()                       # the ClientHello, for the OPEN
        except EndToEndError as exc:
            self.fail(str(exc))

    def _handshaken(self):
        if self.tls.session_reused:
            # Only the sharer process that issued the ticket (on a stream it proved; one
            # ticket key for all its services) can resume it, so the forwarder need not wait
            # for its proof.  It still checks it, and that sharer delivers nothing before
            # the forwarder's own proof checks out for the service asked for.
            log.debug("stream %s: TLS session resumed", self.stream.label)
            self._send_proof()
            self._start_sending()

    def _start_sending(self):
        """What waited goes first."""
        if self.sending:
            return
        self.sending = True
        if self.transport is None:
            return
        self._release_held(self._send)
        if self.local_eof:
            self._send_close_notify()
        self._update_reading()


class SharerEndToEnd(EndToEndLayer):
    """A sharer's end, the TLS server: it proves itself first, and its target is dialled
    once the forwarder has; plaintext that comes before the target answers waits."""

    def __init__(self, stream, keys, on_confirmed):
        EndToEndLayer.__init__(self, stream, True, keys=keys, on_confirmed=on_confirmed)

    def connection_made(self, transport):
        """The target answered: what waited goes first."""
        EndToEndLayer.connection_made(self, transport)
        self._release_held(transport.write)
        if self.close_notify_received:
            self._write_local_eof()
        self._update_reading()
        if not transport.get_write_buffer_size():
            self.stream.resume_writing()

    def _handshaken(self):
        self._send_proof()

# ###########################################################################
# ### 5. TLS trust: a self-signed certificate, pins, known routers
# ###########################################################################

# The router can make its own RSA-2048 certificate (pure Python, `secrets` for
# randomness); clients verify it by CA, by pinned fingerprint, or by what they
# recorded the first time (like ssh's known_hosts).

_E = 65537
_SMALL_PRIMES = [p for p in range(3, 2000) if all(p % d for d in range(2, int(p ** 0.5) + 1))]


def _inv(a, m):  # modular inverse by extended Euclid (pow(a, -1, m) needs 3.8+)
    r0, r1, s0, s1 = a % m, m, 1, 0
    while r1:
        q = r0 // r1
        r0, r1, s0, s1 = r1, r0 - q * r1, s1, s0 - q * s1
    if r0 != 1:
        raise ValueError("not invertible")
    return s0 % m


def _is_probable_prime(n, rounds=40):  # Miller-Rabin; callers trial-divide first
    if n < 5 or n % 2 == 0:
        return n in (2, 3)
    d, s = n - 1, 0
    while not d & 1:
        d, s = d >> 1, s + 1
    for _ in range(rounds):
        x = pow(2 + secrets.randbelow(n - 3), d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def _gen_prime(bits):
    while True:
        # Top two bits set so that p*q has exactly 2*bits bits; odd.
        c = secrets.randbits(bits) | (3 << (bits - 2)) | 1
        if all(c % sp for sp in _SMALL_PRIMES) and math.gcd(_E, c - 1) == 1 and _is_probable_prime(c):
            return c


def _der(tag, body):
    n = len(body)
    if n < 0x80:
        return bytes([tag, n]) + body
    ln = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(ln)]) + ln + body


def _int(n):
    return _der(0x02, n.to_bytes(((n + (n < 0)).bit_length() + 8) // 8, "big", signed=True))


def _oid(dotted):
    arcs = [int(a) for a in dotted.split(".")]
    out = bytearray()
    for a in [40 * arcs[0] + arcs[1]] + arcs[2:]:
        chunk = [a & 0x7F]
        while a > 0x7F:
            a >>= 7
            chunk.append(0x80 | (a & 0x7F))
        out += bytes(reversed(chunk))
    return _der(0x06, bytes(out))


def _seq(*items):
    return _der(0x30, b"".join(items))


def _time(dt):  # UTCTime before 2050, GeneralizedTime from 2050 on (RFC 5280 4.1.2.5)
    s = dt.strftime("%Y%m%d%H%M%SZ").encode("ascii")
    return _der(0x17, s[2:]) if dt.year < 2050 else _der(0x18, s)


def _string(s):  # PrintableString when the charset allows, else UTF8String
    printable = re.fullmatch(r"[A-Za-z0-9 '()+,\-./:=?]*", s)
    return _der(0x13 if printable else 0x0C, s.encode("utf-8"))


def _pem(label, der):
    b64 = base64.b64encode(der).decode("ascii")
    body = "\n".join(b64[i:i + 64] for i in range(0, len(b64), 64))
    return ("-----BEGIN %s-----\n%s\n-----END %s-----\n" % (label, body, label)).encode("ascii")


def _ext(oid, value, critical=False):
    return _seq(_oid(oid), b"\x01\x01\xff" if critical else b"", _der(0x04, value))


def _rsa_key():
    """A new RSA-2048 key: (n, d, p, q, dp, dq, qinv)."""
    p, q = _gen_prime(1024), _gen_prime(1024)
    while q == p:  # astronomically unlikely
        q = _gen_prime(1024)
    n, lam = p * q, (p - 1) * (q - 1) // math.gcd(p - 1, q - 1)
    d = _inv(_E, lam)
    return n, d, p, q, d % (p - 1), d % (q - 1), _inv(q, p)


def _rsa_public(key):
    return _seq(_int(key[0]), _int(_E))


def _rsa_sign(key, data):
    """RSASSA-PKCS1-v1_5 / SHA-256, signed with CRT, verified before use."""
    n, _d, p, q, dp, dq, qinv = key
    t = bytes.fromhex("3031300d060960864801650304020105000420") + hashlib.sha256(data).digest()
    m = int.from_bytes(b"\x00\x01" + b"\xff" * (256 - 3 - len(t)) + b"\x00" + t, "big")
    m1, m2 = pow(m, dp, p), pow(m, dq, q)
    s = m2 + q * ((qinv * (m1 - m2)) % p)
    if pow(s, _E, n) != m:
        raise RuntimeError("RSA signature self-check failed")
    return s.to_bytes(256, "big")


def _certificate(common_name, key, issuer=None, hosts=None, valid=None, days=3650):
    """A certificate's DER.  issuer: (common name, key) of the CA that signs it, or None
    for a self-signed CA/server certificate.  hosts: the names and addresses it is for
    (default: common_name, localhost, 127.0.0.1, ::1).  valid: (not before, not after)
    datetimes (default: from a day ago for `days` days)."""
    if hosts is None:
        hosts = ["localhost", "127.0.0.1", "::1", common_name]
    san = []                                    # dNSName [2], iPAddress [7]
    for host in hosts:
        try:
            name = _der(0x87, ipaddress.ip_address(host).packed)
        except ValueError:  # not an IP: a DNS name if it looks like an ASCII host name
            if not re.fullmatch(r"[A-Za-z0-9_*.-]+", host):
                continue
            name = _der(0x82, host.lower().encode("ascii"))
        if name not in san:
            san.append(name)
    ski = hashlib.sha1(_rsa_public(key)).digest()
    issuer_name, issuer_key = issuer or (common_name, key)
    aki = hashlib.sha1(_rsa_public(issuer_key)).digest()
    spki = _seq(_seq(_oid("1.2.840.113549.1.1.1"), b"\x05\x00"), _der(0x03, b"\x00" + _rsa_public(key)))
    exts = _seq(
        _ext("2.5.29.19", _seq(b"" if issuer else b"\x01\x01\xff"), True),   # basicConstraints CA
        _ext("2.5.29.15", _der(0x03, b"\x07\x80" if issuer else b"\x02\x84"), True),  # keyUsage:
        #   digitalSignature, and keyCertSign for a CA
        _ext("2.5.29.17", _seq(*san)),                     # subjectAltName
        _ext("2.5.29.14", _der(0x04, ski)),                # subjectKeyIdentifier
        _ext("2.5.29.35", _seq(_der(0x80, aki))),          # authorityKeyIdentifier
    )
    if valid is None:
        now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
        valid = (now - datetime.timedelta(days=1), now + datetime.timedelta(days=days))
    sig_alg = _seq(_oid("1.2.840.113549.1.1.11"), b"\x05\x00")  # sha256WithRSAEncryption
    serial = secrets.randbits(127) | (1 << 126)  # positive, 127 bits -> 16 DER bytes
    tbs = _seq(_der(0xA0, _int(2)), _int(serial), sig_alg, _cn(issuer_name),
               _seq(_time(valid[0]), _time(valid[1])), _cn(common_name), spki, _der(0xA3, exts))
    return _seq(tbs, sig_alg, _der(0x03, b"\x00" + _rsa_sign(issuer_key, tbs)))


def _cn(common_name):
    return _seq(_der(0x31, _seq(_oid("2.5.4.3"), _string(common_name))))


def _rsa_key_pem(key):
    n, d, p, q, dp, dq, qinv = key
    return _pem("RSA PRIVATE KEY", _seq(*[_int(x) for x in (0, n, _E, d, p, q, dp, dq, qinv)]))  # PKCS#1


def make_self_signed_cert(common_name, days=3650):
    """Return (cert_pem, key_pem) for a new RSA-2048 self-signed CA/server cert."""
    key = _rsa_key()
    return _pem("CERTIFICATE", _certificate(common_name, key, days=days)), _rsa_key_pem(key)


def cert_fingerprint(cert_der):
    """SHA-256 of a certificate's DER as 'AB:CD:...' (what the router prints)."""
    return _colons(hashlib.sha256(cert_der).hexdigest())


def normalize_fingerprint(text):
    digits = "".join(c for c in str(text) if c not in ": \t").lower()
    if len(digits) != 64 or any(c not in "0123456789abcdef" for c in digits):
        raise MindmeldError("bad certificate fingerprint %r: expected 64 hex digits "
                            "(colons allowed), as the router prints at start-up" % text)
    return digits


def default_state_dir():
    """Where keys, certificates and known_routers live ($MINDMELD_STATE_DIR overrides)."""
    if os.environ.get("MINDMELD_STATE_DIR"):
        return os.environ["MINDMELD_STATE_DIR"]
    if os.name == "nt":
        base = os.environ.get("APPDATA") or os.path.expanduser("~")
    else:
        base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "mindmeld")


def _require_ssl():
    if ssl is None:
        raise MindmeldError("this Python has no ssl module, so TLS is not available here")


def router_tls_context(cert_file=None, key_file=None, state_dir=None, common_name="mindmeld-router"):
    """A server context: from files, or from a self-signed pair made once under state_dir.

    Returns (context, fingerprint)."""
    _require_ssl()
    if bool(cert_file) != bool(key_file):
        raise MindmeldError("--tls-cert and --tls-key go together")
    if not cert_file:
        state_dir = state_dir or default_state_dir()
        cert_file = os.path.join(state_dir, "router-cert.pem")
        key_file = os.path.join(state_dir, "router-key.pem")
        if not (os.path.exists(cert_file) and os.path.exists(key_file)):
            log.info("router: making a self-signed TLS certificate in %s (once)", state_dir)
            cert_pem, key_pem = make_self_signed_cert(common_name)
            try:
                os.makedirs(state_dir, mode=0o700, exist_ok=True)
                fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(key_pem)
                with open(cert_file, "wb") as f:
                    f.write(cert_pem)
            except OSError as exc:
                raise MindmeldError("cannot write the TLS certificate under %s: %s (choose another "
                                    "place with --state-dir)" % (state_dir, exc.strerror or exc))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _tls_policy(context)
    try:
        context.load_cert_chain(cert_file, key_file)
        with open(cert_file) as f:
            der = ssl.PEM_cert_to_DER_cert(f.read())
    except (OSError, ValueError, ssl.SSLError) as exc:
        raise MindmeldError("cannot load the TLS certificate %s and key %s: %s"
                            % (cert_file, key_file, getattr(exc, "strerror", None) or exc))
    return context, cert_fingerprint(der)


def _tls_policy(context):
    """TLS 1.2 or newer, and no renegotiation (OpenSSL 1.1.0h and newer can refuse it)."""
    context.options |= SSL_OP_NO_RENEGOTIATION
    if SSL_HAS_MINIMUM_VERSION:
        context.minimum_version = ssl.TLSVersion.TLSv1_2
    else:  # 3.6
        context.options |= ssl.OP_NO_SSLv2 | ssl.OP_NO_SSLv3 | ssl.OP_NO_TLSv1 | ssl.OP_NO_TLSv1_1


def _der_items(data):
    """The (tag, body) pairs that make up a DER body, in order."""
    items, i = [], 0
    while i < len(data):
        if i + 2 > len(data):
            raise ValueError("truncated DER")
        tag, size, i = data[i], data[i + 1], i + 2
        if size & 0x80:
            width, size = size & 0x7F, int.from_bytes(data[i:i + (size & 0x7F)], "big")
            i += width
        if i + size > len(data):
            raise ValueError("truncated DER")
        items.append((tag, data[i:i + size]))
        i += size
    return items


def cert_validity(cert_der):
    """(not before, not after) of a certificate, as aware UTC datetimes; ValueError if unreadable."""
    (_, cert), = _der_items(cert_der)
    tbs = _der_items(_der_items(cert)[0][1])
    first = 1 if tbs[0][0] == 0xA0 else 0           # [0] version, when present
    times = []
    for tag, body in _der_items(tbs[first + 3][1]):
        text = body.decode("ascii")
        if tag == 0x17:                             # UTCTime: YY from 1950 to 2049
            text = ("19" if text[:2] >= "50" else "20") + text
        elif tag != 0x18:
            raise ValueError("not a time")
        times.append(datetime.datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(
            tzinfo=datetime.timezone.utc))
    not_before, not_after = times
    return not_before, not_after


TRUST_ON_FIRST_USE = "tofu"
RECORD_VERIFIED = "record"      # a CA vouched for it: remember it all the same

# OpenSSL's verify codes that mean only "no CA we trust vouches for it": then, and only
# then, trust on first use may follow.  Anything else (wrong host name, expired, not yet
# valid, a bad signature) is refused.
X509_NO_TRUSTED_ISSUER = {
    2,      # X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT
    18,     # X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT
    19,     # X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN
    20,     # X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    21,     # X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE
}


class TlsOptions:
    """How a client checks the router: CA file, pinned fingerprint, system CAs then
    trust on first use, or not at all (--tls-insecure).  Without a CA file or a pin, every
    router is recorded in known_routers the first time, however it was verified, and a
    different certificate is refused from then on."""

    def __init__(self, ca_file=None, fingerprint=None, insecure=False, known_routers=None):
        _require_ssl()
        self.ca_file = ca_file
        self.fingerprint = normalize_fingerprint(fingerprint) if fingerprint else None
        self.insecure = insecure
        self.known_routers = known_routers or os.path.join(default_state_dir(), "known_routers")
        if insecure:
            log.warning("warning: --tls-insecure: the router's certificate is NOT checked; anyone "
                        "on the path can read and change this traffic")

    def attempts(self, router):
        """[(ssl context, pin)]: try in order; pin is a fingerprint, TRUST_ON_FIRST_USE or None."""
        if self.insecure:
            return [(self._unverified(), None)]
        if self.fingerprint:
            return [(self._unverified(), self.fingerprint)]
        if self.ca_file:
            return [(self._verified(self.ca_file), None)]
        known = self.recorded(router)
        if known:
            return [(self._unverified(), known)]
        return [(self._verified(None), RECORD_VERIFIED), (self._unverified(), TRUST_ON_FIRST_USE)]

    def _verified(self, ca_file):
        try:
            context = ssl.create_default_context(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise PermanentError("cannot load the CA file %s: %s" % (ca_file, getattr(exc, "strerror", None) or exc))
        _tls_policy(context)
        return context

    def _unverified(self):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        _tls_policy(context)
        return context

    def recorded(self, router):
        """The fingerprint known_routers holds for this router, or None.  A file or line that
        cannot be read is refused, never skipped: skipping would trust on first use again."""
        path = self.known_routers
        try:
            with open(path, "rb") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise PermanentError("cannot read %s: %s (fix or remove it)" % (path, exc.strerror or exc))
        found = None
        for number, raw in enumerate(lines, 1):
            try:
                line = raw.decode("utf-8").strip()
                if not line or line.startswith("#"):
                    continue
                name, fingerprint = line.split()
                fingerprint = normalize_fingerprint(fingerprint)
            except (ValueError, MindmeldError):     # UnicodeDecodeError is a ValueError
                raise PermanentError("%s line %d is damaged: expected ROUTER SHA256-FINGERPRINT; "
                                     "fix or delete that line" % (path, number))
            if name == router and found is None:
                found = fingerprint
        return found

    def _record(self, router, der):
        try:
            os.makedirs(os.path.dirname(self.known_routers) or ".", exist_ok=True)
            with open(self.known_routers, "a") as f:
                f.write("%s %s\n" % (router, cert_fingerprint(der)))
        except OSError as exc:
            raise PermanentError("cannot record the router's certificate in %s: %s (choose another "
                                 "place with --state-dir)" % (self.known_routers, exc.strerror or exc))

    def check(self, router, pin, der):
        """Called with the router's certificate before anything is sent; raises on mismatch."""
        seen = hashlib.sha256(der).hexdigest()
        if pin is None or pin == seen:
            return
        if pin == RECORD_VERIFIED:
            self._record(router, der)
            log.info("the router at %s is verified by a CA: certificate SHA256 %s recorded in %s "
                     "(a different certificate will be refused)", router, cert_fingerprint(der),
                     self.known_routers)
            return
        if pin == TRUST_ON_FIRST_USE:
            self._refuse_out_of_date(router, der)
            self._record(router, der)
            log.warning("trusting the router at %s on first use: certificate SHA256 %s "
                        "(recorded in %s; pin it with --tls-fingerprint)",
                        router, cert_fingerprint(der), self.known_routers)
            return
        if pin == self.fingerprint:
            raise PermanentError("the router at %s presented certificate SHA256 %s, but "
                                 "--tls-fingerprint expects %s" % (router, cert_fingerprint(der), _colons(pin)))
        raise PermanentError(
            "the router at %s presented certificate SHA256 %s, but %s recorded %s: if the router's "
            "certificate was replaced on purpose, delete its line from that file; otherwise someone "
            "may be intercepting the connection" % (router, cert_fingerprint(der), self.known_routers,
                                                    _colons(pin)))

    @staticmethod
    def _refuse_out_of_date(router, der):
        """Never trust on first use a certificate that is not valid now (Python 3.6 cannot
        tell an expired CA-signed certificate from one no CA vouches for)."""
        try:
            not_before, not_after = cert_validity(der)
        except (ValueError, IndexError):                # UnicodeError is a ValueError
            raise PermanentError("the router at %s presented a certificate that cannot be read "
                                 "(pin it with --tls-fingerprint if it is the right one)" % router)
        now = datetime.datetime.now(datetime.timezone.utc)
        if now > not_after:
            raise PermanentError("the router at %s presented a certificate that expired on %s: "
                                 "refused (check this machine's clock, or renew the router's "
                                 "certificate)" % (router, not_after.strftime("%Y-%m-%d %H:%M UTC")))
        if now < not_before:
            raise PermanentError("the router at %s presented a certificate that is not yet valid "
                                 "(from %s): refused (check this machine's clock and the router's)"
                                 % (router, not_before.strftime("%Y-%m-%d %H:%M UTC")))


def _colons(hexdigits):
    return ":".join(hexdigits[i:i + 2] for i in range(0, len(hexdigits), 2)).upper()


# ###########################################################################
# ### 6. The router
# ###########################################################################

# ### 6a. Front door, session, relayed streams, registry

class FrontDoor:
    """What arrives on a router connection before it is a mindmeld session: the
    preamble, or an HTTP request (health check, a WebSocket upgrade, anything else)."""

    def __init__(self, peer):
        self.peer = peer
        self.router = peer.router

    def sniff(self):
        """Look at the bytes so far: True once the preamble is consumed and frames follow."""
        peer = self.peer
        first = peer.frames.peek()
        try:
            kind = classify_preamble(first)
        except PreambleError as exc:
            self._refuse(exc, first)
            return False
        if kind == "http":
            if b"\r\n\r\n" in first or len(first) > HTTP_HEAD_MAX:
                peer.phase = "http"
                self._answer_http(first)
            else:
                peer.frames.need = min(max(2 * len(first), 1024), HTTP_HEAD_MAX + 1)
            return False
        if kind is None:
            return False
        peer.frames.skip(len(PREAMBLE))
        return True

    def _refuse(self, exc, first):
        peer = self.peer
        peer.router.stranger_log.warning(peer.source, "router: %s sent %s; closing", peer.peer, exc)
        peer.phase = "refused"
        peer.drop_cause = "version" if getattr(exc, "version", None) is not None else "not_mindmeld"
        if getattr(exc, "version", None) is not None:     # frames look alike in every version
            peer.close("version", "this router speaks mindmeld protocol %d, the client %d: use "
                                  "the same version of mindmeld.py on both" % (PROTOCOL_VERSION, exc.version))
            return
        if not first.startswith(b"\x16"):
            peer.send(b"mindmeld router: this port speaks the mindmeld protocol "
                      b"(python3 mindmeld.py forward/share/list --router HOST:PORT)\n")
        peer.close()

    def _answer_http(self, request):
        head = request[:request.find(b"\r\n\r\n") + 4] if b"\r\n\r\n" in request else request
        line, headers = parse_http_head(head)
        parts = line.split()
        path = parts[1].split("?")[0] if len(parts) > 1 else "/"
        log.debug("router: HTTP %s from %s", printable(line[:80]), self.peer.peer)
        # ws_path, or ws_path/NAME: a front that hashes the path sends each name to one router
        prefix = self.router.ws_path.rstrip("/") + "/"
        ws_path = path == self.router.ws_path or (path.startswith(prefix) and valid_name(path[len(prefix):]))
        if ws_path and "websocket" in headers.get("upgrade", "").lower():
            if self._upgrade_websocket(parts[0], headers, request[len(head):]):
                return
            status, body = "400 Bad Request", "a WebSocket upgrade needs GET, a key and version 13\n"
        elif ws_path:
            status, body = "426 Upgrade Required", "this path takes a WebSocket upgrade\n"
        elif path == "/healthz":
            status, body = "200 OK", "ok\n"
        elif path in STATUS_PATHS:
            self.peer.send(self.router.monitor.http_response(parts[0], path, headers, self.peer.transport))
            self.peer.close()
            return
        else:
            status, body = "404 Not Found", "not found: this is a mindmeld router\n"
        body = body.encode()
        self.peer.send(("HTTP/1.1 %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
                        "Content-Length: %d\r\nConnection: close\r\n\r\n" % (status, len(body))
                        ).encode() + (b"" if parts[:1] == ["HEAD"] else body))
        self.peer.close()

    def _upgrade_websocket(self, method, headers, leftover):
        """Answer 101 and put the session inside a WebSocket; False if the request is bad."""
        key = headers.get("sec-websocket-key", "")
        if not all(32 < ord(c) < 127 for c in key):
            key = ""                            # not a base64 key: a 400
        if method != "GET" or not key or headers.get("sec-websocket-version") != "13":
            return False
        peer = self.peer
        peer.send(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                   "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n"
                   % ws_accept_key(key)).encode())
        peer.frames.skip(peer.frames.buffered)
        peer.transport = WebSocketLayer(peer, peer.transport, client_side=False)
        peer.sock = None
        peer.phase = "preamble"                 # the mindmeld preamble comes inside
        if leftover:
            peer.transport.data_received(leftover)
        return True


class Leg:
    """The router's end of a relayed stream on one peer's link, and what it may cost:
    the window toward that peer is its initial credit plus the growth the peer granted."""
    __slots__ = ("peer", "end", "other", "relay", "received", "initial", "growth", "unacked")

    def __init__(self, peer, end, relay):
        self.peer, self.end, self.relay = peer, end, relay
        self.other = None
        self.received = 0               # DATA payload bytes from this leg's peer
        self.initial = end.credit       # the window toward this peer when the stream opened
        self.growth = 0                 # what the peer added to it since (WINDOW beyond returns)
        self.unacked = 0                # bytes sent to the peer that no WINDOW has returned yet
        peer.legs[end.id] = self
        peer.windows.opened(self)
        peer.sharing_changed()


class WindowLedger:
    """What all peers' streams may make the router hold: the first windows of every
    stream (GLOBAL_INITIAL_BUDGET) and the growth promised to peers (GLOBAL_GROWTH_BUDGET)."""
    __slots__ = ("initial", "promised")

    def __init__(self):
        self.initial = self.promised = 0

    def promise_growth(self):
        """A new peer's window_budget: 32 MiB while there is that much left, then what is."""
        budget = max(0, min(PEER_WINDOW_BUDGET, GLOBAL_GROWTH_BUDGET - self.promised))
        self.promised += budget
        return budget


class PeerWindows:
    """What one peer's streams may make the router hold for it: the windows toward it
    (initial credit plus the growth it granted).  New streams get a full window while
    the initial windows stay within PEER_INITIAL_BUDGET, then MIN_STREAM_WINDOW, and none
    (refused, busy) once all peers' first windows reach GLOBAL_INITIAL_BUDGET.  Growth
    beyond the window_budget it was told (what an honest peer's own budget allows) is its
    error."""
    __slots__ = ("ledger", "initial", "growth", "ended", "growth_budget")

    def __init__(self, ledger):
        self.ledger = ledger
        self.initial = self.growth = 0
        self.ended = 0                  # windows of streams that ended while data still queued
        self.growth_budget = 0          # told in HELLO or AUTH, once it is a session

    def promise_growth(self):
        self.growth_budget = self.ledger.promise_growth()
        return self.growth_budget

    def next_window(self):
        """The first window of a new stream toward this peer, or None: the router is full."""
        left = GLOBAL_INITIAL_BUDGET - self.ledger.initial
        if self.initial + INITIAL_WINDOW <= PEER_INITIAL_BUDGET and left >= 2 * INITIAL_WINDOW:
            return INITIAL_WINDOW
        return MIN_STREAM_WINDOW if left >= 2 * MIN_STREAM_WINDOW else None

    def opened(self, leg):
        self.initial += leg.initial
        self.ledger.initial += leg.initial

    def may_grow(self, growth):
        if self.growth + growth > self.growth_budget:
            raise ProtocolError("windows grown by more than the %d bytes of window_budget over "
                                "all streams" % self.growth_budget, "flow-control")

    def grew(self, leg, growth):
        self.may_grow(growth)
        leg.growth += growth
        self.growth += growth

    def closed(self, leg, queue_full):
        self.initial -= leg.initial
        self.ledger.initial -= leg.initial
        self.growth -= leg.growth
        if queue_full:                  # its bytes may still be queued: counted until drained
            self.ended += leg.initial + leg.growth

    def release(self):
        """The peer is gone: its promised growth is free for others."""
        self.ledger.promised -= self.growth_budget
        self.growth_budget = 0

    @property
    def total(self):
        return self.initial + self.growth + self.ended


def _router_checked_e2e(ftype, info):
    """An OPEN's or OPEN_OK's e2e field, checked; a malformed one is its sender's error."""
    try:
        return checked_e2e(ftype, info)
    except StreamError as exc:
        raise ProtocolError(str(exc))


class RelayedStream:
    """One stream between an opener and a sharer.  It owns both legs, so every frame
    that crosses the router, and every edit to both sides, happens here."""
    __slots__ = ("router", "registration", "opener", "acceptor")

    def __init__(self, router, registration, opener, opener_id, sharer, to_opener, to_sharer,
                 grow=0):
        # The router chooses each direction's first window, within what it may hold for the
        # peer that direction leads to (PeerWindows); both ends learn it from OPEN and OPEN_OK.
        # The opener may grow its own at once (`grow`, its warm start), as a WINDOW would.
        self.router, self.registration = router, registration
        self.opener = Leg(opener, StreamEnd(opener_id, OPEN_RECEIVED, ReceiveWindow(None, to_sharer),
                                            credit=to_opener), self)
        if grow:
            opener.windows.grew(self.opener, grow)
            self.opener.end.credit += grow
        self.acceptor = Leg(sharer, StreamEnd(sharer.ids.allocate(), OPEN_SENT,
                                              ReceiveWindow(None, to_opener + grow), credit=to_sharer),
                            self)
        self.opener.other, self.acceptor.other = self.acceptor, self.opener
        registration.streams += 1
        registration.opened += 1
        router.relayed += 1
        router.monitor.streams_opened += 1

    def open(self, info):
        """Pass the OPEN on to the sharer, with who asked: only fields already checked
        (on_open), so what grows on the way (peer, windows) cannot push it over MAX_CONTROL."""
        forwarded = {k: v for k, v in info.items() if k in ("service", "data", "e2e") and v is not None}
        acceptor = self.acceptor.end
        forwarded.update(peer=self.opener.peer.peer, credit=acceptor.window.size,
                         window=acceptor.credit)
        self.acceptor.peer.send_json(OPEN, acceptor.id, forwarded)

    # -- frames from one leg, passed to the other ---------------------------------
    def data(self, leg, payload):
        n = len(payload)
        leg.end.recv_data(n)
        other = leg.other               # its credit mirrors leg's window, checked just now
        other.end.credit -= n
        other.unacked += n
        other.peer.relay_data(other.end.id, payload)
        leg.received += n

    def window(self, leg, payload):
        increment = leg.end.recv_window(payload)
        if increment <= leg.unacked:
            leg.unacked -= increment            # credit returned for bytes delivered
        else:                                   # the peer grew its window: within its budget
            leg.peer.windows.grew(leg, increment - leg.unacked)
            leg.unacked = 0
        other = leg.other
        other.peer.send(other.end.grant(increment))

    def eof(self, leg, _payload):
        leg.end.receive(EOF)
        other = leg.other
        other.peer.send_after_data(other.end.id, other.end.send(EOF))
        if leg.end.state == CLOSED:
            self.end()

    def reset(self, leg, payload):
        self.abort(leg, leg.end.recv_reset(payload), reset=True)

    def open_ok(self, leg, payload):
        leg.end.receive(OPEN_OK)
        info = decode_json(OPEN_OK, payload) if payload else {}
        e2e = _router_checked_e2e(OPEN_OK, info)
        accept = {"e2e": e2e} if e2e is not None else {}
        other = leg.other               # the opener's leg: credit is what the router may send it
        accept.update(credit=other.end.window.size, window=other.end.credit)
        if other.growth:                # its OPEN's grow: no WINDOW comes from it before OPEN_OK
            accept["grow"] = other.growth
        other.peer.send(other.end.send_json(OPEN_OK, accept))

    def open_refused(self, leg, payload):
        leg.end.receive(OPEN_REFUSED)
        info = decode_json(OPEN_REFUSED, payload)
        refusal = {"reason": short_reason(info.get("reason", "refused"))}
        if info.get("code") in ("busy", "e2e-rekey"):     # the codes a sharer sets
            refusal["code"] = info["code"]
        other = leg.other
        other.peer.send(other.end.send_json(OPEN_REFUSED, refusal))
        self.router.monitor.stream_refused("sharer")
        self.end()

    # -- ending ---------------------------------------------------------------------
    def abort(self, gone, reason, reset=False):
        """`gone`'s side ended the stream (`reset`: it sent RESET; else its link or name
        went): RESET the other.  After a RESET nothing queued either way is worth sending;
        else what `gone` sent before it went (DATA, EOF) is still delivered, then the RESET."""
        other = gone.other
        if reset:
            gone.peer.discard_queued(gone.end.id)
            other.peer.discard_queued(other.end.id)
        other.peer.send_after_data(other.end.id, other.end.send_reset(reason))
        self.end()

    def end(self):
        """Both legs are done: forget them, and close peers that waited for their last stream."""
        opener, acceptor = self.opener, self.acceptor
        if opener.peer.legs.pop(opener.end.id, None) is None:
            return                              # already ended
        acceptor.peer.legs.pop(acceptor.end.id, None)
        for leg in (opener, acceptor):
            leg.peer.windows.closed(leg, leg.peer.write_paused or leg.end.id in leg.peer.outbox)
        self.router.monitor.relay_ended(self)
        self.registration.streams -= 1
        self.router.relayed -= 1
        for peer in (opener.peer, acceptor.peer):
            peer.sharing_changed()
            if peer.draining and not peer.legs:
                peer.close()
        self.router.stream_ended()


class Registration:
    __slots__ = ("name", "peer", "owner", "verifier", "since", "streams", "opened", "relayed")

    def __init__(self, name, peer, owner, verifier):
        self.name, self.peer, self.owner, self.verifier = name, peer, owner, verifier
        self.since = time.time()
        self.streams = 0
        self.opened = 0
        self.relayed = [0, 0]           # bytes of its ended streams, to and from the sharer


def source_of(transport):
    """Who a connection comes from, for per-source limits: its IPv4 address, or its IPv6 /64
    (one host or site usually holds a whole /64)."""
    peer = transport.get_extra_info("peername") if transport is not None else None
    try:
        address = ipaddress.ip_address(peer[0].split("%")[0])
    except (TypeError, ValueError, IndexError):
        return "?"
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.version == 6:
        return str(ipaddress.ip_network("%s/64" % address, strict=False))
    return str(address)


class PendingHandshakes:
    """Connections that have not finished the handshake, by source.  Past the limit the
    source holding the most loses its oldest: a flood from one place cannot keep anyone
    else out, and a burst of honest peers is not turned away while there is room."""

    def __init__(self):
        self.by_source = {}             # source -> OrderedDict of peers, oldest first
        self.count = 0
        self.warned = set()             # sources already logged (until they have none left)

    def __len__(self):
        return self.count

    def started(self, peer):
        peer.source = source = source_of(peer.transport)
        self.by_source.setdefault(source, collections.OrderedDict())[peer] = None
        self.count += 1
        limit = self.limit()
        if self.count > limit:
            heaviest = max(self.by_source, key=lambda s: len(self.by_source[s]))
            self._evict(heaviest, "more than %d unfinished handshakes in all; %s has the most"
                        % (limit, heaviest))

    @staticmethod
    def limit():
        """MAX_PENDING_HANDSHAKES, or less where descriptors are fewer (read each time: an
        operator may raise the limit of a running router with prlimit)."""
        descriptors = _descriptor_limit()
        if descriptors is None:
            return MAX_PENDING_HANDSHAKES
        return max(1, min(MAX_PENDING_HANDSHAKES, int(descriptors * HANDSHAKE_FD_SHARE)))

    def finished(self, peer):
        pending = self.by_source.get(peer.source)
        if pending is not None and pending.pop(peer, False) is None:
            self.count -= 1
            if not pending:
                del self.by_source[peer.source]
                self.warned.discard(peer.source)

    def _evict(self, source, why):
        oldest = next(iter(self.by_source[source]))
        (log.debug if source in self.warned else log.warning)(
            "router: %s; dropping the oldest of them (logged once per flood)", why)
        self.warned.add(source)
        oldest.drop_cause = "limits"
        oldest.deadline.done()
        oldest.abort("too many unfinished handshakes")


class StrangerLog:
    """Warnings about connections that failed the handshake, at most STRANGER_LOG_BURST
    a minute per source: a flood of strangers cannot flood the operator's log.  What is
    held back is counted and said in one line when the source's minute is over."""

    def __init__(self):
        self.sources = {}       # source -> [warnings this minute, held back, timer]

    def warning(self, source, message, *args):
        entry = self.sources.get(source)
        if entry is None:
            if len(self.sources) >= STRANGER_LOG_SOURCES and source != "other sources":
                return self.warning("other sources", message, *args)
            entry = self.sources[source] = [0, 0, _get_loop().call_later(
                STRANGER_LOG_WINDOW, self._minute_over, source)]
        entry[0] += 1
        if entry[0] <= STRANGER_LOG_BURST:
            log.warning(message, *args)
            return
        if not entry[1]:
            log.warning("router: more than %d failed handshakes from %s within %g s; counting "
                        "the rest, not logging them", STRANGER_LOG_BURST, source, STRANGER_LOG_WINDOW)
        entry[1] += 1

    def _minute_over(self, source):
        held = self.sources.pop(source)[1]
        if held:
            log.warning("router: %d more failed handshakes from %s were not logged", held, source)

    def close(self):
        for entry in self.sources.values():
            entry[2].cancel()
        self.sources.clear()


class HandshakeDeadline:
    """A peer's unfinished handshake: the timer that drops it after the router's
    handshake_timeout, and its place in the router's PendingHandshakes."""

    def __init__(self, peer):
        self.peer = peer
        self.timer = None               # set from connection_made; kept once it has fired

    def start(self):
        peer = self.peer
        self.timer = peer.loop.call_later(peer.router.handshake_timeout, self._expired)
        peer.router.handshakes.started(peer)

    def _expired(self):
        peer = self.peer
        peer.router.stranger_log.warning(
            peer.source, "router: %s did not complete the handshake within %g s; dropping it",
            peer.peer, peer.router.handshake_timeout)
        peer.drop_cause = "timeout"
        peer.close("timeout", "handshake not completed in time")

    def done(self):
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
            self.peer.router.handshakes.finished(self.peer)


# Stream frames the router relays: (frame type, RelayedStream method).
RELAYED_FRAMES = ((WINDOW, "window"), (EOF, "eof"), (RESET, "reset"), (OPEN_OK, "open_ok"),
                  (OPEN_REFUSED, "open_refused"))


def scheduling_order(queues, sizes):
    """Whose turn it is, in order: streams with at most a quantum queued (short answers)
    first, then the others in the queues' own order (each turn sends one to the back)."""
    short = [stream_id for stream_id in queues if sizes[stream_id] <= SCHEDULER_QUANTUM]
    if not short:
        return list(queues)
    return short + [stream_id for stream_id in queues if sizes[stream_id] > SCHEDULER_QUANTUM]


class WatchedWrites:
    """The router's side of writing to one peer: what it may make us queue (its streams'
    windows, PeerWindows, and some control frames) and whether it reads at all.  A mixin
    of RouterPeer, so the data path stays one method call."""


    # Toward a peer on a long link (short links write at once, as the queue there is short):
    # while the transport is paused, DATA waits here, one queue per stream (`outbox`), and
    # leaves in turns when it resumes: streams with little queued first, then the rest one
    # frame_max at a time (deficit round-robin with frames cut to the quantum: 16 KiB on a
    # long link).  So a short answer waits behind at most one quantum of each bulk stream,
    # not behind the whole backlog.  Control frames skip the queues; a stream's EOF
    # follows its own data, and a RESET drops what its stream had queued.

    def empty_outbox(self):
        self.outbox = collections.OrderedDict()     # stream id -> deque of (is DATA, bytes)
        self.outbox_sizes = {}          # stream id -> DATA bytes in its queue
        self.outbox_bytes = 0

    def relay_data(self, stream_id, payload):
        if self.closing or not payload:     # an empty DATA says nothing, and must not cost
            return
        if self.outbox or (self.long_link and (self.write_paused or len(payload) > self.frame_max)):
            self._enqueue_data(stream_id, payload)
            if self.write_paused:
                self._check_backlog()
            else:
                self.pump()
            return
        _write_parts(self.transport, self.sock, HEADER.pack(len(payload), DATA, 0, stream_id), payload)
        self.written += HEADER_SIZE + len(payload)
        if self.write_paused:
            self._check_backlog()

    def send_after_data(self, stream_id, frame):
        """A stream's frame that must not pass its queued DATA (EOF)."""
        if frame and stream_id in self.outbox and not self.closing:
            self._enqueue(stream_id, (False, frame), 0)
        else:
            self.send(frame)

    def discard_queued(self, stream_id):
        """The stream was reset: what it still had queued here is not worth sending."""
        queue = self.outbox.pop(stream_id, None)
        if queue is not None:
            self.outbox_bytes -= self.outbox_sizes.pop(stream_id)

    def _enqueue(self, stream_id, item, n):
        queue = self.outbox.get(stream_id)
        if queue is None:
            queue = self.outbox[stream_id] = collections.deque()
            self.outbox_sizes[stream_id] = 0
        queue.append(item)
        self.outbox_sizes[stream_id] += n
        self.outbox_bytes += n

    def _enqueue_data(self, stream_id, payload):
        """DATA joins the stream's last queued DATA, so that many small frames hold what
        their bytes take, not a queue entry each."""
        queue = self.outbox.get(stream_id)
        if queue and queue[-1][0]:
            queue[-1][1].extend(payload)
            self.outbox_sizes[stream_id] += len(payload)
            self.outbox_bytes += len(payload)
        else:
            self._enqueue(stream_id, (True, bytearray(payload)), len(payload))

    def pump(self):
        """Write queued frames in turns until the transport pauses or the queues are empty."""
        outbox = self.outbox
        while outbox and not self.write_paused and not self.closing:
            for stream_id in scheduling_order(outbox, self.outbox_sizes):
                self._turn(stream_id, self.frame_max)
                if self.write_paused or self.closing:
                    break

    def _turn(self, stream_id, quantum):
        """One stream's turn: up to `quantum` bytes of DATA, and the frames that follow them."""
        queue = self.outbox[stream_id]
        sent = 0
        while queue and sent < quantum:
            is_data, buf = queue[0]
            if not is_data:
                queue.popleft()
                self.send(buf)
                continue
            n = min(len(buf), quantum - sent)
            if n == len(buf):
                queue.popleft()
                piece = buf
            else:                               # a turn's worth off the front, no more copied
                piece = buf[:n]
                del buf[:n]
            _write_parts(self.transport, self.sock, HEADER.pack(n, DATA, 0, stream_id), piece)
            self.written += HEADER_SIZE + n
            self.outbox_sizes[stream_id] -= n
            self.outbox_bytes -= n
            sent += n
        del self.outbox[stream_id]              # gone, or to the back of the line
        if queue:
            self.outbox[stream_id] = queue
        else:
            del self.outbox_sizes[stream_id]

    def send(self, frame):
        Link.send(self, frame)
        self.written += len(frame)
        if self.write_paused and not self.closing:
            self._check_backlog()

    def close(self, code=None, message=None):
        """Whatever is queued goes to the transport first, to be flushed with the rest."""
        if not self.closing:
            for stream_id in list(self.outbox):
                self._turn(stream_id, MAX_CREDIT)   # all of it: a queue is at most a window
        Link.close(self, code, message)

    def stream_count(self):
        return len(self.legs)

    def backlog_limit(self):
        """What a peer may make us queue: the windows toward it (PeerWindows) and some
        control frames.  At most PEER_MEMORY_BUDGET + PEER_BUFFER_SLACK."""
        return self.windows.total + PEER_BUFFER_SLACK

    def _check_backlog(self):
        """More than backlog_limit() means it asked for more than it reads (a LIST or PING
        flood, say): drop it."""
        queued = self.transport.get_write_buffer_size() + self.outbox_bytes
        if queued > self.backlog_limit():
            self.drop_not_reading("%d bytes queued, over its limit of %d" % (queued, self.backlog_limit()))

    def drop_not_reading(self, why):
        log.warning("router: %s is not reading (%s); dropping it", self.peer, why)
        self.drop_cause = "not_reading"
        self.abort("peer stopped reading")

    def pause_writing(self):
        Link.pause_writing(self)
        if self.transport is not None:
            self.stalled_since = (self.loop.time(), self.transport.get_write_buffer_size(), self.written)
            self.router.paused.add(self)

    def resume_writing(self):
        self.stalled_since = None
        self.router.paused.discard(self)
        Link.resume_writing(self)

    def writable(self):
        Link.writable(self)
        self.pump()
        # what ended streams left queued is at most what is still queued
        self.windows.ended = min(self.windows.ended,
                                 self.outbox_bytes + self.transport.get_write_buffer_size())

    def check_reading(self, now, timeout):
        """The router's periodic check while writing is paused: has it read anything lately?"""
        since, queued_then, written_then = self.stalled_since
        queued = self.transport.get_write_buffer_size()
        if queued < queued_then + (self.written - written_then):
            self.stalled_since = (now, queued, self.written)     # some of it left: reading
        elif now - since >= timeout:
            self.drop_not_reading("%d bytes queued and none read for %.0f s" % (queued, now - since))


class RouterPeer(WatchedWrites, Link):
    """The router's session with one peer: handshake, registry requests, and the
    stream frames it hands to their RelayedStream."""

    role = "router: peer"

    def __init__(self, router):
        Link.__init__(self, router.keepalive)
        self.frames = FrameBuffer(initial=ROUTER_READ_BUFFER)
        self.router = router
        self.source = None              # its address, for per-source limits (PendingHandshakes)
        self.door = FrontDoor(self)
        self.phase = "preamble"
        self.legs = {}                  # stream id on this link -> Leg
        self.windows = PeerWindows(router.windows)     # what its streams may make us hold for it
        self.written = 0                # bytes handed to its transport, for the not-reading check
        self.empty_outbox()
        self.stalled_since = None       # (time, queued then, written then) while writing is paused
        self.ids = StreamIds(odd=False)  # the router opens even ids here
        self.registrations = []
        self.nonce = os.urandom(16)
        self.agent = "?"
        self.hello_role = None          # what the client says it is (its command)
        self.drop_cause = None          # why the router ended it, for the metrics
        self.tasks = set()
        self.draining = False           # sent GOAWAY: close when its last stream ends
        self.registering = set()        # names with a REGISTER in progress
        self.refused_names = set()      # names already refused (logged once)
        self.deadline = HandshakeDeadline(self)
        self.handlers = {
            HELLO: self.on_hello, AUTH: self.on_auth, PING: self.on_ping, PONG: self.on_pong,
            REGISTER: self.on_register, OPEN: self.on_open, LIST: self.on_list,
            GOAWAY: self.on_goaway, DATA: self.on_data}
        for ftype, method in RELAYED_FRAMES:
            self.handlers[ftype] = self._relay_handler(ftype, method)
        self._enter("preamble")

    def _enter(self, phase):
        self.phase = phase
        self.dispatch = {t: self.handlers[t] for t in PEER_PHASES.get(phase, ())}

    def connection_made(self, transport):
        Link.connection_made(self, transport)
        self.router.peers.add(self)
        self.deadline.start()

    def buffer_updated(self, nbytes):
        if self.phase != "preamble":
            return Link.buffer_updated(self, nbytes)
        self.liveness.heard()
        self.frames.advance(nbytes)
        if self.door.sniff():
            self._enter("hello")
            self.process_frames()

    # -- handshake ----------------------------------------------------------
    def on_hello(self, _id, payload):
        hello = decode_json(HELLO, payload)
        self.agent = short_reason(hello.get("agent", "?"))[:80]
        self.hello_role = str(hello.get("role", ""))[:16]
        token = self.router.token
        # Behind a token, strangers learn only that this is mindmeld: the version after AUTH.
        hello = {"version": PROTOCOL_VERSION, "agent": "mindmeld" if token else AGENT,
                 "nonce": self.nonce.hex(), "auth": "token" if token else "none",
                 "instance": self.router.instance}     # which router: clients behind a front check it
        if not token:
            hello["window_budget"] = self.windows.promise_growth()
        self.send_json(HELLO, 0, hello)
        if token:
            self._enter("auth")
        else:
            self._ready()

    def on_auth(self, _id, payload):
        mac = str(decode_json(AUTH, payload).get("mac", ""))
        expected = _auth_mac(self.router.token, self.nonce)
        if not hmac.compare_digest(mac.encode(), expected.encode()):
            self.router.stranger_log.warning(
                self.source, "router: %s presented a wrong or missing token; refused", self.peer)
            self._enter("refused")
            self.drop_cause = "auth"
            self.close("auth", "wrong or missing token for this router")
            return
        self.send_json(AUTH, 0, {"ok": True, "agent": AGENT,
                                 "window_budget": self.windows.promise_growth()})
        self._ready()

    def _ready(self):
        self.deadline.done()
        self._enter("ready")
        if isinstance(self.transport, WebSocketLayer):
            self.transport.decoder.max_frame = WS_MAX_FRAME
        log.debug("router: %s connected (%s)", self.peer, self.agent)
        # One PING now: a peer far away gets short kernel queues from its first stream on.
        # (Waiting for writes to queue up was too late: the kernel's send buffer can hold
        # megabytes before they do, first come, first served.)
        self.ping()

    # -- registry requests ------------------------------------------------------
    def on_register(self, request_id, payload):
        info = decode_json(REGISTER, payload)
        name = info.get("name")
        if not valid_name(name):
            raise ProtocolError("invalid service name %r" % (name,))
        if len(self.registrations) >= MAX_SERVICES_PER_PEER:
            self.send_json(REGISTERED, request_id, {
                "ok": False, "code": "limit",
                "message": "a sharer may register at most %d services" % MAX_SERVICES_PER_PEER})
            return
        if name in self.registering or len(self.registering) >= MAX_SERVICES_PER_PEER:
            raise ProtocolError("REGISTER for %r while an earlier one is unanswered" % name)
        # owner: a link of its owner chain (OwnerChain); "secret": true, or an older sharer's
        # random "verifier", marks a service with a secret
        owner, verifier = str(info.get("owner", ""))[:128], info.get("verifier")
        verifier = str(verifier)[:128] if verifier else None
        if verifier is None and info.get("secret") is True:
            verifier = "secret"
        self.registering.add(name)
        task = _spawn(self.router.register(self, request_id, name, owner, verifier), self.tasks)
        task.add_done_callback(lambda _task: self.registering.discard(name))

    def on_list(self, request_id, payload):
        info = decode_json(LIST, payload) if len(payload) else {}     # older clients: {} or nothing
        after, limit = info.get("after"), info.get("limit", LIST_PAGE_MAX)
        if after is not None and not isinstance(after, str):
            raise ProtocolError("LIST 'after' must be a service name, not %r" % (after,))
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise ProtocolError("LIST 'limit' must be a positive integer, not %r" % (limit,))
        services, more = self.router.listing(after, min(limit, LIST_PAGE_MAX))
        reply = {"services": services}
        if more:                                # only then: the last page reads as before
            reply["more"] = True
        self.send_json(LIST_REPLY, request_id, reply)

    def on_goaway(self, _id, payload):
        """The peer is leaving: its names are free at once, its open streams may finish."""
        info = decode_json(GOAWAY, payload)
        log.debug("router: %s is going away (%s)", self.peer, short_reason(info.get("message", "")))
        self.draining = True
        why = ("its sharer is shutting down" if info.get("code") == "shutdown" else
               "its sharer closed the link: %s" % short_reason(info.get("message", "")))
        self.router.unregister_all(self, why, reset_streams=False)
        if not self.legs:
            self.close()

    # -- streams -------------------------------------------------------------------
    def on_open(self, stream_id, payload):
        self.ids.opened_by_peer(stream_id)
        info = decode_json(OPEN, payload)
        early = open_data(info)                 # checked here: a bad one is this peer's error
        info["e2e"] = _router_checked_e2e(OPEN, info)
        name = info.get("service")
        registration = self.router.services.get(name) if valid_name(name) else None
        windows = (self.windows.next_window(),       # toward the opener, toward the sharer
                   registration.peer.windows.next_window() if registration is not None else 0)
        grow = opening_growth(info, windows[0] or MIN_STREAM_WINDOW)
        self.windows.may_grow(grow)
        code = refusal = None
        if self.draining:
            reason, code = "this link is going away", "going-away"
        elif len(self.legs) >= MAX_STREAMS_PER_PEER:
            reason, refusal = "too many open streams on this link (limit %d)" % MAX_STREAMS_PER_PEER, "limit"
        elif registration is None or registration.peer.closing:
            reason, code = "no service named %r is registered on this router" % (name,), "no-service"
        elif registration.peer.ids.exhausted:      # after 2**31 streams: the sharer relinks
            registration.peer.drop_cause = "limits"
            registration.peer.close("ids-exhausted", "stream ids are used up; reconnect")
            reason, refusal = "the sharer is reconnecting", "sharer_reconnecting"
        elif None in windows:
            reason, code = "the router holds all the stream data it may; try again later", "busy"
        else:
            relay = RelayedStream(self.router, registration, self, stream_id, registration.peer,
                                  *windows, grow=grow)
            relay.opener.received += len(early)
            relay.open(info)
            return
        self.router.monitor.stream_refused(refusal or code)
        self.send_json(OPEN_REFUSED, stream_id, {"reason": short_reason(reason), "code": code})

    def _leg(self, stream_id, ftype):
        return self.known_stream(self.legs, stream_id, ftype)

    def on_data(self, stream_id, payload):
        leg = self.legs.get(stream_id) or self._leg(stream_id, DATA)
        if leg is not None:
            leg.relay.data(leg, payload)

    def _relay_handler(self, ftype, method):
        """A handler that hands a stream frame to its RelayedStream's `method`."""
        def handler(stream_id, payload):
            leg = self._leg(stream_id, ftype)
            if leg is not None:
                getattr(leg.relay, method)(leg, payload)
        return handler

    def fail(self, exc):
        self.drop_cause = self.drop_cause or "protocol"
        Link.fail(self, exc)

    def log_failure(self, message, *args):
        """A stranger's failures are logged a few a minute per source (StrangerLog)."""
        if self.phase == "ready":
            log.warning(message, *args)
        else:
            self.router.stranger_log.warning(self.source, message, *args)

    def on_lost(self, reason):
        if self.phase == "auth":
            self.router.stranger_log.warning(
                self.source, "router: %s left without proving the token (it needs --token); "
                "refused", self.peer)
        elif self.phase == "hello" or (self.phase == "preamble" and self.deadline.timer):
            log.debug("router: %s left during the handshake: %s", self.peer, reason)
        self.deadline.done()
        self.router.peer_lost(self, reason)
        self.empty_outbox()             # nothing more can be written to it
        for task in list(self.tasks):
            task.cancel()


class Router:
    """The rendezvous: a registry of names and a relay of streams between peers.

        router = Router("127.0.0.1", 0)
        await router.start()          # router.port is the port really bound
        ...
        await router.close()
    """

    command = "router"

    def __init__(self, host="", port=DEFAULT_PORT, token=None, ssl_context=None,
                 keepalive=KEEPALIVE_INTERVAL, handshake_timeout=HANDSHAKE_TIMEOUT,
                 liveness_probe=LIVENESS_PROBE, ws_path=WS_PATH, status_listen=None,
                 metrics_per_service=False, not_reading_timeout=NOT_READING_TIMEOUT):
        self.host, self.port = host, port
        self.not_reading_timeout = not_reading_timeout
        self.token = token
        self.ssl_context = ssl_context
        self.keepalive = keepalive
        self.handshake_timeout = handshake_timeout
        self.liveness_probe = liveness_probe
        self.ws_path = ws_path
        self.instance = os.urandom(8).hex()     # says in HELLO which router of several this is
        self.services = {}
        self.peers = set()
        self.handshakes = PendingHandshakes()
        self.stranger_log = StrangerLog()
        self.relayed = 0                # streams relayed now
        self.windows = WindowLedger()   # what all peers' streams may make us hold
        self.paused = set()             # peers whose link we cannot write to now (not reading?)
        self._reading_timer = None      # one timer checks them all
        self.drained = None             # a future while close() waits for the last stream
        self.server = None
        self.addresses = []
        self.done = None               # a future, resolved when the router has closed
        self.monitor = RouterMonitor(self, status_listen, metrics_per_service)

    async def start(self):
        loop = _get_loop()
        self.done = loop.create_future()
        try:
            self.server = await _create_server(self._accept, self.host, self.port)
        except OSError as exc:
            raise MindmeldError("cannot listen on %s: %s" % (
                format_hostport(self.host or "*", self.port), exc.strerror or exc))
        self.addresses = [s.getsockname()[:2] for s in self.server.sockets]
        self.port = self.addresses[0][1]
        log.info("router listening on %s%s", ", ".join(format_hostport(h, p) for h, p in self.addresses),
                 " (TLS)" if self.ssl_context else "")
        await self.monitor.start()
        self._reading_timer = loop.call_later(self._reading_check_interval(), self._check_reading)
        return self

    def _check_reading(self):
        """Peers whose links stay full: drop those that have read nothing for a while."""
        now = _get_loop().time()
        for peer in list(self.paused):
            if peer.closing or peer.stalled_since is None:
                self.paused.discard(peer)
            else:
                peer.check_reading(now, self.not_reading_timeout)
        self._reading_timer = _get_loop().call_later(self._reading_check_interval(), self._check_reading)

    def _reading_check_interval(self):
        return min(NOT_READING_CHECK, self.not_reading_timeout / 4)

    def _accept(self):
        peer = RouterPeer(self)
        if self.ssl_context is None:
            return peer
        layer = TlsLayer(peer, self.ssl_context, server_side=True)
        layer.handshake.add_done_callback(lambda done: self._tls_failed(peer, done.result()))
        return layer

    @staticmethod
    def _tls_failed(peer, exc):
        if not isinstance(exc, ssl.SSLError):
            return
        reason = exc.reason or str(exc)
        if "ALERT" in reason.upper():   # the client refused us (as trust on first use starts)
            log.debug("router: %s ended the TLS handshake: %s", peer.peer, reason)
        else:
            peer.router.stranger_log.warning(
                peer.source, "router: %s failed the TLS handshake (%s; clients of this router "
                "need --tls); disconnecting", peer.peer, reason)

    @property
    def open_streams(self):
        return self.relayed

    @property
    def handshaking(self):
        return len(self.handshakes)

    def listing(self, after=None, limit=LIST_PAGE_MAX):
        """What LIST answers: the first `limit` services by name after `after`, and whether
        more follow.  nsmallest costs O(n log limit) per page, not a sort of the registry."""
        names = self.services if after is None else (n for n in self.services if n > after)
        first = heapq.nsmallest(limit + 1, names)
        now = time.time()
        page = [self.services[name] for name in first[:limit]]
        return [{"name": r.name, "since": r.since, "age": now - r.since,
                 "streams": r.streams, "peer": r.peer.peer, "secret": bool(r.verifier)}
                for r in page], len(first) > limit

    async def register(self, peer, request_id, name, owner, verifier):
        current = self.services.get(name)
        if current is not None and current.peer is not peer:
            if not await self._take_over(peer, request_id, current, owner):
                return
            if peer.closing:
                return
            current = self.services.get(name)
            if current is not None and current.peer is not peer:
                return await self.register(peer, request_id, name, owner, verifier)
        if current is None:
            registration = Registration(name, peer, owner, verifier)
            self.services[name] = registration
            peer.registrations.append(registration)
            log.info("router: %s registered %r", peer.peer, name)
        elif owner_link_follows(owner, current.owner):
            current.owner = owner       # the same connection again: it moved down its chain
        peer.send_json(REGISTERED, request_id, {"ok": True, "name": name})

    async def _take_over(self, peer, request_id, current, owner):
        """May `peer` have the name `current` holds?  If so the old holder is removed.
        Only the holder's owner chain gets it at once.  A name without a secret also goes
        to whoever asks while its holder fails a liveness probe.  A name with a secret does
        not: the router cannot check a secret (nor may it, or it could test guesses), so a
        claim of one proves nothing, and a holder frozen for a while must not come back to
        find its name serving a stranger.  It stays until the holder's link is gone."""
        name = current.name
        same_owner = owner_link_follows(owner, current.owner)
        if same_owner:
            why = "its sharer reconnected"
        elif not current.verifier and not await current.peer.liveness.answers(self.liveness_probe):
            why = "its previous sharer stopped answering"
        else:
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(current.since))
            held = ""
            if current.verifier:
                held = (", a service with a secret: it stays there until that sharer's link closes"
                        + (" or is silent for %.0f s" % ((KEEPALIVE_MISSES + 1) * self.keepalive)
                           if self.keepalive else ""))
            peer.send_json(REGISTERED, request_id, {
                "ok": False, "code": "name-taken", "secret": bool(current.verifier),
                "message": "the name %r is already shared by %s since %s%s"
                           % (name, current.peer.peer, since, held)})
            (log.debug if name in peer.refused_names else log.info)(
                "router: %s asked for %r, which %s holds; refused", peer.peer, name, current.peer.peer)
            peer.refused_names.add(name)
            return False
        if self.services.get(name) is current:
            log.info("router: %r taken over by %s: %s", name, peer.peer, why)
            self.unregister(current, "service %r was taken over" % name)
            if not same_owner:
                current.peer.drop_cause = "keepalive"
                current.peer.abort("did not answer a liveness probe")
        return True

    def unregister(self, registration, reason, reset_streams=True):
        if self.services.get(registration.name) is registration:
            del self.services[registration.name]
        peer = registration.peer
        if registration in peer.registrations:
            peer.registrations.remove(registration)
        if reset_streams:
            for leg in [l for l in peer.legs.values() if l.relay.registration is registration]:
                leg.relay.abort(leg, reason)

    def unregister_all(self, peer, why, reset_streams=True):
        for registration in list(peer.registrations):
            log.info("router: %r unregistered: %s", registration.name, why)
            self.unregister(registration, "the sharer of %r went away" % registration.name,
                            reset_streams)

    def peer_lost(self, peer, reason):
        self.peers.discard(peer)
        self.paused.discard(peer)
        peer.windows.release()
        self.monitor.peer_lost(peer, reason)
        if peer.registrations:
            self.unregister_all(peer, reason)
        for leg in list(peer.legs.values()):
            leg.relay.abort(leg, "the peer at the other end went away")
        if peer.phase == "ready":
            log.debug("router: %s disconnected: %s", peer.peer, reason)

    def stream_ended(self):
        waiter = self.drained
        if waiter is not None and not self.relayed and not waiter.done():
            waiter.set_result(None)

    async def close(self, grace=0.0):
        """Stop accepting, tell every peer (GOAWAY), let streams finish for `grace` s."""
        if self._reading_timer is not None:
            self._reading_timer.cancel()
        self.stranger_log.close()
        await self.monitor.close()
        if self.server is not None:
            await _close_server(self.server)
        for peer in list(self.peers):
            peer.send_json(GOAWAY, 0, {"code": "shutdown", "message": "the router is shutting down"})
        if grace and self.relayed:
            self.drained = _get_loop().create_future()
            try:
                await asyncio.wait_for(self.drained, grace)
            except asyncio.TimeoutError:
                pass
        for peer in list(self.peers):
            peer.abort("router shut down")
        await asyncio.sleep(0)          # let the aborts' connection_lost() run
        if not self.done.done():
            self.done.set_result(None)


# ### 6b. The router's status page and metrics

# What an operator sees without a debugger: /metrics (Prometheus text format
# 0.0.4) and a status page at /.  Only the router's token (Bearer), or without a
# token a loopback client, sees them; anyone else learns only that this is a
# mindmeld router.  The data path adds one number per frame (Leg.received);
# everything else is read from the registry when someone asks.

STATUS_SAMPLE_INTERVAL = 5.0        # s between throughput samples: one timer per router
STATUS_HISTORY = 72                 # samples kept: the page's last 6 minutes
STATUS_ROWS_MAX = 1000              # rows per table on the page; the rest are counted
METRICS_SERVICE_SERIES_MAX = 1000   # --metrics-per-service: series, 4 per service
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
RECENT_FAILURES = 20                # failed handshakes and dropped peers the page lists
STATUS_PATHS = ("/", "/metrics")

# Roles as clients name them in HELLO ("role": their command); older clients say nothing.
PEER_ROLES = {"share": "sharer", "forward": "forwarder", "connect": "connector", "list": "lister"}
PEER_ROLE_LABELS = ("sharer", "forwarder", "connector", "lister", "other", "handshaking")
# Why things fail, as metric labels.  Every label exists from the start, at 0.
STREAM_REFUSALS = ("no_service", "limit", "going_away", "sharer_reconnecting", "sharer")
HANDSHAKE_FAILURES = ("version", "not_mindmeld", "tls", "auth", "timeout", "protocol", "limits",
                      "closed")
PEER_DROPS = ("protocol", "keepalive", "not_reading", "limits")
REFUSAL_CODES = {"no-service": "no_service", "going-away": "going_away"}    # OPEN_REFUSED codes
DIRECTIONS = ("to_sharer", "from_sharer")
HANDSHAKE_PHASES = frozenset(("preamble", "hello", "auth", "refused"))

_LOADED_AT = time.time()
# Peer-supplied text may carry terminal escapes or bidi overrides: shown as \uXXXX.


def is_loopback(host):
    """Is this peer address (text, as getpeername gives it) a loopback address?"""
    try:
        address = ipaddress.ip_address(str(host).split("%")[0])
    except ValueError:
        return False
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def status_allowed(token, headers, client_host):
    """May this HTTP client see the status page and /metrics?

    With a token: only with `Authorization: Bearer TOKEN`, from anywhere.  Without
    one: only loopback clients, and not through a proxy on this host (which makes
    every visitor look local)."""
    if token:
        scheme, _, credential = headers.get("authorization", "").strip().partition(" ")
        try:
            given = credential.strip().encode("latin-1")    # the header's own bytes
        except UnicodeEncodeError:
            return False
        return scheme.lower() == "bearer" and hmac.compare_digest(given, token.encode())
    proxied = any(name in headers for name in ("forwarded", "x-forwarded-for", "x-real-ip"))
    return not proxied and is_loopback(client_host)


def html_text(text):
    """Text for HTML: markup escaped, control and invisible characters made visible."""
    return html.escape(printable(text), quote=True)


def metric_label_value(value):
    return str(value).replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


def metric_number(value):
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "+Inf" if value > 0 else "-Inf"
        return repr(value)
    return str(int(value))


def metric_family(name, kind, help_text, samples):
    """One metric in the text format: HELP, TYPE, then `name{labels} value` lines.
    `samples` is a number (no labels) or a list of ((label, value) pairs, number)."""
    lines = ["# HELP %s %s" % (name, help_text.replace("\\", "\\\\").replace("\n", "\\n")),
             "# TYPE %s %s" % (name, kind)]
    if not isinstance(samples, list):
        samples = [((), samples)]
    for labels, value in samples:
        text = ",".join('%s="%s"' % (k, metric_label_value(v)) for k, v in labels)
        lines.append("%s%s %s" % (name, "{%s}" % text if text else "", metric_number(value)))
    return lines


def _process_figures():
    """(resident bytes, open descriptors, start time): None where this system cannot say."""
    rss = fds = None
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    for directory in ("/proc/self/fd", "/dev/fd"):
        try:
            fds = len(os.listdir(directory))
            break
        except OSError:
            pass
    return rss, fds, _process_start_time()


def _process_start_time():
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])    # field 22, starttime
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration, AttributeError):
        return _LOADED_AT           # not Linux: when this module was loaded


def _human_bytes(n):
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return ("%d %s" if unit == "B" else "%.1f %s") % (n, unit)
        n /= 1000.0


def _human_duration(seconds):
    seconds = int(seconds)
    days, hours, minutes = seconds // 86400, seconds // 3600 % 24, seconds // 60 % 60
    if days:
        return "%d d %d h" % (days, hours)
    if hours:
        return "%d h %d min" % (hours, minutes)
    if minutes:
        return "%d min %d s" % (minutes, seconds % 60) if seconds % 60 else "%d min" % minutes
    return "%d s" % seconds


def _sparkline(rates, width=360, height=48):
    """An inline SVG of [(to_sharer, from_sharer) bytes/s, ...], oldest first."""
    top = max([max(pair) for pair in rates] + [1.0])
    step = width / float(max(STATUS_HISTORY - 2, 1))
    x0 = width - step * (len(rates) - 1)
    lines = []
    for index, colour in ((0, "#1f77b4"), (1, "#d62728")):
        points = " ".join("%.1f,%.1f" % (x0 + i * step, height - 1 - (height - 2) * pair[index] / top)
                          for i, pair in enumerate(rates))
        lines.append('<polyline fill="none" stroke="%s" stroke-width="1.5" points="%s"/>'
                     % (colour, points))
    return ('<svg width="%d" height="%d" viewBox="0 0 %d %d" '
            'role="img" aria-label="throughput"><rect width="%d" height="%d" fill="#f6f6f6"/>%s</svg>'
            ' <small>peak %s/s; <span style="color:#1f77b4">to sharers</span>, '
            '<span style="color:#d62728">from sharers</span></small>'
            % (width, height, width, height, width, height, "".join(lines), _human_bytes(top)))


def _table(headings, rows, total):
    if not total:
        return "<p>none</p>"
    out = ["<table><tr>%s</tr>" % "".join("<th>%s</th>" % h for h in headings)]
    for row in rows[:STATUS_ROWS_MAX]:
        out.append("<tr>%s</tr>" % "".join(
            '<td class="n">%s</td>' % html_text(c) if isinstance(c, (int, float)) else
            "<td>%s</td>" % html_text(c) for c in row))
    out.append("</table>")
    if total > min(len(rows), STATUS_ROWS_MAX):
        out.append("<p>and %d more</p>" % (total - min(len(rows), STATUS_ROWS_MAX)))
    return "\n".join(out)


MINIMAL_STATUS_PAGE = ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>mindmeld router"
                       "</title></head>\n<body><p>This is a mindmeld router.</p></body></html>\n")
STATUS_STYLE = ("body{font-family:sans-serif;margin:1.5em;color:#222}"
                "table{border-collapse:collapse;margin-bottom:1em}"
                "th,td{padding:.15em .7em;border-bottom:1px solid #ddd;text-align:left}"
                "td.n{text-align:right;font-variant-numeric:tabular-nums}h2{font-size:1.1em}")


class RouterMonitor:
    """The router's counters, its throughput history (one timer, started by the
    router's start() and cancelled by its close()), and the answers made of them:
    /metrics, the status page, and the optional --status-listen address."""

    def __init__(self, router, status_listen=None, per_service=False):
        self.router = router
        self.per_service = per_service
        self.status_listen = (parse_hostport(status_listen, "", None, "status listen address")
                              if status_listen else None)
        self.status_server = None
        self.status_addresses = []
        self.status_connections = set()     # closed with the router, answered or not
        self.sample_interval = STATUS_SAMPLE_INTERVAL
        self.started = time.time()
        self.streams_opened = 0
        self.streams_refused = dict.fromkeys(STREAM_REFUSALS, 0)
        self.handshakes_failed = dict.fromkeys(HANDSHAKE_FAILURES, 0)
        self.peers_dropped = dict.fromkeys(PEER_DROPS, 0)
        self.ended_bytes = [0, 0]       # relayed by streams that have ended, per DIRECTIONS
        self.recent = []                # (time, peer address, what, why): newest last
        self.history = []               # (monotonic time, to sharers, from sharers) totals
        self.service_rates = {}         # Registration -> (bytes/s to, from), last interval
        self._service_last = {}
        self._timer = None

    # -- life: one timer, and perhaps a listener ----------------------------------
    async def start(self):
        self.started = time.time()
        self.history = [(time.monotonic(), 0, 0)]
        self._timer = _get_loop().call_later(self.sample_interval, self._sample)
        if self.status_listen is None:
            return
        host, port = self.status_listen
        try:
            self.status_server = await _create_server(lambda: StatusConnection(self), host, port)
        except OSError as exc:
            await self.close()
            await _close_server(self.router.server)
            raise MindmeldError("cannot listen on %s for the status page: %s" % (
                format_hostport(host or "*", port), exc.strerror or exc))
        self.status_addresses = [s.getsockname()[:2] for s in self.status_server.sockets]
        log.info("router status page and /metrics on %s", ", ".join(
            "http://%s/" % format_hostport(h, p) for h, p in self.status_addresses))

    async def close(self):
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.status_server is not None:
            server, self.status_server = self.status_server, None
            await _close_server(server)
        for connection in list(self.status_connections):
            _abort(connection.transport)

    def _sample(self):
        self._timer = _get_loop().call_later(self.sample_interval, self._sample)
        totals, by_service = self.relayed_bytes()
        now = time.monotonic()
        self.history.append((now, totals[0], totals[1]))
        del self.history[:-STATUS_HISTORY]
        rates, last = {}, {}
        for registration in self.router.services.values():
            figures = by_service.get(registration, registration.relayed)
            before = self._service_last.get(registration)
            if before is not None and now > before[0]:
                rates[registration] = tuple((figures[i] - before[1][i]) / (now - before[0])
                                            for i in (0, 1))
            last[registration] = (now, list(figures))
        self.service_rates, self._service_last = rates, last

    # -- counting: the router's hooks call these ------------------------------------
    def stream_refused(self, code):
        reason = REFUSAL_CODES.get(code, code)
        self.streams_refused[reason if reason in self.streams_refused else "limit"] += 1

    def relay_ended(self, relay):
        """A stream ended: its legs' counts move to the totals, in one step."""
        to_sharer, from_sharer = relay.opener.received, relay.acceptor.received
        self.ended_bytes[0] += to_sharer
        self.ended_bytes[1] += from_sharer
        relay.registration.relayed[0] += to_sharer
        relay.registration.relayed[1] += from_sharer

    def peer_lost(self, peer, reason):
        """Sort a peer that left: a failed handshake, a drop, or a normal goodbye."""
        cause = peer.drop_cause
        layer = peer.transport
        tls_error = getattr(layer, "error", None)
        if cause is None and ssl is not None and isinstance(tls_error, ssl.SSLError):
            cause = "tls"
        if cause is None and peer.liveness.silent >= KEEPALIVE_MISSES:
            cause = "keepalive"
        if peer.phase in HANDSHAKE_PHASES:
            cause = cause or ("auth" if peer.phase == "auth" else "closed")
            self.handshakes_failed[cause if cause in self.handshakes_failed else "protocol"] += 1
            what = "handshake failed"
        elif peer.phase == "ready" and cause is not None:
            self.peers_dropped[cause if cause in self.peers_dropped else "protocol"] += 1
            what = "dropped"
        else:
            return
        self.recent.append((time.time(), peer.peer, "%s (%s)" % (what, cause), short_reason(reason)))
        del self.recent[:-RECENT_FAILURES]

    # -- reading --------------------------------------------------------------------
    def relayed_bytes(self):
        """Bytes relayed so far: ([to sharers, from sharers], {Registration: [to, from]})."""
        totals = list(self.ended_bytes)
        by_service = {}
        for peer in self.router.peers:
            for leg in peer.legs.values():
                relay = leg.relay
                if leg is not relay.opener:
                    continue
                figures = by_service.get(relay.registration)
                if figures is None:
                    figures = by_service[relay.registration] = list(relay.registration.relayed)
                figures[0] += leg.received
                figures[1] += relay.acceptor.received
                totals[0] += leg.received
                totals[1] += relay.acceptor.received
        return totals, by_service

    def peer_role(self, peer):
        if peer.phase != "ready":
            return "handshaking"
        return PEER_ROLES.get(peer.hello_role) or ("sharer" if peer.registrations else "other")

    def connected_peers(self):
        """Peers that are, or are becoming, mindmeld sessions (not HTTP visitors)."""
        return [p for p in self.router.peers if p.phase not in ("http", "refused")]

    def buffers(self):
        """Bytes held for peers now ([receive, send]), and the most they may make us hold."""
        held, budget = [0, 0], 0
        for peer in self.connected_peers():
            held[0] += len(peer.frames.data)
            if peer.transport is not None:
                held[1] += peer.transport.get_write_buffer_size() + peer.outbox_bytes
            budget += peer.frames.maximum + peer.backlog_limit()
        return held, budget

    def http_response(self, method, path, headers, transport):
        """The whole HTTP answer to GET/HEAD of / or /metrics (and /healthz here)."""
        peer = transport.get_extra_info("peername") if transport is not None else None
        client = peer[0] if isinstance(peer, tuple) else ""
        allowed = status_allowed(self.router.token, headers, client)
        extra = ""
        content_type = "text/plain; charset=utf-8"
        if method not in ("GET", "HEAD"):
            status, body, extra = "405 Method Not Allowed", "use GET\n", "Allow: GET, HEAD\r\n"
        elif path == "/healthz":
            status, body = "200 OK", "ok\n"
        elif path == "/metrics" and allowed:
            status, body, content_type = "200 OK", render_metrics(self), METRICS_CONTENT_TYPE
        elif path == "/metrics" and self.router.token:
            status, body = "401 Unauthorized", "this is a mindmeld router\n"
            extra = 'WWW-Authenticate: Bearer realm="mindmeld router"\r\n'
        elif path == "/metrics":
            status, body = "403 Forbidden", "this is a mindmeld router\n"
        elif path == "/":
            status, content_type = "200 OK", "text/html; charset=utf-8"
            body = render_status_page(self) if allowed else MINIMAL_STATUS_PAGE
        else:
            status, body = "404 Not Found", "not found: this is a mindmeld router\n"
        body = body.encode("utf-8")
        head = ("HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s"
                "Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n"
                "Content-Security-Policy: default-src 'none'; style-src 'unsafe-inline'\r\n"
                "Referrer-Policy: no-referrer\r\nConnection: close\r\n\r\n"
                % (status, content_type, len(body), extra))
        return head.encode("latin-1") + (b"" if method == "HEAD" else body)


def render_metrics(monitor):
    """/metrics: the Prometheus text exposition format 0.0.4."""
    router = monitor.router
    totals, by_service = monitor.relayed_bytes()
    roles = dict.fromkeys(PEER_ROLE_LABELS, 0)
    for peer in monitor.connected_peers():
        roles[monitor.peer_role(peer)] += 1
    held, budget = monitor.buffers()
    rss, fds, process_start = _process_figures()
    out = []
    add = out.extend
    add(metric_family("mindmeld_build_info", "gauge", "The router's version and protocol version.",
                      [((("version", __version__), ("protocol", PROTOCOL_VERSION)), 1)]))
    add(metric_family("mindmeld_start_time_seconds", "gauge",
                      "When the router started, in seconds since the Unix epoch.", monitor.started))
    add(metric_family("mindmeld_peers", "gauge", "Connected peers by role (handshaking: not yet ready).",
                      [((("role", r),), roles[r]) for r in PEER_ROLE_LABELS]))
    add(metric_family("mindmeld_services", "gauge", "Services registered now.", len(router.services)))
    add(metric_family("mindmeld_open_streams", "gauge", "Streams relayed now.", router.relayed))
    add(metric_family("mindmeld_streams_opened_total", "counter",
                      "Streams the router passed on to a sharer.", monitor.streams_opened))
    add(metric_family("mindmeld_streams_refused_total", "counter",
                      "Streams refused, by reason (sharer: refused by the sharer itself).",
                      [((("reason", r),), n) for r, n in sorted(monitor.streams_refused.items())]))
    add(metric_family("mindmeld_relayed_bytes_total", "counter",
                      "Stream payload bytes relayed, by direction (frame headers not counted).",
                      [((("direction", d),), totals[i]) for i, d in enumerate(DIRECTIONS)]))
    add(metric_family("mindmeld_handshakes_failed_total", "counter",
                      "Connections that did not become a session, by reason.",
                      [((("reason", r),), n) for r, n in sorted(monitor.handshakes_failed.items())]))
    add(metric_family("mindmeld_peers_dropped_total", "counter",
                      "Peers the router disconnected after the handshake, by reason.",
                      [((("reason", r),), n) for r, n in sorted(monitor.peers_dropped.items())]))
    add(metric_family("mindmeld_peer_buffer_bytes", "gauge",
                      "Memory held for peers: receive buffers and queued sends.",
                      [((("buffer", "receive"),), held[0]), ((("buffer", "send"),), held[1])]))
    add(metric_family("mindmeld_peer_buffer_budget_bytes", "gauge",
                      "The most the connected peers may make the router hold before it drops them.",
                      budget))
    if monitor.per_service:
        out.extend(_render_service_metrics(monitor, by_service))
    if rss is not None:
        add(metric_family("process_resident_memory_bytes", "gauge",
                          "Resident memory size in bytes.", rss))
    if fds is not None:
        add(metric_family("process_open_fds", "gauge", "Number of open file descriptors.", fds))
    add(metric_family("process_start_time_seconds", "gauge",
                      "Start time of the process since unix epoch in seconds.", process_start))
    return "\n".join(out) + "\n"


def _render_service_metrics(monitor, by_service):
    """Per-service series, opt-in: names are chosen by strangers, so at most
    METRICS_SERVICE_SERIES_MAX series (the first services by name)."""
    registrations = sorted(monitor.router.services.values(), key=lambda r: r.name)
    shown = registrations[:METRICS_SERVICE_SERIES_MAX // 4]
    opened, open_now, relayed = [], [], []
    for r in shown:
        figures = by_service.get(r, r.relayed)
        opened.append(((("service", r.name),), r.opened))
        open_now.append(((("service", r.name),), r.streams))
        relayed.extend(((("service", r.name), ("direction", d)), figures[i])
                       for i, d in enumerate(DIRECTIONS))
    out = []
    out.extend(metric_family("mindmeld_service_open_streams", "gauge",
                             "Streams relayed now, by service.", open_now))
    out.extend(metric_family("mindmeld_service_streams_opened_total", "counter",
                             "Streams opened since the service was registered.", opened))
    out.extend(metric_family("mindmeld_service_relayed_bytes_total", "counter",
                             "Payload bytes relayed since the service was registered, by direction.",
                             relayed))
    out.extend(metric_family("mindmeld_metrics_services_omitted", "gauge",
                             "Services left out of the per-service series (over the cap).",
                             len(registrations) - len(shown)))
    return out

def render_status_page(monitor):
    """/: the status page, plain HTML that reloads itself."""
    router = monitor.router
    now = time.time()
    totals, by_service = monitor.relayed_bytes()
    peers = sorted(monitor.connected_peers(), key=lambda p: p.peer)
    listening = ", ".join(format_hostport(h, p) for h, p in router.addresses) or "-"
    summary = [
        "mindmeld router %s" % __version__,
        "protocol %d" % PROTOCOL_VERSION,
        "services %d" % len(router.services),
        "peers %d" % len(peers),
        "open streams %d" % router.relayed,
        "relayed %s to sharers, %s from sharers" % (_human_bytes(totals[0]), _human_bytes(totals[1])),
        "uptime %s (since %s)" % (_human_duration(now - monitor.started),
                                  time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(monitor.started))),
        "host %s, pid %d" % (socket.gethostname(), os.getpid()),
        "listening on %s%s%s" % (listening, " (TLS)" if router.ssl_context else "",
                                 ", token required" if router.token else ""),
    ]
    rates = [((b[1] - a[1]) / (b[0] - a[0]), (b[2] - a[2]) / (b[0] - a[0]))
             for a, b in zip(monitor.history, monitor.history[1:]) if b[0] > a[0]]
    services = []
    for r in sorted(router.services.values(), key=lambda r: r.name)[:STATUS_ROWS_MAX]:
        figures = by_service.get(r, r.relayed)
        rate = monitor.service_rates.get(r)
        services.append((r.name, r.peer.peer, _human_duration(now - r.since),
                         "yes" if r.verifier else "no", r.streams, r.opened,
                         _human_bytes(figures[0]), _human_bytes(figures[1]),
                         "%s/s" % _human_bytes(rate[0]) if rate else "-",
                         "%s/s" % _human_bytes(rate[1]) if rate else "-"))
    peer_rows = [(p.peer, monitor.peer_role(p), p.agent, len(p.legs),
                  " ".join(r.name for r in p.registrations) or "-") for p in peers[:STATUS_ROWS_MAX]]
    failures = [("refused stream: %s" % r, n) for r, n in sorted(monitor.streams_refused.items()) if n]
    failures += [("failed handshake: %s" % r, n) for r, n in sorted(monitor.handshakes_failed.items()) if n]
    failures += [("dropped peer: %s" % r, n) for r, n in sorted(monitor.peers_dropped.items()) if n]
    recent = [(time.strftime("%H:%M:%S", time.localtime(t)), who, what, why)
              for t, who, what, why in reversed(monitor.recent)]
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta http-equiv="refresh" content="5">',
        "<title>mindmeld router %s</title>" % html_text(socket.gethostname()),
        "<style>%s</style></head><body>" % STATUS_STYLE,
        "<h1>mindmeld router</h1>",
        "<pre>\n%s\n</pre>" % "\n".join(html_text(line) for line in summary),
        "<h2>Throughput, last %s</h2>" % _human_duration(STATUS_HISTORY * monitor.sample_interval),
        "<p>%s</p>" % (_sparkline(rates) if len(rates) > 1 else "(sampled every %g s)" % monitor.sample_interval),
        "<h2>Services</h2>",
        _table(("name", "sharer", "registered for", "secret", "open streams", "streams",
                "to sharer", "from sharer", "rate to", "rate from"), services, len(router.services)),
        "<h2>Peers</h2>",
        _table(("address", "role", "agent", "open streams", "services"), peer_rows, len(peers)),
        "<h2>Refused and dropped</h2>",
        _table(("what", "count"), failures, len(failures)),
        "<h2>Recent failures</h2>",
        _table(("time", "peer", "what", "why"), recent, len(recent)),
        "<p><small>Updated %s; this page reloads every 5 s.  Metrics: /metrics.</small></p>"
        % time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)),
        "</body></html>", ""])

# -- HTTP --------------------------------------------------------------------------


class StatusConnection(asyncio.Protocol):
    """One HTTP request on the --status-listen address: read the head, answer, close."""

    def __init__(self, monitor):
        self.monitor = monitor
        self.transport = None
        self.head = bytearray()
        self._timer = None

    def connection_made(self, transport):
        self.transport = transport
        self.monitor.status_connections.add(self)
        self._timer = _get_loop().call_later(HANDSHAKE_TIMEOUT, _abort, transport)

    def data_received(self, data):
        if self.transport.is_closing():
            return
        self.head += data
        end = self.head.find(b"\r\n\r\n")
        if end < 0 and len(self.head) <= HTTP_HEAD_MAX:
            return
        if end < 0 or end + 4 > HTTP_HEAD_MAX:
            self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                                 b"Content-Length: 0\r\nConnection: close\r\n\r\n")
        else:
            line, headers = parse_http_head(bytes(self.head[:end + 4]))
            parts = line.split()
            path = parts[1].split("?")[0] if len(parts) > 1 else "/"
            self.transport.write(self.monitor.http_response(parts[0] if parts else "", path, headers,
                                                            self.transport))
        self.transport.close()

    def connection_lost(self, exc):
        self.monitor.status_connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()


# ###########################################################################
# ### 7. Clients (share, forward, connect, list) and proxy egress
# ###########################################################################

# Stream frames a client hands to its LocalStream: (type, method, payload decoder).
CLIENT_STREAM_ROUTES = (
    (WINDOW, "on_window", None), (EOF, "on_eof", None), (RESET, "on_reset", None),
    (OPEN_OK, "on_open_ok", None),
    (OPEN_REFUSED, "on_open_refused", lambda p: decode_far_json(OPEN_REFUSED, p)),
)


class WebSocketUpgrade:
    """A client's HTTP upgrade to WebSocket (--ws-path): the request, and what the answer
    means.  No I/O: ClientLink sends the request and hands over the answer's head."""

    def __init__(self, client):
        self.client = client
        self.key = base64.b64encode(os.urandom(16)).decode("ascii")

    def request(self):
        client = self.client
        return ("GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n"
                "User-Agent: mindmeld/%s\r\n\r\n" % (
                    client.ws_path, format_hostport(client.router_host, client.router_port),
                    self.key, __version__)).encode()

    def refusal(self, head):
        """None if the answer's `head` accepts the upgrade, else the error to end the link with."""
        status, headers = parse_http_head(head)
        parts = status.split(None, 2)
        code = parts[1] if len(parts) > 1 else "?"
        if code == "101" and headers.get("sec-websocket-accept") == ws_accept_key(self.key):
            return None
        where = "%s (path %s)" % (self.client.router, self.client.ws_path)
        said = short_reason(status.strip()[:100])
        if code == "101":
            return PermanentError("the server at %s answered the WebSocket upgrade with a wrong "
                                  "Sec-WebSocket-Accept: it is not a WebSocket server, or "
                                  "something in between changed the answer" % where)
        if code in ("400", "403", "404", "405", "426"):
            return PermanentError("the server at %s refused the WebSocket upgrade: %s"
                                  % (where, said))
        return LinkLost("the server at %s answered the WebSocket upgrade with %s" % (where, said))


class ClientLink(Link):
    """A client's link to the router: hello (+ token), requests, and its streams."""

    role = "router link"
    notsent_lowat = LINK_NOTSENT_LOWAT
    half_close = True

    def __init__(self, client, hello, pin=None):
        Link.__init__(self, client.keepalive)
        self.client = client
        self.hello = hello
        self.pin = pin
        self.budget = WindowBudget()
        self.streams = {}               # stream id -> LocalStream
        self.ids = StreamIds(odd=True)  # this side opens odd ids, the router even ones
        self.requests = {}
        self.next_request = 1
        self.ready = self.loop.create_future()
        self.goaway = None
        self.failure = None             # a PermanentError the router sent (GOAWAY)
        self.instance = None            # which router answered (HELLO), behind a front of several
        self.dispatch.update({
            HELLO: self.on_hello, AUTH: self.on_auth_ok, REGISTERED: self._on_reply(REGISTERED),
            LIST_REPLY: self._on_reply(LIST_REPLY), GOAWAY: self.on_goaway, OPEN: self.on_open,
            DATA: self.on_data,         # the hot path, routed by hand
        })
        for ftype, method, decode in CLIENT_STREAM_ROUTES:
            self.dispatch[ftype] = self._route_to_stream(ftype, method, decode)

    def connection_made(self, transport):
        Link.connection_made(self, transport)
        self.peer = self.client.router
        if self.client.tls is not None:     # check the certificate before saying anything
            ssl_object = transport.get_extra_info("ssl_object")
            try:
                self.client.tls.check(self.client.router, self.pin, ssl_object.getpeercert(True))
            except PermanentError as exc:
                self._settle(exc)
                self.abort(str(exc))
                return
        self._hello_sent = self.loop.time()
        if self.client.ws_path:
            self.upgrade = WebSocketUpgrade(self.client)
            self.send(self.upgrade.request())
            return
        self.send(PREAMBLE + encode_json(HELLO, 0, self.hello))

    def _upgraded(self, nbytes):
        """The HTTP answer to our WebSocket upgrade: switch to WebSocket, or say why not."""
        self.frames.advance(nbytes)
        answer = self.frames.peek()
        end = answer.find(b"\r\n\r\n")
        if end < 0:
            if len(answer) > HTTP_HEAD_MAX:
                self.abort("oversized HTTP answer")
            self.frames.need = len(answer) + 1
            return
        exc = self.upgrade.refusal(answer[:end + 4])
        if exc is not None:
            self._settle(exc)
            self.abort(str(exc))
            return
        self.upgrade = None
        self.frames.skip(self.frames.buffered)
        self.transport = WebSocketLayer(self, self.transport, client_side=True)
        self.sock = None
        self.send(PREAMBLE + encode_json(HELLO, 0, self.hello))
        if len(answer) > end + 4:
            self.transport.data_received(answer[end + 4:])

    upgrade = None                  # a WebSocketUpgrade until the router's answer to it

    def buffer_updated(self, nbytes):
        if self.upgrade is not None:
            self.liveness.heard()
            return self._upgraded(nbytes)
        if not self.ready.done() and self.frames.start == 0 and self.frames.end == 0:
            head = bytes(self.frames.view[:min(nbytes, 2)])
            if head in (b"\x15\x03", b"\x16\x03") and self.client.tls is None:
                self._settle(PermanentError("the router at %s speaks TLS: add --tls (with "
                                            "--tls-fingerprint or --tls-ca to check it)" % self.client.router))
                self.abort("router speaks TLS")
                return
        Link.buffer_updated(self, nbytes)

    def _settle(self, exc=None):
        if not self.ready.done():
            if exc is None:
                self.ready.set_result(self)
            else:
                self.ready.set_exception(exc)

    def on_hello(self, _id, payload):
        if self.ready.done():
            raise ProtocolError("HELLO after the handshake")
        hello = decode_json(HELLO, payload)
        self.rtt_measured(max(self.loop.time() - self._hello_sent, RTT_MIN))
        self.instance = short_reason(hello["instance"])[:64] if hello.get("instance") else None
        if hello.get("auth") == "token":
            token = self.client.token
            if not token:
                self._settle(PermanentError(
                    "the router at %s requires a token: pass --token, --token-file or set "
                    "MINDMELD_TOKEN" % self.client.router))
                self.close()
                return
            try:
                nonce = binascii.unhexlify(str(hello.get("nonce", "")))
            except (binascii.Error, ValueError):
                raise ProtocolError("HELLO with a malformed nonce")
            self.send_json(AUTH, 0, {"mac": _auth_mac(token, nonce)})
        else:
            self._use_window_budget(hello)
            self._settle()

    def on_auth_ok(self, _id, payload):
        if self.ready.done():
            raise ProtocolError("AUTH after the handshake")
        self._use_window_budget(decode_json(AUTH, payload) if payload else {})
        self._settle()

    def _use_window_budget(self, info):
        """The growth the router lets this link's windows take in all (absent: the default)."""
        budget = info.get("window_budget", PEER_WINDOW_BUDGET)
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < 0:
            raise ProtocolError("a window_budget of %r (must be a whole number of bytes)" % (budget,))
        self.budget = WindowBudget(min(budget, PEER_WINDOW_BUDGET))

    def on_goaway(self, _id, payload):
        self.goaway = info = decode_json(GOAWAY, payload)
        code, message = str(info.get("code", "")), short_reason(info.get("message", ""))
        if code in PERMANENT_GOAWAY:
            exc = PermanentError(PERMANENT_GOAWAY[code] % {"router": self.client.router,
                                                            "message": message})
        else:
            exc = LinkLost(RETRIED_GOAWAY.get(code, "the router closed the link: %(message)s")
                           % {"message": message})
        self._close_reason = str(exc)
        self.failure = exc
        self._settle(exc)
        if code == "shutdown" and self.streams:
            return                      # let open streams finish; the router closes the link
        self.close()

    async def request(self, ftype, obj, timeout=HANDSHAKE_TIMEOUT):
        request_id, self.next_request = self.next_request, self.next_request + 1
        future = self.requests[request_id] = self.loop.create_future()
        self.send_json(ftype, request_id, obj)
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            self.requests.pop(request_id, None)

    def _on_reply(self, ftype):
        """The handler of `ftype` replies: each answers the request with its id."""
        def on_reply(request_id, payload):
            future = self.requests.get(request_id)
            if future is not None and not future.done():
                future.set_result(decode_json(ftype, payload))
        return on_reply

    # -- streams ---------------------------------------------------------------
    def open_stream(self, stream, info):
        if self.ids.exhausted:          # after 2**31 streams: a fresh link
            self.close("ids-exhausted", "stream ids are used up; reconnecting")
        stream.attach(self, self.ids.allocate(), OPEN_SENT)
        growth = self.warm_start(stream.end)
        if growth:
            info = dict(info, grow=growth)
        self.send_json(OPEN, stream.id, info)

    def warm_start(self, end):
        """A new stream's warm start (ReceiveWindow.warm_start), on a long link only: on a
        short one windows grow in milliseconds anyway.  The growth to grant, or 0."""
        return end.window.warm_start(self.loop.time()) if self.long_link else 0

    def on_open(self, stream_id, payload):
        self.ids.opened_by_peer(stream_id)
        self.client.stream_requested(self, stream_id, decode_json(OPEN, payload))

    def _stream(self, stream_id, ftype):
        return self.known_stream(self.streams, stream_id, ftype)

    def on_data(self, stream_id, payload):
        stream = self.streams.get(stream_id) or self._stream(stream_id, DATA)
        if stream is not None:
            stream.on_data(payload)

    def _route_to_stream(self, ftype, method, decode):
        """A handler that hands a stream frame to the stream's `method`.  What the far end
        got wrong (StreamError) ends that stream only; the router's own errors end the link."""
        def handler(stream_id, payload):
            stream = self._stream(stream_id, ftype)
            if stream is None:
                return
            try:
                getattr(stream, method)(decode(payload) if decode else payload)
            except StreamError as exc:
                log.info("%s: stream %s reset: %s", self.client.command, stream.label or stream_id, exc)
                stream.reset(str(exc))
        return handler

    def stream_closed(self, stream):
        if self.streams.get(stream.id) is stream:
            del self.streams[stream.id]
        self.client.stream_ended(stream)
        self.client.streams_changed()
        self.sharing_changed()

    def on_lost(self, reason):
        if not self.ready.done() and self.client.tls is None and "closed" in reason:
            reason = "the router closed the connection before answering (if it uses TLS, add --tls)"
        self._settle(LinkLost(reason))
        for future in self.requests.values():
            if not future.done():
                future.set_exception(LinkLost(reason))
        for stream in list(self.streams.values()):
            stream.link_lost(reason)


PERMANENT_GOAWAY = {
    "auth": "the router at %(router)s refused the token: %(message)s",
    "version": "the router at %(router)s speaks another protocol version: %(message)s",
}
# GOAWAY codes a client retries after, saying what happened and what to do.
RETRIED_GOAWAY = {
    "taken-over": "%(message)s: the name is held by another sharer at the router "
                  "(stop the other sharer, or choose another name)",
}


def proxy_for(router_host, explicit=None, environ=os.environ):
    """The HTTP proxy to reach the router through: --proxy, else HTTPS_PROXY / ALL_PROXY
    unless NO_PROXY names the router's host (no implicit exceptions, loopback included)."""
    if explicit:
        return parse_proxy(explicit)
    url = next((environ[k] for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
                if environ.get(k)), None)
    if not url:
        return None
    host = router_host.lower().strip("[]")
    for entry in (environ.get("NO_PROXY") or environ.get("no_proxy") or "").split(","):
        entry = entry.strip().lower()
        if entry == "*" or (entry and (host == entry.lstrip(".") or host.endswith("." + entry.lstrip(".")))):
            return None
    return parse_proxy(url)


def parse_proxy(url):
    """'http://[user:pass@]host:port' -> (host, port, 'Basic ...' or None, url without password)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "http", url
    if scheme.lower() != "http":
        raise MindmeldError("unsupported proxy %r: only http:// CONNECT proxies are supported" % url)
    rest = rest.split("/", 1)[0]
    credentials, at, hostport = rest.rpartition("@")
    host, port = parse_hostport(hostport, "", 8080, "proxy address")
    if not host:
        raise MindmeldError("bad proxy address %r: a host is needed" % url)
    authorization = None
    if at:
        from urllib.parse import unquote
        user, _, password = credentials.partition(":")
        authorization = "Basic " + base64.b64encode(
            ("%s:%s" % (unquote(user), unquote(password))).encode()).decode("ascii")
    return host, port, authorization, "http://%s" % format_hostport(host, port)


async def proxy_connect(proxy, host, port):
    """A socket tunnelled to host:port through an HTTP CONNECT proxy (TLS goes on top)."""
    loop = _get_loop()
    proxy_host, proxy_port, authorization, name = proxy
    try:
        infos = await loop.getaddrinfo(proxy_host, proxy_port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise LinkLost("cannot resolve the proxy %s: %s" % (name, exc.strerror))
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, address)
        except OSError as exc:
            raise LinkLost("cannot reach the proxy %s: %s" % (name, _os_error_text(exc)))
        target = format_hostport(host, port)
        request = "CONNECT %s HTTP/1.1\r\nHost: %s\r\n" % (target, target)
        if authorization:
            request += "Proxy-Authorization: %s\r\n" % authorization
        await loop.sock_sendall(sock, (request + "\r\n").encode())
        answer = b""
        while b"\r\n\r\n" not in answer:       # read no further than the header's end
            more = await loop.sock_recv(sock, 1)
            if not more:
                raise LinkLost("the proxy %s closed the connection without answering" % name)
            answer += more
            if len(answer) > HTTP_HEAD_MAX:
                raise LinkLost("the proxy %s sent an oversized answer" % name)
        status = answer.split(b"\r\n", 1)[0].decode("latin-1").strip()
        code = status.split()[1] if len(status.split()) > 1 else "?"
        if code != "200":
            failure = PermanentError if code in ("403", "407") else LinkLost
            raise failure("the proxy %s refused to connect to %s: %s"
                          % (name, target, short_reason(status[:100])))
        return sock
    except BaseException:
        sock.close()
        raise


SHARD_CHECK_INTERVAL = 30.0         # s (+-25 %): a client of a {name} router asks the front this
                                    # often, so a name is home within 60 s of its router's return
                                    # whether its name still goes to the same router
SHARD_MOVE_WAIT = 5.0               # s: a forwarder's connection refused no-service there waits
                                    # this long for a check that may find the name elsewhere


class FollowsItsShard:
    """A mixin of _Client for routers behind a front that shards by name ({name} in the
    address): notice when the front sends the name to another router, and move there
    without dropping a stream."""

    recheck = None                  # an Event: check now (a forwarder heard no-service)

    async def _follow_name(self):
        """Until the current link is lost: right away and every shard_check seconds, ask the
        front which router it sends the name to now (a fresh link's HELLO instance); if
        another, move there (_move_to).  Returns the lost link's reason."""
        loop = _get_loop()
        self.recheck = asyncio.Event()
        self.recheck.set()          # once after every (re)connect
        while True:
            current = self.link
            wake = loop.create_task(self.recheck.wait())
            try:
                await asyncio.wait([current.lost, wake], return_when=asyncio.FIRST_COMPLETED,
                                   timeout=self.shard_check * (0.75 + random.random() / 2))
            finally:
                wake.cancel()
            if current.lost.done():
                return current.lost.result()
            self.recheck.clear()
            try:
                probe = await self.connect_link()
            except (MindmeldError, asyncio.TimeoutError) as exc:
                log.debug("%s: cannot check which router has the name now: %s", self.command, exc)
                continue
            if probe.instance in (None, current.instance) or current.lost.done() or self.closing:
                probe.close()
            else:
                await self._move_to(current, probe)

    async def _move_to(self, current, probe):
        """Make `probe` the link (a sharer registers there); the old one says GOAWAY, which
        frees its names on its router at once, and drains: its open streams finish."""
        self.link = probe
        try:
            await self.link_established(probe)
        except (MindmeldError, asyncio.TimeoutError) as exc:
            self.link = current
            probe.abort("move failed")
            log.warning("%s: cannot move to the router the front now sends %s to: %s; staying",
                        self.command, self.ws_path, exc)
            return
        log.info("%s: the front now sends %s to another router (%s); moved, %d stream(s) finish on "
                 "the old one", self.command, self.ws_path, probe.instance, len(current.streams))
        self.retired.add(current)
        current.lost.add_done_callback(lambda _lost: self.retired.discard(current))
        current.send_json(GOAWAY, 0, {"code": "moved", "message": "the name moved to another router"})
        if not current.streams:
            current.close()


def _router_address(router, name=None):
    """(WebSocket path or None for plain TCP, whether it is a {name} router, host, port,
    whether it is wss://) from a router address, or MindmeldError."""
    address, ws_path = router, None
    sharded = "{name}" in router
    scheme, sep, rest = address.partition("://")
    if sep:
        if scheme not in ("ws", "wss"):
            raise MindmeldError("bad router address %r: use HOST:PORT, ws://HOST[:PORT]/PATH "
                                "or wss://HOST[:PORT]/PATH" % address)
        address, slash, path = rest.partition("/")
        ws_path = "/" + path if slash else WS_PATH
    if sharded and (not sep or "{name}" in address):
        raise MindmeldError("bad router address %r: {name} goes in the path of a ws:// or wss:// "
                            "address, as ws://HOST[:PORT]/mindmeld/{name}" % router)
    if sharded and name is not None:
        ws_path = ws_path.replace("{name}", check_name(name))
    default_port = (443 if scheme == "wss" else 80) if sep else DEFAULT_PORT
    host, port = parse_hostport(address, "localhost", default_port, "router address")
    return ws_path, sharded, host, port, bool(sep) and scheme == "wss"


def _connect_failure(exc, where, host, tls):
    """What a failed TCP (and TLS) connection to the router at `where` means for the user:
    LinkLost (try again) or PermanentError (say it and stop).  The order matters: from 3.11
    asyncio.TimeoutError is an OSError, and on 3.6 a certificate error is not one."""
    if isinstance(exc, asyncio.TimeoutError):
        return LinkLost("the router at %s did not answer within %.0f s" % (where, HANDSHAKE_TIMEOUT))
    if isinstance(exc, socket.gaierror):
        return LinkLost("cannot resolve the router's host %r: %s" % (host, exc.strerror))
    if isinstance(exc, UnicodeError):
        return PermanentError("bad router host name %r" % host)
    if isinstance(exc, SSL_CERTIFICATE_ERROR) and not isinstance(exc, OSError):
        return PermanentError("the router at %s failed certificate verification: %s" % (where, exc))
    if ssl is not None and isinstance(exc, ssl.SSLError):
        return _tls_failure(exc, where)
    if isinstance(exc, (ConnectionResetError, BrokenPipeError)) and tls:
        return LinkLost("the router at %s closed the connection during the TLS handshake "
                        "(is it a plain router? then drop --tls)" % where)
    return LinkLost("cannot reach the router at %s: %s" % (where, _os_error_text(exc)))


class _Client(FollowsItsShard):
    """What every client role shares: where the router is, how to reach it, retries.

    A router address with {name} in its path (ws://front/mindmeld/{name}) is a front of
    several routers that picks one by the path: `name` goes there, and the client checks
    now and then that the front still sends it to the same router (HELLO's instance)."""

    command = "client"

    def __init__(self, router=None, token=None, tls=None, keepalive=KEEPALIVE_INTERVAL,
                 max_retries=None, grace=GRACE_PERIOD, backoff=(BACKOFF_FIRST, BACKOFF_MAX),
                 proxy=None, name=None, shard_check=SHARD_CHECK_INTERVAL):
        self.router = router or os.environ.get("MINDMELD_ROUTER") or DEFAULT_ROUTER
        self.ws_path, self.sharded, self.router_host, self.router_port, wss = \
            _router_address(self.router, name)
        if wss and tls is None:
            tls = TlsOptions()
        self.shard_check = shard_check
        self.retired = set()            # links left to drain after the name moved to another router
        self.token = token
        self.tls = tls                  # TlsOptions, or None for plain TCP
        self.proxy = proxy_for(self.router_host, proxy)
        self.keepalive = keepalive
        self.max_retries = max_retries
        self.grace = grace
        self.backoff = backoff          # (first delay, cap) in seconds
        self.link = None
        self.outages = 0                # failed attempts and lost links so far
        self.tasks = set()
        self.closing = False
        self.link_up = None            # an Event, made inside the loop (3.6-3.9 bind loops)
        self.done = None               # a future: the role's outcome
        self.drained = None            # a future while close() waits for the last stream

    def hello(self):
        return {"version": PROTOCOL_VERSION, "role": self.command,
                "agent": "mindmeld/%s python/%d.%d" % ((__version__,) + sys.version_info[:2])}

    async def connect_link(self):
        """One link to the router, handshake done.  Errors are LinkLost or PermanentError."""
        attempts = self.tls.attempts(self.router) if self.tls else [(None, None)]
        for number, (context, pin) in enumerate(attempts, 1):
            try:
                return await self._connect_once(context, pin)
            except PermanentError as exc:
                if number == len(attempts) or not getattr(exc, "unverified", False):
                    raise
                log.debug("%s; trying trust on first use", exc)

    async def _connect_once(self, context, pin):
        loop = _get_loop()
        where = self.router
        try:
            if self.proxy is not None:
                sock = await asyncio.wait_for(
                    proxy_connect(self.proxy, self.router_host, self.router_port), HANDSHAKE_TIMEOUT)
                where_to = dict(sock=sock)
            else:
                where_to = dict(host=self.router_host, port=self.router_port)
            link = ClientLink(self, self.hello(), pin)
            protocol = link if context is None else TlsLayer(
                link, context, server_side=False, server_hostname=self.router_host)
            deadline = loop.time() + HANDSHAKE_TIMEOUT      # for TCP and TLS together
            await asyncio.wait_for(loop.create_connection(lambda: protocol, **where_to),
                                   HANDSHAKE_TIMEOUT)
            if context is not None:
                try:
                    failure = await asyncio.wait_for(asyncio.shield(protocol.handshake),
                                                     max(0.0, deadline - loop.time()))
                except BaseException:   # timed out, or cancelled: drop the half-made connection
                    protocol.abort()
                    raise
                if failure is not None:
                    raise failure
        except (asyncio.TimeoutError, UnicodeError, SSL_CERTIFICATE_ERROR, OSError) as exc:
            raise _connect_failure(exc, where, self.router_host, tls=context is not None)
        try:
            await asyncio.wait_for(asyncio.shield(link.ready), HANDSHAKE_TIMEOUT)
        except asyncio.TimeoutError:
            link.abort("handshake timed out")
            raise LinkLost("the router at %s did not complete the handshake within %.0f s "
                           "(is it a mindmeld router, and does it use TLS?)" % (where, HANDSHAKE_TIMEOUT))
        except BaseException:
            link.ready.add_done_callback(lambda ready: ready.cancelled() or ready.exception())
            link.abort("handshake failed")
            raise
        return link

    # -- hooks for the roles ----------------------------------------------------
    async def link_established(self, link):
        """Called with each new link (register services, open waiting streams)."""

    def link_down(self, link, reason):
        pass

    def stream_requested(self, link, stream_id, info):
        raise ProtocolError("unexpected OPEN: this client accepts no streams")

    def stream_ended(self, stream):
        pass

    def streams_changed(self):
        """A stream left the link: wake close() if it waits for the last one."""
        if self.drained is not None and not self.drained.done() and not self.open_streams():
            self.drained.set_result(None)

    # -- lifecycle -----------------------------------------------------------------
    async def start(self):
        loop = _get_loop()
        self.link_up = asyncio.Event()
        self.done = loop.create_future()
        _spawn(self._supervise(), self.tasks)
        return self

    async def wait_ready(self, timeout=None):
        await asyncio.wait_for(self.link_up.wait(), timeout)

    def _finish(self, exc=None):
        if self.done is not None and not self.done.done():
            if exc is None:
                self.done.set_result(None)
            else:
                self.done.set_exception(exc)

    async def _supervise(self):
        loop = _get_loop()
        delays = backoff_delays(*self.backoff)
        failures = 0
        while not self.closing:
            began = loop.time()
            try:
                link = await self.connect_link()
                self.link = link
                await self.link_established(link)
                self.link_up.set()
                failures = 0
                reason = await (self._follow_name() if self.sharded else link.lost)
                link = self.link            # the last of this run's links, if the name moved
                if isinstance(link.failure, PermanentError):
                    raise link.failure
                if (link.goaway or {}).get("code") == "shutdown":
                    # A router restart is not a failure: try again at once, then back off.
                    delays, failures = itertools.chain([0.0], backoff_delays(*self.backoff)), -1
            except PermanentError as exc:
                self._finish(exc)
                return
            except (LinkLost, MindmeldError, asyncio.TimeoutError) as exc:
                reason = str(exc) or "timed out"
            except asyncio.CancelledError:
                raise
            except Exception as exc:    # a bug or an odd platform error: say it, do not hang
                log.debug("traceback", exc_info=True)
                self._finish(MindmeldError("%s: unexpected %s: %s (run with -v for details)"
                                           % (self.command, type(exc).__name__, exc)))
                return
            finally:
                self.link_up.clear()
                self.outages += 1
                self._link_gone()
            if self.closing:
                break
            if loop.time() - began > BACKOFF_RESET_AFTER:
                delays, failures = backoff_delays(*self.backoff), 0
            failures += 1
            if self.max_retries is not None and failures > self.max_retries:
                self._finish(MindmeldError("%s; giving up after %d retries (--max-retries)"
                                           % (reason, self.max_retries)))
                return
            delay = next(delays)
            log.warning("%s: %s; retrying in %.1f s", self.command, reason, delay)
            await asyncio.sleep(delay)      # backoff, not synchronisation
        self._finish()

    def _link_gone(self):
        link, self.link = self.link, None
        if link is None:
            return
        try:
            link.abort("link down")
            self.link_down(link, "link down")
        except Exception as exc:    # a bug: say it, and still reconnect (it would end the task)
            log.error("%s: internal error: %r while its link went down; reconnecting (run with "
                      "-v for a traceback)", self.command, exc)
            log.debug("traceback", exc_info=True)

    async def close(self, grace=0.0):
        """Stop: no new streams (a sharer's names are released at once, by GOAWAY), open
        ones get `grace` seconds, then everything closes."""
        self.closing = True
        await self.stop_accepting()
        link = self.link
        if link is not None:
            link.send_json(GOAWAY, 0, {"code": "shutdown", "message": "the %s is shutting down" % self.command})
        if grace and link is not None and self.open_streams():
            self.drained = _get_loop().create_future()      # streams_changed() resolves it
            await asyncio.wait([self.drained, link.lost], timeout=grace)
        for link in [self.link] + list(self.retired):
            if link is not None:
                await self._close_link(link)
        await _cancel_all(self.tasks)
        self._finish()

    @staticmethod
    async def _close_link(link):
        """Close the link and wait, LINK_CLOSE_WAIT at most, until the router has closed its
        side too: a process that exits first may leave frames unsent, or unread, and a
        socket closed with bytes unread resets the connection, frames in flight and all."""
        link.close()
        try:
            await asyncio.wait_for(asyncio.shield(link.lost), LINK_CLOSE_WAIT)
        except asyncio.TimeoutError:
            link.abort("shutdown")

    async def stop_accepting(self):
        pass

    def open_streams(self):
        links = list(self.retired) + ([self.link] if self.link is not None else [])
        return sum(len(link.streams) for link in links)


def _tls_failure(exc, where):
    reason = str(getattr(exc, "reason", None) or exc)
    if "WRONG_VERSION_NUMBER" in reason.upper() or "EOF" in reason.upper():    # EOF: UNEXPECTED_EOF too
        return PermanentError("the router at %s does not speak TLS (drop --tls, or start the "
                              "router with --tls)" % where)
    if "CERTIFICATE_VERIFY_FAILED" in reason.upper() or isinstance(
            exc, SSL_VERIFY_ERROR):
        code = getattr(exc, "verify_code", None)   # None on 3.6: TlsOptions checks dates itself
        if code is not None and code not in X509_NO_TRUSTED_ISSUER:
            return PermanentError("the router at %s failed certificate verification: %s (refused; "
                                  "check the router's address and this machine's clock, or ask "
                                  "its operator to fix its certificate)" % (where, exc.verify_message))
        failure = PermanentError("the router at %s failed certificate verification: %s (give its CA "
                                 "with --tls-ca, or pin it with --tls-fingerprint)"
                                 % (where, getattr(exc, "verify_message", None) or reason))
        failure.unverified = True
        return failure
    return LinkLost("TLS with the router at %s failed: %s" % (where, reason))


class Target:
    """Where a service's streams are dialled.  The name is resolved again after
    RESOLVE_TTL, and the address that answered last is tried first (so 'localhost'
    does not try ::1 and fail before 127.0.0.1 on every stream)."""

    RESOLVE_TTL = 30.0

    def __init__(self, host, port):
        self.host, self.port = host, port
        self.addresses, self.resolved_at = [], None

    def __str__(self):
        return format_hostport(self.host, self.port)

    async def connect(self, protocol_factory):
        loop = _get_loop()
        if self.resolved_at is None or loop.time() - self.resolved_at > self.RESOLVE_TTL:
            infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
            addresses = []
            for family, _type, _proto, _name, address in infos:
                if (family, address) not in addresses:
                    addresses.append((family, address))
            self.addresses, self.resolved_at = addresses, loop.time()
        failure = OSError(errno.EHOSTUNREACH, "no address to connect to")
        for family, address in list(self.addresses):
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setblocking(False)
                await loop.sock_connect(sock, address)
            except OSError as exc:
                sock.close()
                failure = exc
                continue
            except BaseException:
                sock.close()
                raise
            if self.addresses and self.addresses[0] != (family, address):
                self.addresses.remove((family, address))
                self.addresses.insert(0, (family, address))
            return await loop.create_connection(protocol_factory, sock=sock)
        raise failure


def _descriptor_limit():
    """This process's soft RLIMIT_NOFILE, or None where it has none (or no `resource`: Windows)."""
    try:
        import resource
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, AttributeError, OSError, ValueError):
        return None
    return None if soft == resource.RLIM_INFINITY or soft <= 0 else soft


class RefusalLog:
    """One line for the first of a run of like refusals, then a count every
    REFUSAL_LOG_INTERVAL s while they go on: a flood does not flood the log."""

    def __init__(self, what):
        self.what = what
        self.count = 0
        self.timer = None

    def refused(self, line):
        if self.timer is None:
            log.warning("%s", line)
            self.timer = _get_loop().call_later(REFUSAL_LOG_INTERVAL, self._summary)
        else:
            self.count += 1

    def _summary(self):
        count, self.count, self.timer = self.count, 0, None
        if count:
            log.warning("%s: %d more in the last %g s", self.what, count, REFUSAL_LOG_INTERVAL)
            self.timer = _get_loop().call_later(REFUSAL_LOG_INTERVAL, self._summary)

    def close(self):
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class SharedStream(LocalStream):
    """A stream the router opened to a sharer: dialled to the service's target.  It holds
    one of the sharer's stream slots from its OPEN until its socket is closed.  With a
    secret its transport is an EndToEndLayer, and the target is dialled once the opener
    has proved the secret."""

    role = "share"
    sharer = service = opener = keys = deadline = None
    dialling = counted = failure_counted = False

    def cancel_deadline(self):
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def e2e_failed(self, why):
        if not self.e2e.proofs.confirmed:      # an attempt that failed: counted, and said as a count
            self.sharer.e2e.failed(self)
            self.reset("%s: %s" % (E2E_FAILURE, why))
        else:
            LocalStream.e2e_failed(self, why)

    def accept(self, info):
        if self.early:                  # what the OPEN carried goes first
            self.transport.write(self.early)
            self.early = None
        LocalStream.accept(self, info)

    def refuse(self, reason, code=None):
        if not self.closed:
            refusal = {"reason": short_reason(reason)}
            if code is not None:
                refusal["code"] = code
            self.link.send(self.end.send_json(OPEN_REFUSED, refusal))
            self._forget()

    def _forget(self):
        LocalStream._forget(self)
        self.cancel_deadline()
        e2e = self.e2e
        if e2e is not None and not e2e.proofs.confirmed and (e2e.proofs.sent or self.keys.new):
            self.sharer.e2e.failed(self)         # a pairing, or our proof, and no proof back
        if (self.transport is None or (e2e is not None and e2e.transport is None)) and not self.dialling:
            self.sharer.slots.release(self)       # no socket was made: the slot is free

    def connection_lost(self, exc):
        LocalStream.connection_lost(self, exc)
        self.sharer.slots.release(self)           # its socket is closed: the slot is free


class EndToEndAcceptor:
    """A sharer's side of end-to-end streams (--secret): its pairings per service, the log
    of failed attempts, and the start of each stream (EndToEndLayer does the rest)."""

    def __init__(self, secret, services, busy_log):
        self.pairings = {name: AcceptorPairings(secret, name) for name in services}
        self.busy_log = busy_log
        self.guess_log = RefusalLog("share: streams that failed to prove the secret")
        e2e_context(server_side=True)       # now: a host that cannot make it says so at start

    def open(self, link, stream, info, dial):
        """Pair (or find the pairing), accept, and start TLS; dial(layer) once the opener
        has proved the secret."""
        name = stream.service
        try:
            e2e = checked_e2e(OPEN, info)
            if e2e is None:
                raise E2ERefused("service %r requires a secret: pass --secret or --secret-file" % name)
            keys, reply = self.pairings[name].open(e2e, link.loop.time())
        except (E2ERefused, StreamError) as exc:
            if isinstance(exc, E2ERefused) and exc.code == "busy":
                self.busy_log.refused("share: refused a stream to %r: %s" % (name, exc.reason))
            stream.refuse(getattr(exc, "reason", str(exc)), getattr(exc, "code", None))
            return
        stream.keys = keys

        def confirmed(layer):
            stream.cancel_deadline()
            self.pairings[name].confirmed(keys)
            dial(layer)

        layer = SharerEndToEnd(stream, keys, confirmed)
        stream.connection_made(layer)
        client_hello, stream.early = stream.early, None
        stream.accept({"e2e": reply})           # OPEN_OK first: the handshake may fail at once
        if client_hello and not stream.closed:
            layer.write(client_hello)
        stream.deadline = link.loop.call_later(       # cancelled once it proves, or ends
            OPEN_TIMEOUT, stream.reset, "no proof of the secret within %.0f s" % OPEN_TIMEOUT)

    def failed(self, stream):
        """A stream that did not prove the secret: counted against new pairings, and said
        once, then as a count (a guessing attack does not flood the log)."""
        if stream.failure_counted:
            return
        stream.failure_counted = True
        self.pairings[stream.service].failed(stream.keys, _get_loop().time())
        self.guess_log.refused("share: %r: a stream failed to prove the secret (from %s)"
                               % (stream.service, printable(stream.opener)))


class StreamSlots:
    """A sharer's stream slots: what keeps a flood of OPENs from using up its descriptors.
    Each stream holds a socket to its target; together they keep within a share of the
    descriptor limit, so that the sharer can always still relink, log and refuse."""

    def __init__(self, max_streams_per_service, max_streams_per_opener):
        descriptors = _descriptor_limit()
        self.max_streams = max(1, int(descriptors * SHARER_FD_SHARE)) if descriptors else None
        self.max_streams_per_service = min(max_streams_per_service,
                                           self.max_streams or max_streams_per_service)
        # Half a service at most: while one forwarder holds its share, others get in.
        self.max_streams_per_opener = min(max_streams_per_opener, max(1, self.max_streams_per_service // 2))
        self.stream_count = 0
        self.streams_by_service = collections.Counter()
        self.streams_by_opener = collections.Counter()    # by the opener's address, as the router says

    def over_limit(self, name, opener):
        """Why a new stream to `name` from `opener` would be one too many, or None."""
        if self.max_streams is not None and self.stream_count >= self.max_streams:
            return ("the sharer has %d streams open, its limit (%d%% of its file descriptor limit); "
                    "try again later" % (self.stream_count, SHARER_FD_SHARE * 100))
        if self.streams_by_service[name] >= self.max_streams_per_service:
            return ("service %r has %d streams open, the sharer's limit per service; try again later"
                    % (name, self.max_streams_per_service))
        if self.streams_by_opener[opener] >= self.max_streams_per_opener:
            return ("%d streams are open from this forwarder, the sharer's limit per forwarder "
                    "connection; close some first" % self.max_streams_per_opener)
        return None

    def take(self, stream):
        stream.counted = True
        self.stream_count += 1
        self.streams_by_service[stream.service] += 1
        self.streams_by_opener[stream.opener] += 1

    def release(self, stream):
        """The stream holds no socket any more (idempotent)."""
        if not stream.counted:
            return
        stream.counted = False
        self.stream_count -= 1
        for counts, key in ((self.streams_by_service, stream.service),
                            (self.streams_by_opener, stream.opener)):
            counts[key] -= 1
            if counts[key] <= 0:
                del counts[key]


class Sharer(_Client):
    """Registers services; every stream opened to one is dialled to its target.

        sharer = Sharer({"web": ("localhost", 8000)}, router="relay:7700")
        await sharer.start(); await sharer.wait_ready()
    """

    command = "share"

    def __init__(self, services, secret=None, max_streams_per_service=MAX_STREAMS_PER_SERVICE,
                 max_streams_per_opener=MAX_STREAMS_PER_OPENER, **options):
        _Client.__init__(self, name=next(iter(services)) if len(services) == 1 else None, **options)
        self.secret = secret
        self.slots = StreamSlots(max_streams_per_service, max_streams_per_opener)
        self.busy_log = RefusalLog("share: streams refused, over a limit")
        self.services = {}
        for name, target in services.items():
            check_name(name)
            if isinstance(target, str):
                target = parse_hostport(target, "localhost", None, "target")
            self.services[name] = Target(target[0] or "localhost", target[1])
        if not self.services:
            raise MindmeldError("nothing to share: give NAME [HOST:]PORT")
        self.e2e = EndToEndAcceptor(secret, self.services, self.busy_log) if secret else None
        self.owners = OwnerChain()          # proves a reconnect is the same process
        # marks a service with a secret for older routers; random, so that it proves nothing
        # and tells nothing of the secret
        self.secret_marker = os.urandom(16).hex()
        self.registered = set()             # names the router gave this sharer at least once
        self.held_elsewhere = set()         # of those, names another sharer holds now (logged)
        self.shards = []                    # with a {name} router: a sharer per name, a link each
        if self.sharded and len(self.services) > 1:
            for name, target in self.services.items():
                shard = Sharer({name: (target.host, target.port)}, secret, max_streams_per_service,
                               max_streams_per_opener, **options)
                if self.slots.max_streams is not None:    # together within this process's share
                    shard.slots.max_streams = max(1, self.slots.max_streams // len(self.services))
                self.shards.append(shard)

    # -- several names through a {name} router: the shards do the work ---------------------
    async def start(self):
        if not self.shards:
            return await _Client.start(self)
        self.link_up = asyncio.Event()
        self.done = _get_loop().create_future()
        for shard in self.shards:
            await shard.start()
            shard.done.add_done_callback(self._shard_done)
        return self

    def _shard_done(self, done):
        failure = None if done.cancelled() else done.exception()
        if failure is not None or all(shard.done.done() for shard in self.shards):
            self._finish(failure)

    async def wait_ready(self, timeout=None):
        if not self.shards:
            return await _Client.wait_ready(self, timeout)
        await asyncio.wait_for(asyncio.gather(*(shard.link_up.wait() for shard in self.shards)), timeout)

    async def close(self, grace=0.0):
        if not self.shards:
            return await _Client.close(self, grace)
        self.closing = True
        await asyncio.gather(*(shard.close(grace) for shard in self.shards))
        await self.stop_accepting()
        self._finish()

    def open_streams(self):
        if not self.shards:
            return _Client.open_streams(self)
        return sum(shard.open_streams() for shard in self.shards)

    async def link_established(self, link):
        for name in self.services:
            if not await self._register(link, name):
                # Its name, held by another: a sharer that had it waits (one line), never exits.
                if name not in self.held_elsewhere:
                    self.held_elsewhere.add(name)
                    log.warning("%s: the name %r is held by another sharer at the router; retrying "
                                "(stop the other sharer, or choose another name)", self.command, name)
                _spawn(self._reclaim(link, name), self.tasks)

    async def _register(self, link, name):
        """REGISTER `name` on `link`: True once it is ours, False if another sharer holds a
        name this sharer had before; PermanentError for any other refusal."""
        request = {"name": name, "owner": self.owners.next_link(name)}
        if self.secret:
            request.update(secret=True, verifier=self.secret_marker)
        reply = await link.request(REGISTER, request)
        if not reply.get("ok"):
            message = short_reason(reply.get("message", "refused"))
            if reply.get("code") in ("name-taken", "taken-over"):
                # Ours before, or held with a secret by what may be this sharer's own last run
                # (a host that died without closing its link): wait for it, never exit.
                if name in self.registered or (self.secret and reply.get("secret") is True):
                    return False
                raise PermanentError("%s; choose another name, or stop the other sharer" % message)
            raise PermanentError("the router refused to register %r: %s" % (name, message))
        self.held_elsewhere.discard(name)
        log.info("sharing %r -> %s through the router at %s%s", name, self.services[name],
                 self.router, " (again)" if name in self.registered else "")
        self.registered.add(name)
        return True

    async def _reclaim(self, link, name):
        """Ask for `name` again, with backoff, until it is ours or `link` is gone (the next
        link asks again).  Another refusal ends the link, and this sharer, with its reason."""
        delays = backoff_delays(*self.backoff)
        while not (self.closing or link.closing):
            delay = next(delays)
            log.debug("%s: asking for %r again in %.1f s", self.command, name, delay)
            await asyncio.sleep(delay)      # backoff, not synchronisation
            if self.closing or link.closing:
                return
            try:
                if await self._register(link, name):
                    return
            except PermanentError as exc:
                link.failure = exc
                link.abort(str(exc))
                return
            except asyncio.TimeoutError:
                continue                    # a slow router, or a dead link keepalive will end
            except LinkLost:
                return                      # the link went: the next one asks again

    def stream_requested(self, link, stream_id, info):
        name = info.get("service")
        target = self.services.get(name) if valid_name(name) else None
        stream = SharedStream(link, stream_id)
        stream.sharer, stream.service = self, name      # first: a bad OPEN below forgets it
        stream.end.start_with(*initial_windows(info))
        stream.early = open_data(info) or None
        stream.opener = str(info.get("peer", "?"))     # the router names the opening link
        stream.label = "%s#%d" % (name, stream_id)
        busy = target is not None and self.slots.over_limit(name, stream.opener)
        if self.closing:
            stream.refuse("the sharer of %r is shutting down" % (name,))
        elif target is None:
            stream.refuse("%r is not shared here" % (name,))
        elif busy:
            self.busy_log.refused("share: refused a stream to %r from %s (busy): %s"
                                  % (name, printable(stream.opener), busy))
            stream.refuse(busy, "busy")
        else:
            self.slots.take(stream)
            if self.e2e is not None or "e2e" in info:
                self._open_end_to_end(link, stream, info, target)
            else:
                stream.dialling = True          # from now until _dial() ends
                _spawn(self._dial(link, stream, target), self.tasks)

    def _open_end_to_end(self, link, stream, info, target):
        def dial(layer):
            stream.dialling = True
            _spawn(self._dial(link, stream, target, layer), self.tasks)
        if self.e2e is None:
            stream.refuse("service %r has no secret, so its streams cannot be encrypted end to end: "
                          "drop --secret, or share it with --secret" % stream.service)
        else:
            self.e2e.open(link, stream, info, dial)

    async def stop_accepting(self):
        self.busy_log.close()
        if self.e2e is not None:
            self.e2e.guess_log.close()

    async def _dial(self, link, stream, target, layer=None):
        host, port = target.host, target.port
        where = format_hostport(host, port)
        loop = _get_loop()
        task, expired = _current_task(), []
        timer = loop.call_later(DIAL_TIMEOUT, lambda: expired.append(True) or task.cancel())
        try:
            await target.connect(lambda: layer or stream)
        except asyncio.CancelledError:
            if not expired:
                raise
            reason = "target %s did not answer within %.0f s" % (where, DIAL_TIMEOUT)
        except socket.gaierror as exc:
            reason = "target host %r cannot be resolved: %s" % (host, exc.strerror)
        except OSError as exc:
            reason = "target %s: %s" % (where, _os_error_text(exc))
        else:
            timer.cancel()
            if stream.closed:                 # reset while we dialled
                _abort(stream.transport)
            elif layer is None:
                stream.accept({})
            return
        finally:
            timer.cancel()
            stream.dialling = False
            if (layer or stream).transport is None:
                self.slots.release(stream)      # no socket came of it
        log.warning("share: stream to %r refused: %s", stream.service, reason)
        if layer is None:
            stream.refuse(reason)
        else:                                   # accepted already: the reason rides the RESET
            stream.reset(reason)


def _opener_pairings(secret, service):
    """A forwarder's or connect's pairings, or None without a secret; the end-to-end TLS
    context is made now, so a host that cannot make it says so at start."""
    if not secret:
        return None
    e2e_context(server_side=False)
    return OpenerPairings(secret, service)


class ForwardedStream(LocalStream):
    """A local connection accepted by a forwarder: one stream to the service.  Its OPEN
    carries the client's first bytes when they come at once (optimistic open: the reply
    can start one stream round trip after connect, not two)."""

    wait_until = 0.0                # a connection that waited for the router may wait this long
    reads_before_open = True
    role = "forward"
    spake = keys = None             # --secret: the pairing its OPEN began, and the keys it uses

    def __init__(self, forwarder):
        LocalStream.__init__(self)
        self.forwarder = forwarder
        self.timer = None

    def connection_made(self, transport):
        LocalStream.connection_made(self, transport)
        self.forwarder.arrived(self)

    def data_received(self, data):
        LocalStream.data_received(self, data)
        if self.link is None and not self.closed:
            self.forwarder.first_data(self)

    def take_early(self):
        """The bytes for OPEN: kept until accepted, since a refused OPEN may be retried."""
        if self.early is None and self.pending is not None:
            pending = memoryview(self.pending)
            self.early = bytes(pending[:OPEN_DATA_MAX])
            self.pending = pending[OPEN_DATA_MAX:] if len(pending) > OPEN_DATA_MAX else None
        return self.early

    def connection_lost(self, exc):
        if self.link is None:
            self.closed = True
            self.forwarder.gave_up_waiting(self)
        else:
            LocalStream.connection_lost(self, exc)

    def on_open_ok(self, payload):
        self._cancel_timer()
        LocalStream.on_open_ok(self, payload)

    def accepted(self, info):
        self.early = None
        if self.e2e is None:
            return True
        try:
            self.keys = self.forwarder.pairings.accepted(self.spake, checked_e2e(OPEN_OK, info))
        except StreamError as exc:
            log.debug("forward: %s: %s", self.label, exc)
            self.e2e_failed("the sharer could not prove the secret")
            return False
        self.e2e.proofs.keys = self.keys
        self.timer = self.link.loop.call_later(OPEN_TIMEOUT, self._unconfirmed)
        return True

    def _unconfirmed(self):
        self.timer = None
        if not self.closed and not self.e2e.proofs.confirmed:
            self.e2e_failed("no proof from the sharer within %.0f s" % OPEN_TIMEOUT)

    def e2e_failed(self, why):
        if why.endswith("could not prove the secret"):
            self.say("the sharer of %r could not prove the secret (a different secret, or not the "
                     "real sharer)" % self.forwarder.service)
            if self.keys is not None:
                self.forwarder.pairings.forget(self.keys)
        else:
            self.say("stream %s: %s: %s; stream reset" % (self.label, E2E_FAILURE, why))
        self.reset("%s: %s" % (E2E_FAILURE, why))

    def say(self, text):
        log.warning("forward: %s", text)

    def reset_by_peer(self, reason):
        if self.e2e is not None and not self.e2e.delivered_any and not reason.startswith(E2E_FAILURE):
            self.refused(reason)        # with a secret the sharer dials after OPEN_OK: this is its refusal
        else:
            LocalStream.reset_by_peer(self, reason)

    def refused(self, reason):
        log.warning("forward: connection to %r refused: %s", self.forwarder.service, reason)

    def rekey_if_asked(self, info):
        """The sharer holds none of the pairings offered: open again, at once, with a new one."""
        if info.get("code") != "e2e-rekey" or self.e2e is None or self.spake is not None:
            return False
        link = self.link
        self.detach()
        self.spake = None
        self.forwarder._open(link, self, fresh=True)
        return True

    def on_open_refused(self, info):
        self._cancel_timer()
        self.end.receive(OPEN_REFUSED)
        reason = short_reason(info.get("reason", "refused"))
        if self.rekey_if_asked(info):
            return
        if info.get("code") == "no-service" and (self.link.loop.time() < self.wait_until or
                                                  self.forwarder.name_may_have_moved(self)):
            self.forwarder.wait_for_service(self)   # waited for the router: its sharer may be next
            return
        if info.get("code") == "busy":          # a flood of these is one line and a count
            self.forwarder.busy_log.refused("forward: connection to %r refused, the sharer is busy: %s"
                                            % (self.forwarder.service, reason))
        else:
            self.refused(reason)
        self._forget()
        if self.early is not None or self.pending is not None:
            _abort_with_reset(self.transport)   # bytes the client sent were lost: say so
        else:
            self.transport.close()

    def _cancel_timer(self):
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _forget(self):
        self._cancel_timer()
        LocalStream._forget(self)
        if self.e2e is not None:
            self.forwarder.pairings.ended(self.spake)


def _e2e_status(secret):
    return ("streams are encrypted end to end (--secret): the router sees only ciphertext" if secret else
            "streams are not encrypted end to end (no --secret): the router can read them")


def _with_e2e(stream, pairings):
    """The protocol for a forwarder's (or connect's) local connection: the stream itself,
    or with a secret an EndToEndLayer in front of it, which confirms its pairing."""
    if pairings is None:
        return stream
    return ForwarderEndToEnd(stream, session=pairings.tls_session,
                             on_confirmed=lambda layer: pairings.confirmed(stream.keys, layer.tls.session))


class Forwarder(_Client):
    """Listens locally; each accepted connection becomes a stream to `service`.

        forwarder = Forwarder("web", "127.0.0.1", 0, router="relay:7700")
        await forwarder.start()       # forwarder.port is the port really bound
    """

    command = "forward"

    def __init__(self, service, host="127.0.0.1", port=0, pending_timeout=PENDING_TIMEOUT,
                 secret=None, **options):
        _Client.__init__(self, name=service, **options)
        self.service = check_name(service)
        self.secret = secret
        self.pairings = _opener_pairings(secret, self.service)
        self.host, self.port = host, port
        self.pending_timeout = pending_timeout
        self.waiting = []
        self.server = None
        self.busy_log = RefusalLog("forward: connections to %r refused, the sharer is busy" % self.service)

    async def start(self):
        try:
            self.server = await _create_server(self._new_connection, self.host, self.port)
        except OSError as exc:
            raise MindmeldError("cannot listen on %s: %s" % (
                format_hostport(self.host or "*", self.port), exc.strerror or exc))
        self.addresses = [s.getsockname()[:2] for s in self.server.sockets]
        self.port = self.addresses[0][1]
        log.info("forwarding %s -> %r through the router at %s; %s",
                 ", ".join(format_hostport(h, p) for h, p in self.addresses), self.service, self.router,
                 _e2e_status(self.secret))
        return await _Client.start(self)

    def _new_connection(self):
        return _with_e2e(ForwardedStream(self), self.pairings)

    def _link_for_new_streams(self):
        """The link, unless it is down or going: a router that said GOAWAY (shutdown) lets
        open streams finish, and new ones wait for the next link."""
        link = self.link
        if link is not None and self.link_up.is_set() and not link.closing and link.goaway is None:
            return link
        return None

    def arrived(self, stream):
        link = self._link_for_new_streams()
        if self.closing:
            stream.transport.close()
        elif link is not None:          # open once its first bytes come, or at once if none do
            stream.timer = link.loop.call_later(OPEN_DATA_WAIT, self._open_if_new, link, stream)
        else:
            loop = _get_loop()
            if self.outages or self.link is not None:
                # the router is away, or going: it may come back before the sharer
                stream.wait_until = loop.time() + self.pending_timeout
            self.waiting.append(stream)
            stream.timer = loop.call_later(self.pending_timeout, self._expire, stream)

    def wait_for_service(self, stream):
        """The router is back but the service is not (yet): ask again shortly, until the
        connection's own deadline."""
        stream.detach()
        self.streams_changed()
        loop = _get_loop()
        self.waiting.append(stream)
        stream.timer = loop.call_later(min(SERVICE_RETRY_INTERVAL, max(0.0, stream.wait_until - loop.time())),
                                       self._ask_again, stream)

    def name_may_have_moved(self, stream):
        """No such name on a {name} router: the front may send it elsewhere now.  Check at
        once, and let the connection wait a little for the answer (once)."""
        if self.recheck is None or stream.wait_until:
            return False
        stream.wait_until = _get_loop().time() + min(self.pending_timeout, SHARD_MOVE_WAIT)
        self.recheck.set()
        return True

    def _ask_again(self, stream):
        if stream not in self.waiting:
            return
        loop = _get_loop()
        if loop.time() >= stream.wait_until:
            return self._expire(stream)
        link = self._link_for_new_streams()
        if link is not None:
            self.waiting.remove(stream)
            self._open(link, stream)
        else:
            stream.timer = loop.call_later(stream.wait_until - loop.time(), self._expire, stream)

    def _expire(self, stream):
        if stream in self.waiting:
            self.waiting.remove(stream)
            log.warning("forward: %r not reachable within %g s; closing a waiting connection",
                        self.service, self.pending_timeout)
            stream.closed = True
            stream.transport.close()

    def gave_up_waiting(self, stream):
        if stream in self.waiting:
            self.waiting.remove(stream)
            stream._cancel_timer()

    def first_data(self, stream):
        if stream.timer is not None and stream not in self.waiting:
            link = self._link_for_new_streams()
            if link is not None:
                self._open_if_new(link, stream)

    def _open_if_new(self, link, stream):
        if stream.link is None and not stream.closed:
            if link is self._link_for_new_streams():
                self._open(link, stream)
            else:
                stream._cancel_timer()
                self.arrived(stream)

    def _open(self, link, stream, fresh=False):
        stream._cancel_timer()
        info = {"service": self.service}
        if stream.e2e is not None:
            self.pairings.ended(stream.spake)       # a pairing its refused OPEN began is over
            try:
                info["e2e"], stream.spake = self.pairings.offer(fresh)
            except E2ERefused as exc:
                self.busy_log.refused("forward: connection to %r refused: %s" % (self.service, exc.reason))
                stream.closed = True
                _abort_with_reset(stream.transport)
                return
            if info["e2e"] is None:     # another connection is pairing: this one goes after it
                self.pairings.wait(lambda: self._after_pairing(stream, fresh))
                stream.timer = link.loop.call_later(OPEN_TIMEOUT, self._expire_unopened, stream)
                return
        early = stream.take_early()
        if early:
            info["data"] = base64.b64encode(early).decode("ascii")
        link.open_stream(stream, info)
        stream.label = "%s#%d" % (self.service, stream.id)
        stream.timer = link.loop.call_later(OPEN_TIMEOUT, stream.reset, "not accepted in time")

    def _after_pairing(self, stream, fresh):
        if stream.closed or stream.link is not None:
            return
        link = self._link_for_new_streams()
        if link is None:
            stream._cancel_timer()
            self.arrived(stream)        # waits for the router, as a new connection would
        else:
            self._open(link, stream, fresh)

    def _expire_unopened(self, stream):
        if not stream.closed and stream.link is None:
            log.warning("forward: a connection to %r waited %.0f s for a pairing; closing it",
                        self.service, OPEN_TIMEOUT)
            stream.closed = True
            stream.transport.close()

    async def link_established(self, link):
        waiting, self.waiting = self.waiting, []
        for stream in waiting:
            if not stream.closed:
                self._open(link, stream)

    async def stop_accepting(self):
        self.busy_log.close()
        if self.server is not None:
            await _close_server(self.server)
        for stream in self.waiting:
            stream.transport.close()
        self.waiting = []


class StdioStream(ForwardedStream):
    """`connect`: the one stream, joined to standard input and output.  Its OPEN goes
    before anything is read (stdin may never say anything), so no first bytes ride in it."""

    reads_before_open = False
    role = "connect"

    def __init__(self, connector):
        ForwardedStream.__init__(self, connector)
        self.connector = connector
        self.failure = None

    def refused(self, reason):
        self.fail_with("cannot open a stream to %r: %s" % (self.connector.service, reason))

    def say(self, text):
        self.fail_with(text)

    def fail_with(self, text):
        """Say it now: a parent like ssh ends us as soon as our stdout closes."""
        if self.failure is None:
            self.failure = text
            sys.stderr.write("mindmeld connect: error: %s\n" % text)
            sys.stderr.flush()

    def connection_made(self, transport):
        LocalStream.connection_made(self, transport)

    def connection_lost(self, exc):
        LocalStream.connection_lost(self, exc)
        self.connector.finished(self)

    def on_open_refused(self, info):
        self.end.receive(OPEN_REFUSED)
        if self.rekey_if_asked(info):
            return
        self.refused(short_reason(info.get("reason", "refused")))
        self._forget()
        self.transport.close()

    def reset_by_peer(self, reason):
        self.fail_with("the stream to %r was reset: %s" % (self.connector.service, reason))

    def link_lost(self, reason):
        self.fail_with("the link to the router was lost: %s" % reason)
        ForwardedStream.link_lost(self, reason)


class Connector(_Client):
    """`connect NAME`: one stream to NAME on standard input/output (ssh's ProxyCommand)."""

    command = "connect"

    def __init__(self, service, read_fd=0, write_fd=1, secret=None, **options):
        _Client.__init__(self, name=service, **options)
        self.service = check_name(service)
        self.secret = secret
        self.pairings = _opener_pairings(secret, self.service)
        self.read_fd, self.write_fd = read_fd, write_fd
        self.ended = None

    async def run(self):
        self.ended = _get_loop().create_future()
        link = await self.connect_link()
        self.link = link
        try:
            stream = StdioStream(self)
            protocol = _with_e2e(stream, self.pairings)
            log.info("connect: a stream to %r through the router at %s; %s",
                     self.service, self.router, _e2e_status(self.secret))
            self._open(link, stream)
            read_fd, write_fd = self.read_fd, self.write_fd
            if (read_fd, write_fd) == (0, 1):
                read_fd, write_fd = _take_stdio()
            _StdioTransport(_get_loop(), protocol, read_fd, write_fd)
            await self.ended
        finally:
            await self._close_link(link)
        return 1 if stream.failure else 0      # a failure was already reported on stderr

    def _open(self, link, stream, fresh=False):
        info = {"service": self.service}
        if stream.e2e is not None:
            try:
                info["e2e"], stream.spake = self.pairings.offer(fresh)
            except E2ERefused as exc:
                stream.refused(exc.reason)
                stream.closed = True
                stream.transport.close()
                return
        link.open_stream(stream, info)

    def finished(self, stream):
        if self.ended is not None and not self.ended.done():
            self.ended.set_result(None)

    def link_down(self, link, reason):
        pass


async def list_services(router=None, name=None, **options):
    """The router's registry: [{"name", "since", "age", "streams", "peer", "secret"}]; only
    `name`'s entry if given (with a {name} router: asked of the router that holds it)."""
    client = _Client(router, name=name, **options)
    client.command = "list"
    if client.sharded and name is None:
        raise UsageError("the router address %s has {name}: each router behind it knows only its "
                         "own names, so give one: list NAME" % client.router)
    link = await client.connect_link()
    services, request = [], {"limit": LIST_PAGE_MAX}
    try:
        for _ in range(LIST_PAGES_MAX):     # a page at a time; a router without pages sends one
            reply = await link.request(LIST, request)
            page = reply.get("services", [])
            if not isinstance(page, list) or not all(isinstance(s, dict) for s in page):
                raise ProtocolError("the router at %s sent a malformed LIST_REPLY" % client.router)
            services.extend(s for s in page if name is None or s.get("name") == name)
            if len(services) > LIST_SERVICES_MAX:
                raise ProtocolError("the router at %s listed more than %d services"
                                    % (client.router, LIST_SERVICES_MAX))
            if not reply.get("more") or not page:
                return services
            after = page[-1].get("name")
            if not isinstance(after, str) or ("after" in request and after <= request["after"]):
                raise ProtocolError("the router at %s sent LIST_REPLY pages out of order" % client.router)
            request = {"after": after, "limit": LIST_PAGE_MAX}
        raise ProtocolError("the router at %s sent more than %d pages of services"
                            % (client.router, LIST_PAGES_MAX))
    except asyncio.TimeoutError:
        raise LinkLost("the router at %s did not answer the list request within %.0f s"
                       % (client.router, HANDSHAKE_TIMEOUT))
    finally:
        link.close()


# ###########################################################################
# ### 8. bench: the whole tool on this machine, measured
# ###########################################################################

BENCH_SIZES = {  # (single-stream bytes, per-stream bytes x 100 streams, round trips, seconds of new streams)
    "default": (1 << 30, 4 << 20, 5000, 2.0),
    "quick": (128 << 20, 1 << 20, 1000, 0.7),
    "smoke": (8 << 20, 64 << 10, 100, 0.2),     # hidden --smoke: the machinery, not figures
}
_TRAILER = struct.Struct("!QB")     # bytes received, verified ok
BENCH_SECRET = "bench-secret"       # bench --secret's: the figures, not the secret, are the point


def _bench_pattern():
    """1 MiB of fixed pseudo-random bytes, doubled so any slice up to 1 MiB is contiguous."""
    block = b"".join(hashlib.sha256(struct.pack("!I", i)).digest() for i in range(32768))
    return block, block + block


class _PatternCheck:
    def __init__(self, pattern):
        self.size, self.doubled = len(pattern[0]), pattern[1]
        self.count, self.ok = 0, True

    def feed(self, data):
        start = self.count % self.size
        for piece in range(0, len(data), self.size):        # recv() chunks are < 1 MiB anyway
            chunk = data[piece:piece + self.size]
            if self.doubled[start:start + len(chunk)] != chunk:
                self.ok = False
            start = (start + len(chunk)) % self.size
        self.count += len(data)


def _send_pattern(sock, pattern, n, quietly=False):
    """quietly: in a thread of its own, where the receiver reports a shortfall."""
    size, doubled, sent = len(pattern[0]), memoryview(pattern[1]), 0
    try:
        while sent < n:
            start = sent % size
            sent += sock.send(doubled[start:start + min(n - sent, 256 * 1024)])
    except OSError:
        if not quietly:
            raise


def _recv_exact(sock, n):
    data = b""
    while len(data) < n:
        more = sock.recv(n - len(data))
        if not more:
            raise MindmeldError("bench: the connection closed early")
        data += more
    return data


def _recv_checked(sock, pattern, n=None):
    check = _PatternCheck(pattern)
    while n is None or check.count < n:
        data = sock.recv(256 * 1024 if n is None else min(256 * 1024, n - check.count))
        if not data:
            break
        check.feed(data)
    return check


def _bench_target_connection(conn, pattern):
    """The target's side of one bench connection; the first byte says what to do."""
    try:
        conn.settimeout(60)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        command = conn.recv(1)
        if command == b"P":
            conn.sendall(b"p")
        elif command == b"E":
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                conn.sendall(data)
        elif command in (b"U", b"D", b"B"):
            n = struct.unpack("!Q", _recv_exact(conn, 8))[0]
            sender = None
            if command in (b"D", b"B"):
                import threading
                sender = threading.Thread(target=_send_pattern, args=(conn, pattern, n, True),
                                          daemon=True)
                sender.start()
            if command == b"D":
                sender.join()
                conn.shutdown(socket.SHUT_WR)
                while conn.recv(65536):
                    pass
                return
            check = _recv_checked(conn, pattern)
            if sender is not None:
                sender.join()
            conn.sendall(_TRAILER.pack(check.count, check.ok))
    except (OSError, MindmeldError):
        pass
    finally:
        conn.close()


def _bench_target(listener, pattern, stop):
    import threading
    listener.settimeout(0.2)
    while not stop.is_set():
        try:
            conn, _ = listener.accept()
        except socket.timeout:
            continue
        except OSError:
            return
        threading.Thread(target=_bench_target_connection, args=(conn, pattern), daemon=True).start()


def _bench_folder(prefix="mindmeld-bench-"):
    """A temporary folder (a router's state, sshd's files) removed when the bench exits."""
    import atexit
    folder = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, folder, True)
    return folder


def _bench_connect(port):
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _bench_transfer(port, pattern, command, n):
    """One connection moving n bytes: U(pload), D(ownload) or B(oth ways); checked."""
    import threading
    sock = _bench_connect(port)
    try:
        sock.sendall(command + struct.pack("!Q", n))
        sender = None
        if command in (b"U", b"B"):
            def send():
                _send_pattern(sock, pattern, n, quietly=True)
                try:
                    sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass        # the count the target sends back tells
            sender = threading.Thread(target=send, daemon=True)
            sender.start()
        if command in (b"D", b"B"):
            check = _recv_checked(sock, pattern, n)
            if check.count != n or not check.ok:
                raise MindmeldError("bench: download check failed (%d of %d bytes, ok=%s)"
                                    % (check.count, n, check.ok))
        if sender is not None:
            sender.join()
        if command == b"D":
            sock.shutdown(socket.SHUT_WR)
            return
        count, ok = _TRAILER.unpack(_recv_exact(sock, _TRAILER.size))
        if count != n or not ok:
            raise MindmeldError("bench: upload check failed (%d of %d bytes, ok=%s)" % (count, n, ok))
    finally:
        sock.close()


def _in_threads(count, work, what):
    """work() in `count` threads at once; any failure ends the phase with one line."""
    import threading
    errors = []

    def run():
        try:
            work()
        except Exception as exc:   # reported below, for the whole phase
            errors.append(exc)
    threads = [threading.Thread(target=run, daemon=True) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        first = str(errors[0]) or type(errors[0]).__name__
        raise MindmeldError("bench: %d of %d %s failed: %s" % (len(errors), count, what, first))


def _bench_new_streams(port, seconds, threads):
    """New streams a second: `threads` threads each opening one, asking P, reading p and
    closing it, over and over for `seconds`."""
    counts = []

    def opener():
        n = 0
        while time.perf_counter() < deadline:
            s = _bench_connect(port)
            try:
                s.sendall(b"P")
                if s.recv(1) != b"p":
                    raise MindmeldError("a new stream got no answer")
            finally:
                s.close()
            n += 1
        counts.append(n)
    began = time.perf_counter()
    deadline = began + seconds
    _in_threads(threads, opener, "threads opening new streams")
    return sum(counts) / (time.perf_counter() - began)


def _bench_measure(port, sizes, pattern, say, cpu_seconds=None, one_at_a_time=False):
    """`cpu_seconds()`: the relays' CPU so far, read around the phases that move data
    (round trips and new streams cost CPU per stream, not per byte).  one_at_a_time:
    also new streams opened by one thread, each after the last (what a handshake costs)."""
    single, per_stream, round_trips, stream_seconds = sizes
    result = {}
    cpu_before = cpu_seconds() if cpu_seconds else None
    for key, command in (("upload_MBps", b"U"), ("download_MBps", b"D")):
        say("%s %d MB" % (key.split("_")[0], single // 10 ** 6))
        began = time.perf_counter()
        _bench_transfer(port, pattern, command, single)
        result[key] = single / (time.perf_counter() - began) / 1e6
    say("100 streams x %d MB both ways" % (per_stream // 10 ** 6))
    began = time.perf_counter()
    _in_threads(100, lambda: _bench_transfer(port, pattern, b"B", per_stream), "concurrent streams")
    result["concurrent_MBps"] = 2 * 100 * per_stream / (time.perf_counter() - began) / 1e6
    result["bytes_moved"] = 2 * single + 2 * 100 * per_stream
    cpu_after = cpu_seconds() if cpu_seconds else None
    if cpu_before is not None and cpu_after is not None:
        result["cpu_s_per_GB"] = (cpu_after - cpu_before) / (result["bytes_moved"] / 1e9)
    say("%d round trips of 64 bytes" % round_trips)
    sock = _bench_connect(port)
    try:
        sock.sendall(b"E")
        message, times = os.urandom(64), []
        for _ in range(round_trips):
            began = time.perf_counter()
            sock.sendall(message)
            if _recv_exact(sock, 64) != message:
                raise MindmeldError("bench: an echoed message came back changed")
            times.append(time.perf_counter() - began)
    finally:
        sock.close()
    times.sort()
    result["rtt_p50_us"] = times[len(times) // 2] * 1e6
    result["rtt_p99_us"] = times[int(len(times) * 0.99)] * 1e6
    say("new streams for %.1f s" % stream_seconds)
    result["streams_per_s"] = _bench_new_streams(port, stream_seconds, 8)
    if one_at_a_time:
        say("new streams one at a time for %.1f s" % stream_seconds)
        result["streams_serial_per_s"] = _bench_new_streams(port, stream_seconds, 1)
    return result


def _proc_cpu_seconds(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _proc_memory_mb(pid, field="VmRSS"):
    """A process's memory from /proc/PID/status: VmRSS (now) or VmHWM (peak); None elsewhere."""
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError):
        pass
    return None


# Readiness, for programs that start roles (the bench does): `--ready-fd FD` makes a
# role write one JSON line to FD once it is ready, instead of them reading its log.

def ready_report(role):
    """What a ready role reports: {"role", "listen": [[host, port], ...]} for a router or
    a forwarder (the addresses really bound), plus "service" for a forwarder and
    "services" (names) for a sharer."""
    report = {"role": role.command}
    if getattr(role, "addresses", None):
        report["listen"] = [[host, port] for host, port in role.addresses]
    if isinstance(role, Forwarder):
        report["service"] = role.service
    if isinstance(role, Sharer):
        report["services"] = sorted(role.services)
    return report


def check_ready_fd(fd):
    """A --ready-fd that is not open is the user's mistake: say so before starting."""
    try:
        os.fstat(fd)
    except OSError as exc:
        raise MindmeldError("--ready-fd %d: %s (give a file descriptor open for writing)"
                            % (fd, exc.strerror or exc))


def _write_ready(fd, report):
    """One line, in one write (well under PIPE_BUF); FD is closed after unless it is 0-2,
    which a later socket could otherwise take over."""
    try:
        os.write(fd, (json.dumps(report, separators=(",", ":")) + "\n").encode())
    finally:
        if fd > 2:
            os.close(fd)


async def announce_ready(role, fd):
    """Once `role` is ready (a router or forwarder listens at start(); a client has its
    link, and a sharer every name registered), report it on fd, once."""
    if hasattr(role, "wait_ready"):
        await role.wait_ready()
    try:
        _write_ready(fd, ready_report(role))
    except OSError as exc:      # the reader went away: its business, not a reason to stop
        log.warning("%s: cannot write the ready report to --ready-fd %d: %s",
                    role.command, fd, exc.strerror or exc)


class _Child:
    """A role started as `python3 mindmeld.py ... --ready-fd 1`: its readiness report is
    the one line it writes on standard output, which is a pipe for nothing else.  Its log
    goes to a file, read back only to say why it did not start."""

    def __init__(self, argv, what, timeout=30.0):
        import subprocess
        import threading
        import queue
        import tempfile
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen([sys.executable, "-u"] + argv, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=self.log)
        lines = queue.Queue()
        threading.Thread(target=lambda: lines.put(self.process.stdout.readline()), daemon=True).start()
        try:
            line = lines.get(timeout=timeout)       # b"" if it exited first
        except queue.Empty:
            line = b""
        try:
            self.report = json.loads(line.decode("utf-8"))
        except ValueError:
            self.report = None
        if not isinstance(self.report, dict):
            self._end()
            self.log.seek(0)
            said = self.log.read().decode("utf-8", "replace").strip().splitlines()
            self.log.close()
            raise MindmeldError("bench: the %s did not start%s" % (
                what, ": " + said[-1] if said else " within %.0f s" % timeout))
        listen = self.report.get("listen")
        self.port = listen[0][1] if listen else None

    def _end(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except Exception:
                self.process.kill()
                self.process.wait()
        self.process.stdout.close()

    def stop(self):
        self._end()
        self.log.close()


# -- bench --secret's comparison: the same client through an ssh -R/-L chain -------------
# What ssh offers for the same job: the sharing side `ssh -R` to a jump host, the
# forwarding side `ssh -L` to it, an sshd of the bench's own on loopback in between.  ssh is
# never needed: without it the comparison is left out, in one line.

class SshUnavailable(MindmeldError):
    """Why the ssh comparison cannot run here."""


def _free_port():
    """A port free on 127.0.0.1 now, for programs that cannot report the one they bind."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _descendants(pid):
    """pid's child processes, their children and so on (from /proc; [] elsewhere)."""
    parents = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    for name in names:
        if name.isdigit():
            try:
                with open("/proc/%s/stat" % name) as f:
                    parents.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(name))
            except (OSError, ValueError, IndexError):
                pass            # it ended meanwhile
    found, todo = [], [pid]
    while todo and len(found) < 10000:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


class _SshChain:
    """An sshd on 127.0.0.1 with a throwaway host key that lets in this user with a
    throwaway key; `ssh -R` from it to the target, `ssh -L` at .port into it."""

    def __init__(self, target_port, say, timeout=15.0):
        import subprocess
        import getpass
        tools = {}
        for tool in ("ssh", "sshd", "ssh-keygen"):
            tools[tool] = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/usr/local/sbin:/sbin")
            if tools[tool] is None:
                raise SshUnavailable("%s not found (install openssh-server and openssh-client for it)" % tool)
        self.processes, self.folder = [], _bench_folder("mindmeld-bench-ssh-")
        self.port = None
        try:
            self._start(tools, target_port, getpass.getuser(), subprocess, timeout)
        except BaseException:
            self.close()
            raise
        say("ssh chain started: sshd on 127.0.0.1:%d, ssh -R and ssh -L (%s)" % (
            self.sshd_port, subprocess.run([tools["ssh"], "-V"], stdout=subprocess.PIPE,
                                           stderr=subprocess.STDOUT).stdout.decode().split(",")[0].strip()))

    def _start(self, tools, target_port, user, subprocess, timeout):
        def keygen(name):
            path = os.path.join(self.folder, name)
            subprocess.run([tools["ssh-keygen"], "-q", "-t", "ed25519", "-N", "", "-f", path],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
            return path
        host_key, user_key = keygen("host_key"), keygen("user_key")
        authorized = os.path.join(self.folder, "authorized_keys")
        shutil.copy(user_key + ".pub", authorized)
        self.sshd_port, remote_port, self.port = _free_port(), _free_port(), _free_port()
        config = os.path.join(self.folder, "sshd_config")
        with open(config, "w") as f:
            f.write("ListenAddress 127.0.0.1:%d\nHostKey %s\nAuthorizedKeysFile %s\nPidFile none\n"
                    "UsePAM no\nStrictModes no\nPasswordAuthentication no\n"
                    "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
                    "AllowTcpForwarding yes\nMaxStartups 100\nLogLevel ERROR\n"
                    % (self.sshd_port, host_key, authorized))
        self.sshd = self._spawn(subprocess, [tools["sshd"], "-D", "-e", "-f", config], "sshd")
        self.ssh = [tools["ssh"], "-F", "/dev/null", "-i", user_key, "-p", str(self.sshd_port),
                    "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                    "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
                    "-o", "ExitOnForwardFailure=yes"]
        self.remote_port, self.destination = remote_port, "%s@127.0.0.1" % user
        deadline = time.monotonic() + timeout
        self._wait(lambda: self._answers(self.sshd_port, None), deadline, "sshd")
        self._spawn(subprocess, self.ssh + ["-N", "-R", "127.0.0.1:%d:127.0.0.1:%d" % (remote_port, target_port),
                                            self.destination], "ssh -R")
        self._spawn(subprocess, self.ssh + ["-N", "-L", "127.0.0.1:%d:127.0.0.1:%d" % (self.port, remote_port),
                                            self.destination], "ssh -L")
        self._wait(lambda: self._answers(self.port, b"P"), deadline, "the ssh chain")

    def _spawn(self, subprocess, argv, what):
        log_file = open(os.path.join(self.folder, "%d.log" % len(self.processes)), "w+b")
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log_file)
        self.processes.append((process, what, log_file))
        return process

    @staticmethod
    def _answers(port, probe):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                if probe is None:
                    return sock.recv(4).startswith(b"SSH-")
                sock.sendall(probe)
                return sock.recv(1) == b"p"
        except OSError:
            return False

    def _wait(self, ready, deadline, what):
        while time.monotonic() < deadline:
            for process, name, log_file in self.processes:
                if process.poll() is not None:
                    log_file.seek(0)
                    said = log_file.read().decode("utf-8", "replace").strip().splitlines()
                    raise SshUnavailable("%s exited%s" % (name, ": " + said[-1] if said else ""))
            if ready():
                return
            time.sleep(0.05)    # polling programs that do not report readiness
        raise SshUnavailable("%s was not ready in time" % what)

    def cpu_seconds(self):
        """CPU so far of sshd (with its session processes) and the two ssh clients."""
        pids = [p.pid for p, _, _ in self.processes] + _descendants(self.sshd.pid)
        seconds = [_proc_cpu_seconds(pid) for pid in pids]
        return sum(s for s in seconds if s is not None) if seconds[0] is not None else None

    def connections_per_s(self, seconds):
        """A new ssh connection for every stream (`ssh -W`, as a ProxyCommand would):
        connect, ask P, read p, end; one after another for `seconds` (3 at least)."""
        import subprocess
        argv = self.ssh + ["-W", "127.0.0.1:%d" % self.remote_port, self.destination]
        count, began = 0, time.perf_counter()
        while count < 3 or time.perf_counter() < began + seconds:
            process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=subprocess.DEVNULL)
            try:
                answer, _ = process.communicate(b"P", timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.communicate()
                answer = b""
            if answer != b"p":
                raise MindmeldError("bench: a new ssh connection got no answer")
            count += 1
        return count / (time.perf_counter() - began)

    def close(self):
        for process, _, log_file in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(10)
                except Exception:
                    process.kill()
                    process.wait()
            log_file.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def _bench_ssh(target_port, sizes, pattern, say):
    """The ssh chain's figures, or None (said in one line) when there is no ssh here."""
    try:
        chain = _SshChain(target_port, say)
    except SshUnavailable as exc:
        say("no ssh comparison: %s" % exc)
        return None
    try:
        result = _bench_measure(chain.port, sizes, pattern, lambda t: say("  ssh: " + t),
                                chain.cpu_seconds, one_at_a_time=True)
        say("  ssh: a new ssh connection per stream for %.1f s" % sizes[3])
        result["connections_per_s"] = chain.connections_per_s(sizes[3])
        return result
    finally:
        chain.close()


def serve_bench_target(lifetime=900.0):
    """`bench --serve-target`: the bench's target, in a process of its own."""
    import threading
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    _write_ready(1, {"role": "target", "listen": [list(listener.getsockname()[:2])]})
    stop = threading.Event()
    threading.Thread(target=_bench_target, args=(listener, _bench_pattern(), stop), daemon=True).start()
    stop.wait(lifetime)         # bounded; the bench terminates it long before
    return 0


class _InProcessRoles:
    """The three roles in one background event loop: how bench runs when piped in."""

    def __init__(self, target_port, tls, secret=None):
        import threading
        import queue
        self.ready = queue.Queue()
        self.loop = None
        self.thread = threading.Thread(target=self._main, args=(target_port, tls, secret), daemon=True)
        self.thread.start()
        outcome = self.ready.get(timeout=60)
        if isinstance(outcome, BaseException):
            raise outcome
        self.port = outcome

    def _main(self, target_port, tls, secret):
        log.setLevel(logging.WARNING)       # the roles' lines would interleave with the bench's

        async def main():
            self.loop, self.stop = _get_loop(), asyncio.Event()
            context, client_tls = None, None
            if tls:
                context, fingerprint = router_tls_context(None, None, _bench_folder())
                client_tls = TlsOptions(fingerprint=fingerprint)
            router = await Router("127.0.0.1", 0, ssl_context=context).start()
            where = "127.0.0.1:%d" % router.port
            sharer = Sharer({"bench": ("127.0.0.1", target_port)}, router=where, tls=client_tls,
                            secret=secret)
            forwarder = Forwarder("bench", "127.0.0.1", 0, router=where, tls=client_tls, secret=secret)
            for role in (sharer, forwarder):
                await role.start()
                await role.wait_ready(30)
            self.ready.put(forwarder.port)
            await self.stop.wait()
            for role in (forwarder, sharer, router):
                await role.close()
        try:
            _run(main())
        except BaseException as exc:
            self.ready.put(exc)

    def close(self):
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.stop.set)
            self.thread.join(10)


def run_bench(quick=False, json_path=None, tls=False, scale=False, secret=False, out=sys.stdout):
    """`mindmeld.py bench`: router, sharer and forwarder as separate processes, a target,
    and the same measurements through the tunnel and straight to the target.  secret:
    streams encrypted end to end (--secret on share and forward), and beside them an ssh
    -R/-L chain where ssh is installed (not with the hidden --smoke)."""
    import threading
    sizes = BENCH_SIZES["smoke" if quick == "smoke" else "quick" if quick else "default"]
    pattern = _bench_pattern()
    script = sys.argv[0] if sys.argv and os.path.isfile(sys.argv[0]) else None
    say = _bench_say
    children, results, in_process = [], {}, None
    stop = threading.Event()
    descriptors = _raise_descriptor_limit() if scale else None     # before any child starts
    target_port = _bench_start_target(script, pattern, stop, children)
    try:
        say("direct to the target on 127.0.0.1:%d" % target_port)
        results["direct"] = _bench_measure(target_port, sizes, pattern, lambda t: say("  direct: " + t))
        if script is None:
            say("this script was piped in (python3 -), so it cannot start itself as separate "
                "processes: the router, sharer and forwarder run in this process, beside the "
                "client, and share its CPU (save it as mindmeld.py for fair numbers)")
            in_process = _InProcessRoles(target_port, tls, BENCH_SECRET if secret else None)
            port, pids, router_pid = in_process.port, [], None
        else:
            port, pids, router_pid = _bench_start_roles(script, target_port, tls, secret, children)
        if scale and pids:      # first, while the router is fresh: its idle footprint
            results["scale"] = _run(_bench_scale(port, pids, say))

        def relays_cpu():
            seconds = [_proc_cpu_seconds(p) for p in pids]
            return sum(seconds) if pids and None not in seconds else None
        results["mindmeld"] = result = _bench_measure(
            port, sizes, pattern, lambda t: say("  mindmeld: " + t), relays_cpu, one_at_a_time=secret)
        result.setdefault("cpu_s_per_GB", None)
        result["router_peak_rss_MB"] = _proc_memory_mb(router_pid, "VmHWM") if router_pid else None
        if secret and quick == "smoke":
            say("no ssh comparison with --smoke")
        elif secret:
            results["ssh"] = _bench_ssh(target_port, sizes, pattern, say)
        if scale and pids:      # last: a router of their own, killed on the way
            results["scale"].update(_bench_links_and_storm(script, quick, descriptors, say))
    finally:
        stop.set()
        if in_process is not None:
            in_process.close()
        for child in reversed(children):
            child.stop()
    _bench_report(results, out)
    if json_path:
        _bench_write_json(json_path, {
            "mindmeld": results["mindmeld"], "direct": results["direct"], "ssh": results.get("ssh"),
            "scale": results.get("scale"), "tls": tls, "secret": secret, "in_process": script is None,
            "python": sys.version.split()[0], "quick": quick})
    storm = (results.get("scale") or {}).get("restart_storm")
    if storm and storm["back"] < storm["peers"]:
        raise MindmeldError("bench: restart storm: only %d of %d peers were back within %.0f s of the "
                            "router's restart (sharers %d of %d, forwarders %d of %d)" % (
                                storm["back"], storm["peers"], storm["limit_s"], storm["sharers_back"],
                                storm["sharers"], storm["forwarders_back"], storm["forwarders"]))
    return 0


def _bench_say(text):
    sys.stderr.write("bench: %s\n" % text)
    sys.stderr.flush()


def _bench_write_json(path, results):
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    _bench_say("wrote %s" % path)


def _bench_start_target(script, pattern, stop, children):
    """The target's port: in its own process (no GIL shared with the client), or where this
    script was piped in, a thread of this one until `stop` is set."""
    if script is not None:
        children.append(_Child([script, "bench", "--serve-target"], "target"))
        return children[-1].port
    import threading
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    threading.Thread(target=_bench_target, args=(listener, pattern, stop), daemon=True).start()
    return listener.getsockname()[1]


def _bench_start_roles(script, target_port, tls, secret, children):
    """Router, sharer and forwarder as processes, appended to `children`: (the forwarder's
    port, the three pids, the router's pid)."""
    state_dir = _bench_folder()
    ready = ["--ready-fd", "1"]
    router = _Child([script, "router", "--listen", "127.0.0.1:0", "--state-dir", state_dir]
                    + (["--tls"] if tls else []) + ready, "router")
    roles = [router]
    children.append(router)
    options = ["--router", "127.0.0.1:%d" % router.port] + ready
    if tls:     # the certificate the router made there: pin it
        options += ["--tls-fingerprint", router_tls_context(None, None, state_dir)[1]]
    if secret:
        secret_file = os.path.join(state_dir, "secret")
        with open(secret_file, "w") as f:
            f.write(BENCH_SECRET)
        options += ["--secret-file", secret_file]
    for argv, what in (([script, "share", "bench", "127.0.0.1:%d" % target_port], "sharer"),
                       ([script, "forward", "bench", "127.0.0.1:0"], "forwarder")):
        roles.append(_Child(argv + options, what))
        children.append(roles[-1])
    pids = [role.process.pid for role in roles]
    _bench_say("router%s, sharer and forwarder started (pids %s)%s" % (
        " (TLS)" if tls else "", ", ".join(map(str, pids)),
        "; --secret: streams encrypted end to end" if secret else ""))
    return roles[-1].port, pids, router.process.pid


async def _bench_scale(port, pids, say):
    """Memory and scale: 1,000 idle streams, 5,000 concurrent verified streams,
    100 stalled readers.  pids are the router's, the sharer's and the forwarder's."""
    loop = _get_loop()
    result = {}

    async def open_echo():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"E!")
        if await reader.readexactly(1) != b"!":
            raise MindmeldError("bench: an echo stream answered wrongly")
        return reader, writer

    say("scale: 1000 idle streams")
    rss_before = [_proc_memory_mb(p) for p in pids]
    gate = asyncio.Semaphore(200)

    async def gated(coro_factory):
        async with gate:
            return await coro_factory()
    idle = await asyncio.gather(*[gated(open_echo) for _ in range(1000)])
    result["router_rss_1000_idle_MB"] = _proc_memory_mb(pids[0])
    result["rss_growth_1000_idle_MB"] = [a - b for a, b in zip([_proc_memory_mb(p) for p in pids], rss_before)]
    for _reader, writer in idle:
        writer.close()

    say("scale: 5000 concurrent streams, 16 KiB each way, verified")

    async def exchange():
        reader, writer = await open_echo()
        message = os.urandom(16384)
        writer.write(message)
        writer.write_eof()
        echoed = await reader.read(-1)
        writer.close()
        return echoed == message
    began = loop.time()
    outcomes = await asyncio.gather(*[gated(exchange) for _ in range(5000)], return_exceptions=True)
    result["streams_5000_ok"] = sum(1 for o in outcomes if o is True)
    result["streams_5000_s"] = loop.time() - began

    say("scale: 100 stalled readers pushed at")
    result["rss_growth_100_stalled_MB"] = await _bench_stalled_readers(port, pids)
    return result


async def _bench_stalled_readers(port, pids):
    """How much the roles' memory grows while 100 downloads are never read."""
    loop = _get_loop()
    rss_before = [_proc_memory_mb(p) for p in pids]
    stalled = []
    for _ in range(100):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"D" + struct.pack("!Q", 1 << 40))         # a download that is never read
        stalled.append(writer)
    previous, steady_since = None, loop.time()
    deadline = loop.time() + 15
    while loop.time() < deadline:       # until memory stops moving for 1 s (bounded)
        await asyncio.sleep(0.2)
        now = [_proc_memory_mb(p) for p in pids]
        if previous is None or max(abs(a - b) for a, b in zip(now, previous)) > 0.5:
            previous, steady_since = now, loop.time()
        elif loop.time() - steady_since > 1.0:
            break
    for writer in stalled:
        writer.close()
    return [a - b for a, b in zip(previous, rss_before)]


SCALE_LINKS = {"default": 5000, "quick": 1000}    # idle links, and restart storm peers
STORM_LIMIT = 60.0          # s: the restart storm fails unless every peer is back within this
STORM_PEERS_CODE = (        # the storm's peers: this file imported, whatever its name
    "import importlib.util, sys\n"
    "spec = importlib.util.spec_from_file_location('mindmeld', sys.argv[1])\n"
    "module = importlib.util.module_from_spec(spec)\n"
    "sys.modules['mindmeld'] = module\n"
    "spec.loader.exec_module(module)\n"
    "sys.exit(module.serve_storm_peers(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))\n")


def _raise_descriptor_limit():
    """Soft RLIMIT_NOFILE up to the hard one (children inherit it); the soft limit after,
    or None where there is none to read."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and soft != resource.RLIM_INFINITY and soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, AttributeError, OSError, ValueError):
        pass
    return _descriptor_limit()


def serve_storm_peers(router, sharers, forwarders, lifetime=900.0):
    """The restart storm's peers in one process: `sharers` Sharers of storm-0, storm-1 ...
    (each to a target here that answers P with p) and `forwarders` Forwarders to them, in
    turn.  Once all are up: one line on standard output, {"role", "forwarders": [port ...]}."""
    log.setLevel(logging.ERROR)         # thousands of "retrying" lines are the point, not news

    async def answer(reader, writer):
        try:
            if await reader.read(1) == b"P":
                writer.write(b"p")
                await reader.read()     # until the prober closes
        except OSError:
            pass
        finally:
            writer.close()

    async def main():
        server = await asyncio.start_server(answer, "127.0.0.1", 0, backlog=LISTEN_BACKLOG)
        target = ("127.0.0.1", server.sockets[0].getsockname()[1])
        roles = []
        for i in range(sharers):
            sharer = Sharer({"storm-%d" % i: target}, router=router)
            # A chain's length is paid once, at the first REGISTER (10,000 hashes: 6 ms);
            # a reconnect costs the same on a short one.
            sharer.owners = OwnerChain(2 * OwnerChain.CHECKPOINT)
            roles.append(sharer)
        roles += [Forwarder("storm-%d" % (i % sharers), "127.0.0.1", 0, router=router)
                  for i in range(forwarders)]
        for start in range(0, len(roles), 100):     # setting up is not what is measured
            batch = roles[start:start + 100]
            for role in batch:
                await role.start()
            await asyncio.gather(*[role.wait_ready(60) for role in batch])
        _write_ready(1, {"role": "peers", "forwarders": [f.port for f in roles[sharers:]]})
        await asyncio.sleep(lifetime)   # bounded; the bench terminates it long before
    _run(main())
    return 0


def _bench_idle_links(port, pid, n, say):
    """n raw links to the router at port, HELLO done (as a sharer's), and nothing more:
    what the router (pid) holds for each."""
    say("scale: router RSS with %d idle links (HELLO done)" % n)
    hello = PREAMBLE + encode_json(HELLO, 0, {"version": PROTOCOL_VERSION, "role": "share",
                                              "agent": "mindmeld/%s bench" % __version__})
    before, links = _proc_memory_mb(pid), []
    try:
        for start in range(0, n, 100):      # a hundred handshakes in flight at a time
            try:
                batch = [_bench_connect(port) for _ in range(min(100, n - start))]
            except OSError as exc:
                raise MindmeldError("bench: idle link %d of %d: %s" % (len(links) + 1, n, _os_error_text(exc)))
            links += batch
            for sock in batch:
                sock.sendall(hello)
            for sock in batch:
                length, ftype = HEADER.unpack(_recv_exact(sock, HEADER_SIZE))[:2]
                _recv_exact(sock, length)
                if ftype != HELLO:
                    raise MindmeldError("bench: the router answered a HELLO with %s"
                                        % FRAME_NAMES.get(ftype, ftype))
        after = _proc_memory_mb(pid)
    finally:
        for sock in links:
            sock.close()
    per_link = (after - before) * 1024 / n if None not in (before, after) else None
    return {"links": n, "router_rss_before_MB": before, "router_rss_MB": after, "per_link_KB": per_link}


async def _storm_back(port, forwarder_ports, sharers, began, deadline):
    """Until `deadline` (time.monotonic()): when `list` shows all the sharers' names, and
    when each forwarder has carried a stream (P answered with p)."""
    back = {"sharers_back": 0, "forwarders_back": 0, "sharers_back_s": None, "forwarders_back_s": None}

    def left():
        return max(0.1, deadline - time.monotonic())

    async def listed():
        while time.monotonic() < deadline:
            try:
                names = await asyncio.wait_for(list_services("127.0.0.1:%d" % port), left())
                seen = sum(1 for s in names if str(s.get("name", "")).startswith("storm-"))
            except (MindmeldError, OSError, asyncio.TimeoutError):
                seen = 0                # the router is not back yet
            back["sharers_back"] = max(back["sharers_back"], seen)
            if seen >= sharers:
                back["sharers_back_s"] = time.monotonic() - began
                return
            await asyncio.sleep(0.2)    # polling the router, as a user of `list` would

    async def probe(forwarder_port):
        while time.monotonic() < deadline:
            answer = b""
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", forwarder_port), left())
                try:
                    writer.write(b"P")
                    answer = await asyncio.wait_for(reader.read(1), left())
                finally:
                    writer.close()
            except (OSError, asyncio.TimeoutError):
                pass
            if answer == b"p":
                back["forwarders_back"] += 1
                back["forwarders_back_s"] = time.monotonic() - began
                return
            await asyncio.sleep(0.2)    # the stream was refused or reset: try it again

    await asyncio.gather(listed(), *[probe(p) for p in forwarder_ports])
    return back


def _bench_restart_storm(routers, router_argv, n, say):
    """n peers (half sharers, half forwarders) on the last of `routers`; the router killed
    (SIGKILL) and started again on its port; how long until all are back."""
    port, sharers = routers[-1].port, max(1, n // 2)
    script = router_argv[0]
    say("scale: restart storm, %d sharers and %d forwarders" % (sharers, n - sharers))
    peers = _Child(["-c", STORM_PEERS_CODE, script, "127.0.0.1:%d" % port, str(sharers), str(n - sharers)],
                   "restart storm's peers", timeout=30.0 + n / 50.0)
    try:
        forwarder_ports = peers.report.get("forwarders") or []
        say("scale: all %d up; the router killed and started again" % n)
        began = time.monotonic()
        routers[-1].process.kill()      # SIGKILL: no GOAWAY, the links just die
        routers[-1].process.wait()
        routers.append(_Child(router_argv + ["--listen", "127.0.0.1:%d" % port], "restarted router"))
        result = _run(_storm_back(port, forwarder_ports, sharers, began, began + STORM_LIMIT))
    finally:
        peers.stop()
    result.update(peers=n, sharers=sharers, forwarders=n - sharers, limit_s=STORM_LIMIT)
    result["back"] = result["sharers_back"] + result["forwarders_back"]
    result["all_back_s"] = (max(result["sharers_back_s"], result["forwarders_back_s"] or 0.0)
                            if result["back"] == n and result["sharers_back_s"] is not None else None)
    return result


def _bench_links_and_storm(script, quick, descriptors, say):
    """bench --scale's router figures, on a router of their own: RSS per idle link, and the
    time every peer takes to come back after the router is killed and restarted."""
    n = SCALE_LINKS["quick" if quick else "default"]
    # The router holds a descriptor a link; the storm's peers about three a peer (a link, a
    # listening socket or a target, a probe in flight); 100 to spare.
    idle_n, storm_n = n, n
    if descriptors is not None:
        idle_n, storm_n = min(n, descriptors - 100), min(n, (descriptors - 100) // 3)
        if storm_n < n:
            say("scale: RLIMIT_NOFILE is %d here: %d idle links and %d storm peers instead of %d "
                "(raise it with ulimit -n for the full figures)" % (descriptors, max(idle_n, 0),
                                                                     max(storm_n, 0), n))
        if idle_n < 10 or storm_n < 10:
            raise MindmeldError("bench: RLIMIT_NOFILE is %d, too low for --scale; raise it with "
                                "ulimit -n" % descriptors)
    state_dir = _bench_folder()
    router_argv = [script, "router", "--state-dir", state_dir, "--ready-fd", "1"]
    routers = []
    try:
        routers.append(_Child(router_argv + ["--listen", "127.0.0.1:0"], "scale router"))
        result = {"idle_links": _bench_idle_links(routers[0].port, routers[0].process.pid, idle_n, say)}
        result["restart_storm"] = _bench_restart_storm(routers, router_argv, storm_n, say)
    finally:
        for router in routers:
            router.stop()
        shutil.rmtree(state_dir, ignore_errors=True)    # each run made one; none was ever removed
    return result


# bench --secret's targets against the ssh chain: (what, row, ssh's row, at least)
SSH_TARGETS = (("upload", "upload_MBps", "upload_MBps", 1.5),
               ("download", "download_MBps", "download_MBps", 1.5),
               ("new streams one at a time against new ssh connections", "streams_serial_per_s",
                "connections_per_s", 5.0))


def _bench_report(results, out):
    rows = [("upload_MBps", "single stream upload, MB/s"), ("download_MBps", "single stream download, MB/s"),
            ("concurrent_MBps", "100 streams both ways, MB/s"), ("rtt_p50_us", "round trip p50, us"),
            ("rtt_p99_us", "round trip p99, us"), ("streams_per_s", "new streams per second"),
            ("streams_serial_per_s", "  one at a time"),
            ("connections_per_s", "  a new ssh connection each"),
            ("cpu_s_per_GB", "CPU s per GB (the relays)"), ("router_peak_rss_MB", "router peak RSS, MB")]
    mine, direct, ssh = results["mindmeld"], results["direct"], results.get("ssh")
    columns = [("mindmeld", mine), ("direct", direct)] + ([("ssh -R/-L", ssh)] if ssh else [])

    def cell(value):
        if isinstance(value, list):
            return "/".join("%.1f" % v for v in value)
        return "-" if value is None else "%.0f" % value if value >= 100 else "%.2f" % value
    out.write("%-30s" % "" + "".join(" %10s" % name for name, _ in columns) + "\n")
    for key, label in rows:
        if any(key in figures for _, figures in columns):      # the optional rows: when measured
            out.write("%-30s" % label + "".join(" %10s" % cell(figures.get(key)) for _, figures in columns)
                      + "\n")
    if ssh:
        out.write("against the ssh chain: " + ", ".join(
            "%s %.1fx (target %.1fx)" % (what, mine[mine_key] / ssh[ssh_key], target)
            for what, mine_key, ssh_key, target in SSH_TARGETS if ssh.get(ssh_key)) + "\n")
    scale = results.get("scale")
    if scale:
        out.write("\nscale (router/sharer/forwarder where three numbers are given)\n")
        out.write("  router RSS with 1000 idle streams, MB   %s\n" % cell(scale["router_rss_1000_idle_MB"]))
        out.write("  RSS growth, 1000 idle streams, MB       %s\n" % cell(scale["rss_growth_1000_idle_MB"]))
        out.write("  5000 concurrent streams verified        %d of 5000 in %.1f s\n"
                  % (scale["streams_5000_ok"], scale["streams_5000_s"]))
        out.write("  RSS growth, 100 stalled readers, MB     %s\n" % cell(scale["rss_growth_100_stalled_MB"]))
        idle = scale.get("idle_links")
        if idle:
            out.write("  router RSS, %5d idle links, MB        %s (%s before: %s KB a link)\n" % (
                idle["links"], cell(idle["router_rss_MB"]), cell(idle["router_rss_before_MB"]),
                cell(idle["per_link_KB"])))
        storm = scale.get("restart_storm")
        if storm:
            when = ("in %.1f s (sharers listed in %.1f s)" % (storm["all_back_s"], storm["sharers_back_s"])
                    if storm["all_back_s"] is not None else "within %.0f s" % storm["limit_s"])
            out.write("  router killed and restarted: %d of %d peers back %s\n"
                      % (storm["back"], storm["peers"], when))
    out.flush()


# -- bench --wan: the links to the router through an emulated internet link --------------
# Each link the sharer and the forwarder make to the router goes through a relay in a process
# of its own (`bench --serve-wan`, no root needed) that paces every direction to a rate and
# delays every chunk by half the round trip, as a bottleneck router and a long wire would.

WAN_CHUNK = 16 * 1024               # bytes the emulated link reads at once (pacing granularity)
WAN_QUEUE = 64 * 1024               # bytes that may wait for the wire at the bottleneck
WAN_SOCKET_BUFFER = 16 * 1024       # the relay's receive buffers: little hidden queue of its own
WAN_UNSHAPED_LIMIT = 16 * 1024 * 1024   # bytes on the wire at most when the rate is unlimited
BENCH_WAN_SIZES = {  # (transfer bytes, interactive requests, seconds of bulk before measuring, new connections)
    "default": (64 << 20, 300, 2.0, 20),
    "quick": (16 << 20, 60, 1.5, 6),
}


class _Wire:
    """One direction of one emulated link, shared by every connection through it."""

    def __init__(self, rate):
        self.rate = rate                # bytes/s; 0: no limit
        self.free_at = 0.0              # when it has sent everything queued so far


class _WanDirection:
    """One connection's direction over a _Wire: a chunk leaves when the wire has sent what
    came before it at the wire's rate and arrives `delay` s later.  Reading stops while more
    than `queue` bytes wait for the wire, so memory stays bounded by what is on the wire plus
    the queue."""

    def __init__(self, delay, wire, queue=WAN_QUEUE):
        self.delay, self.shared, self.queue = delay, wire, queue
        rate = wire.rate
        self.limit = queue + int(rate * delay) + WAN_CHUNK if rate else WAN_UNSHAPED_LIMIT
        self.wire = collections.deque()     # (arrival time, chunk; b"" for EOF)
        self.held = 0                       # bytes in the queue and on the wire

    def departure(self, now, size):
        """When a chunk of `size` bytes that came at `now` arrives at the far end."""
        wire = self.shared
        if wire.rate:
            wire.free_at = max(now, wire.free_at) + size / wire.rate
            return wire.free_at + self.delay
        return now + self.delay

    def backlog(self, now):
        """Seconds until the queue waiting for the wire is back under its limit (0: room now)."""
        if self.held >= self.limit:
            return self.delay / 4 or 0.001
        wire = self.shared
        if not wire.rate:
            return 0.0
        return max(0.0, wire.free_at - now - self.queue / wire.rate)

    async def run(self, reader, writer):
        loop = _get_loop()
        arrived = asyncio.Event()

        async def outlet():
            while True:
                if not self.wire:
                    arrived.clear()
                    await arrived.wait()
                    continue
                wait = self.wire[0][0] - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                    continue
                due = []
                while self.wire and self.wire[0][0] <= loop.time():
                    due.append(self.wire.popleft()[1])
                self.held -= sum(len(chunk) for chunk in due)
                data = b"".join(due)
                if data:
                    writer.write(data)
                    await writer.drain()
                if not due[-1]:                 # EOF
                    if writer.can_write_eof():
                        writer.write_eof()
                    return

        pump = _spawn(outlet(), set())
        try:
            while not pump.done():              # the far end went: stop reading
                chunk = await reader.read(WAN_CHUNK)
                now = loop.time()
                self.wire.append((self.departure(now, len(chunk)), chunk))
                self.held += len(chunk)
                arrived.set()
                if not chunk:
                    break
                for _ in range(1000):           # bounded: each turn waits for the wire
                    wait = self.backlog(loop.time())
                    if not wait or pump.done():
                        break
                    await asyncio.sleep(wait)
            await pump
        finally:
            pump.cancel()


def _wan_socket(family=socket.AF_INET):
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, WAN_SOCKET_BUFFER)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


async def _wan_link(upstream_port, rtt, rate):
    """Listen on 127.0.0.1; each connection goes on to upstream_port through an emulated
    link (`rtt` seconds, `rate` bytes/s each way).  Returns the server."""
    loop = _get_loop()
    toward, back = _Wire(rate), _Wire(rate)

    async def joined(reader, writer):
        upstream = _wan_socket()
        upstream.setblocking(False)
        try:
            await loop.sock_connect(upstream, ("127.0.0.1", upstream_port))
            up_reader, up_writer = await asyncio.open_connection(sock=upstream)
        except OSError:
            upstream.close()
            writer.close()
            return
        ways = [_WanDirection(rtt / 2, toward).run(reader, up_writer),
                _WanDirection(rtt / 2, back).run(up_reader, writer)]
        try:
            await asyncio.gather(*ways)
        except (OSError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass        # cancelled: the loop is closing (3.11's streams report it otherwise)
        finally:
            writer.close()
            up_writer.close()

    listener = _wan_socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(LISTEN_BACKLOG)
    listener.setblocking(False)
    return await asyncio.start_server(joined, sock=listener)


def serve_bench_wan(spec, lifetime=900.0):
    """`bench --serve-wan SPEC`: emulated links in a process of their own.  SPEC is JSON:
    {"rate": bytes/s, "links": [[upstream port, rtt seconds], ...]}; the ready report lists
    one listening address per link, in order."""
    spec = json.loads(spec)

    async def main():
        servers = [await _wan_link(port, rtt, spec["rate"]) for port, rtt in spec["links"]]
        _write_ready(1, {"role": "wan", "listen": [list(s.sockets[0].getsockname()[:2])
                                                   for s in servers]})
        await asyncio.sleep(lifetime)   # bounded; the bench terminates it long before
    _run(main())
    return 0


def _percentiles(times):
    times = sorted(times)
    return times[len(times) // 2] * 1e3, times[min(len(times) - 1, int(len(times) * 0.99))] * 1e3


def _interactive_latency(port, count, interval=0.05):
    """64-byte requests every `interval` s on one echo stream (sent on schedule, whether or
    not the answers are late); each one's time to its echo, in seconds."""
    import threading
    sock = _bench_connect(port)
    try:
        sock.sendall(b"E" + bytes(64))     # the stream opens first
        _recv_exact(sock, 64)
        sent_at = [0.0] * count

        def sender():
            start = time.perf_counter()
            try:
                for i in range(count):
                    pause = start + i * interval - time.perf_counter()
                    if pause > 0:
                        time.sleep(pause)
                    sent_at[i] = time.perf_counter()
                    sock.sendall(struct.pack("!I", i) + bytes(60))
            except OSError:
                pass                    # the reader below says what failed
        thread = threading.Thread(target=sender, daemon=True)
        thread.start()
        times = []
        for i in range(count):
            answer = _recv_exact(sock, 64)
            times.append(time.perf_counter() - sent_at[i])
            if struct.unpack("!I", answer[:4])[0] != i:
                raise MindmeldError("bench: an echoed request came back changed")
        thread.join()
        return times
    finally:
        sock.close()


class _BulkDownload:
    """One download that runs until stopped, on a stream of its own: the load."""

    def __init__(self, port):
        import threading
        self.sock = _bench_connect(port)
        self.sock.sendall(b"D" + struct.pack("!Q", 1 << 50))
        self.received, self.began, self.stopped = 0, time.perf_counter(), threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        try:
            while not self.stopped.is_set():
                data = self.sock.recv(256 * 1024)
                if not data:
                    break
                self.received += len(data)
        except OSError:
            pass

    def stop(self):
        """Stop; the download's rate while it ran, MB/s."""
        self.stopped.set()
        self.thread.join(10)
        self.sock.close()
        return self.received / (time.perf_counter() - self.began) / 1e6


def _time_to_first_byte(port):
    """Connect, send a 100-byte request, and wait for the first byte of the answer: seconds."""
    began = time.perf_counter()
    sock = _bench_connect(port)
    try:
        sock.sendall(b"E" + bytes(100))
        if not sock.recv(1):
            raise MindmeldError("bench: a new connection got no answer")
        return time.perf_counter() - began
    finally:
        sock.close()


def _bench_wan_measure(port, sizes, pattern, say):
    size, requests, warmup, connections = sizes
    result = {}
    say("interactive: %d requests of 64 bytes, one every 50 ms" % requests)
    result["idle_p50_ms"], result["idle_p99_ms"] = _percentiles(_interactive_latency(port, requests))
    say("%d new connections, time to first byte" % connections)
    result["ttfb_p50_ms"], result["ttfb_max_ms"] = _percentiles(
        [_time_to_first_byte(port) for _ in range(connections)])
    for key, command in (("download_MBps", b"D"), ("upload_MBps", b"U")):
        say("%s %d MB" % (key.split("_")[0], size // 10 ** 6))
        began = time.perf_counter()
        _bench_transfer(port, pattern, command, size)
        result[key] = size / (time.perf_counter() - began) / 1e6
    say("interactive again, while a download runs on another stream")
    bulk = _BulkDownload(port)
    try:
        time.sleep(warmup)              # the bulk stream's window grows first
        loaded = _interactive_latency(port, requests)
    finally:
        result["bulk_during_MBps"] = bulk.stop()
    result["loaded_p50_ms"], result["loaded_p99_ms"] = _percentiles(loaded)
    return result


def run_bench_wan(quick=False, rtt_ms=50.0, rate_mbit=100.0, json_path=None, out=sys.stdout):
    """`mindmeld.py bench --wan`: router, sharer and forwarder as in `bench`, with the
    sharer's and the forwarder's links to the router each through an emulated link; beside
    it, plain TCP to the target through one emulated link of twice the round trip (what a
    chain of TCP relays such as socat through the same two links would see)."""
    sizes = BENCH_WAN_SIZES["quick" if quick else "default"]
    pattern = _bench_pattern()
    script = sys.argv[0] if sys.argv and os.path.isfile(sys.argv[0]) else None
    if script is None:
        raise MindmeldError("bench --wan starts its roles as processes: save the script as "
                            "mindmeld.py and run it from there")
    rtt, rate = rtt_ms / 1000.0, rate_mbit * 1e6 / 8
    say = _bench_say
    children, results = [], {}
    try:
        target = _Child([script, "bench", "--serve-target"], "target")
        children.append(target)
        ready = ["--ready-fd", "1"]
        router = _Child([script, "router", "--listen", "127.0.0.1:0", "--state-dir",
                         _bench_folder()] + ready, "router")
        children.append(router)
        spec = {"rate": rate, "links": [[router.port, rtt], [router.port, rtt], [target.port, 2 * rtt]]}
        wan = _Child([script, "bench", "--serve-wan", json.dumps(spec)], "emulated links")
        children.append(wan)
        to_sharer, to_forwarder, plain = [address[1] for address in wan.report["listen"]]
        children.append(_Child([script, "share", "bench", "127.0.0.1:%d" % target.port,
                                "--router", "127.0.0.1:%d" % to_sharer] + ready, "sharer"))
        forwarder = _Child([script, "forward", "bench", "127.0.0.1:0",
                            "--router", "127.0.0.1:%d" % to_forwarder] + ready, "forwarder")
        children.append(forwarder)
        say("emulated links: %.0f ms round trip, %s each way; router, sharer and forwarder "
            "started" % (rtt_ms, "%.0f Mbit/s" % rate_mbit if rate else "no rate limit"))
        results["mindmeld"] = _bench_wan_measure(forwarder.port, sizes, pattern,
                                                 lambda t: say("  mindmeld: " + t))
        results["plain"] = _bench_wan_measure(plain, sizes, pattern,
                                              lambda t: say("  plain TCP: " + t))
    finally:
        for child in reversed(children):
            child.stop()
    _bench_wan_report(results, sizes, rtt_ms, rate_mbit, out)
    if json_path:
        _bench_write_json(json_path, {"mindmeld": results["mindmeld"], "plain": results["plain"],
                                      "rtt_ms": rtt_ms, "rate_mbit": rate_mbit,
                                      "python": sys.version.split()[0], "quick": quick})
    return 0


def _bench_wan_report(results, sizes, rtt_ms, rate_mbit, out):
    rows = [("idle_p50_ms", "interactive p50, ms"), ("idle_p99_ms", "interactive p99, ms"),
            ("loaded_p50_ms", "  with a download, p50, ms"), ("loaded_p99_ms", "  with a download, p99, ms"),
            ("bulk_during_MBps", "  the download meanwhile, MB/s"),
            ("ttfb_p50_ms", "new connection, first byte p50 ms"), ("ttfb_max_ms", "  max, ms"),
            ("download_MBps", "download %d MB, MB/s" % (sizes[0] // 10 ** 6)),
            ("upload_MBps", "upload %d MB, MB/s" % (sizes[0] // 10 ** 6))]
    out.write("two emulated links, each %.0f ms round trip, %s\n"
              % (rtt_ms, "%.0f Mbit/s each way" % rate_mbit if rate_mbit else "no rate limit"))
    out.write("%-34s %10s %10s\n" % ("", "mindmeld", "plain TCP"))
    for key, label in rows:
        out.write("%-34s %10.1f %10.1f\n" % (label, results["mindmeld"][key], results["plain"][key]))
    mine = results["mindmeld"]
    out.write("interactive p99 under load is %+.1f ms over idle (target: at most +25)\n"
              % (mine["loaded_p99_ms"] - mine["idle_p99_ms"]))
    out.flush()


# ###########################################################################
# ### 9. Command line: a thin layer over the roles above
# ###########################################################################

def _seconds(text):
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if math.isnan(value):
        raise argparse.ArgumentTypeError("%r is not a number of seconds" % text)
    return value


def _positive_float(text):
    value = _seconds(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def _nonnegative_float(text):
    value = _seconds(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def _nonnegative_int(text):
    try:
        value = int(text)
        if value < 0:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a whole number of 0 or more" % text)
    return value


def build_parser():
    parser = argparse.ArgumentParser(
        prog="mindmeld",
        description="Reach a TCP port on another machine through a relay both can reach.",
        epilog="Run 'mindmeld COMMAND --help' for a command's options. "
               "Try 'python3 mindmeld.py bench' to see it work on this machine.")
    parser.add_argument("--version", action="version", version="mindmeld " + __version__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-v: debug, with tracebacks)")
    common.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    role = argparse.ArgumentParser(add_help=False, parents=[common])
    role.add_argument("--keepalive", type=_positive_float, default=KEEPALIVE_INTERVAL,
                        metavar="SECONDS", help="ping after this much silence; the link is dead "
                        "after %d silent intervals (default %.0f)" % (KEEPALIVE_MISSES, KEEPALIVE_INTERVAL))

    def options():
        return argparse.ArgumentParser(add_help=False)      # a parent: options shared by commands

    def tokens(token_help, whose):
        """--token and --token-file, worded for the router or for its clients."""
        parent = options()
        parent.add_argument("--token", help=token_help + " (or $MINDMELD_TOKEN)")
        parent.add_argument("--token-file", metavar="FILE", help="read %s from FILE" % whose)
        return parent

    def state_dir(what):
        parent = options()
        parent.add_argument("--state-dir", metavar="DIR", help="where %s lives (default: "
                            "$MINDMELD_STATE_DIR, else %s)"
                            % (what, default_state_dir().replace(os.path.expanduser("~"), "~")))
        return parent

    graceful = options()
    graceful.add_argument("--grace", type=_nonnegative_float, default=GRACE_PERIOD, metavar="SECONDS",
                          help="on SIGTERM/SIGINT, how long open streams may finish "
                          "(default %.0f)" % GRACE_PERIOD)
    router_address = options()
    router_address.add_argument("--router", metavar="HOST:PORT",
                                help="the router: HOST:PORT, ws://HOST[:PORT]/PATH or wss://...; "
                                "{name} in PATH: one link per name, for a front that picks a "
                                "router by path (default: $MINDMELD_ROUTER, else %s)" % DEFAULT_ROUTER)
    client_tls = options()
    client_tls.add_argument("--tls", action="store_true", help="TLS to the router: system CAs, else trust "
                            "the first certificate seen and refuse a changed one (known_routers)")
    client_tls.add_argument("--tls-ca", metavar="FILE",
                            help="verify the router against this CA (implies --tls)")
    client_tls.add_argument("--tls-fingerprint", metavar="HEX", help="accept only the router certificate "
                            "with this SHA-256 fingerprint, as the router prints it (implies --tls)")
    client_tls.add_argument("--tls-insecure", action="store_true", help="TLS without checking the router "
                            "(warns at every start)")
    client_tls.add_argument("--proxy", metavar="URL", help="reach the router through this HTTP CONNECT "
                            "proxy, http://[USER:PASS@]HOST:PORT (default: $HTTPS_PROXY or $ALL_PROXY, "
                            "unless $NO_PROXY names the router's host)")
    client = argparse.ArgumentParser(add_help=False, parents=[
        role, router_address, tokens("the router's token", "the router's token"), client_tls,
        state_dir("known_routers")])
    secret = options()
    secret.add_argument("--secret", help="the service secret (or $MINDMELD_SECRET): streams are encrypted "
                        "and authenticated end to end, and the router cannot read them or guess it")
    secret.add_argument("--secret-file", metavar="FILE", help="read the service secret from FILE")
    retrying = options()
    retrying.add_argument("--max-retries", type=_nonnegative_int, metavar="N",
                          help="give up after N retries in a row (default: never)")
    ready = options()
    ready.add_argument("--ready-fd", type=_nonnegative_int, metavar="FD",
                       help="once ready (router: listening; forward: listening and linked to the "
                       "router; share: every name registered), write one JSON line to file "
                       "descriptor FD, such as {\"role\": \"router\", \"listen\": [[HOST, PORT]]}, "
                       "then close FD unless it is 0-2")
    listening = options()
    listening.add_argument("--listen", metavar="[HOST]:PORT", help="address to listen on "
                           "(default: all interfaces, port $PORT or %d)" % DEFAULT_PORT)
    router_tls = options()
    router_tls.add_argument("--tls", action="store_true", help="speak TLS, with a self-signed certificate "
                            "made once in the state directory unless --tls-cert/--tls-key are given")
    router_tls.add_argument("--tls-cert", metavar="FILE", help="certificate chain (PEM; implies --tls)")
    router_tls.add_argument("--tls-key", metavar="FILE", help="private key (PEM)")

    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    p = sub.add_parser("router", parents=[role, listening,
                                          tokens("require peers to prove this token", "the token"),
                                          router_tls, state_dir("the self-signed certificate"),
                                          graceful, ready],
                       help="run the relay that everyone can reach",
                       description="Run the router: a registry of service names and a relay of "
                                   "streams between sharers and forwarders.")
    p.add_argument("--status-listen", metavar="[HOST]:PORT",
                   help="also serve / and /metrics here (same access rules)")
    p.add_argument("--metrics-per-service", action="store_true",
                   help="label metrics by service too (at most %d series)" % METRICS_SERVICE_SERIES_MAX)

    p = sub.add_parser("share", parents=[client, secret, retrying, graceful, ready],
                       help="offer a local TCP service under a name",
                       usage="mindmeld share [options] NAME [HOST:]PORT\n"
                             "       mindmeld share [options] NAME=[HOST:]PORT [NAME=[HOST:]PORT ...]",
                       description="Register NAME on the router; every stream opened to it is "
                                   "dialled to [HOST:]PORT on this machine (HOST defaults to localhost). "
                                   "Several services share one link: share web=8000 db=localhost:5432")
    p.add_argument("services", nargs="+", metavar="SERVICE",
                   help="one service as NAME and target, or several as NAME=TARGET pairs")

    p = sub.add_parser("forward", parents=[client, secret, retrying, graceful, ready],
                       help="listen locally and forward to a name",
                       description="Listen on [BIND:]PORT (BIND defaults to 127.0.0.1, PORT to any "
                                   "free port); each connection becomes a stream to NAME.")
    p.add_argument("name", metavar="NAME")
    p.add_argument("listen", metavar="[BIND:]PORT", nargs="?", default="0")

    p = sub.add_parser("connect", parents=[client, secret], help="one stream to a name on stdin/stdout (ssh ProxyCommand)",
                       description="Join standard input and output to one stream to NAME: binary-safe, "
                                   "half-close on stdin EOF; exit 0 when the stream ends, 1 if it cannot "
                                   "be opened.  Quiet unless something fails.")
    p.add_argument("name", metavar="NAME")

    p = sub.add_parser("list", parents=[client], help="show the services registered on the router",
                       description="Print the router's registry: one line per service.  Through "
                                   "a front of several routers (--router .../{name}) give NAME: "
                                   "it is asked of the router that holds NAME.")
    p.add_argument("name", metavar="NAME", nargs="?", help="show only this service (exit 1 if "
                   "it is not registered)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = sub.add_parser("bench", parents=[common], help="measure the whole tool on this machine",
                       description="Start a router, a sharer and a forwarder (separate processes) "
                                   "and a target on loopback; measure throughput, latency, new "
                                   "streams and CPU through the tunnel and straight to the target.")
    p.add_argument("--quick", action="store_true", help="smaller transfers (about 4 s)")
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)     # the tests' run
    p.add_argument("--json", metavar="FILE", help="also write the results to FILE")
    p.add_argument("--tls", action="store_true", help="TLS on the router's links")
    p.add_argument("--secret", action="store_true", dest="end_to_end", help="streams encrypted end to end (--secret "
                   "on share and forward), and the same through an ssh -R/-L chain beside them "
                   "when sshd and ssh are installed")
    p.add_argument("--scale", action="store_true", help="also measure memory with 1,000 idle and "
                   "100 stalled streams, 5,000 concurrent streams, the router's memory per idle link "
                   "(5,000 links) and how long 5,000 peers take to come back after the router is "
                   "killed and restarted (1,000 with --quick; about 50 s more, 25 s with --quick)")
    p.add_argument("--wan", action="store_true", help="the links to the router through emulated "
                   "internet links (delay and rate, in this process's user space): interactive "
                   "latency with and without a download beside it, first byte, bulk transfer")
    p.add_argument("--rtt", metavar="MS", type=float, default=50.0,
                   help="--wan: each link's round trip, milliseconds (default 50)")
    p.add_argument("--rate", metavar="MBIT", type=float, default=100.0,
                   help="--wan: each link's rate each way, Mbit/s; 0 for no limit (default 100)")
    p.add_argument("--serve-target", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--serve-wan", metavar="SPEC", help=argparse.SUPPRESS)
    parser.commands = sub.choices
    return parser


def _read_secret(value, path, env, what):
    if path:
        try:
            with open(path) as f:
                value = f.read().strip()
        except OSError as exc:
            raise MindmeldError("cannot read the %s file %s: %s" % (what, path, exc.strerror))
        if not value:
            raise MindmeldError("the %s file %s is empty" % (what, path))
    return value or os.environ.get(env) or None


def _warn_of_secrets_in_argv(args):
    """--token and --secret values are in the process list, for every local user to read."""
    given = [(flag, alternative) for flag, alternative in (
        ("--token", "--token-file or $MINDMELD_TOKEN"), ("--secret", "--secret-file or $MINDMELD_SECRET"))
        if getattr(args, flag[2:], None)]
    if given:
        log.warning("warning: %s on the command line can be read by every local user in the process "
                    "list; use %s instead", " and ".join(f for f, _ in given),
                    ", and ".join(a for _, a in given))


def _setup_logging(args):
    quiet = args.quiet or args.command == "connect"     # its stdout is the stream
    level = logging.DEBUG if args.verbose else logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False
    asyncio_log = logging.getLogger("asyncio")
    asyncio_log.addFilter(_drop_send_warnings)          # once: the same object each time
    if args.verbose:
        asyncio_log.setLevel(logging.DEBUG)


def _drop_send_warnings(record):
    """asyncio warns "socket.send() raised exception." for every write after a connection
    is lost; the link that lost it reports that once, in words.  Everything else passes
    (errors inside callbacks go to _callback_error_handler, which the loop calls instead)."""
    return not record.getMessage().startswith("socket.send() raised exception")


async def _serve(role, grace, ready_fd=None):
    """Start a role and run it until it ends or a signal asks it to stop."""
    loop = _get_loop()
    stop = asyncio.Event()
    signals = []

    def on_signal(signum):
        signals.append(signum)
        if len(signals) > 1:
            log.warning("second signal: exiting now")
            os._exit(1)
        log.info("%s: shutting down (up to %.0f s for open streams)", role.command, grace)
        stop.set()

    _add_signal_handlers(loop, on_signal)
    if ready_fd is not None:
        check_ready_fd(ready_fd)
    await role.start()
    if ready_fd is not None:
        _spawn(announce_ready(role, ready_fd), getattr(role, "tasks", set()))   # closing ends it
    done = getattr(role, "done", None)
    waiters = [_get_loop().create_task(stop.wait())]
    if done is not None:
        waiters.append(done)
    finished, _pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    waiters[0].cancel()
    if stop.is_set():
        await role.close(grace)
        return 0
    await role.close(0)
    done.result()               # raises the role's failure
    return 0


def _run_router(args):
    token = _read_secret(args.token, args.token_file, "MINDMELD_TOKEN", "token")
    listen = args.listen or ":%s" % os.environ.get("PORT", DEFAULT_PORT)
    host, port = parse_hostport(listen, "", None, "listen address")
    context = None
    if args.tls or args.tls_cert or args.tls_key:
        context, fingerprint = router_tls_context(args.tls_cert, args.tls_key, args.state_dir)
        log.info("router TLS certificate SHA256 fingerprint: %s", fingerprint)
    router = Router(host, port, token=token, ssl_context=context, keepalive=args.keepalive,
                    status_listen=args.status_listen, metrics_per_service=args.metrics_per_service)
    return _run(_serve(router, args.grace, args.ready_fd))


def _client_options(args):
    tls = None
    router = args.router or os.environ.get("MINDMELD_ROUTER") or ""
    if args.tls or args.tls_ca or args.tls_fingerprint or args.tls_insecure \
            or router.startswith("wss://"):                 # so that --state-dir applies
        known = os.path.join(args.state_dir, "known_routers") if args.state_dir else None
        tls = TlsOptions(args.tls_ca, args.tls_fingerprint, args.tls_insecure, known)
    return dict(router=args.router, token=_read_secret(args.token, args.token_file,
                                                         "MINDMELD_TOKEN", "token"),
                tls=tls, keepalive=args.keepalive, proxy=args.proxy)


def _share_pairs(words):
    """['web', '8000'] or ['web=8000', 'db=host:5432'] -> {name: target}."""
    if len(words) == 2 and "=" not in words[0]:
        return {words[0]: words[1]}
    services = {}
    for word in words:
        name, equals, target = word.partition("=")
        if not equals or not target:
            raise UsageError("expected NAME [HOST:]PORT, or NAME=[HOST:]PORT pairs; got %r" % word)
        if name in services:
            raise UsageError("the name %r is given twice" % name)
        services[name] = target
    return services


def _service_secret(args):
    return _read_secret(args.secret, args.secret_file, "MINDMELD_SECRET", "secret")


def _run_share(args):
    sharer = Sharer(_share_pairs(args.services), secret=_service_secret(args),
                    max_retries=args.max_retries, **_client_options(args))
    return _run(_serve(sharer, args.grace, args.ready_fd))


def _run_forward(args):
    host, port = parse_hostport(args.listen, "127.0.0.1", None, "listen address")
    host = host or "127.0.0.1"      # ':9000' too: all interfaces only when asked, 0.0.0.0 or [::]
    forwarder = Forwarder(args.name, host, port, secret=_service_secret(args),
                          max_retries=args.max_retries, **_client_options(args))
    return _run(_serve(forwarder, args.grace, args.ready_fd))


def _run_list(args):
    services = _run(list_services(name=args.name, **_client_options(args)))
    if args.name is not None and not services:
        raise MindmeldError("%r is not registered on the router" % args.name)
    if args.json:
        print(json.dumps(services, indent=2))
        return 0
    rows = [("NAME", "REGISTERED", "STREAMS", "SHARER", "SECRET")]
    for s in services:                      # what the router says, printed as text only
        try:
            since = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(float(s.get("since"))))
        except (TypeError, ValueError, OverflowError, OSError):
            since = "?"
        rows.append(tuple(short_reason(cell) for cell in (
            s.get("name", "?"), since, s.get("streams", "?"), s.get("peer", "?"),
            "yes" if s.get("secret") else "no")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def _run_bench(args):
    if args.serve_target:
        return serve_bench_target()
    if args.serve_wan:
        return serve_bench_wan(args.serve_wan)
    if args.wan:
        if args.rtt < 0 or args.rate < 0:
            raise UsageError("--rtt and --rate must not be negative")
        if args.tls or args.scale or args.end_to_end:
            raise UsageError("--wan measures plain links only: leave out --tls, --scale and --secret")
        return run_bench_wan(quick=args.quick, rtt_ms=args.rtt, rate_mbit=args.rate, json_path=args.json)
    return run_bench(quick="smoke" if args.smoke else args.quick, json_path=args.json, tls=args.tls,
                     scale=args.scale, secret=args.end_to_end)


def _run_connect(args):
    return _run(Connector(args.name, secret=_service_secret(args), **_client_options(args)).run())


COMMANDS = {"router": _run_router, "share": _run_share, "forward": _run_forward, "list": _run_list,
            "connect": _run_connect, "bench": _run_bench}


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args)
    _warn_of_secrets_in_argv(args)
    try:
        return COMMANDS[args.command](args)
    except UsageError as exc:
        parser.commands[args.command].error(str(exc))     # usage, one line, exit 2
    except MindmeldError as exc:
        log.debug("failure", exc_info=True)
        sys.stderr.write("mindmeld %s: error: %s\n" % (args.command, exc))
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug: one line, unless debugging
        if args.verbose:
            raise
        sys.stderr.write("mindmeld %s: internal error: %s: %s; run with -v for a traceback\n"
                         % (args.command, type(exc).__name__, exc))
        return 1


if __name__ == "__main__":
    sys.exit(main())
