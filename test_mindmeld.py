"""Tests for mindmeld.py: stdlib unittest, real loopback sockets, real subprocesses.

    python3 -m unittest -v test_mindmeld        (from the repository folder)

Runs on CPython 3.6 to 3.13.  Nothing here sleeps to wait for something: every
wait is on an event, a line of output or a socket's readiness, with a deadline.
Only 127.0.0.1 is ever used.

  TestCodec        frames and preambles, no sockets
  TestCore         stream states, flow-control windows, addresses, names
  TestTunnel       router + sharer + forwarder as library objects in one event loop
  TestMemoryBound  the three roles as command-line processes, a reader that stalls
  TestCommandLine  the command line end to end, errors, signals, `python3 -`
"""

import asyncio
import hashlib
import json
import logging
import os
import queue
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "mindmeld.py")
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from mindmeld import (  # noqa: E402
    DATA, EOF, HEADER_SIZE, HELLO, INITIAL_WINDOW, LIST_REPLY, MAGIC, MAX_CONTROL,
    MAX_DATA, MAX_LIST_REPLY, MAX_WINDOW, OPEN, PING, PONG, PREAMBLE, PROTOCOL_VERSION,
    RESET, WINDOW, FrameDecoder, Forwarder, MindmeldError, PermanentError, PreambleError,
    ProtocolError, ReceiveWindow, Router, Sharer, StreamState, STREAM_TRANSITIONS,
    WindowBudget, check_name, classify_preamble, encode_frame, encode_json, list_services,
    parse_hostport, valid_name)

LOCALHOST = "127.0.0.1"
MB = 1024 * 1024
CHUNK = 64 * 1024


# ---------------------------------------------------------------------------
# helpers shared by every test class
# ---------------------------------------------------------------------------

if hasattr(asyncio, "all_tasks"):          # 3.7+
    def _all_tasks(loop):
        return asyncio.all_tasks(loop)
else:                                       # 3.6
    def _all_tasks(loop):
        return asyncio.Task.all_tasks(loop)


class Pattern:
    """Deterministic test data: 64 KB chunks, each one distinct (its index comes
    first), so lost, repeated or reordered chunks change the hash."""

    def __init__(self, chunk=CHUNK):
        self.size = chunk
        self.block = os.urandom(chunk)

    def chunks(self, total):
        for i in range((total + self.size - 1) // self.size):
            chunk = struct.pack("!Q", i) + self.block[8:]
            yield chunk[:total - i * self.size]

    def digest(self, total):
        h = hashlib.sha256()
        for chunk in self.chunks(total):
            h.update(chunk)
        return h.hexdigest()


def decode_all(decoder, pieces):
    """Feed pieces in order; frames as (type, flags, id, bytes)."""
    out = []
    for piece in pieces:
        out.extend((t, f, i, bytes(p)) for t, f, i, p in decoder.feed(piece))
    return out


def free_port_socket():
    """A socket bound to a free loopback port but not listening: connects are refused."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((LOCALHOST, 0))
    return sock


# ---------------------------------------------------------------------------
# 1. Codec: frames and preambles, no sockets
# ---------------------------------------------------------------------------

def sample_frames():
    return [
        (HELLO, 0, 0, b'{"version":1,"role":"share"}'),
        (DATA, 0, 3, b"x" * 1000),
        (DATA, 0, 5, b""),
        (WINDOW, 0, 3, struct.pack("!I", 65536)),
        (EOF, 0, 3, b""),
        (PING, 0, 0, struct.pack("!d", 1.5)),
        (PONG, 0, 0, struct.pack("!d", 1.5)),
        (RESET, 0, 7, b'{"reason":"local connection reset"}'),
        (DATA, 0, 0xFFFFFFFF, bytes(range(256))),
    ]


def encode_all(frames):
    return b"".join(encode_frame(t, i, p) for t, _f, i, p in frames)


class TestCodec(unittest.TestCase):

    def test_wire_format_of_a_frame(self):
        # length (4 bytes), type, flags, stream id (4 bytes), network order; then the payload
        frame = encode_frame(DATA, 7, b"abc")
        self.assertEqual(HEADER_SIZE, 10)
        self.assertEqual(frame, b"\x00\x00\x00\x03" + bytes([DATA, 0]) + b"\x00\x00\x00\x07abc")
        self.assertEqual(encode_json(OPEN, 1, {"service": "web"}),
                         encode_frame(OPEN, 1, b'{"service":"web"}'))

    def test_whole_frames_decode_to_what_was_encoded(self):
        frames = sample_frames() + [(DATA, 0, 9, os.urandom(MAX_DATA))]
        decoder = FrameDecoder()
        self.assertEqual(decode_all(decoder, [encode_all(frames)]), frames)
        self.assertEqual(decoder.buffered, 0)

    def test_frames_fed_one_byte_at_a_time(self):
        frames = sample_frames()
        wire = encode_all(frames)
        decoder = FrameDecoder()
        out = decode_all(decoder, [wire[i:i + 1] for i in range(len(wire))])
        self.assertEqual(out, frames)
        self.assertEqual(decoder.buffered, 0)

    def test_split_at_every_offset(self):
        frames = sample_frames()
        wire = encode_all(frames)
        for cut in range(len(wire) + 1):
            decoder = FrameDecoder()
            out = decode_all(decoder, [wire[:cut], wire[cut:]])
            self.assertEqual(out, frames, "split at offset %d" % cut)
            self.assertEqual(decoder.buffered, 0, "split at offset %d" % cut)

    def test_split_in_three_at_many_offsets(self):
        frames = sample_frames()[:5]
        wire = encode_all(frames)
        for a in range(0, len(wire) + 1, 7):
            for b in range(a, len(wire) + 1, 13):
                decoder = FrameDecoder()
                out = decode_all(decoder, [wire[:a], wire[a:b], wire[b:]])
                self.assertEqual(out, frames, "split at %d and %d" % (a, b))

    def test_truncated_frame_stays_buffered(self):
        frames = sample_frames()
        wire = encode_all(frames)
        last = encode_frame(*[frames[-1][i] for i in (0, 2, 3)])
        decoder = FrameDecoder()
        out = decode_all(decoder, [wire[:-1]])       # the stream ends one byte short
        self.assertEqual(out, frames[:-1])            # the partial frame is not emitted
        self.assertEqual(decoder.buffered, len(last) - 1)
        self.assertGreater(decoder.buffered, 0)

    def test_truncated_inside_a_header(self):
        decoder = FrameDecoder()
        self.assertEqual(decode_all(decoder, [encode_frame(EOF, 3)[:4]]), [])
        self.assertEqual(decoder.buffered, 4)
        self.assertEqual(decode_all(decoder, [encode_frame(EOF, 3)[4:]]), [(EOF, 0, 3, b"")])
        self.assertEqual(decoder.buffered, 0)

    def test_oversized_length_is_refused_from_the_header_alone(self):
        cases = [(DATA, MAX_DATA + 1), (HELLO, MAX_CONTROL + 1), (OPEN, 0xFFFFFFFF),
                 (WINDOW, 5), (EOF, 1), (PING, 9), (LIST_REPLY, MAX_LIST_REPLY + 1)]
        for ftype, length in cases:
            with self.subTest(ftype=ftype, length=length):
                header = struct.pack("!IBBI", length, ftype, 0, 1)
                with self.assertRaises(ProtocolError) as cm:
                    FrameDecoder().feed(header)       # no payload byte has arrived
                self.assertEqual(cm.exception.code, "frame-size")
                # the same header in two pieces: refused as soon as it is complete
                decoder = FrameDecoder()
                self.assertEqual(list(decoder.feed(header[:5])), [])
                with self.assertRaises(ProtocolError):
                    decoder.feed(header[5:])

    def test_largest_allowed_frame_waits_for_its_payload(self):
        decoder = FrameDecoder()
        header = struct.pack("!IBBI", MAX_DATA, DATA, 0, 1)
        self.assertEqual(list(decoder.feed(header)), [])
        self.assertEqual(decoder.buffered, HEADER_SIZE)
        payload = os.urandom(MAX_DATA)
        out = decode_all(decoder, [payload[:1000], payload[1000:]])
        self.assertEqual(out, [(DATA, 0, 1, payload)])

    def test_unknown_frame_type_is_a_protocol_error(self):
        for ftype in (0, 19, 99, 255):
            with self.subTest(ftype=ftype):
                with self.assertRaises(ProtocolError):
                    FrameDecoder().feed(struct.pack("!IBBI", 0, ftype, 0, 0))
                # also when it follows a good frame in the same read
                with self.assertRaises(ProtocolError):
                    FrameDecoder().feed(encode_frame(EOF, 1) + struct.pack("!IBBI", 0, ftype, 0, 0))

    # -- preambles ------------------------------------------------------------------
    def test_preamble_mindmeld(self):
        self.assertEqual(PREAMBLE, MAGIC + bytes([PROTOCOL_VERSION]))
        self.assertEqual(classify_preamble(PREAMBLE), "mindmeld")
        self.assertEqual(classify_preamble(PREAMBLE + encode_json(HELLO, 0, {})), "mindmeld")

    def test_preamble_bad_version(self):
        for version in (0, PROTOCOL_VERSION + 1, 255):
            with self.subTest(version=version):
                with self.assertRaises(PreambleError) as cm:
                    classify_preamble(MAGIC + bytes([version]) + b"rest")
                self.assertIn("version %d" % version, str(cm.exception))

    def test_preamble_http(self):
        for request in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"GET /healthz HTTP/1.0\r\n",
                        b"HEAD / HTTP/1.1\r\n", b"POST /x HTTP/1.1\r\n", b"GET "):
            with self.subTest(request=request):
                self.assertEqual(classify_preamble(request), "http")

    def test_preamble_tls_client_hello(self):
        hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(32)
        for data in (hello, hello[:3], hello[:1]):
            with self.subTest(length=len(data)):
                with self.assertRaises(PreambleError) as cm:
                    classify_preamble(data)
                self.assertIn("TLS", str(cm.exception))

    def test_preamble_garbage(self):
        for data in (b"SSH-2.0-OpenSSH_9.6\r\n", b"\x00" * 16, b"MINDMELX\x01",
                     b"mindmeld\x01", bytes(range(1, 40)), b"\xff\xfe\xfd",
                     b"HELLO WORLD\r\n", b"X"):
            with self.subTest(data=data):
                with self.assertRaises(PreambleError):
                    classify_preamble(data)

    def test_preamble_partial_prefixes_need_more(self):
        prefixes = [PREAMBLE[:n] for n in range(len(PREAMBLE))]     # b"" .. b"MINDMELD"
        prefixes += [m[:n] for m in (b"GET ", b"HEAD ", b"POST ", b"PUT ")
                     for n in range(1, len(m))]
        for data in prefixes:
            with self.subTest(data=data):
                self.assertIsNone(classify_preamble(data))

    def test_preamble_partial_http_methods_need_more(self):
        # classify_preamble answers "http" for every one of these methods once
        # complete, so their beginnings must mean "need more", not "garbage".
        refused = []
        for method in (b"OPTIONS ", b"DELETE ", b"CONNECT ", b"PATCH "):
            self.assertEqual(classify_preamble(method + b"/ HTTP/1.1\r\n"), "http")
            for n in range(1, len(method)):
                try:
                    if classify_preamble(method[:n]) is not None:
                        refused.append(method[:n])
                except PreambleError:
                    refused.append(method[:n])
        self.assertEqual(refused, [], "refused as garbage instead of waiting for more bytes")


# ---------------------------------------------------------------------------
# 2. Core: stream states, windows, addresses, names
# ---------------------------------------------------------------------------

OPENING, OPEN_S, LOCAL_EOF, REMOTE_EOF, CLOSED = "opening", "open", "local-eof", "remote-eof", "closed"


class TestCore(unittest.TestCase):

    def walk(self, *events, start=OPENING):
        state = StreamState(start)
        for event in events:
            state.fire(event)
        return state.state

    def test_state_allowed_paths(self):
        self.assertEqual(set(STREAM_TRANSITIONS), {OPENING, OPEN_S, LOCAL_EOF, REMOTE_EOF, CLOSED})
        paths = [
            (("accept",), OPEN_S),
            (("refuse",), CLOSED),
            (("accept", "send_data", "recv_data", "send_eof"), LOCAL_EOF),
            (("accept", "send_eof", "recv_data", "recv_data", "recv_eof"), CLOSED),
            (("accept", "recv_eof", "send_data", "send_data", "send_eof"), CLOSED),
            (("accept", "recv_data", "recv_eof"), REMOTE_EOF),
        ]
        for events, expected in paths:
            with self.subTest(events=events):
                self.assertEqual(self.walk(*events), expected)
        self.assertEqual(self.walk("send_eof", "recv_eof", start=OPEN_S), CLOSED)

    def test_state_fire_returns_the_new_state(self):
        state = StreamState()
        self.assertEqual(state.state, OPENING)
        self.assertEqual(state.fire("accept"), OPEN_S)
        self.assertEqual(state.fire("send_eof"), LOCAL_EOF)
        self.assertEqual(state.fire("recv_eof"), CLOSED)

    def test_received_frames_out_of_order_are_protocol_errors(self):
        bad = [
            (OPENING, "recv_data"), (OPENING, "recv_eof"),
            (REMOTE_EOF, "recv_data"), (REMOTE_EOF, "recv_eof"),
            (CLOSED, "recv_data"), (CLOSED, "recv_eof"), (CLOSED, "recv_reset"),
        ]
        for start, event in bad:
            with self.subTest(state=start, event=event):
                state = StreamState(start)
                with self.assertRaises(ProtocolError):
                    state.fire(event)
                self.assertEqual(state.state, start)      # a refused event changes nothing
        # the common case in words: data after the peer's EOF
        state = StreamState(OPEN_S)
        state.fire("recv_eof")
        with self.assertRaises(ProtocolError):
            state.fire("recv_data")

    def test_sending_out_of_order_is_a_bug_not_a_protocol_error(self):
        for start, event in ((LOCAL_EOF, "send_data"), (LOCAL_EOF, "send_eof"),
                             (OPENING, "send_data"), (CLOSED, "send_eof")):
            with self.subTest(state=start, event=event):
                with self.assertRaises(MindmeldError) as cm:
                    StreamState(start).fire(event)
                self.assertNotIsInstance(cm.exception, ProtocolError)

    def test_reset_from_every_live_state(self):
        for start in (OPENING, OPEN_S, LOCAL_EOF, REMOTE_EOF):
            for event in ("send_reset", "recv_reset"):
                with self.subTest(state=start, event=event):
                    self.assertEqual(self.walk(event, start=start), CLOSED)

    # -- receive windows ------------------------------------------------------------
    def test_window_overrun_is_a_flow_control_error(self):
        window = ReceiveWindow(WindowBudget())
        window.received(INITIAL_WINDOW)            # exactly the window: fine
        with self.assertRaises(ProtocolError) as cm:
            window.received(1)
        self.assertEqual(cm.exception.code, "flow-control")
        with self.assertRaises(ProtocolError):
            ReceiveWindow(WindowBudget()).received(INITIAL_WINDOW + 1)

    def test_credit_returns_only_at_half_a_window(self):
        window = ReceiveWindow(WindowBudget())
        half = INITIAL_WINDOW // 2
        window.received(INITIAL_WINDOW)
        self.assertEqual(window.delivered(half - 1, 100.0, 0.01), 0)
        self.assertEqual(window.delivered(1, 100.0, 0.01), half)      # slow: no growth
        self.assertEqual(window.size, INITIAL_WINDOW)
        window.received(half)                       # the credit really is usable
        with self.assertRaises(ProtocolError):
            window.received(1)
        self.assertEqual(window.delivered(half - 1, 200.0, 0.01), 0)
        self.assertEqual(window.delivered(1, 200.0, 0.01), half)

    def test_window_doubles_with_fast_updates_and_stops_at_max(self):
        budget = WindowBudget(10 * MAX_WINDOW)
        window = ReceiveWindow(budget)
        now, sizes = 100.0, []
        for _ in range(40):
            half = window.size // 2
            window.received(half)
            credit = window.delivered(half, now, 0.01)
            self.assertGreater(credit, 0)
            self.assertEqual(window.available, window.size)   # sender may fill the new window
            sizes.append(window.size)
            now += 0.001                             # far faster than 4 round trips
        self.assertEqual(sizes[0], INITIAL_WINDOW)   # the first update has no predecessor
        self.assertEqual(sizes[1], 2 * INITIAL_WINDOW)
        self.assertEqual(sizes[-1], MAX_WINDOW)
        self.assertEqual(max(sizes), MAX_WINDOW)
        self.assertEqual(budget.available, 10 * MAX_WINDOW - (MAX_WINDOW - INITIAL_WINDOW))
        window.release()
        self.assertEqual(budget.available, 10 * MAX_WINDOW)

    def test_slow_updates_do_not_grow_the_window(self):
        window = ReceiveWindow(WindowBudget())
        now = 100.0
        for _ in range(10):
            window.received(INITIAL_WINDOW // 2)
            window.delivered(INITIAL_WINDOW // 2, now, 0.01)
            now += 1.0                               # 100 round trips apart
        self.assertEqual(window.size, INITIAL_WINDOW)

    def test_window_growth_stops_at_the_budget_and_release_gives_it_back(self):
        budget = WindowBudget(3 * INITIAL_WINDOW)
        first, second = ReceiveWindow(budget), ReceiveWindow(budget)
        now = 100.0
        for _ in range(10):
            half = first.size // 2
            first.received(half)
            first.delivered(half, now, 0.01)
            now += 0.001
        self.assertEqual(first.size, 4 * INITIAL_WINDOW)   # 256K + 512K taken, then no more
        self.assertEqual(budget.available, 0)
        for _ in range(4):                                 # nothing left for another stream
            second.received(INITIAL_WINDOW // 2)
            second.delivered(INITIAL_WINDOW // 2, now, 0.01)
            now += 0.001
        self.assertEqual(second.size, INITIAL_WINDOW)
        first.release()
        self.assertEqual(budget.available, 3 * INITIAL_WINDOW)
        self.assertEqual(first.size, INITIAL_WINDOW)
        for _ in range(4):                                 # ... and now there is
            half = second.size // 2
            second.received(half)
            second.delivered(half, now, 0.01)
            now += 0.001
        self.assertGreater(second.size, INITIAL_WINDOW)

    def test_window_without_budget_never_grows(self):
        window = ReceiveWindow(None)
        now = 100.0
        for _ in range(6):
            window.received(INITIAL_WINDOW // 2)
            window.delivered(INITIAL_WINDOW // 2, now, 0.01)
            now += 0.0001
        self.assertEqual(window.size, INITIAL_WINDOW)

    # -- addresses and names ----------------------------------------------------------
    def test_parse_hostport(self):
        cases = [
            (("relay.example.org:7700", "localhost"), ("relay.example.org", 7700)),
            (("8080", "127.0.0.1"), ("127.0.0.1", 8080)),
            (("[::1]:22", "localhost"), ("::1", 22)),
            (("[::1]", "localhost", 7700), ("::1", 7700)),
            (("[fe80::1]:0", "x"), ("fe80::1", 0)),
            (("relay", "localhost", 7700), ("relay", 7700)),
            ((" 127.0.0.1:65535 ", "x"), ("127.0.0.1", 65535)),
            (("localhost:0", "x"), ("localhost", 0)),
            (("relay:", "x", 7700), ("relay", 7700)),
        ]
        for args, expected in cases:
            with self.subTest(args=args):
                self.assertEqual(parse_hostport(*args), expected)

    def test_parse_hostport_errors(self):
        cases = [
            ("relay", "a port is needed"), ("relay:", "a port is needed"),
            ("relay:abc", "must be a number"), ("relay:65536", "must be a number"),
            ("relay:-1", "must be a number"), ("99999", "must be a number"),
            ("::1:22", "[ADDR]:PORT"), ("[::1", "missing ']'"), ("[::1]x", "bad"),
            ("[::1]:x", "must be a number"),
        ]
        for text, message in cases:
            with self.subTest(text=text):
                with self.assertRaises(MindmeldError) as cm:
                    parse_hostport(text, "localhost", None, "router address")
                self.assertIn(message, str(cm.exception))
                self.assertIn("router address", str(cm.exception))
                self.assertIn(repr(text.strip()), str(cm.exception))

    def test_service_names(self):
        for name in ("web", "a", "A-b_c.1", "x" * 64, "0", "..", "-"):
            with self.subTest(name=name):
                self.assertTrue(valid_name(name))
                self.assertEqual(check_name(name), name)
        for name in ("", "x" * 65, "a b", "a/b", "web\n", "caf\u00e9", "\u00fc", "\u540d\u524d",
                     "\u0664\u0662", "a:b", "a\x00", None, 5, b"web"):
            with self.subTest(name=name):
                self.assertFalse(valid_name(name))
                with self.assertRaises(MindmeldError) as cm:
                    check_name(name)
                self.assertIn("invalid service name", str(cm.exception))


# ---------------------------------------------------------------------------
# 3. The tunnel in one event loop
# ---------------------------------------------------------------------------

class _ListHandler(logging.Handler):
    def __init__(self, lines):
        logging.Handler.__init__(self, logging.DEBUG)
        self.lines = lines

    def emit(self, record):
        self.lines.append(record.getMessage())


class LoopTestCase(unittest.TestCase):
    """A fresh event loop per test; async cleanups run in it before it closes.

    (The helper is `run_async`, not `run`: unittest.TestCase.run runs the test.)"""

    def setUp(self):
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self._async_cleanups = []
        self.logs = []
        logger = logging.getLogger("mindmeld")
        saved = (logger.level, logger.propagate, list(logger.handlers))
        logger.handlers[:] = [_ListHandler(self.logs)]
        logger.setLevel(logging.INFO)
        logger.propagate = False

        def restore():
            logger.setLevel(saved[0])
            logger.propagate = saved[1]
            logger.handlers[:] = saved[2]
        self.addCleanup(restore)

    def tearDown(self):
        loop = self.loop
        try:
            for cleanup in reversed(self._async_cleanups):
                try:
                    loop.run_until_complete(asyncio.wait_for(cleanup(), 10))
                except (Exception, asyncio.CancelledError):
                    pass
            leftovers = [t for t in _all_tasks(loop) if not t.done()]
            for task in leftovers:
                task.cancel()
            if leftovers:
                loop.run_until_complete(asyncio.wait(leftovers, timeout=10))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()
            asyncio.set_event_loop(None)

    def run_async(self, coro, timeout=30):
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout))

    # -- the pieces of a tunnel -----------------------------------------------------
    async def start_router(self, **options):
        router = Router(LOCALHOST, 0, **options)
        await router.start()
        self._async_cleanups.append(lambda: router.close(0))
        self.router_address = "%s:%d" % (LOCALHOST, router.port)
        return router

    async def start_sharer(self, services, ready=True, **options):
        sharer = Sharer(services, router=self.router_address, **options)
        self._async_cleanups.append(lambda: sharer.close(0))
        await sharer.start()
        if ready:
            await sharer.wait_ready(10)
        return sharer

    async def start_forwarder(self, name, **options):
        forwarder = Forwarder(name, LOCALHOST, 0, router=self.router_address, **options)
        self._async_cleanups.append(lambda: forwarder.close(0))
        await forwarder.start()
        await forwarder.wait_ready(10)
        return forwarder

    async def start_target(self, handler, sock=None):
        """An asyncio TCP server on 127.0.0.1 running handler(reader, writer)."""
        writers = []

        async def serve(reader, writer):
            writers.append(writer)
            try:
                await handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        if sock is None:
            server = await asyncio.start_server(serve, LOCALHOST, 0, backlog=512)
        else:
            server = await asyncio.start_server(serve, sock=sock, backlog=512)

        async def close():
            server.close()
            for writer in writers:
                writer.close()
            try:
                await asyncio.wait_for(server.wait_closed(), 2)
            except asyncio.TimeoutError:
                pass
        self._async_cleanups.append(close)
        return server.sockets[0].getsockname()[1]

    async def connect(self, port):
        reader, writer = await asyncio.open_connection(LOCALHOST, port)

        async def close():
            writer.close()
        self._async_cleanups.append(close)
        return reader, writer

    async def tunnel(self, handler, name="web", **router_options):
        """Router, a target running handler, a sharer of it as `name`, a forwarder to it."""
        self.router = await self.start_router(**router_options)
        self.target_port = await self.start_target(handler)
        self.sharer = await self.start_sharer({name: (LOCALHOST, self.target_port)})
        self.forwarder = await self.start_forwarder(name)
        return self.forwarder.port


async def read_to_end(reader, limit):
    """Everything until EOF (at most `limit` bytes): (count, sha256 hex, first bytes)."""
    h, count, head = hashlib.sha256(), 0, b""
    for _ in range(limit // 1024 + 2):
        chunk = await reader.read(CHUNK)
        if not chunk:
            return count, h.hexdigest(), head
        h.update(chunk)
        count += len(chunk)
        if len(head) < 64:
            head += chunk[:64]
        if count > limit:
            raise AssertionError("more than %d bytes arrived" % limit)
    raise AssertionError("no EOF after %d bytes" % count)


async def closed_within(reader, timeout):
    """How a connection the far side closes ends for its reader: 'eof' or 'reset'.
    (Closing a socket with unread bytes makes Linux send a reset, not a FIN.)"""
    try:
        data = await asyncio.wait_for(reader.read(CHUNK), timeout)
    except ConnectionResetError:
        return "reset"
    return "eof" if data == b"" else "data: %r" % data[:40]


async def send_pattern(writer, pattern, total):
    for chunk in pattern.chunks(total):
        writer.write(chunk)
        await writer.drain()


async def echo_handler(reader, writer):
    """Echo everything, then close (EOF after EOF)."""
    for _ in range(100000):
        data = await reader.read(CHUNK)
        if not data:
            break
        writer.write(data)
        await writer.drain()


async def echo_exchange(test, port, pattern, total, first=b"", settle=False):
    """Send `total` bytes and read the echo at the same time; both must match.

    settle: one byte goes there and back first, so the stream is surely open
    before the bulk (what a client sends before that is tested on its own)."""
    reader, writer = await test.connect(port)
    writer.write(first)
    if settle:
        writer.write(b"!")
        test.assertEqual(await reader.readexactly(1), b"!")

    async def upload():
        await send_pattern(writer, pattern, total)
        writer.write_eof()
    sender = asyncio.ensure_future(upload())
    try:
        count, digest, _ = await read_to_end(reader, total)
        await sender
    finally:
        sender.cancel()
    test.assertEqual(count, total)
    test.assertEqual(digest, pattern.digest(total))


class TestTunnel(LoopTestCase):

    def test_upload_20mb_byte_exact(self):
        total, pattern = 20 * MB, Pattern()

        async def target(reader, writer):
            count, digest, _ = await read_to_end(reader, total + MB)
            writer.write(("%d %s\n" % (count, digest)).encode())
            await writer.drain()

        async def main():
            port = await self.tunnel(target)
            reader, writer = await self.connect(port)
            await send_pattern(writer, pattern, total)
            writer.write_eof()
            reply = await reader.read(-1)                            # the target's answer, EOF
            self.assertEqual(reply.decode(), "%d %s\n" % (total, pattern.digest(total)))
        self.run_async(main(), 60)

    def test_download_20mb_byte_exact(self):
        total, pattern = 20 * MB, Pattern()

        async def target(reader, writer):
            await send_pattern(writer, pattern, total)

        async def main():
            port = await self.tunnel(target)
            reader, writer = await self.connect(port)
            count, digest, _ = await read_to_end(reader, total + MB)
            self.assertEqual(count, total)
            self.assertEqual(digest, pattern.digest(total))
        self.run_async(main(), 60)

    def test_200_concurrent_streams_through_one_forwarder(self):
        streams = 200

        async def target(reader, writer):
            data = await reader.read(-1)             # all of it, until EOF
            writer.write(b"echo:" + data)
            await writer.drain()

        async def one(port, i):
            reader, writer = await self.connect(port)
            payload = struct.pack("!I", i) + os.urandom(4096 + i * 37)
            writer.write(payload)
            writer.write_eof()
            reply = await reader.read(-1)
            return reply == b"echo:" + payload

        async def main():
            port = await self.tunnel(target)
            results = await asyncio.gather(*[one(port, i) for i in range(streams)])
            self.assertEqual(results.count(True), streams)
            services = await list_services(router=self.router_address)
            self.assertEqual([(s["name"], s["streams"]) for s in services], [("web", 0)])
        self.run_async(main(), 60)

    def test_half_close_client_first(self):
        got = []

        async def target(reader, writer):
            request = await reader.read(-1)          # EOF arrives: the client is done
            got.append(request)
            writer.write(b"reply to " + request)     # ... yet the reply still goes back
            await writer.drain()

        async def main():
            port = await self.tunnel(target)
            reader, writer = await self.connect(port)
            writer.write(b"request")
            writer.write_eof()                       # shutdown(SHUT_WR)
            self.assertEqual(await reader.read(-1), b"reply to request")
            self.assertEqual(got, [b"request"])
        self.run_async(main())

    def test_half_close_target_first(self):
        total, pattern = 3 * MB, Pattern()

        async def main():
            received = self.loop.create_future()

            async def target(reader, writer):
                writer.write(b"banner")
                writer.write_eof()                   # the target is done talking ...
                received.set_result(await read_to_end(reader, total + MB))   # ... not listening

            port = await self.tunnel(target)
            reader, writer = await self.connect(port)
            self.assertEqual(await reader.read(-1), b"banner")     # banner, then EOF
            await send_pattern(writer, pattern, total)             # the client keeps sending
            writer.write_eof()
            count, digest, _ = await asyncio.wait_for(received, 20)
            self.assertEqual((count, digest), (total, pattern.digest(total)))
            self.assertEqual(await reader.read(100), b"")
        self.run_async(main())

    def test_stalled_reader_beside_a_busy_stream(self):
        pattern = Pattern()
        cap = 256 * MB

        async def main():
            stalled = self.loop.create_future()
            pushed = self.loop.create_future()

            async def target(reader, writer):
                mode = await reader.readexactly(5)
                if mode == b"echo\n":
                    return await echo_handler(reader, writer)
                h, sent = hashlib.sha256(), 0
                for chunk in pattern.chunks(cap):
                    writer.write(chunk)
                    h.update(chunk)
                    sent += len(chunk)
                    drain = asyncio.ensure_future(writer.drain())
                    done, _ = await asyncio.wait([drain], timeout=1.0)
                    if not done:                     # nothing moved for a second: full
                        stalled.set_result(sent)
                        await drain
                        break
                    drain.result()
                else:
                    stalled.set_exception(AssertionError("%d MB went in without back-pressure"
                                                         % (cap // MB)))
                pushed.set_result((sent, h.hexdigest()))

            port = await self.tunnel(target)
            slow_reader, slow_writer = await self.connect(port)
            slow_writer.write(b"push\n")             # ... and never read, for now
            in_flight = await asyncio.wait_for(stalled, 60)
            self.assertLess(in_flight, cap)
            await echo_exchange(self, port, Pattern(), 5 * MB, b"echo\n", settle=True)
            self.assertFalse(pushed.done())          # the stalled stream is still held back
            count, digest, _ = await read_to_end(slow_reader, cap)
            self.assertEqual((count, digest), await asyncio.wait_for(pushed, 30))
        self.run_async(main(), 120)

    def test_refused_target_closes_the_local_connection_promptly(self):
        dead = free_port_socket()                    # bound, not listening: connects are refused
        self.addCleanup(dead.close)

        async def main():
            self.router = await self.start_router()
            await self.start_sharer({"dead": (LOCALHOST, dead.getsockname()[1])})
            forwarder = await self.start_forwarder("dead")
            reader, writer = await self.connect(forwarder.port)
            writer.write(b"hello?")
            self.assertIn(await closed_within(reader, 2.0), ("eof", "reset"))
            self.assertTrue(any("refused" in line and "'dead'" in line for line in self.logs),
                            self.logs)
            # the target comes up: the same forwarder now serves it
            dead.listen(16)
            await self.start_target(echo_handler, sock=dead)
            reader, writer = await self.connect(forwarder.port)
            writer.write(b"ping")
            writer.write_eof()
            self.assertEqual(await reader.read(-1), b"ping")
            self.assertFalse(forwarder.done.done())
        self.run_async(main())

    def test_unknown_service_is_refused_and_the_forwarder_keeps_running(self):
        async def main():
            self.router = await self.start_router()
            forwarder = await self.start_forwarder("nosuch")
            for attempt in range(2):
                reader, writer = await self.connect(forwarder.port)
                if attempt:
                    writer.write(b"GET / HTTP/1.0\r\n\r\n")
                self.assertIn(await closed_within(reader, 5), ("eof", "reset"))
                refusals = [l for l in self.logs if "refused" in l and "no service named" in l]
                self.assertEqual(len(refusals), attempt + 1, self.logs)
                self.assertIn("'nosuch'", refusals[-1])
            self.assertFalse(forwarder.done.done())
        self.run_async(main())

    def test_sharer_going_away_mid_transfer(self):
        pattern = Pattern()

        async def target(reader, writer):
            await send_pattern(writer, pattern, 1024 * MB)   # more than the test will read

        async def main():
            port = await self.tunnel(target)
            self.assertEqual([s["name"] for s in await list_services(router=self.router_address)],
                             ["web"])
            reader, writer = await self.connect(port)
            received = 0
            for _ in range(1000):
                received += len(await reader.read(CHUNK))
                if received >= MB:
                    break
            self.assertGreaterEqual(received, MB)
            closing = asyncio.ensure_future(self.sharer.close(0))

            async def until_the_end():
                for _ in range(100000):
                    if not await reader.read(CHUNK):
                        return "eof"
                return "still open"
            try:
                outcome = await asyncio.wait_for(until_the_end(), 5)
            except ConnectionResetError:
                outcome = "reset"
            self.assertIn(outcome, ("eof", "reset"))
            await asyncio.wait_for(closing, 5)
            self.assertEqual(await list_services(router=self.router_address), [])
        self.run_async(main())

    def test_duplicate_name_is_refused(self):
        async def main():
            port = await self.tunnel(echo_handler, liveness_probe=0.5)
            second = await self.start_sharer({"web": (LOCALHOST, self.target_port)}, ready=False)
            with self.assertRaises(PermanentError) as cm:
                await asyncio.wait_for(second.done, 10)
            self.assertIn("already shared", str(cm.exception))
            # the first sharer still owns the name and still serves
            services = await list_services(router=self.router_address)
            self.assertEqual([s["name"] for s in services], ["web"])
            reader, writer = await self.connect(port)
            writer.write(b"still mine")
            writer.write_eof()
            self.assertEqual(await reader.read(-1), b"still mine")
        self.run_async(main())

    def test_list_services_counts_open_streams(self):
        async def main():
            port = await self.tunnel(echo_handler)
            before = await list_services(router=self.router_address)
            self.assertEqual([(s["name"], s["streams"], s["secret"]) for s in before],
                             [("web", 0, False)])
            reader, writer = await self.connect(port)
            writer.write(b"x")
            self.assertEqual(await reader.readexactly(1), b"x")   # the stream is open
            during = await list_services(router=self.router_address)
            self.assertEqual(during[0]["streams"], 1)
            self.assertEqual(self.router.services["web"].streams, 1)
            self.assertTrue(during[0]["peer"].startswith("127.0.0.1:"))
            self.assertLessEqual(abs(during[0]["since"] - time.time()), 60)
        self.run_async(main())


    def test_connection_waiting_for_the_router_is_pushed_back(self):
        # While a forwarder has no router link, an accepted connection waits; what
        # its client sends meanwhile must stay in kernel buffers (reading paused),
        # not pile up in the forwarder.
        dead = free_port_socket()                    # the router is down: connects refused
        self.addCleanup(dead.close)
        cap, limit = 16 * MB, 10 * MB

        async def main():
            forwarder = Forwarder("web", LOCALHOST, 0, router="%s:%d" % dead.getsockname())
            self._async_cleanups.append(lambda: forwarder.close(0))
            await forwarder.start()
            reader, writer = await self.connect(forwarder.port)
            written, block = 0, os.urandom(CHUNK)
            for _ in range(cap // CHUNK):
                writer.write(block)
                written += CHUNK
                drain = asyncio.ensure_future(writer.drain())
                done, _ = await asyncio.wait([drain], timeout=1.0)
                if not done:                         # pushed back: nothing moved for 1 s
                    drain.cancel()
                    break
                drain.result()
            self.assertLess(written, limit, "the forwarder took %.1f MB from a client whose "
                            "stream could not open" % (written / MB))
        self.run_async(main(), 60)

    def test_router_answers_http_and_refuses_other_protocols(self):
        async def main():
            router = await self.start_router()

            async def ask(data):
                reader, writer = await self.connect(router.port)
                writer.write(data)
                return await asyncio.wait_for(reader.read(-1), 10)

            health = await ask(b"GET /healthz HTTP/1.0\r\n\r\n")
            self.assertTrue(health.startswith(b"HTTP/1.1 200 OK\r\n"), health)
            self.assertTrue(health.endswith(b"\r\n\r\nok\n"), health)
            missing = await ask(b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")
            self.assertTrue(missing.startswith(b"HTTP/1.1 404"), missing)
            ssh = await ask(b"SSH-2.0-OpenSSH_9.6\r\n")
            self.assertIn(b"this port speaks the mindmeld protocol", ssh)
            self.assertEqual(await ask(b"\x16\x03\x01\x00\x05hello"), b"")   # TLS: just closed
            self.assertTrue(any("TLS" in line for line in self.logs), self.logs)
        self.run_async(main())

    def test_router_token_is_required_and_checked(self):
        async def main():
            self.router = await self.start_router(token="s3cret")
            target = await self.start_target(echo_handler)
            for token, message in ((None, "requires a token"), ("wrong", "refused the token")):
                with self.subTest(token=token):
                    sharer = await self.start_sharer({"web": (LOCALHOST, target)}, ready=False,
                                                     token=token)
                    with self.assertRaises(PermanentError) as cm:
                        await asyncio.wait_for(sharer.done, 10)
                    self.assertIn(message, str(cm.exception))
            await self.start_sharer({"web": (LOCALHOST, target)}, token="s3cret")
            forwarder = await self.start_forwarder("web", token="s3cret")
            reader, writer = await self.connect(forwarder.port)
            writer.write(b"authenticated")
            writer.write_eof()
            self.assertEqual(await reader.read(-1), b"authenticated")
        self.run_async(main())


# ---------------------------------------------------------------------------
# Subprocess helpers
# ---------------------------------------------------------------------------

def cli_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MINDMELD_") and k != "PORT"}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.update(extra)
    return env


def cli(*args, env=None, timeout=30):
    """Run one short command to completion: CompletedProcess with text output."""
    return subprocess.run([sys.executable, "-u", SCRIPT] + list(args), cwd=HERE,
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, env=env or cli_env(),
                          timeout=timeout, universal_newlines=True)


class Proc:
    """A long-running mindmeld process whose stderr lines are read by a thread."""

    def __init__(self, test, args, env=None, script=SCRIPT):
        argv = [sys.executable, "-u", script if script else "-"] + list(args)
        self.argv = argv
        self.p = subprocess.Popen(argv, cwd=HERE, env=env or cli_env(),
                                  stdin=subprocess.PIPE if script is None else subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        test.addCleanup(self.stop)
        self.pid = self.p.pid
        self.lines = []                 # every stderr line seen so far by wait_line
        self.stdout = []
        self._queue = queue.Queue()
        self._threads = [threading.Thread(target=self._pump, args=(self.p.stderr, self._queue.put)),
                         threading.Thread(target=self._pump, args=(self.p.stdout, self.stdout.append))]
        for thread in self._threads:
            thread.daemon = True
            thread.start()
        if script is None:
            with open(SCRIPT, "rb") as f:
                source = f.read()
            self.p.stdin.write(source)
            self.p.stdin.close()

    @staticmethod
    def _pump(stream, put):
        for line in iter(stream.readline, b""):
            put(line.decode("utf-8", "replace").rstrip("\n"))
        put(None)

    def wait_line(self, pattern, timeout=20):
        """The first new stderr line matching `pattern`: its match object."""
        deadline = time.monotonic() + timeout
        for _ in range(100000):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:
                self.p.wait(10)
                raise AssertionError("%s exited (%s) before logging /%s/; stderr:\n%s"
                                     % (" ".join(self.argv[2:]), self.p.returncode, pattern,
                                        "\n".join(self.lines)))
            self.lines.append(line)
            match = re.search(pattern, line)
            if match:
                return match
        raise AssertionError("no line matching /%s/ within %s s; stderr so far:\n%s"
                             % (pattern, timeout, "\n".join(self.lines)))

    def finish(self, timeout=20):
        """Wait for the exit; returns (exit code, every stderr line)."""
        self.p.wait(timeout)
        for thread in self._threads:
            thread.join(10)
        for _ in range(100000):
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.lines.append(line)
        return self.p.returncode, self.lines

    def signal(self, signum, timeout=20):
        self.p.send_signal(signum)
        return self.finish(timeout)

    def running(self):
        return self.p.poll() is None

    def rss_kb(self):
        with open("/proc/%d/status" % self.pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS for %d" % self.pid)

    def stop(self):
        if self.p.poll() is None:
            self.p.kill()
        try:
            self.p.wait(10)
        finally:
            for thread in self._threads:
                thread.join(10)
            for stream in (self.p.stdin, self.p.stdout, self.p.stderr):
                if stream is not None:
                    stream.close()


class ThreadedServer:
    """A blocking TCP server on 127.0.0.1: one thread per connection runs handler(conn)."""

    def __init__(self, test, handler):
        self.handler = handler
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((LOCALHOST, 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.errors = []
        self._conns, self._threads = [], []
        self._wake_r, self._wake_w = socket.socketpair()
        self._closed = False
        self._acceptor = threading.Thread(target=self._accept)
        self._acceptor.daemon = True
        self._acceptor.start()
        test.addCleanup(self.close)

    def _accept(self):
        for _ in range(100000):
            ready, _, _ = select.select([self.sock, self._wake_r], [], [])
            if self._closed or self._wake_r in ready:
                return
            conn, _ = self.sock.accept()
            conn.settimeout(60)
            self._conns.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn,))
            thread.daemon = True
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn):
        try:
            self.handler(conn)
        except OSError as exc:
            if not self._closed:
                self.errors.append(exc)
        finally:
            conn.close()

    def close(self):
        self._closed = True
        self._wake_w.send(b"x")
        self._acceptor.join(10)
        for conn in list(self._conns):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in list(self._threads):
            thread.join(10)
        for sock in (self.sock, self._wake_r, self._wake_w):
            sock.close()


def recv_exactly(conn, n):
    data = b""
    for _ in range(n + 1):
        if len(data) >= n:
            break
        chunk = conn.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def recv_to_end(conn, limit, keep=False):
    """(count, sha256 hex, the data if keep) until EOF, at most `limit` bytes."""
    h, count, parts = hashlib.sha256(), 0, []
    for _ in range(limit // 1024 + 2):
        chunk = conn.recv(CHUNK)
        if not chunk:
            break
        h.update(chunk)
        count += len(chunk)
        if keep:
            parts.append(chunk)
        if count > limit:
            raise AssertionError("more than %d bytes arrived" % limit)
    return count, h.hexdigest(), b"".join(parts)


def blocking_echo(conn):
    for _ in range(1000000):
        data = conn.recv(CHUNK)
        if not data:
            break
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)


def exchange(port, payload, first=b"", settle=False, timeout=30):
    """Connect, send payload, half-close, return everything received until EOF.

    settle: send `first` and one byte, and wait for that byte's echo, before the payload."""
    with socket.create_connection((LOCALHOST, port), timeout=timeout) as conn:
        conn.sendall(first)
        if settle:
            conn.sendall(b"!")
            assert recv_exactly(conn, 1) == b"!", "no echo"
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        return recv_to_end(conn, len(payload) + MB, keep=True)[2]


class CommandLineMixin:
    """Start the three roles as processes; wait for their log lines."""

    def start_router(self, *extra):
        router = Proc(self, ["router", "--listen", "127.0.0.1:0"] + list(extra))
        port = int(router.wait_line(r"router listening on 127\.0\.0\.1:(\d+)").group(1))
        return router, "127.0.0.1:%d" % port

    def start_share(self, name, target_port, router, script=SCRIPT, env=None, extra=()):
        args = ["share", name, "127.0.0.1:%d" % target_port] + list(extra)
        if router is not None:
            args += ["--router", router]
        share = Proc(self, args, env=env, script=script)
        share.wait_line(r"sharing '%s' -> 127\.0\.0\.1:%d" % (re.escape(name), target_port))
        return share

    def start_forward(self, name, router, listen=("0",)):
        forward = Proc(self, ["forward", name] + list(listen) + ["--router", router])
        port = int(forward.wait_line(
            r"forwarding 127\.0\.0\.1:(\d+) -> '%s'" % re.escape(name)).group(1))
        return forward, port


# ---------------------------------------------------------------------------
# 4. Memory bound: three processes, a client that does not read
# ---------------------------------------------------------------------------

@unittest.skipUnless(os.path.exists("/proc/self/status"), "needs /proc to read VmRSS")
class TestMemoryBound(CommandLineMixin, unittest.TestCase):

    def test_stalled_reader_keeps_memory_bounded(self):
        pattern, cap, growth_limit_kb = Pattern(), 200 * MB, 8 * 1024
        stalled, pushed = threading.Event(), threading.Event()
        result = {}

        def push(conn):
            conn.setblocking(False)
            h, sent = hashlib.sha256(), 0
            for chunk in pattern.chunks(cap):
                view = memoryview(chunk)
                for _ in range(1000):                  # each wait at most 1 s
                    if not view:
                        break
                    _, writable, _ = select.select([], [conn], [], 1.0)
                    if not writable:
                        if not stalled.is_set():    # unwritable for 1 s: the pipeline is full
                            result["stalled_at"] = sent
                            stalled.set()
                        continue
                    n = conn.send(view)
                    h.update(view[:n])
                    sent += n
                    view = view[n:]
                if view or stalled.is_set():
                    break
            stalled.set()                               # (also when 200 MB went in unopposed)
            conn.shutdown(socket.SHUT_WR)
            result["pushed"] = (sent, h.hexdigest())
            pushed.set()

        def handler(conn):
            mode = recv_exactly(conn, 5)
            if mode == b"push\n":
                push(conn)
            else:
                blocking_echo(conn)

        target = ThreadedServer(self, handler)
        router, address = self.start_router()
        share = self.start_share("bulk", target.port, address)
        forward, port = self.start_forward("bulk", address)
        procs = {"router": router, "share": share, "forward": forward}

        warm = os.urandom(256 * 1024)                  # first use of the data path
        self.assertEqual(exchange(port, warm, b"echo\n", settle=True), warm)
        before = {name: proc.rss_kb() for name, proc in procs.items()}

        slow = socket.create_connection((LOCALHOST, port), timeout=60)
        self.addCleanup(slow.close)
        slow.sendall(b"push\n")                        # and now read nothing
        self.assertTrue(stalled.wait(120), "the target neither finished nor stalled")
        self.assertIn("stalled_at", result, "%d MB went in without back-pressure" % (cap // MB))
        self.assertFalse(pushed.is_set())

        busy = os.urandom(2 * MB)                      # another stream is not stalled
        self.assertEqual(exchange(port, busy, b"echo\n", settle=True), busy)
        after = {name: proc.rss_kb() for name, proc in procs.items()}
        for name in procs:
            with self.subTest(process=name):
                self.assertLessEqual(after[name] - before[name], growth_limit_kb,
                                     "%s grew from %d kB to %d kB with %.1f MB in flight"
                                     % (name, before[name], after[name],
                                        result["stalled_at"] / MB))

        count, digest, _ = recv_to_end(slow, cap)
        self.assertTrue(pushed.wait(60))
        self.assertEqual((count, digest), result["pushed"])
        self.assertEqual(target.errors, [])
        for name, proc in procs.items():
            self.assertTrue(proc.running(), name)


# ---------------------------------------------------------------------------
# 5. The command line
# ---------------------------------------------------------------------------

def list_rows(completed):
    lines = [l for l in completed.stdout.splitlines() if l.strip()]
    return [l.split() for l in lines]


class TestCommandLine(CommandLineMixin, unittest.TestCase):

    def test_router_share_forward_list_end_to_end(self):
        target = ThreadedServer(self, blocking_echo)
        router, address = self.start_router()
        share = self.start_share("web", target.port, address)
        forward, port = self.start_forward("web", address, listen=["127.0.0.1:0"])

        listing = cli("list", "--router", address)
        self.assertEqual(listing.returncode, 0, listing.stderr)
        rows = list_rows(listing)
        self.assertEqual(rows[0], ["NAME", "REGISTERED", "STREAMS", "SHARER", "SECRET"])
        self.assertEqual(len(rows), 2, listing.stdout)
        self.assertEqual(rows[1][0], "web")
        self.assertEqual(rows[1][2], "0")
        self.assertTrue(rows[1][3].startswith("127.0.0.1:"), rows[1])
        self.assertEqual(rows[1][4], "no")

        with socket.create_connection((LOCALHOST, port), timeout=20) as conn:
            conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
            self.assertEqual(recv_exactly(conn, 18), b"GET / HTTP/1.0\r\n\r\n")
            listing = cli("list", "--router", address)         # one stream is open now
            rows = list_rows(listing)
            self.assertEqual([rows[1][0], rows[1][2]], ["web", "1"], listing.stdout)
            payload = os.urandom(MB)
            conn.sendall(payload)
            conn.shutdown(socket.SHUT_WR)
            self.assertEqual(recv_to_end(conn, 2 * MB, keep=True)[2], payload)

        for name, proc in (("forward", forward), ("share", share), ("router", router)):
            with self.subTest(process=name):
                code, lines = proc.signal(signal.SIGINT)
                self.assertEqual(code, 0, lines)
                self.assertFalse([l for l in lines if "Traceback" in l], lines)

    def test_help_for_each_command_exits_0(self):
        for command in ("router", "share", "forward", "list"):
            with self.subTest(command=command):
                done = cli(command, "--help")
                self.assertEqual(done.returncode, 0, done.stderr)
                self.assertTrue(done.stdout.startswith("usage: mindmeld %s" % command), done.stdout)
        done = cli("--help")
        self.assertEqual(done.returncode, 0)
        for command in ("router", "share", "forward", "list"):
            self.assertIn(command, done.stdout)

    def test_bad_arguments_exit_2(self):
        cases = [
            ((), "required"),
            (("share",), "required"),
            (("forward",), "required"),
            (("router", "--bogus"), "unrecognized arguments"),
            (("list", "--keepalive", "0"), "must be more than 0"),
            (("share", "web", "80", "--max-retries", "-1"), "whole number"),
            (("frobnicate",), "invalid choice"),
        ]
        for args, message in cases:
            with self.subTest(args=args):
                done = cli(*args)
                self.assertEqual(done.returncode, 2, done.stderr)
                self.assertIn("usage: mindmeld", done.stderr)
                self.assertIn(message, done.stderr)
                self.assertNotIn("Traceback", done.stderr)

    def test_share_without_a_target_is_a_usage_error(self):
        # like every other malformed command line: usage, the problem, exit status 2
        done = cli("share", "web")
        self.assertEqual(done.returncode, 2, done.stderr)
        self.assertIn("usage: mindmeld share", done.stderr)
        self.assertIn("PORT", done.stderr.splitlines()[-1])

    def test_bad_port_is_one_error_line(self):
        cases = [
            (("share", "web", "abc"), "mindmeld share: error: bad target 'abc': a port is needed"),
            (("share", "web", "localhost:abc"),
             "mindmeld share: error: bad target 'localhost:abc': the port must be a number"),
            (("forward", "web", "abc"),
             "mindmeld forward: error: bad listen address 'abc': a port is needed"),
            (("forward", "web", "70000"),
             "mindmeld forward: error: bad listen address '70000': the port must be a number"),
            (("list", "--router", "127.0.0.1:abc"),
             "mindmeld list: error: bad router address '127.0.0.1:abc'"),
        ]
        for args, line in cases:
            with self.subTest(args=args):
                done = cli(*args)
                self.assertEqual(done.returncode, 1, done.stderr)
                lines = done.stderr.splitlines()
                self.assertEqual(len(lines), 1, done.stderr)
                self.assertTrue(lines[0].startswith(line), lines[0])

    def test_unreachable_router_is_one_error_line(self):
        dead = free_port_socket()                    # bound, not listening: refused
        self.addCleanup(dead.close)
        address = "127.0.0.1:%d" % dead.getsockname()[1]
        cases = [
            (("list", "--router", address), "mindmeld list: error: cannot reach the router at "),
            (("share", "web", "80", "--router", address, "--max-retries", "0"),
             "mindmeld share: error: cannot reach the router at "),
        ]
        for args, start in cases:
            with self.subTest(args=args):
                done = cli(*args)
                self.assertEqual(done.returncode, 1, done.stderr)
                lines = done.stderr.splitlines()
                self.assertEqual(len(lines), 1, done.stderr)
                self.assertTrue(lines[0].startswith(start + address), lines[0])

    def test_invalid_service_name_exits_1(self):
        for args in (("share", "bad name", "80"), ("forward", "a/b", "0"),
                     ("share", "x" * 65, "80"), ("forward", "caf\u00e9")):
            with self.subTest(args=args):
                done = cli(*args)
                self.assertEqual(done.returncode, 1, done.stderr)
                lines = done.stderr.splitlines()
                self.assertEqual(len(lines), 1, done.stderr)
                self.assertIn("invalid service name", lines[0])
                self.assertTrue(lines[0].startswith("mindmeld %s: error:" % args[0]), lines[0])

    def test_duplicate_share_exits_1_with_one_line(self):
        target = ThreadedServer(self, blocking_echo)
        router, address = self.start_router()
        first = self.start_share("dup", target.port, address)
        second = Proc(self, ["share", "dup", str(target.port), "--router", address])
        code, lines = second.finish(30)
        self.assertEqual(code, 1, lines)
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("already shared", lines[0])
        self.assertTrue(lines[0].startswith("mindmeld share: error:"), lines[0])
        self.assertTrue(first.running())
        rows = list_rows(cli("list", "--router", address))
        self.assertEqual([r[0] for r in rows[1:]], ["dup"])

    def test_unknown_service_is_logged_and_the_forwarder_keeps_running(self):
        router, address = self.start_router()
        forward, port = self.start_forward("nosuch", address, listen=[])
        for attempt in range(2):
            with socket.create_connection((LOCALHOST, port), timeout=20) as conn:
                if attempt:
                    conn.sendall(b"hello")
                try:
                    self.assertEqual(conn.recv(100), b"")      # closed by the forwarder ...
                except ConnectionResetError:
                    pass                                       # ... or reset: unread bytes
            line = forward.wait_line(r"refused").string
            self.assertIn("no service named", line)
            self.assertIn("'nosuch'", line)
            self.assertTrue(forward.running())

    def test_router_address_from_the_environment(self):
        target = ThreadedServer(self, blocking_echo)
        router, address = self.start_router()
        env = cli_env(MINDMELD_ROUTER=address)
        share = self.start_share("fromenv", target.port, None, env=env)
        done = cli("list", "--json", env=env)
        self.assertEqual(done.returncode, 0, done.stderr)
        services = json.loads(done.stdout)
        self.assertEqual([s["name"] for s in services], ["fromenv"])
        self.assertEqual(services[0]["streams"], 0)
        self.assertIs(services[0]["secret"], False)
        self.assertTrue(share.running())

    def test_sigterm_each_role_exits_0(self):
        target = ThreadedServer(self, blocking_echo)
        router, address = self.start_router()
        share = self.start_share("term", target.port, address)
        forward, port = self.start_forward("term", address)
        self.assertEqual(exchange(port, b"before the signal"), b"before the signal")
        for name, proc in (("forward", forward), ("share", share), ("router", router)):
            with self.subTest(process=name):
                code, lines = proc.signal(signal.SIGTERM)
                self.assertEqual(code, 0, lines)
                self.assertTrue(any("shutting down" in l for l in lines), lines)
                self.assertFalse([l for l in lines if "Traceback" in l], lines)

    def test_script_piped_on_stdin(self):
        target = ThreadedServer(self, blocking_echo)
        router, address = self.start_router()
        share = self.start_share("piped", target.port, address, script=None)   # python3 - share ...
        forward, port = self.start_forward("piped", address)
        payload = os.urandom(300 * 1024)
        self.assertEqual(exchange(port, payload), payload)
        code, lines = share.signal(signal.SIGTERM)
        self.assertEqual(code, 0, lines)


if __name__ == "__main__":
    unittest.main()
