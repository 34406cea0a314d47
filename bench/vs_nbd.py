#!/usr/bin/env python3
"""ioe-nbd against qemu-nbd and nbdkit, side by side, with fio's nbd engine.

Every server serves the same 1 GiB file (fully written, so reads find real
blocks, and cached). For each case every server runs once per round, in
an order that rotates every round, each started fresh on its own port and
stopped after the run. Reported: medians over the rounds of IOPS (MiB/s for
128 KiB), the server's CPU per I/O (user + system time of the whole server
process from /proc/PID/stat, so exited threads count too), and paired
ratios of ioe-nbd against the faster peer of each round with a 95%
bootstrap interval. Results go to bench/results/nbd-latest.json and to the
nbd section of BENCHMARKS.md.

Servers and their settings (what each does best here, or its defaults):
  ioe-nbd                   defaults: page cache; disk requests on each connection's
                            network loop io_uring (--disk-io=loop)
  ioe-nbd engine            the same with --disk-io=engine: disk requests on a
                            block-engine context (replies from its callbacks)
  qemu-nbd                  defaults (cache=writeback, aio=threads), -e 8 -t
  qemu-nbd none/io_uring    --cache=none --aio=io_uring -e 8 -t
  nbdkit file               nbdkit file plugin, defaults (16 threads)

Usage: python3 bench/vs_nbd.py [--runtime 3] [--rounds 3] [--file PATH] [--quick]
"""
import argparse
import datetime
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vs_fio import paired_ratio, paired_text, terminate, verdict, write_section  # noqa: E402

CASES = [  # label, rw, block size, depth
    ("4k randread QD1", "randread", "4k", 1),
    ("4k randread QD32", "randread", "4k", 32),
    ("4k randread QD128", "randread", "4k", 128),
    ("4k randwrite QD1", "randwrite", "4k", 1),
    ("4k randwrite QD32", "randwrite", "4k", 32),
    ("4k randwrite QD128", "randwrite", "4k", 128),
    ("128k read QD8", "read", "128k", 8),
    ("128k write QD8", "write", "128k", 8),
    # qemu's own NBD client: sequential 4 KiB requests, a fixed count.
    ("qemu-img bench 4k read QD32", "bench-read", "4k", 32),
    ("qemu-img bench 4k write QD32", "bench-write", "4k", 32),
]
QUICK = {"4k randread QD1", "4k randread QD32", "4k randwrite QD32", "128k read QD8"}


def servers(args):
    ioe = args.ioe_nbd
    return {
        "ioe-nbd": [ioe, "-b", "127.0.0.1", "-p", "{port}", args.file],
        "ioe-nbd engine": [ioe, "-b", "127.0.0.1", "-p", "{port}", "--disk-io=engine", args.file],
        "qemu-nbd": ["qemu-nbd", "-f", "raw", "-b", "127.0.0.1", "-p", "{port}", "-e", "8", "-t", args.file],
        "qemu-nbd none/io_uring": ["qemu-nbd", "-f", "raw", "-b", "127.0.0.1", "-p", "{port}", "-e", "8", "-t",
                                   "--cache=none", "--aio=io_uring", args.file],
        "nbdkit file": ["nbdkit", "-f", "-i", "127.0.0.1", "-p", "{port}", "file", args.file],
    }


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, argv, port):
        self.argv = [a.format(port=port) for a in argv]
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:  # listening once a connection is accepted
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{shlex.join(self.argv)} did not start")
                time.sleep(0.02)

    def cpu_s(self):
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self):
        terminate(self.proc)


def fio_cmd(args, port, rw, bs, depth):
    return ["fio", "--name=nbd", "--ioengine=nbd", f"--uri=nbd://127.0.0.1:{port}/", f"--rw={rw}", f"--bs={bs}",
            f"--iodepth={depth}", f"--runtime={args.runtime}", "--time_based", "--size=1g", "--numjobs=1",
            "--output-format=json"]


def bench_cmd(args, port, rw, depth):
    count = int(args.bench_count)
    return ["qemu-img", "bench", "-f", "raw", "-c", str(count), "-d", str(depth), "-s", "4096"] + (
        ["-w"] if rw == "bench-write" else []) + [f"nbd://127.0.0.1:{port}/"]


def client_cmd(args, port, rw, bs, depth):
    return bench_cmd(args, port, rw, depth) if rw.startswith("bench-") else fio_cmd(args, port, rw, bs, depth)


def one_run(args, argv, rw, bs, depth):
    port = free_port()
    srv = Server(argv, port)
    try:
        cpu0 = srv.cpu_s()
        out = subprocess.run(client_cmd(args, port, rw, bs, depth), check=True, capture_output=True,
                             text=True).stdout
        cpu = srv.cpu_s() - cpu0
    finally:
        srv.stop()
    if rw.startswith("bench-"):
        seconds = float(out.split("Run completed in ")[1].split()[0])
        ios = int(args.bench_count)
        return {"iops": ios / seconds, "mib_s": ios * 4096 / seconds / 1048576.0,
                "server_cpu_us_per_io": cpu / ios * 1e6, "p50_us": None}
    # fio's nbd engine prints a line of its own before the JSON.
    job = json.loads(out[out.index("{"):])["jobs"][0]
    if job.get("error"):
        raise RuntimeError(f"fio error {job['error']} against {argv[0]}")
    side = job["read"] if "read" in rw else job["write"]
    ios = side["total_ios"] or 1
    return {"iops": side["iops"], "mib_s": side["bw_bytes"] / 1048576.0, "server_cpu_us_per_io": cpu / ios * 1e6,
            "p50_us": side["clat_ns"]["percentile"]["50.000000"] / 1000.0 if "percentile" in side["clat_ns"] else None}


def measure(args, specs, label, rw, bs, depth):
    names = list(specs)
    runs = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            runs[n].append(one_run(args, specs[n], rw, bs, depth))
    med = {n: {k: statistics.median(x[k] for x in runs[n]) for k in ("iops", "mib_s", "server_cpu_us_per_io")}
           for n in names}
    peers = [n for n in names if not n.startswith("ioe-nbd")]
    # The faster peer of each round, paired with ioe-nbd's run of that round.
    best = [max((runs[p][i] for p in peers), key=lambda x: x["iops"]) for i in range(args.rounds)]
    leanest = [min((runs[p][i] for p in peers), key=lambda x: x["server_cpu_us_per_io"]) for i in range(args.rounds)]
    result = {"label": label, "rw": rw, "bs": bs, "depth": depth, "medians": med, "runs": runs,
              "paired_vs_best_peer": paired_ratio(runs["ioe-nbd"], best, "iops"),
              "cpu_vs_leanest_peer": paired_ratio(runs["ioe-nbd"], leanest, "server_cpu_us_per_io"),
              "fio_command": shlex.join(client_cmd(args, 0, rw, bs, depth)).replace(":0/", ":PORT/")}
    unit = "MiB/s" if bs != "4k" else "IOPS"
    key = "mib_s" if bs != "4k" else "iops"
    print(f"  {label:<20} " + "  ".join(f"{n} {med[n][key]:.0f} {unit} {med[n]['server_cpu_us_per_io']:.1f} us"
                                        for n in names) +
          f"  ioe/best {paired_text(result['paired_vs_best_peer'])}", flush=True)
    return result


def render(results, path):
    names = list(results["servers"])
    lines = ["# NBD servers: ioe-nbd against qemu-nbd and nbdkit", "",
             f"Measured {results['date']} with `python3 bench/vs_nbd.py {results['arguments']}` on "
             f"{results['machine']['cpus']} CPUs ({results['machine']['cpu']}), kernel {results['machine']['kernel']}; "
             f"{results['versions']}. fio's nbd engine (one job) is the client, and qemu-img bench (qemu's own NBD "
             "client, sequential 4 KiB requests) in the last rows, on the same machine; each server "
             f"serves the same cached 1 GiB file, started fresh for each run; {results['rounds']} rounds of "
             f"{results['runtime']:g} s per case, servers rotating; medians. Server CPU is the whole server "
             "process's user + system time over the I/Os done. 'ioe / best' pairs each ioe-nbd run with the "
             "faster peer of the same round (95% bootstrap interval); 'CPU / leanest' with the peer that spent "
             "least CPU per I/O in that round. 'ioe-nbd' runs disk requests on each connection's own loop ring "
             "(its default), 'ioe-nbd engine' on a block-engine context: the two designs of the server.", "",
             "Settings: " + "; ".join(f"{n}: `{shlex.join(a).replace('{port}', 'PORT')}`"
                                      for n, a in results["servers"].items()) + ".", "",
             "| case | " + " | ".join(names) + " | ioe / best (95% CI) | vs best | " +
             " | ".join(f"{n} CPU us/IO" for n in names) + " | CPU / leanest |",
             "| --- |" + " ---: |" * len(names) + " ---: | --- |" + " ---: |" * len(names) + " ---: |"]
    for c in results["cases"]:
        key = "mib_s" if c["bs"] != "4k" else "iops"
        unit = " MiB/s" if key == "mib_s" else ""
        med = c["medians"]
        lines.append(f"| {c['label']} | " + " | ".join(f"{med[n][key]:.0f}{unit}" for n in names) + " | " +
                     f"{paired_text(c['paired_vs_best_peer'])} | {verdict(c['paired_vs_best_peer'])} | " +
                     " | ".join(f"{med[n]['server_cpu_us_per_io']:.1f}" for n in names) + " | " +
                     f"{paired_text(c['cpu_vs_leanest_peer'])} |")
    lines += ["", "Client commands (PORT: each server's): " + "; ".join(f"`{c['fio_command']}`" for c in results["cases"]),
              "", "Raw runs: `bench/results/nbd-latest.json`.", ""]
    write_section(path, "nbd", "\n".join(lines))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ioe-nbd", default=os.path.join(ROOT, "build", "tools", "ioe-nbd", "ioe-nbd"))
    p.add_argument("--file", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "ioe-vs-nbd.dat"))
    p.add_argument("--runtime", type=float, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--bench-count", type=int, default=60000, help="requests per qemu-img bench run")
    p.add_argument("--quick", action="store_true", help="four cases: randread QD1/QD32, randwrite QD32, 128k read")
    p.add_argument("--markdown", default=os.path.join(ROOT, "BENCHMARKS.md"))
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "nbd-latest.json"))
    args = p.parse_args()
    if args.rounds < 3:
        sys.exit("vs_nbd: at least 3 rounds are needed for a meaningful median")
    for tool in ("fio", "qemu-nbd", "nbdkit"):
        if subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).returncode:
            sys.exit(f"vs_nbd: {tool} not found (apt-get install fio qemu-utils nbdkit)")
    if not os.path.exists(args.ioe_nbd):
        sys.exit(f"vs_nbd: {args.ioe_nbd} not found; build with cmake first")
    print(f"writing 1 GiB to {args.file}", flush=True)
    subprocess.run(["fio", "--name=fill", f"--filename={args.file}", "--size=1g", "--rw=write", "--bs=1m",
                    "--ioengine=psync", "--output-format=json"], check=True, capture_output=True)
    subprocess.run(["cat", args.file], stdout=subprocess.DEVNULL, check=True)
    specs = servers(args)
    cases = [c for c in CASES if not args.quick or c[0] in QUICK]
    results = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "arguments": " ".join(shlex.quote(a) for a in sys.argv[1:]), "rounds": args.rounds,
               "runtime": args.runtime,
               "machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                           "cpu": next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                                        if line.startswith("model name")), "unknown")},
               "versions": "; ".join(subprocess.run(c, capture_output=True, text=True).stdout.splitlines()[0]
                                     for c in (["fio", "--version"], ["qemu-nbd", "--version"], ["nbdkit", "--version"])),
               "servers": {n: [a if a != args.file else "FILE" for a in argv] for n, argv in specs.items()},
               "cases": []}
    for label, rw, bs, depth in cases:
        results["cases"].append(measure(args, specs, label, rw, bs, depth))
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    render(results, args.markdown)
    print(f"wrote {args.out} and {args.markdown}")
    os.unlink(args.file)


if __name__ == "__main__":
    main()
