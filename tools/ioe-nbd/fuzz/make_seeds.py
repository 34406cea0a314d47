#!/usr/bin/env python3
"""Writes the fuzz targets' starting inputs: for fuzz_session
(corpus/session/seed-*), valid handshakes and request streams, the first
byte the harness mode (see fuzz_session.c), the second the piece-size seed;
for fuzz_options (corpus/options/seed-*), command lines."""
import os
import struct

IHAVEOPT = 0x49484156454F5054
REQ_MAGIC = 0x25609513


def opt(code, data=b""):
    return struct.pack(">QII", IHAVEOPT, code, len(data)) + data


def req(cmd, offset, length, flags=0, cookie=1, payload=b""):
    return struct.pack(">IHHQQI", REQ_MAGIC, flags, cmd, cookie, offset, length) + payload


def meta(name, queries):
    body = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
    for q in queries:
        body += struct.pack(">I", len(q)) + q
    return body


def go(name, infos=()):
    return struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos)) + b"".join(
        struct.pack(">H", i) for i in infos)


REQUESTS = (req(0, 0, 4096, cookie=1) + req(1, 4096, 512, flags=1, cookie=2, payload=b"w" * 512)
            + req(3, 0, 0, cookie=3) + req(4, 8192, 4096, cookie=4) + req(6, 0, 65536, flags=2, cookie=5)
            + req(7, 0, 1 << 20, flags=8, cookie=6) + req(0, (1 << 20) - 1, 2, cookie=7) + req(9, 0, 1, cookie=8)
            + req(2, 0, 0, cookie=9))

SEEDS = {
    # Raw handshake: flags, LIST, INFO with name and description, metadata, GO.
    "handshake": bytes([0, 7]) + struct.pack(">I", 3) + opt(3) + opt(6, go(b"disk", (1, 2, 3)))
    + opt(8) + opt(9, meta(b"disk", [b"base:"])) + opt(10, meta(b"", [b"base:allocation", b"x:y"]))
    + opt(7, go(b"")) + REQUESTS,
    "unknown-options": bytes([0, 3]) + struct.pack(">I", 1) + opt(5) + opt(11) + opt(99, b"abc")
    + opt(7, go(b"nope")) + opt(2),
    "export-name": bytes([0, 1]) + struct.pack(">I", 1) + opt(1, b"disk") + REQUESTS,
    "structured-requests": bytes([1, 9]) + REQUESTS,
    "simple-requests": bytes([2, 5]) + REQUESTS,
    # A large write taken by receive_into, then a read.
    "receive-into": bytes([1 | 4, 11]) + req(1, 0, 65536, cookie=10, payload=bytes(range(256)) * 256)
    + req(0, 0, 65536, cookie=11),
    "shutdown-halfway": bytes([1 | 8, 13]) + REQUESTS + REQUESTS,
    "read-only": bytes([2 | 16, 1]) + REQUESTS,
    # Replies over 256 bytes (a long description), and a write whose
    # buffer cannot be had (length ending in 0x123).
    "long-description": bytes([32, 7]) + struct.pack(">I", 1) + opt(6, go(b"disk", (2,))) + opt(7, go(b"disk"))
    + req(1, 0, 0x1123, cookie=12, payload=b"z" * 0x1123) + req(4, 0, 4096, cookie=13),
}

# Command lines for fuzz_options (arguments separated by NUL bytes).
OPTION_SEEDS = {
    "typical": b"-p\x0010809\x00-b\x00127.0.0.1\x00-x\x00disk\x00-r\x00image.raw",
    "long-options": b"--port=0\x00--cache=none\x00--aio=native\x00--shared=8\x00--loops=2\x00--queue-depth=64"
    b"\x00--disk-io=engine\x00--format=raw\x00-t\x00--description=d\x00file",
    "unix": b"-k\x00/tmp/s.sock\x00--disk-io=loop\x00-n\x00f",
    "errors": b"-p\x0099999\x00--cache=bad\x00-e\x000\x00-Z\x00--loops",
    "help": b"--help",
    "cluster": b"-rnt\x00-pxyz\x00a\x00b",
}

here = os.path.dirname(os.path.abspath(__file__))
for corpus, seeds in (("session", SEEDS), ("options", OPTION_SEEDS)):
    out = os.path.join(here, "corpus", corpus)
    os.makedirs(out, exist_ok=True)
    for name, data in seeds.items():
        with open(os.path.join(out, "seed-" + name), "wb") as f:
            f.write(data)
    print(f"wrote {len(seeds)} seeds to {out}")
