#!/usr/bin/env python3
"""Soak: mixed disk and network load on the whole library for a while
(not part of CI; the README's test command runs the bounded tests).

  python3 scripts/soak.py [--minutes 10] [--build build]

- Network and loop-ring disk I/O: ioe-nbd serving a 16 MiB image to four
  NBD connections that run the model test's checked rounds
  (tools/ioe-nbd/tests/test_model.py) without end, each reconnecting every
  50 rounds (connection churn), every byte read checked against the model.
- Block engine used directly: ioe-bench runs back to back (randrw, 20 s
  each, every byte read verified), cycling through io_uring and AIO, inline
  and pooled callbacks, page cache and O_DIRECT.

Every minute it prints ioe-nbd's RSS and descriptor count, the requests in
flight and done, ioe-bench runs, and errors. It passes when no error
happened, ioe-nbd's RSS at the end is within 10% of its value at minute
one, its descriptors are back to their count at minute one, it stops
cleanly, and the file equals the model."""
import argparse
import os
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools", "ioe-nbd", "tests"))

import test_model  # noqa: E402
from nbdtest import Server, temp_image  # noqa: E402


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Load:
    def __init__(self):
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.errors = []
        self.bench_runs = 0
        self.connections = 0

    def error(self, what):
        with self.lock:
            self.errors.append(what)
        print(f"soak: ERROR {what}", flush=True)


def nbd_worker(load, port, index, model, totals, seed):
    generation = 0
    while not load.stop.is_set():
        failures = []
        test_model.drive(port, index, seed + generation, 50, model, totals, failures)
        generation += 1
        with load.lock:
            load.connections += 1
        for f in failures:
            load.error(f"nbd {f}")
        if failures:
            return


def bench_worker(load, bench, tmpdir):
    modes = [(backend, workers, direct) for backend in ("uring", "aio") for workers in (0, 2) for direct in (0, 1)]
    i = 0
    while not load.stop.is_set():
        backend, workers, direct = modes[i % len(modes)]
        i += 1
        cmd = [bench, "--backend", backend, "--rw", "randrw", "--verify", "1", "--runtime", "20", "--workers",
               str(workers), "--direct", str(direct), "--size", "64m", "--iodepth", "32",
               "--filename", os.path.join(tmpdir, "soak-bench.dat")]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            load.error(f"ioe-bench {' '.join(cmd[1:])} exited {r.returncode}: {r.stderr.strip()[-400:]}")
            return
        with load.lock:
            load.bench_runs += 1


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--build", default=os.path.join(ROOT, "build"))
    args = p.parse_args()
    nbd = os.path.join(args.build, "tools", "ioe-nbd", "ioe-nbd")
    bench = os.path.join(args.build, "bench", "ioe-bench")
    tmpdir = os.environ.get("TMPDIR", "/tmp")
    seed = time.time_ns() % 1000000007
    print(f"soak: {args.minutes} minutes, seed {seed}", flush=True)
    path = temp_image(test_model.SIZE, [(i << 20, 65536) for i in range(0, 16, 3)])
    with open(path, "rb") as f:
        whole = bytearray(f.read())
    conns = test_model.CONNS
    models = [bytearray(whole[i * test_model.REGION:(i + 1) * test_model.REGION]) for i in range(conns)]
    srv = Server(nbd, path)
    try:
        return soak(args, srv, path, models, bench, tmpdir, seed)
    finally:
        if srv.alive():
            srv.proc.kill()
            srv.proc.wait()
        if os.path.exists(path):
            os.unlink(path)


def soak(args, srv, path, models, bench, tmpdir, seed):
    conns = test_model.CONNS
    load = Load()
    totals = test_model.Totals()
    threads = [threading.Thread(target=nbd_worker, args=(load, srv.port, i, models[i], totals, seed + 1000 * i))
               for i in range(conns)]
    threads.append(threading.Thread(target=bench_worker, args=(load, bench, tmpdir)))
    for t in threads:
        t.start()
    start = time.monotonic()
    samples = []
    ok = True
    try:
        minute = 0
        while minute < args.minutes and not load.errors:
            minute += 1
            while time.monotonic() < start + 60 * minute and not load.errors:
                time.sleep(0.5)
            rss, fds, open_conns = rss_kib(srv.proc.pid), srv.fds(), srv.conns()
            # Descriptors besides the client connections open at that moment.
            samples.append((rss, fds - open_conns))
            with totals.lock, load.lock:
                print(f"soak: minute {minute}: ioe-nbd RSS {rss} KiB, {fds} fds, {open_conns} connections open; "
                      f"{totals.requests} NBD requests checked ({totals.bytes_checked >> 20} MiB), "
                      f"{load.connections} connections done, {load.bench_runs} ioe-bench runs, "
                      f"{len(load.errors)} errors", flush=True)
    finally:
        load.stop.set()
        for t in threads:
            t.join()
    rc, err = srv.stop()
    if rc != 0:
        load.error(f"ioe-nbd exited {rc}: {err[-400:]}")
    with open(path, "rb") as f:
        on_disk = f.read()
    os.unlink(path)
    if os.path.exists(os.path.join(tmpdir, "soak-bench.dat")):
        os.unlink(os.path.join(tmpdir, "soak-bench.dat"))
    for i in range(conns):
        if on_disk[i * test_model.REGION:(i + 1) * test_model.REGION] != models[i]:
            load.error(f"region {i} of the file differs from the model")
    if len(samples) >= 2:
        first, last = samples[0], samples[-1]
        growth = (last[0] - first[0]) / first[0]
        print(f"soak: RSS minute 1 {first[0]} KiB, end {last[0]} KiB ({growth:+.1%}); "
              f"descriptors besides connections {first[1]} -> {last[1]}")
        if abs(growth) > 0.10:
            load.error(f"RSS moved {growth:+.1%} between minute 1 and the end")
        # Not more: a loop's half-close watch set may come and go.
        if last[1] > first[1]:
            load.error(f"descriptors {first[1]} at minute 1, {last[1]} at the end")
    print(f"soak: {totals.requests} NBD requests, {totals.bytes_checked >> 20} MiB checked, "
          f"{load.connections} connections, {load.bench_runs} ioe-bench runs (verified), "
          f"{len(load.errors)} errors, seed {seed}")
    ok = not load.errors
    print("soak: ok" if ok else "soak: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
