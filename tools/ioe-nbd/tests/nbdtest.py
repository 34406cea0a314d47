"""Helpers for the ioe-nbd tests: start and stop the server, a raw NBD
client for protocol-level checks, descriptor counts, page-cache state."""
import ctypes
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

SKIP = 77

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
STRUCTURED_MAGIC = 0x668E33EF

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO = 1, 2, 3, 5, 6, 7
OPT_STRUCTURED_REPLY, OPT_LIST_META, OPT_SET_META, OPT_EXTENDED_HEADERS = 8, 9, 10, 11
REP_ACK, REP_SERVER, REP_INFO, REP_META = 1, 2, 3, 4
REP_ERR_UNSUP, REP_ERR_INVALID, REP_ERR_UNKNOWN, REP_ERR_TOO_BIG = (1 << 31) + 1, (1 << 31) + 3, (1 << 31) + 6, (1 << 31) + 9
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = range(8)
FLAG_FUA, FLAG_NO_HOLE, FLAG_DF, FLAG_REQ_ONE, FLAG_FAST_ZERO = 1, 2, 4, 8, 16
EPERM, EIO, EINVAL, ENOSPC, ENOTSUP, ESHUTDOWN = 1, 5, 22, 28, 95, 108

HERE = os.path.dirname(os.path.abspath(__file__))


def need(*tools):
    """Exits with SKIP (and says why) if a client program is missing."""
    missing = [t for t in tools if subprocess.run(["sh", "-c", f"command -v {t}"], capture_output=True).returncode]
    if missing:
        print(f"skipped: {', '.join(missing)} not installed (the test command installs qemu-utils, libnbd-bin)")
        sys.exit(SKIP)


class Server:
    """ioe-nbd on a port the kernel picks, serving `path`."""

    def __init__(self, binary, path, *args, unix=None):
        where = ["-k", unix] if unix else ["-p", "0", "-b", "127.0.0.1"]
        self.proc = subprocess.Popen([binary, *where, *args, path], stderr=subprocess.PIPE, text=True)
        line = self.proc.stderr.readline()
        if " serving " not in line:
            raise RuntimeError(f"ioe-nbd did not start: {line}{self.proc.stderr.read()}")
        if unix:
            self.port = None
            self.uri = f"nbd+unix://?socket={unix}"
        else:
            self.port = int(line.split(" port ")[1].split()[0])
            self.uri = f"nbd://127.0.0.1:{self.port}"

    def fds(self):
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def conns(self):
        """TCP sockets the server holds, besides its listening one."""
        n = 0
        for f in os.listdir(f"/proc/{self.proc.pid}/fd"):
            try:
                if os.readlink(f"/proc/{self.proc.pid}/fd/{f}").startswith("socket:"):
                    n += 1
            except OSError:
                pass
        return n - 1

    def alive(self):
        return self.proc.poll() is None

    def stop(self, timeout=60):
        """SIGTERM; returns the exit status and what it printed."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError("ioe-nbd did not stop within the timeout after SIGTERM")
        return rc, self.proc.stderr.read()


def wait_until(cond, what, timeout=30.0):
    """Polls `cond` until it holds; fails naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        time.sleep(0.01)


def temp_image(size, data_at=()):
    """A sparse file of `size` bytes with random data at the given (offset, length) ranges."""
    fd, path = tempfile.mkstemp(prefix="ioe-nbd-test-", dir=os.environ.get("TMPDIR", "/tmp"))
    os.ftruncate(fd, size)
    for off, length in data_at:
        os.pwrite(fd, os.urandom(length), off)
    os.close(fd)
    return path


def unwritten_pages(path, offset, length):
    """Dirty plus under-writeback pages of a file range (cachestat(2), Linux
    6.5+), or None where the kernel lacks it."""
    class Range(ctypes.Structure):
        _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]

    class Stat(ctypes.Structure):
        _fields_ = [(n, ctypes.c_uint64) for n in ("cache", "dirty", "writeback", "evicted", "recently_evicted")]

    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        r, st = Range(offset, length), Stat()
        if libc.syscall(451, fd, ctypes.byref(r), ctypes.byref(st), 0) != 0:
            return None
        return st.dirty + st.writeback
    finally:
        os.close(fd)


class Client:
    """A raw NBD client, for what real clients never send."""

    def __init__(self, port, timeout=30):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        magic, opt, flags = struct.unpack(">QQH", self.recv(18))
        assert (magic, opt) == (NBDMAGIC, IHAVEOPT), "bad greeting"
        assert flags & 1, "no fixed newstyle"
        self.flags = flags
        self.cookie = 0

    def recv(self, n):
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def closed(self):
        """Whether the server closed the connection (reads until EOF)."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def send_client_flags(self, flags=3):
        self.sock.sendall(struct.pack(">I", flags))

    def option(self, opt, data=b""):
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)

    def option_reply(self):
        magic, opt, rtype, length = struct.unpack(">QIII", self.recv(20))
        assert magic == OPT_REPLY_MAGIC, hex(magic)
        return opt, rtype, self.recv(length)

    def option_replies(self):
        """Replies up to and including the final one (ACK or an error)."""
        out = []
        while True:
            opt, rtype, data = self.option_reply()
            out.append((rtype, data))
            if rtype == REP_ACK or rtype & (1 << 31):
                return out

    def go(self, name=b"", infos=(), structured=True, meta=False):
        """Handshake up to transmission; returns (size, transmission flags)."""
        self.send_client_flags()
        if structured:
            self.option(OPT_STRUCTURED_REPLY)
            assert self.option_replies()[-1][0] == REP_ACK
        if meta:
            q = b"base:allocation"
            self.option(OPT_SET_META, struct.pack(">I", len(name)) + name + struct.pack(">II", 1, len(q)) + q)
            replies = self.option_replies()
            assert replies[-1][0] == REP_ACK and replies[0][0] == REP_META, replies
            self.meta_id = struct.unpack(">I", replies[0][1][:4])[0]
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos)) + b"".join(
            struct.pack(">H", i) for i in infos)
        self.option(OPT_GO, data)
        size = flags = None
        for rtype, payload in self.option_replies():
            if rtype == REP_INFO and struct.unpack(">H", payload[:2])[0] == 0:
                size, flags = struct.unpack(">QH", payload[2:12])
            elif rtype != REP_ACK and rtype != REP_INFO:
                raise AssertionError(f"GO failed: {rtype:#x} {payload!r}")
        self.structured = structured
        return size, flags

    def request(self, cmd, offset=0, length=0, flags=0, data=b"", cookie=None):
        if cookie is None:
            self.cookie += 1
            cookie = self.cookie
        self.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, cookie, offset, length) + data)
        return cookie

    def reply(self, read_len=None):
        """One reply: (cookie, error, data, chunks) for simple or structured replies."""
        magic = struct.unpack(">I", self.recv(4))[0]
        if magic == SIMPLE_MAGIC:
            error, cookie = struct.unpack(">IQ", self.recv(12))
            data = self.recv(read_len) if read_len and error == 0 else b""
            return cookie, error, data, []
        assert magic == STRUCTURED_MAGIC, hex(magic)
        chunks, error, data = [], 0, b""
        while True:
            flags, rtype, cookie, length = struct.unpack(">HHQI", self.recv(16))
            payload = self.recv(length)
            chunks.append((rtype, payload))
            if rtype == 1:
                data += payload[8:]
            elif rtype & 0x8000:
                error = struct.unpack(">I", payload[:4])[0]
            if flags & 1:
                return cookie, error, data, chunks
            assert struct.unpack(">I", self.recv(4))[0] == STRUCTURED_MAGIC
