#!/usr/bin/env python3
"""ioe-nbd at the protocol level, with a raw client: the handshake and its
options, every command with simple and structured replies, malformed and
out-of-range requests (the right NBD error, the connection and the server
still serving), pipelined requests answered once each, FUA and FLUSH
durability, TRIM and WRITE_ZEROES effects, block status, read-only exports,
disconnects with requests in flight, garbage input; descriptors back to
their count before the clients.

usage: test_protocol.py IOE_NBD_BINARY [extra ioe-nbd options...]"""
import os
import random
import struct
import sys

from nbdtest import *  # noqa: F401,F403

MiB = 1 << 20


def handshake_options(srv, size):
    c = Client(srv.port)
    assert c.flags == 3, f"handshake flags {c.flags}"
    c.send_client_flags()
    # Unknown options, STARTTLS and extended headers: unsupported, and the session goes on.
    for opt in (99, OPT_STARTTLS, OPT_EXTENDED_HEADERS):
        c.option(opt)
        assert c.option_replies() == [(REP_ERR_UNSUP, b"option not supported")], opt
    c.option(OPT_LIST)
    replies = c.option_replies()
    assert replies[0][0] == REP_SERVER and replies[0][1] == struct.pack(">I", 5) + b"disk0", replies
    assert replies[-1][0] == REP_ACK
    c.option(OPT_LIST, b"x")
    assert c.option_replies()[-1][0] == REP_ERR_INVALID
    # INFO: unknown name, malformed, then right.
    c.option(OPT_INFO, struct.pack(">I", 4) + b"nope" + struct.pack(">H", 0))
    assert c.option_replies()[-1][0] == REP_ERR_UNKNOWN
    c.option(OPT_INFO, struct.pack(">I", 99) + b"disk0" + struct.pack(">H", 0))
    assert c.option_replies()[-1][0] == REP_ERR_INVALID
    c.option(OPT_INFO, struct.pack(">I", 5) + b"disk0" + struct.pack(">HH", 1, 3))
    infos = {struct.unpack(">H", d[:2])[0]: d[2:] for t, d in c.option_replies() if t == REP_INFO}
    assert struct.unpack(">Q", infos[0][:8])[0] == size
    assert struct.unpack(">III", infos[3]) == (1, 4096, 32 * MiB), infos[3]
    # Metadata contexts: SET needs structured replies first.
    q = b"base:allocation"
    meta = struct.pack(">I", 5) + b"disk0" + struct.pack(">II", 1, len(q)) + q
    c.option(OPT_SET_META, meta)
    assert c.option_replies()[-1][0] == REP_ERR_INVALID
    c.option(OPT_LIST_META, struct.pack(">I", 5) + b"disk0" + struct.pack(">I", 0))
    replies = c.option_replies()
    assert replies[0][0] == REP_META and replies[0][1][4:] == q and replies[-1][0] == REP_ACK, replies
    c.option(OPT_LIST_META, struct.pack(">I", 5) + b"disk0" + struct.pack(">II", 1, 50) + b"short")
    assert c.option_replies()[-1][0] == REP_ERR_INVALID
    # An option too large to hold: refused, its data dropped, the session goes on.
    c.option(OPT_INFO, b"\0" * (1 * MiB))
    assert c.option_replies()[-1][0] == REP_ERR_TOO_BIG
    c.option(OPT_ABORT)
    assert c.option_replies() == [(REP_ACK, b"")]
    assert c.closed()
    # Unknown client flags end the session.
    c = Client(srv.port)
    c.send_client_flags(0x80)
    assert c.closed()
    # EXPORT_NAME of an unknown export ends it too; of the right one, enters transmission.
    c = Client(srv.port)
    c.send_client_flags()
    c.option(OPT_EXPORT_NAME, b"other")
    assert c.closed()
    c = Client(srv.port)
    c.send_client_flags(1)  # without NO_ZEROES: 124 zero bytes follow
    c.option(OPT_EXPORT_NAME, b"disk0")
    got_size, flags = struct.unpack(">QH", c.recv(10))
    assert got_size == size and c.recv(124) == b"\0" * 124
    c.structured = False
    check_io(c, size, structured=False)
    print("handshake and options: ok")


def check_io(c, size, structured):
    data = os.urandom(8192)
    cookie = c.request(CMD_WRITE, 4096, len(data), data=data)
    assert c.reply()[:2] == (cookie, 0)
    cookie = c.request(CMD_READ, 4096, len(data))
    got_cookie, err, back, chunks = c.reply(read_len=len(data))
    assert (got_cookie, err, back) == (cookie, 0, data)
    if structured:
        assert len(chunks) == 1 and chunks[0][0] == 1, "one OFFSET_DATA chunk"
    # Out of range, bad lengths, unknown commands and flags: the right error.
    cases = [(CMD_READ, size - 512, 1024, 0, EINVAL), (CMD_READ, 0, 0, 0, EINVAL), (CMD_READ, 0, 64 * MiB, 0, EINVAL),
             (CMD_TRIM, size, 4096, 0, EINVAL), (CMD_WRITE_ZEROES, size - 10, 20, 0, ENOSPC),
             (99, 0, 0, 0, EINVAL), (CMD_CACHE, 0, 4096, 0, EINVAL), (CMD_READ, 0, 512, FLAG_NO_HOLE, EINVAL),
             (CMD_READ, 2 ** 64 - 512, 1024, 0, EINVAL)]
    if not structured:
        cases.append((CMD_BLOCK_STATUS, 0, 4096, 0, EINVAL))
    for cmd, off, length, flags, want in cases:
        cookie = c.request(cmd, off, length, flags)
        got = c.reply(read_len=length if cmd == CMD_READ else None)
        assert got[:2] == (cookie, want), (cmd, off, length, flags, got)
    # A refused write's payload is skipped: the next request parses.
    payload = os.urandom(4096)
    cookie = c.request(CMD_WRITE, size - 1024, len(payload), data=payload)
    assert c.reply()[:2] == (cookie, ENOSPC)
    cookie = c.request(CMD_READ, 4096, 512)
    assert c.reply(read_len=512)[:3] == (cookie, 0, data[:512])


def transmission(srv, path, size, structured):
    c = Client(srv.port)
    c.go(b"disk0", infos=(3,), structured=structured, meta=structured)
    check_io(c, size, structured)
    # Pipelined: many requests in flight, answered once each, in any order
    # (so reads go only after the writes to the same blocks are answered).
    rng = random.Random(7)
    blocks = {}
    for i in range(300):
        blocks[rng.randrange(0, 1024) * 4096 + (1 * MiB)] = os.urandom(4096)
    writes = {c.request(CMD_WRITE, off, 4096, data=d): None for off, d in blocks.items()}
    collect(c, writes)
    reads = {c.request(CMD_READ, off, 4096): d for off, d in blocks.items()}
    collect(c, reads)
    # FUA and FLUSH: the data is written back before the reply.
    fua = os.urandom(65536)
    cookie = c.request(CMD_WRITE, 8 * MiB, len(fua), FLAG_FUA, data=fua)
    assert c.reply()[:2] == (cookie, 0)
    left = unwritten_pages(path, 8 * MiB, len(fua))
    if left is None:
        print("note: cachestat(2) unavailable: FUA durability not observed")
    else:
        assert left == 0, f"{left} pages of a FUA write not written back"
    cookie = c.request(CMD_WRITE, 9 * MiB, len(fua), data=fua)
    assert c.reply()[:2] == (cookie, 0)
    cookie = c.request(CMD_FLUSH)
    assert c.reply()[:2] == (cookie, 0)
    if left is not None:
        assert unwritten_pages(path, 0, size) == 0, "dirty pages after FLUSH"
    # TRIM punches a hole; WRITE_ZEROES reads back zero, allocated with NO_HOLE.
    cookie = c.request(CMD_TRIM, 8 * MiB, 65536)
    assert c.reply()[:2] == (cookie, 0)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.lseek(fd, 8 * MiB, os.SEEK_HOLE) == 8 * MiB, "TRIM left no hole"
        assert os.pread(fd, 65536, 8 * MiB) == b"\0" * 65536
        cookie = c.request(CMD_WRITE_ZEROES, 9 * MiB, 65536, FLAG_NO_HOLE | FLAG_FUA)
        assert c.reply()[:2] == (cookie, 0)
        assert os.pread(fd, 65536, 9 * MiB) == b"\0" * 65536
        assert os.lseek(fd, 9 * MiB, os.SEEK_DATA) == 9 * MiB, "NO_HOLE zeroes must stay allocated"
        cookie = c.request(CMD_WRITE_ZEROES, 1 * MiB, 65536)
        assert c.reply()[:2] == (cookie, 0)
        assert os.pread(fd, 65536, 1 * MiB) == b"\0" * 65536
    finally:
        os.close(fd)
    if structured:
        block_status(c, size)
    # DISC with reads in flight: each is answered, then the connection closes.
    cookies = [c.request(CMD_READ, 4096, 4096) for _ in range(16)]
    c.request(CMD_DISC)
    got = sorted(c.reply(read_len=4096)[0] for _ in cookies)
    assert got == sorted(cookies)
    assert c.closed()
    print(f"transmission ({'structured' if structured else 'simple'} replies): ok")


def collect(c, expect):
    """Every reply to the requests in `expect` (cookie: data a read must
    return, or None), exactly once each."""
    seen = set()
    while len(seen) < len(expect):
        cookie, err, back, _ = read_any(c, expect)
        assert err == 0 and cookie in expect and cookie not in seen, (cookie, err)
        seen.add(cookie)
        if expect[cookie] is not None:
            assert back == expect[cookie], f"read {cookie} differs"


def read_any(c, expect):
    """The next reply; for simple replies the read length comes from the request."""
    magic = struct.unpack(">I", c.recv(4))[0]
    if magic == SIMPLE_MAGIC:
        error, cookie = struct.unpack(">IQ", c.recv(12))
        data = c.recv(4096) if expect.get(cookie) is not None and error == 0 else b""
        return cookie, error, data, []
    flags, rtype, cookie, length = struct.unpack(">HHQI", c.recv(16))
    payload = c.recv(length)
    assert flags & 1
    if rtype == 1:
        return cookie, 0, payload[8:], []
    if rtype & 0x8000:
        return cookie, struct.unpack(">I", payload[:4])[0], b"", []
    return cookie, 0, b"", []


def block_status(c, size):
    """The file began sparse: its first 4 KiB are still a hole; [9 MiB,
    9 MiB + 64 KiB) holds zeroes written with NO_HOLE, allocated."""
    cookie = c.request(CMD_BLOCK_STATUS, 0, 64 * 4096 * 4)
    got_cookie, err, _, chunks = c.reply()
    assert (got_cookie, err) == (cookie, 0) and len(chunks) == 1 and chunks[0][0] == 5, chunks
    payload = chunks[0][1]
    assert struct.unpack(">I", payload[:4])[0] == c.meta_id
    extents = [struct.unpack(">II", payload[i:i + 8]) for i in range(4, len(payload), 8)]
    assert extents and all(length > 0 for length, _ in extents)
    assert sum(length for length, _ in extents[:-1]) < 64 * 4096 * 4
    assert extents[0][1] & 1, f"the start of the file is a hole: {extents}"
    cookie = c.request(CMD_BLOCK_STATUS, 9 * MiB, 8192, FLAG_REQ_ONE)
    got_cookie, err, _, chunks = c.reply()
    ext = chunks[0][1][4:]
    assert err == 0 and len(ext) == 8 and struct.unpack(">I", ext[:4])[0] <= 8192, chunks
    assert struct.unpack(">I", ext[4:])[0] == 0, "data at 9 MiB (zeroes written with NO_HOLE)"


def read_only(binary, extra):
    size = 4 * MiB
    path = temp_image(size, [(0, 65536)])
    srv = Server(binary, path, "-x", "disk0", "-r", *extra)
    try:
        c = Client(srv.port)
        _, flags = c.go(b"disk0")
        assert flags & 2, "READ_ONLY flag"
        payload = os.urandom(4096)
        for cmd, data in ((CMD_WRITE, payload), (CMD_TRIM, b""), (CMD_WRITE_ZEROES, b"")):
            cookie = c.request(cmd, 0, 4096, data=data)
            assert c.reply()[:2] == (cookie, EPERM), cmd
        cookie = c.request(CMD_READ, 0, 4096)
        with open(path, "rb") as f:
            assert c.reply(read_len=4096)[2] == f.read(4096)
        print("read-only export: ok")
    finally:
        assert srv.stop()[0] == 0
        os.unlink(path)


def budget(srv, path):
    """A client asking for more than its budget (256 MiB in flight) while it
    reads nothing: the excess is refused with NBD_ENOMEM, every request is
    answered once, and the connection goes on."""
    c = Client(srv.port)
    c.go(b"disk0")
    cookies = [c.request(CMD_READ, (i % 2) * 32 * MiB, 32 * MiB) for i in range(10)]
    with open(path, "rb") as f:
        want = [f.read(32 * MiB), f.read(32 * MiB)]
    errors = {}
    for _ in cookies:
        cookie, err, data, _chunks = c.reply(read_len=32 * MiB)
        assert cookie in cookies and cookie not in errors
        errors[cookie] = err
        if err == 0:
            assert data == want[(cookies.index(cookie)) % 2]
    assert set(errors.values()) <= {0, 12} and 12 in errors.values(), errors
    cookie = c.request(CMD_READ, 0, 4096)
    assert c.reply(read_len=4096)[:3] == (cookie, 0, want[0][:4096])
    c.request(CMD_DISC)
    assert c.closed()
    print(f"budget: {list(errors.values()).count(12)} of 10 refused with NBD_ENOMEM: ok")


def garbage(srv):
    """Bad magic in transmission and garbage instead of a handshake close
    only that connection."""
    c = Client(srv.port)
    c.go(b"disk0")
    c.sock.sendall(b"\xde\xad\xbe\xef" + b"\0" * 24)
    assert c.closed()
    c = Client(srv.port)
    c.sock.sendall(os.urandom(4096))
    assert c.closed()
    c = Client(srv.port)
    c.go(b"disk0")
    cookie = c.request(CMD_READ, 0, 512)
    assert c.reply(read_len=512)[:2] == (cookie, 0)
    c.request(CMD_DISC)
    assert c.closed()
    print("garbage input: ok")


def main():
    binary, extra = sys.argv[1], sys.argv[2:]
    size = 64 * MiB
    path = temp_image(size)
    srv = Server(binary, path, "-x", "disk0", "--loops=2", *extra)
    try:
        # A few sessions first, so that every loop has run once (the
        # baseline then holds only what the server keeps for good).
        for _ in range(4):
            warm = Client(srv.port)
            warm.go(b"disk0")
            warm.sock.close()
        wait_until(lambda: srv.conns() == 0, "the first sessions closed")
        baseline = srv.fds()
        handshake_options(srv, size)
        transmission(srv, path, size, structured=True)
        transmission(srv, path, size, structured=False)
        garbage(srv)
        budget(srv, path)
        # At most the baseline: it may have caught a loop's half-close watch
        # set (an epoll descriptor) that the loop closes a moment later.
        wait_until(lambda: srv.fds() <= baseline, f"descriptors back to {baseline} (now {srv.fds()})")
        assert srv.alive()
    finally:
        rc, log = srv.stop()
        os.unlink(path)
    assert rc == 0, log
    read_only(binary, extra)
    print("protocol: ok")


if __name__ == "__main__":
    main()
