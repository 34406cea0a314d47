#!/usr/bin/env python3
"""ioe-nbd against an in-memory model: several connections at once, each
pipelining seeded random rounds of reads, writes (some FUA), trims,
write-zeroes (with NO_HOLE and FAST_ZERO), flushes and block-status
queries, with simple or structured replies. Every reply must come exactly
once, with the right error, every byte read must match the model, every
extent reported as a hole must read as zeroes, and at the end the file
itself must equal the model.

Requests in one round never conflict (none overlaps another where one
writes), so the model is exact in whatever order the server answers; each
connection owns one region of the export.

usage: test_model.py IOE_NBD_BINARY [extra ioe-nbd options...]
IOE_NBD_MODEL_SEED=N picks the seed (default 7, so that CI runs the same
test every time; IOE_NBD_MODEL_SEED=random draws one); IOE_NBD_MODEL_ROUNDS=N
rounds per connection (default 200)."""
import os
import random
import struct
import sys
import threading
import time

from nbdtest import *  # noqa: F401,F403

MiB = 1 << 20
SIZE = 16 * MiB
CONNS = 4
REGION = SIZE // CONNS
STATE_HOLE, STATE_ZERO = 1, 2


class Totals:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests = self.bytes_checked = self.extents = self.holes = 0

    def add(self, requests=0, checked=0, extents=0, holes=0):
        with self.lock:
            self.requests += requests
            self.bytes_checked += checked
            self.extents += extents
            self.holes += holes


def read_reply(c, pending):
    """One reply, any order: (cookie, error, data, extents)."""
    magic = struct.unpack(">I", c.recv(4))[0]
    if magic == SIMPLE_MAGIC:
        error, cookie = struct.unpack(">IQ", c.recv(12))
        op = pending[cookie]
        data = c.recv(op["len"]) if op["cmd"] == CMD_READ and error == 0 else b""
        return cookie, error, data, []
    assert magic == STRUCTURED_MAGIC, hex(magic)
    data, error, extents = bytearray(), 0, []
    while True:
        flags, rtype, cookie, length = struct.unpack(">HHQI", c.recv(16))
        payload = c.recv(length)
        if rtype == 1:  # OFFSET_DATA
            offset = struct.unpack(">Q", payload[:8])[0]
            assert offset == pending[cookie]["offset"] + len(data), "data chunks out of order"
            data += payload[8:]
        elif rtype == 5:  # BLOCK_STATUS
            for i in range(4, len(payload), 8):
                extents.append(struct.unpack(">II", payload[i:i + 8]))
        elif rtype & 0x8000:
            error = struct.unpack(">I", payload[:4])[0]
        if flags & 1:
            return cookie, error, bytes(data), extents
        assert struct.unpack(">I", c.recv(4))[0] == STRUCTURED_MAGIC


def make_round(rng, base, structured):
    """Requests that do not conflict, in [base, base + REGION)."""
    ops, taken = [], []
    for _ in range(rng.randint(1, 24)):
        length = rng.choice([rng.randint(1, 4096), rng.randint(1, 64 * 1024), rng.randint(1, 512 * 1024)])
        offset = base + rng.randrange(REGION - length)
        kind = rng.choices(["read", "write", "trim", "zero", "flush", "status"], [40, 35, 6, 8, 4, 7])[0]
        if kind == "status" and not structured:
            kind = "read"
        writes = kind in ("write", "trim", "zero")
        if kind != "flush" and any(offset < e and s < offset + length and (writes or w) for s, e, w in taken):
            continue
        op = {"kind": kind, "offset": offset, "len": length, "flags": 0}
        if kind == "read":
            op["cmd"] = CMD_READ
        elif kind == "write":
            op["cmd"], op["data"] = CMD_WRITE, rng.randbytes(length)
            op["flags"] = FLAG_FUA if rng.random() < 0.2 else 0
        elif kind == "trim":
            op["cmd"] = CMD_TRIM
        elif kind == "zero":
            op["cmd"] = CMD_WRITE_ZEROES
            op["flags"] = rng.choice([0, FLAG_NO_HOLE, FLAG_FAST_ZERO, FLAG_FUA | FLAG_NO_HOLE])
        elif kind == "flush":
            op.update(cmd=CMD_FLUSH, offset=0, len=0)
        else:
            op["cmd"] = CMD_BLOCK_STATUS
            op["flags"] = FLAG_REQ_ONE if rng.random() < 0.3 else 0
        if kind != "flush":
            taken.append((offset, offset + length, writes))
        ops.append(op)
    return ops


def drive(port, index, seed, rounds, model, totals, failures):
    try:
        rng = random.Random(seed * 1000 + index)
        structured = index % 2 == 0
        c = Client(port)
        c.go(name=b"", structured=structured, meta=structured)
        base = index * REGION
        for round_no in range(rounds):
            what = f"seed {seed}, connection {index}, round {round_no}"
            ops = make_round(rng, base, structured)
            pending = {}
            for op in ops:
                cookie = c.request(op["cmd"], op["offset"], op["len"], op["flags"], op.get("data", b""))
                pending[cookie] = op
            answered = {}
            while len(answered) < len(ops):
                cookie, error, data, extents = read_reply(c, pending)
                assert cookie in pending, f"{what}: a reply for cookie {cookie}, never asked"
                assert cookie not in answered, f"{what}: cookie {cookie} answered twice"
                answered[cookie] = (error, data, extents)
            checked = 0
            for cookie, op in pending.items():
                error, data, extents = answered[cookie]
                start, end = op["offset"] - base, op["offset"] - base + op["len"]
                if op["kind"] == "zero" and op["flags"] & FLAG_FAST_ZERO and error == ENOTSUP:
                    op["kind"] = "refused"  # fast zeroing refused: nothing changed
                    continue
                assert error == 0, f"{what}: {op['kind']} at {op['offset']} got NBD error {error}"
                if op["kind"] == "read":
                    want = bytes(model[start:end])
                    assert data == want, f"{what}: read of {op['len']} at {op['offset']} differs from the model"
                    checked += op["len"]
                elif op["kind"] == "status":
                    assert extents, f"{what}: block status without extents"
                    assert all(length > 0 for length, _ in extents), f"{what}: an empty extent"
                    if op["flags"] & FLAG_REQ_ONE:
                        assert len(extents) == 1, f"{what}: REQ_ONE answered with {len(extents)} extents"
                    at, holes = start, 0
                    for length, state in extents:
                        stop = min(at + length, end)
                        if state & STATE_ZERO or state & STATE_HOLE:
                            assert not any(model[at:stop]), f"{what}: a hole or zero extent at {base + at} holds data"
                            holes += 1
                        at = stop
                    totals.add(extents=len(extents), holes=holes)
            for op in ops:
                start, end = op["offset"] - base, op["offset"] - base + op["len"]
                if op["kind"] == "write":
                    model[start:end] = op["data"]
                elif op["kind"] in ("trim", "zero"):
                    model[start:end] = bytes(op["len"])
            totals.add(requests=len(ops), checked=checked)
        c.request(CMD_DISC)
        assert c.closed(), f"seed {seed}, connection {index}: not closed after DISC"
    except Exception as e:  # reported by the main thread
        failures.append(f"connection {index}: {e!r}")


def main():
    binary, extra = sys.argv[1], sys.argv[2:]
    seed_env = os.environ.get("IOE_NBD_MODEL_SEED", "7")
    seed = time.time_ns() % 1000000007 if seed_env == "random" else int(seed_env)
    rounds = int(os.environ.get("IOE_NBD_MODEL_ROUNDS", "200"))
    print(f"model: seed {seed} (IOE_NBD_MODEL_SEED={seed} repeats it), {rounds} rounds per connection")
    path = temp_image(SIZE, [(i * MiB, 64 * 1024) for i in range(0, 16, 3)])
    try:
        with open(path, "rb") as f:
            whole = bytearray(f.read())
        models = [bytearray(whole[i * REGION:(i + 1) * REGION]) for i in range(CONNS)]
        srv = Server(binary, path, *extra)
        try:
            totals, failures = Totals(), []
            threads = [threading.Thread(target=drive, args=(srv.port, i, seed, rounds, models[i], totals, failures))
                       for i in range(CONNS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert not failures, "\n".join(failures)
            rc, err = srv.stop()
            assert rc == 0, f"ioe-nbd exited with {rc}: {err}"
        finally:
            if srv.alive():
                srv.proc.kill()
                srv.proc.wait()
        with open(path, "rb") as f:
            on_disk = f.read()
        for i in range(CONNS):
            assert on_disk[i * REGION:(i + 1) * REGION] == models[i], f"seed {seed}: region {i} of the file differs"
        totals.add(checked=SIZE)
        # The image starts sparse and trims punch holes: block status must
        # have reported some (else the hole check above checked nothing).
        assert totals.holes > 0, f"seed {seed}: no hole or zero extent was ever reported"
        print(f"model: {totals.requests} requests over {CONNS} connections, {totals.bytes_checked >> 20} MiB "
              f"checked, {totals.extents} extents ({totals.holes} holes) checked, seed {seed}: ok")
    finally:
        os.unlink(path)


if __name__ == "__main__":
    main()
