"""Tests for mindmeld.py: stdlib unittest, real loopback sockets, real subprocesses.

    python3 -m unittest -v test_mindmeld        (from the repository folder)

Runs on CPython 3.6 to 3.13.  Nothing here sleeps to wait for something: every
wait is on an event, a line of output or a socket's readiness, with a deadline
(in-process state with no event of its own is polled by wait_until(), bounded).
Only 127.0.0.1 and ::1 are ever used.  Section 1 holds the helpers every test uses.

  TestCodec        frames and preambles, no sockets
  TestCore         stream states, flow-control windows, addresses, names
  TestWsCodec, TestBackoff, TestProxyChoice
                   WebSocket framing, reconnect backoff, proxy choice: no sockets
  TestTunnel       router + sharer + forwarder as library objects in one event loop
  TestMemoryBound  the three roles as command-line processes, a reader that stalls
  TestCommandLine  the command line end to end, errors, signals, `python3 -`
  TestConnect, TestWebSocket, TestRouterHttp, TestProxy, TestSeveralServices, TestListen
                   reach: stdin/stdout streams, HTTP fronts, proxies, IPv6
  TestStayingUp, TestStayingUpCommandLine
                   keepalive, reconnection, outages, signals, no leaks over reconnects
  TestTlsCommandLine, TestRouterToken, TestServiceSecret, TestHostilePeers, TestHostileTls,
  TestFuzz         security: TLS without a PKI, tokens, secrets, hostile peers, a seeded fuzz
"""

import asyncio
import base64
import collections
import datetime
import gc
import hashlib
import heapq
import hmac
import itertools
import json
import logging
import os
import queue
import random
import re
import select
import shutil
import signal
import socket
import ssl
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import unittest
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "mindmeld.py")
# Most tests run the command line as `python -m mindmeld ...`, which loads bytecode
# compiled once here (py_compile writes it even under PYTHONDONTWRITEBYTECODE) instead
# of compiling the whole script at each of some two hundred starts.  The literal
# `python3 mindmeld.py ...` and `python3 - ...` forms have tests of their own.
MODULE = ["-m", "mindmeld"]
try:
    import importlib.util
    import py_compile
    py_compile.compile(SCRIPT, cfile=importlib.util.cache_from_source(SCRIPT), doraise=True)
except (OSError, py_compile.PyCompileError):
    pass                                    # a read-only checkout: slower, not wrong
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from mindmeld import (  # noqa: E402
    AUTH, CHALLENGE, GOAWAY, HEADER, LIST, OPEN_OK, OPEN_REFUSED, PROOF, REGISTER, REGISTERED,
    TlsOptions, router_tls_context,
    DATA, EOF, HEADER_SIZE, HELLO, INITIAL_WINDOW, LIST_REPLY, MAGIC, MAX_CONTROL,
    MAX_DATA, MAX_LIST_REPLY, MAX_WINDOW, OPEN, PING, PONG, PREAMBLE, PROTOCOL_VERSION,
    RESET, WINDOW, FrameDecoder, Forwarder, MindmeldError, PermanentError, PreambleError,
    ProtocolError, ReceiveWindow, Router, Sharer, StreamEnd, StreamIds, STREAM_TRANSITIONS,
    WindowBudget, LocalProtocolError, FRAME_NAMES, OPEN_SENT, OPEN_RECEIVED, OPEN_STATE,
    LOCAL_EOF, REMOTE_EOF, CLOSED, check_name, classify_preamble, encode_frame, encode_json, list_services,
    parse_hostport, valid_name)

import mindmeld  # noqa: E402

LOCALHOST = "127.0.0.1"
MB = 1024 * 1024
CHUNK = 64 * 1024


# ---------------------------------------------------------------------------
# 1. Helpers shared by every test class
# ---------------------------------------------------------------------------
# Naming: recv_* work on a blocking socket, read_* on an asyncio StreamReader.

if hasattr(asyncio, "all_tasks"):          # 3.7+
    def _all_tasks(loop):
        return asyncio.all_tasks(loop)

    def _current_task(loop):
        return asyncio.current_task(loop)
else:                                       # 3.6
    def _all_tasks(loop):
        return asyncio.Task.all_tasks(loop)

    def _current_task(loop):
        return asyncio.Task.current_task(loop)


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


# -- checks and waits -------------------------------------------------------

def assert_clean_output(output):
    """Fail if the output (text, or a list of lines) shows a traceback or an internal
    error (mindmeld prints 'internal error: ...' for an exception it did not expect)."""
    text = output if isinstance(output, str) else "\n".join(output)
    bad = [l for l in text.splitlines() if "Traceback" in l or "internal error" in l]
    if bad:
        raise AssertionError("unexpected %r in the output:\n%s" % (bad[0], text))


async def wait_until(predicate, timeout, what, interval=0.005):
    """Poll state that has no event of its own until predicate() holds.  After `timeout`
    seconds fail, saying `what` (a string, or a function describing the state then)."""
    loop = asyncio.get_event_loop()
    deadline = loop.time() + timeout
    for _ in range(int(timeout / interval) + 2):
        if predicate():
            return
        if loop.time() >= deadline:
            break
        await asyncio.sleep(interval)      # a bounded poll of in-process state
    if not predicate():
        raise AssertionError("not within %s s: %s" % (timeout, what() if callable(what) else what))


class LogWatch(logging.Handler):
    """A log as a list of lines that a coroutine can wait on (library roles log from
    the loop's thread, so a waiter's future is resolved right in emit())."""

    def __init__(self):
        logging.Handler.__init__(self, logging.DEBUG)
        self.lines = []
        self._waiters = []

    def emit(self, record):
        line = record.getMessage()
        self.lines.append(line)
        for regex, future in list(self._waiters):
            if not future.done() and regex.search(line):
                future.set_result((len(self.lines) - 1, line))

    async def wait(self, pattern, timeout, start=0):
        """The first line from index `start` on that matches `pattern`; its index is
        left in `self.matched_at`."""
        regex = re.compile(pattern)
        for index in range(start, len(self.lines)):
            if regex.search(self.lines[index]):
                self.matched_at = index
                return self.lines[index]
        entry = (regex, asyncio.get_event_loop().create_future())
        self._waiters.append(entry)
        try:
            self.matched_at, line = await asyncio.wait_for(entry[1], timeout)
            return line
        except asyncio.TimeoutError:
            raise AssertionError("no log line /%s/ within %s s; the log:\n%s"
                                 % (pattern, timeout, "\n".join(self.lines[-40:])))
        finally:
            self._waiters.remove(entry)


def capture_log(test, name, level):
    """Logger `name` at `level` goes to a fresh LogWatch only, for this test: the watch."""
    watch, logger = LogWatch(), logging.getLogger(name)
    saved = (logger.level, logger.propagate, list(logger.handlers))
    logger.handlers[:] = [watch]
    logger.setLevel(level)
    logger.propagate = False

    def restore():
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        logger.handlers[:] = saved[2]
    test.addCleanup(restore)
    return watch


# -- reading to the end -----------------------------------------------------

Received = collections.namedtuple("Received", "count digest data")   # data: b"" unless kept


class _Tally:
    """What arrived so far: count, sha256 and (if kept) the bytes; at most `limit`."""

    def __init__(self, limit, keep):
        self.limit, self.keep = limit, keep
        self.hash, self.count, self.parts = hashlib.sha256(), 0, []

    def add(self, chunk):
        self.hash.update(chunk)
        self.count += len(chunk)
        if self.keep:
            self.parts.append(chunk)
        if self.count > self.limit:
            raise AssertionError("more than %d bytes arrived" % self.limit)

    def result(self):
        return Received(self.count, self.hash.hexdigest(), b"".join(self.parts))


def recv_exactly(conn, n, timeout=30):
    """n bytes from a blocking socket (fewer if it closes first) within `timeout` s."""
    deadline, data = time.monotonic() + timeout, b""
    for _ in range(n + 1):
        if len(data) >= n:
            break
        conn.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = conn.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def recv_to_end(conn, limit, timeout=30, keep=False):
    """Received(count, sha256 hex, the bytes if keep) until EOF: at most `limit` bytes,
    within `timeout` seconds."""
    deadline, tally = time.monotonic() + timeout, _Tally(limit, keep)
    for _ in range(limit // 256 + 100):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        conn.settimeout(left)
        chunk = conn.recv(CHUNK)
        if not chunk:
            return tally.result()
        tally.add(chunk)
    raise AssertionError("no EOF within %s s after %d bytes" % (timeout, tally.count))


async def read_to_end(reader, limit, keep=False):
    """Received(count, sha256 hex, the bytes if keep) until EOF: at most `limit` bytes."""
    tally = _Tally(limit, keep)
    for _ in range(limit // 1024 + 2):
        chunk = await reader.read(CHUNK)
        if not chunk:
            return tally.result()
        tally.add(chunk)
    raise AssertionError("no EOF after %d bytes" % tally.count)


# -- how a connection that the far side closes ends -------------------------
# 'eof', 'reset' (closing a socket with unread bytes makes Linux send a reset, not a
# FIN), or 'still open' when the deadline passes first.

def countdown(timeout, clock=time.monotonic, passes=10 ** 6):
    """The seconds left before a deadline `timeout` s from now, once per pass: a bounded
    wait loop that stops at the deadline (or after `passes` passes)."""
    deadline = clock() + timeout
    for _ in range(passes):
        remaining = deadline - clock()
        if remaining <= 0:
            return
        yield remaining


def recv_until_closed(conn, timeout):
    """Read (and drop) from a blocking socket until the far side ends the connection."""
    for remaining in countdown(timeout):
        conn.settimeout(remaining)
        try:
            chunk = conn.recv(CHUNK)
        except socket.timeout:
            break
        except (ConnectionResetError, ConnectionAbortedError):
            return "reset"
        if not chunk:
            return "eof"
    return "still open"


async def read_until_closed(reader, timeout, drop=True):
    """The same for a StreamReader.  drop=False: bytes before the end are not expected,
    and the answer is 'data: ...' if some come."""
    for remaining in countdown(timeout, asyncio.get_event_loop().time):
        try:
            data = await asyncio.wait_for(reader.read(CHUNK), remaining)
        except asyncio.TimeoutError:
            break
        except ConnectionResetError:
            return "reset"
        except OSError as exc:
            return "%s: %s" % (type(exc).__name__, exc)
        if not data:
            return "eof"
        if not drop:
            return "data: %r" % data[:40]
    return "still open"


# -- blocking clients -------------------------------------------------------

def exchange(port, payload, host=LOCALHOST, prefix=b"", first=b"", then=None, timeout=30):
    """Connect; send `prefix` (for the target, not echoed) and `first`, and wait for the
    echo of `first` (the stream is surely open); call then(); send `payload` while
    reading; half-close.  Returns all that came back, the echo of `first` included."""
    with socket.create_connection((host, port), timeout=timeout) as conn:
        head = b""
        if prefix or first:
            conn.sendall(prefix + first)
        if first:
            head = recv_exactly(conn, len(first), timeout)
            if head != first:
                raise AssertionError("%r came back as %r" % (first[:40], head[:40]))
        if then is not None:
            then()
        errors = []

        def send():
            try:
                conn.sendall(payload)
                conn.shutdown(socket.SHUT_WR)
            except OSError as exc:
                errors.append(exc)
        sender = threading.Thread(target=send)
        sender.daemon = True
        sender.start()
        try:
            rest = recv_to_end(conn, len(payload) + MB, timeout, keep=True).data
        finally:
            sender.join(timeout)
        if errors:
            raise errors[0]
        return head + rest


# -- the command line -------------------------------------------------------

PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY",
                   "http_proxy", "NO_PROXY", "no_proxy")


def cli_env(**extra):
    """The environment for a command-line subprocess: none of the machine's own mindmeld,
    PORT or proxy settings, so that only what a test sets applies."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MINDMELD_") and k != "PORT" and k not in PROXY_VARIABLES}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.update(extra)
    return env


def cli_argv(args, script=MODULE):
    """script: MODULE (python -m mindmeld), SCRIPT (python mindmeld.py) or None (piped in)."""
    return [sys.executable, "-u"] + (script if script is MODULE else [script or "-"]) + list(args)


Ran = collections.namedtuple("Ran", "code out err")    # exit code, stdout bytes, stderr text


def run_cli(*args, env=None, timeout=30, input=None):
    """One command to completion: Ran(exit code, stdout bytes, stderr text).  A command
    still running after `timeout` s is killed; its code then says so (a failure, not an
    error)."""
    p = subprocess.Popen(cli_argv(args), cwd=HERE, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env or cli_env())
    try:
        out, err = p.communicate(input if input is not None else b"", timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        return Ran("still running after %s s" % timeout, out, err.decode("utf-8", "replace"))
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
        for stream in (p.stdin, p.stdout, p.stderr):
            stream.close()
    return Ran(p.returncode, out, err.decode("utf-8", "replace"))


def list_rows(out):
    """The table `mindmeld list` printed (bytes or text), as rows of words."""
    text = out.decode() if isinstance(out, bytes) else out
    return [l.split() for l in text.splitlines() if l.strip()]


# ---------------------------------------------------------------------------
# 2. Codec: frames and preambles, no sockets
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
# 3. Core: stream states, windows, addresses, names
# ---------------------------------------------------------------------------

STREAM_FRAMES = (OPEN_OK, OPEN_REFUSED, CHALLENGE, PROOF, DATA, WINDOW, EOF, RESET)
SEND, RECV = mindmeld.SEND, mindmeld.RECV


def fire(end, direction, ftype):
    """Make `end` send or receive one frame of `ftype`, with a payload that is valid."""
    if direction == RECV:
        if ftype == DATA:
            return end.recv_data(1)
        if ftype == WINDOW:
            return end.recv_window(struct.pack("!I", 1))
        if ftype == RESET:
            return end.recv_reset(b"")
        return end.receive(ftype)
    if ftype == DATA:
        return end.send_data(1)
    return end.send(ftype, struct.pack("!I", 1) if ftype == WINDOW else b"")


class EndPair:
    """Two stream ends wired back to back, as h11's ConnectionPair: what one sends,
    the other receives, through the real frame codec."""

    def __init__(self):
        self.opener = StreamEnd(1, OPEN_SENT, ReceiveWindow(WindowBudget()))
        self.acceptor = StreamEnd(1, OPEN_RECEIVED, ReceiveWindow(WindowBudget()))

    def deliver(self, frame, to):
        (ftype, _flags, stream_id, payload), = FrameDecoder().feed(frame)
        if stream_id != to.id:
            raise AssertionError("frame for stream %d sent to stream %d" % (stream_id, to.id))
        if ftype == WINDOW:
            return to.recv_window(payload)
        if ftype == RESET:
            return to.recv_reset(payload)
        return to.receive(ftype)

    def data(self, sender, receiver, n):
        sender.send_data(n)
        receiver.recv_data(n)


class TestEndToEndExchange(unittest.TestCase):
    """The pairing (SPAKE2) and the stream proofs without sockets: the exchange as the
    README writes it, against a fixed transcript."""

    P, Q = mindmeld.SPAKE2_P, mindmeld.SPAKE2_Q

    @staticmethod
    def lp(*parts):
        return b"".join(len(p).to_bytes(8, "little") + p for p in parts)

    def test_the_group_and_its_two_points(self):
        P, Q = self.P, self.Q
        self.assertEqual(P.bit_length(), 2048)
        self.assertEqual(pow(2, Q, P), 1)                    # g generates the order-q subgroup
        for point in (mindmeld.SPAKE2_M, mindmeld.SPAKE2_N):
            self.assertEqual(pow(point, Q, P), 1)
            self.assertNotIn(point, (1, P - 1))
        self.assertNotEqual(mindmeld.SPAKE2_M, mindmeld.SPAKE2_N)
        # M and N as the README defines them: SHA-512 of the label and a counter byte 0..4
        for label, point in ((b"mindmeld SPAKE2 M", mindmeld.SPAKE2_M), (b"mindmeld SPAKE2 N", mindmeld.SPAKE2_N)):
            stream = b"".join(hashlib.sha512(label + bytes([i])).digest() for i in range(5))
            self.assertEqual(pow(int.from_bytes(stream, "big") % P, 2, P), point)

    def test_a_fixed_transcript(self):
        P, Q = self.P, self.Q
        pw = mindmeld.SecretPassword("sunshine", "web")
        forwarder = mindmeld.Spake2(pw, mindmeld.FORWARDER, "00" * 16, exponent=0x1234567)
        sharer = mindmeld.Spake2(pw, mindmeld.SHARER, "00" * 16, exponent=0x7654321)
        # w, X, Y and the keys, computed here from the README's formulas
        w = int.from_bytes(hashlib.sha512(self.lp(b"mindmeld SPAKE2 w v1", b"web", b"sunshine")).digest(), "big") % Q
        X = pow(2, 0x1234567, P) * pow(mindmeld.SPAKE2_M, w, P) % P
        Y = pow(2, 0x7654321, P) * pow(mindmeld.SPAKE2_N, w, P) % P
        self.assertEqual((forwarder.message, sharer.message), (X, Y))
        Z = pow(2, 2 * 0x1234567 * 0x7654321, P)
        e = lambda n: n.to_bytes(256, "big")
        secret = hashlib.sha256(self.lp(b"mindmeld SPAKE2 v1", b"web", b"00" * 16, e(X), e(Y), e(Z), e(w))).digest()
        key = hmac_sha256(secret, b"mindmeld e2e v1 sharer key")
        expected_proof = hmac_sha256(key, b"mindmeld e2e v1 sharer proof:" + b"binding")
        for keys in (forwarder.finish(Y), sharer.finish(X)):
            self.assertEqual(keys.proof(mindmeld.SHARER, b"binding"), expected_proof)
        self.assertEqual(hashlib.sha256(e(X)).hexdigest()[:32], "1db3b56b760fc55d5112e30d431db68a")
        self.assertEqual(expected_proof.hex()[:32], "5777415bf7e2307da4ecf08e97976f18")

    def test_a_wrong_secret_or_name_gives_other_keys_and_each_proof_is_bound(self):
        def pair(forwarder_secret, sharer_secret, sharer_name="web"):
            f = mindmeld.Spake2(mindmeld.SecretPassword(forwarder_secret, "web"), mindmeld.FORWARDER, "11" * 16)
            s = mindmeld.Spake2(mindmeld.SecretPassword(sharer_secret, sharer_name), mindmeld.SHARER, "11" * 16)
            return f.finish(s.message), s.finish(f.message)
        right = pair("a", "a")
        self.assertEqual(right[0].keys, right[1].keys)
        for wrong in (pair("a", "b"), pair("a", "a", "other")):
            self.assertNotEqual(wrong[0].keys, wrong[1].keys)
        keys = right[0]
        self.assertNotEqual(keys.proof(mindmeld.SHARER, b"one"), keys.proof(mindmeld.SHARER, b"two"))
        self.assertNotEqual(keys.proof(mindmeld.SHARER, b"one"), keys.proof(mindmeld.FORWARDER, b"one"))

    def test_messages_that_give_no_key_are_refused(self):
        pw = mindmeld.SecretPassword("a", "web")
        side = mindmeld.Spake2(pw, mindmeld.FORWARDER, "22" * 16)
        unmasked_one = mindmeld.SecretPassword("a", "web").masks[mindmeld.SHARER]
        for message in (0, 1, self.P - 1, self.P, unmasked_one, self.P - unmasked_one):
            with self.assertRaises(mindmeld.StreamError):
                side.finish(message)

    def test_pairings_offer_accept_and_refuse(self):
        opener = mindmeld.OpenerPairings("s", "web")
        acceptor = mindmeld.AcceptorPairings("s", "web")
        offer, spake = opener.offer()
        self.assertEqual(sorted(offer), ["pair", "pake"])
        keys, answer = acceptor.open(mindmeld.checked_e2e(OPEN, {"e2e": offer}), 0.0)
        mine = opener.accepted(spake, mindmeld.checked_e2e(OPEN_OK, {"e2e": answer}))
        self.assertEqual(mine.keys, keys.keys)
        opener.confirmed(mine)
        acceptor.confirmed(keys)
        offer, spake = opener.offer()               # the next stream reuses the pairing
        self.assertEqual((offer, spake), ({"pairs": [mine.pair]}, None))
        self.assertEqual(acceptor.open(offer, 1.0)[1], {"pair": mine.pair})
        with self.assertRaises(mindmeld.E2ERefused) as refused:   # a sharer that restarted
            mindmeld.AcceptorPairings("s", "web").open(offer, 1.0)
        self.assertEqual(refused.exception.code, "e2e-rekey")
        known = acceptor.pairs[mine.pair]
        for _ in range(mindmeld.E2E_FAILURES_PER_MINUTE):          # guessing: new pairings wait
            acceptor.failed(known, 2.0)
        fresh, spake = opener.offer(fresh=True)
        self.assertEqual(opener.offer(fresh=True), (None, None))   # one new pairing at a time
        called = []
        opener.wait(lambda: called.append(True))
        opener.ended(spake)
        self.assertEqual(called, [True])
        with self.assertRaises(mindmeld.E2ERefused) as refused:
            acceptor.open(fresh, 3.0)
        self.assertEqual(refused.exception.code, "busy")
        self.assertEqual(acceptor.open(offer, 3.0)[1], {"pair": mine.pair})   # known pairs go on
        self.assertEqual(acceptor.open(fresh, 62.5)[1]["pair"], fresh["pair"])  # a minute later
        # Pairings under way count from their start, so made all at once they are limited too;
        # one that is confirmed is forgiven.
        sharer = mindmeld.AcceptorPairings("s", "web")
        password = mindmeld.SecretPassword("s", "web")

        def new_offer(i):
            spake = mindmeld.Spake2(password, mindmeld.FORWARDER, "%032x" % i)
            return {"pair": spake.pair, "pake": "%0512x" % spake.message}
        started = [sharer.open(new_offer(i), 100.0) for i in range(mindmeld.E2E_FAILURES_PER_MINUTE)]
        with self.assertRaises(mindmeld.E2ERefused) as refused:
            sharer.open(new_offer(99), 100.0)
        self.assertEqual(refused.exception.code, "busy")
        sharer.confirmed(started[0][0])
        self.assertIsNotNone(sharer.open(new_offer(100), 100.0))
        # and a forwarder stops pairing after as many failures (a router posing as the sharer)
        opener = mindmeld.OpenerPairings("s", "web", clock=lambda: 0.0)
        for _ in range(mindmeld.E2E_FAILURES_PER_MINUTE):
            opener.ended(opener.offer(fresh=True)[1])
        with self.assertRaises(mindmeld.E2ERefused) as refused:
            opener.offer(fresh=True)
        self.assertIn("failed in the last minute", refused.exception.reason)

    def test_malformed_e2e_fields(self):
        for e2e in ("x", {"pairs": "ab"}, {"pairs": ["AB" * 16]}, {"pairs": ["ab"] * 5}, {},
                    {"pair": "ab" * 16, "pake": "zz" * 256}, {"pake": "00" * 256},
                    {"pair": "ab" * 16, "pake": "00" * 255}):
            with self.subTest(e2e=e2e), self.assertRaises(mindmeld.StreamError):
                mindmeld.checked_e2e(OPEN, {"e2e": e2e})
        self.assertIsNone(mindmeld.checked_e2e(OPEN, {}))


def hmac_sha256(key, message):
    return hmac.new(key, message, hashlib.sha256).digest()


class TestStreamEnd(unittest.TestCase):
    """The sans-IO stream end: every row of the state table, and credit at its edges."""

    def test_every_transition_in_the_table_and_every_other_refused(self):
        checked = 0
        for state, row in STREAM_TRANSITIONS.items():
            for direction in (SEND, RECV):
                for ftype in STREAM_FRAMES:
                    end = StreamEnd(1, state)
                    with self.subTest(state=state, direction=direction, frame=FRAME_NAMES[ftype]):
                        if (direction, ftype) in row:
                            fire(end, direction, ftype)
                            self.assertEqual(end.state, row[(direction, ftype)])
                        else:
                            error = ProtocolError if direction == RECV else LocalProtocolError
                            with self.assertRaises(error):
                                fire(end, direction, ftype)
                            self.assertEqual(end.state, state)     # a refusal changes nothing
                        checked += 1
        self.assertEqual(checked, len(STREAM_TRANSITIONS) * 2 * len(STREAM_FRAMES))

    def test_every_state_is_reachable_and_every_live_state_can_reset(self):
        for state in STREAM_TRANSITIONS:
            if state == CLOSED:
                continue
            for direction in (SEND, RECV):
                end = StreamEnd(1, state)
                fire(end, direction, RESET)
                self.assertEqual(end.state, CLOSED)
        targets = {new for row in STREAM_TRANSITIONS.values() for new in row.values()}
        self.assertEqual(targets | {OPEN_SENT, OPEN_RECEIVED}, set(STREAM_TRANSITIONS))

    def test_a_pair_opens_half_closes_both_ways_and_closes(self):
        for first in ("opener", "acceptor"):
            with self.subTest(first_eof=first):
                pair = EndPair()
                opener, acceptor = pair.opener, pair.acceptor
                pair.deliver(acceptor.send(OPEN_OK, b"{}"), opener)
                self.assertEqual((opener.state, acceptor.state), (OPEN_STATE, OPEN_STATE))
                pair.data(opener, acceptor, 1000)
                pair.data(acceptor, opener, 2000)
                a, b = (opener, acceptor) if first == "opener" else (acceptor, opener)
                pair.deliver(a.send(EOF), b)
                self.assertEqual((a.state, b.state), (LOCAL_EOF, REMOTE_EOF))
                pair.data(b, a, 10)                     # the other way still flows
                with self.assertRaises(LocalProtocolError):
                    a.send_data(1)
                pair.deliver(b.send(EOF), a)
                self.assertEqual((a.state, b.state), (CLOSED, CLOSED))

    def test_refusal_on_the_way_to_open(self):
        pair = EndPair()
        for ftype in (CHALLENGE, PROOF):             # retired frames: an error in any state
            with self.assertRaises(ProtocolError):
                pair.opener.receive(ftype)
        pair.deliver(pair.acceptor.send_json(OPEN_REFUSED, {"reason": "no"}), pair.opener)
        self.assertEqual((pair.opener.state, pair.acceptor.state), (CLOSED, CLOSED))
        pair = EndPair()
        with self.assertRaises(ProtocolError):        # data before the stream is accepted
            pair.acceptor.recv_data(1)
        with self.assertRaises(LocalProtocolError):
            pair.opener.send_data(1)

    def test_reset_carries_its_reason_and_a_closed_end_sends_no_second_reset(self):
        pair = EndPair()
        frame = pair.opener.send_reset("local connection closed\nnow")
        self.assertEqual(pair.deliver(frame, pair.acceptor), "local connection closed now")
        self.assertEqual(pair.opener.send_reset("again"), b"")
        self.assertEqual(pair.acceptor.state, CLOSED)

    # -- credit arithmetic ----------------------------------------------------------
    def test_exactly_the_window_then_not_one_byte_more(self):
        pair = EndPair()
        pair.deliver(pair.acceptor.send(OPEN_OK), pair.opener)
        pair.data(pair.opener, pair.acceptor, INITIAL_WINDOW)
        self.assertEqual((pair.opener.credit, pair.acceptor.window.available), (0, 0))
        with self.assertRaises(LocalProtocolError):
            pair.opener.send_data(1)
        with self.assertRaises(ProtocolError) as cm:
            pair.acceptor.recv_data(1)
        self.assertEqual(cm.exception.code, "flow-control")

    def test_credit_comes_back_through_delivered_and_window_frames(self):
        pair = EndPair()
        opener, acceptor = pair.opener, pair.acceptor
        pair.deliver(acceptor.send(OPEN_OK), opener)
        pair.data(opener, acceptor, INITIAL_WINDOW)
        half = INITIAL_WINDOW // 2
        self.assertEqual(acceptor.delivered(half - 1, 100.0, 0.01), b"")   # not yet worth it
        frame = acceptor.delivered(1, 100.0, 0.01)
        self.assertEqual(pair.deliver(frame, opener), half)
        self.assertEqual(opener.credit, half)
        pair.data(opener, acceptor, half)                  # the credit really is usable
        with self.assertRaises(LocalProtocolError):
            opener.send_data(1)

    def test_window_frames_that_are_wrong(self):
        for payload, why in ((struct.pack("!I", 0), "zero"), (b"\x00\x01", "short"),
                             (struct.pack("!I", mindmeld.MAX_CREDIT), "overflow"),
                             (struct.pack("!I", 2 ** 32 - 1), "huge")):
            with self.subTest(why=why):
                end = StreamEnd(1, OPEN_STATE)
                with self.assertRaises(ProtocolError):
                    end.recv_window(payload)
                self.assertEqual(end.credit, INITIAL_WINDOW)
        end = StreamEnd(1, OPEN_STATE)          # exactly up to the limit is fine
        end.recv_window(struct.pack("!I", mindmeld.MAX_CREDIT - INITIAL_WINDOW))
        self.assertEqual(end.credit, mindmeld.MAX_CREDIT)

    def test_a_relay_passes_credit_on_and_a_closed_end_passes_none(self):
        end = StreamEnd(2, OPEN_STATE)
        end.recv_data(INITIAL_WINDOW)
        frame = end.grant(1000)
        self.assertEqual(FrameDecoder().feed(frame), [(WINDOW, 0, 2, struct.pack("!I", 1000))])
        end.recv_data(1000)
        with self.assertRaises(ProtocolError):
            end.recv_data(1)
        end.recv_reset(b"")
        self.assertEqual(end.grant(5), b"")

    # -- stream ids -------------------------------------------------------------------
    def test_stream_ids_parity_order_and_never_opened(self):
        client, router = StreamIds(odd=True), StreamIds(odd=False)
        self.assertEqual([client.allocate() for _ in range(3)], [1, 3, 5])
        self.assertEqual(router.allocate(), 2)
        router.opened_by_peer(1)
        router.opened_by_peer(5)
        for bad in (3, 5, 4):                   # not increasing; the router's own parity
            with self.assertRaises(ProtocolError):
                router.opened_by_peer(bad)
        router.check_unknown(3, DATA)           # skipped, but ordered before 5: a late frame
        router.check_unknown(2, DATA)           # the router's own, already allocated
        for never in (7, 4, 0):
            with self.assertRaises(ProtocolError) as cm:
                router.check_unknown(never, EOF)
            self.assertIn("never opened", str(cm.exception))
        client.next_local = mindmeld.MAX_STREAM_ID + 2
        self.assertTrue(client.exhausted)


class TestCore(unittest.TestCase):

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
        self.assertEqual(sizes[1], 8 * INITIAL_WINDOW)   # up to three doublings at once
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

    def credit_loop(self, window, seconds, spread, credit_delay, reader_rate=None,
                    link_rtt=0.05, frame=16384):
        """A sender that sends all the credit it has, the frames arriving over `spread` s
        (the path, retransmissions included), and then waits for more; credit comes back
        `credit_delay` s after it was granted.  The receiver hands frames on at once, or
        at `reader_rate` bytes/s.  Events in time order; returns the window's sizes."""
        events, seq, sizes = [], itertools.count(), []
        heapq.heappush(events, (100.0, next(seq), "credit", window.available))
        reader_free = 0.0
        for _ in range(200000):
            if not events or events[0][0] > 100.0 + seconds:
                break
            now, _, kind, n = heapq.heappop(events)
            if kind == "credit":
                frames = -(-n // frame)
                for i in range(frames):
                    size = min(frame, n - i * frame)
                    heapq.heappush(events, (now + link_rtt + spread * i / frames, next(seq), "data", size))
            elif kind == "data":
                window.received(n, now, link_rtt)
                if reader_rate is None:
                    heapq.heappush(events, (now, next(seq), "taken", n))
                else:
                    reader_free = max(now, reader_free) + n / reader_rate
                    heapq.heappush(events, (reader_free, next(seq), "taken", n))
            else:
                credit = window.delivered(n, now, link_rtt)
                if credit:
                    sizes.append(window.size)
                    heapq.heappush(events, (now + credit_delay, next(seq), "credit", credit))
        return sizes

    def test_window_grows_under_loss_when_the_sender_waits_on_credit(self):
        """1 % loss on a 100 ms path: retransmissions spread each window's frames over
        450 ms and hold credit back 500 ms, so no batch of credit looks fast next to 4 link
        round trips (200 ms).  The sender stopping exactly at the limit it was given, with
        nothing held back here, shows the window is what holds it: it grows to MAX_WINDOW."""
        budget = WindowBudget()
        window = ReceiveWindow(budget)
        sizes = self.credit_loop(window, 20.0, spread=0.45, credit_delay=0.5)
        self.assertEqual(sizes[0], INITIAL_WINDOW)
        self.assertEqual(sizes[-1], MAX_WINDOW)
        self.assertEqual(budget.available, mindmeld.PEER_WINDOW_BUDGET - (MAX_WINDOW - INITIAL_WINDOW))

    def test_a_reader_that_does_not_keep_up_never_grows_the_window(self):
        """The same sender and path, and a reader that takes 200 KB/s: it always holds
        data when more comes, so the window is not what holds the sender back."""
        window = ReceiveWindow(WindowBudget())
        sizes = self.credit_loop(window, 20.0, spread=0.45, credit_delay=0.5, reader_rate=200000)
        self.assertGreater(len(sizes), 10)
        self.assertEqual(set(sizes), {INITIAL_WINDOW})

    def test_window_grows_toward_the_rate_it_measures_and_no_further(self):
        """A sender that the network holds to 1 MB/s on a 100 ms path (two 50 ms links),
        never waiting on credit: the window settles at a few times the 100 KB the path
        holds, and stays there."""
        window = ReceiveWindow(WindowBudget())
        now, link_rtt = 100.0, 0.05
        for _ in range(4000):                       # 4 s at 1 MB/s, in 1000-byte frames
            now += 0.001
            window.received(1000, now, link_rtt)
            window.delivered(1000, now, link_rtt)
        self.assertEqual(window.size, 2 * INITIAL_WINDOW)   # 1 MB/s x 4 round trips > 256 KiB
        self.assertFalse(window.starved)

    def grown(self, budget, size, now):
        """A window on `budget` that has grown to `size`, in use at `now`."""
        window = ReceiveWindow(budget)
        for _ in range(40):
            if window.size >= size:
                break
            half = window.size // 2
            window.received(half)
            window.delivered(half, now, 0.01)
            now += 0.001
        self.assertEqual(window.size, size)
        return window

    def test_a_new_stream_starts_where_its_links_windows_grew_lately(self):
        budget = WindowBudget(10 * MAX_WINDOW)
        self.assertEqual(ReceiveWindow(budget).warm_start(100.0), 0)    # nothing grew yet
        first = self.grown(budget, MAX_WINDOW, 100.0)
        left = budget.available
        second = ReceiveWindow(budget)
        growth = second.warm_start(101.0)
        self.assertEqual(growth, MAX_WINDOW - INITIAL_WINDOW)
        self.assertEqual((second.size, second.available), (MAX_WINDOW, MAX_WINDOW))
        self.assertEqual(budget.available, left - growth)
        second.release()                                 # its growth goes back
        self.assertEqual(budget.available, left)
        first.release()
        later = ReceiveWindow(budget)                    # a minute on, it is forgotten
        self.assertEqual(later.warm_start(100.0 + mindmeld.WARM_START_MEMORY + 1), 0)
        self.assertEqual(later.size, INITIAL_WINDOW)

    def test_a_warm_start_takes_at_most_a_quarter_of_the_budget_left(self):
        budget = WindowBudget(2 * MAX_WINDOW)
        self.grown(budget, MAX_WINDOW, 100.0)
        left = budget.available                          # 2 x 16 MiB - (16 MiB - 256 KiB)
        sizes = []
        for _ in range(3):
            window = ReceiveWindow(budget)
            window.warm_start(100.5)
            sizes.append(window.size)
        self.assertEqual(sizes[0], INITIAL_WINDOW + left // 4)
        self.assertEqual(sizes[1], INITIAL_WINDOW + (left - left // 4) // 4)
        self.assertLess(sizes[2], sizes[1])
        self.assertGreater(budget.available, 0)

    def test_warm_starts_not_yet_used_hold_at_most_a_quarter_of_the_budget(self):
        """Streams opened and left idle (a stranger's, say) cannot take the whole budget:
        a warm start counts as idle until its stream moved half a window, or ended."""
        budget = WindowBudget(2 * MAX_WINDOW)
        self.grown(budget, MAX_WINDOW, 100.0).release()
        first, second = ReceiveWindow(budget), ReceiveWindow(budget)
        self.assertEqual(first.warm_start(100.5), 2 * MAX_WINDOW // 4)
        self.assertEqual(second.warm_start(100.5), 0)               # the idle quarter is used
        half = first.size // 2
        first.received(half)
        first.delivered(half, 100.6, 0.01)                          # it moved half a window
        third = ReceiveWindow(budget)
        self.assertGreater(third.warm_start(100.7), 0)
        third.release()                                             # ended idle: frees it too
        self.assertGreater(ReceiveWindow(budget).warm_start(100.8), 0)

    def test_a_window_that_took_data_or_has_no_budget_gets_no_warm_start(self):
        budget = WindowBudget(10 * MAX_WINDOW)
        self.grown(budget, MAX_WINDOW, 100.0)
        used = ReceiveWindow(budget)
        used.received(10)
        self.assertEqual(used.warm_start(100.5), 0)
        self.assertEqual(ReceiveWindow(None).warm_start(100.5), 0)

    def test_the_router_answers_a_warm_start_in_open_ok_and_the_rest_goes_back(self):
        """The opener grows its window in OPEN ("grow"); OPEN_OK says how much of it the
        router took (a router from before warm starts says nothing: all goes back)."""
        for told, kept in ((None, 0), (MAX_WINDOW - INITIAL_WINDOW, MAX_WINDOW - INITIAL_WINDOW)):
            budget = WindowBudget(10 * MAX_WINDOW)
            self.grown(budget, MAX_WINDOW, 100.0)
            left = budget.available
            end = StreamEnd(1, OPEN_SENT, ReceiveWindow(budget))
            asked = end.window.warm_start(100.5)
            self.assertEqual(asked, MAX_WINDOW - INITIAL_WINDOW)
            end.receive(OPEN_OK)
            info = {"credit": INITIAL_WINDOW, "window": INITIAL_WINDOW + kept}
            if told is not None:
                info["grow"] = told
            end.start_with(*mindmeld.initial_windows(info))
            self.assertEqual(end.window.size, INITIAL_WINDOW + kept)
            self.assertEqual(budget.available, left - kept)
            end.release()
            self.assertEqual(budget.available, left)
        end = StreamEnd(1, OPEN_SENT, ReceiveWindow(WindowBudget()))
        end.receive(OPEN_OK)
        with self.assertRaises(ProtocolError) as caught:    # more than was asked
            end.start_with(INITIAL_WINDOW, 2 * INITIAL_WINDOW, INITIAL_WINDOW)
        self.assertEqual(caught.exception.code, "flow-control")
        for bad in ("1", -1, True, 2 * INITIAL_WINDOW):      # "grow" is part of "window"
            with self.assertRaises(ProtocolError):
                mindmeld.initial_windows({"window": 2 * INITIAL_WINDOW, "grow": bad})

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
# 4. WebSocket framing, reconnect backoff, proxy choice: no sockets
# ---------------------------------------------------------------------------

def ws_sample_frames():
    """(opcode, payload) pairs covering each length form below 64 KB and the control frames."""
    return [
        (mindmeld.WS_BINARY, b""),
        (mindmeld.WS_BINARY, b"abc"),
        (mindmeld.WS_PING, b"p" * 125),                 # the largest control payload
        (mindmeld.WS_BINARY, bytes(range(256)) * 3),    # 16-bit length
        (mindmeld.WS_PONG, b""),
        (mindmeld.WS_CLOSE, struct.pack("!H", 1000)),
    ]


def ws_wire(frames, masked):
    return b"".join(ws_frame(opcode, payload, masked=masked) for opcode, payload in frames)


class TestWsCodec(unittest.TestCase):

    def test_accept_key_is_the_one_in_rfc6455(self):
        self.assertEqual(mindmeld.ws_accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
                         "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")

    def test_mask_is_a_repeating_xor(self):
        mask = b"\x01\x80\xfe\x37"
        for n in (0, 1, 3, 4, 5, 9, 1000):
            with self.subTest(length=n):
                data = os.urandom(n)
                masked = mindmeld.ws_mask(data, mask)
                self.assertEqual(masked, bytes(b ^ mask[i % 4] for i, b in enumerate(data)))
                self.assertEqual(mindmeld.ws_mask(masked, mask), data)

    def test_encoder_length_forms(self):
        for n in (0, 1, 125, 126, 65535, 65536):
            with self.subTest(length=n):
                payload = os.urandom(n)
                frame = mindmeld.ws_encode(mindmeld.WS_BINARY, payload)   # server: unmasked
                self.assertEqual(frame, ws_frame(mindmeld.WS_BINARY, payload, masked=False))
                masked = mindmeld.ws_encode(mindmeld.WS_BINARY, payload, masked=True)
                self.assertEqual(len(masked), len(frame) + 4)              # + the mask key
                self.assertEqual((masked[0], masked[1] & 0x80), (0x80 | mindmeld.WS_BINARY, 0x80))
                self.assertEqual(masked[1] & 0x7F, frame[1] & 0x7F)
                self.assertEqual(mindmeld.WsDecoder(True).feed(masked),
                                 [(mindmeld.WS_BINARY, payload)])

    def test_whole_and_one_byte_at_a_time(self):
        frames = ws_sample_frames()
        for masked in (False, True):
            with self.subTest(masked=masked):
                wire = ws_wire(frames, masked)
                self.assertEqual(mindmeld.WsDecoder(masked).feed(wire), frames)
                decoder, out = mindmeld.WsDecoder(masked), []
                for i in range(len(wire)):
                    out.extend(decoder.feed(wire[i:i + 1]))
                self.assertEqual(out, frames)
                self.assertEqual(len(decoder.buffer), 0)

    def test_split_at_every_offset(self):
        frames = ws_sample_frames()
        for masked in (False, True):
            wire = ws_wire(frames, masked)
            for cut in range(len(wire) + 1):
                decoder = mindmeld.WsDecoder(masked)
                out = decoder.feed(wire[:cut]) + decoder.feed(wire[cut:])
                self.assertEqual(out, frames, "masked=%s, split at offset %d" % (masked, cut))
                self.assertEqual(len(decoder.buffer), 0)

    def test_split_in_three_at_many_offsets(self):
        frames = ws_sample_frames()
        for masked in (False, True):
            wire = ws_wire(frames, masked)
            for a in range(0, len(wire) + 1, 7):
                for b in range(a, len(wire) + 1, 31):
                    decoder = mindmeld.WsDecoder(masked)
                    out = decoder.feed(wire[:a]) + decoder.feed(wire[a:b]) + decoder.feed(wire[b:])
                    self.assertEqual(out, frames, "masked=%s, split at %d and %d" % (masked, a, b))

    def test_64_bit_length_split_around_its_header(self):
        payload = os.urandom(70000)
        for masked in (False, True):
            wire = ws_frame(mindmeld.WS_BINARY, payload, masked=masked) + ws_frame(
                mindmeld.WS_BINARY, b"next", masked=masked)
            for cut in list(range(16)) + [len(wire) - 11, len(wire) - 10, len(wire) - 1]:
                with self.subTest(masked=masked, cut=cut):
                    decoder = mindmeld.WsDecoder(masked)
                    out = decoder.feed(wire[:cut]) + decoder.feed(wire[cut:])
                    self.assertEqual(out, [(mindmeld.WS_BINARY, payload),
                                           (mindmeld.WS_BINARY, b"next")])

    def test_a_partial_frame_stays_buffered(self):
        wire = ws_frame(mindmeld.WS_BINARY, b"hello", masked=True)
        decoder = mindmeld.WsDecoder(True)
        self.assertEqual(decoder.feed(wire[:-1]), [])
        self.assertEqual(len(decoder.buffer), len(wire) - 1)
        self.assertEqual(decoder.feed(wire[-1:]), [(mindmeld.WS_BINARY, b"hello")])

    def test_masking_must_match_the_direction(self):
        for masked in (False, True):
            with self.subTest(masked=masked):
                with self.assertRaises(ProtocolError):      # a server reads masked frames only
                    mindmeld.WsDecoder(not masked).feed(ws_frame(mindmeld.WS_BINARY, b"x",
                                                                 masked=masked))

    def test_reserved_bits_are_refused(self):
        for bit in (0x40, 0x20, 0x10):
            with self.subTest(bit=bit):
                frame = bytearray(ws_frame(mindmeld.WS_BINARY, b"x", masked=True))
                frame[0] |= bit
                with self.assertRaises(ProtocolError):
                    mindmeld.WsDecoder(True).feed(bytes(frame))

    def test_size_limit_is_checked_from_the_header_alone(self):
        for masked in (False, True):
            for length in (mindmeld.WS_MAX_FRAME + 1, 2 ** 63 - 1):
                with self.subTest(masked=masked, length=length):
                    header = struct.pack("!BBQ", 0x80 | mindmeld.WS_BINARY,
                                         (0x80 if masked else 0) | 127, length)
                    with self.assertRaises(ProtocolError) as cm:
                        mindmeld.WsDecoder(masked).feed(header)     # no payload byte yet
                    self.assertEqual(cm.exception.code, "frame-size")
            # the largest frame allowed waits for its payload
            decoder = mindmeld.WsDecoder(masked)
            header = struct.pack("!BBQ", 0x80 | mindmeld.WS_BINARY, (0x80 if masked else 0) | 127,
                                 mindmeld.WS_MAX_FRAME)
            self.assertEqual(decoder.feed(header + b"\x00" * 4 * masked), [])

    def test_control_frames(self):
        # between the fragments of a message, in order; the decoder does not join fragments
        wire = (ws_frame(mindmeld.WS_BINARY, b"ab", fin=False) + ws_frame(mindmeld.WS_PING, b"?")
                + ws_frame(mindmeld.WS_CONTINUATION, b"cd"))
        self.assertEqual(mindmeld.WsDecoder(True).feed(wire),
                         [(mindmeld.WS_BINARY, b"ab"), (mindmeld.WS_PING, b"?"),
                          (mindmeld.WS_CONTINUATION, b"cd")])
        for opcode in (mindmeld.WS_PING, mindmeld.WS_PONG, mindmeld.WS_CLOSE):
            for bad in (ws_frame(opcode, b"x" * 126), ws_frame(opcode, b"x", fin=False)):
                with self.subTest(opcode=opcode, frame=bad[:2]):     # too long, or fragmented
                    with self.assertRaises(ProtocolError):
                        mindmeld.WsDecoder(True).feed(bad)
        self.assertEqual(mindmeld.ws_encode(mindmeld.WS_PONG, b"are you there"),
                         b"\x8a\x0dare you there")


class TestBackoff(unittest.TestCase):

    def delays(self, count, *args, **kwargs):
        return list(itertools.islice(mindmeld.backoff_delays(*args, **kwargs), count))

    def test_doubles_from_the_first_delay_up_to_the_cap(self):
        self.assertEqual(self.delays(9, rng=lambda: 1.0),
                         [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0])
        self.assertEqual(self.delays(5, 0.05, 0.2, rng=lambda: 1.0), [0.05, 0.1, 0.2, 0.2, 0.2])
        self.assertEqual(mindmeld.BACKOFF_FIRST, 0.5)     # what the README promises
        self.assertEqual(mindmeld.BACKOFF_MAX, 30.0)

    def test_jitter_is_between_half_and_all_of_the_delay(self):
        self.assertEqual(self.delays(4, rng=lambda: 0.0), [0.25, 0.5, 1.0, 2.0])
        rng = random.Random(7)
        full = self.delays(40, rng=lambda: 1.0)
        jittered = self.delays(40, rng=rng.random)
        for step, (delay, top) in enumerate(zip(jittered, full)):
            self.assertGreaterEqual(delay, top / 2, step)
            self.assertLessEqual(delay, top, step)
        self.assertGreater(len(set(jittered[10:])), 1, "no jitter at the cap")

    def test_each_generator_starts_over(self):
        # a client starts a fresh generator to reset its backoff
        first = mindmeld.backoff_delays(1, 8, rng=lambda: 1.0)
        self.assertEqual([next(first) for _ in range(3)], [1, 2, 4])
        self.assertEqual(next(mindmeld.backoff_delays(1, 8, rng=lambda: 1.0)), 1)


class TestProxyChoice(unittest.TestCase):
    """proxy_for(router host, --proxy, environment): None, or
    (host, port, Proxy-Authorization, url without the password)."""

    def choose(self, router_host="relay.example.org", explicit=None, **environ):
        return mindmeld.proxy_for(router_host, explicit, environ)

    def test_nothing_set_means_no_proxy(self):
        self.assertIsNone(self.choose())
        self.assertIsNone(self.choose(HTTPS_PROXY=""))

    def test_https_proxy_then_all_proxy_upper_case_first(self):
        a, b, c, d = ("http://p%d.example:31%02d" % (i, i) for i in range(4))
        cases = [({"HTTPS_PROXY": a, "https_proxy": b, "ALL_PROXY": c, "all_proxy": d},
                  "p0.example"),
                 ({"https_proxy": b, "ALL_PROXY": c, "all_proxy": d}, "p1.example"),
                 ({"ALL_PROXY": c, "all_proxy": d}, "p2.example"),
                 ({"all_proxy": d}, "p3.example"),
                 ({"HTTPS_PROXY": "", "ALL_PROXY": c}, "p2.example")]
        for environ, host in cases:
            with self.subTest(environ=environ):
                self.assertEqual(self.choose(**environ)[0], host)

    def test_http_proxy_is_not_used(self):
        # the router link is not plain HTTP: only HTTPS_PROXY and ALL_PROXY apply
        self.assertIsNone(self.choose(HTTP_PROXY="http://p.example:3128",
                                      http_proxy="http://p.example:3128"))

    def test_the_parsed_proxy(self):
        self.assertEqual(self.choose(HTTPS_PROXY="http://proxy.example:3128"),
                         ("proxy.example", 3128, None, "http://proxy.example:3128"))
        self.assertEqual(self.choose(HTTPS_PROXY="127.0.0.1:3128")[:2], ("127.0.0.1", 3128))
        self.assertEqual(self.choose(HTTPS_PROXY="http://proxy.example")[:2],
                         ("proxy.example", 8080))
        host, port, authorization, url = self.choose(
            HTTPS_PROXY="http://alice:s3cr%40t@proxy.example:3128/")
        self.assertEqual(authorization, "Basic " + base64.b64encode(b"alice:s3cr@t").decode())
        self.assertEqual(url, "http://proxy.example:3128")            # no password in it
        with self.assertRaises(MindmeldError):
            self.choose(HTTPS_PROXY="socks5://proxy.example:1080")

    def test_explicit_proxy_wins_even_over_no_proxy(self):
        chosen = self.choose("relay.example.org", "http://mine.example:1",
                             HTTPS_PROXY="http://env.example:2", NO_PROXY="*")
        self.assertEqual(chosen[:2], ("mine.example", 1))

    def test_no_proxy_names_the_router_host(self):
        proxy = "http://proxy.example:3128"
        relay = "relay.example.org"
        bypassed = [(relay, "relay.example.org"), (relay, "example.org"), (relay, ".example.org"),
                    ("RELAY.example.org", "relay.EXAMPLE.org"), (relay, "other.net, example.org"),
                    (relay, " * "),
                    ("127.0.0.1", "localhost,127.0.0.1"), ("[::1]", "::1"), ("::1", "::1")]
        for host, no_proxy in bypassed:
            with self.subTest(host=host, NO_PROXY=no_proxy):
                self.assertIsNone(self.choose(host, HTTPS_PROXY=proxy, NO_PROXY=no_proxy))
                self.assertIsNone(self.choose(host, ALL_PROXY=proxy, no_proxy=no_proxy))
        used = [("relay.example.org", "badexample.org"), ("relay.example.org", "relay.example"),
                ("relay.example.org", ""), ("relay.example.org", ","),
                ("127.0.0.1", "localhost"), ("localhost", "127.0.0.1"), ("127.0.0.1", "")]
        for host, no_proxy in used:            # no implicit exceptions, loopback included
            with self.subTest(host=host, NO_PROXY=no_proxy):
                self.assertEqual(self.choose(host, HTTPS_PROXY=proxy, NO_PROXY=no_proxy)[0],
                                 "proxy.example")

    def test_upper_case_no_proxy_wins_over_lower_case(self):
        chosen = self.choose("relay.example.org", HTTPS_PROXY="http://proxy.example:3128",
                             NO_PROXY="other.net", no_proxy="relay.example.org")
        self.assertEqual(chosen[0], "proxy.example")


# ---------------------------------------------------------------------------
# 5. The tunnel in one event loop
# ---------------------------------------------------------------------------

class LoopTestCase(unittest.TestCase):
    """A fresh event loop per test; async cleanups run in it before it closes.

    (The helper is `run_async`, not `run`: unittest.TestCase.run runs the test.)"""

    def setUp(self):
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self._async_cleanups = []
        self.watch = capture_log(self, "mindmeld", logging.INFO)
        self.logs = self.watch.lines

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

    async def start_target(self, handler, sock=None, track=True):
        """An asyncio TCP server on 127.0.0.1 running handler(reader, writer).  track=False:
        connections are not remembered for clean-up (a leak test counts what stays)."""
        writers = []

        async def serve(reader, writer):
            if track:
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


async def send_pattern(writer, pattern, total):
    for chunk in pattern.chunks(total):
        writer.write(chunk)
        await writer.drain()


async def copy_to_eof(reader, writer):
    """Copy what arrives until EOF (bounded: a million reads)."""
    for _ in range(1000000):
        data = await reader.read(CHUNK)
        if not data:
            return
        writer.write(data)
        await writer.drain()


async def echo_handler(reader, writer):
    """Echo everything, then close (EOF after EOF)."""
    await copy_to_eof(reader, writer)


class RecordingLink:
    """What a LocalStream asks of its link, recording what the stream sends upstream."""

    def __init__(self, loop):
        self.loop = loop
        self.budget, self.streams, self.blocked = WindowBudget(), {}, []
        self.write_paused, self.closing, self.rtt = False, False, 0.001
        self.long_link = False
        self.frame_max = MAX_DATA
        self.upstream, self.arrived, self.frames = b"", asyncio.Event(), []

    def send_data(self, _stream_id, payload):
        self.upstream += bytes(payload)
        self.arrived.set()

    def send(self, frame):
        self.frames.append(frame)

    def send_json(self, ftype, stream_id, obj):
        self.frames.append(encode_json(ftype, stream_id, obj))

    def stream_closed(self, _stream):
        pass

    def sharing_changed(self):
        pass

    def warm_start(self, _end):
        return 0


class AcceptedAtOnce(mindmeld.LocalStream):
    """A stream whose OPEN_OK is handled in the same loop turn as its connection_made()."""

    def connection_made(self, transport):
        mindmeld.LocalStream.connection_made(self, transport)
        self.accept({})


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

    def test_stream_accepted_as_its_connection_arrives_still_reads(self):
        """A link read already queued in the loop turn that runs connection_made() can bring
        the stream's OPEN_OK: the bytes the client then sends must still go upstream (before
        3.11 they stayed unread for good, and the client hung)."""
        async def main():
            link = RecordingLink(self.loop)
            server = await self.loop.create_server(lambda: AcceptedAtOnce(link, 1), LOCALHOST, 0)

            async def close():
                server.close()
            self._async_cleanups.append(close)
            _, writer = await self.connect(server.sockets[0].getsockname()[1])
            writer.write(b"first bytes")
            deadline = self.loop.time() + 5
            for _ in range(100):
                if link.upstream == b"first bytes" or self.loop.time() >= deadline:
                    break
                link.arrived.clear()
                try:
                    await asyncio.wait_for(link.arrived.wait(), deadline - self.loop.time())
                except asyncio.TimeoutError:
                    break
            self.assertEqual(link.upstream, b"first bytes", "the client's bytes were never read")
        self.run_async(main(), 30)

    def test_eof_after_an_unread_local_reset_resets_that_stream_only(self):
        """The far side's EOF can arrive after the local peer reset but before that reset was
        read: shutting the socket's writing half then fails, and that must end this stream
        with a RESET (it used to drop the whole link, every stream on it)."""
        async def main():
            link, connected = RecordingLink(self.loop), self.loop.create_future()

            class Connected(AcceptedAtOnce):
                def connection_made(self, transport):
                    AcceptedAtOnce.connection_made(self, transport)
                    connected.set_result(self)
            server = await self.loop.create_server(lambda: Connected(link, 1), LOCALHOST, 0)

            async def close():
                server.close()
            self._async_cleanups.append(close)
            client = socket.create_connection((LOCALHOST, server.sockets[0].getsockname()[1]))
            stream = await asyncio.wait_for(connected, 5)
            stream.pause_reading()          # as when its credit ran out: the reset stays unread
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
            stream.on_eof(b"")              # the link hands over the far side's EOF
            self.assertTrue(stream.closed)
            sent = [FrameDecoder().feed(frame)[0] for frame in link.frames]
            self.assertEqual([(ftype, stream_id) for ftype, _, stream_id, _ in sent],
                             [(OPEN_OK, 1), (RESET, 1)])     # accepted, then reset
        self.run_async(main(), 30)

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
            pushed, sent, stalled = self.loop.create_future(), [0], [False]

            async def target(reader, writer):
                mode = await reader.readexactly(5)
                if mode == b"echo\n":
                    return await echo_handler(reader, writer)
                h = hashlib.sha256()
                for chunk in pattern.chunks(cap):
                    writer.write(chunk)
                    h.update(chunk)
                    sent[0] += len(chunk)
                    await writer.drain()
                    if stalled[0]:                   # it was held back long enough
                        break
                pushed.set_result((sent[0], h.hexdigest()))

            def held_back():
                # the forwarder cannot write to the client that does not read, and the
                # sharer, out of credit for that stream, has stopped reading the target
                return (any(s.write_paused for s in self.forwarder.link.streams.values())
                        and any(s.end.credit == 0 and not s.reading
                                for s in self.sharer.link.streams.values()))

            port = await self.tunnel(target)
            slow_reader, slow_writer = await self.connect(port)
            slow_writer.write(b"push\n")             # ... and never read, for now
            await wait_until(lambda: held_back() or pushed.done(), 60, "the stream held back")
            self.assertFalse(pushed.done(), "%d MB went in without back-pressure" % (cap // MB))
            self.assertLess(sent[0], cap)
            payload = os.urandom(5 * MB)            # a blocking client, so the loop runs on
            echoed = await self.loop.run_in_executor(
                None, lambda: exchange(port, payload, prefix=b"echo\n", first=b"!"))
            self.assertTrue(echoed == b"!" + payload, "the busy stream's echo differs")
            self.assertFalse(pushed.done())          # the stalled stream is still held back
            self.assertTrue(held_back())
            stalled[0] = True                        # the target may stop once it can write again
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
            self.assertIn(await read_until_closed(reader, 2.0, drop=False), ("eof", "reset"))
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
                self.assertIn(await read_until_closed(reader, 5, drop=False), ("eof", "reset"))
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
            block, sent = os.urandom(CHUNK), [0]

            async def send():
                for _ in range(cap // CHUNK):
                    writer.write(block)
                    sent[0] += CHUNK
                    await writer.drain()

            def pushed_back():
                # the kernel takes no more from the client (the rest waits in its
                # transport), and the forwarder has stopped reading that connection
                return (writer.transport.get_write_buffer_size() > 0 and forwarder.waiting
                        and not any(s.reading for s in forwarder.waiting))
            sending = asyncio.ensure_future(send())
            try:
                await wait_until(lambda: pushed_back() or sending.done(), 30,
                                 "the client pushed back")
            finally:
                sending.cancel()
            written = sent[0] - writer.transport.get_write_buffer_size()
            held = sum(len(s.pending) for s in forwarder.waiting if s.pending is not None)
            self.assertLess(written, limit, "the forwarder took %.1f MB from a client whose "
                            "stream could not open" % (written / MB))
            self.assertLess(held, limit)
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
# 6. Command-line processes and blocking servers, for the tests below
# ---------------------------------------------------------------------------

class Proc:
    """A long-running mindmeld process whose stderr lines are read by a thread."""

    def __init__(self, test, args, env=None, script=MODULE):
        """script: as for cli_argv()."""
        argv = self.argv = cli_argv(args, script)
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
        for remaining in countdown(timeout):
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


def blocking_echo(conn):
    for _ in range(1000000):
        data = conn.recv(CHUNK)
        if not data:
            break
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)


class CommandLineMixin:
    """Start the three roles as processes; wait for their log lines."""

    def start_router(self, *extra):
        router = Proc(self, ["router", "--listen", "127.0.0.1:0"] + list(extra))
        port = int(router.wait_line(r"router listening on 127\.0\.0\.1:(\d+)").group(1))
        return router, "127.0.0.1:%d" % port

    def start_share(self, name, target_port, router, script=MODULE, env=None, extra=()):
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

    def assert_one_error_line(self, ran, command, *needles):
        """Exit 1 and one line 'mindmeld COMMAND: error: ...' that names every needle (a
        forwarder's banner and the warning about --token/--secret in argv aside), no traceback:
        that line.  ran: (code, stdout, stderr text)."""
        code, err = ran[0], ran[2]
        lines = [l for l in err.splitlines() if not re.search(
            r"forwarding 127\.0\.0\.1:\d+ ->|warning: --(token|secret) .* the process list", l)]
        self.assertEqual(code, 1, err)
        self.assertEqual(len(lines), 1, err)
        self.assertTrue(lines[0].startswith("mindmeld %s: error: " % command), lines[0])
        for needle in needles:
            self.assertIn(needle, lines[0])
        assert_clean_output(err)
        return lines[0]


# ---------------------------------------------------------------------------
# 7. Memory bound: three processes, a client that does not read
# ---------------------------------------------------------------------------

@unittest.skipUnless(os.path.exists("/proc/self/status"), "needs /proc to read VmRSS")
class TestMemoryBound(CommandLineMixin, unittest.TestCase):

    def test_stalled_reader_keeps_memory_bounded(self):
        # What a process may hold for the stalled stream is its window, which auto-tuning may
        # have grown up to MAX_WINDOW before the reader stalled (more, the busier the machine),
        # plus the link's buffers: 8 MB for those and the allocator's slack.
        pattern, cap, growth_limit_kb = Pattern(), 200 * MB, (MAX_WINDOW + 8 * MB) // 1024
        stalled, pushed = threading.Event(), threading.Event()
        result = {}

        def push(conn):
            conn.setblocking(False)
            h, sent = hashlib.sha256(), 0
            for chunk in pattern.chunks(cap):
                view = memoryview(chunk)
                for _ in range(1000):                  # each wait at most 0.5 s
                    if not view:
                        break
                    _, writable, _ = select.select([], [conn], [], 0.5)
                    if not writable:
                        if not stalled.is_set():    # unwritable for 0.5 s: the pipeline is full
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
        self.assertEqual(exchange(port, warm, prefix=b"echo\n", first=b"!"), b"!" + warm)
        before = {name: proc.rss_kb() for name, proc in procs.items()}

        slow = socket.create_connection((LOCALHOST, port), timeout=60)
        self.addCleanup(slow.close)
        slow.sendall(b"push\n")                        # and now read nothing
        self.assertTrue(stalled.wait(120), "the target neither finished nor stalled")
        self.assertIn("stalled_at", result, "%d MB went in without back-pressure" % (cap // MB))
        self.assertFalse(pushed.is_set())

        busy = os.urandom(2 * MB)                      # another stream is not stalled
        self.assertEqual(exchange(port, busy, prefix=b"echo\n", first=b"!"), b"!" + busy)
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
# 8. The command line
# ---------------------------------------------------------------------------

class TestCommandLine(CommandLineMixin, unittest.TestCase):

    def test_router_share_forward_list_end_to_end(self):
        target = ThreadedServer(self, blocking_echo)
        router, address = self.start_router()
        share = self.start_share("web", target.port, address, script=SCRIPT)   # python3 mindmeld.py
        forward, port = self.start_forward("web", address, listen=["127.0.0.1:0"])

        listing = run_cli("list", "--router", address)
        self.assertEqual(listing.code, 0, listing.err)
        rows = list_rows(listing.out)
        self.assertEqual(rows[0], ["NAME", "REGISTERED", "STREAMS", "SHARER", "SECRET"])
        self.assertEqual(len(rows), 2, listing.out)
        self.assertEqual(rows[1][0], "web")
        self.assertEqual(rows[1][2], "0")
        self.assertTrue(rows[1][3].startswith("127.0.0.1:"), rows[1])
        self.assertEqual(rows[1][4], "no")

        with socket.create_connection((LOCALHOST, port), timeout=20) as conn:
            conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
            self.assertEqual(recv_exactly(conn, 18), b"GET / HTTP/1.0\r\n\r\n")
            listing = run_cli("list", "--router", address)         # one stream is open now
            rows = list_rows(listing.out)
            self.assertEqual([rows[1][0], rows[1][2]], ["web", "1"], listing.out)
            payload = os.urandom(MB)
            conn.sendall(payload)
            conn.shutdown(socket.SHUT_WR)
            self.assertEqual(recv_to_end(conn, 2 * MB, keep=True).data, payload)

        for name, proc in (("forward", forward), ("share", share), ("router", router)):
            with self.subTest(process=name):
                code, lines = proc.signal(signal.SIGINT)
                self.assertEqual(code, 0, lines)
                assert_clean_output(lines)

    def test_help_for_each_command_exits_0(self):
        for command in ("router", "share", "forward", "list"):
            with self.subTest(command=command):
                done = run_cli(command, "--help")
                self.assertEqual(done.code, 0, done.err)
                self.assertTrue(done.out.decode().startswith("usage: mindmeld %s" % command),
                                done.out)
        done = run_cli("--help")
        self.assertEqual(done.code, 0)
        for command in ("router", "share", "forward", "list"):
            self.assertIn(command, done.out.decode())

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
                done = run_cli(*args)
                self.assertEqual(done.code, 2, done.err)
                self.assertIn("usage: mindmeld", done.err)
                self.assertIn(message, done.err)
                assert_clean_output(done.err)

    def test_share_without_a_target_is_a_usage_error(self):
        # like every other malformed command line: usage, the problem, exit status 2
        done = run_cli("share", "web")
        self.assertEqual(done.code, 2, done.err)
        self.assertIn("usage: mindmeld share", done.err)
        self.assertIn("PORT", done.err.splitlines()[-1])

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
                said = self.assert_one_error_line(run_cli(*args), args[0])
                self.assertTrue(said.startswith(line), said)

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
                said = self.assert_one_error_line(run_cli(*args), args[0])
                self.assertTrue(said.startswith(start + address), said)

    def test_invalid_service_name_exits_1(self):
        for args in (("share", "bad name", "80"), ("forward", "a/b", "0"),
                     ("share", "x" * 65, "80"), ("forward", "caf\u00e9")):
            with self.subTest(args=args):
                self.assert_one_error_line(run_cli(*args), args[0], "invalid service name")

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
        rows = list_rows(run_cli("list", "--router", address).out)
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
        done = run_cli("list", "--json", env=env)
        self.assertEqual(done.code, 0, done.err)
        services = json.loads(done.out.decode())
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
                assert_clean_output(lines)

    def test_bench_quick_moves_verified_data_and_writes_json(self):
        """Figures are not judged here (timing belongs to the benchmark); that it runs the
        three roles as processes, checks every byte, shows progress and writes its JSON is."""
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "bench.json")
            done = run_cli("bench", "--smoke", "--json", path, timeout=120)   # --quick, smaller
            self.assertEqual(done.code, 0, done.err)
            with open(path) as f:
                report = json.load(f)
        progress = [l for l in done.err.splitlines() if l.startswith("bench: ")]
        self.assertIn("router, sharer and forwarder started", "\n".join(progress))
        self.assertGreaterEqual(len(progress), 10, done.err)
        self.assertIn("100 streams both ways, MB/s", done.out.decode())
        keys = ["upload_MBps", "download_MBps", "concurrent_MBps", "rtt_p50_us", "rtt_p99_us",
                "streams_per_s"]
        measured_in_proc = (["cpu_s_per_GB", "router_peak_rss_MB"]
                            if os.path.exists("/proc/self/stat") else [])
        for side, extra in (("direct", []), ("mindmeld", measured_in_proc)):
            for key in keys + extra:
                with self.subTest(side=side, key=key):
                    self.assertGreater(report[side][key], 0)
        self.assertLessEqual(report["mindmeld"]["rtt_p50_us"], report["mindmeld"]["rtt_p99_us"])
        self.assertFalse(report["in_process"])

    def test_bench_secret_encrypts_end_to_end_and_measures_streams_one_at_a_time(self):
        """--smoke leaves out the ssh chain, in one line: ssh is never needed."""
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "bench.json")
            done = run_cli("bench", "--secret", "--smoke", "--json", path, timeout=120)
            self.assertEqual(done.code, 0, done.err)
            with open(path) as f:
                report = json.load(f)
        self.assertIn("streams encrypted end to end", done.err)
        self.assertIn("bench: no ssh comparison with --smoke", done.err.splitlines())
        self.assertTrue(report["secret"])
        self.assertIsNone(report["ssh"])
        self.assertIn("  one at a time", done.out.decode())
        for key in ("upload_MBps", "download_MBps", "streams_per_s", "streams_serial_per_s"):
            with self.subTest(key=key):
                self.assertGreater(report["mindmeld"][key], 0)

    def test_script_piped_on_stdin(self):
        target = ThreadedServer(self, blocking_echo)
        router, address = self.start_router()
        share = self.start_share("piped", target.port, address, script=None)   # python3 - share ...
        forward, port = self.start_forward("piped", address)
        payload = os.urandom(300 * 1024)
        self.assertEqual(exchange(port, payload), payload)
        code, lines = share.signal(signal.SIGTERM)
        self.assertEqual(code, 0, lines)


# ---------------------------------------------------------------------------
# 9. Reach: connect (stdin/stdout), WebSocket, the router's HTTP face, HTTP
#    CONNECT proxies, several services on one sharer, IPv6, $PORT
# ---------------------------------------------------------------------------

def ipv6_loopback():
    """True when ::1 can be bound here."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


HAVE_IPV6 = ipv6_loopback()


class LoopThread:
    """An asyncio loop in a thread of its own, for in-test servers (targets, proxies)
    that must keep serving while the test thread blocks on a subprocess."""

    def __init__(self, test):
        self.loop = asyncio.new_event_loop()
        self.servers, self.writers, self.tasks, self.errors = [], set(), set(), []
        self._thread = threading.Thread(target=self._run)
        self._thread.daemon = True
        self._thread.start()
        test.addCleanup(self.close)

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, coro, timeout=30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def serve(self, handler, host=LOCALHOST, ssl_context=None):
        """A server running handler(reader, writer) per connection: its port."""
        async def connection(reader, writer):
            task = _current_task(self.loop)
            self.tasks.add(task)
            self.writers.add(writer)
            try:
                await handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
                pass
            except Exception as exc:            # noqa: BLE001 - the test looks at errors
                self.errors.append(exc)
            finally:
                writer.close()
                self.writers.discard(writer)
                self.tasks.discard(task)

        async def start():
            server = await asyncio.start_server(connection, host, 0, ssl=ssl_context)
            self.servers.append(server)
            return server.sockets[0].getsockname()[1]
        return self.call(start())

    def close(self):
        async def shutdown():
            for server in self.servers:
                server.close()
            for writer in list(self.writers):
                writer.close()
            tasks = [t for t in self.tasks if not t.done()]
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=5)
        try:
            self.call(shutdown(), 10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            if not self._thread.is_alive():
                self.loop.close()


async def pipe(reader, writer):
    """Copy until EOF, then pass the EOF on (half-close) where the transport can."""
    await copy_to_eof(reader, writer)
    if writer.can_write_eof() and not writer.transport.is_closing():
        writer.write_eof()


async def splice(r1, w1, r2, w2):
    """Bytes both ways between two connections until both directions ended."""
    async def one(reader, writer, other):
        try:
            await pipe(reader, writer)
        except (ConnectionError, OSError):
            other.transport.abort()             # one side broke: so does the other
            writer.transport.abort()
    try:
        await asyncio.gather(one(r1, w2, w1), one(r2, w1, w2))
    finally:
        w1.close()
        w2.close()


async def read_head(reader):
    """An HTTP request head: (method, target, version, [(name, value)])."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode("latin-1").split("\r\n")[:-2]
    method, target, version = lines[0].split(" ", 2)
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    return method, target, version, headers


def header(headers, name):
    values = [v for k, v in headers if k.lower() == name.lower()]
    return values[0] if values else None


class ConnectProxy:
    """An HTTP CONNECT proxy: records every request, then pipes bytes both ways.
    With `answer`, it sends that instead (say a 407) and closes."""

    def __init__(self, loops, answer=None):
        self.requests = []                      # (request line, Proxy-Authorization)
        self.answer = answer
        self.port = loops.serve(self.handle)
        self.url = "http://127.0.0.1:%d" % self.port

    async def handle(self, reader, writer):
        method, target, version, headers = await read_head(reader)
        self.requests.append(("%s %s %s" % (method, target, version),
                              header(headers, "Proxy-Authorization")))
        if self.answer is not None:
            writer.write(self.answer)
            await writer.drain()
            return
        if method != "CONNECT":
            writer.write(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
            return
        host, _, port = target.rpartition(":")
        up_reader, up_writer = await asyncio.open_connection(host.strip("[]"), int(port))
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await splice(reader, writer, up_reader, up_writer)


PROXY_407 = (b"HTTP/1.1 407 Proxy Authentication Required\r\n"
             b"Proxy-Authenticate: Basic realm=\"test\"\r\nContent-Length: 0\r\n\r\n")


class ReverseProxy:
    """What nginx does with `location /relay/ { proxy_pass http://router/; }` and the
    Upgrade headers passed on: strip the prefix, rewrite Host, add X-Forwarded-For,
    then pipe bytes.  With ssl_context it terminates TLS; with upstream_tls it speaks
    TLS to the router (proxy_pass https://)."""

    def __init__(self, loops, upstream_port, prefix="/relay", ssl_context=None,
                 upstream_tls=False):
        self.upstream, self.prefix, self.upstream_tls = upstream_port, prefix, upstream_tls
        self.requests = []                      # (method, path, headers)
        self.port = loops.serve(self.handle, ssl_context=ssl_context)

    async def handle(self, reader, writer):
        method, path, version, headers = await read_head(reader)
        self.requests.append((method, path, headers))
        if not path.startswith(self.prefix + "/"):
            writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n"
                         b"Connection: close\r\n\r\n")
            return
        lines = ["%s %s %s" % (method, path[len(self.prefix):], version)]
        for name, value in headers:
            if name.lower() == "host":
                value = "127.0.0.1:%d" % self.upstream
            lines.append("%s: %s" % (name, value))
        lines.append("X-Forwarded-For: %s" % writer.get_extra_info("peername")[0])
        context = None
        if self.upstream_tls:
            context = ssl_client_context_without_checks()
        up_reader, up_writer = await asyncio.open_connection(
            LOCALHOST, self.upstream, ssl=context, server_hostname="127.0.0.1" if context else None)
        up_writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        await splice(reader, writer, up_reader, up_writer)


def ssl_client_context_without_checks():
    context = ssl.SSLContext(getattr(ssl, "PROTOCOL_TLS_CLIENT", ssl.PROTOCOL_SSLv23))
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


# -- targets ----------------------------------------------------------------

def sha_reply_handler(limit=64 * MB):
    """Read to EOF, then answer '<count> <sha256>\\n'."""
    async def handler(reader, writer):
        count, digest, _ = await read_to_end(reader, limit)
        writer.write(("%d %s\n" % (count, digest)).encode())
        await writer.drain()
    return handler


def sender_handler(data):
    """Send `data` at once, then read (and drop) until EOF."""
    async def handler(reader, writer):
        writer.write(data)
        await writer.drain()
        writer.write_eof()
        await read_to_end(reader, 64 * MB)
    return handler


def prefix_echo_handler(prefix):
    async def handler(reader, writer):
        data = await reader.read(-1)
        writer.write(prefix + data)
        await writer.drain()
    return handler


# -- a blocking HTTP client -------------------------------------------------

def http_request(port, request, host=LOCALHOST, timeout=10):
    """Send a raw request; (status line, {header: value}, body) of the answer."""
    with socket.create_connection((host, port), timeout=timeout) as conn:
        conn.sendall(request)
        answer = recv_to_end(conn, MB, timeout, keep=True).data
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return lines[0], headers, body


class ReachMixin(CommandLineMixin):
    """Processes and in-test servers for the tests below."""

    def loops(self):
        if getattr(self, "_loops", None) is None:
            self._loops = LoopThread(self)
        return self._loops

    def target(self, handler, host=LOCALHOST):
        return self.loops().serve(handler, host)

    def router_at(self, listen, *extra, env=None):
        """A router process listening on `listen`: (proc, the port it logged)."""
        router = Proc(self, ["router", "--listen", listen] + list(extra), env=env or cli_env())
        match = router.wait_line(r"router listening on (\S+):(\d+)")
        return router, int(match.group(2))

    def share(self, services, router, *extra, env=None):
        """`share` of {name: target text}; waits for a 'sharing' line per name."""
        if len(services) == 1:
            (name, where), = services.items()
            words = [name, where]
        else:
            words = ["%s=%s" % item for item in services.items()]
        proc = Proc(self, ["share"] + words + ["--router", router] + list(extra),
                    env=env or cli_env())
        seen = set()
        for _ in services:
            match = proc.wait_line(r"sharing '([^']+)' -> (\S+) through the router at (\S+)")
            seen.add((match.group(1), match.group(2), match.group(3)))
        return proc, seen

    def forward(self, name, router, *extra, listen="127.0.0.1:0", env=None):
        proc = Proc(self, ["forward", name, listen, "--router", router] + list(extra),
                    env=env or cli_env())
        match = proc.wait_line(r"forwarding (\S+):(\d+) -> '%s'" % re.escape(name))
        return proc, match.group(1), int(match.group(2))


# ---------------------------------------------------------------------------
# 9a. connect: standard input and output as one stream
# ---------------------------------------------------------------------------

PROXYCOMMAND_PARENT = r'''
import json, os, select, subprocess, sys, time
# Like ssh running its ProxyCommand: a child with pipes for stdin and stdout.
child = subprocess.Popen(sys.argv[1:], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
deadline = time.monotonic() + 30
state = {"buffer": b""}

def readline():
    for _ in range(10000):
        if b"\n" in state["buffer"]:
            line, _, state["buffer"] = state["buffer"].partition(b"\n")
            return line.decode()
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([child.stdout], [], [], left)[0]:
            return "<timeout>"
        more = os.read(child.stdout.fileno(), 65536)
        if not more:
            return "<eof>" if not state["buffer"] else "<partial %r>" % state["buffer"]
        state["buffer"] += more
    return "<too many reads>"

transcript = [readline()]                    # the server speaks first, like sshd
for i in range(int(os.environ["ROUNDS"])):
    child.stdin.write(b"PING %d\n" % i)
    child.stdin.flush()
    transcript.append(readline())
child.stdin.write(b"QUIT\n")
child.stdin.flush()
transcript.append(readline())
transcript.append(readline())                # the server closed: end of the stream
child.stdin.close()                          # ssh closes its end too
try:
    code = child.wait(20)
except subprocess.TimeoutExpired:
    child.kill()
    code = "still running"
print(json.dumps({"transcript": transcript, "code": code}))
'''


async def line_server(reader, writer):
    """A banner, then PONG n for each PING n, BYE for QUIT, and close."""
    writer.write(b"SSH-2.0-test banner\n")
    for _ in range(1000):
        line = await asyncio.wait_for(reader.readline(), 20)
        if line.startswith(b"PING "):
            writer.write(b"PONG " + line[5:])
        elif line == b"QUIT\n":
            writer.write(b"BYE\n")
            await writer.drain()
            return
        else:
            writer.write(b"ERROR " + line)
            return


class TestConnect(ReachMixin, unittest.TestCase):

    def test_binary_data_both_ways_byte_exact(self):
        upload, download = os.urandom(5 * MB), os.urandom(5 * MB) + bytes(range(256)) * 4
        router, port = self.router_at("127.0.0.1:0")
        address = "127.0.0.1:%d" % port
        up, down, echo = (self.target(sha_reply_handler()), self.target(sender_handler(download)),
                          self.target(echo_handler))
        self.share({"up": "127.0.0.1:%d" % up, "down": "127.0.0.1:%d" % down,
                    "echo": "127.0.0.1:%d" % echo}, address)

        code, out, err = run_cli("connect", "up", "--router", address, input=upload)
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(out.decode(), "%d %s\n" % (len(upload), hashlib.sha256(upload).hexdigest()))

        code, out, err = run_cli("connect", "down", "--router", address)
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(len(out), len(download))
        self.assertTrue(out == download, "the download differs")

        both = os.urandom(3 * MB)                   # up and down at the same time
        code, out, err = run_cli("connect", "echo", "--router", address, input=both)
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(len(out), len(both))
        self.assertTrue(out == both, "the echo differs")

    def test_stdin_eof_is_a_half_close_and_the_reply_still_arrives(self):
        seen = []
        reply = os.urandom(MB)

        async def target(reader, writer):
            request = await reader.read(-1)         # returns at EOF only
            seen.append(request)
            writer.write(reply)                     # ... and the answer comes after it
            await writer.drain()

        router, port = self.router_at("127.0.0.1:0")
        address = "127.0.0.1:%d" % port
        self.share({"half": "127.0.0.1:%d" % self.target(target)}, address)
        code, out, err = run_cli("connect", "half", "--router", address, input=b"request\x00\xff")
        self.assertEqual(seen, [b"request\x00\xff"])
        self.assertEqual((code, err), (0, ""))
        self.assertTrue(out == reply, "got %d bytes, not the %d-byte reply" % (len(out), len(reply)))

    def test_target_closing_first_is_a_half_close_too(self):
        received = queue.Queue()
        upload = os.urandom(2 * MB)

        async def target(reader, writer):
            writer.write(b"banner\n")
            writer.write_eof()                      # done talking, still listening
            h, count = hashlib.sha256(), 0
            try:
                for _ in range(100000):
                    data = await reader.read(CHUNK)
                    if not data:
                        break
                    h.update(data)
                    count += len(data)
                received.put((count, h.hexdigest()))
            except ConnectionError as exc:
                received.put(("%s after %d bytes" % (type(exc).__name__, count), None))

        router, port = self.router_at("127.0.0.1:0")
        address = "127.0.0.1:%d" % port
        self.share({"sink": "127.0.0.1:%d" % self.target(target)}, address)
        code, out, err = run_cli("connect", "sink", "--router", address, input=upload)
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(out, b"banner\n")
        outcome = received.get(timeout=10)      # (the sharer may still be writing)
        self.assertEqual(outcome, (len(upload), hashlib.sha256(upload).hexdigest()),
                         "what the target got of stdin")

    def test_service_secret(self):
        router, port = self.router_at("127.0.0.1:0")
        address = "127.0.0.1:%d" % port
        self.share({"vault": "127.0.0.1:%d" % self.target(echo_handler)}, address,
                   "--secret", "open sesame")
        code, out, err = run_cli("connect", "vault", "--router", address, input=b"knock knock",
                                 env=cli_env(MINDMELD_SECRET="open sesame"))    # no argv warning
        self.assertEqual((code, out, err), (0, b"knock knock", ""))
        for args in ((), ("--secret", "guess")):
            with self.subTest(args=args):
                code, out, err = run_cli("connect", "vault", "--router", address, *args,
                                         input=b"knock")
                line = self.assert_one_error_line((code, out, err), "connect")
                self.assertIn("'vault'", line)
                self.assertNotIn("open sesame", err)
                self.assertEqual(out, b"")

    def test_stdout_carries_only_stream_bytes(self):
        # with log lines to write (-v, and --tls-insecure warns at every start),
        # nothing but the stream reaches stdout
        data = b"exactly this\n" + bytes(range(256))
        state, _, _ = router_cert()
        router, port = self.router_at("127.0.0.1:0", "--tls", "--state-dir", state)
        address = "127.0.0.1:%d" % port
        self.share({"talk": "127.0.0.1:%d" % self.target(sender_handler(data))}, address,
                   "--tls-insecure", "--state-dir", state)
        code, out, err = run_cli("connect", "talk", "--router", address, "--tls-insecure", "-v",
                                 "--state-dir", state)
        self.assertEqual(code, 0, err)
        self.assertIn("--tls-insecure", err)
        self.assertEqual(out, data)

    def test_unknown_service_exits_1_with_one_line(self):
        router, port = self.router_at("127.0.0.1:0")
        code, out, err = run_cli("connect", "nosuch", "--router", "127.0.0.1:%d" % port,
                                 input=b"anyone there?")
        line = self.assert_one_error_line((code, out, err), "connect")
        self.assertIn("'nosuch'", line)
        self.assertIn("no service named", line)
        self.assertEqual(out, b"")
        # no router at all: the same, one line
        dead = free_port_socket()
        self.addCleanup(dead.close)
        where = "127.0.0.1:%d" % dead.getsockname()[1]
        code, out, err = run_cli("connect", "web", "--router", where)
        line = self.assert_one_error_line((code, out, err), "connect")
        self.assertIn("cannot reach the router at " + where, line)
        self.assertEqual(out, b"")

    def test_as_ssh_proxycommand(self):
        rounds = 12
        router, port = self.router_at("127.0.0.1:0")
        address = "127.0.0.1:%d" % port
        self.share({"box-ssh": "127.0.0.1:%d" % self.target(line_server)}, address)
        parent = subprocess.run(
            [sys.executable, "-c", PROXYCOMMAND_PARENT, sys.executable, SCRIPT, "connect",
             "box-ssh", "--router", address],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=cli_env(ROUNDS=str(rounds)), timeout=60, universal_newlines=True)
        self.assertEqual(parent.stderr, "")         # connect is quiet when all is well
        result = json.loads(parent.stdout)
        self.assertEqual(result["transcript"],
                         ["SSH-2.0-test banner"] + ["PONG %d" % i for i in range(rounds)]
                         + ["BYE", "<eof>"])
        self.assertEqual(result["code"], 0)


# ---------------------------------------------------------------------------
# 9b. WebSocket: ws:// and wss:// routers, and a reverse proxy in front
# ---------------------------------------------------------------------------

class TestWebSocket(ReachMixin, unittest.TestCase):

    def exchange_through(self, port, size=3 * MB):
        payload = os.urandom(size)
        back = exchange(port, payload)
        self.assertEqual(len(back), len(payload))
        self.assertTrue(back == payload, "the echo differs")

    def test_share_and_forward_over_ws(self):
        router, port = self.router_at("127.0.0.1:0")
        target = self.target(echo_handler)
        share_url = "ws://127.0.0.1:%d/mindmeld" % port
        forward_url = "ws://127.0.0.1:%d" % port            # the default path
        share, seen = self.share({"web": "127.0.0.1:%d" % target}, share_url)
        self.assertEqual(seen, {("web", "127.0.0.1:%d" % target, share_url)})
        forward, _, local = self.forward("web", forward_url)
        self.exchange_through(local)
        code, out, err = run_cli("list", "--router", forward_url)
        self.assertEqual(code, 0, err)
        self.assertEqual([r[0] for r in list_rows(out)[1:]], ["web"])
        payload = os.urandom(MB)
        code, out, err = run_cli("connect", "web", "--router", forward_url, input=payload)
        self.assertEqual((code, err), (0, ""))
        self.assertTrue(out == payload, "connect over ws:// got %d bytes back" % len(out))

    def test_through_an_http_reverse_proxy(self):
        router, port = self.router_at("127.0.0.1:0")
        proxy = ReverseProxy(self.loops(), port, prefix="/relay")
        url = "ws://127.0.0.1:%d/relay/mindmeld" % proxy.port
        self.share({"web": "127.0.0.1:%d" % self.target(echo_handler)}, url)
        forward, _, local = self.forward("web", url)
        self.exchange_through(local)
        # both went through the proxy, as WebSocket upgrades of the path given
        self.assertEqual(len(proxy.requests), 2, proxy.requests)
        for method, path, headers in proxy.requests:
            self.assertEqual((method, path), ("GET", "/relay/mindmeld"))
            self.assertEqual(header(headers, "Upgrade").lower(), "websocket")
            self.assertEqual(header(headers, "Host"), "127.0.0.1:%d" % proxy.port)
        self.assertEqual(self.loops().errors, [])

    def test_router_speaks_rfc6455(self):
        router, port = self.router_at("127.0.0.1:0")
        with socket.create_connection((LOCALHOST, port), timeout=10) as conn:
            conn.sendall(b"GET /mindmeld HTTP/1.1\r\nHost: relay.example\r\nUpgrade: websocket\r\n"
                         b"Connection: keep-alive, Upgrade\r\n"
                         b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"   # RFC 6455 1.3
                         b"Sec-WebSocket-Version: 13\r\n\r\n")
            ws = RawWebSocket(conn)
            status, headers = ws.read_head()
            self.assertEqual(status.split()[:2], ["HTTP/1.1", "101"])
            self.assertEqual(headers["sec-websocket-accept"], "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
            self.assertEqual(headers["upgrade"].lower(), "websocket")
            conn.sendall(ws_frame(0x9, b"are you there"))                 # ping
            self.assertEqual(ws.read_frame(), (True, 0xA, b"are you there"))   # pong, unmasked
            # mindmeld inside binary messages; a message boundary means nothing
            hello = PREAMBLE + encode_json(HELLO, 0, {"version": 1, "role": "list",
                                                      "agent": "raw-test"})
            conn.sendall(ws_frame(0x2, hello[:5], fin=False) + ws_frame(0x0, hello[5:]))
            conn.sendall(ws_frame(0x2, encode_json(mindmeld.LIST, 1, {})))
            decoder, frames = FrameDecoder(), []
            for _ in range(100):
                fin, opcode, payload = ws.read_frame()
                self.assertEqual(opcode, 0x2)
                frames.extend(f for f in decoder.feed(payload) if f[0] != mindmeld.PING)
                if len(frames) >= 2:
                    break       # (the router PINGs a peer once, for the round trip)
            (t1, _, i1, hello_reply), (t2, _, i2, listing) = frames[:2]
            self.assertEqual((t1, i1), (HELLO, 0))
            self.assertEqual(json.loads(bytes(hello_reply).decode())["version"], 1)
            self.assertEqual((t2, i2), (LIST_REPLY, 1))
            self.assertEqual(json.loads(bytes(listing).decode()), {"services": []})
            conn.sendall(ws_frame(0x8, b"\x03\xe8"))                      # close
            opcodes = []
            for _ in range(10):                 # (a last binary message may come first)
                opcodes.append(ws.read_frame()[1])
                if opcodes[-1] != 0x2:
                    break
            self.assertEqual(opcodes[-1], 0x8, "no close frame in answer: %s" % opcodes)
            self.assertEqual(ws.rest(), b"")                               # and the TCP close
        # an upgrade without a key or version: 400
        line, _, body = http_request(port, b"GET /mindmeld HTTP/1.1\r\nHost: x\r\n"
                                           b"Upgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        self.assertEqual(line.split()[:2], ["HTTP/1.1", "400"], line)

    def test_wrong_path_is_one_error_line(self):
        router, port = self.router_at("127.0.0.1:0")
        url = "ws://127.0.0.1:%d/wrong" % port
        code, out, err = run_cli("list", "--router", url)
        line = self.assert_one_error_line((code, out, err), "list")
        self.assertIn("/wrong", line)
        self.assertIn("404", line)
        self.assertEqual(out, b"")
        # a sharer does not retry what cannot work
        ran = run_cli("share", "web", "80", "--router", url, timeout=15)
        line = self.assert_one_error_line(ran, "share")
        self.assertIn("404", line)

    def test_wss_with_ca_fingerprint_and_a_tls_reverse_proxy(self):
        state, context, fingerprint = router_cert()
        cert = os.path.join(state, "router-cert.pem")
        router, port = self.router_at("127.0.0.1:0", "--tls", "--state-dir", state)
        tls = ["--state-dir", state]
        self.share({"web": "127.0.0.1:%d" % self.target(echo_handler)},
                   "wss://127.0.0.1:%d/mindmeld" % port, "--tls-ca", cert, *tls)
        forward, _, local = self.forward("web", "wss://127.0.0.1:%d" % port,
                                         "--tls-fingerprint", fingerprint, *tls)
        self.exchange_through(local)
        # the certificate really is checked on wss://
        code, out, err = run_cli("list", "--router", "wss://127.0.0.1:%d" % port,
                                 "--tls-fingerprint", "ab" * 32, *tls)
        line = self.assert_one_error_line((code, out, err), "list")
        self.assertIn(fingerprint, line)
        # TLS ends at a reverse proxy that re-encrypts to the router (nginx with ssl and
        # proxy_pass https://): TLS first, then the WebSocket upgrade inside it
        proxy = ReverseProxy(self.loops(), port, ssl_context=context, upstream_tls=True)
        code, out, err = run_cli("list", "--router", "wss://127.0.0.1:%d/relay/mindmeld"
                                 % proxy.port, "--tls-ca", cert, *tls)
        self.assertEqual(code, 0, err)
        self.assertEqual([r[0] for r in list_rows(out)[1:]], ["web"])
        self.assertEqual([(m, p) for m, p, _ in proxy.requests], [("GET", "/relay/mindmeld")])
        # and through an HTTP CONNECT proxy: TLS inside the tunnel, then the upgrade
        connect_proxy = ConnectProxy(self.loops())
        code, out, err = run_cli("list", "--router", "wss://127.0.0.1:%d" % port, "--tls-ca", cert,
                                 "--proxy", connect_proxy.url, *tls)
        self.assertEqual(code, 0, err)
        self.assertEqual([r[0] for r in list_rows(out)[1:]], ["web"])
        self.assertEqual(connect_proxy.requests, [("CONNECT 127.0.0.1:%d HTTP/1.1" % port, None)])
        self.assertEqual(self.loops().errors, [])


def ws_frame(opcode, payload, fin=True, masked=True):
    """A frame (RFC 6455 5.2), written here independently of mindmeld: masked as a
    client sends it, or not, as a server does."""
    n, bit = len(payload), 0x80 if masked else 0
    first = (0x80 if fin else 0) | opcode
    if n < 126:
        head = struct.pack("!BB", first, bit | n)
    elif n < 65536:
        head = struct.pack("!BBH", first, bit | 126, n)
    else:
        head = struct.pack("!BBQ", first, bit | 127, n)
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


class RawWebSocket:
    """Reads an HTTP head, then unmasked server frames, from a blocking socket."""

    def __init__(self, conn):
        self.conn, self.buffer = conn, b""

    def _need(self, n):
        for _ in range(10000):
            if len(self.buffer) >= n:
                return
            chunk = self.conn.recv(CHUNK)
            if not chunk:
                raise AssertionError("closed after %r" % self.buffer[:100])
            self.buffer += chunk
        raise AssertionError("too many reads")

    def read_head(self):
        for _ in range(10000):
            if b"\r\n\r\n" in self.buffer:
                break
            self._need(len(self.buffer) + 1)
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        return lines[0], {k.strip().lower(): v.strip()
                          for k, _, v in (l.partition(":") for l in lines[1:])}

    def read_frame(self):
        """(fin, opcode, payload); the server must not mask."""
        self._need(2)
        first, second = self.buffer[0], self.buffer[1]
        if second & 0x80:
            raise AssertionError("a server frame is masked")
        n, pos = second & 0x7F, 2
        if n == 126:
            self._need(4)
            n, pos = struct.unpack("!H", self.buffer[2:4])[0], 4
        elif n == 127:
            self._need(10)
            n, pos = struct.unpack("!Q", self.buffer[2:10])[0], 10
        self._need(pos + n)
        payload, self.buffer = self.buffer[pos:pos + n], self.buffer[pos + n:]
        return bool(first & 0x80), first & 0x0F, payload

    def rest(self):
        return self.buffer + recv_to_end(self.conn, MB, 10, keep=True).data


_ROUTER_CERT = []


def router_cert():
    """(state dir, server context, fingerprint) of a self-signed router certificate,
    made once per test run (it takes a while) and removed at exit."""
    if not _ROUTER_CERT:
        import atexit
        import shutil
        state = tempfile.mkdtemp(prefix="mindmeld-test-")
        atexit.register(shutil.rmtree, state, True)
        context, fingerprint = mindmeld.router_tls_context(None, None, state)
        _ROUTER_CERT.append((state, context, fingerprint))
    return _ROUTER_CERT[0]


# ---------------------------------------------------------------------------
# 9c. The router's HTTP face, beside a transfer on the same port
# ---------------------------------------------------------------------------

class TestRouterHttp(ReachMixin, unittest.TestCase):

    def test_http_answers_while_a_transfer_runs(self):
        router, port = self.router_at("127.0.0.1:0")
        address = "127.0.0.1:%d" % port
        self.share({"web": "127.0.0.1:%d" % self.target(echo_handler)}, address)
        forward, _, local = self.forward("web", address)
        answers = {}

        def ask():                      # the stream is open and data flows: now HTTP
            answers["/"] = http_request(port, b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n")
            answers["/healthz"] = http_request(port, b"GET /healthz HTTP/1.0\r\n\r\n")
            answers["/mindmeld"] = http_request(
                port, b"GET /mindmeld HTTP/1.1\r\nHost: relay\r\n\r\n")
            answers["/nope"] = http_request(port, b"GET /nope HTTP/1.1\r\nHost: relay\r\n\r\n")

        first, rest = os.urandom(256 * 1024), os.urandom(4 * MB)
        back = exchange(local, rest, first=first, then=ask)
        self.assertEqual(len(back), len(first) + len(rest))
        self.assertTrue(back == first + rest, "the transfer was damaged")

        for path, status in (("/", "200"), ("/healthz", "200"), ("/mindmeld", "426"),
                             ("/nope", "404")):
            with self.subTest(path=path):
                line, headers, body = answers[path]
                self.assertEqual(line.split()[:2], ["HTTP/1.1", status], line)
                self.assertEqual(int(headers["content-length"]), len(body))
        self.assertEqual(answers["/healthz"][2], b"ok\n")
        status = answers["/"][2].decode()
        self.assertIn("mindmeld router %s" % mindmeld.__version__, status)
        self.assertRegex(status, r"(?m)^services 1$")
        self.assertTrue(router.running() and forward.running())


# ---------------------------------------------------------------------------
# 9d. HTTP CONNECT proxies on the way to the router
# ---------------------------------------------------------------------------

class TestProxy(ReachMixin, unittest.TestCase):

    def test_share_and_forward_through_a_proxy_with_credentials(self):
        router, port = self.router_at("127.0.0.1:0")
        address = "127.0.0.1:%d" % port
        proxy = ConnectProxy(self.loops())
        url = "http://alice:s3cr%%40t@127.0.0.1:%d" % proxy.port       # password s3cr@t
        share, _ = self.share({"web": "127.0.0.1:%d" % self.target(echo_handler)}, address,
                              "--proxy", url)
        forward, _, local = self.forward("web", address, "--proxy", url)
        payload = os.urandom(2 * MB)
        self.assertTrue(exchange(local, payload) == payload, "the echo differs")
        # WebSocket inside the proxy's tunnel
        code, out, err = run_cli("list", "--router", "ws://%s/mindmeld" % address, "--proxy", url)
        self.assertEqual(code, 0, err)
        self.assertEqual([r[0] for r in list_rows(out)[1:]], ["web"])
        basic = "Basic " + base64.b64encode(b"alice:s3cr@t").decode()
        self.assertEqual(proxy.requests, [("CONNECT %s HTTP/1.1" % address, basic)] * 3)
        self.assertEqual(self.loops().errors, [])
        for proc in (share, forward):
            self.assertFalse([l for l in proc.lines if "s3cr" in l], proc.lines)

    def test_proxy_from_the_environment_is_used_for_loopback_too(self):
        router, port = self.router_at("127.0.0.1:0")
        address = "127.0.0.1:%d" % port
        proxy = ConnectProxy(self.loops())
        cases = [("HTTPS_PROXY", proxy.url), ("https_proxy", "127.0.0.1:%d" % proxy.port),
                 ("ALL_PROXY", proxy.url)]
        for variable, value in cases:
            with self.subTest(variable=variable, value=value):
                before = len(proxy.requests)
                code, out, err = run_cli("list", "--router", address,
                                         env=cli_env(**{variable: value}))
                self.assertEqual(code, 0, err)
                self.assertEqual(list_rows(out)[0][0], "NAME")
                self.assertEqual(proxy.requests[before:], [("CONNECT %s HTTP/1.1" % address, None)])

    def test_no_proxy_naming_the_router_host_bypasses_the_proxy(self):
        router, port = self.router_at("127.0.0.1:0")
        address = "127.0.0.1:%d" % port
        proxy = ConnectProxy(self.loops(), answer=PROXY_407)       # any use of it fails
        for no_proxy in ("127.0.0.1", "example.org, 127.0.0.1"):
            with self.subTest(NO_PROXY=no_proxy):
                code, out, err = run_cli("list", "--router", address,
                                         env=cli_env(HTTPS_PROXY=proxy.url, NO_PROXY=no_proxy))
                self.assertEqual(code, 0, err)
        self.assertEqual(proxy.requests, [])
        # a NO_PROXY that names another host does not
        code, out, err = run_cli("list", "--router", address,
                                 env=cli_env(HTTPS_PROXY=proxy.url, NO_PROXY="example.org"))
        self.assertEqual(code, 1, err)
        self.assertEqual(len(proxy.requests), 1)

    def test_proxy_answering_407_is_one_error_line_and_permanent(self):
        router, port = self.router_at("127.0.0.1:0")
        address = "127.0.0.1:%d" % port
        proxy = ConnectProxy(self.loops(), answer=PROXY_407)
        code, out, err = run_cli("list", "--router", address, "--proxy", proxy.url)
        line = self.assert_one_error_line((code, out, err), "list")
        self.assertIn(proxy.url, line)
        self.assertIn("407 Proxy Authentication Required", line)
        for command in (["share", "web", "80"], ["forward", "web", "0"]):
            with self.subTest(command=command[0]):     # -q: a forwarder logs its port first
                ran = run_cli(*command + ["-q", "--router", address, "--proxy", proxy.url],
                              timeout=15)
                line = self.assert_one_error_line(ran, command[0])
                self.assertIn("407", line)
        self.assertEqual(len(proxy.requests), 3)


# ---------------------------------------------------------------------------
# 9e. Several services on one sharer
# ---------------------------------------------------------------------------

class TestSeveralServices(ReachMixin, unittest.TestCase):

    def test_one_sharer_several_services(self):
        router, port = self.router_at("127.0.0.1:0")
        address = "127.0.0.1:%d" % port
        web = self.target(prefix_echo_handler(b"web:"))
        db = self.target(prefix_echo_handler(b"db:"))
        share, seen = self.share({"web": str(web), "db": "127.0.0.1:%d" % db}, address)
        self.assertEqual(seen, {("web", "localhost:%d" % web, address),
                                ("db", "127.0.0.1:%d" % db, address)})
        code, out, err = run_cli("list", "--router", address)
        self.assertEqual(code, 0, err)
        rows = list_rows(out)[1:]
        self.assertEqual(sorted(r[0] for r in rows), ["db", "web"])
        self.assertEqual(len({r[3] for r in rows}), 1, "not one sharer link: %s" % rows)
        self.assertRegex(http_request(port, b"GET / HTTP/1.0\r\n\r\n")[2].decode(),
                         r"(?m)^services 2$")
        for name in ("web", "db"):
            with self.subTest(service=name):
                forward, _, local = self.forward(name, address)
                payload = os.urandom(100 * 1024)
                self.assertTrue(exchange(local, payload) == name.encode() + b":" + payload)

    def test_share_usage_errors_exit_2(self):
        cases = [(("web",), "PORT"), (("web=8000", "db"), "'db'"),
                 (("web=8000", "web=8001"), "'web' is given twice")]
        for words, message in cases:
            with self.subTest(words=words):
                code, out, err = run_cli("share", *words, "--router", "127.0.0.1:9")
                self.assertEqual(code, 2, err)
                self.assertIn("usage: mindmeld share", err)
                self.assertIn(message, err.splitlines()[-1])
                assert_clean_output(err)


# ---------------------------------------------------------------------------
# 9f. IPv6, and the router's listening address
# ---------------------------------------------------------------------------

class TestListen(ReachMixin, unittest.TestCase):

    @unittest.skipUnless(HAVE_IPV6, "::1 cannot be bound here")
    def test_ipv6_loopback_end_to_end(self):
        router = Proc(self, ["router", "--listen", "[::1]:0"], env=cli_env())
        port = int(router.wait_line(r"router listening on \[::1\]:(\d+)").group(1))
        address = "[::1]:%d" % port
        target = self.target(echo_handler, host="::1")
        share, seen = self.share({"v6": "[::1]:%d" % target}, address)
        self.assertEqual(seen, {("v6", "[::1]:%d" % target, address)})
        forward, host, local = self.forward("v6", address, listen="[::1]:0")
        self.assertEqual(host, "[::1]")
        payload = os.urandom(MB)
        self.assertTrue(exchange(local, payload, host="::1") == payload, "the echo differs")
        code, out, err = run_cli("list", "--router", address)
        self.assertEqual(code, 0, err)
        rows = list_rows(out)
        self.assertEqual(rows[1][0], "v6")
        self.assertTrue(rows[1][3].startswith("[::1]:"), rows[1])
        code, out, err = run_cli("list", "--router", "ws://%s" % address)
        self.assertEqual(code, 0, err)
        self.assertEqual(list_rows(out)[1][0], "v6")

    @unittest.skipUnless(HAVE_IPV6, "::1 cannot be bound here")
    def test_dual_stack_router_takes_ipv4_and_ipv6(self):
        if not dual_stack_works():
            self.skipTest("this system does not accept IPv4 on an IPv6 socket")
        router = Proc(self, ["router", "--listen", "[::]:0"], env=cli_env())
        port = int(router.wait_line(r"router listening on \[::\]:(\d+)").group(1))
        target = self.target(echo_handler)
        share, _ = self.share({"both": "127.0.0.1:%d" % target}, "127.0.0.1:%d" % port)
        forward, _, local = self.forward("both", "[::1]:%d" % port)
        payload = os.urandom(MB)
        self.assertTrue(exchange(local, payload) == payload, "the echo differs")
        code, out, err = run_cli("list", "--router", "[::1]:%d" % port)
        self.assertEqual(code, 0, err)
        self.assertRegex(list_rows(out)[1][3], r"^(127\.0\.0\.1|\[::ffff:127\.0\.0\.1\]):\d+$")

    def test_router_port_from_the_environment(self):
        for attempt in range(3):        # the free port may be taken in between: try another
            holder = free_port_socket()
            free = holder.getsockname()[1]
            holder.close()
            router = Proc(self, ["router"], env=cli_env(PORT=str(free)))
            try:
                match = router.wait_line(r"router listening on (.*)$")
                break
            except AssertionError:
                if attempt == 2 or "cannot listen" not in "\n".join(router.lines):
                    raise
        ports = re.findall(r":(\d+)(?:,|$| )", match.group(1))
        self.assertTrue(ports, match.group(0))
        self.assertEqual(set(ports), {str(free)}, match.group(0))
        code, out, err = run_cli("list", "--router", "127.0.0.1:%d" % free)
        self.assertEqual(code, 0, err)
        # --listen wins over $PORT
        other, other_port = self.router_at("127.0.0.1:0", env=cli_env(PORT=str(free)))
        self.assertNotEqual(other_port, free)


def dual_stack_works():
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    except OSError:
        return False
    with sock:
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(("::", 0))
            sock.listen(1)
            with socket.create_connection((LOCALHOST, sock.getsockname()[1]), timeout=5):
                return True
        except (OSError, AttributeError):
            return False


KEEPALIVE_SILENT_INTERVALS = 3      # the documented "dead after 3 silent intervals"


# ---------------------------------------------------------------------------
# 10. Staying up: a relay that goes silent, and other fixtures
# ---------------------------------------------------------------------------

class SilentRelay:
    """A TCP relay on 127.0.0.1 to `upstream_port`, in the test's event loop.

    freeze(): every connection open now stops passing bytes, both ways, and passes no
    close either: to each end the other has gone silent with the socket still open.
    refuse = True: new connections are accepted and closed at once (a router that is
    not there); False: they are relayed."""

    def __init__(self, test, upstream_port):
        self.test, self.upstream = test, upstream_port
        self.refuse = False
        self.frozen_pairs = 0
        self._pairs, self._tasks, self._writers = [], set(), []
        self.server = self.port = None

    async def start(self, sock=None):
        if sock is None:
            self.server = await asyncio.start_server(self._serve, LOCALHOST, 0)
        else:
            self.server = await asyncio.start_server(self._serve, sock=sock)
        self.port = self.server.sockets[0].getsockname()[1]
        self.address = "%s:%d" % (LOCALHOST, self.port)
        self.test._async_cleanups.append(self.close)
        return self

    async def _serve(self, reader, writer):
        self._writers.append(writer)
        if self.refuse:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(LOCALHOST, self.upstream)
        except OSError:
            writer.close()
            return
        self._writers.append(up_writer)
        self._join(reader, writer, up_reader, up_writer)

    def _join(self, reader, writer, up_reader, up_writer):
        """Pass bytes both ways between a client's connection and its upstream one."""
        pair = {"frozen": False}
        self._pairs.append(pair)
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            self._start(self._pump(source, sink, pair))

    def _start(self, coro):
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _pump(self, reader, writer, pair):
        for _ in range(10 ** 6):
            try:
                data = await reader.read(CHUNK)
            except ConnectionError:
                data = b""
            if pair["frozen"]:
                await asyncio.get_event_loop().create_future()   # held until close() cancels
            if not data:
                writer.close()
                return
            writer.write(data)

    def freeze(self):
        for pair in self._pairs:
            if not pair["frozen"]:
                pair["frozen"] = True
                self.frozen_pairs += 1

    async def close(self):
        self.server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for writer in self._writers:
            writer.close()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        try:
            await asyncio.wait_for(self.server.wait_closed(), 2)
        except asyncio.TimeoutError:
            pass


def push_or_echo(conn):
    """A ThreadedServer handler: b'push\\n' sends until the connection breaks (at most
    256 MB), b'echo\\n' echoes."""
    mode = recv_exactly(conn, 5)
    if mode == b"push\n":
        block = os.urandom(CHUNK)
        for _ in range(4096):
            conn.sendall(block)
    elif mode == b"echo\n":
        blocking_echo(conn)


def recv_at_least(conn, n, timeout=20):
    conn.settimeout(timeout)
    got = 0
    for _ in range(n + 1):
        chunk = conn.recv(CHUNK)
        if not chunk:
            break
        got += len(chunk)
        if got >= n:
            break
    return got


async def read_reply(reader, timeout):
    """Everything until EOF, or 'reset'."""
    try:
        return await asyncio.wait_for(reader.read(-1), timeout)
    except ConnectionResetError:
        return "reset"


async def reply_handler(reader, writer):
    """Target: read the request until EOF, answer, close."""
    request = await reader.read(-1)
    writer.write(b"reply to " + request)
    await writer.drain()


# ---------------------------------------------------------------------------
# 10a. Staying up: the roles as library objects in one event loop
# ---------------------------------------------------------------------------

class TestStayingUp(LoopTestCase):

    async def client(self, cls, *args, **options):
        role = cls(*args, **options)
        self._async_cleanups.append(lambda: role.close(0))
        await role.start()
        return role

    async def through(self, port, request, timeout=10):
        reader, writer = await self.connect(port)
        writer.write(request)
        writer.write_eof()
        return await read_reply(reader, timeout)

    def test_an_abort_after_a_close_that_was_flushed_does_nothing(self):
        """A transport closed with data still buffered reports connection_lost once that
        data is written, yet asyncio's abort() then fails (a sharer whose router was killed
        mid-transfer lost its reconnecting task to that once): mindmeld's does nothing."""
        async def main():
            ours, theirs = socket.socketpair()
            self.addCleanup(theirs.close)
            lost = self.loop.create_future()

            class Watched(asyncio.Protocol):
                def connection_lost(self, exc):
                    lost.set_result(exc)
            transport, _ = await self.loop.create_unix_connection(Watched, None, sock=ours)
            transport.write(b"x" * MB)              # more than the socket takes at once
            self.assertGreater(transport.get_write_buffer_size(), 0)
            transport.close()
            received = await self.loop.run_in_executor(None, lambda: recv_to_end(theirs, 2 * MB, 5))
            self.assertEqual(received.count, MB)
            await asyncio.wait_for(lost, 5)
            mindmeld._abort(transport)
            mindmeld._abort_with_reset(transport)
        self.run_async(main(), 10)

    # -- 3. a peer that goes silent without closing --------------------------------
    def test_silent_sharer_link_is_dropped_by_both_ends_and_comes_back(self):
        keepalive = 0.3
        bound = (KEEPALIVE_SILENT_INTERVALS + 1) * keepalive + 5     # + one tick, + slack

        async def main():
            router = await self.start_router(keepalive=keepalive)
            target = await self.start_target(echo_handler)
            relay = await SilentRelay(self, router.port).start()
            sharer = await self.client(Sharer, {"web": (LOCALHOST, target)}, router=relay.address,
                                       keepalive=keepalive, backoff=(0.05, 0.2))
            await sharer.wait_ready(10)
            forwarder = await self.start_forwarder("web")            # straight to the router
            self.assertEqual(await self.through(forwarder.port, b"before"), b"before")
            held = router.services["web"].peer                       # the router's end of it

            relay.refuse = True                                      # no way back, for now
            relay.freeze()
            self.assertEqual(relay.frozen_pairs, 1)
            why = await asyncio.wait_for(asyncio.shield(held.lost), bound)
            self.assertIn("keepalive", why)
            self.assertEqual(await list_services(router=self.router_address), [])
            line = await self.watch.wait(r"^share: .*keepalive.*; retrying in [\d.]+ s$", bound)
            self.assertIn("no answer", line)
            self.assertTrue(any(re.search(r"'web' unregistered: .*keepalive", l)
                                for l in self.watch.lines), self.watch.lines)

            relay.refuse = False                                     # the path is back
            await self.watch.wait(r"^sharing 'web' -> .*\(again\)$", 15)
            services = await list_services(router=self.router_address)
            self.assertEqual([s["name"] for s in services], ["web"])
            self.assertEqual(await self.through(forwarder.port, b"after"), b"after")
            self.assertFalse(sharer.done.done())
        self.run_async(main(), 60)

    # -- 8. a reconnecting sharer never meets its own old session ------------------
    def test_sharer_link_aborted_by_the_router_re_registers(self):
        async def main():
            router = await self.start_router(liveness_probe=10)
            target = await self.start_target(echo_handler)
            sharer = await self.start_sharer({"web": (LOCALHOST, target)}, backoff=(0.05, 0.2))
            forwarder = await self.start_forwarder("web", backoff=(0.05, 0.2))
            for attempt in range(3):
                start = len(self.watch.lines)
                for peer in list(router.peers):
                    peer.abort("test: dropped by the router")
                await self.watch.wait(r"^share: .*; retrying in", 10, start)
                await self.watch.wait(r"^sharing 'web' -> .*\(again\)$", 10, start)
            self.assertFalse(sharer.done.done())
            self.assertFalse([l for l in self.watch.lines if "already shared" in l])
            services = await list_services(router=self.router_address)
            self.assertEqual([s["name"] for s in services], ["web"])
            self.assertEqual(await self.through(forwarder.port, b"mine"), b"mine")
        self.run_async(main())

    def test_sharer_that_lost_its_link_takes_its_name_back_at_once(self):
        # The sharer finds its link dead (silence) while the router still holds the old
        # session, alive as far as it knows.  The sharer's reconnect must get the name back
        # by its owner key at once: not "already shared", and not after a liveness probe.
        keepalive, probe = 0.3, 30.0
        bound = (KEEPALIVE_SILENT_INTERVALS + 1) * keepalive + 10    # well under the probe

        async def main():
            router = await self.start_router(liveness_probe=probe)   # keepalive 20 s: unaware
            target = await self.start_target(echo_handler)
            relay = await SilentRelay(self, router.port).start()
            sharer = await self.client(Sharer, {"web": (LOCALHOST, target)}, router=relay.address,
                                       keepalive=keepalive, backoff=(0.05, 0.2))
            await sharer.wait_ready(10)
            forwarder = await self.start_forwarder("web")
            old = router.services["web"].peer
            start = len(self.watch.lines)
            relay.freeze()                                           # new connections pass
            await self.watch.wait(r"^sharing 'web' -> .*\(again\)$", bound, start)
            self.assertFalse(old.closing, "the router had already dropped the old session")
            self.assertIsNot(router.services["web"].peer, old)
            self.assertTrue(any("taken over" in l and "its sharer reconnected" in l
                                for l in self.watch.lines[start:]), self.watch.lines[start:])
            self.assertFalse([l for l in self.watch.lines if "already shared" in l])
            self.assertFalse(sharer.done.done())
            self.assertEqual(await self.through(forwarder.port, b"back"), b"back")
        self.run_async(main(), 60)

    def test_router_shutdown_lets_clients_reconnect_at_once(self):
        # "GOAWAY shutdown from the router lets clients reconnect at once": also a client
        # whose backoff grew during an earlier outage (a router restarted twice in a row).
        first_delay = 0.05
        gate = free_port_socket()          # the sharer's router address: refused for now
        self.addCleanup(gate.close)

        async def main():
            router = await self.start_router()
            target = await self.start_target(echo_handler)
            sharer = await self.client(Sharer, {"web": (LOCALHOST, target)},
                                       router="%s:%d" % gate.getsockname(),
                                       backoff=(first_delay, 8))
            start = 0
            for _ in range(3):                                       # an outage: 3 failures
                await self.watch.wait(r"^share: cannot reach the router", 10, start)
                start = self.watch.matched_at + 1
            await SilentRelay(self, router.port).start(sock=gate)   # the router is there
            await sharer.wait_ready(10)
            start = len(self.watch.lines)
            await router.close()                                     # ... and restarts
            restarted = Router(LOCALHOST, router.port)
            await restarted.start()
            self._async_cleanups.append(lambda: restarted.close(0))
            line = await self.watch.wait(r"^share: .*shutting down.*; retrying in [\d.]+ s$",
                                         10, start)
            delay = float(re.search(r"retrying in ([\d.]+) s$", line).group(1))
            self.assertLessEqual(delay, first_delay, line)
            await self.watch.wait(r"^sharing 'web' -> .*\(again\)$", 10, start)
            self.assertFalse(sharer.done.done())
        self.run_async(main())

    def test_a_bug_while_a_link_goes_down_is_said_and_the_client_still_reconnects(self):
        async def main():
            router = await self.start_router()
            target = await self.start_target(echo_handler)
            sharer = await self.client(Sharer, {"web": (LOCALHOST, target)},
                                       router=self.router_address, backoff=(0.05, 0.2))
            await sharer.wait_ready(10)

            def broken(link, reason):
                raise RuntimeError("a bug in link_down")
            sharer.link_down = broken
            start = len(self.watch.lines)
            for peer in list(router.peers):
                peer.abort("cut")                   # the router drops the sharer's link
            await self.watch.wait(r"^share: internal error: RuntimeError\('a bug in link_down'"
                                  r".*; reconnecting", 10, start)
            await self.watch.wait(r"^sharing 'web' -> .*\(again\)$", 10, start)
            self.assertFalse(sharer.done.done())
        self.run_async(main())

    # -- 5. connections that arrive while the router is away -----------------------
    def test_connection_waiting_for_the_router_goes_through_when_it_is_back(self):
        gate = free_port_socket()          # the forwarder's router address: refused for now
        self.addCleanup(gate.close)

        async def main():
            forwarder = await self.client(Forwarder, "web", LOCALHOST, 0,
                                          router="%s:%d" % gate.getsockname(), backoff=(0.05, 0.2))
            await self.watch.wait(r"^forward: cannot reach the router .*; retrying in", 10)
            reader, writer = await self.connect(forwarder.port)
            writer.write(b"request")
            writer.write_eof()
            # the router comes back, with the service on it
            router = await self.start_router()
            await self.start_sharer({"web": (LOCALHOST, await self.start_target(reply_handler))})
            await SilentRelay(self, router.port).start(sock=gate)   # the address answers again
            self.assertEqual(await read_reply(reader, 15), b"reply to request")
            self.assertFalse(forwarder.done.done())
        self.run_async(main())

    def test_connection_waiting_through_a_router_restart_reaches_a_sharer_that_reconnects_later(self):
        # The router comes back; the forwarder reconnects first and its sharer a moment
        # later (its own backoff).  The connection that waited through the outage must
        # still reach the service within pending_timeout, not be refused in between.
        reserved = free_port_socket()
        self.addCleanup(reserved.close)
        router_port = reserved.getsockname()[1]

        async def main():
            where = "%s:%d" % (LOCALHOST, router_port)
            forwarder = await self.client(Forwarder, "web", LOCALHOST, 0, router=where,
                                          backoff=(0.05, 0.2), pending_timeout=20)
            await self.watch.wait(r"^forward: cannot reach the router .*; retrying in", 10)
            reader, writer = await self.connect(forwarder.port)
            writer.write(b"request")
            writer.write_eof()
            reserved.close()
            router = Router(LOCALHOST, router_port)                  # the router is back
            await router.start()
            self._async_cleanups.append(lambda: router.close(0))
            await forwarder.wait_ready(10)
            target = await self.start_target(reply_handler)
            sharer = await self.client(Sharer, {"web": (LOCALHOST, target)}, router=where)
            await sharer.wait_ready(10)                              # and so is the service
            self.assertEqual(await read_reply(reader, 15), b"reply to request",
                             "the connection that waited for the router was closed; log:\n"
                             + "\n".join(self.watch.lines))
        self.run_async(main())

    def test_a_sharer_replaced_while_frozen_cannot_take_the_name_back(self):
        # A frozen sharer of a name without a secret loses it to one that asks while it does
        # not answer the liveness probe (with a secret it would not: TestNamesWithASecret).
        # Back, with its owner chain, it is refused (the replacement answers), and the
        # replacement keeps the name.
        async def main():
            router = await self.start_router(liveness_probe=0.3)
            target = await self.start_target(echo_handler)
            services = {"svc": (LOCALHOST, target)}
            relay = await SilentRelay(self, router.port).start()
            first = await self.client(Sharer, services, router=relay.address)
            await first.wait_ready(10)
            relay.freeze()                                      # silent, as if frozen
            second = await self.client(Sharer, services, router=self.router_address)
            await second.wait_ready(10)
            replaced = router.services["svc"]
            returning = Sharer(services, router=self.router_address)
            returning.owners = first.owners                     # the first process, back
            self._async_cleanups.append(lambda: returning.close(0))
            await returning.start()
            with self.assertRaises(PermanentError) as refused:
                await asyncio.wait_for(returning.done, 10)
            self.assertIn("'svc' is already shared", str(refused.exception))
            self.assertIs(router.services["svc"], replaced)
            self.assertEqual(replaced.peer.peer,
                             "%s:%d" % second.link.transport.get_extra_info("sockname")[:2])
            self.assertFalse(second.done.done())
        self.run_async(main())

    def test_connection_made_while_the_router_drains_waits_for_the_next_router(self):
        # A router shutting down lets open streams finish for its grace period, then resets
        # what is left.  A connection made after its GOAWAY must not be opened there (it
        # would be reset within seconds) but wait, and go through the restarted router.
        async def main():
            router = await self.start_router()
            target = await self.start_target(echo_handler)
            await self.client(Sharer, {"web": (LOCALHOST, target)}, router=self.router_address,
                              backoff=(0.05, 0.2))
            forwarder = await self.client(Forwarder, "web", LOCALHOST, 0,
                                          router=self.router_address, backoff=(0.05, 0.2))
            await forwarder.wait_ready(10)
            told = asyncio.Event()
            on_goaway = forwarder.link.dispatch[GOAWAY]
            forwarder.link.dispatch[GOAWAY] = lambda *args: (on_goaway(*args), told.set())
            early_reader, early = await self.connect(forwarder.port)    # open before: finishes
            early.write(b"a")
            self.assertEqual(await asyncio.wait_for(early_reader.readexactly(1), 10), b"a")

            closing = asyncio.ensure_future(router.close(grace=3))
            await asyncio.wait_for(told.wait(), 10)
            late_reader, late = await self.connect(forwarder.port)      # made during the drain
            late.write(b"b")
            early.close()
            await asyncio.wait_for(closing, 10)
            restarted = Router(LOCALHOST, router.port)
            await restarted.start()
            self._async_cleanups.append(lambda: restarted.close(0))
            self.assertEqual(await asyncio.wait_for(late_reader.readexactly(1), 15), b"b")
            late.write(b"c")
            late.write_eof()
            count, _, head = await read_to_end(late_reader, 10, keep=True)
            self.assertEqual((count, head), (1, b"c"))
        self.run_async(main())

    def test_waiting_connection_is_closed_when_pending_timeout_ends(self):
        dead = free_port_socket()          # the router never comes
        self.addCleanup(dead.close)
        pending = 0.6

        async def main():
            forwarder = await self.client(Forwarder, "web", LOCALHOST, 0,
                                          router="%s:%d" % dead.getsockname(),
                                          backoff=(0.05, 0.2), pending_timeout=pending)
            began = self.loop.time()
            quiet_reader, _quiet = await self.connect(forwarder.port)          # says nothing
            asking_reader, asking = await self.connect(forwarder.port)
            asking.write(b"GET / HTTP/1.0\r\n\r\n")                             # sends a request
            self.assertEqual(await read_until_closed(quiet_reader, pending + 5, drop=False), "eof")
            self.assertIn(await read_until_closed(asking_reader, pending + 5, drop=False),
                          ("eof", "reset"))
            self.assertGreaterEqual(self.loop.time() - began, pending - 0.1)    # they waited
            expired = [l for l in self.watch.lines if "closing a waiting connection" in l]
            self.assertEqual(len(expired), 2, self.watch.lines)
            self.assertFalse(forwarder.done.done())
            # still listening, and a new connection waits again
            reader, writer = await self.connect(forwarder.port)
            self.assertEqual(await read_until_closed(reader, pending + 5, drop=False), "eof")
        self.run_async(main())

    # -- 6. a hundred reconnects leak nothing ---------------------------------------
    def test_100_reconnect_cycles_leak_nothing(self):
        cycles, warmup = 100, 10

        async def main():
            router = await self.start_router()
            target = await self.start_target(echo_handler, track=False)
            sharer = await self.start_sharer({"web": (LOCALHOST, target)}, backoff=(0.001, 0.003))
            forwarder = await self.start_forwarder("web", backoff=(0.001, 0.003))
            clients = (sharer, forwarder)

            def linked(old):
                return (all(c.link is not None and c.link is not o and c.link_up.is_set()
                            and not c.link.closing for c, o in zip(clients, old))
                        and "web" in router.services and len(router.peers) == 2)

            def idle():
                return (router.open_streams == 0 and not sharer.link.streams
                        and not forwarder.link.streams)

            async def cycle(i):
                old = tuple(c.link for c in clients)
                for peer in list(router.peers):
                    peer.abort("test: cycle %d" % i)
                await wait_until(lambda: linked(old), 10,
                                 "both clients linked again (cycle %d)" % i)
                if i % 10 == 0:
                    reader, writer = await asyncio.open_connection(LOCALHOST, forwarder.port)
                    try:
                        writer.write(b"x")
                        writer.write_eof()
                        self.assertEqual(await asyncio.wait_for(reader.read(-1), 10), b"x")
                    finally:
                        writer.close()
                    await wait_until(idle, 10, "the stream of cycle %d to end everywhere" % i)

            fd_dir = "/proc/self/fd"

            def measure():
                del self.watch.lines[:]          # the test's own record of log lines
                gc.collect()
                return {"tasks": len([t for t in _all_tasks(self.loop) if not t.done()]),
                        "fds": len(os.listdir(fd_dir)) if os.path.isdir(fd_dir) else None,
                        "bytes": tracemalloc.get_traced_memory()[0]}

            # measured after cycles 10, 60 and 110: each of them pushed a byte through
            for i in range(1, warmup + 1):
                await cycle(i)
            before = measure()
            for i in range(warmup + 1, warmup + cycles // 2 + 1):
                await cycle(i)
            middle = measure()
            for i in range(warmup + cycles // 2 + 1, warmup + cycles + 1):
                await cycle(i)
            after = measure()

            self.assertEqual(after["tasks"], before["tasks"], (before, after))
            if before["fds"] is not None:
                self.assertLessEqual(after["fds"] - before["fds"], 2, (before, after))
            # a leak grows in both halves; allow a fixed slack, far below 1 kB a cycle
            slack = 48 * 1024
            self.assertLess(middle["bytes"] - before["bytes"], slack, (before, middle, after))
            self.assertLess(after["bytes"] - middle["bytes"], slack, (before, middle, after))
            self.assertEqual(sorted(router.services), ["web"])
            self.assertEqual(len(router.peers), 2)
            local = {"%s:%d" % c.link.transport.get_extra_info("sockname")[:2] for c in clients}
            self.assertEqual({p.peer for p in router.peers}, local)
            self.assertFalse(sharer.done.done())
            self.assertFalse(forwarder.done.done())

        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        self.run_async(main(), 120)


# ---------------------------------------------------------------------------
# 10b. Staying up: the command line
# ---------------------------------------------------------------------------

class TestStayingUpCommandLine(CommandLineMixin, unittest.TestCase):

    def open_stream(self, port):
        """A connection through the forwarder at `port` to an echo, surely open."""
        conn = socket.create_connection((LOCALHOST, port), timeout=20)
        self.addCleanup(conn.close)
        conn.sendall(b"echo\nopen?")
        self.assertEqual(recv_exactly(conn, 5), b"open?")
        return conn

    def start_tunnels(self, count, target_port, extra=()):
        """`count` separate router + share 'web' + forward trios, started side by side."""
        extra = list(extra)
        routers = [Proc(self, ["router", "--listen", "127.0.0.1:0"] + extra) for _ in range(count)]
        addresses = ["127.0.0.1:" + r.wait_line(r"router listening on 127\.0\.0\.1:(\d+)").group(1)
                     for r in routers]
        shares = [Proc(self, ["share", "web", "127.0.0.1:%d" % target_port, "--router", a] + extra)
                  for a in addresses]
        for share in shares:
            share.wait_line(r"sharing 'web' -> 127\.0\.0\.1:%d" % target_port)
        forwards = [Proc(self, ["forward", "web", "--router", a] + extra) for a in addresses]
        ports = [int(f.wait_line(r"forwarding 127\.0\.0\.1:(\d+) -> 'web'").group(1))
                 for f in forwards]
        return [{"router": r, "share": s, "forward": f, "port": p, "address": a}
                for r, s, f, p, a in zip(routers, shares, forwards, ports, addresses)]

    def finish_within(self, proc, timeout):
        try:
            return proc.finish(timeout)
        except subprocess.TimeoutExpired:
            self.fail("%s still running %s s later; stderr:\n%s"
                      % (" ".join(proc.argv[2:]), timeout, "\n".join(proc.lines)))

    def mid_transfer(self):
        """Router, sharer and forwarder processes, and a download running through them:
        (target, router, its address, share, forward, forward's port, the connection)."""
        target = ThreadedServer(self, push_or_echo)
        router, address = self.start_router()
        share = self.start_share("web", target.port, address)
        forward, port = self.start_forward("web", address)
        conn = socket.create_connection((LOCALHOST, port), timeout=20)
        self.addCleanup(conn.close)
        conn.sendall(b"push\n")
        self.assertGreaterEqual(recv_at_least(conn, MB), MB)
        return target, router, address, share, forward, port, conn

    # -- 1. the router dies ----------------------------------------------------------
    def test_router_killed_mid_transfer_then_restarted_on_its_port(self):
        target, router, address, share, forward, port, conn = self.mid_transfer()

        router.p.kill()
        router.p.wait(10)
        self.assertIn(recv_until_closed(conn, 5), ("eof", "reset"))     # promptly
        share.wait_line(r"share: .*; retrying in [\d.]+ s$")
        forward.wait_line(r"forward: .*; retrying in [\d.]+ s$")

        again = Proc(self, ["router", "--listen", address])           # same address and port
        again.wait_line(r"router listening on %s$" % re.escape(address))
        share.wait_line(r"sharing 'web' -> 127\.0\.0\.1:%d through the router at %s \(again\)$"
                        % (target.port, re.escape(address)), timeout=40)
        payload = os.urandom(512 * 1024)
        self.assertEqual(exchange(port, payload, prefix=b"echo\n", first=b"!"), b"!" + payload)
        self.assertTrue(share.running() and forward.running())
        assert_clean_output(share.lines + forward.lines)

    # -- 2. the sharer dies ----------------------------------------------------------
    def test_sharer_killed_mid_transfer_then_restarted(self):
        target, router, address, share, forward, port, conn = self.mid_transfer()

        share.p.kill()
        share.p.wait(10)
        self.assertIn(recv_until_closed(conn, 5), ("eof", "reset"))
        again = self.start_share("web", target.port, address)       # a new process, same name
        self.assertFalse([l for l in again.lines if "already shared" in l], again.lines)
        payload = os.urandom(512 * 1024)
        self.assertEqual(exchange(port, payload, prefix=b"echo\n", first=b"!"), b"!" + payload)
        self.assertTrue(forward.running() and again.running())
        rows = list_rows(run_cli("list", "--router", address).out)
        self.assertEqual([r[0] for r in rows[1:]], ["web"])

    # -- 4. signals ----------------------------------------------------------------
    def three_tunnels_with_a_stream_each(self, grace):
        """Three tunnels with --grace, one stream open through each: (tunnels, [(the role
        to signal, its tunnel)], {role: that stream's connection})."""
        target = ThreadedServer(self, push_or_echo)
        tunnels = self.start_tunnels(3, target.port, ["--grace", "%g" % grace])
        cases = [("forward", tunnels[0]), ("share", tunnels[1]), ("router", tunnels[2])]
        return tunnels, cases, {role: self.open_stream(tunnel["port"]) for role, tunnel in cases}

    def test_sigterm_with_an_open_stream_exits_0_within_the_grace(self):
        grace = 1.0
        tunnels, cases, conns = self.three_tunnels_with_a_stream_each(grace)
        began = {}
        for role, tunnel in cases:
            began[role] = time.monotonic()
            tunnel[role].p.send_signal(signal.SIGTERM)
        for role, tunnel in cases:
            with self.subTest(role=role):
                self.assertIn(recv_until_closed(conns[role], grace + 10), ("eof", "reset"))
                code, lines = self.finish_within(tunnel[role], grace + 10)
                took = time.monotonic() - began[role]
                self.assertEqual(code, 0, lines)
                self.assertLess(took, grace + 5, lines)
                self.assertTrue(any("shutting down" in l for l in lines), lines)
                assert_clean_output(lines)
        # the router said why it went (GOAWAY): its clients name it as they retry
        for role in ("share", "forward"):
            with self.subTest(client_of_the_router=role):
                tunnels[2][role].wait_line(r"%s: .*shutting down.*; retrying in" % role)

    def test_second_signal_exits_at_once(self):
        grace = 30.0
        tunnels, cases, conns = self.three_tunnels_with_a_stream_each(grace)
        for role, tunnel in cases:
            tunnel[role].p.send_signal(signal.SIGTERM)
        for role, tunnel in cases:
            tunnel[role].wait_line(r"shutting down")
            conns[role].sendall(b"still")                            # held by the grace
            self.assertEqual(recv_exactly(conns[role], 5), b"still")
        began = time.monotonic()
        for role, tunnel in cases:
            tunnel[role].p.send_signal(signal.SIGTERM)
        for role, tunnel in cases:
            with self.subTest(role=role):
                code, lines = self.finish_within(tunnel[role], 10)
                self.assertLess(time.monotonic() - began, 10)        # not the 30 s grace
                assert_clean_output(lines)

    def test_sharer_in_its_grace_takes_no_new_streams(self):
        # SIGTERM: "stop accepting, GOAWAY to peers, then up to --grace for open streams".
        # A sharer in its grace keeps serving the open stream, but its name is released
        # and new connections are not dialled to it.
        target = ThreadedServer(self, push_or_echo)
        router, address = self.start_router()
        share = self.start_share("web", target.port, address, extra=["--grace", "5"])
        forward, port = self.start_forward("web", address)
        conn = self.open_stream(port)
        share.p.send_signal(signal.SIGTERM)
        share.wait_line(r"shutting down")
        conn.sendall(b"still")
        self.assertEqual(recv_exactly(conn, 5), b"still")           # the open stream lives on
        with self.subTest("a new connection is not served by the stopping sharer"):
            with socket.create_connection((LOCALHOST, port), timeout=20) as late:
                late.sendall(b"echo\nlate?")
                late.settimeout(3)
                try:
                    answer = late.recv(100)
                except socket.timeout:
                    answer = "no answer in 3 s"
                except ConnectionResetError:
                    answer = b""
                self.assertEqual(answer, b"")
        with self.subTest("its name is released"):
            rows = list_rows(run_cli("list", "--router", address).out)
            self.assertEqual([r[0] for r in rows[1:]], [])

    # -- 7. giving up ---------------------------------------------------------------
    def test_max_retries_gives_up_with_one_line(self):
        dead = free_port_socket()                   # bound, not listening: refused
        self.addCleanup(dead.close)
        address = "127.0.0.1:%d" % dead.getsockname()[1]
        runs = [("share", 2, Proc(self, ["share", "web", "80", "--router", address,
                                         "--max-retries", "2"])),
                ("forward", 1, Proc(self, ["forward", "web", "--router", address,
                                           "--max-retries", "1"]))]
        began = time.monotonic()
        for command, retries, proc in runs:
            with self.subTest(command=command):
                code, lines = self.finish_within(proc, 20)
                self.assertEqual(code, 1, lines)
                self.assertLess(time.monotonic() - began, 15, lines)
                retried = [l for l in lines if re.search(r"%s: .*; retrying in [\d.]+ s$" % command, l)]
                self.assertEqual(len(retried), retries, lines)
                gave_up = [l for l in lines if "giving up" in l]
                self.assertEqual(len(gave_up), 1, lines)
                self.assertEqual(gave_up[0], lines[-1])
                self.assertTrue(gave_up[0].startswith("mindmeld %s: error: cannot reach the "
                                                      "router at %s" % (command, address)), lines)
                assert_clean_output(lines)



# ---------------------------------------------------------------------------
# 11. Security: a fixed certificate, processes with their own state
# ---------------------------------------------------------------------------

# A fixed router certificate (mindmeld.make_self_signed_cert("localhost"), valid from
# 2024-01-01 to 2043-12-28; SANs localhost, 127.0.0.1, ::1), used through
# --tls-cert/--tls-key so that most TLS tests pay nothing for key generation.
FIXED_CERT_PEM = """\
-----BEGIN CERTIFICATE-----
MIIDRTCCAi2gAwIBAgIQYmoZ3WYBfuKyL69a3NvGOzANBgkqhkiG9w0BAQsFADAU
MRIwEAYDVQQDEwlsb2NhbGhvc3QwHhcNMjQwMTAxMDAwMDAwWhcNNDMxMjI4MDAw
MDAwWjAUMRIwEAYDVQQDEwlsb2NhbGhvc3QwggEiMA0GCSqGSIb3DQEBAQUAA4IB
DwAwggEKAoIBAQDiNHABy5p7uOmqQS+r+C6wi4orOVO4Nq5kdaD0obdpZkONxsz9
PmferR8EQUoGvN2JEEJtwTXxGNYt4FNuo7Tgtz1mdIejNI5D4uyFwagjtCijM0ns
AFtzueXLWHxF1C591GOiCCAdb+pLdOvImgY8S7Mnr6DPJwGCLnzw386Oimmj8btL
y18PZWkCEk7qjcSclTB7ZIQdHuElL018v+a3oa21cAC4h2XMFr5BfH8JZvHs1sez
IQ/fD/kxQ86grkdtYVWsAzhiL/JFjjhZ7M2yH5zt/uJZniTFN+Hs2XWjVfXSXNbv
JdSle99X9eXzKYU+wJSeto3AfMXzb/8ljxY5AgMBAAGjgZIwgY8wDwYDVR0TAQH/
BAUwAwEB/zAOBgNVHQ8BAf8EBAMCAoQwLAYDVR0RBCUwI4IJbG9jYWxob3N0hwR/
AAABhxAAAAAAAAAAAAAAAAAAAAABMB0GA1UdDgQWBBQgX+6s57LtAOfHXKUV8WO4
bIDF1TAfBgNVHSMEGDAWgBQgX+6s57LtAOfHXKUV8WO4bIDF1TANBgkqhkiG9w0B
AQsFAAOCAQEAp8+8eIHTqSYbvpjesqXFW4jS4O5ar+vYkn9y+TOPAaKE6zO7tq6A
enEmWj+kWo4pKmI6To6UezKEIMg7VjsvqlUsIzvUXsecfZTujntZQCpK5+toUw22
maVKnZ+pnBcd+Pf9P0j5CPHfR04cMLRcVN49Qgtyn3UOmUBHNP78T2p6gVhroDNu
yW7eO9Mi48oPNvcHCEEF7+W9mkl0QUgz+rqBI6W49U+/BtIO0a2qLSv96opdioqV
i71D1HZHXVDQDdT+cel7Z+PVVWc6pWktppIwmRGP1c2NZu3LYcqHZJPQcaCzUSI/
12qng0lPepdUfk1wY6Mr02KUQpeql1b27g==
-----END CERTIFICATE-----
"""
FIXED_KEY_PEM = """\
-----BEGIN RSA PRIVATE KEY-----
MIIEpQIBAAKCAQEA4jRwAcuae7jpqkEvq/gusIuKKzlTuDauZHWg9KG3aWZDjcbM
/T5n3q0fBEFKBrzdiRBCbcE18RjWLeBTbqO04Lc9ZnSHozSOQ+LshcGoI7QoozNJ
7ABbc7nly1h8RdQufdRjogggHW/qS3TryJoGPEuzJ6+gzycBgi588N/Ojoppo/G7
S8tfD2VpAhJO6o3EnJUwe2SEHR7hJS9NfL/mt6GttXAAuIdlzBa+QXx/CWbx7NbH
syEP3w/5MUPOoK5HbWFVrAM4Yi/yRY44WezNsh+c7f7iWZ4kxTfh7Nl1o1X10lzW
7yXUpXvfV/Xl8ymFPsCUnraNwHzF82//JY8WOQIDAQABAoIBAAhePK9pppa25kbp
Om8ipQzcsfrxJjHwLM72JbTY2j3sYwJ9582qGAPTgQx16k3RD7gZAXFwp3hsR65S
yiboxM4CeVxZYlsrRwDulJef7J8a1/mRnJroqkCKnqqIcwXOvBmQAzMdirm2ubu3
Gc5UNiJlyL0fjUWcj8sO3hhiNkmJWbWRbdB+qPnX1EdT/8yZaXvA/IH8m62MGvTZ
dnoifiIF3YqT/LRiVO4kOr/wI2i+Hy7kCG9foTEhOZCJOZgqFVf4K6iVrwknvwMx
9/fKhISpC35Meww1KOx9/noGXPSxfAo8qb+FpiOCt1tSL4WF8IOg5/J6fJWcZcaZ
fOX/u7ECgYEA6gHB9kipL1tyVGcfq2FW3Dqi2d1uMW5yutmuXtUmttaVtrudLsFz
mrlR6ArHeKLsmhEv7ghvS5Ptbq4BpHTCpT8UPieepgz6XnLeYx26Xkvjb8aAjP7a
+b7r7xP9VABEFmAUqGpYgOYBrr31BCpi2znnFwf8jTziFnxixpSJau8CgYEA93b2
NJhRqhayqDGD1jQY70CBuh86kf9F7lkdp11M8gTCnPcgwHfcCwj6nh2HkohLC9G9
EneU2HCcafILvH3Yp9SNkLP6dRPfEZydSlNyOfySmqm5sp/eFHb+n7usyxrbi4Ti
uMza/vb/lslVSheane7sorpe3sLy+jxTqwjcMVcCgYEAq9e0l2bOj09pSyAbuqAV
yE5rDvC0HirMp/h5O3zuHDDC6tkl2ZMIkSPsSSm5SBblB1L9zqB1EpxELRYtcJap
5e3HsMkpkSlQpxFVzJWlKeAy2f98oY36QpL48a3NR+WWGpReNzs5WRcPP0KR7ogt
5m3EDT65MQL3yKl5Y/jqXRMCgYEAgx3A7bUW7+v+1ScHF2ObIoknMxqAygJbZyJI
l/jTYBgtlUVLUS8wo5gqUcSLpJQaTzTd3P8HGnbwKSJaHZEATkxMhbMWrRnOQ2Kb
5Fm6WAb/Fnt/LKmP3X//AVtK/oJIeO/7wLaqAhWU7qvWSN+gyLVjJAVjZtwcKYH1
QtX69RkCgYEAp+u60kz/xXP739GZocyPeghIT9gjE2enoLErdmsEGJS8F6mJsoAb
4RVMLnaIBnvZhxaVdfx+1JytEIpNo8DfF8yDGCXGTB1c3xyHSwUQS4kEm9wy1naQ
fd9GLnZQ/wXKa2U6c404g6RNO4zDgW+3TA6S7EvmgIamrf7keh2iv3I=
-----END RSA PRIVATE KEY-----
"""

FINGERPRINT_RE = r"router TLS certificate SHA256 fingerprint: ((?:[0-9A-F]{2}:){31}[0-9A-F]{2})$"


def write_file(path, text, mode=0o600):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(text.encode() if isinstance(text, str) else text)
    return path


def pem_fingerprint(pem):
    """SHA-256 of a PEM certificate's DER as 'AB:CD:...', computed without mindmeld."""
    der = ssl.PEM_cert_to_DER_cert(pem.decode() if isinstance(pem, bytes) else pem)
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def hex_digits(fingerprint):
    return fingerprint.replace(":", "").lower()


def mentions(line, address):
    """Does a log line name this exact HOST:PORT (not a longer port that starts the same)?"""
    return re.search(re.escape(address) + r"(?!\d)", line) is not None


class SecurityCommandLine(CommandLineMixin):
    """Command-line processes with their state (known_routers, certificates) in a temporary
    directory, never in ~/.config; several short commands run at once to save time."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="mindmeld-security-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.state = os.path.join(self.tmp, "state")
        self.env = cli_env(MINDMELD_STATE_DIR=self.state)

    def env_with(self, **extra):
        env = dict(self.env)
        env.update(extra)
        return env

    def router(self, *extra, env=None, listen="127.0.0.1:0"):
        proc = Proc(self, ["router", "--listen", listen] + list(extra), env=env or self.env)
        port = int(proc.wait_line(r"router listening on 127\.0\.0\.1:(\d+)").group(1))
        return proc, "127.0.0.1:%d" % port

    def tls_router(self, cert, key, listen="127.0.0.1:0"):
        """A router with --tls-cert/--tls-key: (process, address, the fingerprint it printed)."""
        proc, address = self.router("--tls-cert", cert, "--tls-key", key, listen=listen)
        printed = [m.group(1) for m in (re.search(FINGERPRINT_RE, l) for l in proc.lines) if m]
        self.assertEqual(len(printed), 1, proc.lines)
        return proc, address, printed[0]

    def share(self, name, target_port, router, *extra, env=None):
        proc = Proc(self, ["share", name, "127.0.0.1:%d" % target_port, "--router", router]
                    + list(extra), env=env or self.env)
        proc.wait_line(r"sharing '%s' -> 127\.0\.0\.1:%d" % (re.escape(name), target_port))
        return proc

    def start_forward(self, name, router, *extra, env=None):
        return Proc(self, ["forward", name, "--router", router] + list(extra), env=env or self.env)

    def forward_port(self, proc, name):
        return int(proc.wait_line(r"forwarding 127\.0\.0\.1:(\d+) -> '%s'" % re.escape(name)).group(1))

    def forward(self, name, router, *extra, env=None):
        proc = self.start_forward(name, router, *extra, env=env)
        return proc, self.forward_port(proc, name)

    def run_many(self, commands, timeout=10):
        """Run short commands at once: [Ran(exit code, stdout, stderr text)], in order.

        Each is (args) or (args, env) or (args, env, stdin bytes).  A command still
        running after `timeout` seconds fails the test (a retry loop, a hang)."""
        started = []
        for command in commands:
            args, env, data = (list(command) + [None, None])[:3] if isinstance(command, tuple) \
                else (command, None, None)
            proc = subprocess.Popen(cli_argv(args), cwd=HERE, env=env or self.env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    stdin=subprocess.PIPE if data is not None else subprocess.DEVNULL)
            started.append((args, proc, data, time.monotonic()))
        results, late = [], []
        for args, proc, data, began in started:
            try:
                out, err = proc.communicate(data, timeout=max(0.1, began + timeout - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
                late.append(" ".join(args))
            results.append(Ran(proc.returncode, out, err.decode("utf-8", "replace")))
        self.assertEqual(late, [], "still running after %s s" % timeout)
        return results


class TlsFiles:
    """The fixed certificate, and one made once per class for 'another router'."""

    @classmethod
    def make_tls_files(cls, other=True):
        cls.files = tempfile.mkdtemp(prefix="mindmeld-tls-")
        cls.cert = write_file(os.path.join(cls.files, "cert.pem"), FIXED_CERT_PEM, 0o644)
        cls.key = write_file(os.path.join(cls.files, "key.pem"), FIXED_KEY_PEM, 0o600)
        cls.fingerprint = pem_fingerprint(FIXED_CERT_PEM)
        if other:
            cert_pem, key_pem = mindmeld.make_self_signed_cert("another-router")
            cls.other_cert = write_file(os.path.join(cls.files, "other-cert.pem"), cert_pem, 0o644)
            cls.other_key = write_file(os.path.join(cls.files, "other-key.pem"), key_pem, 0o600)
            cls.other_fingerprint = pem_fingerprint(cert_pem)

    @classmethod
    def remove_tls_files(cls):
        shutil.rmtree(cls.files, True)


# ---------------------------------------------------------------------------
# 11a. TLS from the command line
# ---------------------------------------------------------------------------

class TestTlsCommandLine(SecurityCommandLine, TlsFiles, unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.make_tls_files()

    @classmethod
    def tearDownClass(cls):
        cls.remove_tls_files()

    def test_router_makes_its_certificate_once_and_reuses_it(self):
        state = os.path.join(self.tmp, "router-state")           # does not exist yet
        first, address = self.router("--tls", "--state-dir", state)
        printed = [m.group(1) for m in (re.search(FINGERPRINT_RE, l) for l in first.lines) if m]
        self.assertEqual(len(printed), 1, first.lines)
        fingerprint = printed[0]
        files = {name: read_bytes(os.path.join(state, name)) for name in os.listdir(state)}
        keys = [n for n, data in files.items() if b"PRIVATE KEY-----" in data]
        certs = [n for n, data in files.items() if b"BEGIN CERTIFICATE-----" in data]
        self.assertEqual((len(keys), len(certs), len(files)), (1, 1, 2), sorted(files))
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(state, keys[0])).st_mode), 0o600)
        self.assertEqual(pem_fingerprint(files[certs[0]]), fingerprint)   # it printed its own
        listing = self.run_many([["list", "--router", address, "--tls-fingerprint", fingerprint]])[0]
        self.assertEqual((listing[0], listing[2]), (0, ""))
        self.assertTrue(listing[1].startswith(b"NAME"), listing[1])
        code, lines = first.signal(signal.SIGTERM)
        self.assertEqual(code, 0, lines)

        # The next start, the state directory given by the environment this time: same pair
        second, address = self.router("--tls", env=cli_env(MINDMELD_STATE_DIR=state))
        again = [m.group(1) for m in (re.search(FINGERPRINT_RE, l) for l in second.lines) if m]
        self.assertEqual(again, [fingerprint], second.lines)
        self.assertEqual({n: read_bytes(os.path.join(state, n)) for n in os.listdir(state)},
                         files)
        listing = self.run_many([["list", "--router", address, "--tls-fingerprint", fingerprint]])[0]
        self.assertEqual((listing[0], listing[2]), (0, ""))

    def test_pinned_fingerprint_is_accepted_and_a_wrong_one_refused(self):
        router, address, printed = self.tls_router(self.cert, self.key)
        self.assertEqual(printed, self.fingerprint)
        wrong = self.other_fingerprint
        as_printed, bare, refused = self.run_many([
            ["list", "--router", address, "--tls-fingerprint", printed],
            ["list", "--router", address, "--tls-fingerprint", hex_digits(printed)],
            ["list", "--router", address, "--tls-fingerprint", wrong],
        ])
        for result in (as_printed, bare):
            self.assertEqual((result[0], result[2]), (0, ""))
            self.assertTrue(result[1].startswith(b"NAME"), result[1])
        self.assert_one_error_line(refused, "list", address, printed, wrong)

        # A whole tunnel through the TLS router, both ends pinned (as printed, and bare)
        target = ThreadedServer(self, blocking_echo)
        self.share("pinned", target.port, address, "--tls-fingerprint", hex_digits(printed).upper())
        _forward, port = self.forward("pinned", address, "--tls-fingerprint", printed.lower())
        payload = os.urandom(MB)
        self.assertEqual(exchange(port, payload), payload)

    def test_ca_file_verifies_by_address_and_by_name_and_insecure_warns(self):
        router, address, _printed = self.tls_router(self.cert, self.key)
        port = address.rsplit(":", 1)[1]
        by_ip, by_name, wrong_ca, insecure = self.run_many([
            ["list", "--router", "127.0.0.1:" + port, "--tls-ca", self.cert],
            ["list", "--router", "localhost:" + port, "--tls-ca", self.cert],
            ["list", "--router", address, "--tls-ca", self.other_cert],
            ["list", "--router", address, "--tls-insecure"],
        ])
        for result in (by_ip, by_name):
            self.assertEqual((result[0], result[2]), (0, ""))
            self.assertTrue(result[1].startswith(b"NAME"), result[1])
        self.assert_one_error_line(wrong_ca, "list", address, "certificate")
        self.assertEqual(insecure[0], 0, insecure[2])
        self.assertTrue(insecure[1].startswith(b"NAME"), insecure[1])
        warnings = insecure[2].splitlines()
        self.assertEqual(len(warnings), 1, insecure[2])
        self.assertIn("--tls-insecure", warnings[0])
        self.assertIn("not checked", warnings[0].lower())
        # A CA that does not match is an error, never a silent fall-back to trust on first use
        self.assertFalse(os.path.exists(os.path.join(self.state, "known_routers")))

    def test_trust_on_first_use_then_a_changed_certificate_is_refused(self):
        router, address, fingerprint = self.tls_router(self.cert, self.key)
        known = os.path.join(self.state, "known_routers")
        first, = self.run_many([["list", "--router", address, "--tls"]])
        self.assertEqual(first[0], 0, first[2])
        lines = first[2].splitlines()
        self.assertEqual(len(lines), 1, first[2])
        for needle in ("first use", address, fingerprint, known):
            self.assertIn(needle, lines[0])
        with open(known) as f:
            recorded = [line.split() for line in f if line.strip()]
        self.assertEqual([(r[0], hex_digits(r[1])) for r in recorded],
                         [(address, hex_digits(fingerprint))])
        before = read_bytes(known)

        again, = self.run_many([["list", "--router", address, "--tls"]])
        self.assertEqual((again[0], again[2]), (0, ""))            # known now: nothing to say

        # Another certificate at the same address: refused, by list and by share alike
        code, lines = router.signal(signal.SIGTERM)
        self.assertEqual(code, 0, lines)
        # the client's first, verified attempt ends in an alert; that is not the router's problem
        self.assertEqual([line for line in lines if "TLS handshake" in line], [])
        self.router("--tls-cert", self.other_cert, "--tls-key", self.other_key, listen=address)
        listing, share = self.run_many([
            ["list", "--router", address, "--tls"],
            ["share", "web", "1", "--router", address, "--tls"],
        ])
        for result, command in ((listing, "list"), (share, "share")):
            self.assert_one_error_line(result, command, address, fingerprint,
                                       self.other_fingerprint, known)
        self.assertEqual(read_bytes(known), before)

    def test_plain_and_tls_mismatches_say_so(self):
        plain, plain_address = self.router()
        tls, tls_address, fingerprint = self.tls_router(self.cert, self.key)
        plain_to_tls, tls_to_plain = self.run_many([
            ["list", "--router", tls_address],
            ["list", "--router", plain_address, "--tls-fingerprint", fingerprint],
        ])
        self.assert_one_error_line(plain_to_tls, "list", "--tls")
        self.assert_one_error_line(tls_to_plain, "list", "TLS")
        # share and forward may retry, but say why
        share = Proc(self, ["share", "web", "1", "--router", tls_address], env=self.env)
        forward = self.start_forward("web", plain_address, "--tls-fingerprint", fingerprint)
        self.assertIn("--tls", share.wait_line(r"TLS").string)
        self.assertIn("TLS", forward.wait_line(r"TLS").string)
        self.assertTrue(mentions(plain.wait_line(r"TLS").string, "127.0.0.1"))
        refusal = tls.wait_line(r"failed the TLS handshake").string
        self.assertTrue(mentions(refusal, "127.0.0.1") and "--tls" in refusal, refusal)


# ---------------------------------------------------------------------------
# 11b. The router's token
# ---------------------------------------------------------------------------

class TestRouterToken(SecurityCommandLine, unittest.TestCase):

    def test_token_from_a_file_or_the_environment_lets_peers_in(self):
        token = "tok-" + os.urandom(12).hex()
        token_file = write_file(os.path.join(self.tmp, "token"), token + "\n")
        router, address = self.router("-v", "--token-file", token_file)
        target = ThreadedServer(self, blocking_echo)
        share = self.share("tokweb", target.port, address, "--token-file", token_file)
        forward, port = self.forward("tokweb", address, env=self.env_with(MINDMELD_TOKEN=token))
        payload = os.urandom(256 * 1024)
        self.assertEqual(exchange(port, payload), payload)
        listing, = self.run_many([["list", "--router", address, "--token", token]])
        self.assertEqual(listing[0], 0, listing[2])
        self.assertEqual([row[0] for row in list_rows(listing[1])[1:]], ["tokweb"])

        seen = [listing[1].decode(), listing[2]]
        for proc in (forward, share, router):
            code, lines = proc.signal(signal.SIGTERM)
            self.assertEqual(code, 0, lines)
            self.assertNotIn(token, " ".join(proc.argv))             # not in `ps` either
            seen += lines + [l for l in proc.stdout if l is not None]
        self.assertFalse([l for l in seen if token in l])

    def test_wrong_or_missing_token_is_refused_at_once_and_logged(self):
        token, wrong = "tok-" + os.urandom(12).hex(), "bad-" + os.urandom(12).hex()
        router, address = self.router(env=self.env_with(MINDMELD_TOKEN=token))
        outputs = []
        for case, extra in (("wrong token", ["--token", wrong]), ("no token", [])):
            with self.subTest(case=case):
                results = self.run_many([
                    ["list", "--router", address] + extra,
                    ["share", "tw", "1", "--router", address] + extra,
                    ["forward", "tw", "--router", address] + extra,
                ])
                for result, command in zip(results, ("list", "share", "forward")):
                    self.assert_one_error_line(result, command, address, "token")
                    self.assertNotIn("retrying", result[2])
                    outputs += [result[1].decode(), result[2]]
                for _ in results:      # one line each, with the peer's address
                    router.wait_line(r"127\.0\.0\.1:\d+\D.*token", timeout=3)
        code, lines = router.signal(signal.SIGTERM)
        self.assertEqual(code, 0, lines)
        self.assertEqual(len([l for l in lines if re.search(r"127\.0\.0\.1:\d+\D.*token", l)]), 6,
                         lines)
        outputs += lines + [l for l in router.stdout if l is not None]
        self.assertFalse([l for l in outputs if token in l or wrong in l])


# ---------------------------------------------------------------------------
# 11c. Service secrets
# ---------------------------------------------------------------------------

def tag_handler(tag):
    """A target that says who it is, then echoes."""
    def handler(conn):
        conn.sendall(tag)
        blocking_echo(conn)
    return handler


def first_byte_or_close(port, timeout=5.0):
    """Connect, send a little, return the first byte or 'eof'/'reset' (fails after timeout)."""
    try:
        conn = socket.create_connection((LOCALHOST, port), timeout=timeout)
    except ConnectionResetError:                # reset before connect() even returned
        return "reset"
    with conn:
        try:
            conn.sendall(b"hello?")             # the reset may come back at once
            data = conn.recv(1)
        except (ConnectionResetError, BrokenPipeError):
            return "reset"
        except socket.timeout:
            raise AssertionError("the connection was neither answered nor closed in %s s" % timeout)
        return data or "eof"


class TestEndToEndCommandLine(SecurityCommandLine, unittest.TestCase):
    """--secret from the command line: what a user sees when the pairing is lost, guessed
    at, or missing on one side."""

    def test_a_restarted_sharer_is_paired_again_without_the_user_noticing(self):
        router, address = self.router()
        target = ThreadedServer(self, tag_handler(b"T"))
        env = self.env_with(MINDMELD_SECRET="open sesame")
        first = self.share("vault", target.port, address, env=env)
        forward, port = self.forward("vault", address, "-v", env=env)
        self.assertIn("streams are encrypted end to end", forward.lines[-1])
        payload = os.urandom(256 * 1024)
        self.assertEqual(exchange(port, payload), b"T" + payload)
        self.assertEqual(exchange(port, b"resumed"), b"Tresumed")  # the TLS session of the first
        forward.wait_line(r"TLS session resumed")
        self.assertEqual(first.signal(signal.SIGTERM)[0], 0)
        self.share("vault", target.port, address, env=env)     # knows none of the old pairings,
        self.assertEqual(exchange(port, payload), b"T" + payload)   # nor the old session
        self.assertEqual(exchange(port, b"again"), b"Tagain")
        code, lines = forward.signal(signal.SIGTERM)
        self.assertEqual(code, 0)
        self.assertEqual(len([l for l in lines if "TLS session resumed" in l]), 2, lines)
        self.assertFalse([l for l in lines if "could not prove" in l or "refused" in l], lines)

    def test_a_burst_of_first_connections_pairs_once(self):
        """Forty connections at once to a forwarder that has not paired yet: one pairs, the
        rest wait for it (the sharer allows E2E_PAIRINGS_PENDING pairings under way)."""
        router, address = self.router()
        target = ThreadedServer(self, tag_handler(b"T"))
        env = self.env_with(MINDMELD_SECRET="open sesame")
        self.share("vault", target.port, address, env=env)
        forward, port = self.forward("vault", address, env=env)
        results = [None] * 40

        def one(i):
            try:
                results[i] = exchange(port, b"%d" % i, timeout=20)
            except OSError as exc:
                results[i] = exc
        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(results))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        self.assertEqual(results, [b"T%d" % i for i in range(len(results))])

    def test_guessing_is_limited_and_paired_forwarders_go_on(self):
        router, address = self.router()
        target = ThreadedServer(self, tag_handler(b"T"))
        share = self.share("vault", target.port, address, env=self.env_with(MINDMELD_SECRET="right"))
        _forward, port = self.forward("vault", address, env=self.env_with(MINDMELD_SECRET="right"))
        self.assertEqual(exchange(port, b"x"), b"Tx")              # paired before the guessing
        guess = (["connect", "vault", "--router", address], self.env_with(MINDMELD_SECRET="guess"), b"")
        for result in self.run_many([guess] * mindmeld.E2E_FAILURES_PER_MINUTE, timeout=20):
            self.assert_one_error_line(result, "connect", "the sharer of 'vault' could not prove the secret")
        over = self.run_many([guess])[0]
        self.assert_one_error_line(over, "connect", "too many failed attempts at the secret of 'vault'; "
                                                    "try again in a minute")
        self.assertEqual(exchange(port, b"y"), b"Ty")              # its pairing still works
        code, lines = share.signal(signal.SIGTERM)
        self.assertEqual(code, 0)
        failures = [l for l in lines if "failed to prove the secret" in l]
        self.assertEqual(len(failures), 1, lines)                  # then a count, once a minute
        self.assertIn("share: 'vault': a stream failed to prove the secret", failures[0])

    def test_a_secret_on_the_forwarder_only_sends_nothing(self):
        received = []

        def recording(conn):
            received.append(conn.recv(100))
            conn.sendall(received[-1])
        router, address = self.router()
        target = ThreadedServer(self, recording)
        self.share("plain", target.port, address)
        forward, port = self.forward("plain", address, env=self.env_with(MINDMELD_SECRET="s"))
        self.assertIn(first_byte_or_close(port), ("eof", "reset"))
        line = forward.wait_line(r"refused").string
        self.assertIn("forward: connection to 'plain' refused: service 'plain' has no secret, so its "
                      "streams cannot be encrypted end to end: drop --secret, or share it with --secret", line)
        self.assertEqual(exchange(self.forward("plain", address)[1], b"plain"), b"plain")  # the control
        self.assertEqual(received, [b"plain"])                     # and only the control got in

    def test_a_squatter_after_a_router_restart(self):
        """A router restarted while its sharer was away: a stranger with a guessed secret
        registers the name first.  Forwarders say the sharer could not prove the secret; the
        rightful sharer says once that its name is held, and gets it back when it is free."""
        router, address = self.router()
        target = ThreadedServer(self, tag_handler(b"T"))
        squatted = ThreadedServer(self, tag_handler(b"S"))
        env = self.env_with(MINDMELD_SECRET="open sesame")
        rightful = self.share("vault", target.port, address, env=env)
        rightful.p.send_signal(signal.SIGSTOP)
        self.addCleanup(lambda: rightful.running() and rightful.p.send_signal(signal.SIGCONT))
        router.p.kill()
        router.finish()
        router, _ = self.router(listen=address)             # the same port, an empty registry
        squatter = self.share("vault", squatted.port, address, env=self.env_with(MINDMELD_SECRET="guess"))
        rightful.p.send_signal(signal.SIGCONT)
        rightful.wait_line(r"share: the name 'vault' is held by another sharer at the router; retrying")
        forward, port = self.forward("vault", address, env=env)
        self.assertIn(first_byte_or_close(port), ("eof", "reset"))
        forward.wait_line(r"forward: the sharer of 'vault' could not prove the secret \(a different "
                          r"secret, or not the real sharer\)$")
        self.assertEqual(squatted.errors + [c for c in squatted._conns], [])   # it never dialled
        self.assertEqual(squatter.signal(signal.SIGTERM)[0], 0)
        rightful.wait_line(r"sharing 'vault' -> ")
        self.assertEqual(exchange(port, b"mine"), b"Tmine")

    def test_forward_says_whether_streams_are_encrypted(self):
        router, address = self.router()
        plain, _port = self.forward("x", address)
        self.assertIn("streams are not encrypted end to end (no --secret): the router can read them",
                      plain.lines[-1])


class TestServiceSecret(SecurityCommandLine, unittest.TestCase):

    def test_secret_is_proved_end_to_end_and_never_shown(self):
        secret, wrong = "sec-" + os.urandom(12).hex(), "bad-" + os.urandom(12).hex()
        secret_file = write_file(os.path.join(self.tmp, "secret"), secret + "\n")
        router, address = self.router()
        target = ThreadedServer(self, tag_handler(b"T"))
        share = self.share("vault", target.port, address, "--secret-file", secret_file)
        self.assertNotIn(secret, " ".join(share.argv))
        good = self.start_forward("vault", address, "--secret", secret)
        bad = self.start_forward("vault", address, "--secret", wrong)
        none = self.start_forward("vault", address)
        good_port, bad_port, none_port = [self.forward_port(p, "vault") for p in (good, bad, none)]

        payload = os.urandom(512 * 1024)
        self.assertEqual(exchange(good_port, payload), b"T" + payload)
        for proc, port, pattern, why in (
                (bad, bad_port, r"could not prove", "the sharer of 'vault' could not prove the secret "
                                                    "(a different secret, or not the real sharer)"),
                (none, none_port, r"refused", "requires a secret: pass --secret or --secret-file")):
            with self.subTest(why=why):
                self.assertIn(first_byte_or_close(port), ("eof", "reset"))
                line = proc.wait_line(pattern).string
                self.assertIn(why, line)
                self.assertIn("'vault'", line)
                self.assertTrue(proc.running())
        self.assertEqual(exchange(good_port, payload), b"T" + payload)   # still fine

        listing, wrong_connect, right_connect = self.run_many([
            ["list", "--router", address],
            ["connect", "vault", "--router", address, "--secret", wrong],
            (["connect", "vault", "--router", address], self.env_with(MINDMELD_SECRET=secret),
             b"through stdin"),
        ])
        self.assertEqual(listing[0], 0, listing[2])
        rows = list_rows(listing[1])
        self.assertEqual(rows[0][-1], "SECRET")
        self.assertEqual([(r[0], r[-1]) for r in rows[1:]], [("vault", "yes")])
        self.assert_one_error_line(wrong_connect, "connect", "'vault'", "could not prove the secret")
        self.assertEqual((right_connect[0], right_connect[1], right_connect[2]),
                         (0, b"Tthrough stdin", ""))

        seen = [listing[1].decode(), listing[2], wrong_connect[2]]
        for proc in (good, bad, none, share, router):
            code, lines = proc.signal(signal.SIGTERM)
            self.assertEqual(code, 0, lines)
            if proc in (bad, none):                     # one line for its one refusal
                self.assertEqual(len([l for l in lines if "refused" in l or "could not prove" in l]), 1, lines)
            seen += lines + [l for l in proc.stdout if l is not None]
        self.assertFalse([l for l in seen if secret in l or wrong in l])

    def test_a_live_sharers_name_is_refused_to_others_even_with_its_secret(self):
        # The router cannot check a secret, so knowing it takes no name: a live sharer keeps
        # its name until it stops; then a sharer with the secret gets it.
        secret = "sec-" + os.urandom(12).hex()
        router, address = self.router()
        first_target = ThreadedServer(self, tag_handler(b"1"))
        second_target = ThreadedServer(self, tag_handler(b"2"))
        first = self.share("svc", first_target.port, address, "--secret", secret)
        _forward, port = self.forward("svc", address, "--secret", secret)
        self.assertEqual(exchange(port, b"x"), b"1x")

        no_secret, = self.run_many([
            ["share", "svc", "127.0.0.1:%d" % second_target.port, "--router", address],
        ])
        self.assert_one_error_line(no_secret, "share", "already shared")
        # With the secret it may be the holder's own last run: it waits (one line), and gets
        # the name once the holder has stopped.
        second = Proc(self, ["share", "svc", "127.0.0.1:%d" % second_target.port, "--router", address,
                             "--secret", secret], env=self.env)
        second.wait_line(r"the name 'svc' is held by another sharer at the router; retrying")
        self.assertTrue(first.running())
        self.assertEqual(exchange(port, b"y"), b"1y")

        code, lines = first.signal(signal.SIGTERM)
        self.assertEqual(code, 0, lines)
        second.wait_line(r"sharing 'svc' -> ")
        self.assertEqual(exchange(port, b"z"), b"2z")
        self.assertTrue(second.running())
        seen = lines + second.lines + no_secret[2].splitlines()
        code, router_lines = router.signal(signal.SIGTERM)
        self.assertFalse([l for l in seen + router_lines if secret in l])


# ---------------------------------------------------------------------------
# 11d. Hostile peers against a live router (library roles in one event loop)
# ---------------------------------------------------------------------------

class Traffic:
    """An honest stream through the tunnel: echo round trips, every byte checked, until
    told to stop; then a few more rounds (the link still works after whatever happened
    meanwhile) and a clean half-close."""

    def __init__(self, test, port, chunk=32 * 1024):
        self.test, self.port, self.chunk = test, port, chunk
        self.rounds = self.bytes = 0
        self.task = None

    async def start(self):
        self.stop = asyncio.Event()
        self.flowing = asyncio.Event()
        self.task = asyncio.ensure_future(self._run())
        done, _ = await asyncio.wait([self.task, asyncio.ensure_future(self.flowing.wait())],
                                     timeout=10, return_when=asyncio.FIRST_COMPLETED)
        if self.task in done:
            self.task.result()
        self.test.assertTrue(self.flowing.is_set(), "the honest stream did not start")
        return self

    async def _run(self):
        reader, writer = await self.test.connect(self.port)
        extra = None
        for n in range(1000000):
            if self.stop.is_set():
                extra = self.rounds + 3 if extra is None else extra
                if self.rounds >= extra:
                    break
            block = os.urandom(self.chunk)
            writer.write(block)
            try:
                echoed = await asyncio.wait_for(reader.readexactly(len(block)), 10)
            except asyncio.IncompleteReadError as exc:
                raise AssertionError("the honest stream ended after %d bytes (round %d)"
                                     % (self.bytes + len(exc.partial), n))
            except ConnectionResetError:
                raise AssertionError("the honest stream was reset after %d bytes (round %d)"
                                     % (self.bytes, n))
            if echoed != block:
                raise AssertionError("round %d came back changed" % n)
            self.rounds, self.bytes = n + 1, self.bytes + len(block)
            self.flowing.set()
        writer.write_eof()
        rest = await asyncio.wait_for(reader.read(), 10)
        if rest != b"":
            raise AssertionError("after EOF: %r" % rest[:40])

    async def finish(self):
        self.stop.set()
        await asyncio.wait_for(self.task, 30)
        return self.bytes


class RawPeer:
    """A hand-driven connection to the router: raw bytes out, frames or bytes in."""

    def __init__(self, test, reader, writer):
        self.test, self.reader, self.writer = test, reader, writer
        self.address = "%s:%d" % writer.get_extra_info("sockname")[:2]
        self.decoder = FrameDecoder()
        self.frames = []

    def send(self, data):
        self.writer.write(data)

    async def _read(self, deadline, what):
        remaining = deadline - self.test.loop.time()
        try:
            if remaining <= 0:
                raise asyncio.TimeoutError
            return await asyncio.wait_for(self.reader.read(CHUNK), remaining)
        except asyncio.TimeoutError:
            raise AssertionError("%s: nothing within the deadline" % what)

    async def frame(self, ftype, stream_id=None, timeout=5):
        """The next frame of this type (earlier ones are skipped): (type, flags, id, payload)."""
        deadline = self.test.loop.time() + timeout
        for _ in range(100000):
            for i, frame in enumerate(self.frames):
                if frame[0] == ftype and stream_id in (None, frame[2]):
                    del self.frames[:i + 1]
                    return frame
            self.frames = []
            data = await self._read(deadline, "waiting for %s" % FRAME_NAMES_[ftype])
            if not data:
                raise AssertionError("closed while waiting for %s" % FRAME_NAMES_[ftype])
            self.frames.extend(self.decoder.feed(data))
        raise AssertionError("no %s" % FRAME_NAMES_[ftype])

    async def handshake(self):
        self.send(PREAMBLE + encode_json(HELLO, 0, {"version": PROTOCOL_VERSION, "role": "forward",
                                                    "agent": "test"}))
        self.hello = json.loads((await self.frame(HELLO, 0))[3].decode())
        return self.hello

    async def open(self, stream_id=1, service="web"):
        self.send(encode_json(OPEN, stream_id, {"service": service}))
        await self.frame(OPEN_OK, stream_id)

    async def settled(self, timeout=5):
        """Send a PING and wait for its PONG: 'pong' once the router has dealt with everything
        sent before, or 'closed' if it closed the connection instead."""
        self.send(encode_frame(PING, 0, b"settled!"))
        try:
            await self.frame(PONG, 0, timeout)
        except (AssertionError, ConnectionResetError) as exc:
            if "closed" in str(exc) or isinstance(exc, ConnectionResetError):
                return "closed"
            raise
        return "pong"

    async def closed(self, timeout=5):
        """Everything until the router closes: (bytes, 'eof' or 'reset')."""
        deadline, data = self.test.loop.time() + timeout, b""
        for _ in range(100000):
            try:
                chunk = await self._read(deadline, "waiting for the router to close")
            except ConnectionResetError:
                return data, "reset"
            if not chunk:
                return data, "eof"
            data += chunk
        raise AssertionError("endless data")

    async def goaway(self, timeout=5):
        """Read until closed; the one GOAWAY among the frames: its JSON."""
        data, _how = await self.closed(timeout)
        frames = self.frames + self.decoder.feed(data)
        goaways = [json.loads(p.decode()) for t, _f, _i, p in frames if t == GOAWAY]
        self.test.assertEqual(len(goaways), 1, "frames: %r" % [(t, i) for t, _f, i, _p in frames])
        return goaways[0]


FRAME_NAMES_ = mindmeld.FRAME_NAMES


def tls_client_hello():
    """The first flight of a real TLS client."""
    context = ssl_client_context_without_checks()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


class HostileTestCase(LoopTestCase):
    """A router with a short handshake timeout, an echo service 'web' shared through it and
    an honest stream running through it while an offender does its worst."""

    async def dropped(self, frame, code, words=""):
        """A fresh peer sends `frame`: it gets GOAWAY `code` whose message names `words`,
        and the router logs one line about it, which is returned."""
        peer = await self.raw_peer()
        peer.send(frame)
        goaway = await peer.goaway()
        self.assertEqual(goaway["code"], code, goaway)
        self.assertIn(words, goaway["message"])
        return self.one_line_about(peer)

    async def honest(self, secret=None, tls=None, more_services=(), **router_options):
        """more_services: (name, handler) pairs the same sharer also shares."""
        router_options.setdefault("handshake_timeout", 0.5)
        self.router = await self.start_router(**router_options)
        target = await self.start_target(echo_handler)
        client = {"secret": secret} if secret else {}
        if tls is not None:
            client["tls"] = tls
        services = {"web": (LOCALHOST, target)}
        for name, handler in more_services:
            services[name] = (LOCALHOST, await self.start_target(handler))
        self.sharer = await self.start_sharer(services, **client)
        self.forwarder = await self.start_forwarder("web", **client)
        traffic = Traffic(self, self.forwarder.port)

        async def stop():                  # a failed test leaves it running: end it quietly
            if traffic.task is not None and not traffic.task.done():
                traffic.task.cancel()
            if traffic.task is not None:
                await asyncio.wait([traffic.task], timeout=5)
                if not traffic.task.cancelled():
                    traffic.task.exception()
        self._async_cleanups.append(stop)
        return await traffic.start()

    def against_honest_peers(self, attack, **router_options):
        """Run the coroutine attack() while an honest stream flows through the tunnel; the
        honest stream then finishes byte-exact and only the honest peers are left."""
        async def main():
            traffic = await self.honest(**router_options)
            await attack()
            await self.after(traffic)
        self.run_async(main())

    async def raw_peer(self, handshake=True):
        reader, writer = await self.connect(self.router.port)
        peer = RawPeer(self, reader, writer)
        if handshake:
            await peer.handshake()
        return peer

    async def after(self, traffic, services=("web",)):
        """The honest stream finishes byte-exact; only the honest peers are left."""
        await traffic.finish()
        await wait_until(lambda: len(self.router.peers) == 2, 5,
                         lambda: "router peers: %r" % [p.peer for p in self.router.peers])
        self.assertEqual(self.router.handshaking, 0)
        self.assertEqual(sorted(self.router.services), sorted(services))
        assert_clean_output(self.logs)

    def one_line_about(self, peer, words="", since=0):
        """The router logged exactly one line about this peer (from log line `since` on),
        naming `words`: that line."""
        lines = [l for l in self.logs[since:] if mentions(l, peer.address)]
        self.assertEqual(len(lines), 1, self.logs)
        self.assertIn(words, lines[0])
        return lines[0]


class TestHostilePeers(HostileTestCase):

    def test_silent_peer_is_dropped_after_the_handshake_timeout(self):
        async def attack():
            peer = await self.raw_peer(handshake=False)
            began = self.loop.time()
            goaway = await peer.goaway(timeout=5)
            elapsed = self.loop.time() - began
            self.assertEqual(goaway["code"], "timeout")
            self.assertGreaterEqual(elapsed, 0.4)
            self.assertLess(elapsed, 3.0)
            self.one_line_about(peer, "handshake")
        self.against_honest_peers(attack, handshake_timeout=0.5)

    def test_garbage_and_wrong_version_are_refused_in_one_line(self):
        async def attack():
            for data, logged in ((b"\x00\xffnot mindmeld at all\r\n", "not a mindmeld client"),
                                 (b"MINDMELX\x01", "not a mindmeld client"),
                                 (mindmeld.MAGIC + bytes([PROTOCOL_VERSION + 1])
                                  + encode_json(HELLO, 0, {"version": PROTOCOL_VERSION + 1}),
                                  "version %d" % (PROTOCOL_VERSION + 1))):
                with self.subTest(data=data[:12]):
                    peer = await self.raw_peer(handshake=False)
                    peer.send(data)
                    reply, _how = await peer.closed()
                    if data.startswith(mindmeld.MAGIC):     # a mindmeld of another version
                        frames = FrameDecoder().feed(reply)  # reads a GOAWAY that says so
                        self.assertEqual([f[0] for f in frames], [GOAWAY], reply)
                        self.assertEqual(json.loads(frames[0][3].decode())["code"], "version")
                    else:
                        self.assertTrue(reply.startswith(b"mindmeld router: this port speaks the "
                                                         b"mindmeld protocol"), reply)
                        self.assertEqual(reply.count(b"\n"), 1, reply)
                        self.assertTrue(reply.endswith(b"\n"), reply)
                    self.one_line_about(peer, logged)
        self.against_honest_peers(attack)

    def test_http_requests_are_answered(self):
        async def attack():
            for path, body in (("/", b"mindmeld router"), ("/healthz", b"ok\n")):
                with self.subTest(path=path):
                    peer = await self.raw_peer(handshake=False)
                    peer.send(("GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % path).encode())
                    reply, how = await peer.closed()
                    self.assertTrue(reply.startswith(b"HTTP/1.1 200 OK\r\n"), reply)
                    self.assertIn(body, reply.split(b"\r\n\r\n", 1)[1])
        self.against_honest_peers(attack)

    def test_tls_client_hello_to_a_plain_router_is_closed(self):
        async def attack():
            peer = await self.raw_peer(handshake=False)
            hello = tls_client_hello()
            self.assertEqual(hello[:1], b"\x16")
            peer.send(hello)
            reply, _how = await peer.closed()
            self.assertEqual(reply, b"")          # nothing a TLS client could misread
            self.one_line_about(peer, "TLS")
        self.against_honest_peers(attack)

    def test_oversized_frames_get_goaway_frame_size(self):
        async def attack():
            cases = [(False, HEADER.pack(MAX_CONTROL + 1, HELLO, 0, 0)),      # before HELLO
                     (True, HEADER.pack(MAX_DATA + 1, DATA, 0, 1)),
                     (True, HEADER.pack(0xFFFFFFFF, OPEN, 0, 1)),
                     (True, HEADER.pack(9, PING, 0, 0))]
            for after_hello, header in cases:
                with self.subTest(header=header):
                    peer = await self.raw_peer(handshake=after_hello)
                    peer.send(header if after_hello else PREAMBLE + header)
                    goaway = await peer.goaway()
                    self.assertEqual(goaway["code"], "frame-size", goaway)
                    self.one_line_about(peer)
        self.against_honest_peers(attack)

    def test_unknown_type_and_second_hello_get_goaway_protocol(self):
        async def attack():
            for frame, words in ((HEADER.pack(0, 99, 0, 0), "unknown frame type 99"),
                                 (HEADER.pack(0, 0, 0, 0), "unknown frame type 0"),
                                 (encode_json(HELLO, 0, {"version": PROTOCOL_VERSION}), "HELLO")):
                with self.subTest(words=words):
                    line = await self.dropped(frame, "protocol", words)
                    self.assertIn(words, line)
        self.against_honest_peers(attack)

    def test_frames_for_a_stream_never_opened_get_goaway_protocol(self):
        async def attack():
            cases = [encode_frame(DATA, 7, b"x"), encode_frame(WINDOW, 7, struct.pack("!I", 1000)),
                     encode_frame(EOF, 7), encode_json(RESET, 7, {"reason": "x"}),
                     encode_frame(DATA, 8, b"x"), encode_json(OPEN_OK, 8, {})]
            for frame in cases:
                with self.subTest(type=FRAME_NAMES_[frame[4]], id=frame[9]):
                    await self.dropped(frame, "protocol", "never opened")
        self.against_honest_peers(attack)

    def test_data_beyond_the_window_gets_goaway_flow_control(self):
        # A hand-driven sharer accepts a stream and never grants more credit, so the
        # window is exactly INITIAL_WINDOW each way; a byte more is the sender's offence.
        async def attack():
            for offender in ("opener", "acceptor"):
                with self.subTest(offender=offender):
                    name = "trap-" + offender
                    sharer = await self.raw_peer()
                    sharer.send(encode_json(REGISTER, 1, {"name": name, "owner": "raw"}))
                    await sharer.frame(REGISTERED, 1)
                    opener = await self.raw_peer()
                    opener.send(encode_json(OPEN, 1, {"service": name}))
                    there = (await sharer.frame(OPEN))[2]
                    sharer.send(encode_frame(OPEN_OK, there))
                    await opener.frame(OPEN_OK, 1)
                    guilty, innocent, ids = ((opener, sharer, (1, there)) if offender == "opener"
                                             else (sharer, opener, (there, 1)))
                    block, mark = os.urandom(64 * 1024), len(self.logs)
                    for _ in range(INITIAL_WINDOW // len(block)):     # the whole window: fine
                        guilty.send(encode_frame(DATA, ids[0], block))
                    guilty.send(encode_frame(DATA, ids[0], b"!"))     # one byte more
                    goaway = await guilty.goaway(timeout=10)
                    self.assertEqual(goaway["code"], "flow-control", goaway)
                    self.one_line_about(guilty, "window", mark)
                    await innocent.frame(RESET, ids[1], timeout=10)           # told, not dropped
                    self.assertEqual(await innocent.settled(), "pong")
                    innocent.writer.close()
        self.against_honest_peers(attack)

    def test_register_with_an_invalid_name_gets_goaway_protocol(self):
        async def attack():
            for name in ("a b", "", "x" * 65, "caf\u00e9", "a/b", 5, None, ["web"]):
                with self.subTest(name=name):
                    await self.dropped(encode_json(REGISTER, 1, {"name": name, "owner": "x"}),
                                       "protocol", "invalid service name")
        self.against_honest_peers(attack)

    def test_malformed_window_frames_get_goaway_not_an_internal_error(self):
        # README: "A peer that breaks the protocol gets a GOAWAY saying why, one log line,
        # and is disconnected".  A WINDOW frame's payload is a u32: shorter is malformed.
        async def attack():
            for payload in (struct.pack("!I", 0), b"", b"\x00\x01", b"\x00\x00\x01"):
                with self.subTest(payload=payload):
                    peer = await self.raw_peer()
                    await peer.open(1)
                    peer.send(encode_frame(WINDOW, 1, payload))
                    data, _how = await peer.closed()
                    assert_clean_output(self.one_line_about(peer))
                    goaways = [json.loads(p.decode()) for t, _f, _i, p in peer.decoder.feed(data)
                               if t == GOAWAY]
                    self.assertEqual(len(goaways), 1, data)
                    self.assertIn(goaways[0]["code"], ("protocol", "flow-control", "frame-size"))
        self.against_honest_peers(attack)

    def proofs_cannot_break_the_sharer(self, payloads, **honest):
        """Streams opened and sent these PROOF payloads at once: whatever becomes of the
        offenders' streams, the sharer's link (with every other stream on it) must not
        suffer for it."""
        async def main():
            traffic = await self.honest(**honest)
            owner = self.router.services["web"].peer
            for payload in payloads:
                with self.subTest(payload=payload):
                    peer = await self.raw_peer()
                    peer.send(encode_json(OPEN, 1, {"service": "web"})
                              + encode_frame(PROOF, 1, payload))
                    await peer.settled()
                    peer.writer.close()
            await self.after(traffic)      # the sharer has read the PROOF before these rounds
            self.assertIs(self.router.services["web"].peer, owner, "the sharer lost its link")
        self.run_async(main())

    def test_proof_from_a_forwarder_cannot_break_a_sharer_without_a_secret(self):
        # PROOF travels from the opening side to the sharer, which never asked for one here.
        self.proofs_cannot_break_the_sharer(
            (b"not json", b'{"proof": "00", "nonce": "%s"}' % (b"00" * 16)))

    def test_malformed_proof_cannot_break_a_sharer_with_a_secret(self):
        self.proofs_cannot_break_the_sharer((b"not json", b"[1, 2]", b'{"proof": 5}'),
                                            secret="s3cret-" + os.urandom(8).hex())

    def test_a_handshake_flood_from_one_source_evicts_its_own_oldest(self):
        # Past MAX_PENDING_HANDSHAKES unfinished handshakes, the source holding the most loses
        # its oldest.  (The limit is lowered so that a flood takes a few connections.)
        self.addCleanup(setattr, mindmeld, "MAX_PENDING_HANDSHAKES", mindmeld.MAX_PENDING_HANDSHAKES)
        mindmeld.MAX_PENDING_HANDSHAKES = 3

        async def attack():
            flood = [await self.raw_peer(handshake=False) for _ in range(6)]
            await wait_until(lambda: self.router.handshaking == 3, 5, "3 handshakes pending")
            for peer in flood[:3]:                  # the oldest three were dropped, unanswered
                reply, _how = await peer.closed(timeout=3)
                self.assertEqual(reply, b"")
            warnings = [l for l in self.logs if "unfinished handshakes" in l]
            self.assertEqual(len(warnings), 1, self.logs)     # one line per flood
            # a peer from elsewhere gets in while the flood goes on: the flood pays for it
            reader, writer = await asyncio.open_connection(LOCALHOST, self.router.port,
                                                           local_addr=("127.0.0.2", 0))
            other = RawPeer(self, reader, writer)
            self.assertEqual((await other.handshake())["version"], PROTOCOL_VERSION)
            reply, _how = await flood[3].closed(timeout=3)
            self.assertEqual(reply, b"")
            other.writer.close()
            for peer in flood:
                peer.writer.close()
            await wait_until(lambda: len(self.router.peers) == 2, 5, "only the honest peers left")
        self.against_honest_peers(attack, handshake_timeout=10)

    def test_unfinished_handshakes_are_counted_by_source(self):
        for peer, source in ((("127.0.0.1", 5), "127.0.0.1"), (("::ffff:10.1.2.3", 5), "10.1.2.3"),
                             (("2001:db8:1:2:3:4:5:6", 5, 0, 0), "2001:db8:1:2::/64"),
                             (("fe80::1%eth0", 5, 0, 2), "fe80::/64"), (None, "?")):
            transport = type("T", (), {"get_extra_info": lambda self, name, p=peer: p})()
            self.assertEqual(mindmeld.source_of(transport), source)


class TestHostileTls(HostileTestCase, TlsFiles):

    @classmethod
    def setUpClass(cls):
        cls.make_tls_files(other=False)

    @classmethod
    def tearDownClass(cls):
        cls.remove_tls_files()

    def test_silent_peer_on_a_tls_router_is_dropped_after_the_handshake_timeout(self):
        # The handshake timeout (README: "15 s to finish a handshake") must hold on a TLS
        # router too: a connection that never starts TLS is an unfinished handshake.
        async def main():
            context, fingerprint = router_tls_context(self.cert, self.key)
            self.assertEqual(fingerprint, self.fingerprint)
            known = os.path.join(self.files, "known_routers-%d" % os.getpid())
            tls = TlsOptions(fingerprint=fingerprint, known_routers=known)
            traffic = await self.honest(tls=tls, ssl_context=context, handshake_timeout=0.5)
            peer = await self.raw_peer(handshake=False)
            began = self.loop.time()
            try:
                await peer.closed(timeout=3)
            except AssertionError:
                self.fail("a TCP peer that never started TLS was still connected after %.1f s "
                          "(handshake_timeout=0.5)" % (self.loop.time() - began))
            self.assertGreaterEqual(self.loop.time() - began, 0.4)
            await self.after(traffic)
            self.assertFalse(os.path.exists(known))       # a pin records nothing
        self.run_async(main())


    def test_a_client_closed_during_the_tls_handshake_drops_its_connection(self):
        async def main():
            accepted, ended = [], self.loop.create_future()

            async def silent(reader, writer):   # a "router" that never answers the ClientHello
                accepted.append(writer)
                try:
                    await reader.read()
                except ConnectionError:
                    pass
                ended.set_result(True)
                writer.close()
            server = await asyncio.start_server(silent, LOCALHOST, 0)
            self.addCleanup(server.close)
            known = os.path.join(self.files, "known_routers-%d" % os.getpid())
            address = "%s:%d" % (LOCALHOST, server.sockets[0].getsockname()[1])
            sharer = Sharer({"web": (LOCALHOST, 9)}, router=address,
                            tls=TlsOptions(fingerprint=self.fingerprint, known_routers=known))
            await sharer.start()
            await wait_until(lambda: accepted, 5, "the sharer connected")
            await sharer.close(0)
            try:
                await asyncio.wait_for(ended, 5)
            except asyncio.TimeoutError:
                self.fail("the sharer closed, but its half-made TLS connection stayed open")
        self.run_async(main())

    def test_a_tampered_tls_record_drops_only_that_peer(self):
        # TLS from here by hand, so that one byte of a record can be changed on the way
        async def main():
            context, fingerprint = router_tls_context(self.cert, self.key)
            known = os.path.join(self.files, "known_routers-%d" % os.getpid())
            traffic = await self.honest(tls=TlsOptions(fingerprint=fingerprint, known_routers=known),
                                        ssl_context=context, handshake_timeout=5)
            peer = await self.raw_peer(handshake=False)
            client = ssl_client_context_without_checks()
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            tls = client.wrap_bio(incoming, outgoing)
            for _ in range(10):
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    peer.send(outgoing.read())
                    incoming.write(await peer._read(self.loop.time() + 5, "TLS handshake"))
            else:
                self.fail("no TLS handshake in 10 flights")
            peer.send(outgoing.read())
            tls.write(PREAMBLE + encode_json(HELLO, 0, {"version": PROTOCOL_VERSION}))
            record = bytearray(outgoing.read())
            record[-1] ^= 1                         # the last byte of the record's tag
            peer.send(bytes(record))
            await peer.closed()
            self.one_line_about(peer, "TLS")
            await self.after(traffic)
        self.run_async(main())


# ---------------------------------------------------------------------------
# 11e. A seeded fuzz against a live router
# ---------------------------------------------------------------------------

# A fixed count of cases, not a time budget, so that a failure names a case that runs
# again: worker W's case N is the N-th draw of random.Random(seed * 100 + W).
# MINDMELD_FUZZ_SEED=N runs another seed.  About a second in all.
FUZZ_SEED = int(os.environ.get("MINDMELD_FUZZ_SEED") or 20240611)
FUZZ_WORKERS = 8
FUZZ_CASES_PER_WORKER = 160
FUZZ_NAMES = ["web", "fz0", "fz1", "a b", "", "x" * 70, "caf\u00e9"]
FUZZ_KEYS = ["name", "service", "owner", "verifier", "reason", "nonce", "proof", "mac",
             "code", "message", "version", "role", "ok", "peer"]
STREAM_TYPES = [DATA, DATA, DATA, WINDOW, WINDOW, EOF, RESET, OPEN_OK, OPEN_REFUSED,
                CHALLENGE, PROOF, PING, PONG]
ANY_TYPE = list(range(1, 19)) + [0, 19, 99, 255]


def fuzz_bytes(rng, n):
    return bytes(rng.getrandbits(8) for _ in range(n))


def fuzz_json(rng):
    value = lambda: rng.choice([rng.choice(FUZZ_NAMES), rng.randrange(-5, 1 << 33), None, True,
                                [1, "x"], {"k": "v"}, "00" * 16, "zz", rng.random(), "x" * 300])
    return json.dumps({k: value() for k in rng.sample(FUZZ_KEYS, rng.randrange(0, 5))}).encode()


def sane_payload(rng, ftype):
    """A payload of the right shape for the type (the values may still be wrong)."""
    if ftype == DATA:
        return fuzz_bytes(rng, rng.choice([0, 1, 100, 3000]))
    if ftype == WINDOW:
        return struct.pack("!I", rng.choice([1, 4096, INITIAL_WINDOW, 0, 1 << 31]))
    if ftype == EOF:
        return b""
    if ftype in (PING, PONG):
        return fuzz_bytes(rng, 8)
    nonce = rng.choice(["00" * 16, fuzz_bytes(rng, 16).hex(), "zz"])
    obj = {REGISTER: {"name": rng.choice(FUZZ_NAMES), "owner": "fuzz"},
           OPEN: {"service": rng.choice(FUZZ_NAMES)},
           RESET: {"reason": "fuzz"}, OPEN_REFUSED: {"reason": "fuzz"},
           OPEN_OK: rng.choice([{}, {"proof": "00"}]),
           CHALLENGE: {"nonce": nonce}, PROOF: {"proof": "00" * 32, "nonce": nonce},
           GOAWAY: {"code": "shutdown", "message": "fuzz"}, LIST: {}}.get(ftype)
    return fuzz_json(rng) if obj is None else json.dumps(obj).encode()


def fuzz_frame(rng, types=ANY_TYPE, ids=(0, 1, 2, 3, 5, 7), sane=0.5):
    ftype = rng.choice(types)
    stream_id = rng.choice(list(ids) + [rng.getrandbits(32)] * (not sane))
    if rng.random() < sane and ftype in FRAME_NAMES_:
        payload = sane_payload(rng, ftype)
    else:
        payload = rng.choice([b"", fuzz_bytes(rng, rng.randrange(1, 64)), fuzz_json(rng),
                              b"[1, 2]", b"null", b"{", b"\xff\xfe", struct.pack("!I", 0)])
    length, roll = len(payload), rng.random()
    if roll < 0.03:                             # a length over every limit
        length, payload = rng.choice([MAX_DATA + 1, MAX_CONTROL + 1, 0xFFFFFFFF]), b""
    elif roll < 0.06:                           # a frame that claims more than it carries
        length += rng.randrange(1, 20)
    return HEADER.pack(length, ftype, rng.choice([0, 0, 0, 0, 1, 255]), stream_id) + payload


def fuzz_case(rng, tag):
    """One hostile connection: (kind, steps, pieces, ending).

    steps: [(bytes, frame type to wait for or None)] sent first, to get a stream open;
    pieces: the bytes thrown afterwards; ending: 'eof' (then read until the router
    closes), 'abort' (RST) or 'close'."""
    hello = PREAMBLE + encode_json(HELLO, 0, {"version": PROTOCOL_VERSION, "agent": "fuzz",
                                              "role": rng.choice(["forward", "share", "list"])})
    name = rng.choice(["fz0", "fz-%s" % tag])
    kind, steps = rng.randrange(10), []
    if kind == 0:                                   # noise
        data = fuzz_bytes(rng, rng.randrange(1, 300))
    elif kind == 1:                                 # a preamble cut short, then noise
        data = PREAMBLE[:rng.randrange(1, len(PREAMBLE) + 1)] + fuzz_bytes(rng, rng.randrange(0, 40))
    elif kind == 2:                                 # frames where HELLO should be
        data = PREAMBLE + b"".join(fuzz_frame(rng) for _ in range(rng.randrange(1, 6)))
    elif kind == 3:                                 # a handshake, then anything
        data = hello + b"".join(fuzz_frame(rng) for _ in range(rng.randrange(1, 10)))
    elif kind == 4:                                 # streams to the honest service, all at once
        data = (hello + encode_json(OPEN, 1, {"service": "web"})
                + encode_json(OPEN, 3, {"service": "web"})
                + b"".join(fuzz_frame(rng, STREAM_TYPES, (1, 3), 0.9)
                           for _ in range(rng.randrange(1, 8))))
    elif kind in (5, 6):                            # a stream to the honest service, once open
        steps = [(hello + encode_json(OPEN, 1, {"service": "web"}), OPEN_OK)]
        data = b"".join(fuzz_frame(rng, STREAM_TYPES + [OPEN, LIST, GOAWAY], (1, 1, 1, 3), 0.9)
                        for _ in range(rng.randrange(1, 12)))
    elif kind == 7:                                 # its own service, a stream to itself
        steps = [(hello + encode_json(REGISTER, 1, {"name": name, "owner": "fuzz"}), REGISTERED),
                 (encode_json(OPEN, 1, {"service": name}), OPEN)]
        data = b"".join(fuzz_frame(rng, STREAM_TYPES, (1, 2, 2), 0.9)
                        for _ in range(rng.randrange(1, 12)))
    elif kind == 8:                                 # well-formed frames, out of order
        frames = [hello[len(PREAMBLE):], encode_json(OPEN, 1, {"service": "web"}),
                  encode_frame(DATA, 1, b"abc"), encode_frame(EOF, 1),
                  encode_frame(WINDOW, 1, struct.pack("!I", 4096)),
                  encode_json(RESET, 1, {"reason": "fuzz"}), encode_json(LIST, 3, {}),
                  encode_frame(PING, 0, b"12345678"), encode_json(AUTH, 0, {"mac": "00"}),
                  encode_json(REGISTER, 5, {"name": name, "owner": "fuzz"})]
        rng.shuffle(frames)
        data = PREAMBLE + b"".join(frames[:rng.randrange(2, len(frames) + 1)])
    else:                                           # other protocols, half-spoken
        data = rng.choice([b"GET /", b"GET / HTTP/1.1\r\nHost: x", b"\x16\x03\x01\x02\x00",
                           b"POST /x HTTP/1.1\r\nContent-Length: 5\r\n\r\nabc",
                           b"GET /healthz HTTP/1.0\r\n\r\n"]) + fuzz_bytes(rng, rng.randrange(0, 20))
    data = bytearray(data)
    if rng.random() < 0.2 and len(data) > 1:        # truncated
        del data[rng.randrange(1, len(data)):]
    if rng.random() < 0.15 and data:                # a few bits flipped
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    cuts = sorted(rng.randrange(len(data) + 1) for _ in range(rng.randrange(0, 3)))
    pieces = [bytes(data[a:b]) for a, b in zip([0] + cuts, cuts + [len(data)])]
    return kind, steps, pieces, rng.choice(["eof", "eof", "eof", "abort", "close"])


async def until_frame(reader, decoder, ftype, timeout):
    """Read frames until one of this type arrives: True, or False (closed, timed out)."""
    for remaining in countdown(timeout, asyncio.get_event_loop().time):
        try:
            data = await asyncio.wait_for(reader.read(CHUNK), remaining)
            frames = decoder.feed(data)
        except (asyncio.TimeoutError, ConnectionError, OSError, ProtocolError):
            return False
        if not data:
            return False
        if any(f[0] == ftype for f in frames):
            return True
    return False


class TestFuzz(HostileTestCase):

    def test_seeded_fuzz_against_a_live_router(self):
        # asyncio's own warnings ("socket.send() raised exception") are expected here; its
        # errors (an exception escaping a protocol callback or a task) are not.
        errors = capture_log(self, "asyncio", logging.ERROR)
        seed = "seed %d" % FUZZ_SEED

        async def main():
            traffic = await self.honest(liveness_probe=0.3)
            done, hung, unanswered = collections.Counter(), [], []

            async def worker(index):
                rng = random.Random(FUZZ_SEED * 100 + index)
                for number in range(FUZZ_CASES_PER_WORKER):
                    kind, steps, pieces, ending = fuzz_case(rng, "%d-%d" % (index, number))
                    try:
                        await one_case(index, number, kind, steps, pieces, ending)
                    except asyncio.CancelledError:      # an Exception on 3.6 and 3.7
                        raise
                    except Exception as exc:     # noqa: BLE001 - say which case, then fail
                        raise AssertionError("%s, worker %d, case %d (kind %d): %r"
                                             % (seed, index, number, kind, exc))

            async def one_case(index, number, kind, steps, pieces, ending):
                try:
                    reader, writer = await asyncio.open_connection(LOCALHOST, self.router.port)
                except ConnectionError:
                    done["refused at connect"] += 1
                    return
                try:
                    decoder = FrameDecoder()
                    for data, awaited in steps:
                        writer.write(data)
                        # only the honest service's OPEN_OK is asserted; an OPEN for a
                        # fuzzer's own name may never come, so it is not waited for long
                        patience = 3.0 if awaited == OPEN_OK else 0.2 if awaited == OPEN else 1.0
                        if not await until_frame(reader, decoder, awaited, patience):
                            if awaited == OPEN_OK:   # the honest service answers everyone
                                unanswered.append((index, number, kind))
                            break
                    for piece in pieces:
                        writer.write(piece)
                    if ending == "abort":
                        writer.transport.abort()
                    elif ending == "eof":
                        writer.write_eof()
                        if await read_until_closed(reader, 3.0) == "still open":
                            hung.append((index, number, kind))
                except (ConnectionError, OSError):
                    pass
                finally:
                    writer.close()
                done[kind] += 1

            await asyncio.gather(*[worker(i) for i in range(FUZZ_WORKERS)])
            await self.after(traffic)
            self.assertEqual(hung, [], "%s: connections the router left open after their EOF "
                             "(worker, case, kind)" % seed)
            self.assertEqual(unanswered, [], "%s: OPENs of the honest service left unanswered "
                             "(worker, case, kind)" % seed)
            self.assertEqual(sum(done.values()), FUZZ_WORKERS * FUZZ_CASES_PER_WORKER, done)
            # nothing left behind: no legs, no streams, on either side of the honest link
            leftovers = lambda: ([(p.peer, sorted(p.legs)) for p in self.router.peers if p.legs]
                                 + [("sharer", sorted(self.sharer.link.streams))]
                                 * bool(self.sharer.link.streams)
                                 + [("forwarder", sorted(self.forwarder.link.streams))]
                                 * bool(self.forwarder.link.streams))
            await wait_until(lambda: not leftovers(), 5, lambda: "leftovers: %r" % leftovers())
            self.assertEqual(self.router.services["web"].streams, 0)
            # and the router still serves new peers
            services = await list_services(router=self.router_address)
            self.assertEqual([(s["name"], s["streams"]) for s in services], [("web", 0)])
            newcomer = await self.start_forwarder("web")
            payload = os.urandom(512 * 1024)
            echoed = await self.loop.run_in_executor(None, exchange, newcomer.port, payload)
            self.assertTrue(echoed == payload, "the echo differs")
            self.assertEqual(errors.lines, [], seed)
        self.run_async(main(), 60)



# ---------------------------------------------------------------------------
# 12. Readiness: --ready-fd, the structured way to learn that a role is up and where
# ---------------------------------------------------------------------------

@unittest.skipUnless(os.name == "posix", "passes a pipe's file descriptor to the child")
class TestReadyFd(unittest.TestCase):
    """A role started with --ready-fd FD writes one JSON line there once it is ready, with
    the addresses it really bound, and closes FD: no log line has to be read."""

    def start_ready(self, *args):
        """Start a role with --ready-fd on a pipe: (process, its report)."""
        read_end, write_end = os.pipe()
        log = tempfile.TemporaryFile()
        self.addCleanup(log.close)
        process = subprocess.Popen(
            [sys.executable, "-u"] + MODULE + list(args) + ["--ready-fd", str(write_end)],
            cwd=HERE, env=cli_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=log, pass_fds=(write_end,))
        os.close(write_end)

        def stop():
            if process.poll() is None:
                process.kill()
            process.wait(10)
        self.addCleanup(stop)
        data, deadline = b"", time.monotonic() + 20
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            for _ in range(1000):           # until EOF: the role closes FD after its line
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not select.select([pipe], [], [], remaining)[0]:
                    break
                more = pipe.read(4096)
                if not more:
                    break
                data += more
        log.seek(0)
        said = log.read().decode("utf-8", "replace")
        self.assertTrue(data.endswith(b"\n"), "no ready line (%r); stderr:\n%s" % (data, said))
        self.assertEqual(data.count(b"\n"), 1, data)
        self.assertIsNone(process.poll(), "the role exited after reporting; stderr:\n" + said)
        return process, json.loads(data.decode("utf-8"))

    def test_each_role_reports_where_it_really_listens_once_ready(self):
        target = ThreadedServer(self, blocking_echo)
        _router, report = self.start_ready("router", "--listen", "127.0.0.1:0")
        self.assertEqual(report["role"], "router")
        host, port = report["listen"][0]
        self.assertEqual(host, LOCALHOST)
        self.assertNotEqual(port, 0)
        status, _headers, body = http_request(port, b"GET /healthz HTTP/1.0\r\n\r\n")
        self.assertEqual((status.split()[1], body), ("200", b"ok\n"))
        router = "127.0.0.1:%d" % port

        _share, report = self.start_ready("share", "ready", str(target.port), "--router", router)
        self.assertEqual(report, {"role": "share", "services": ["ready"]})
        listed = run_cli("list", "--json", "--router", router)      # ready means registered
        self.assertEqual(listed.code, 0, listed.err)
        self.assertEqual([s["name"] for s in json.loads(listed.out)], ["ready"])

        _forward, report = self.start_ready("forward", "ready", "127.0.0.1:0", "--router", router)
        self.assertEqual(report["role"], "forward")
        self.assertEqual(report["service"], "ready")
        host, port = report["listen"][0]
        self.assertEqual(host, LOCALHOST)
        payload = os.urandom(100 * 1024)
        self.assertEqual(exchange(port, payload), payload)

    def test_a_ready_fd_that_is_not_open_is_one_line_and_exit_1(self):
        done = run_cli("router", "--listen", "127.0.0.1:0", "--ready-fd", "1000")
        self.assertEqual(done.code, 1, done.err)
        self.assertEqual(len(done.err.splitlines()), 1, done.err)
        self.assertIn("--ready-fd 1000", done.err)
        self.assertNotIn("Traceback", done.err)

    def test_bench_says_why_a_role_did_not_start(self):
        with socket.socket() as taken:
            taken.bind((LOCALHOST, 0))
            taken.listen(1)
            argv = [SCRIPT, "router", "--listen", "127.0.0.1:%d" % taken.getsockname()[1],
                    "--ready-fd", "1"]
            with self.assertRaises(MindmeldError) as failed:
                mindmeld._Child(argv, "router", timeout=20)
        self.assertIn("the router did not start", str(failed.exception))
        self.assertIn("cannot listen", str(failed.exception))

    def test_bench_learns_the_port_from_the_report(self):
        child = mindmeld._Child([SCRIPT, "router", "--listen", "127.0.0.1:0", "--ready-fd", "1"],
                                "router", timeout=20)
        self.addCleanup(child.stop)
        self.assertEqual(child.report["role"], "router")
        status, _headers, body = http_request(child.port, b"GET /healthz HTTP/1.0\r\n\r\n")
        self.assertEqual((status.split()[1], body), ("200", b"ok\n"))
# The operator's view: /metrics, the status page, who may see them
# ---------------------------------------------------------------------------

METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
METRIC_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)\Z")
METRIC_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(,|\Z)')
METRIC_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


def parse_exposition(test, text):
    """Prometheus text format 0.0.4, read strictly, line by line: ({name: type},
    {(name, ((label, value), ...)): value}).  Every sample follows its HELP and TYPE."""
    test.assertTrue(text.endswith("\n"), "the text must end with a newline")
    helps, types, samples = {}, {}, {}
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            test.assertRegex(name, METRIC_NAME)
            test.assertNotIn(name, helps, "HELP twice")
            test.assertTrue(help_text, "an empty HELP for %s" % name)
            helps[name] = help_text
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            test.assertIn(name, helps, "TYPE before HELP for %s" % name)
            test.assertNotIn(name, types, "TYPE twice")
            test.assertIn(kind, ("counter", "gauge"))
            if kind == "counter":
                test.assertTrue(name.endswith("_total"), name)
            types[name] = kind
        else:
            match = METRIC_SAMPLE.match(line)
            test.assertIsNotNone(match, "not a sample line: %r" % line)
            name, label_text, value = match.groups()
            test.assertIn(name, types, "a sample with no TYPE: %r" % line)
            labels, rest = [], label_text or ""
            for _ in range(100):
                if not rest:
                    break
                pair = METRIC_LABEL.match(rest)
                test.assertIsNotNone(pair, "bad labels in %r" % line)
                labels.append((pair.group(1), re.sub(r'\\[\\"n]', lambda m: METRIC_UNESCAPE[m.group()],
                                                     pair.group(2))))
                rest = rest[pair.end():]
            key = (name, tuple(labels))
            test.assertNotIn(key, samples, "a sample twice: %r" % line)
            samples[key] = float(value)
            if types[name] == "counter":
                test.assertGreaterEqual(samples[key], 0)
    return types, samples


async def http_get(port, path, headers=(), method="GET"):
    """(status code, {header: value}, body) of one request to 127.0.0.1:port."""
    reader, writer = await asyncio.open_connection(LOCALHOST, port)
    try:
        writer.write(("%s %s HTTP/1.1\r\nHost: router\r\n%s\r\n" % (
            method, path, "".join("%s: %s\r\n" % h for h in headers))).encode("latin-1"))
        answer = await asyncio.wait_for(reader.read(), 10)     # to EOF: the router closes
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = dict((k.strip().lower(), v.strip()) for k, _, v in (l.partition(":") for l in lines[1:]))
    test_length = int(fields.get("content-length", -1))
    if method != "HEAD" and test_length != len(body):
        raise AssertionError("Content-Length %d, body %d bytes" % (test_length, len(body)))
    return int(lines[0].split()[1]), fields, body.decode("utf-8")


HOSTILE_AGENT = '<script>alert("agent")</script>\x1b[2J\u202egnp.exe'


class TestOperatorView(LoopTestCase):
    """What the router shows its operator, to whom, and what it costs nobody else."""

    # -- pure parts: no sockets --------------------------------------------------------
    def test_who_may_see_the_status(self):
        allowed = mindmeld.status_allowed
        bearer = {"authorization": "Bearer s3cret"}
        for client in ("127.0.0.1", "10.1.2.3", "2001:db8::1", ""):
            with self.subTest(client=client):      # with a token, only the token counts
                self.assertTrue(allowed("s3cret", bearer, client))
                self.assertTrue(allowed("s3cret", {"authorization": "bearer  s3cret "}, client))
                for wrong in ({}, {"authorization": "Bearer s3cre"}, {"authorization": "Bearer s3cret2"},
                              {"authorization": "Basic czNjcmV0"}, {"authorization": "s3cret"},
                              {"authorization": "Bearer"}, {"authorization": "Bearer \xe9"},
                              {"authorization": "Bearer s3cret\u0100"}):
                    self.assertFalse(allowed("s3cret", wrong, client), wrong)
        for client in ("127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"):
            with self.subTest(client=client):      # no token: loopback only
                self.assertTrue(allowed(None, {}, client))
                self.assertTrue(allowed(None, bearer, client))
                self.assertFalse(allowed(None, {"x-forwarded-for": "203.0.113.9"}, client))
                self.assertFalse(allowed(None, {"forwarded": "for=203.0.113.9"}, client))
        for client in ("10.1.2.3", "192.168.0.1", "203.0.113.9", "2001:db8::1", "::ffff:10.0.0.1",
                       "fe80::1%eth0", "", "localhost", "not an address"):
            with self.subTest(client=client):
                self.assertFalse(allowed(None, {}, client))
                self.assertFalse(allowed(None, bearer, client))
                self.assertFalse(allowed("", bearer, client))

    def test_exposition_lines_and_label_escaping_parse_back(self):
        hostile = 'a "quoted" \\ back\nslash'
        lines = mindmeld.metric_family("x_things_total", "counter", "Things.\nWith \\ a second line.",
                                       [((("name", hostile), ("kind", "plain")), 3),
                                        ((("name", "other"), ("kind", "")), 0)])
        lines += mindmeld.metric_family("x_level", "gauge", "A level.", 0.25)
        lines += mindmeld.metric_family("x_big", "gauge", "A big one.", 2 ** 53 + 1)
        self.assertEqual(lines[0], "# HELP x_things_total Things.\\nWith \\\\ a second line.")
        self.assertEqual(lines[2], 'x_things_total{name="a \\"quoted\\" \\\\ back\\nslash",kind="plain"} 3')
        self.assertEqual(lines[-1], "x_big %d" % (2 ** 53 + 1))    # integers stay exact
        types, samples = parse_exposition(self, "\n".join(lines) + "\n")
        self.assertEqual(types, {"x_things_total": "counter", "x_level": "gauge", "x_big": "gauge"})
        self.assertEqual(samples[("x_things_total", (("name", hostile), ("kind", "plain")))], 3)
        self.assertEqual(samples[("x_things_total", (("name", "other"), ("kind", "")))], 0)
        self.assertEqual(samples[("x_level", ())], 0.25)
        self.assertEqual([mindmeld.metric_number(v) for v in (float("inf"), float("-inf"), 1.5, True)],
                         ["+Inf", "-Inf", "1.5", "1"])

    def test_html_text_makes_hostile_text_inert(self):
        text = mindmeld.html_text(HOSTILE_AGENT + "\x00\x7f\x9b'&")
        self.assertEqual(text, "&lt;script&gt;alert(&quot;agent&quot;)&lt;/script&gt;\\x1b[2J\\u202egnp.exe"
                               "\\x00\\x7f\\x9b&#x27;&amp;")

    # -- one router in this event loop ------------------------------------------------
    async def tunnel_with_monitor(self, **router_options):
        router = Router(LOCALHOST, 0, **router_options)
        router.monitor.sample_interval = 0.05       # the sparkline fills in a blink
        await router.start()
        self._async_cleanups.append(lambda: router.close(0))
        self.router, self.router_address = router, "%s:%d" % (LOCALHOST, router.port)
        token = router_options.get("token")
        client = {"token": token} if token else {}
        target = await self.start_target(echo_handler)
        self.sharer = await self.start_sharer({"web": (LOCALHOST, target)}, **client)
        self.forwarder = await self.start_forwarder("web", **client)
        return router

    async def scrape(self, port, headers=()):
        code, fields, body = await http_get(port, "/metrics", headers)
        self.assertEqual(code, 200, body)
        self.assertEqual(fields["content-type"], "text/plain; version=0.0.4; charset=utf-8")
        return parse_exposition(self, body)

    def assert_grew(self, types, before, after):
        for key, value in before.items():
            if types[key[0]] == "counter":
                self.assertGreaterEqual(after.get(key, -1), value, key)

    def test_metrics_after_a_known_transfer(self):
        async def main():
            router = await self.tunnel_with_monitor(metrics_per_service=True)
            types, first = await self.scrape(router.port)
            for name in ("mindmeld_peers", "mindmeld_services", "mindmeld_open_streams",
                         "mindmeld_streams_opened_total", "mindmeld_streams_refused_total",
                         "mindmeld_relayed_bytes_total", "mindmeld_handshakes_failed_total",
                         "mindmeld_peers_dropped_total", "mindmeld_peer_buffer_bytes",
                         "mindmeld_peer_buffer_budget_bytes", "process_start_time_seconds",
                         "mindmeld_service_relayed_bytes_total"):
                self.assertIn(name, types)
            if os.path.exists("/proc/self/statm"):
                self.assertGreater(first[("process_resident_memory_bytes", ())], MB)
                self.assertGreater(first[("process_open_fds", ())], 3)
            self.assertEqual(first[("mindmeld_peers", (("role", "sharer"),))], 1)
            self.assertEqual(first[("mindmeld_peers", (("role", "forwarder"),))], 1)
            self.assertEqual(first[("mindmeld_services", ())], 1)

            reader, writer = await self.connect(self.forwarder.port)
            half = os.urandom(1536 * 1024 + 7)
            writer.write(half)
            back = await asyncio.wait_for(reader.readexactly(len(half)), 20)
            self.assertTrue(back == half)
            _, middle = await self.scrape(router.port)          # the stream is still open
            self.assertEqual(middle[("mindmeld_open_streams", ())], 1)
            for direction in ("to_sharer", "from_sharer"):
                self.assertEqual(middle[("mindmeld_relayed_bytes_total", (("direction", direction),))],
                                 len(half))
            writer.write(half[::-1])
            writer.write_eof()
            count, _, _ = await read_to_end(reader, 4 * MB)
            self.assertEqual(count, len(half))
            await wait_until(lambda: router.relayed == 0, 5, 'router.relayed == 0')
            await wait_until(lambda: len(router.monitor.history) >= 3, 5, 'len(router.monitor.history) >= 3')
            _, last = await self.scrape(router.port)
            # payload bytes exactly: the 10-byte frame headers are not counted
            for direction in ("to_sharer", "from_sharer"):
                self.assertEqual(last[("mindmeld_relayed_bytes_total", (("direction", direction),))],
                                 2 * len(half))
                self.assertEqual(last[("mindmeld_service_relayed_bytes_total",
                                       (("service", "web"), ("direction", direction)))], 2 * len(half))
            self.assertEqual(last[("mindmeld_streams_opened_total", ())], 1)
            self.assertEqual(last[("mindmeld_service_streams_opened_total", (("service", "web"),))], 1)
            self.assertEqual(last[("mindmeld_open_streams", ())], 0)
            self.assertEqual(sum(v for (n, _), v in last.items() if n.endswith("_failed_total")
                                 or n.endswith("_dropped_total") or n.endswith("_refused_total")), 0)
            self.assert_grew(types, first, middle)
            self.assert_grew(types, middle, last)

            code, fields, page = await http_get(router.port, "/")
            self.assertEqual((code, fields["content-type"]), (200, "text/html; charset=utf-8"))
            self.assertIn('<meta http-equiv="refresh" content="5">', page)
            self.assertIn("<svg", page)
            self.assertIn("<td>web</td>", page)
            self.assertIn("3.1 MB", page)                # 2 x 1.5 MiB, each way
            self.assertRegex(page, r"(?m)^services 1$")   # the text at the top reads well in curl
            for external in ("<script", "src=", "href=", "url(", "@import", "<link", "http:", "https:"):
                self.assertNotIn(external, page)
            await router.close()
            self.assertIsNone(router.monitor._timer, "close() cancels the sampling timer")
        self.run_async(main(), 40)

    def test_the_token_guards_the_page_and_the_metrics(self):
        token = "tok-3f9a-never-shown"
        async def main():
            router = await self.tunnel_with_monitor(token=token)
            port = router.port
            code, _, page = await http_get(port, "/healthz")
            self.assertEqual((code, page), (200, "ok\n"))
            for headers in ((), (("Authorization", "Bearer wrong"),), (("Authorization", token),),
                            (("Authorization", "Bearer " + token + "x"),)):
                with self.subTest(headers=headers):
                    code, _, page = await http_get(port, "/", headers)
                    self.assertEqual((code, page), (200, mindmeld.MINIMAL_STATUS_PAGE))
                    code, fields, body = await http_get(port, "/metrics", headers)
                    self.assertEqual(code, 401)
                    self.assertTrue(fields["www-authenticate"].startswith("Bearer"))
                    for secret in ("web", mindmeld.__version__, "127.0.0.1", token, "mindmeld_"):
                        self.assertNotIn(secret, page + body)
            bearer = (("Authorization", "Bearer " + token),)
            _, samples = await self.scrape(port, bearer)
            self.assertEqual(samples[("mindmeld_services", ())], 1)
            self.assertNotIn("mindmeld_service_relayed_bytes_total", {n for n, _ in samples})
            code, _, page = await http_get(port, "/", bearer)
            self.assertEqual(code, 200)
            self.assertIn("<td>web</td>", page)
            self.assertIn("token required", page)
            self.assertNotIn(token, page)
            code, _, body = await http_get(port, "/metrics", bearer, method="HEAD")
            self.assertEqual((code, body), (200, ""))
        self.run_async(main(), 30)

    def test_peer_supplied_text_is_escaped_on_the_page(self):
        async def main():
            router = await self.tunnel_with_monitor()
            reader, writer = await self.connect(router.port)
            writer.write(PREAMBLE + encode_json(HELLO, 0, {"version": PROTOCOL_VERSION, "role": "forward",
                                                           "agent": HOSTILE_AGENT}))
            writer.write(encode_json(OPEN, 1, {"service": "nope"}))
            decoder, seen = FrameDecoder(), []
            for _ in range(100):                    # HELLO, then OPEN_REFUSED for "nope"
                if any(f[0] == OPEN_REFUSED for f in seen):
                    break
                data = await asyncio.wait_for(reader.read(CHUNK), 5)
                self.assertTrue(data, "the router closed the connection")
                seen.extend(decoder.feed(data))
            code, _, page = await http_get(router.port, "/")
            self.assertEqual(code, 200)
            self.assertIn(mindmeld.html_text(HOSTILE_AGENT), page)
            for raw in ("<script", "\x1b", "\u202e"):
                self.assertNotIn(raw, page)
            # a protocol error that quotes the peer's own text: listed, escaped
            writer.write(encode_json(REGISTER, 2, {"name": "<b>bold</b>"}))
            await wait_until(lambda: len(router.peers) == 2, 5, 'len(router.peers) == 2')
            code, _, page = await http_get(router.port, "/")
            self.assertIn("invalid service name &#x27;&lt;b&gt;bold&lt;/b&gt;&#x27;", page)
            self.assertNotIn("<b>", page)
            _, samples = await self.scrape(router.port)
            self.assertEqual(samples[("mindmeld_streams_refused_total", (("reason", "no_service"),))], 1)
            self.assertEqual(samples[("mindmeld_peers_dropped_total", (("reason", "protocol"),))], 1)
            # and a handshake that fails: the wrong protocol version
            reader, writer = await self.connect(router.port)
            writer.write(MAGIC + bytes([PROTOCOL_VERSION + 1]))
            try:
                await asyncio.wait_for(read_to_end(reader, MB), 5)   # a GOAWAY, then closed
            except ConnectionResetError:
                pass
            await wait_until(lambda: len(router.peers) == 2, 5, 'len(router.peers) == 2')
            _, samples = await self.scrape(router.port)
            self.assertEqual(samples[("mindmeld_handshakes_failed_total", (("reason", "version"),))], 1)
        self.run_async(main(), 30)

    def test_status_listen_serves_the_same_rules(self):
        async def main():
            router = await self.tunnel_with_monitor(status_listen="127.0.0.1:0")
            (host, port), = router.monitor.status_addresses
            self.assertEqual(host, LOCALHOST)
            code, _, page = await http_get(port, "/")
            self.assertEqual(code, 200)
            self.assertIn("<td>web</td>", page)
            code, _, page = await http_get(port, "/", (("X-Forwarded-For", "203.0.113.9"),))
            self.assertEqual((code, page), (200, mindmeld.MINIMAL_STATUS_PAGE))
            _, samples = await self.scrape(port)
            self.assertEqual(samples[("mindmeld_peers", (("role", "forwarder"),))], 1)
            self.assertEqual((await http_get(port, "/healthz"))[::2], (200, "ok\n"))
            self.assertEqual((await http_get(port, "/mindmeld"))[0], 404)
            self.assertEqual((await http_get(port, "/", method="POST"))[0], 405)
            idle_reader, _ = await self.connect(port)           # says nothing: closed with the router
            await router.close()
            try:
                self.assertEqual(await asyncio.wait_for(idle_reader.read(CHUNK), 5), b"")
            except ConnectionResetError:
                pass
            with self.assertRaises(OSError):
                await asyncio.open_connection(LOCALHOST, port)
        self.run_async(main(), 30)

    def test_command_line_flags(self):
        router = Proc(self, ["router", "--listen", "127.0.0.1:0", "--status-listen", "127.0.0.1:0",
                             "--token", "cli-token", "--metrics-per-service"])
        port = int(router.wait_line(r"status page and /metrics on http://127\.0\.0\.1:(\d+)/").group(1))
        line, headers, body = http_request(port, b"GET /metrics HTTP/1.1\r\nAuthorization: Bearer "
                                                 b"cli-token\r\n\r\n")
        self.assertIn(" 200 ", line)
        types, _ = parse_exposition(self, body.decode())
        self.assertIn("mindmeld_service_relayed_bytes_total", types)
        self.assertEqual(http_request(port, b"GET /metrics HTTP/1.1\r\n\r\n")[0].split()[1], "401")
        code, lines = router.signal(signal.SIGTERM)
        self.assertEqual(code, 0, lines)
        with socket.socket() as busy:
            busy.bind((LOCALHOST, 0))
            busy.listen(1)
            for address, words in (("127.0.0.1:http", "bad status listen address"),
                                   ("127.0.0.1:%d" % busy.getsockname()[1], "for the status page")):
                done = run_cli("router", "--listen", "127.0.0.1:0", "--status-listen", address)
                self.assertEqual(done.code, 1, done.err)
                errors = [l for l in done.err.splitlines() if "error" in l]
                self.assertEqual(len(errors), 1, done.err)
                self.assertTrue(errors[0].startswith("mindmeld router: error: "), errors[0])
                self.assertIn(words, errors[0])
                self.assertNotIn("Traceback", done.err)


# ---------------------------------------------------------------------------
# 13. Messages a user sees: internal errors, mislabelled frames, numeric flags
# ---------------------------------------------------------------------------

# The real command line, with the protocol of every connection the router accepts
# broken so that its receive callback raises: a bug that escapes a callback.
BROKEN_ROUTER = """
import sys
sys.path.insert(0, %(here)r)
import mindmeld

real_create_server = mindmeld._create_server


async def broken_create_server(factory, host, port, **options):
    def broken():
        protocol = factory()

        def boom(*_args):
            sys.stderr.write("test: raising inside a callback\\n")
            raise ZeroDivisionError("boom")
        protocol.buffer_updated = protocol.data_received = boom
        return protocol
    server = await real_create_server(broken, host, port, **options)
    sys.stderr.write("test: port %%d\\n" %% server.sockets[0].getsockname()[1])
    return server

mindmeld._create_server = broken_create_server
sys.exit(mindmeld.main(sys.argv[1:]))
"""

INTERNAL_ERROR_LINE = (r"internal error: ZeroDivisionError: boom \(.*\); "
                       r"run with -v for a traceback$")


def read_frame(conn):
    """(type, id, payload) of the next frame, or None at EOF."""
    header = recv_exactly(conn, HEADER_SIZE)
    if len(header) < HEADER_SIZE:
        return None
    length, ftype, _flags, stream_id = HEADER.unpack(header)
    return ftype, stream_id, recv_exactly(conn, length)


class TestWhatUsersSee(unittest.TestCase):
    """One line for what went wrong, naming the right thing; usage errors exit 2."""

    def broken_router(self, *flags):
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder, True)
        script = os.path.join(folder, "broken_router.py")
        with open(script, "w") as f:
            f.write(BROKEN_ROUTER % {"here": HERE})
        router = Proc(self, ["router", "--listen", "127.0.0.1:0"] + list(flags), script=script)
        return router, int(router.wait_line(r"^test: port (\d+)").group(1))

    def poke(self, router, port):
        """Send a preamble; the router's callback raises (the line says so before)."""
        with socket.create_connection((LOCALHOST, port), timeout=10) as conn:
            conn.sendall(PREAMBLE)
            router.wait_line(r"^test: raising inside a callback")

    def test_an_exception_inside_a_callback_is_one_line_at_every_level(self):
        for flags in ([], ["-q"]):
            with self.subTest(flags=flags):
                router, port = self.broken_router(*flags)
                self.poke(router, port)
                self.poke(router, port)         # the same bug again: not another line
                code, lines = router.signal(signal.SIGTERM)
                self.assertEqual(code, 0, lines)
                errors = [l for l in lines if "internal error" in l]
                self.assertEqual(len(errors), 1, lines)
                self.assertRegex(errors[0], INTERNAL_ERROR_LINE)
                self.assertFalse([l for l in lines if "Traceback" in l], lines)

    def test_with_v_the_internal_error_has_its_traceback(self):
        router, port = self.broken_router("-v")
        self.poke(router, port)
        code, lines = router.signal(signal.SIGTERM)
        self.assertEqual(code, 0, lines)
        errors = [i for i, l in enumerate(lines) if re.search(INTERNAL_ERROR_LINE, l)]
        self.assertEqual(len(errors), 1, lines)
        after = lines[errors[0] + 1:]
        self.assertTrue(after and after[0].startswith("Traceback"), lines)
        self.assertIn("ZeroDivisionError: boom", after)

    def test_negative_numbers_are_usage_errors(self):
        cases = [
            (("share", "web", "1", "--grace", "-1"), "argument --grace: must be 0 or more"),
            (("router", "--grace", "-0.5"), "argument --grace: must be 0 or more"),
            (("forward", "web", "--grace", "nan"), "argument --grace: 'nan' is not a number of seconds"),
            (("list", "--keepalive", "-1"), "argument --keepalive: must be more than 0"),
            (("share", "web", "1", "--max-retries", "-1"),
             "argument --max-retries: '-1' is not a whole number of 0 or more"),
        ]
        for args, message in cases:
            with self.subTest(args=args):
                completed = run_cli(*args)
                self.assertEqual(completed.code, 2, completed.err)
                self.assertTrue(completed.err.startswith("usage: "), completed.err)
                errors = [l for l in completed.err.splitlines() if "error" in l]
                self.assertEqual(errors, ["mindmeld %s: error: %s" % (args[0], message)],
                                 completed.err)

    def test_shared_options_keep_their_defaults_and_appear_once(self):
        parser = mindmeld.build_parser()
        for args in (["router"], ["share", "web", "1"], ["forward", "web"]):
            with self.subTest(args=args):
                self.assertEqual(parser.parse_args(args).grace, mindmeld.GRACE_PERIOD)
                self.assertEqual(parser.parse_args(args + ["--grace", "0"]).grace, 0.0)
        for command in ("router", "share", "list"):
            with self.subTest(command=command):
                completed = run_cli(command, "--help")
                self.assertEqual(completed.code, 0, completed.err)
                for flag in ("--token TOKEN", "--token-file FILE", "--state-dir DIR"):
                    self.assertEqual(len(re.findall(r"^  %s" % re.escape(flag), completed.out.decode(),
                                                    re.MULTILINE)), 1, completed.out.decode())

    # -- a router that breaks the protocol: the line names the frame at fault ---------
    def fake_router(self, hello, answer):
        """A router that sends `hello` after the client's, then answer(type, id, payload)
        (bytes) for each frame it receives."""
        def handler(conn):
            recv_exactly(conn, len(PREAMBLE))
            read_frame(conn)
            conn.sendall(encode_json(HELLO, 0, hello))
            for _ in range(100):
                frame = read_frame(conn)
                if frame is None:
                    return
                conn.sendall(answer(*frame))
        return "%s:%d" % (LOCALHOST, ThreadedServer(self, handler).port)

    def assertOneLine(self, completed, text):
        self.assertEqual(completed.code, 1, completed.err)
        self.assertNotIn("internal error", completed.err)
        self.assertNotIn("Traceback", completed.err)
        self.assertEqual(completed.err.splitlines()[-1].split(": error: ", 1)[1:],
                         ["protocol error: " + text], completed.err)

    def test_malformed_nonce_in_hello_is_a_protocol_error(self):
        router = self.fake_router({"version": PROTOCOL_VERSION, "agent": "fake", "nonce": "not hex",
                                   "auth": "token"}, lambda *_frame: b"")
        completed = run_cli("list", "--router", router, "--token", "secret")
        self.assertOneLine(completed, "HELLO with a malformed nonce")

    def test_malformed_list_reply_is_named_list_reply(self):
        def answer(ftype, request_id, _payload):
            return encode_frame(LIST_REPLY, request_id, b"{not json") if ftype == LIST else b""
        router = self.fake_router({"version": PROTOCOL_VERSION, "agent": "fake",
                                   "nonce": "00" * 16, "auth": "none"}, answer)
        completed = run_cli("list", "--router", router)
        self.assertOneLine(completed, "LIST_REPLY frame carries malformed JSON")

    def test_open_refused_sent_to_a_sharer_is_named_open_refused(self):
        target = socket.socket()
        self.addCleanup(target.close)
        target.bind((LOCALHOST, 0))
        target.listen(4)

        def answer(ftype, request_id, _payload):
            if ftype != REGISTER:
                return b""
            return (encode_json(REGISTERED, request_id, {"ok": True, "name": "web"})
                    + encode_json(OPEN, 2, {"service": "web"})
                    + encode_json(OPEN_REFUSED, 2, {"reason": "nonsense"}))
        router = self.fake_router({"version": PROTOCOL_VERSION, "agent": "fake",
                                   "nonce": "00" * 16, "auth": "none"}, answer)
        completed = run_cli("share", "web", "%d" % target.getsockname()[1], "--router", router,
                        "--max-retries", "0")
        self.assertIn("OPEN_REFUSED on stream 2 in state open-received", completed.err)
        self.assertNotIn("OPEN_OK", completed.err)
        self.assertEqual(completed.code, 1, completed.err)


    def test_a_bad_window_in_an_open_to_a_sharer_is_one_line(self):
        """A router's OPEN with a grow the sharer never asked for, or a malformed credit:
        one line, then the sharer leaves that router (it used to fail inside its own clean-up
        and hang).  A long value is cut short in that line (it was printed whole)."""
        target = socket.socket()
        self.addCleanup(target.close)
        target.bind((LOCALHOST, 0))
        target.listen(4)
        long_text = "\x1b[2J" + "A" * 8000          # what the user sees stays one short line
        for fields, said in (({"grow": 1000}, "a grow of 1000 in an opening frame, but this end "
                                              "asked for 0"),
                             ({"credit": "x"}, "credit of 'x' in an opening frame (must be 512 "
                                               "to 16777216)"),
                             ({"grow": long_text}, mindmeld.short_reason(
                                 "grow of %r in an opening frame (must be 0 to 261632)"
                                 % long_text))):
            def answer(ftype, request_id, _payload, fields=fields):
                if ftype != REGISTER:
                    return b""
                return (encode_json(REGISTERED, request_id, {"ok": True, "name": "web"})
                        + encode_json(OPEN, 2, dict(fields, service="web")))
            router = self.fake_router({"version": PROTOCOL_VERSION, "agent": "fake",
                                       "nonce": "00" * 16, "auth": "none"}, answer)
            completed = run_cli("share", "web", "%d" % target.getsockname()[1], "--router",
                                router, "--max-retries", "0")
            self.assertEqual(completed.code, 1, completed.err)
            self.assertNotIn("Traceback", completed.err)
            self.assertNotIn("internal error", completed.err)
            self.assertEqual(completed.err.splitlines()[-1],
                             "mindmeld share: error: protocol error: %s; giving up after 0 "
                             "retries (--max-retries)" % said)


class TestCloseEndsWithTheLastStream(LoopTestCase):
    """close(grace) waits for open streams, and no longer than the last of them."""

    def close_while_a_stream_is_open(self, which):
        async def main():
            port = await self.tunnel(echo_handler)
            reader, writer = await self.connect(port)
            writer.write(b"x")
            self.assertEqual(await reader.readexactly(1), b"x")        # the stream is open
            role = getattr(self, which)
            closing = asyncio.ensure_future(role.close(60))
            await wait_until(lambda: role.drained is not None, 10, "close() is not waiting for the open stream")
            self.assertFalse(closing.done())
            writer.write_eof()                                          # the stream ends
            self.assertEqual(await reader.read(), b"")
            await asyncio.wait_for(closing, 10)                         # not the 60 s grace
        self.run_async(main(), 30)

    def test_router(self):
        self.close_while_a_stream_is_open("router")

    def test_forwarder(self):
        self.close_while_a_stream_is_open("forwarder")

    def test_sharer(self):
        self.close_while_a_stream_is_open("sharer")


# ---------------------------------------------------------------------------
# 14. Hardening: what the other end of one stream gets wrong ends that stream only
# ---------------------------------------------------------------------------

class TestFarEndFaults(HostileTestCase):

    def test_a_pairing_message_out_of_range_is_refused_and_the_sharer_stays(self):
        """A forwarder whose pairing message is 0 (well formed, so the router passes it): it
        gives no key, so the sharer refuses that one stream and keeps its link for the rest."""
        async def main():
            traffic = await self.honest(secret="s3cret")
            peer = await self.raw_peer()
            peer.send(encode_json(OPEN, 1, {"service": "web", "e2e": {"pair": "ab" * 16, "pake": "00" * 256}}))
            refusal = json.loads((await peer.frame(OPEN_REFUSED, 1))[3].decode())
            self.assertIn("pairing message out of range", refusal["reason"])
            self.assertEqual(await peer.settled(), "pong")
            peer.writer.close()
            await self.after(traffic)           # byte-exact, on the same sharer link
        self.run_async(main(), 30)

    def test_an_open_that_would_grow_past_the_frame_limit_cannot_drop_the_sharer(self):
        """Fields the router only passed on (a nonce of escaped characters) grew the OPEN it
        sent the sharer past MAX_CONTROL, and the sharer lost its link for it."""
        async def attack():
            peer = await self.raw_peer()
            body = json.dumps({"service": "web", "nonce": "\u00e9" * 8000}, ensure_ascii=False)
            peer.send(encode_frame(OPEN, 1, body.encode("utf-8")))   # 16,033 bytes: allowed
            await peer.frame(OPEN_OK, 1)        # the sharer got an OPEN without it, and accepted
            self.assertEqual(await peer.settled(), "pong")
            peer.writer.close()
        self.against_honest_peers(attack)

    def test_a_bad_pairing_answer_resets_its_stream_and_the_forwarder_stays(self):
        """A sharer that answers a pairing with a message that gives no key: the forwarder
        resets that stream, says the sharer could not prove the secret, and keeps its link."""
        async def main():
            self.router = await self.start_router()
            sharer = await self.raw_peer()
            sharer.send(encode_json(REGISTER, 1, {"name": "evil", "owner": "ab" * 16,
                                                  "verifier": "cd" * 32}))
            self.assertTrue(json.loads((await sharer.frame(REGISTERED, 1))[3].decode())["ok"])
            forwarder = await self.start_forwarder("evil", secret="x")
            link = forwarder.link
            for attempt in range(2):            # the same link, twice
                reader, writer = await self.connect(forwarder.port)
                _t, _f, stream_id, payload = await sharer.frame(OPEN)
                pair = json.loads(payload.decode())["e2e"]["pair"]
                sharer.send(encode_json(OPEN_OK, stream_id, {"e2e": {"pair": pair, "pake": "00" * 256}}))
                reset = json.loads((await sharer.frame(RESET, stream_id))[3].decode())
                self.assertIn("could not prove the secret", reset["reason"])
                self.assertIs(forwarder.link, link)
                self.assertFalse(link.closing)
                self.assertIn(await read_until_closed(reader, 5), ("eof", "reset"))
                writer.close()
        self.run_async(main(), 30)


class TestPeerTextIsEscaped(HostileTestCase):
    """Reasons, names and messages a remote party chooses are printed with control
    characters escaped, so they cannot rewrite a user's terminal."""

    HOSTILE = "ok\x1b[2J\x1b]0;pwned\x07\rgone\u202e"

    def assertPrintable(self, text):
        self.assertFalse([c for c in text if ord(c) < 32 and c not in "\n" or 0x7f <= ord(c) < 0xa0
                          or c == "\u202e"], repr(text))

    def test_a_refusal_reason_reaches_the_forwarder_log_escaped(self):
        async def main():
            self.router = await self.start_router()
            sharer = await self.raw_peer()
            sharer.send(encode_json(REGISTER, 1, {"name": "evil", "owner": "ab" * 16}))
            await sharer.frame(REGISTERED, 1)
            forwarder = await self.start_forwarder("evil")
            reader, _writer = await self.connect(forwarder.port)
            _t, _f, stream_id, _p = await sharer.frame(OPEN)
            sharer.send(encode_json(OPEN_REFUSED, stream_id, {"reason": self.HOSTILE}))
            self.assertIn(await read_until_closed(reader, 5), ("eof", "reset"))
            lines = [l for l in self.logs if "refused" in l and "evil" in l]
            self.assertEqual(len(lines), 1, self.logs)
            self.assertIn("\\x1b[2J", lines[0])
            self.assertPrintable(lines[0])
        self.run_async(main(), 30)

    def test_list_prints_a_hostile_routers_names_escaped(self):
        listener = socket.socket()
        listener.bind((LOCALHOST, 0))
        listener.listen(1)
        self.addCleanup(listener.close)
        hostile = self.HOSTILE

        def fake_router():
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(10)
                decoder, frames = FrameDecoder(), []
                data = conn.recv(CHUNK)[len(PREAMBLE):]
                for _ in range(100):
                    frames += decoder.feed(data)
                    if any(f[0] == LIST for f in frames):
                        break
                    if not frames:
                        data = conn.recv(CHUNK)
                        continue
                    conn.sendall(encode_json(HELLO, 0, {"version": PROTOCOL_VERSION, "auth": "none"}))
                    frames, data = [f for f in frames if f[0] != HELLO], conn.recv(CHUNK)
                request_id = [f for f in frames if f[0] == LIST][0][2]
                conn.sendall(encode_json(LIST_REPLY, request_id, {"services": [
                    {"name": hostile, "since": "soon", "streams": hostile, "peer": hostile}]}))
                conn.recv(CHUNK)
        thread = threading.Thread(target=fake_router)
        thread.daemon = True
        thread.start()
        done = run_cli("list", "--router", "%s:%d" % listener.getsockname())
        thread.join(10)
        self.assertEqual(done.code, 0, done.err)
        self.assertIn("ok\\x1b[2J", done.out.decode())
        self.assertPrintable(done.out.decode() + done.err)


class TestHandshakeFloodCommandLine(CommandLineMixin, unittest.TestCase):

    def test_a_thousand_idle_connections_from_one_address_lock_nobody_out(self):
        """1,200 connections from 127.0.0.2 that send a byte and then nothing, to a router
        with the usual 1,024 descriptors: `list` from 127.0.0.1 still gets in within 2 s,
        every time, while they hold on (the router used to run out of descriptors first)."""
        router, address = self.start_router()
        port = int(address.rsplit(":", 1)[1])
        try:
            import resource
            hard = resource.prlimit(router.pid, resource.RLIMIT_NOFILE)[1]
            resource.prlimit(router.pid, resource.RLIMIT_NOFILE, (1024, hard))
        except (ImportError, AttributeError, OSError, ValueError):
            pass                            # no prlimit here: its own limit, whatever it is
        flood = []
        self.addCleanup(lambda: [s.close() for s in flood])
        for round_ in range(3):
            for _ in range(1200 // 3):
                sock = socket.socket()
                sock.bind(("127.0.0.2", 0))
                sock.connect((LOCALHOST, port))
                sock.sendall(MAGIC[:1])             # a byte, then nothing
                flood.append(sock)
            started = time.monotonic()
            done = run_cli("list", "--router", address, timeout=10)
            took = time.monotonic() - started
            self.assertEqual(done.code, 0, done.err)
            self.assertLess(took, 2.0, "list took %.2f s during the flood" % took)
        self.assertTrue(router.running())
        _code, lines = router.signal(signal.SIGTERM)
        warnings = [l for l in lines if "unfinished handshakes" in l]
        self.assertLessEqual(len(warnings), 1, lines)   # never a line per connection


    def test_failed_handshakes_from_one_address_are_logged_a_few_times_then_counted(self):
        """40 connections from 127.0.0.2 that send what is not mindmeld: the router logs
        the first STRANGER_LOG_BURST, then one line saying it counts the rest; a stranger
        from another address is still logged."""
        router, address = self.start_router()
        port = int(address.rsplit(":", 1)[1])

        def stranger(source):
            sock = socket.socket()
            sock.bind((source, 0))
            sock.connect((LOCALHOST, port))
            sock.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
            sock.settimeout(10)
            recv_to_end(sock, 4096, timeout=10)     # the router closes it
            sock.close()
        for _ in range(40):
            stranger("127.0.0.2")
        stranger("127.0.0.3")
        _code, lines = router.signal(signal.SIGTERM)
        about_2 = [l for l in lines if "127.0.0.2" in l]
        burst = mindmeld.STRANGER_LOG_BURST
        self.assertEqual(len([l for l in about_2 if "SSH-2.0" in l]), burst, lines)
        self.assertEqual(len([l for l in about_2 if "counting the rest" in l]), 1, lines)
        self.assertEqual(len(about_2), burst + 1, lines)
        self.assertEqual(len([l for l in lines if "127.0.0.3" in l]), 1, lines)


class TestStrangerLog(HostileTestCase):

    def test_protocol_errors_before_the_handshake_are_held_to_the_same_few_lines(self):
        async def main():
            self.router = await self.start_router()
            for _ in range(mindmeld.STRANGER_LOG_BURST + 20):
                reader, writer = await self.connect(self.router.port)
                writer.write(PREAMBLE + encode_frame(PING, 0, b"12345678"))   # not HELLO
                await asyncio.wait_for(reader.read(), 5)     # GOAWAY, then closed
                writer.close()
            unexpected = [l for l in self.logs if "unexpected PING" in l]
            self.assertEqual(len(unexpected), mindmeld.STRANGER_LOG_BURST, self.logs)
            self.assertEqual(len([l for l in self.logs if "counting the rest" in l]), 1, self.logs)
        self.run_async(main(), 30)

    def test_a_router_with_a_token_tells_strangers_no_version(self):
        async def main():
            self.router = await self.start_router(token="t")
            hello = await (await self.raw_peer(handshake=False)).handshake()
            self.assertEqual((hello["agent"], hello["auth"]), ("mindmeld", "token"))
            self.assertNotIn(mindmeld.__version__, json.dumps(hello))
        self.run_async(main(), 10)

    def test_what_was_held_back_is_said_in_one_line_when_the_minute_is_over(self):
        self.addCleanup(setattr, mindmeld, "STRANGER_LOG_WINDOW", mindmeld.STRANGER_LOG_WINDOW)
        mindmeld.STRANGER_LOG_WINDOW = 0.3      # a minute would be long for a test

        async def main():
            self.router = await self.start_router()
            for _ in range(mindmeld.STRANGER_LOG_BURST + 5):
                reader, writer = await self.connect(self.router.port)
                writer.write(b"SSH-2.0-OpenSSH_9.2\r\n")
                await asyncio.wait_for(reader.read(), 5)     # the router closes it
                writer.close()
            await wait_until(lambda: [l for l in self.logs if "were not logged" in l], 5,
                             "the held-back count")
            refused = [l for l in self.logs if "SSH-2.0" in l]
            self.assertEqual(len(refused), mindmeld.STRANGER_LOG_BURST, self.logs)
            self.assertEqual([l for l in self.logs if "were not logged" in l],
                             ["router: 5 more failed handshakes from 127.0.0.1 were not logged"])
        self.run_async(main(), 30)


class TestWebSocketStrangers(HostileTestCase):
    """Before a WebSocket peer has authenticated, the router holds little for it."""

    async def upgraded(self):
        reader, writer = await self.connect(self.router.port)
        writer.write(b"GET /mindmeld HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade"
                     b"\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        self.assertIn(b" 101 ", head.split(b"\r\n")[0])
        peers = [p for p in self.router.peers if isinstance(p.transport, mindmeld.WebSocketLayer)]
        self.assertEqual(len(peers), 1)
        return reader, writer, peers[0]

    def test_pings_from_a_peer_that_does_not_read_queue_little(self):
        async def main():
            self.router = await self.start_router(token="t")
            reader, writer, peer = await self.upgraded()
            ping = ws_frame(0x9, b"p" * 125)
            for _ in range(20):                 # 10 MB of pings, never reading a pong
                writer.write(ping * 4000)
                await writer.drain()
            writer.write(ws_frame(0x2, PREAMBLE + encode_json(HELLO, 0, {"version": 1})))
            await wait_until(lambda: peer.phase != "preamble", 10, 'peer.phase != "preamble"')
            queued = peer.transport.get_write_buffer_size()
            self.assertLess(queued, mindmeld.WS_PONG_BACKLOG + 4096, "queued %d bytes" % queued)
        self.run_async(main(), 30)

    def test_an_upgraded_peer_that_never_says_hello_is_gone_after_the_deadline(self):
        async def main():
            self.router = await self.start_router(handshake_timeout=0.5)
            _reader, writer, peer = await self.upgraded()
            ping = ws_frame(0x9, b"p" * 125)
            for _ in range(5):                  # pings, no HELLO, and it never reads
                writer.write(ping * 2000)
                await writer.drain()
            await wait_until(lambda: not self.router.peers, 5, "the peer is dropped")
            self.assertTrue([l for l in self.logs if "did not complete the handshake" in l],
                            self.logs)
        self.run_async(main(), 30)

    def test_a_large_message_before_authenticating_is_refused(self):
        async def main():
            self.router = await self.start_router(token="t")
            reader, writer, peer = await self.upgraded()
            big = PREAMBLE + bytes(MB)          # a 1 MiB message, of which 64 KiB are sent
            writer.write(struct.pack("!BBQ", 0x82, 0x80 | 127, len(big)) + bytes(4) + big[:64 * 1024])
            _data, how = await RawPeer(self, reader, writer).closed()   # at once, not after 2 MiB
            self.assertIn(how, ("eof", "reset"))
            self.assertTrue([l for l in self.logs if "over the limit" in l], self.logs)
            await wait_until(lambda: not self.router.peers, 5, 'not self.router.peers')
        self.run_async(main(), 30)


class TestRouterMemory(HostileTestCase):
    """What one peer can make the router hold, and for how long."""

    def router_side(self, peer):
        sides = [p for p in self.router.peers if p.peer == peer.address]
        self.assertEqual(len(sides), 1)
        return sides[0]

    def test_a_peer_that_never_reads_is_held_to_its_budget_then_dropped(self):
        """120 streams pushed at a link that never reads, with the per-peer budget for first
        windows lowered to 12 MiB: the router used to queue all 120 windows (31 MB) and keep
        the link; now at most that budget (and 512 bytes a stream beyond it), then drops it."""
        async def pusher(_reader, writer):
            block = bytes(64 * 1024)
            for _ in range(100000):
                writer.write(block)
                await writer.drain()

        self.addCleanup(setattr, mindmeld, "PEER_INITIAL_BUDGET", mindmeld.PEER_INITIAL_BUDGET)
        mindmeld.PEER_INITIAL_BUDGET = 48 * INITIAL_WINDOW      # 12 MiB: 120 streams show it

        async def main():
            traffic = await self.honest(more_services=[("push", pusher)], not_reading_timeout=0.5)
            peer = await self.raw_peer()
            for stream_id in range(1, 241, 2):
                peer.send(encode_json(OPEN, stream_id, {"service": "push"}))
            side, peak = self.router_side(peer), [0]

            def all_sent():             # everything the windows allow is on its way to it
                if side.closing:
                    return True
                peak[0] = max(peak[0], side.transport.get_write_buffer_size())
                return len(side.legs) == 120 and not any(l.end.credit for l in side.legs.values())
            await wait_until(all_sent, 20, lambda: "credit left on %d streams" % sum(
                1 for l in side.legs.values() if l.end.credit))
            self.assertLessEqual(peak[0], mindmeld.PEER_INITIAL_BUDGET + 120 * mindmeld.MIN_STREAM_WINDOW)
            await wait_until(lambda: side.closing, 5, "the peer that reads nothing is dropped")
            self.one_line_about(peer, "not reading")
            peer.writer.close()
            await self.after(traffic, services=("push", "web"))
        self.run_async(main(), 60)

    def test_peers_that_ask_for_lists_and_never_read_are_held_to_a_little_then_dropped(self):
        """Four peers that never read, each asking for the list of 1,000 services 200 times
        (46 MB of answers for 8 KB of requests): each is held to a few MB, then dropped.
        (With one 1.15 MB page, 30 requests each used to make the router hold 118 MB.)"""
        async def main():
            traffic = await self.honest(not_reading_timeout=1.0)
            sharers = [await self.raw_peer() for _ in range(16)]
            for n, sharer in enumerate(sharers):
                sharer.send(b"".join(encode_json(REGISTER, k + 1, {"name": "svc-%02d-%02d" % (n, k)})
                                     for k in range(64)))
            for sharer in sharers:
                for _ in range(64):
                    await sharer.frame(REGISTERED, timeout=10)
            flooders = [await self.raw_peer() for _ in range(4)]
            for peer in flooders:
                peer.send(b"".join(encode_json(LIST, k + 1, {}) for k in range(200)))
            sides, peak = [self.router_side(peer) for peer in flooders], [0]

            def all_dropped():
                peak[0] = max([peak[0]] + [s.transport.get_write_buffer_size()
                                           for s in sides if not s.closing])
                return all(s.closing for s in sides)
            await wait_until(all_dropped, 10, "the peers that read nothing are dropped")
            self.assertLess(peak[0], mindmeld.PEER_BUFFER_SLACK + MAX_LIST_REPLY)
            for peer in flooders:
                self.one_line_about(peer, "not reading")
                peer.writer.close()
            for sharer in sharers:
                sharer.writer.close()
            await self.after(traffic)
        self.run_async(main(), 60)

    def test_all_peers_together_are_held_to_the_routers_budget(self):
        """Past GLOBAL_INITIAL_BUDGET of first windows new streams are refused (busy) until
        some end; growth is shared out, and a peer told a window_budget of 0 stays within it.
        (The budgets are lowered so that a few streams and peers reach them.)"""
        for name, value in (("GLOBAL_INITIAL_BUDGET", 4 * INITIAL_WINDOW + 2 * 512),
                            ("GLOBAL_GROWTH_BUDGET", mindmeld.PEER_WINDOW_BUDGET)):
            self.addCleanup(setattr, mindmeld, name, getattr(mindmeld, name))
            setattr(mindmeld, name, value)

        async def main():
            self.router = await self.start_router()
            sharer = await self.raw_peer()          # the first peer: all the growth there is
            sharer.send(encode_json(REGISTER, 1, {"name": "full", "owner": "ab" * 16}))
            await sharer.frame(REGISTERED, 1)
            opener = await self.raw_peer()
            self.assertEqual(sharer.hello["window_budget"], mindmeld.PEER_WINDOW_BUDGET)
            self.assertEqual(opener.hello["window_budget"], 0)      # nothing left to promise
            credits = []
            for stream_id in (1, 3, 5, 7):
                opener.send(encode_json(OPEN, stream_id, {"service": "full"}))
            for _ in range(3):
                _t, _f, there, payload = await sharer.frame(OPEN)
                credits.append(json.loads(payload.decode())["credit"])
                sharer.send(encode_frame(OPEN_OK, there))
            self.assertEqual(credits, [INITIAL_WINDOW, INITIAL_WINDOW, 512])
            refused = json.loads((await opener.frame(OPEN_REFUSED, 7))[3].decode())
            self.assertEqual(refused["code"], "busy", refused)
            opener.send(encode_json(RESET, 1, {"reason": "done"}))  # one ends: room again
            opener.send(encode_json(OPEN, 9, {"service": "full"}))
            _t, _f, there, payload = await sharer.frame(OPEN)
            self.assertEqual(json.loads(payload.decode())["credit"], INITIAL_WINDOW)
            # a peer told 0 that grows a window anyway broke the rules it was given
            opener.send(encode_frame(WINDOW, 3, struct.pack("!I", 4096)))
            self.assertEqual((await opener.goaway())["code"], "flow-control")
            sharer.writer.close()
        self.run_async(main(), 30)

    def test_an_opener_is_told_its_own_credit_when_the_two_directions_differ(self):
        """The sharer's first windows are used up by another opener: a new stream's window
        toward the sharer is 512 bytes while the one toward the opener is full.  The opener
        must be told 512 as its credit (it was told the other direction's, and sending that
        dropped a link for flow control)."""
        self.addCleanup(setattr, mindmeld, "PEER_INITIAL_BUDGET", mindmeld.PEER_INITIAL_BUDGET)
        mindmeld.PEER_INITIAL_BUDGET = 2 * INITIAL_WINDOW

        async def main():
            self.router = await self.start_router()
            sharer = await self.raw_peer()
            sharer.send(encode_json(REGISTER, 1, {"name": "asym", "owner": "ab" * 16}))
            await sharer.frame(REGISTERED, 1)
            first, second = await self.raw_peer(), await self.raw_peer()
            for stream_id in (1, 3):                     # the sharer's full windows, used up
                first.send(encode_json(OPEN, stream_id, {"service": "asym"}))
                await sharer.frame(OPEN)
            second.send(encode_json(OPEN, 1, {"service": "asym"}))
            _t, _f, there, payload = await sharer.frame(OPEN)
            self.assertEqual(json.loads(payload.decode()), {
                "service": "asym", "peer": second.address, "credit": INITIAL_WINDOW, "window": 512})
            sharer.send(encode_frame(OPEN_OK, there))
            accepted = json.loads((await second.frame(OPEN_OK, 1))[3].decode())
            self.assertEqual(accepted, {"credit": 512, "window": INITIAL_WINDOW})
            second.send(encode_frame(DATA, 1, bytes(512)))     # all of its credit: fine
            self.assertEqual((await sharer.frame(DATA, there))[3], bytes(512))
            sharer.send(encode_frame(DATA, there, bytes(INITIAL_WINDOW // 4)))
            self.assertEqual(await second.settled(), "pong")
            self.assertEqual(await sharer.settled(), "pong")
        self.run_async(main(), 30)

    def test_what_a_stranger_queued_and_reset_does_not_knock_a_reading_sharer_off(self):
        """A stranger fills 300 windows toward a sharer that reads, then resets them all: the
        router used to shrink the sharer's allowance at once, and drop it as not reading."""
        async def main():
            traffic = await self.honest(not_reading_timeout=5.0)
            sharer = await self.raw_peer()
            sharer.send(encode_json(REGISTER, 1, {"name": "slow", "owner": "ab" * 16}))
            await sharer.frame(REGISTER + 1, 1)                   # REGISTERED
            stranger = await self.raw_peer()
            streams = list(range(1, 601, 2))
            for stream_id in streams:
                stranger.send(encode_json(OPEN, stream_id, {"service": "slow"}))
            credits = {}
            for _ in streams:
                _t, _f, there, payload = await sharer.frame(OPEN)
                sharer.send(encode_frame(OPEN_OK, there))
            for stream_id in streams:
                info = json.loads((await stranger.frame(OPEN_OK, stream_id))[3].decode() or "{}")
                credits[stream_id] = info.get("credit", INITIAL_WINDOW)
            for stream_id in streams:                              # every window, filled
                for offset in range(0, credits[stream_id], MAX_DATA):
                    stranger.send(encode_frame(DATA, stream_id,
                                               bytes(min(MAX_DATA, credits[stream_id] - offset))))
            await stranger.writer.drain()
            side = self.router_side(sharer)
            await wait_until(lambda: side.write_paused or side.closing, 10, "the sharer's queue fills")
            for stream_id in streams:
                stranger.send(encode_json(RESET, stream_id, {"reason": "gone"}))
            await stranger.writer.drain()
            drained = 0
            for _ in range(100000):                                # the sharer reads it all
                chunk = await asyncio.wait_for(sharer.reader.read(256 * 1024), 10)
                self.assertTrue(chunk, "the router closed the sharer's link")
                sharer.decoder.feed(chunk)                        # keeps the framing; dropped
                drained += len(chunk)
                if not side.write_paused and not side.transport.get_write_buffer_size():
                    break
            self.assertFalse(side.closing)
            self.assertEqual(await sharer.settled(), "pong")
            self.assertFalse([l for l in self.logs if "not reading" in l], self.logs)
            sharer.writer.close()
            stranger.writer.close()
            await self.after(traffic)
        self.run_async(main(), 60)


class TestOptimisticOpen(HostileTestCase):
    """A forwarder's OPEN carries the client's first bytes, so the reply can start one stream
    round trip after connect; a refusal still ends the client's connection with a reset."""

    async def sharer_and_forwarder(self):
        self.router = await self.start_router()
        sharer = await self.raw_peer()
        sharer.send(encode_json(REGISTER, 1, {"name": "opt", "owner": "ab" * 16}))
        await sharer.frame(REGISTERED, 1)
        forwarder = await self.start_forwarder("opt")
        return sharer, forwarder

    def test_the_first_bytes_arrive_with_open_before_any_open_ok(self):
        async def main():
            sharer, forwarder = await self.sharer_and_forwarder()
            reader, writer = await self.connect(forwarder.port)
            request = b"GET / HTTP/1.0\r\n\r\n"
            writer.write(request)
            _t, _f, there, payload = await sharer.frame(OPEN)
            info = json.loads(payload.decode())
            self.assertEqual(base64.b64decode(info["data"]), request)      # no OPEN_OK yet
            self.assertIn(info["credit"], (INITIAL_WINDOW,))
            sharer.send(encode_frame(OPEN_OK, there) + encode_frame(DATA, there, b"reply")
                        + encode_frame(EOF, there))
            self.assertEqual(await asyncio.wait_for(reader.read(100), 5), b"reply")
            writer.write_eof()
            self.assertEqual(await sharer.frame(EOF, there), (EOF, 0, there, b""))
        self.run_async(main(), 30)

    def test_a_server_that_speaks_first_gets_its_open_at_once(self):
        async def main():
            sharer, forwarder = await self.sharer_and_forwarder()
            reader, _writer = await self.connect(forwarder.port)
            _t, _f, there, payload = await sharer.frame(OPEN)
            self.assertNotIn("data", json.loads(payload.decode()))
            sharer.send(encode_frame(OPEN_OK, there) + encode_frame(DATA, there, b"SSH-2.0-x\r\n"))
            self.assertEqual(await asyncio.wait_for(reader.readline(), 5), b"SSH-2.0-x\r\n")
        self.run_async(main(), 30)

    def test_a_refused_optimistic_open_resets_the_client(self):
        async def main():
            sharer, forwarder = await self.sharer_and_forwarder()
            reader, writer = await self.connect(forwarder.port)
            writer.write(b"hello")
            _t, _f, there, _p = await sharer.frame(OPEN)
            sharer.send(encode_json(OPEN_REFUSED, there, {"reason": "target refused"}))
            self.assertEqual(await read_until_closed(reader, 5), "reset")
        self.run_async(main(), 30)

    def test_open_data_that_is_not_base64_or_too_long_is_a_protocol_error(self):
        async def main():
            self.router = await self.start_router()
            for data in ("not base64!", base64.b64encode(bytes(mindmeld.OPEN_DATA_MAX + 1)).decode()):
                peer = await self.raw_peer()
                peer.send(encode_json(OPEN, 1, {"service": "x", "data": data}))
                goaway = await peer.goaway()
                self.assertEqual(goaway["code"], "protocol", goaway)
        self.run_async(main(), 30)
async def sink_handler(reader, writer):
    """Reads until EOF, then closes."""
    for _ in range(100000):
        if not await reader.read(CHUNK):
            break
    writer.close()


async def count_to_eof(reader):
    """Bytes read until EOF."""
    count = 0
    for _ in range(100000):
        chunk = await reader.read(CHUNK)
        if not chunk:
            break
        count += len(chunk)
    return count


class TestWarmStart(HostileTestCase):
    """On a long link a new stream starts with the window its streams grew to lately: an opener asks
    for it in OPEN ("grow"), an acceptor grants it in a WINDOW right after OPEN_OK.  (A
    stream that starts small leaves the link idle between bursts, and under loss TCP then
    measures a low rate and keeps to it for seconds.)"""

    def setUp(self):
        HostileTestCase.setUp(self)
        self.addCleanup(setattr, mindmeld, "LONG_LINK_RTT", mindmeld.LONG_LINK_RTT)
        mindmeld.LONG_LINK_RTT = 0.0        # loopback counts as long: only long links warm-start

    async def registered(self):
        self.router = await self.start_router()
        sharer = await self.raw_peer()
        sharer.send(encode_json(REGISTER, 1, {"name": "warm", "owner": "ab" * 16}))
        await sharer.frame(REGISTERED, 1)
        return sharer

    def test_the_router_passes_a_warm_start_on_and_holds_the_opener_to_its_budget(self):
        self.addCleanup(setattr, mindmeld, "PEER_WINDOW_BUDGET", mindmeld.PEER_WINDOW_BUDGET)
        mindmeld.PEER_WINDOW_BUDGET = 8 * INITIAL_WINDOW

        async def main():
            sharer = await self.registered()
            opener = await self.raw_peer()
            grow = 5 * INITIAL_WINDOW
            opener.send(encode_json(OPEN, 1, {"service": "warm", "grow": grow}))
            _t, _f, there, payload = await sharer.frame(OPEN)
            self.assertEqual(json.loads(payload.decode())["credit"], INITIAL_WINDOW + grow)
            sharer.send(encode_frame(OPEN_OK, there))
            accepted = json.loads((await opener.frame(OPEN_OK, 1))[3].decode())
            self.assertEqual(accepted, {"credit": INITIAL_WINDOW, "window": INITIAL_WINDOW + grow,
                                        "grow": grow})
            for _ in range((INITIAL_WINDOW + grow) // MAX_DATA):    # all of it, at once
                sharer.send(encode_frame(DATA, there, bytes(MAX_DATA)))
            received = 0
            for _ in range(1000):
                if received >= INITIAL_WINDOW + grow:
                    break
                received += len((await opener.frame(DATA, 1))[3])
            self.assertEqual(received, INITIAL_WINDOW + grow)
            self.assertEqual(await sharer.settled(), "pong")
            # 5 of its 8 x 256 KiB of growth are in use: 4 more is past its window_budget
            opener.send(encode_json(OPEN, 3, {"service": "warm", "grow": 4 * INITIAL_WINDOW}))
            goaway = await opener.goaway()
            self.assertEqual(goaway["code"], "flow-control")
            self.assertIn("window_budget", goaway["message"])
            self.assertEqual(await sharer.settled(), "pong")
        self.run_async(main(), 30)

    def test_a_malformed_grow_is_a_flow_control_error(self):
        async def main():
            await self.registered()
            for bad in ("1", -1, True, mindmeld.MAX_WINDOW):
                await self.dropped(encode_json(OPEN, 1, {"service": "warm", "grow": bad}),
                                   "flow-control", "grow")
        self.run_async(main(), 30)

    def test_a_forwarders_next_stream_asks_for_the_window_its_last_one_grew_to(self):
        async def main():
            sharer = await self.registered()
            forwarder = await self.start_forwarder("warm")
            reader, writer = await self.connect(forwarder.port)
            writer.write(b"x")
            _t, _f, there, payload = await sharer.frame(OPEN)
            self.assertEqual(json.loads(payload.decode()).get("credit"), INITIAL_WINDOW)
            sharer.send(encode_frame(OPEN_OK, there))
            read = asyncio.ensure_future(count_to_eof(reader))
            credit, sent = INITIAL_WINDOW, 0
            for _ in range(50):             # all the credit there is, then wait for more
                if credit > INITIAL_WINDOW:
                    break                   # more than the first window: it grew
                for offset in range(0, credit, MAX_DATA):
                    sharer.send(encode_frame(DATA, there, bytes(min(MAX_DATA, credit - offset))))
                sent, credit = sent + credit, 0
                for _ in range(100):
                    credit += struct.unpack("!I", (await sharer.frame(WINDOW, there))[3])[0]
                    if credit >= INITIAL_WINDOW // 2:
                        break
            self.assertGreater(credit, INITIAL_WINDOW, "the forwarder's window never grew")
            sharer.send(encode_frame(EOF, there))
            writer.write_eof()
            self.assertEqual(await asyncio.wait_for(read, 10), sent)
            reader, writer = await self.connect(forwarder.port)
            writer.write(b"y")
            _t, _f, there, payload = await sharer.frame(OPEN)
            self.assertGreater(json.loads(payload.decode())["credit"], 2 * INITIAL_WINDOW)
        self.run_async(main(), 30)

    def test_a_sharers_next_stream_grants_the_window_its_last_one_grew_to(self):
        async def main():
            self.router = await self.start_router()
            target = await self.start_target(sink_handler)
            await self.start_sharer({"warm": (LOCALHOST, target)})
            opener = await self.raw_peer()
            opener.send(encode_json(OPEN, 1, {"service": "warm"}))
            await opener.frame(OPEN_OK, 1)
            credit = INITIAL_WINDOW
            for _ in range(50):
                if credit > INITIAL_WINDOW:
                    break
                for offset in range(0, credit, MAX_DATA):
                    opener.send(encode_frame(DATA, 1, bytes(min(MAX_DATA, credit - offset))))
                credit = 0
                for _ in range(100):
                    credit += struct.unpack("!I", (await opener.frame(WINDOW, 1))[3])[0]
                    if credit >= INITIAL_WINDOW // 2:
                        break
            self.assertGreater(credit, INITIAL_WINDOW, "the sharer's window never grew")
            opener.send(encode_frame(EOF, 1))
            opener.send(encode_json(OPEN, 3, {"service": "warm"}))
            await opener.frame(OPEN_OK, 3)
            growth = struct.unpack("!I", (await opener.frame(WINDOW, 3))[3])[0]
            self.assertGreater(growth, INITIAL_WINDOW)      # before it sent a byte
        self.run_async(main(), 30)


class TestReplayedRegister(HostileTestCase):
    """Someone who saw every byte a sharer sent on a plain-TCP link replays them on new
    connections: the name stays with the sharer, which goes on serving and is never told
    anything.  The sharer itself, its link cut, gets the name back at once."""

    class RecordingRelay(SilentRelay):
        """A SilentRelay that keeps, per connection, every byte the client sent upstream.
        cut(): the clients' connections close, while the router's side stays open, silent."""

        def __init__(self, test, upstream_port):
            SilentRelay.__init__(self, test, upstream_port)
            self.sent, self.client_writers = [], []

        def cut(self):
            self.freeze()
            for writer in self.client_writers:
                writer.close()

        async def _serve(self, reader, writer):
            sent, read = bytearray(), reader.read
            self.sent.append(sent)
            self.client_writers.append(writer)

            async def recording_read(n=-1):
                data = await read(n)
                sent.extend(data)
                return data
            reader.read = recording_read
            await SilentRelay._serve(self, reader, writer)

    @staticmethod
    def registers(sent):
        """The REGISTER frames among the bytes a client sent, each as bytes."""
        frames = FrameDecoder().feed(bytes(sent[len(PREAMBLE):]))
        return [encode_frame(t, i, p) for t, _f, i, p in frames if t == REGISTER]

    async def shared_through_a_cut_link(self, secret=None, cuts=2):
        """A sharer of 'web' behind a recording relay whose link is cut `cuts` times: each
        time its reconnect gets the name back at once (the liveness probe would take 30 s)."""
        self.router = await self.start_router(liveness_probe=30.0)
        target = await self.start_target(prefix_echo_handler(b"real:"))
        self.relay = await self.RecordingRelay(self, self.router.port).start()
        options = {"secret": secret} if secret else {}
        self.sharer = await self.client(Sharer, {"web": (LOCALHOST, target)},
                                        router=self.relay.address, backoff=(0.05, 0.2),
                                        **options)
        await self.sharer.wait_ready(10)
        self.forwarder = await self.start_forwarder("web", **options)
        for cut in range(cuts):
            start, old = len(self.watch.lines), self.router.services["web"].peer
            self.relay.cut()                     # new connections pass
            await self.watch.wait(r"^sharing 'web' -> .*\(again\)$", 10, start)
            self.assertFalse(old.closing, "the router had already dropped the old session")
            self.assertIsNot(self.router.services["web"].peer, old)
        self.assertEqual(len(self.relay.sent), cuts + 1)
        await self.still_the_sharers()

    async def client(self, cls, *args, **options):
        client = cls(*args, **options)
        self._async_cleanups.append(lambda: client.close(0))
        await client.start()
        return client

    async def still_the_sharers(self):
        holder = self.router.services["web"].peer
        self.assertFalse(holder.closing)
        self.assertFalse(self.sharer.done.done())
        reader, writer = await self.connect(self.forwarder.port)
        writer.write(b"who")
        writer.write_eof()
        self.assertEqual(await read_reply(reader, 10), b"real:who")
        return holder

    async def replayed(self, data):
        """`data` sent on a new connection to the router: what REGISTERED said, or None if the
        router closed the connection first."""
        reader, writer = await self.connect(self.router.port)
        peer = RawPeer(self, reader, writer)
        peer.send(data)
        try:
            return json.loads((await peer.frame(REGISTERED, timeout=10))[3].decode())
        except (AssertionError, ConnectionResetError) as exc:
            if "closed" in str(exc) or isinstance(exc, ConnectionResetError):
                return None
            raise

    async def replay_everything(self):
        holder = await self.still_the_sharers()
        for sent in self.relay.sent:
            answers = [await self.replayed(bytes(sent))]
            for register in self.registers(sent):
                self.assertIn(b'"owner"', register)
                hello = PREAMBLE + encode_json(HELLO, 0, {"version": 1, "role": "share",
                                                          "agent": "test"})
                answers.append(await self.replayed(hello + register))
            for answer in answers:
                self.assertFalse(answer and answer.get("ok"), answer)
            self.assertIs(self.router.services["web"].peer, holder)
            await self.still_the_sharers()
        self.assertFalse([l for l in self.logs if "taken over" in l and "reconnected" not in l],
                         self.logs)

    def test_a_replayed_register_does_not_take_the_name(self):
        async def main():
            await self.shared_through_a_cut_link()
            await self.replay_everything()
        self.run_async(main(), 60)

    def test_a_replayed_register_does_not_take_a_name_with_a_secret(self):
        async def main():
            await self.shared_through_a_cut_link(secret="s3cret")
            await self.replay_everything()
            self.assertFalse([l for l in self.logs if "s3cret" in l])
        self.run_async(main(), 60)

    def test_a_sharer_cut_off_again_and_again_gets_its_name_back_each_time(self):
        async def main():
            await self.shared_through_a_cut_link(cuts=4)
            reclaims = [l for l in self.logs if "its sharer reconnected" in l]
            self.assertEqual(len(reclaims), 4, self.logs)
        self.run_async(main(), 60)

    def test_owner_chain_links_and_the_routers_check_of_them(self):
        follows = mindmeld.owner_link_follows
        chain = mindmeld.OwnerChain(length=250)         # crosses checkpoints
        links = [chain.next_link("web") for _ in range(250)]
        self.assertEqual(len(set(links)), 250)
        for earlier, later in zip(links, links[1:]):
            self.assertRegex(later, r"^[0-9a-f]{64}$")
            self.assertEqual(hashlib.sha256(bytes.fromhex(later)).hexdigest(), earlier)
            self.assertTrue(follows(later, earlier))
            self.assertFalse(follows(earlier, later))   # replayed: the router moved past it
            self.assertFalse(follows(later, later))
        skip = mindmeld.OWNER_CHAIN_SKIP
        self.assertTrue(follows(links[skip], links[0]))
        self.assertFalse(follows(links[skip + 1], links[0]))
        self.assertFalse(follows(links[1].upper(), links[0]))
        for junk in ("", None, 7, links[1][:63], links[1] + "0", "g" * 64):
            self.assertFalse(follows(junk, links[0]), junk)
        self.assertFalse(follows(links[1], ""))         # an owner of an older sharer
        self.assertFalse(follows(chain.next_link("web"), links[-1]))  # used up: a new chain
        self.assertFalse(follows(chain.next_link("other"), links[-1]))
class TestFloodsOfOpensAndNames(HostileTestCase):
    """A sharer flooded with OPENs keeps its descriptors and lets others in; `list` pages
    through a registry too large for one LIST_REPLY."""

    async def answers(self, peer, ids, timeout=20):
        """Read until every stream id in `ids` is answered: {id: (frame type, JSON)}."""
        deadline, answered, pending = self.loop.time() + timeout, {}, set(ids)
        for _ in range(100000):
            for ftype, _flags, stream_id, payload in peer.frames:
                if ftype in (OPEN_OK, OPEN_REFUSED) and stream_id in pending:
                    pending.discard(stream_id)
                    answered[stream_id] = (ftype, json.loads(payload.decode()) if payload else {})
            peer.frames = []
            if not pending:
                return answered
            data = await peer._read(deadline, "%d OPENs unanswered" % len(pending))
            if not data:
                raise AssertionError("closed with %d OPENs unanswered" % len(pending))
            peer.frames.extend(peer.decoder.feed(data))
        raise AssertionError("endless frames")

    async def round_trip(self, port, data=b"hello"):
        reader, writer = await self.connect(port)
        writer.write(data)
        self.assertEqual(await asyncio.wait_for(reader.readexactly(len(data)), 10), data)
        return reader, writer

    def test_an_open_flood_from_one_link_is_capped_and_another_forwarder_gets_through(self):
        """1,100 OPENs from one link to a sharer with 1,024 descriptors: it dials 256 of them
        (a quarter of its descriptors), refuses the rest with code `busy`, and a connection
        through another forwarder still goes through."""
        self.addCleanup(setattr, mindmeld, "_descriptor_limit", mindmeld._descriptor_limit)
        mindmeld._descriptor_limit = lambda: 1024      # as it was when the sharer ran out

        async def main():
            traffic = await self.honest()
            self.assertEqual(self.sharer.slots.max_streams_per_opener, 256)
            flooder = await self.raw_peer()
            ids = [2 * i + 1 for i in range(1100)]
            flooder.send(b"".join(encode_json(OPEN, i, {"service": "web"}) for i in ids))
            answered = await self.answers(flooder, ids)
            opened = [i for i, (ftype, _info) in answered.items() if ftype == OPEN_OK]
            refused = [info for ftype, info in answered.values() if ftype == OPEN_REFUSED]
            self.assertEqual(len(opened), 256)
            self.assertEqual({r.get("code") for r in refused}, {"busy"}, refused[:3])
            self.assertIn("limit", refused[0]["reason"])
            _reader, writer = await self.round_trip(self.forwarder.port)    # another link gets in
            writer.close()
            self.assertFalse([l for l in self.logs if "open files" in l], self.logs)
            warnings = [l for l in self.logs if "share:" in l and "busy" in l]
            self.assertEqual(len(warnings), 1, self.logs)       # one line for the flood
            flooder.writer.close()
            await self.after(traffic)
            await wait_until(lambda: not self.sharer.slots.streams_by_opener, 10,    # every slot back
                             lambda: "sharer still counts %r" % self.sharer.slots.streams_by_opener)
            self.assertEqual(self.sharer.slots.stream_count, 0)
        self.run_async(main(), 40)

    def test_a_busy_sharer_is_logged_once_by_the_forwarder(self):
        async def main():
            self.router = await self.start_router()
            target = await self.start_target(echo_handler)
            sharer = await self.start_sharer({"web": (LOCALHOST, target)}, max_streams_per_opener=3)
            greedy = await self.start_forwarder("web")
            other = await self.start_forwarder("web")
            for _ in range(3):
                await self.round_trip(greedy.port)
            for _ in range(20):                 # each closed at once, one line for them all
                reader, _writer = await self.connect(greedy.port)
                self.assertEqual(await asyncio.wait_for(reader.read(), 10), b"")
            await self.round_trip(other.port)
            lines = [l for l in self.logs if "forward:" in l and "refused" in l]
            self.assertEqual(len(lines), 1, self.logs)
            self.assertIn("busy", lines[0])
            self.assertEqual(sharer.slots.streams_by_service["web"], 4)
        self.run_async(main(), 30)

    def test_list_pages_through_ten_thousand_services(self):
        async def main():
            self.router = await self.start_router()
            names = ["svc-%05d" % i for i in range(10000)]
            peers = []
            for start in range(0, len(names), 16 * 64):      # 16 links at a time, 64 names each
                batch = await asyncio.gather(*[self.raw_peer() for _ in range(start, min(
                    start + 16 * 64, len(names)), 64)])
                for n, peer in enumerate(batch):
                    first = start + 64 * n
                    mine = names[first:first + 64]
                    peer.send(b"".join(encode_json(REGISTER, k + 1, {"name": name})
                                       for k, name in enumerate(mine)))
                    peers.append((peer, len(mine)))
            for peer, count in peers:
                for _ in range(count):
                    reply = json.loads((await peer.frame(REGISTERED, timeout=10))[3].decode())
                    self.assertTrue(reply["ok"], reply)
            self.assertEqual(len(self.router.services), 10000)
            asker = await self.raw_peer()
            asker.send(encode_json(LIST, 7, {}))                # as an older client asks
            payload = (await asker.frame(LIST_REPLY, 7))[3]
            self.assertLess(len(payload), MAX_LIST_REPLY // 2)
            page = json.loads(payload.decode())
            self.assertTrue(page["more"])
            self.assertEqual([s["name"] for s in page["services"]],
                             names[:len(page["services"])])
            asker.send(encode_json(LIST, 8, {"after": names[-3], "limit": 5}))
            page = json.loads((await asker.frame(LIST_REPLY, 8))[3].decode())
            self.assertEqual(page, {"services": page["services"]})     # no "more": the last page
            self.assertEqual([s["name"] for s in page["services"]], names[-2:])
            ran = await self.loop.run_in_executor(None, lambda: run_cli(
                "list", "--json", "--router", self.router_address, timeout=30))
            self.assertEqual(ran.code, 0, ran.err)
            self.assertEqual([s["name"] for s in json.loads(ran.out.decode())], names)
        self.run_async(main(), 60)

    def test_every_way_a_stream_ends_gives_its_slot_back(self):
        """Dial refused, wrong secret, no secret, and a stream that ran: no slot is kept."""
        async def main():
            self.router = await self.start_router()
            target = await self.start_target(echo_handler)
            dead = free_port_socket()                   # bound, not listening: refused
            self.addCleanup(dead.close)
            plain = await self.start_sharer({"web": (LOCALHOST, target),
                                             "dead": (LOCALHOST, dead.getsockname()[1])})
            locked = await self.start_sharer({"locked": (LOCALHOST, target)}, secret="s3cret")
            forwarders = [await self.start_forwarder("dead"), await self.start_forwarder("locked"),
                          await self.start_forwarder("locked", secret="wrong")]
            for forwarder in forwarders:
                for _ in range(3):                      # each ends: closed, or reset
                    reader, _writer = await self.connect(forwarder.port)
                    try:
                        self.assertEqual(await asyncio.wait_for(reader.read(), 10), b"")
                    except ConnectionResetError:
                        pass
            web = await self.start_forwarder("web")
            _reader, writer = await self.round_trip(web.port)
            self.assertEqual(plain.slots.stream_count, 1)
            writer.close()
            await wait_until(lambda: plain.slots.stream_count == locked.slots.stream_count == 0, 10,
                             lambda: "slots held: %r %r" % (plain.slots.streams_by_opener,
                                                            locked.slots.streams_by_opener))
            self.assertFalse(plain.slots.streams_by_service or locked.slots.streams_by_service)
        self.run_async(main(), 30)
# ---------------------------------------------------------------------------
# 15. TLS trust without holes: a test CA as the system CAs, known_routers that fail closed
# ---------------------------------------------------------------------------

def recorded_routers(path):
    """known_routers as [(router, fingerprint as hex digits)]."""
    with open(path) as f:
        return [(r[0], hex_digits(r[1])) for r in (line.split() for line in f) if r]


class TestTlsTrust(SecurityCommandLine, unittest.TestCase):
    """A test CA stands in for the system CAs: OpenSSL's default verify paths read
    SSL_CERT_FILE, given to the clients that are to trust it."""

    @classmethod
    def setUpClass(cls):
        cls.files = tempfile.mkdtemp(prefix="mindmeld-trust-")
        ca_key = mindmeld._rsa_key()
        leaf_key = cls.leaf_key = mindmeld._rsa_key()
        ca_der = mindmeld._certificate("mindmeld test CA", ca_key)
        cls.ca = write_file(os.path.join(cls.files, "ca.pem"), mindmeld._pem("CERTIFICATE", ca_der), 0o644)
        cls.key = write_file(os.path.join(cls.files, "key.pem"), mindmeld._rsa_key_pem(leaf_key))
        now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
        day = datetime.timedelta(days=1)

        def leaf(name, **how):
            der = mindmeld._certificate("router", leaf_key, issuer=("mindmeld test CA", ca_key), **how)
            path = os.path.join(cls.files, name + ".pem")
            return write_file(path, mindmeld._pem("CERTIFICATE", der), 0o644)
        cls.good = leaf("good", hosts=["127.0.0.1"])
        cls.wrong_host = leaf("wrong-host", hosts=["elsewhere.invalid"])
        cls.expired = leaf("expired", hosts=["127.0.0.1"], valid=(now - 30 * day, now - day))
        cls.not_yet_valid = leaf("not-yet-valid", hosts=["127.0.0.1"], valid=(now + day, now + 30 * day))
        cls.impostor = write_file(os.path.join(cls.files, "impostor.pem"), FIXED_CERT_PEM, 0o644)
        cls.impostor_key = write_file(os.path.join(cls.files, "impostor-key.pem"), FIXED_KEY_PEM)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.files, True)

    def setUp(self):
        SecurityCommandLine.setUp(self)
        self.ca_env = self.env_with(SSL_CERT_FILE=self.ca)
        self.known = os.path.join(self.state, "known_routers")

    def test_a_ca_verified_router_is_remembered_and_an_impostor_refused(self):
        router, address, fingerprint = self.tls_router(self.good, self.key)
        wss = "wss://%s" % address
        by_tls, by_wss = self.run_many([(["list", "--router", address, "--tls"], self.ca_env),
                                        (["list", "--router", wss], self.ca_env)])
        for ran, router_name in ((by_tls, address), (by_wss, wss)):
            self.assertEqual(ran.code, 0, ran.err)
            self.assertTrue(ran.out.startswith(b"NAME"), ran.out)
            lines = ran.err.splitlines()
            self.assertEqual(len(lines), 1, ran.err)
            for needle in ("verified", router_name, fingerprint, self.known):
                self.assertIn(needle, lines[0])
        self.assertEqual(sorted(recorded_routers(self.known)),
                         sorted([(address, hex_digits(fingerprint)), (wss, hex_digits(fingerprint))]))
        before = read_bytes(self.known)
        again, = self.run_many([(["list", "--router", address, "--tls"], self.ca_env)])
        self.assertEqual((again.code, again.err), (0, ""))

        # A self-signed impostor on the same address: refused, however the client names it
        code, lines = router.signal(signal.SIGTERM)
        self.assertEqual(code, 0, lines)
        _impostor, _, impostor_fingerprint = self.tls_router(self.impostor, self.impostor_key,
                                                            listen=address)
        by_tls, by_wss = self.run_many([(["list", "--router", address, "--tls"], self.ca_env),
                                        (["list", "--router", wss], self.ca_env)])
        for ran, router_name in ((by_tls, address), (by_wss, wss)):
            self.assert_one_error_line(ran, "list", router_name, fingerprint, impostor_fingerprint,
                                       self.known)
        self.assertEqual(read_bytes(self.known), before)

    def test_a_certificate_failing_verification_for_another_reason_is_refused(self):
        routers = {}
        for name in ("wrong_host", "expired", "not_yet_valid"):
            routers[name] = self.tls_router(getattr(self, name), self.key)[1]
        expired_wss = "wss://%s" % routers["expired"]
        wrong_host, expired, not_yet_valid, by_wss, unknown_ca = self.run_many([
            (["list", "--router", routers["wrong_host"], "--tls"], self.ca_env),
            (["list", "--router", routers["expired"], "--tls"], self.ca_env),
            (["list", "--router", routers["not_yet_valid"], "--tls"], self.ca_env),
            (["list", "--router", expired_wss], self.ca_env),
            # no CA vouches for it, and it has expired: not trusted on first use either
            (["list", "--router", routers["expired"], "--tls"], self.env),
        ])
        line = self.assert_one_error_line(wrong_host, "list", routers["wrong_host"])
        self.assertIn("match", line.lower())          # "mismatch", or 3.6: "doesn't match"
        for ran in (expired, by_wss, unknown_ca):
            self.assert_one_error_line(ran, "list", "expired")
        self.assert_one_error_line(not_yet_valid, "list", routers["not_yet_valid"], "not yet valid")
        self.assertFalse(os.path.exists(self.known))

    def test_a_damaged_known_routers_is_refused_naming_its_file_and_line(self):
        _router, address, fingerprint = self.tls_router(self.impostor, self.impostor_key)
        good = "%s %s\n" % (address, fingerprint)
        cases = [                                       # (known_routers, the line to name)
            ("garbage\n", "line 1"),
            ("127.0.0.1:1 %s\n%s 12:34\n" % (fingerprint, address), "line 2"),
            (b"\xff\xfe " + fingerprint.encode() + b"\n", "line 1"),
            (good[:40] + "\n", "line 1"),
            ("127.0.0.1:1 %s extra words\n%s" % (fingerprint, good), "line 1"),
            (None, ""),                                 # a directory where the file should be
            ("# routers I know\n\n" + good, None),      # comments and blank lines are fine
        ]
        commands, paths = [], []
        for number, (text, _line) in enumerate(cases):
            state = os.path.join(self.tmp, "state-%d" % number)
            os.makedirs(state)
            path = os.path.join(state, "known_routers")
            if text is None:
                os.makedirs(path)
            else:
                write_file(path, text)
            paths.append(path)
            commands.append(["list", "--router", address, "--tls", "--state-dir", state])
        results = self.run_many(commands)
        for (text, line), path, ran in zip(cases, paths, results):
            if line is None:
                self.assertEqual((ran.code, ran.err), (0, ""))
                continue
            self.assert_one_error_line(ran, "list", path, line)
            if text is not None:
                self.assertEqual(read_bytes(path), text if isinstance(text, bytes) else text.encode())

    def test_state_dir_applies_to_wss_routers(self):
        _router, address, fingerprint = self.tls_router(self.impostor, self.impostor_key)
        state = os.path.join(self.tmp, "given")
        wss = "wss://%s" % address
        ran, = self.run_many([["list", "--router", wss, "--state-dir", state]])
        self.assertEqual(ran.code, 0, ran.err)
        self.assertIn(os.path.join(state, "known_routers"), ran.err)
        self.assertEqual(recorded_routers(os.path.join(state, "known_routers")),
                         [(wss, hex_digits(fingerprint))])
        self.assertFalse(os.path.exists(self.known))

    def test_certificate_dates_are_read_back_and_damage_is_an_error(self):
        key, utc = self.leaf_key, datetime.timezone.utc
        for valid in ((datetime.datetime(1999, 12, 31, 23, 59, 59, tzinfo=utc),
                       datetime.datetime(2049, 12, 31, 0, 0, 0, tzinfo=utc)),       # UTCTime
                      (datetime.datetime(2050, 1, 1, 0, 0, 0, tzinfo=utc),
                       datetime.datetime(2100, 6, 30, 12, 0, 0, tzinfo=utc))):     # GeneralizedTime
            der = mindmeld._certificate("router", key, valid=valid)
            self.assertEqual(mindmeld.cert_validity(der), valid)
        for cut in range(0, len(der), 7):
            with self.assertRaises((ValueError, IndexError)):
                mindmeld.cert_validity(der[:cut])

    def test_a_token_or_secret_on_the_command_line_warns_once(self):
        token, secret = "tok-" + os.urandom(8).hex(), "sec-" + os.urandom(8).hex()
        token_file = write_file(os.path.join(self.tmp, "token"), token)
        secret_file = write_file(os.path.join(self.tmp, "secret"), secret)
        router, address = self.router("--token", token)
        warned = [l for l in router.lines if "--token-file" in l]
        self.assertEqual(len(warned), 1, router.lines)
        with_env = self.env_with(MINDMELD_TOKEN=token, MINDMELD_SECRET=secret)
        by_flag, from_file, from_env, both, both_quiet = self.run_many([
            ["list", "--router", address, "--token", token],
            ["list", "--router", address, "--token-file", token_file],
            (["list", "--router", address], with_env),
            ["connect", "nothing", "--router", address, "--token", token, "--secret", secret],
            (["connect", "nothing", "--router", address, "--secret-file", secret_file], with_env),
        ])
        self.assertEqual(by_flag.code, 0, by_flag.err)
        lines = by_flag.err.splitlines()
        self.assertEqual(len(lines), 1, by_flag.err)
        for needle in ("--token", "--token-file", "MINDMELD_TOKEN", "process list"):
            self.assertIn(needle, lines[0])
        self.assertNotIn(token, by_flag.err)
        for ran in (from_file, from_env):
            self.assertEqual((ran.code, ran.err), (0, ""))
        warned = [l for l in both.err.splitlines() if "process list" in l]
        self.assertEqual(len(warned), 1, both.err)
        for needle in ("--token", "--secret", "--token-file", "--secret-file", "MINDMELD_TOKEN",
                       "MINDMELD_SECRET"):
            self.assertIn(needle, warned[0])
        self.assertNotIn(secret, both.err)
        self.assertEqual(both.code, 1, both.err)
        self.assertEqual([l for l in both_quiet.err.splitlines() if "process list" in l], [])
        self.assertEqual(both_quiet.code, 1, both_quiet.err)


class TestShardedRouters(LoopTestCase):
    """Several routers behind a front that picks one by hashing the request path, as nginx
    `hash $request_uri consistent` or HAProxy `balance uri` do; clients with {name} in the
    router address open a link per name and follow their name when the front moves it."""

    FAST = dict(backoff=(0.05, 0.2), shard_check=0.2)

    def setUp(self):
        LoopTestCase.setUp(self)
        self.routers = {}               # port -> Router, the live ones
        self.run_async(self.start_front())
        for _ in range(3):
            self.run_async(self.add_router())

    async def start_front(self):
        """A front: read the request head, hash its path over the live routers, replay the
        head to the one chosen and splice bytes both ways."""
        writers = []

        async def pipe(reader, writer):
            try:
                await copy_to_eof(reader, writer)
            except (ConnectionError, OSError):
                pass
            finally:
                writer.close()

        async def serve(reader, writer):
            writers.append(writer)
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                port = self.shard_of(head.split(b" ", 2)[1]).port
                up_reader, up_writer = await asyncio.open_connection(LOCALHOST, port)
                writers.append(up_writer)
                up_writer.write(head)
                await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
            except (ConnectionError, OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
                writer.close()

        server = await asyncio.start_server(serve, LOCALHOST, 0)

        async def close():
            server.close()
            for writer in writers:
                writer.close()
        self._async_cleanups.append(close)
        self.front = "ws://%s:%d/mindmeld/{name}" % (LOCALHOST, server.sockets[0].getsockname()[1])

    async def add_router(self, port=0):
        router = Router(LOCALHOST, port)
        await router.start()
        self._async_cleanups.append(lambda: router.close(0))
        self.routers[router.port] = router
        return router

    def shard_of(self, path):
        """The live router the front sends this request path to (crc32 over the ports)."""
        ports = sorted(self.routers)
        return self.routers[ports[zlib.crc32(path) % len(ports)]]

    def owner(self, name):
        return self.shard_of(("/mindmeld/" + name).encode())

    def holders(self, name):
        return [r for r in self.routers.values() if name in r.services]

    async def echo_through(self, port, payload=b"ping"):
        reader, writer = await self.connect(port)
        writer.write(payload)
        self.assertEqual(await asyncio.wait_for(reader.readexactly(len(payload)), 5), payload)
        return reader, writer

    async def shared(self, names):
        target = await self.start_target(echo_handler)
        sharer = Sharer({name: (LOCALHOST, target) for name in names}, router=self.front, **self.FAST)
        self._async_cleanups.append(lambda: sharer.close(0))
        await sharer.start()
        await sharer.wait_ready(5)
        return sharer

    async def forwarded(self, name):
        forwarder = Forwarder(name, LOCALHOST, 0, router=self.front, **self.FAST)
        self._async_cleanups.append(lambda: forwarder.close(0))
        await forwarder.start()
        await forwarder.wait_ready(5)
        return forwarder

    def test_one_link_per_name_each_at_its_hash_owner_and_list_name(self):
        async def main():
            names = ["web", "db", "mail"]
            sharer = await self.shared(names)
            await wait_until(lambda: all(self.holders(n) == [self.owner(n)] for n in names), 3,
                             lambda: {n: [r.port for r in self.holders(n)] for n in names})
            peers = {self.owner(n).services[n].peer for n in names}
            self.assertEqual(len(peers), 3)                 # a link each, even on one router
            self.assertEqual(len(sharer.shards), 3)
            instances = {r.instance for r in self.routers.values()}
            self.assertEqual(len(instances), 3)
            self.assertTrue(all(re.match("^[0-9a-f]{16}$", i) for i in instances), instances)
            forwarder = await self.forwarded("db")
            self.assertEqual(forwarder.link.instance, self.owner("db").instance)
            await self.echo_through(forwarder.port)
            listed = await mindmeld.list_services(self.front, name="mail")
            self.assertEqual([s["name"] for s in listed], ["mail"])
            with self.assertRaises(mindmeld.UsageError):
                await mindmeld.list_services(self.front)
            ran, bare = await asyncio.gather(*(self.loop.run_in_executor(None, run_cli, *argv) for argv in (
                ["list", "web", "--router", self.front], ["list", "--router", self.front])))
            self.assertEqual((ran.code, [r[0] for r in list_rows(ran.out)]), (0, ["NAME", "web"]), ran.err)
            self.assertEqual(bare.code, 2, bare.err)
            self.assertIn("list NAME", bare.err)
            # the router takes /mindmeld/NAME, nothing else under it
            router = next(iter(self.routers.values()))
            for path, status in (("/mindmeld/web", b"426"), ("/mindmeld/a/b", b"404"), ("/mindmeld/", b"404")):
                reader, writer = await self.connect(router.port)
                writer.write(("GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path).encode())
                self.assertIn(status, (await asyncio.wait_for(reader.read(200), 5)).split(b"\r\n")[0])
        self.run_async(main())

    def test_failover_then_back_to_the_hash_owner_without_dropping_a_stream(self):
        async def main():
            await self.shared(["web"])
            forwarder = await self.forwarded("web")
            first = self.owner("web")
            await self.echo_through(forwarder.port)
            # the owner goes: the front stops sending to it, its names come up elsewhere
            del self.routers[first.port]
            await first.close(0)
            await wait_until(lambda: len(self.holders("web")) == 1, 3, "web registered again")
            second = self.holders("web")[0]
            self.assertIsNot(second, first)
            await wait_until(lambda: forwarder.link is not None and forwarder.link.instance == second.instance,
                             3, "the forwarder on the new owner")
            reader, writer = await self.echo_through(forwarder.port, b"through the second")
            # it comes back: names go home, the open stream finishes on the old router
            back = await self.add_router(first.port)
            self.assertIs(self.owner("web"), back)
            await wait_until(lambda: self.holders("web") == [back] and forwarder.link.instance == back.instance,
                             3, lambda: "web at %s" % [r.port for r in self.holders("web")])
            writer.write(b"still here")
            self.assertEqual(await asyncio.wait_for(reader.readexactly(10), 5), b"still here")
            self.assertEqual(second.open_streams, 1)
            await self.echo_through(forwarder.port, b"through the first again")
            writer.close()
            await wait_until(lambda: not second.peers, 3, "the old links drained and closed")
        self.run_async(main())

    def test_without_name_nothing_changes_and_name_needs_a_ws_path(self):
        plain = mindmeld._Client("127.0.0.1:7700", name="web")
        self.assertEqual((plain.sharded, plain.ws_path), (False, None))
        client = mindmeld._Client("ws://front.example/mindmeld/{name}", name="web")
        self.assertEqual((client.sharded, client.ws_path, client.router_port), (True, "/mindmeld/web", 80))
        for bad in ("{name}.example:7700", "ws://{name}.example/mindmeld"):
            with self.assertRaises(mindmeld.MindmeldError):
                mindmeld._Client(bad, name="web")


class OutboxPeer(mindmeld.WatchedWrites):
    """The router's write path toward one peer, over a transport that only records: it
    pauses above `high` bytes and drains when the test says (no sockets, no loop)."""

    closing = False
    sock = None
    frame_max = MAX_DATA
    long_link = True

    def __init__(self, high):
        self.transport = self
        self.high, self.written, self.write_paused = high, 0, False
        self.wire = FrameDecoder()
        self.frames = []
        self.buffered = 0
        self.empty_outbox()

    def backlog_limit(self):
        return 1 << 40

    # the transport's side
    def write(self, data):
        self.frames.extend(self.wire.feed(bytes(data)))
        self.buffered += len(data)
        if self.buffered > self.high:
            self.write_paused = True

    def get_write_buffer_size(self):
        return self.buffered

    def is_closing(self):
        return False

    def drain(self):
        """The kernel took everything: resume, as asyncio does at the low-water mark."""
        self.buffered = 0
        self.write_paused = False
        self.pump()

    def data_frames(self):
        return [(i, len(p)) for t, _f, i, p in self.frames if t == DATA]


class TestScheduler(unittest.TestCase):
    """The router's per-link scheduler on synthetic queues: who goes first, how big the
    frames are while others wait, and that a stream's bytes and its EOF stay in order."""

    def test_short_queues_first_then_the_rest_in_turn(self):
        quantum = mindmeld.SCHEDULER_QUANTUM
        sizes = collections.OrderedDict([(1, 300000), (3, 100), (5, 200000), (7, quantum), (9, 0)])
        self.assertEqual(mindmeld.scheduling_order(sizes, sizes), [3, 7, 9, 1, 5])
        bulk = collections.OrderedDict([(5, 10 * quantum), (1, 20 * quantum)])
        self.assertEqual(mindmeld.scheduling_order(bulk, bulk), [5, 1])   # their order, not size

    def test_a_short_answer_overtakes_queued_bulk_and_bulk_takes_turns(self):
        peer = OutboxPeer(high=32 * 1024)
        peer.frame_max = mindmeld.SCHEDULER_QUANTUM   # a long link
        peer.write_paused = True                    # the link is busy
        peer.relay_data(1, os.urandom(MAX_DATA))
        peer.relay_data(3, os.urandom(MAX_DATA))
        peer.relay_data(5, b"keystroke")
        peer.send_after_data(1, encode_frame(EOF, 1))
        self.assertEqual(peer.outbox_bytes, 2 * MAX_DATA + 9)
        peer.frames = []
        peer.drain()
        self.assertEqual(peer.data_frames()[0], (5, 9))     # the answer first
        for _ in range(100):
            if not peer.outbox:
                break
            peer.drain()
        frames = peer.data_frames()
        self.assertTrue(all(n <= mindmeld.SCHEDULER_QUANTUM for _i, n in frames), frames)
        streams = [i for i, _n in frames[1:]]
        self.assertEqual(streams[:6], [1, 3, 1, 3, 1, 3])   # turns, one quantum each
        self.assertEqual(sum(n for i, n in frames if i == 1), MAX_DATA)
        self.assertEqual(sum(n for i, n in frames if i == 3), MAX_DATA)
        kinds = [(t, i) for t, _f, i, _p in peer.frames if i == 1]
        self.assertEqual(kinds[-1], (EOF, 1))               # after all of its data
        self.assertEqual(peer.outbox_bytes, 0)

    def test_bytes_arrive_whole_and_in_order(self):
        peer = OutboxPeer(high=16 * 1024)
        sent = {1: [], 3: []}
        peer.write_paused = True
        for k in range(20):
            for stream_id in (1, 3):
                chunk = os.urandom(1000 + 7919 * k % 50000)
                sent[stream_id].append(chunk)
                peer.relay_data(stream_id, chunk)
        for _ in range(1000):
            peer.drain()
            if not peer.outbox:
                break
        for stream_id in (1, 3):
            got = b"".join(bytes(p) for t, _f, i, p in peer.frames if t == DATA and i == stream_id)
            self.assertEqual(got, b"".join(sent[stream_id]))

    def test_one_stream_alone_sends_whole_frames_unless_the_link_is_long(self):
        peer = OutboxPeer(high=32 * 1024)
        peer.write_paused = True
        peer.relay_data(1, os.urandom(MAX_DATA))
        peer.drain()
        self.assertEqual(peer.data_frames(), [(1, MAX_DATA)])
        peer = OutboxPeer(high=32 * 1024)
        peer.frame_max = mindmeld.SCHEDULER_QUANTUM   # what a long link sets
        peer.relay_data(1, os.urandom(MAX_DATA))      # cut even with nothing queued before
        for _ in range(100):
            if not peer.outbox:
                break
            peer.drain()
        self.assertEqual(peer.data_frames(),
                         [(1, mindmeld.SCHEDULER_QUANTUM)] * (MAX_DATA // mindmeld.SCHEDULER_QUANTUM))

    def test_empty_and_tiny_frames_hold_no_more_than_their_bytes(self):
        # A peer's empty DATA frames were each a queue entry of about 100 bytes that the
        # backlog limit never counted; a flood of them grew the router without bound.
        peer = OutboxPeer(high=32 * 1024)
        peer.frame_max = mindmeld.SCHEDULER_QUANTUM
        peer.write_paused = True
        for _ in range(1000):
            peer.relay_data(1, b"")
            peer.relay_data(3, b"x")
        self.assertEqual(list(peer.outbox), [3])
        self.assertEqual((len(peer.outbox[3]), peer.outbox_bytes), (1, 1000))
        peer.drain()
        self.assertEqual(peer.data_frames(), [(3, 1000)])

    def test_a_reset_stream_drops_what_it_had_queued(self):
        peer = OutboxPeer(high=1024)
        peer.write_paused = True
        peer.relay_data(1, os.urandom(5000))
        peer.relay_data(3, os.urandom(7000))
        peer.discard_queued(1)
        self.assertEqual(peer.outbox_bytes, 7000)
        peer.drain()
        self.assertEqual(peer.data_frames(), [(3, 7000)])


class TestRealLinks(LoopTestCase):
    """Fast where users are: a client's link socket keeps little unsent, so the queue stays
    where streams take turns, and bench --wan's emulated link delays and paces as asked.
    (The timing targets are in bench --wan's output, not here.)"""

    @unittest.skipIf(mindmeld.TCP_NOTSENT_LOWAT is None, "no TCP_NOTSENT_LOWAT on this platform")
    def test_link_sockets_hold_little_unsent(self):
        async def main():
            await self.tunnel(echo_handler)
            for client in (self.forwarder, self.sharer):
                sock = client.link.transport.get_extra_info("socket")
                self.assertEqual(sock.getsockopt(socket.IPPROTO_TCP, mindmeld.TCP_NOTSENT_LOWAT),
                                 mindmeld.LINK_NOTSENT_LOWAT)
        self.run_async(main())

    def test_a_long_link_keeps_a_smaller_write_buffer(self):
        async def main():
            await self.tunnel(echo_handler)
            link = self.forwarder.link
            link.rtt_measured(mindmeld.LONG_LINK_RTT * 2)
            self.assertEqual(link.transport.get_write_buffer_limits()[::-1], mindmeld.LONG_LINK_WATER)
            link.rtt_measured(mindmeld.LONG_LINK_RTT / 10)
            self.assertEqual(link.transport.get_write_buffer_limits()[::-1],
                             (mindmeld.LINK_HIGH_WATER, mindmeld.LINK_LOW_WATER))
            for peer in self.router.peers:          # the router's queue is its streams' outbox
                peer.rtt_measured(mindmeld.LONG_LINK_RTT * 2)
                self.assertEqual(peer.transport.get_write_buffer_limits()[::-1],
                                 mindmeld.LONG_LINK_WATER)
        self.run_async(main())

    @unittest.skipIf(mindmeld.TCP_NOTSENT_LOWAT is None, "no TCP_NOTSENT_LOWAT on this platform")
    def test_a_long_link_holds_little_unsent_only_while_streams_share_it(self):
        async def main():
            await self.tunnel(echo_handler)
            link = self.forwarder.link
            sock = link.transport.get_extra_info("socket")

            def unsent():
                return sock.getsockopt(socket.IPPROTO_TCP, mindmeld.TCP_NOTSENT_LOWAT)
            link.rtt_measured(mindmeld.LONG_LINK_RTT * 2)
            self.assertEqual(unsent(), mindmeld.LINK_NOTSENT_LOWAT)        # no stream yet
            link.streams.update({1001: None, 1003: None})                  # two share it
            link.sharing_changed()
            self.assertEqual(unsent(), mindmeld.LONG_LINK_NOTSENT_LOWAT)
            del link.streams[1001], link.streams[1003]
            link.sharing_changed()
            self.assertEqual(unsent(), mindmeld.LINK_NOTSENT_LOWAT)
        self.run_async(main())

    def test_emulated_link_delays_and_paces(self):
        rtt, rate = 0.2, 1e6                       # 200 ms, 1 MB/s each way
        message = os.urandom(300 * 1000)

        async def main():
            target = await self.start_target(echo_handler)
            server = await mindmeld._wan_link(target, rtt, rate)
            self._async_cleanups.append(lambda: mindmeld._close_server(server))
            reader, writer = await self.connect(server.sockets[0].getsockname()[1])
            began = self.loop.time()
            writer.write(b"x")
            self.assertEqual(await asyncio.wait_for(reader.readexactly(1), 10), b"x")
            round_trip = self.loop.time() - began
            self.assertGreaterEqual(round_trip, rtt * 0.95)
            self.assertLess(round_trip, rtt + 2.0)      # generous: a loaded machine
            began = self.loop.time()
            writer.write(message)
            echoed = await asyncio.wait_for(reader.readexactly(len(message)), 20)
            took = self.loop.time() - began
            self.assertEqual(echoed, message)
            self.assertGreaterEqual(took, len(message) / rate * 0.9 + rtt)   # paced, then delayed
            self.assertLess(took, 2 * len(message) / rate + rtt + 3.0)
        self.run_async(main(), 40)

    def test_bench_wan_refuses_a_negative_round_trip(self):
        ran = run_cli("bench", "--wan", "--rtt", "-5")
        self.assertEqual(ran.code, 2)
        self.assertIn("--rtt and --rate must not be negative", ran.err)


# ---------------------------------------------------------------------------
# 16. Names with a secret: only the holder's own sharer takes one, and a rightful sharer waits
# ---------------------------------------------------------------------------

class TestNamesWithASecret(LoopTestCase):
    """The router cannot check a secret, so a claim of one takes no name: a name registered
    with a secret goes back at once only to its holder's owner chain, else stays until the
    holder's link is gone.  A sharer that held its name once never exits over it."""

    HELD = r"^share: the name 'web' is held by another sharer at the router; retrying \("

    async def client(self, cls, *args, **options):
        client = cls(*args, **options)
        self._async_cleanups.append(lambda: client.close(0))
        await client.start()
        return client

    async def refused_at_once(self, **options):
        """A new sharer of 'web' straight to the router: its PermanentError, and how long."""
        began = self.loop.time()
        sharer = await self.client(Sharer, {"web": (LOCALHOST, 9)}, router=self.router_address,
                                   **options)
        with self.assertRaises(PermanentError) as refused:
            await asyncio.wait_for(sharer.done, 10)
        return str(refused.exception), self.loop.time() - began

    def test_a_silent_holder_with_a_secret_keeps_its_name_until_its_link_is_gone(self):
        probe = 0.3

        async def main():
            router = await self.start_router(liveness_probe=probe)
            target = await self.start_target(echo_handler)
            relay = await SilentRelay(self, router.port).start()
            holder = await self.client(Sharer, {"web": (LOCALHOST, target)}, router=relay.address,
                                       secret="s3cret", backoff=(0.05, 0.2))
            await holder.wait_ready(10)
            held = router.services["web"]
            relay.freeze()                                  # silent, as if SIGSTOP'd
            message, took = await self.refused_at_once()       # no secret: a collision, exit
            self.assertIn("'web' is already shared", message)
            self.assertIn("with a secret", message)
            self.assertIn("choose another name, or stop the other sharer", message)
            self.assertLess(took, 5)
            for secret in ("s3cret", "guess"):
                with self.subTest(newcomer_secret=secret):     # perhaps its own last run: it waits
                    logged = len(self.logs)
                    newcomer = await self.client(Sharer, {"web": (LOCALHOST, 9)},
                                                 router=self.router_address, secret=secret)
                    await wait_until(lambda: [l for l in self.logs[logged:] if re.search(self.HELD, l)],
                                     5, "the one line saying it waits")
                    self.assertFalse(newcomer.done.done())
                    await newcomer.close(0)
            self.assertIs(router.services["web"], held)
            self.assertFalse(held.peer.closing)
            self.assertFalse([l for l in self.logs if "taken over" in l], self.logs)
            # its own sharer, back on a new link with its owner chain, gets it at once
            returning = await self.client(Sharer, {"web": (LOCALHOST, target)},
                                          router=self.router_address, secret="s3cret")
            returning.owners = holder.owners
            await returning.wait_ready(10)
            self.assertIsNot(router.services["web"], held)
            self.assertTrue(any("taken over" in l and "its sharer reconnected" in l
                                for l in self.logs), self.logs)
            # once the holder's link is really gone, the name is free (here: to a stranger)
            await returning.close(0)
            await wait_until(lambda: "web" not in router.services, 5, "the name to be free")
            stranger = await self.client(Sharer, {"web": (LOCALHOST, target)},
                                         router=self.router_address)
            await stranger.wait_ready(10)
            self.assertFalse(router.services["web"].verifier)
        self.run_async(main())

    def test_a_holder_without_a_secret_still_loses_its_name_when_silent(self):
        async def main():
            router = await self.start_router(liveness_probe=0.3)
            target = await self.start_target(echo_handler)
            relay = await SilentRelay(self, router.port).start()
            holder = await self.client(Sharer, {"web": (LOCALHOST, target)}, router=relay.address)
            await holder.wait_ready(10)
            relay.freeze()
            newcomer = await self.client(Sharer, {"web": (LOCALHOST, target)},
                                         router=self.router_address)
            await newcomer.wait_ready(10)
            self.assertTrue(any("its previous sharer stopped answering" in l for l in self.logs),
                            self.logs)
        self.run_async(main())

    def test_a_sharer_squatted_after_a_router_restart_waits_and_takes_its_name_back(self):
        async def main():
            router = await self.start_router()
            target = await self.start_target(echo_handler)
            relay = await SilentRelay(self, router.port).start()
            rightful = await self.client(Sharer, {"web": (LOCALHOST, target)}, router=relay.address,
                                         secret="s3cret", backoff=(0.05, 0.2))
            await rightful.wait_ready(10)
            relay.refuse = True                             # it cannot get back before the squatter
            await router.close()
            restarted = Router(LOCALHOST, router.port)
            await restarted.start()
            self._async_cleanups.append(lambda: restarted.close(0))
            asked = collections.Counter()
            register = restarted.register

            def counting_register(peer, request_id, name, *args):
                asked[peer] += 1
                return register(peer, request_id, name, *args)
            restarted.register = counting_register
            squatter = await self.client(Sharer, {"web": (LOCALHOST, target)},
                                         router=self.router_address)
            await squatter.wait_ready(10)
            start = len(self.logs)
            relay.refuse = False
            await self.watch.wait(self.HELD, 10, start)
            await wait_until(lambda: sum(asked.values()) >= 5, 10, "a few more REGISTERs")
            self.assertFalse(rightful.done.done())
            held_lines = [l for l in self.logs[start:] if "held by another sharer" in l]
            self.assertEqual(len(held_lines), 1, self.logs[start:])
            self.assertIn("stop the other sharer, or choose another name", held_lines[0])
            self.assertEqual(restarted.services["web"].peer.peer,
                             "%s:%d" % squatter.link.transport.get_extra_info("sockname")[:2])

            await squatter.close(0)
            await self.watch.wait(r"^sharing 'web' -> .*\(again\)$", 10, start)
            listed = await list_services(router=self.router_address)
            self.assertEqual([(s["name"], s["secret"]) for s in listed], [("web", True)])
            self.assertFalse(rightful.done.done())
            self.assertEqual(len([l for l in self.logs if "held by another sharer" in l]), 1)
        self.run_async(main())

    def test_a_taken_over_goaway_is_retried_not_fatal(self):
        # Older routers said GOAWAY taken-over when another sharer took the name: a
        # rightful sharer says so once and comes back.
        async def main():
            await self.start_router()
            target = await self.start_target(echo_handler)
            sharer = await self.client(Sharer, {"web": (LOCALHOST, target)},
                                       router=self.router_address, backoff=(0.05, 0.2))
            await sharer.wait_ready(10)
            start = len(self.logs)
            sharer.link.on_goaway(0, json.dumps({"code": "taken-over",
                                                 "message": "service 'web' was taken over"}).encode())
            line = await self.watch.wait(r"^share: service 'web' was taken over", 10, start)
            self.assertIn("held by another sharer", line)
            self.assertIn("retrying", line)
            await self.watch.wait(r"^sharing 'web' -> .*\(again\)$", 10, start)
            self.assertFalse(sharer.done.done())
            self.assertNotIn("taken-over", mindmeld.PERMANENT_GOAWAY)
        self.run_async(main())

    def test_register_carries_nothing_derived_from_the_secret(self):
        # REGISTER marks a service with a secret by a random value, never a proof of it
        # (an HMAC of known text could be tested offline against guesses).
        secret = "sunshine"

        async def main():
            router = await self.start_router()
            target = await self.start_target(echo_handler)
            relay = await TestReplayedRegister.RecordingRelay(self, router.port).start()
            for _ in range(2):
                sharer = await self.client(Sharer, {"web": (LOCALHOST, target)},
                                           router=relay.address, secret=secret)
                await sharer.wait_ready(10)
                await sharer.close(0)
                await wait_until(lambda: "web" not in router.services, 5, "the name to be free")
            registers = [json.loads(FrameDecoder().feed(frame)[0][3].decode())
                         for sent in relay.sent for frame in TestReplayedRegister.registers(sent)]
            self.assertEqual(len(registers), 2)
            for register in registers:
                self.assertLessEqual(set(register), {"name", "owner", "verifier", "secret"})
                self.assertRegex(register["owner"], r"^[0-9a-f]{64}$")
                self.assertIs(register.get("secret", True), True)
                for value in register.values():
                    self.assertNotIn(secret, str(value))
            self.assertNotEqual(registers[0]["verifier"], registers[1]["verifier"])
            self.assertNotEqual(registers[0]["owner"], registers[1]["owner"])
        self.run_async(main())


class TestNamesWithASecretCommandLine(SecurityCommandLine, unittest.TestCase):

    def test_a_stopped_sharer_with_a_secret_keeps_its_name_from_strangers(self):
        # Frozen for longer than the liveness probe (3 s), it would have lost its name.
        secret = "sec-" + os.urandom(12).hex()
        secret_file = write_file(os.path.join(self.tmp, "secret"), secret + "\n")
        router, address = self.router()
        target = ThreadedServer(self, tag_handler(b"T"))
        stranger_target = ThreadedServer(self, tag_handler(b"S"))
        share = self.share("web", target.port, address, "--secret-file", secret_file)
        share.p.send_signal(signal.SIGSTOP)
        self.addCleanup(lambda: share.running() and share.p.send_signal(signal.SIGCONT))
        stranger = ["share", "web", "127.0.0.1:%d" % stranger_target.port, "--router", address]
        without, = self.run_many([stranger])
        self.assert_one_error_line(without, "share", "'web'", "with a secret",
                                   "choose another name, or stop the other sharer")
        # With a secret it may be this sharer's own last run that the router still holds: it
        # waits, saying so once, and never takes the name from the live holder.
        with_a_guess = Proc(self, stranger + ["--secret", "guess"], env=self.env)
        with_a_guess.wait_line(r"the name 'web' is held by another sharer at the router; retrying")
        share.p.send_signal(signal.SIGCONT)
        forward, port = self.forward("web", address, "--secret-file", secret_file)
        payload = os.urandom(64 * 1024)
        self.assertEqual(exchange(port, payload), b"T" + payload)
        self.assertTrue(share.running())
        self.assertTrue(with_a_guess.running())
        code, lines = with_a_guess.signal(signal.SIGTERM)
        self.assertEqual(code, 0, lines)
        self.assertEqual(len([l for l in lines if "held by another sharer" in l]), 1, lines)
        code, lines = share.signal(signal.SIGTERM)
        self.assertEqual(code, 0, lines)
        self.assertFalse([l for l in lines if "retrying" in l or "again" in l], lines)


# ---------------------------------------------------------------------------
# 17. A malicious router (issue 13): a relay in front of a real router that reads, alters,
#     drops, reorders, replays and makes up frames, against share and forward as users run them
# ---------------------------------------------------------------------------

UP, DOWN = "up", "down"             # client -> router, router -> client


class HostileLink:
    """One client's link through a HostileRelay, parsed both ways with mindmeld's own codec.

    Each frame is recorded in `frames` as (direction, type, stream id, payload) and handed to
    the relay's hook(link, direction, type, stream id, payload), which returns None to pass
    it on, or the list of (type, stream id, payload) to pass instead ([] drops it); it may
    send frames of its own either way with send().  `raw` holds the bytes seen each way.
    Streams the relay opens toward the client itself (own_stream()) take ids in the client's
    order: the router's later streams are renumbered, and what the client sends on the
    relay's own streams goes to the hook only."""

    def __init__(self, relay, writers):
        self.relay, self.writers = relay, writers       # {UP: to the router, DOWN: to the client}
        self.raw = {UP: bytearray(), DOWN: bytearray()}
        self.frames = []
        self.role = None                                # from the client's HELLO
        self.own = set()
        self._to_client, self._to_router = {}, {}       # ids of the streams the router opened
        self._next_even = 2

    def send(self, direction, ftype, stream_id, payload=b""):
        if isinstance(payload, dict):
            payload = json.dumps(payload).encode()
        self.writers[direction].write(encode_frame(ftype, stream_id, payload))

    def own_stream(self):
        stream_id = self._next_even
        self._next_even += 2
        self.own.add(stream_id)
        return stream_id

    def recorded(self, direction, ftype=None, stream_id=None):
        return [f for f in self.frames if f[0] == direction and ftype in (None, f[1])
                and stream_id in (None, f[2])]

    def _renumber(self, direction, ftype, stream_id):
        if stream_id == 0 or stream_id % 2:             # the control stream, or the client's own
            return stream_id
        if direction == UP:
            return self._to_router.get(stream_id, stream_id)
        if ftype == OPEN and stream_id not in self._to_client:
            self._to_client[stream_id], self._to_router[self._next_even] = self._next_even, stream_id
            self._next_even += 2
        return self._to_client.get(stream_id, stream_id)

    def received(self, direction, ftype, stream_id, payload):
        self.frames.append((direction, ftype, stream_id, payload))
        if direction == UP and ftype == HELLO:
            self.role = json.loads(payload.decode()).get("role")
        hook = self.relay.hook
        out = hook(self, direction, ftype, stream_id, payload) if hook is not None else None
        if direction == UP and stream_id in self.own:
            return
        for ftype, stream_id, payload in [(ftype, stream_id, payload)] if out is None else out:
            self.writers[direction].write(
                encode_frame(ftype, self._renumber(direction, ftype, stream_id), payload))


class HostileRelay(SilentRelay):
    """A malicious router: a SilentRelay in a LoopThread to a real router at `upstream_port`
    whose links are HostileLinks.  The hook runs in the loop's thread, under `changed`;
    wait() blocks the test thread until a predicate on the links holds."""

    def __init__(self, test, loops, upstream_port, hook=None):
        SilentRelay.__init__(self, test, upstream_port)
        self.loops, self.hook = loops, hook
        self.links, self.errors = [], []
        self.changed = threading.Condition()
        self.port = loops.call(self._listen())
        self.address = "%s:%d" % (LOCALHOST, self.port)
        test.addCleanup(lambda: loops.call(self.close()))

    async def _listen(self):
        self.server = await asyncio.start_server(self._serve, LOCALHOST, 0)
        return self.server.sockets[0].getsockname()[1]

    def _join(self, reader, writer, up_reader, up_writer):
        link = HostileLink(self, {UP: up_writer, DOWN: writer})
        with self.changed:
            self.links.append(link)
        for direction, source in ((UP, reader), (DOWN, up_reader)):
            self._start(self._relay(link, direction, source))

    async def _relay(self, link, direction, reader):
        decoder, sink = FrameDecoder(), link.writers[direction]
        preamble = len(PREAMBLE) if direction == UP else 0
        try:
            for _ in range(10 ** 6):
                data = await reader.read(CHUNK)
                if not data:
                    break
                with self.changed:
                    link.raw[direction] += data
                    if preamble:                # the client's preamble passes as it is
                        head, data = data[:preamble], data[preamble:]
                        sink.write(head)
                        preamble -= len(head)
                    for ftype, _flags, stream_id, payload in decoder.feed(data):
                        link.received(direction, ftype, stream_id, payload)
                    self.changed.notify_all()
                await sink.drain()
        except (ConnectionError, OSError):
            pass
        except Exception as exc:                # noqa: BLE001 - a hook's bug: wait() raises it
            with self.changed:
                self.errors.append(exc)
                self.changed.notify_all()
        finally:
            sink.close()
            with self.changed:
                self.changed.notify_all()

    def wait(self, predicate, what, timeout=5):
        """Block until predicate() holds (checked after each batch of frames)."""
        with self.changed:
            ok = self.changed.wait_for(lambda: self.errors or predicate(), timeout)
            if self.errors:
                raise self.errors[0]
            if not ok:
                raise AssertionError("the relay did not see %s within %s s" % (what, timeout))

    def call(self, action):
        """Run action() in the relay's loop, as a hook runs (to send frames of its own)."""
        async def run():
            with self.changed:
                return action()
        return self.loops.call(run())

    def link(self, role):
        """The first link whose client said it is a `role` ('share', 'forward')."""
        self.wait(lambda: any(l.role == role for l in self.links), "a %s link" % role)
        return next(l for l in self.links if l.role == role)

    def captured(self):
        with self.changed:
            return b"".join(bytes(l.raw[d]) for l in self.links for d in (UP, DOWN))


class TlsEnd:
    """One end of a TLS session over memory BIOs, for a relay that plays the sharer (server)
    or the forwarder (client) inside a stream: ciphertext in with feed(), out with take()."""

    def __init__(self, context, server_side):
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_side=server_side)
        self.done, self.plain = False, bytearray()
        self.step()

    def step(self):
        if not self.done:
            try:
                self.tls.do_handshake()
                self.done = True
            except ssl.SSLWantReadError:
                return
        for _ in range(1000):
            try:
                chunk = self.tls.read(CHUNK)
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                return
            if not chunk:
                return
            self.plain += chunk

    def feed(self, data):
        self.incoming.write(data)
        self.step()

    def write(self, data):
        self.tls.write(data)

    def take(self):
        return self.outgoing.read()


def e2e_tls_context(server_side, files):
    """What a relay needs to speak TLS inside a stream as either end: the public embedded
    certificate and key as a server, no checks as a client; TLS 1.2, as mindmeld speaks it."""
    if server_side:
        context = ssl.SSLContext(getattr(ssl, "PROTOCOL_TLS_SERVER", ssl.PROTOCOL_SSLv23))
        cert = write_file(os.path.join(files, "e2e-cert.pem"), mindmeld.E2E_CERT_PEM, 0o644)
        key = write_file(os.path.join(files, "e2e-key.pem"), mindmeld.E2E_KEY_PEM)
        context.load_cert_chain(cert, key)
    else:
        context = ssl_client_context_without_checks()
    if hasattr(ssl, "TLSVersion"):
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    else:                                       # 3.6
        context.options |= ssl.OP_NO_TLSv1_3
    return context


class RecordingTarget(ThreadedServer):
    """An echo target that keeps what each connection brought and how it ended."""

    def __init__(self, test):
        self.received, self.endings = [], []
        self.changed = threading.Condition()
        ThreadedServer.__init__(self, test, self._echo)

    def _echo(self, conn):
        got = bytearray()
        with self.changed:
            self.received.append(got)
            self.changed.notify_all()
        how = "eof"
        try:
            for _ in range(10 ** 6):
                chunk = conn.recv(CHUNK)
                if not chunk:
                    break
                with self.changed:
                    got += chunk
                    self.changed.notify_all()
                conn.sendall(chunk)
            conn.shutdown(socket.SHUT_WR)
        except OSError as exc:
            how = "reset" if isinstance(exc, ConnectionResetError) else repr(exc)
        with self.changed:
            self.endings.append(how)
            self.changed.notify_all()

    def wait(self, predicate, what, timeout=5):
        with self.changed:
            if not self.changed.wait_for(predicate, timeout):
                raise AssertionError("the target: not within %s s: %s (received %r, endings %r)"
                                     % (timeout, what, self.received, self.endings))


class UserConnection:
    """A user's connection to the forwarder's port, from the test thread."""

    def __init__(self, test, port):
        self.conn = socket.create_connection((LOCALHOST, port), timeout=5)
        test.addCleanup(self.conn.close)

    def send(self, data):
        self.conn.sendall(data)

    def round_trip(self, data):
        self.send(data)
        return recv_exactly(self.conn, len(data), 5)

    def rest(self, timeout=5):
        """Everything until the far side ends the connection: (bytes, 'eof' or 'reset')."""
        got = bytearray()
        for remaining in countdown(timeout):
            self.conn.settimeout(remaining)
            try:
                chunk = self.conn.recv(CHUNK)
            except (ConnectionResetError, ConnectionAbortedError):
                return bytes(got), "reset"
            except socket.timeout:
                break
            if not chunk:
                return bytes(got), "eof"
            got += chunk
        return bytes(got), "still open"


def json_of(payload):
    return json.loads(bytes(payload).decode())


ALTERED = r"stream web#\d+: end-to-end check failed: the data was altered on the way"
CUT_SHORT = r"stream web#\d+: end-to-end check failed: the stream was cut short on the way"
NOT_THE_SHARER = (r"forward: the sharer of 'web' could not prove the secret "
                  r"\(a different secret, or not the real sharer\)")
FAILED_ATTEMPT = r"share: 'web': a stream failed to prove the secret"
FIRST = b"first: the stream is open end to end\n"


class TestMaliciousRouter(SecurityCommandLine, unittest.TestCase):
    """Issue 13: a router that does its worst, as a HostileRelay in front of a real one.
    share and forward run as a user runs them; each test asserts what the user sees: the
    lines they print, what the local client and the target receive.  The tests marked
    'control' run the same attack without --secret and show that it works there: the
    relay really does what the other tests say fails."""

    SECRET = "sunshine"

    def tunnel(self, hook=None, share_secret=SECRET, forward_secret=SECRET):
        """A router, a HostileRelay in front of it running `hook`, a RecordingTarget shared
        as 'web' and a forwarder to it, both through the relay: the forwarder's port."""
        _router, self.router_address = self.router()
        self.loops = LoopThread(self)
        self.relay = HostileRelay(self, self.loops, int(self.router_address.rpartition(":")[2]), hook)
        self.target = RecordingTarget(self)
        self.sharer = self.share("web", self.target.port, self.relay.address,
                                 *(["--secret", share_secret] if share_secret else []))
        self.forwarder, port = self.forward(
            "web", self.relay.address, *(["--secret", forward_secret] if forward_secret else []))
        self.started = self.forwarder.lines[-1]
        return port

    def opened(self, port):
        """A user's connection whose stream is open end to end (FIRST came back)."""
        user = UserConnection(self, port)
        self.assertEqual(user.round_trip(FIRST), FIRST)
        return user

    def assert_target_got(self, *expected):
        self.assertEqual([bytes(r) for r in self.target.received], list(expected))

    def assert_altered_and_ended(self, user, first_to_see):
        """The stream ends with a reset for the user; `first_to_see` (the side that read the
        altered record) and then the other say so; the target's connection ends too."""
        self.assertEqual(user.rest(), (b"", "reset"))
        other = self.forwarder if first_to_see is self.sharer else self.sharer
        first_to_see.wait_line(ALTERED)
        other.wait_line(ALTERED)
        self.target.wait(lambda: self.target.endings, "the end of the target's connection")

    # -- one byte changed, two records swapped, the end cut off --------------------------
    def alter_next_data(self, role, direction, alter):
        """A hook that, once state['armed'], passes the next DATA frame of `role`'s link
        going `direction` as alter(payload)."""
        state = {"armed": False, "done": False}

        def hook(link, way, ftype, stream_id, payload):
            if state["armed"] and not state["done"] and link.role == role and way == direction \
                    and ftype == DATA:
                state["done"] = True
                return [(DATA, stream_id, alter(payload))]
        return state, hook

    @staticmethod
    def flip(payload):
        middle = len(payload) // 2
        return payload[:middle] + bytes([payload[middle] ^ 0x20]) + payload[middle + 1:]

    def flipped_on_the_way(self, secret, direction=UP):
        state, hook = self.alter_next_data("forward", direction, self.flip)
        user = self.opened(self.tunnel(hook, secret, secret))
        state["armed"] = True
        user.send(b"a lower-case line\n")
        return user

    def test_control_without_a_secret_a_flipped_byte_arrives(self):
        user = self.flipped_on_the_way(None)
        altered = self.flip(b"a lower-case line\n")
        self.assertEqual(recv_exactly(user.conn, len(altered), 5), altered)
        self.assert_target_got(FIRST + altered)

    def test_a_flipped_byte_toward_the_sharer_ends_the_stream_at_both_ends(self):
        user = self.flipped_on_the_way(self.SECRET)
        self.assert_altered_and_ended(user, self.sharer)
        self.assert_target_got(FIRST)

    def test_a_flipped_byte_toward_the_forwarder_ends_the_stream_at_both_ends(self):
        user = self.flipped_on_the_way(self.SECRET, DOWN)
        self.assert_altered_and_ended(user, self.forwarder)
        self.assertEqual(self.target.endings, ["reset"])
        self.assert_target_got(FIRST + b"a lower-case line\n")     # the echo was altered, not this

    def swapped_on_the_way(self, secret):
        state = {"armed": False, "held": None, "done": False}

        def hook(link, direction, ftype, stream_id, payload):
            if not state["armed"] or state["done"] or link.role != "forward" \
                    or direction != UP or ftype != DATA:
                return None
            if state["held"] is None:
                state["held"] = payload
                return []
            state["done"] = True
            return [(DATA, stream_id, payload), (DATA, stream_id, state["held"])]
        user = self.opened(self.tunnel(hook, secret, secret))
        state["armed"] = True
        user.send(b"one\n")
        self.relay.wait(lambda: state["held"] is not None, "the first frame to hold back")
        user.send(b"two\n")
        self.relay.wait(lambda: state["done"], "the second frame")
        return user

    def test_control_without_a_secret_swapped_frames_arrive_swapped(self):
        user = self.swapped_on_the_way(None)
        self.assertEqual(recv_exactly(user.conn, 8, 5), b"two\none\n")
        self.assert_target_got(FIRST + b"two\none\n")

    def test_swapped_frames_end_the_stream_at_both_ends(self):
        user = self.swapped_on_the_way(self.SECRET)
        self.assert_altered_and_ended(user, self.sharer)
        self.assert_target_got(FIRST)

    def cut_short_on_the_way(self, secret):
        """The relay holds back the forwarder's DATA frames once armed, and at its EOF passes
        all but the last (the close_notify with --secret): the end of the stream is cut."""
        state = {"armed": False, "held": [], "cut": None}

        def hook(link, direction, ftype, stream_id, payload):
            if not state["armed"] or link.role != "forward" or direction != UP:
                return None
            if ftype == DATA:
                state["held"].append(payload)
                return []
            if ftype == EOF:
                state["cut"] = state["held"].pop()
                return [(DATA, stream_id, p) for p in state["held"]] + [(EOF, stream_id, b"")]
        user = self.opened(self.tunnel(hook, secret, secret))
        state["armed"] = True
        user.send(b"the last line\n")
        self.relay.wait(lambda: state["held"], "the last line")
        user.conn.shutdown(socket.SHUT_WR)
        self.relay.wait(lambda: state["cut"] is not None, "the forwarder's EOF")
        return user

    def test_control_without_a_secret_a_cut_stream_ends_as_if_nothing_happened(self):
        user = self.cut_short_on_the_way(None)
        self.assertEqual(user.rest(), (b"", "eof"))
        self.target.wait(lambda: self.target.endings, "the end of the target's connection")
        self.assertEqual(self.target.endings, ["eof"])
        self.assert_target_got(FIRST)

    def test_a_stream_cut_short_is_an_error_at_the_end_that_sees_it(self):
        user = self.cut_short_on_the_way(self.SECRET)
        self.sharer.wait_line(CUT_SHORT)
        self.target.wait(lambda: self.target.endings, "the end of the target's connection")
        self.assert_target_got(FIRST + b"the last line\n")
        self.assertEqual(self.target.endings, ["reset"])
        got, how = user.rest()
        self.assertEqual(how, "reset")
        self.assertTrue((b"the last line\n").startswith(got), got)

    # -- a capture of both router links --------------------------------------------------
    def captured_transfer(self, secret):
        marker = b"MARKER-" + os.urandom(8).hex().encode()
        port = self.tunnel(None, secret, secret)
        payload = (marker + b" ") * 20000
        self.assertEqual(exchange(port, payload, timeout=10), payload)
        return marker, self.relay.captured()

    def test_control_without_a_secret_the_router_sees_the_plaintext(self):
        marker, captured = self.captured_transfer(None)
        self.assertGreater(captured.count(marker), 20000 * 3)      # 4 passes, some split by reads

    def test_the_router_sees_no_plaintext_and_not_the_secret(self):
        marker, captured = self.captured_transfer(self.SECRET)
        self.assertGreater(len(captured), 20000 * len(marker))
        for plaintext in (marker, self.SECRET.encode()):
            self.assertEqual(captured.count(plaintext), 0, plaintext)
        self.assertIn("encrypted end to end", self.started)
        self.assertNotIn("not encrypted", self.started)

    # -- playing the sharer, the forwarder, or both -------------------------------------
    def fake_proof(self):
        return os.urandom(32)

    def test_proofs_relayed_between_two_tls_sessions_are_worthless(self):
        # The relay is the TLS server of the forwarder's stream and the TLS client of the
        # sharer's, passes the pairing through unchanged and hands the sharer's proof to the
        # forwarder: it was made for the other session's tls-unique, so it fails.
        server, client = e2e_tls_context(True, self.tmp), e2e_tls_context(False, self.tmp)
        state = {"relayed": b"", "to_sharer": bytearray(), "to_forwarder": bytearray()}

        def hook(link, direction, ftype, stream_id, payload):
            if link.role != "forward" or ftype not in (OPEN, OPEN_OK, DATA):
                return None
            out = []
            if ftype == OPEN:
                info = json_of(payload)
                state["forwarder"], state["sharer"] = TlsEnd(server, True), TlsEnd(client, False)
                state["forwarder"].feed(base64.b64decode(info.get("data", "")))
                info["data"] = base64.b64encode(state["sharer"].take()).decode()
                return [(OPEN, stream_id, json.dumps(info).encode())]
            if ftype == OPEN_OK:
                out.append((OPEN_OK, stream_id, payload))
            elif direction == UP:
                state["forwarder"].feed(payload)
                state["to_sharer"] += state["forwarder"].plain
                del state["forwarder"].plain[:]
            else:
                state["sharer"].feed(payload)
                state["to_forwarder"] += state["sharer"].plain
                state["relayed"] += state["sharer"].plain
                del state["sharer"].plain[:]
            for end, pending in ((state["sharer"], state["to_sharer"]),
                                 (state["forwarder"], state["to_forwarder"])):
                if end.done and pending:
                    end.write(bytes(pending))
                    del pending[:]
            ahead, back = ((state["sharer"], state["forwarder"]) if direction == UP
                           else (state["forwarder"], state["sharer"]))
            data = ahead.take()                 # on in this frame's direction
            if data:
                out.append((DATA, stream_id, data))
            data = back.take()
            if data:
                link.send(DOWN if direction == UP else UP, DATA, stream_id, data)
            return out

        port = self.tunnel(hook)
        user = UserConnection(self, port)
        user.send(b"hello?")
        self.forwarder.wait_line(NOT_THE_SHARER)
        self.assertEqual(user.rest(), (b"", "reset"))
        self.relay.wait(lambda: len(state["relayed"]) >= 32, "the sharer's proof")
        self.assertTrue(state["forwarder"].done and state["sharer"].done)   # both legs were up
        self.sharer.wait_line(FAILED_ATTEMPT)
        self.assertEqual(self.target.received, [])

    def own_stream_hook(self, state):
        """Streams the relay opens toward the sharer itself, with a TLS client of its own that
        answers the sharer's proof with a made-up one: their outcome in state['ends']."""
        client = e2e_tls_context(False, self.tmp)

        def hook(link, direction, ftype, stream_id, payload):
            if link.role != "share" or direction != UP or stream_id not in link.own:
                return None
            tls = state["tls"].get(stream_id)
            if ftype in (RESET, OPEN_REFUSED, EOF):
                state["ends"][stream_id] = FRAME_NAMES[ftype]
            elif ftype == OPEN_OK:
                for frame in state["after_ok"].pop(stream_id, ()):
                    link.send(DOWN, *frame)
            elif ftype == DATA and tls is not None:
                tls.feed(payload)
                if tls.done and len(tls.plain) >= 32 and not state["proved"].get(stream_id):
                    state["proved"][stream_id] = True
                    tls.write(self.fake_proof() + b"GET / HTTP/1.0\r\n\r\n")
                out = tls.take()
                if out:
                    link.send(DOWN, DATA, stream_id, out)
            return []

        def open_streams(link, variants):
            template = json_of(link.recorded(DOWN, OPEN)[0][3])
            for e2e in variants:
                stream_id = link.own_stream()
                info = dict(template)
                if e2e is None:
                    info.pop("e2e", None)
                    info["data"] = base64.b64encode(b"made up by the router\n").decode()
                else:
                    tls = state["tls"][stream_id] = TlsEnd(client, False)
                    info["e2e"], info["data"] = e2e, base64.b64encode(tls.take()).decode()
                link.send(DOWN, OPEN, stream_id, json.dumps(info).encode())
        state.update(tls={}, ends={}, proved={}, after_ok={})
        return hook, open_streams

    def one_honest_stream(self, secret):
        """A tunnel whose relay can open streams of its own (own_stream_hook), and one honest
        stream through it, half-closed by the user and ended: (state, open_streams)."""
        state = {}
        hook, open_streams = self.own_stream_hook(state)
        user = self.opened(self.tunnel(hook, secret, secret))
        user.conn.shutdown(socket.SHUT_WR)
        self.assertEqual(user.rest(), (b"", "eof"))
        return state, open_streams

    def streams_of_its_own(self, secret):
        state, open_streams = self.one_honest_stream(secret)
        share_link = self.relay.link("share")
        if secret:
            pair = json_of(self.relay.link("forward").recorded(UP, OPEN)[0][3])["e2e"]["pair"]
            made_up = "%0512x" % random.randrange(2, int("f" * 400, 16))
            variants = [{"pairs": [pair]}, {"pair": os.urandom(16).hex(), "pake": made_up}]
        else:
            variants = [None]
        self.relay.call(lambda: open_streams(share_link, variants))
        return state, share_link, len(variants)

    def test_control_without_a_secret_the_router_opens_streams_of_its_own(self):
        _state, _link, _count = self.streams_of_its_own(None)
        self.target.wait(lambda: len(self.target.received) == 2 and self.target.received[1],
                         "the router's own stream")
        self.assertEqual(bytes(self.target.received[1]), b"made up by the router\n")

    def test_streams_the_router_opens_itself_never_reach_the_target(self):
        state, _link, count = self.streams_of_its_own(self.SECRET)
        self.sharer.wait_line(FAILED_ATTEMPT)
        self.relay.wait(lambda: len(state["ends"]) == count, "the end of the relay's streams")
        self.assertEqual(sorted(state["ends"].values()), ["RESET"] * count)
        self.assertEqual(len(state["proved"]), count)      # the sharer proved itself each time
        self.assertEqual(len(self.target.received), 1)     # the user's honest stream only

    def answered_by_the_router(self, secret, plainly=False, after_honest=False):
        """The relay keeps the forwarder's OPEN from the router and answers it itself: with
        --secret as a TLS server with the public certificate, a made-up pairing message and
        a made-up proof; without, or `plainly`, with an OPEN_OK and bytes of its own.
        after_honest: first one stream goes through untouched (the forwarder pairs, and keeps
        the TLS session), and the relay takes the next."""
        server = e2e_tls_context(True, self.tmp) if secret else None
        state = {"armed": not after_honest}

        def hook(link, direction, ftype, stream_id, payload):
            if link.role != "forward" or direction != UP or not state["armed"]:
                return None
            if ftype == OPEN:                   # the router never hears of this stream
                state.setdefault("taken", set()).add(stream_id)
                info = json_of(payload)
                if not secret or plainly:
                    link.send(DOWN, OPEN_OK, stream_id, {})
                    link.send(DOWN, DATA, stream_id, b"made up by the router\n")
                    return []
                tls = state["tls"] = TlsEnd(server, True)
                tls.feed(base64.b64decode(info.get("data", "")))
                made_up = "%0512x" % random.randrange(2, int("f" * 400, 16))
                offer = info["e2e"]
                link.send(DOWN, OPEN_OK, stream_id, {"e2e": {"pair": offer["pair"], "pake": made_up}
                                                     if "pake" in offer else {"pair": offer["pairs"][-1]}})
                link.send(DOWN, DATA, stream_id, tls.take())
            elif ftype == DATA and "tls" in state:
                tls = state["tls"]
                tls.feed(payload)
                if tls.done and not state.get("proved"):
                    state["proved"] = True
                    tls.write(self.fake_proof())
                link.send(DOWN, DATA, stream_id, tls.take())
            return [] if stream_id in state.get("taken", ()) else None
        port = self.tunnel(hook, secret, secret)
        if after_honest:
            honest = self.opened(port)
            honest.conn.shutdown(socket.SHUT_WR)
            self.assertEqual(honest.rest(), (b"", "eof"))
            self.relay.call(lambda: state.update(armed=True))
        user = UserConnection(self, port)
        user.send(b"GET /secret-plans HTTP/1.0\r\n\r\n")
        return state, user

    def test_control_without_a_secret_the_router_answers_as_the_sharer(self):
        _state, user = self.answered_by_the_router(None)
        self.assertEqual(recv_exactly(user.conn, 22, 5), b"made up by the router\n")

    def test_the_router_cannot_answer_in_plaintext_either(self):
        _state, user = self.answered_by_the_router(self.SECRET, plainly=True)
        self.forwarder.wait_line(NOT_THE_SHARER)
        self.assertEqual(user.rest(), (b"", "reset"))
        self.assertFalse([l for l in self.forwarder.lines if "router closed the link" in l])
        self.assertEqual(self.target.received, [])

    def test_the_router_cannot_answer_as_the_sharer(self):
        state, user = self.answered_by_the_router(self.SECRET)
        self.forwarder.wait_line(NOT_THE_SHARER)
        self.assertEqual(user.rest(), (b"", "reset"))
        self.assertTrue(state["proved"])                    # the TLS handshake went through
        self.assertEqual(self.target.received, [])
        self.assertFalse([l for l in self.forwarder.lines if "router closed the link" in l])

    def test_the_router_cannot_answer_a_forwarder_that_holds_a_tls_session(self):
        # The forwarder sends at once on a resumed session; the relay cannot resume it (the
        # ticket is the sharer's), so it is a full handshake, and the forwarder waits.
        state, user = self.answered_by_the_router(self.SECRET, after_honest=True)
        self.forwarder.wait_line(NOT_THE_SHARER)
        self.assertEqual(user.rest(), (b"", "reset"))
        self.assertTrue(state["proved"])
        self.assertEqual(bytes(state["tls"].plain), b"")    # not even the forwarder's proof
        self.assert_target_got(FIRST)

    def replayed_stream(self, secret):
        """A whole stream recorded on the sharer's link, replayed to it as a new stream."""
        state, _open_streams = self.one_honest_stream(secret)
        self.target.wait(lambda: self.target.endings, "the end of the user's stream")
        link = self.relay.link("share")
        recorded = link.recorded(DOWN, OPEN)[0][2]
        self.relay.wait(lambda: link.recorded(DOWN, EOF, recorded), "the stream's EOF")

        def replay():                   # what followed the OPEN goes after the sharer's OPEN_OK
            stream_id = link.own_stream()
            frames = [(ftype, stream_id, payload) for _direction, ftype, _id, payload
                      in link.recorded(DOWN, None, recorded) if ftype in (OPEN, DATA, EOF)]
            state["after_ok"][stream_id] = frames[1:]
            link.send(DOWN, *frames[0])
        self.relay.call(replay)
        return state

    def test_control_without_a_secret_a_replayed_stream_reaches_the_target_again(self):
        self.replayed_stream(None)
        self.target.wait(lambda: len(self.target.endings) == 2, "the replayed stream")
        self.assert_target_got(FIRST, FIRST)

    def test_a_replayed_stream_never_reaches_the_target(self):
        state = self.replayed_stream(self.SECRET)
        self.sharer.wait_line(r"share: 'web': a stream failed to prove the secret")
        self.relay.wait(lambda: state["ends"], "the end of the replayed stream")
        self.assertEqual(list(state["ends"].values()), ["RESET"])
        self.assert_target_got(FIRST)

    # Found by this attacker: the sharer once counted a failed attempt only when its stream
    # ended, so 12 pairings made at once all got its proof and the 12th guess got in.
    def test_guesses_made_all_at_once_are_limited_too(self):
        # A guess costs the router one pairing: SPAKE2 with the password it guessed, then the
        # sharer's proof tells it whether the guess was right.  The sharer allows 10 failed
        # attempts a minute; made all at once, before any has failed, 12 must not all be
        # answered, or the router tests as many guesses as streams it may open.
        guesses = ["guess-%d" % i for i in range(11)] + [self.SECRET]
        client = e2e_tls_context(False, self.tmp)
        state = {"streams": {}, "answered": set(), "learned": None}

        def hook(link, direction, ftype, stream_id, payload):
            attempt = state["streams"].get(stream_id)
            if link.role != "share" or direction != UP or attempt is None:
                return None
            spake, tls, guess = attempt[:3]
            if ftype == OPEN_OK:
                attempt.append(spake.finish(int(json_of(payload)["e2e"]["pake"], 16)))
            elif ftype == DATA:
                tls.feed(payload)
                if tls.done and len(tls.plain) >= 32 and stream_id not in state["answered"]:
                    state["answered"].add(stream_id)
                    binding = tls.tls.get_channel_binding("tls-unique")
                    keys = attempt[3]
                    if hmac.compare_digest(bytes(tls.plain[:32]), keys.proof(mindmeld.SHARER, binding)):
                        state["learned"] = guess            # and in it goes, as the forwarder
                        tls.write(keys.proof(mindmeld.FORWARDER, binding) + b"made up by the router\n")
                    else:
                        tls.write(self.fake_proof())
                out = tls.take()
                if out:
                    link.send(DOWN, DATA, stream_id, out)
            return []

        def guess_all(link):
            template = json_of(link.recorded(DOWN, OPEN)[0][3])
            for guess in guesses:
                stream_id = link.own_stream()
                pair = os.urandom(16).hex()
                spake = mindmeld.Spake2(mindmeld.SecretPassword(guess, "web"), mindmeld.FORWARDER, pair)
                tls = TlsEnd(client, False)
                state["streams"][stream_id] = [spake, tls, guess]
                info = dict(template, e2e={"pair": pair, "pake": "%0512x" % spake.message},
                            data=base64.b64encode(tls.take()).decode())
                link.send(DOWN, OPEN, stream_id, json.dumps(info).encode())

        user = self.opened(self.tunnel(hook))
        user.conn.shutdown(socket.SHUT_WR)
        self.assertEqual(user.rest(), (b"", "eof"))
        share_link = self.relay.link("share")
        self.relay.call(lambda: guess_all(share_link))
        ended = lambda: [l for l in share_link.recorded(UP) if l[2] in state["streams"]
                         and l[1] in (RESET, OPEN_REFUSED)]
        self.relay.wait(lambda: len(ended()) + (state["learned"] is not None) >= len(guesses),
                        "every guess answered", timeout=10)
        self.assertIsNone(state["learned"], "the router learned the secret: %d streams answered"
                          % len(state["answered"]))
        self.assertLessEqual(len(state["answered"]), 10)
        self.assertEqual(len(self.target.received), 1)      # the user's stream only

    # Found by this attacker: a ClientHello that failed at once failed the stream before its
    # OPEN_OK was sent, and the sharer then sent OPEN_OK on the closed stream, an internal
    # error that dropped its link and every stream on it.
    def test_a_strangers_open_with_bad_tls_ends_that_stream_only(self):
        user = self.opened(self.tunnel())
        host, _, port = self.router_address.rpartition(":")
        opening = {"service": "web", "data": base64.b64encode(b"GET / HTTP/1.0\r\n\r\n").decode(),
                   "e2e": {"pair": os.urandom(16).hex(),
                           "pake": "%0512x" % random.randrange(2, int("f" * 400, 16))}}
        with socket.create_connection((host, int(port)), timeout=5) as stranger:
            stranger.sendall(PREAMBLE + encode_json(HELLO, 0, {"version": PROTOCOL_VERSION,
                                                               "role": "forward", "agent": "test"})
                             + encode_json(OPEN, 1, opening))
            self.sharer.wait_line(r"share: 'web': a stream failed to prove the secret")
            try:
                echoed = user.round_trip(b"still there?\n")
            except OSError as exc:
                echoed = exc
            self.assertEqual(echoed, b"still there?\n", self.sharer.lines)
        self.assertFalse([l for l in self.sharer.lines if "internal error" in l or "(again)" in l],
                         self.sharer.lines)

    # -- a secret on one side only, or two different ones: the lines users see ------------
    def test_a_wrong_secret(self):
        port = self.tunnel(None, self.SECRET, "moonshine")
        self.assertIn("encrypted end to end", self.started)
        user = UserConnection(self, port)
        user.send(b"hello?")
        self.forwarder.wait_line(NOT_THE_SHARER)
        self.assertEqual(user.rest(), (b"", "reset"))
        self.sharer.wait_line(FAILED_ATTEMPT)
        self.assertEqual(self.target.received, [])

    def test_no_secret_on_the_forwarder(self):
        port = self.tunnel(None, self.SECRET, None)
        self.assertIn("not encrypted end to end", self.started)
        user = UserConnection(self, port)
        user.send(b"hello?")
        self.forwarder.wait_line(r"forward: connection to 'web' refused: service 'web' requires a "
                                 r"secret: pass --secret or --secret-file$")
        self.assertEqual(user.rest()[0], b"")
        self.assertEqual(self.target.received, [])

    def test_a_secret_on_the_forwarder_only(self):
        state = {}

        def hook(link, direction, ftype, stream_id, payload):
            if link.role == "forward" and direction == UP and ftype in (OPEN, DATA):
                state.setdefault("sent", []).append(payload)
        port = self.tunnel(hook, None, self.SECRET)
        user = UserConnection(self, port)
        user.send(b"a user byte that must not leave")
        self.forwarder.wait_line(r"forward: connection to 'web' refused: service 'web' has no secret, "
                                 r"so its streams cannot be encrypted end to end: drop --secret, or "
                                 r"share it with --secret$")
        self.assertEqual(user.rest()[0], b"")
        self.assertEqual(self.target.received, [])
        self.assertNotIn(b"must not leave", b"".join(state["sent"]))


# ---------------------------------------------------------------------------
# Running the suite in two processes: `python3 test_mindmeld.py` (what CI runs)
# ---------------------------------------------------------------------------

def run_in_two_processes():
    """The suite over two processes at once, one test class at a time: each worker takes the
    next class as soon as it is free, so neither waits while the other still has a queue
    (most tests wait on sockets and subprocesses, so two run in about 60 % of the time of
    one).  Each has its own HOME, so that state directories never meet.  Prints each
    worker's output, then one summary in unittest's words ("Ran N tests", "OK" or
    "FAILED (...)"), and exits 1 if anything failed.  `python3 -m unittest -v test_mindmeld`
    runs the suite in one process."""
    loader = unittest.defaultTestLoader
    cases = [(loader.loadTestsFromTestCase(case).countTestCases(), name)
             for name, case in sorted(globals().items())
             if isinstance(case, type) and issubclass(case, unittest.TestCase)
             and loader.getTestCaseNames(case)]
    queue = [name for _count, name in sorted(cases, reverse=True)]    # the larger classes first
    began, workers = time.monotonic(), []
    for _ in range(2):
        home = tempfile.mkdtemp(prefix="mindmeld-tests-")
        env = dict(os.environ, HOME=home, XDG_CONFIG_HOME=os.path.join(home, ".config"))
        env.pop("MINDMELD_STATE_DIR", None)
        report = tempfile.TemporaryFile()
        proc = subprocess.Popen([sys.executable, "-c", "import test_mindmeld; test_mindmeld.work()"],
                                cwd=HERE, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=report)
        workers.append((home, report, proc))
    busy = {}
    for _home, _report, proc in workers:
        if queue:
            _give(proc, queue.pop(0))
            busy[proc.stdout.fileno()] = proc
        else:
            proc.stdin.close()
    for _ in range(10 * len(cases) + 10):       # a class done per round, at the least
        if not busy:
            break
        ready, _, _ = select.select(list(busy), [], [], 600)
        if not ready:
            break                               # a worker hung: the summary says FAILED
        for fd in ready:
            proc = busy[fd]
            if proc.stdout.readline() and queue:
                _give(proc, queue.pop(0))
            else:
                proc.stdin.close()
                del busy[fd]
    totals, failed = collections.Counter(), bool(busy)
    for home, report, proc in workers:
        if proc.poll() is None and busy:
            proc.kill()
        proc.wait()
        shutil.rmtree(home, ignore_errors=True)
        report.seek(0)
        out = report.read().decode("utf-8", "replace")
        sys.stdout.write(out)
        ran = re.findall(r"^Ran (\d+) tests? in ", out, re.MULTILINE)
        verdicts = re.findall(r"^(OK|FAILED)(?: \((.*)\))?\s*$", out, re.MULTILINE)
        if proc.returncode != 0 or len(verdicts) != len(ran):
            failed = True
        totals["tests"] += sum(int(n) for n in ran)
        for _verdict, details in verdicts:
            for part in (details.split(", ") if details else []):
                key, _, value = part.partition("=")
                totals[key] += int(value)
    print("\nRan %d tests in %.3fs (two processes)\n" % (totals["tests"], time.monotonic() - began))
    details = ", ".join("%s=%d" % (key, totals[key]) for key in
                        ("failures", "errors", "skipped", "expected failures", "unexpected successes")
                        if totals[key])
    failed = failed or totals["failures"] or totals["errors"] or totals["unexpected successes"]
    print(("FAILED" if failed else "OK") + (" (%s)" % details if details else ""))
    return 1 if failed else 0


def _give(proc, name):
    proc.stdin.write(name.encode() + b"\n")
    proc.stdin.flush()


def work():
    """A worker of run_in_two_processes: runs each class named on stdin, its report on
    stderr, and says "done" on stdout after each."""
    runner = unittest.TextTestRunner(stream=sys.stderr, verbosity=2)
    for line in iter(sys.stdin.readline, ""):
        runner.run(unittest.defaultTestLoader.loadTestsFromTestCase(globals()[line.strip()]))
        sys.stderr.flush()
        sys.stdout.write("done\n")
        sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(run_in_two_processes())
