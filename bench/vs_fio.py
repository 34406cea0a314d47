#!/usr/bin/env python3
"""ioe-bench against fio, side by side on the same file and machine.

Each comparison alternates the two tools for --pairs pairs, swapping which
goes first every pair (ioe fio, fio ioe, ...), so that drift of the machine
and any advantage of going first or second cancel out, and reports the
median of every figure and the ratio ioe/fio. Next to each run it reads the
block device's counters: how many requests the device held on average while
busy, and their mean time there (the device's own view, the same for both
tools). Results go to
bench/results/latest.json, a plot of IOPS against queue depth to
bench/results/iops_vs_qd.svg, and the table to BENCHMARKS.md.

When build/bench/uring-loop exists (built if liburing-dev is installed), it
runs as a third tool in the io_uring O_DIRECT rows: the loop a C programmer
would write by hand on liburing, against which the engine's own cost shows.

The public crate io-engine 0.12 (the design the seed document reworks) runs
as a further tool in the O_DIRECT rows at depths 1, 32 and 128, the pool
rows at depth 32 and every page-cache row, through bench/io-engine-peer
(built here with cargo on first use; its AIO bindings need clang,
libclang-dev and libaio-dev; skipped with a message if it cannot be built).

Several submitting threads: 1, 2 and 4 jobs of depth 32 each, page cache and
O_DIRECT, both backends, as ioe-bench with callbacks submitting (one context),
with a thread per job submitting into one shared context, and with a thread
and a context per job, next to fio with as many jobs; every run of a cell's
round rotates, and CPU is each process's own (getrusage of the child).
--scaling-only measures just that table and keeps the rest of latest.json.

Usage: python3 bench/vs_fio.py [--ioe-bench PATH] [--file PATH] [--size 1g]
                                [--runtime 5] [--pairs 3] [--quick] [--scaling-only]
"""
import argparse
import datetime
import json
import os
import platform
import random
import resource
import shlex
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIO_ENGINE = {"uring": "io_uring", "aio": "libaio"}


def run(cmd):
    out = subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return out.stdout


def terminate(proc, timeout=30):
    """SIGTERM, then SIGKILL if the process has not ended within `timeout`
    seconds (the servers the comparison scripts start and stop)."""
    proc.send_signal(15)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def block_stat_path(path):
    """The /sys stat file of the block device holding `path`, or None."""
    try:
        st = os.stat(os.path.dirname(os.path.abspath(path)))
        link = os.path.realpath(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
        stat = os.path.join(link, "stat")
        return stat if os.path.exists(stat) else None
    except OSError:
        return None


def read_block_stat(stat_path):
    if not stat_path:
        return None
    with open(stat_path) as f:
        return [int(x) for x in f.read().split()]


def device_figures(before, after):
    """Mean requests at the device while it was busy (time in queue over busy
    time) and mean time per request there, from /sys/block/*/stat."""
    if not before or not after:
        return {"dev_queue": None, "dev_lat_us": None}
    d = [b - a for a, b in zip(before, after)]
    ios, ticks = d[0] + d[4], d[3] + d[7]
    return {"dev_queue": d[10] / d[9] if d[9] else None, "dev_lat_us": ticks * 1000.0 / ios if ios else None}


def measured(args, cmd, parse):
    before = read_block_stat(args.block_stat)
    figures = parse(run(cmd))
    figures.update(device_figures(before, read_block_stat(args.block_stat)))
    return figures


def ioe_cmd(args, w):
    cmd = [os.path.relpath(args.ioe_bench, ROOT) if args.ioe_bench.startswith(ROOT) else args.ioe_bench, "--backend", w["backend"], "--rw", w["rw"], "--bs", "4k", "--iodepth", str(w["qd"]),
           "--direct", str(w["direct"]), "--filename", args.file, "--size", args.size, "--runtime", str(args.runtime),
           "--verify", "0", "--json"]
    if w.get("merge"):
        cmd += ["--merge", w["merge"]]
    if w.get("workers"):
        cmd += ["--workers", str(w["workers"])]
    return cmd


def fio_cmd(args, w):
    cmd = ["fio", "--name=vs-ioe", f"--filename={args.file}", f"--size={args.size}", f"--rw={w['rw']}", f"--bs={w.get('bs', '4k')}",
           f"--iodepth={w['qd']}", f"--direct={w['direct']}", f"--ioengine={FIO_ENGINE[w['backend']]}",
           f"--runtime={args.runtime}", "--time_based", "--numjobs=1", "--output-format=json", "--lat_percentiles=1"]
    if not w["direct"]:
        cmd.append("--invalidate=0")  # keep the page cache: the point of the workload
    return cmd


def peer_cmd(args, w):
    return [os.path.relpath(args.peer, ROOT) if args.peer.startswith(ROOT) else args.peer, "--filename", args.file,
            "--size", args.size, "--iodepth", str(w["qd"]), "--runtime", str(args.runtime)]


def crate_cmd(args, w):
    return [os.path.relpath(args.crate_peer, ROOT) if args.crate_peer.startswith(ROOT) else args.crate_peer,
            "--backend", w["backend"], "--iodepth", str(w["qd"]), "--direct", str(w["direct"]),
            "--filename", args.file, "--size", args.size, "--runtime", str(args.runtime),
            "--workers", "1" if w.get("workers") else "0"]


def build_crate_peer(args):
    """Builds bench/io-engine-peer once; False (with the reason printed) if it cannot be."""
    if os.path.exists(args.crate_peer):
        return True
    target = os.path.join(ROOT, "build", "io-engine-peer")
    if args.crate_peer != os.path.join(target, "release", "io-engine-peer"):
        print(f"  ({args.crate_peer} not found: no io-engine 0.12 rows)", flush=True)
        return False
    print("building bench/io-engine-peer (io-engine 0.12) with cargo", flush=True)
    built = subprocess.run(["cargo", "build", "--release", "--manifest-path",
                            os.path.join(ROOT, "bench", "io-engine-peer", "Cargo.toml")],
                           env=dict(os.environ, CARGO_TARGET_DIR=target), capture_output=True, text=True)
    if built.returncode != 0:
        print("  (io-engine-peer did not build, no io-engine 0.12 rows; it needs clang, libclang-dev and "
              f"libaio-dev):\n{built.stderr[-2000:]}", flush=True)
        return False
    return True


def peer_figures(out):
    r = json.loads(out)
    return {"iops": r["iops"], "cpu_us_per_io": r["cpu_us_per_io"]}


def ioe_figures(out):
    r = json.loads(out)
    if r["errors"]:
        raise RuntimeError(f"ioe-bench reported {r['errors']} errors")
    lat = r["lat_us"]
    return {"iops": r["iops"], "mib_s": r["mib_s"], "cpu_us_per_io": r["cpu_us_per_io"], "p50_us": lat["p50"],
            "p99_us": lat["p99"], "p99_9_us": lat["p99_9"], "max_us": lat["max"],
            "bytes_per_slot": r["engine_bytes_per_slot"], "rss_kib_end": r["rss_kib_end"]}


def fio_figures(out):
    job = json.loads(out)["jobs"][0]
    side = job["read"] if job["read"]["total_ios"] else job["write"]
    if job.get("error"):
        raise RuntimeError(f"fio reported error {job['error']}")
    cpu_s = (job["usr_cpu"] + job["sys_cpu"]) / 100.0 * job["job_runtime"] / 1000.0
    pct = side["lat_ns"]["percentile"]
    return {"iops": side["iops"], "mib_s": side["bw_bytes"] / 1048576.0,
            "cpu_us_per_io": cpu_s / side["total_ios"] * 1e6, "p50_us": pct["50.000000"] / 1000.0,
            "p99_us": pct["99.000000"] / 1000.0, "p99_9_us": pct["99.900000"] / 1000.0,
            "max_us": side["lat_ns"]["max"] / 1000.0}


def medians(runs):
    out = {}
    for k in runs[0]:
        values = [r[k] for r in runs if r.get(k) is not None]
        out[k] = statistics.median(values) if values else None
    return out


def ratios(a, b):
    """ioe / fio for every figure both have."""
    return {k: a[k] / b[k] if a[k] is not None and b[k] else None for k in b}


def paired_iops_ratio(ioe_runs, fio_runs):
    return paired_ratio(ioe_runs, fio_runs, "iops")


def paired_ratio(a_runs, b_runs, key):
    """Median of the per-pair ratios of `key` (each run against the peer run
    next to it in time, so drift between pairs cancels) with a 95% bootstrap
    interval (fixed seed: the same runs always give the same interval). An
    interval that holds 1.0 means the two are not told apart here."""
    ratios = [a[key] / b[key] for a, b in zip(a_runs, b_runs) if a.get(key) and b.get(key)]
    if not ratios:
        return None
    rng = random.Random(4)
    boot = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(2000))
    return {"median": statistics.median(ratios), "ci95": [boot[50], boot[1949]], "pairs": len(ratios)}


def verdict(paired):
    """Where the interval lies against 1.0."""
    if not paired:
        return "-"
    lo, hi = paired["ci95"]
    if lo >= 1.0:
        return "above"
    if hi < 1.0:
        return "below"
    return "tie"


def paired_text(paired):
    return f"{paired['median']:.2f} ({paired['ci95'][0]:.2f}-{paired['ci95'][1]:.2f})" if paired else "-"


def compare(args, w, with_peer=False, with_crate=False):
    """ioe-bench against fio (and, for with_peer, against uring-loop too;
    for with_crate, against io-engine 0.12). Two tools alternate ABBA; more
    rotate, so each goes first, second, ... equally often."""
    a_runs, b_runs, c_runs, d_runs = [], [], [], []
    tools = ("ioe", "fio") + (("peer",) if with_peer else ()) + (("crate",) if with_crate else ())
    for i in range(args.pairs):
        if len(tools) > 2:
            order = tools[i % len(tools):] + tools[:i % len(tools)]
        else:
            order = tools if i % 2 == 0 else tools[::-1]
        for tool in order:
            if tool == "ioe":
                a_runs.append(measured(args, ioe_cmd(args, w), ioe_figures))
            elif tool == "fio":
                b_runs.append(measured(args, fio_cmd(args, w), fio_figures))
            elif tool == "peer":
                c_runs.append(peer_figures(run(peer_cmd(args, w))))
            else:
                d_runs.append(peer_figures(run(crate_cmd(args, w))))
    a, b = medians(a_runs), medians(b_runs)
    ratio = ratios(a, b)
    paired = paired_iops_ratio(a_runs, b_runs)
    dev = (f"  device queue {a['dev_queue']:.1f} / {b['dev_queue']:.1f}" if a["dev_queue"] and b["dev_queue"] else "")
    print(f"  {w['label']:<44} ioe {a['iops']:>10.0f} IOPS  fio {b['iops']:>10.0f} IOPS  ratio {ratio['iops']:.2f}"
          f"  paired {paired_text(paired)}"
          f"  cpu/io {ratio['cpu_us_per_io']:.2f}x  p50 {ratio['p50_us']:.2f}x{dev}", flush=True)
    peer = {}
    if with_peer:
        c = medians(c_runs)
        peer_paired = paired_iops_ratio(a_runs, c_runs)
        print(f"  {'':<44} uring-loop {c['iops']:>10.0f} IOPS  ioe/loop paired {paired_text(peer_paired)}",
              flush=True)
        peer = {"peer": c, "peer_runs": c_runs, "peer_paired_iops_ratio": peer_paired,
                "peer_command": shlex.join(peer_cmd(args, w))}
    if with_crate:
        d = medians(d_runs)
        crate_paired = paired_iops_ratio(a_runs, d_runs)
        crate_cpu = paired_ratio(a_runs, d_runs, "cpu_us_per_io")
        print(f"  {'':<44} io-engine 0.12 {d['iops']:>10.0f} IOPS  ioe/io-engine paired {paired_text(crate_paired)}"
              f"  cpu/io {a['cpu_us_per_io']:.2f} vs {d['cpu_us_per_io']:.2f} us", flush=True)
        peer.update({"crate": d, "crate_runs": d_runs, "crate_paired_iops_ratio": crate_paired,
                     "crate_paired_cpu_ratio": crate_cpu, "crate_command": shlex.join(crate_cmd(args, w))})
    return {"workload": w, "ioe": a, "fio": b, "ratio": ratio, "paired_iops_ratio": paired, "ioe_runs": a_runs,
            **peer, "fio_runs": b_runs,
            "ioe_command": shlex.join(ioe_cmd(args, w)), "fio_command": shlex.join(fio_cmd(args, w))}


SCALING_THREADS = (1, 2, 4)
SCALING_TOOLS = (("ioe callback, 1 context", "callback", False), ("ioe thread, 1 context", "thread", False),
                 ("ioe thread, own contexts", "thread", True), ("fio", None, None))


def scaling_cmd(args, backend, direct, threads, submit, own_contexts):
    if submit is None:
        return fio_cmd(args, {"backend": backend, "rw": "randread", "qd": 32, "direct": direct}) + [
            f"--numjobs={threads}", "--group_reporting"]
    return ioe_cmd(args, {"backend": backend, "rw": "randread", "qd": 32, "direct": direct}) + [
        "--threads", str(threads), "--submit", submit, "--contexts", str(threads if own_contexts else 1)]


def timed_run(cmd):
    """Runs cmd; its output and the CPU seconds the child used (user + system,
    every thread), so every tool is measured the same way."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = run(cmd)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return out, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def scaling(args):
    """Aggregate IOPS and CPU per I/O for 1, 2 and 4 submitting threads. In
    each round of a (backend, cache) cell every tool and thread count runs
    once, in an order that rotates every round, so drift spreads over all."""
    cells = []
    for backend in ("uring", "aio"):
        for direct in (0, 1):
            kind = "O_DIRECT" if direct else "page cache"
            if not direct:
                subprocess.run(["cat", args.file], stdout=subprocess.DEVNULL, check=True)
            combos = [(name, submit, own, n) for name, submit, own in SCALING_TOOLS for n in SCALING_THREADS
                      if not (own and n == 1)]  # one thread with its own context is the shared row
            runs = {}
            for i in range(args.pairs):
                order = combos[i % len(combos):] + combos[:i % len(combos)]
                for name, submit, own, n in order:
                    out, cpu = timed_run(scaling_cmd(args, backend, direct, n, submit, own))
                    iops = (ioe_figures if submit else fio_figures)(out)["iops"]
                    runs.setdefault((name, n), []).append({"iops": iops, "cpu_s": cpu,
                                                           "cpu_us_per_io": cpu / (iops * args.runtime) * 1e6})
            rows = []
            for name, submit, own in SCALING_TOOLS:
                per_n = {}
                one_thread = ("ioe thread, 1 context", 1) if own else (name, 1)
                for n in SCALING_THREADS:
                    r = runs[one_thread if n == 1 else (name, n)]
                    per_n[n] = {"iops": statistics.median(x["iops"] for x in r),
                                "cpu_us_per_io": statistics.median(x["cpu_us_per_io"] for x in r), "runs": r}
                    if n > 1:
                        per_n[n]["paired_vs_1"] = paired_ratio(r, runs[one_thread], "iops")
                rows.append({"tool": name, "threads": {str(n): v for n, v in per_n.items()},
                             "command_4": shlex.join(scaling_cmd(args, backend, direct, 4, submit, own))})
                line = "  ".join(f"{n}: {per_n[n]['iops']:>8.0f} IOPS {per_n[n]['cpu_us_per_io']:.2f} us"
                                 for n in SCALING_THREADS)
                worst = min(per_n[n]["paired_vs_1"]["median"] for n in SCALING_THREADS[1:])
                print(f"  {backend} {kind:<10} {name:<26} {line}  worst N/1 {worst:.2f}", flush=True)
            cells.append({"backend": backend, "direct": direct, "rows": rows})
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "arguments": " ".join(shlex.quote(a) for a in sys.argv[1:]), "pairs": args.pairs,
            "runtime": args.runtime, "cells": cells}


def scaling_markdown(sc):
    lines = ["", f"Several submitting threads (measured {sc['date']}, `python3 bench/vs_fio.py {sc['arguments']}`): "
             "1, 2 and 4 jobs, each keeping 32 random 4 KiB reads in flight; aggregate IOPS and CPU per I/O (the "
             "child process's user + system time over its I/Os, the same measure for every tool). 'callback': "
             "completion callbacks submit the next read, one context; 'thread': each job's own thread submits every "
             "read and callbacks hand finished slots back to it, into one shared context or a context per thread; "
             "fio: `--numjobs` with as many jobs, each its own ring or AIO context. In every round of a cell each "
             f"tool and thread count runs once ({sc['pairs']} rounds, {sc['runtime']:g} s runs, order rotating); "
             "medians. 'N/1' is the paired ratio of the N-thread IOPS over the 1-thread IOPS of the same tool in "
             "the same round: below 1.0 means more threads made it slower.", "",
             "| backend | cache | tool | 1 thread IOPS | 2 threads | 4 threads | CPU/IO us 1 / 2 / 4 | 2/1 (95% CI) | 4/1 (95% CI) |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for cell in sc["cells"]:
        kind = "O_DIRECT" if cell["direct"] else "page cache"
        for row in cell["rows"]:
            t = row["threads"]
            lines.append(f"| {cell['backend']} | {kind} | {row['tool']} | {t['1']['iops']:.0f} | {t['2']['iops']:.0f} | "
                         f"{t['4']['iops']:.0f} | {t['1']['cpu_us_per_io']:.2f} / {t['2']['cpu_us_per_io']:.2f} / "
                         f"{t['4']['cpu_us_per_io']:.2f} | {paired_text(t['2'].get('paired_vs_1'))} | "
                         f"{paired_text(t['4'].get('paired_vs_1'))} |")
    return lines


def merge_pair(args, w_merged, w_plain):
    """ioe-bench with and without merging, next to fio writing 128 KiB and
    4 KiB blocks with the same engine and depth: fio's ratio is what perfect
    merging could gain on this kernel and device (the ceiling)."""
    merged, plain, fio_big, fio_small = [], [], [], []
    for _ in range(args.pairs):
        merged.append(ioe_figures(run(ioe_cmd(args, w_merged))))
        plain.append(ioe_figures(run(ioe_cmd(args, w_plain))))
        fio_big.append(fio_figures(run(fio_cmd(args, dict(w_plain, bs="128k")))))
        fio_small.append(fio_figures(run(fio_cmd(args, w_plain))))
    m, p, fb, fs = medians(merged), medians(plain), medians(fio_big), medians(fio_small)
    ratio = m["mib_s"] / p["mib_s"]
    ceiling = fb["mib_s"] / fs["mib_s"]
    print(f"  {w_merged['label']:<44} merged {m['mib_s']:.0f} MiB/s  unmerged {p['mib_s']:.0f} MiB/s  ratio {ratio:.2f}"
          f"  (fio 128k {fb['mib_s']:.0f} / 4k {fs['mib_s']:.0f} MiB/s = {ceiling:.2f})", flush=True)
    return {"workload": w_merged, "merged": m, "unmerged": p, "ratio_mib_s": ratio, "fio_128k": fb, "fio_4k": fs,
            "fio_ratio_mib_s": ceiling, "merged_command": shlex.join(ioe_cmd(args, w_merged)),
            "unmerged_command": shlex.join(ioe_cmd(args, w_plain)),
            "fio_128k_command": shlex.join(fio_cmd(args, dict(w_plain, bs="128k"))),
            "fio_4k_command": shlex.join(fio_cmd(args, w_plain))}


def pool_runs(all_results):
    """Every single run of each comparison row, from several results files
    (the latest first), and the medians over all of them."""
    rows = []
    for c in all_results[0]["comparisons"]:
        label = c["workload"]["label"]
        ioe_runs, fio_runs, dates = [], [], []
        for r in all_results:
            for other in r["comparisons"]:
                if other["workload"]["label"] == label:
                    ioe_runs += other["ioe_runs"]
                    fio_runs += other["fio_runs"]
                    dates.append(r["date"])
        a, b = medians(ioe_runs), medians(fio_runs)
        rows.append({"label": label, "pairs": min(len(ioe_runs), len(fio_runs)), "runs_from": dates, "ioe": a,
                     "fio": b, "ratio": ratios(a, b),
                     "paired_iops_ratio": paired_iops_ratio(ioe_runs, fio_runs)})
    return {"sources": [r["date"] for r in all_results], "rows": rows}


def machine(args):
    def first(cmd):
        try:
            return run(cmd).strip()
        except Exception:
            return "unknown"
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    return {"cpus": os.cpu_count(), "cpu_model": cpu, "memory_gib": round(mem_kib / 1048576, 1),
            "kernel": platform.release(), "fio": first(["fio", "--version"]),
            # findmnt names ext4 as such; stat -f reports every ext* as "ext2/ext3".
            "filesystem": first(["findmnt", "-n", "-o", "FSTYPE", "-T", os.path.dirname(os.path.abspath(args.file))]),
            "device": first(["sh", "-c", "lsblk -dno NAME,MODEL,ROTA,SIZE $(df --output=source "
                             + shlex.quote(os.path.dirname(os.path.abspath(args.file))) + " | tail -1) 2>/dev/null"])}


def svg_plot(points, path):
    """IOPS against queue depth, one line per tool and backend, log2 x axis."""
    series = {}
    for p in points:
        w = p["workload"]
        for tool in ("ioe", "fio"):
            name = f"ioe-bench {w['backend']}" if tool == "ioe" else f"fio {FIO_ENGINE[w['backend']]}"
            series.setdefault(name, []).append((w["qd"], p[tool]["iops"]))
        if p.get("peer"):
            series.setdefault("hand-written liburing loop", []).append((w["qd"], p["peer"]["iops"]))
    qds = sorted({q for s in series.values() for q, _ in s})
    ymax = max(v for s in series.values() for _, v in s) * 1.1
    W, H, L, R, T, B = 780, 440, 80, 250, 40, 50
    import math
    lq = [math.log2(q) for q in qds]
    def x(q):
        return L + (math.log2(q) - lq[0]) / max(lq[-1] - lq[0], 1) * (W - L - R)
    def y(v):
        return H - B - v / ymax * (H - T - B)
    colors = {"ioe-bench uring": "#1f77b4", "fio io_uring": "#aec7e8", "ioe-bench aio": "#d62728", "fio libaio": "#ff9896",
              "hand-written liburing loop": "#2ca02c"}
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2}" y="22" text-anchor="middle" font-size="15">4 KiB random read, O_DIRECT: IOPS against queue depth</text>',
           f'<line x1="{L}" y1="{H - B}" x2="{W - R}" y2="{H - B}" stroke="black"/>',
           f'<line x1="{L}" y1="{T}" x2="{L}" y2="{H - B}" stroke="black"/>',
           f'<text x="{(L + W - R) / 2}" y="{H - 12}" text-anchor="middle">queue depth</text>']
    for q in qds:
        out.append(f'<text x="{x(q):.1f}" y="{H - B + 16}" text-anchor="middle">{q}</text>')
    for i in range(6):
        v = ymax * i / 5
        out.append(f'<line x1="{L - 4}" y1="{y(v):.1f}" x2="{W - R}" y2="{y(v):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{L - 8}" y="{y(v) + 4:.1f}" text-anchor="end">{v / 1000:.0f}k</text>')
    for n, (name, pts) in enumerate(sorted(series.items())):
        pts.sort()
        dash = "" if name.startswith("ioe") else ' stroke-dasharray="6,4"'
        path_d = " ".join(f"{'M' if i == 0 else 'L'}{x(q):.1f},{y(v):.1f}" for i, (q, v) in enumerate(pts))
        color = colors.get(name, "black")
        out.append(f'<path d="{path_d}" fill="none" stroke="{color}" stroke-width="2"{dash}/>')
        for q, v in pts:
            out.append(f'<circle cx="{x(q):.1f}" cy="{y(v):.1f}" r="3" fill="{color}"/>')
        ly = T + 20 + n * 20
        out.append(f'<line x1="{W - R + 15}" y1="{ly}" x2="{W - R + 45}" y2="{ly}" stroke="{color}" stroke-width="2"{dash}/>')
        out.append(f'<text x="{W - R + 52}" y="{ly + 4}">{name}</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def write_section(path, name, text):
    """Puts `text` into BENCHMARKS.md as the section `name` (between marker
    comments), replacing that section and keeping the others: vs_fio.py
    writes the block engine's, vs_echo.py the server's."""
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    old = open(path).read() if os.path.exists(path) else ""
    block = f"{begin}\n{text.rstrip()}\n{end}\n"
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        new = head + block + rest.split(end, 1)[1].lstrip("\n")
    elif begin not in old and name == "block" and old and "<!-- begin" not in old:
        new = block  # the first run of the sections: the old file was this section
    else:
        new = (old.rstrip() + "\n\n" if old.strip() else "") + block
    with open(path, "w") as f:
        f.write(new)


def write_markdown(results, path):
    m = results["machine"]
    lines = ["# Benchmarks: ioe-bench against fio", "",
             f"Measured {results['date']} with `python3 bench/vs_fio.py {results['arguments']}`: each row alternates "
             f"ioe-bench and fio {results['pairs']} times on the same file, swapping which goes first every pair "
             "(ioe fio, fio ioe, ...), and shows medians; "
             "ratio = ioe / fio. CPU per I/O is the process's user + system time over the I/Os done (for fio, "
             "from its usr/sys percentages). Latency is submission to completion.", "",
             f"Machine: {m['cpus']} CPUs ({m['cpu_model']}), {m['memory_gib']} GiB, kernel {m['kernel']}, "
             f"{m['filesystem']} on `{m['device']}`, {m['fio']}, ioengine {results['ioengine_version']}.", "",
             "Reading the O_DIRECT rows: on this virtual machine a third to a half of the CPU time per I/O is the "
             "virtio doorbell (a VM exit; `perf record -e cpu-clock`), and the virtual disk completes a whole queue's "
             "worth of requests with one interrupt (about 1/32 interrupts per I/O at depth 32, for both tools), so "
             "both tools run in lock-step with it. Its speed drifts by 10% or more between runs, and repeated "
             "A/B rounds of the same two builds differ by up to 5%: differences of a few percent are noise. "
             "Alternating the tools spreads that drift over both.", "",
             "Rows marked pool run ioe-bench's callbacks on a one-thread `ioe_workers` pool instead of the "
             "poller thread (fio has no such mode; its row is the same plain fio run): the price of callbacks that "
             "may block.", "",
             "Device queue: the requests the block device held on average while busy, from its counters in "
             "/sys/block (ioe / fio). When it is the same for both, the device, not the tool, sets the pace.", "",
             "Paired IOPS ratio: the median of the per-pair ratios (each ioe run against the fio run next to it), "
             "with a 95% bootstrap interval. 'above' or 'below' fio only when the whole interval is; 'tie' when it "
             "holds 1.0, that is when this many pairs cannot tell the two tools apart on this machine.", "",
             "| workload | ioe IOPS | fio IOPS | IOPS ratio | paired IOPS ratio (95% CI) | vs fio | ioe CPU/IO us | fio CPU/IO us | CPU ratio | ioe p50 us | fio p50 us | p50 ratio | ioe p99 us | fio p99 us | device queue |",
             "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for c in results["comparisons"]:
        a, b, r = c["ioe"], c["fio"], c["ratio"]
        dev = (f"{a['dev_queue']:.1f} / {b['dev_queue']:.1f}" if a.get("dev_queue") and b.get("dev_queue") else "-")
        paired = c.get("paired_iops_ratio") or paired_iops_ratio(c["ioe_runs"], c["fio_runs"])
        lines.append(f"| {c['workload']['label']} | {a['iops']:.0f} | {b['iops']:.0f} | {r['iops']:.2f} | "
                     f"{paired_text(paired)} | {verdict(paired)} | "
                     f"{a['cpu_us_per_io']:.2f} | {b['cpu_us_per_io']:.2f} | {r['cpu_us_per_io']:.2f} | "
                     f"{a['p50_us']:.1f} | {b['p50_us']:.1f} | {r['p50_us']:.2f} | {a['p99_us']:.1f} | {b['p99_us']:.1f} | {dev} |")
    peer_rows = [c for c in results["comparisons"] if c.get("peer")]
    if peer_rows:
        lines += ["", "Against a hand-written liburing loop (`bench/uring-loop.c`: one thread, one ring, each "
                  "follow-up read submitted as its completion is reaped; no callbacks, queues or fairness), run as a "
                  "third tool in the same rounds as the io_uring rows above (the three rotate which goes first). "
                  "It shows what the engine's extra work costs against the loop a C programmer would write.", "",
                  "| workload | ioe IOPS | loop IOPS | paired IOPS ratio ioe/loop (95% CI) | vs loop | ioe CPU/IO us | loop CPU/IO us | fio IOPS |",
                  "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
        for c in peer_rows:
            a, l, pp = c["ioe"], c["peer"], c["peer_paired_iops_ratio"]
            lines.append(f"| {c['workload']['label']} | {a['iops']:.0f} | {l['iops']:.0f} | {paired_text(pp)} | "
                         f"{verdict(pp)} | {a['cpu_us_per_io']:.2f} | {l['cpu_us_per_io']:.2f} | {c['fio']['iops']:.0f} |")
    crate_rows = [c for c in results["comparisons"] if c.get("crate")]
    if crate_rows:
        lines += ["", "Against io-engine 0.12, the public crate whose design the seed document reworks "
                  "(`bench/io-engine-peer`: its `setup` with an inline closure, or with a channel to one callback "
                  "thread for the pool rows; each completion submits the next read through its channel), run as a "
                  "further tool in the same rounds. Paired ratios are ioe / io-engine; the CPU ratio below 1 means "
                  "ioe spends less CPU per I/O.", "",
                  "| workload | ioe IOPS | io-engine IOPS | paired IOPS ratio (95% CI) | vs io-engine | ioe CPU/IO us | io-engine CPU/IO us | paired CPU ratio | fio IOPS |",
                  "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
        for c in crate_rows:
            a, d, pp = c["ioe"], c["crate"], c["crate_paired_iops_ratio"]
            lines.append(f"| {c['workload']['label']} | {a['iops']:.0f} | {d['iops']:.0f} | {paired_text(pp)} | "
                         f"{verdict(pp)} | {a['cpu_us_per_io']:.2f} | {d['cpu_us_per_io']:.2f} | "
                         f"{paired_text(c.get('crate_paired_cpu_ratio'))} | {c['fio']['iops']:.0f} |")
    if results.get("pooled"):
        pooled = results["pooled"]
        lines += ["", f"Pooled: every single run of each row from {len(pooled['sources'])} full runs "
                  f"({', '.join(pooled['sources'])}), medians over all of them: steadier than one run's medians "
                  "(pool only runs of builds with the same I/O path). "
                  f"Made with `{pooled.get('command', 'vs_fio.py --render-only --pool')}`; the earlier runs are kept "
                  "in bench/results/.", "",
                  "| workload | pairs | ioe IOPS | fio IOPS | IOPS ratio | paired IOPS ratio (95% CI) | vs fio | CPU ratio | p50 ratio |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
        for row in pooled["rows"]:
            a, b, r = row["ioe"], row["fio"], row["ratio"]
            paired = row.get("paired_iops_ratio")
            lines.append(f"| {row['label']} | {row['pairs']} | {a['iops']:.0f} | {b['iops']:.0f} | {r['iops']:.2f} | "
                         f"{paired_text(paired)} | {verdict(paired)} | "
                         f"{r['cpu_us_per_io']:.2f} | {r['p50_us']:.2f} |")
    lines += ["", "Merging: ioe-bench writing 4 KiB blocks sequentially with merging up to 128 KiB against the same "
              "without merging. Next to it, fio writing 128 KiB blocks against 4 KiB blocks with the same engine "
              "and depth: the gain that perfect merging could reach on this kernel and device. The last column, "
              "fio's 128 KiB rate over ioe's unmerged rate, is the most the ioe ratio could reach: ioe's unmerged "
              "writes are not fio's 4 KiB writes (with O_DIRECT the kernel joins adjacent requests that one "
              "system call hands it together, and ioe hands over several per call where fio hands over one).", "",
              "| merging | ioe merged MiB/s | ioe unmerged MiB/s | ioe ratio | fio 128k MiB/s | fio 4k MiB/s | fio ratio "
              "| fio 128k / ioe unmerged |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for c in results["merging"]:
        fio_cols = (f"{c['fio_128k']['mib_s']:.0f} | {c['fio_4k']['mib_s']:.0f} | {c['fio_ratio_mib_s']:.2f} | "
                    f"{c['fio_128k']['mib_s'] / c['unmerged']['mib_s']:.2f}"
                    if "fio_128k" in c else "- | - | - | -")
        lines.append(f"| {c['workload']['label']} | {c['merged']['mib_s']:.0f} | {c['unmerged']['mib_s']:.0f} | "
                     f"{c['ratio_mib_s']:.2f} | {fio_cols} |")
    if results.get("scaling"):
        lines += scaling_markdown(results["scaling"])
    slot = [c["ioe"]["bytes_per_slot"] for c in results["comparisons"] if c["workload"]["backend"] == "uring"]
    slot_aio = [c["ioe"]["bytes_per_slot"] for c in results["comparisons"] if c["workload"]["backend"] == "aio"]
    lines += ["", f"Engine memory per in-flight slot (ring/AIO share, slot, request record): io_uring "
              f"{max(slot) if slot else 0} bytes, AIO {max(slot_aio) if slot_aio else 0} bytes.", "",
              "", f"Long run: {results['soak']['ios']} verified random 4 KiB reads and writes in "
              f"{results['soak']['seconds']:.0f} s; RSS {results['soak']['rss_kib_start']} KiB after set-up, "
              f"{results['soak']['rss_kib_end']} KiB at the end (`{results['soak']['command']}`).", "",
              "![IOPS against queue depth](bench/results/iops_vs_qd.svg)", "", "## Exact commands", ""]
    for c in results["comparisons"]:
        lines += [f"- {c['workload']['label']}:", f"  - `{c['ioe_command']}`", f"  - `{c['fio_command']}`"]
        if c.get("peer_command"):
            lines.append(f"  - `{c['peer_command']}`")
        if c.get("crate_command"):
            lines.append(f"  - `{c['crate_command']}`")
    for c in results["merging"]:
        lines += [f"- {c['workload']['label']}:", f"  - `{c['merged_command']}`", f"  - `{c['unmerged_command']}`"]
        lines += [f"  - `{c[k]}`" for k in ("fio_128k_command", "fio_4k_command") if k in c]
    if results.get("scaling"):
        lines.append("- several submitting threads, 4 threads (1 and 2 the same with the counts changed):")
        for cell in results["scaling"]["cells"]:
            lines += [f"  - `{row['command_4']}`" for row in cell["rows"]]
    lines += ["", "Raw runs and medians: `bench/results/latest.json`.", ""]
    write_section(path, "block", "\n".join(lines))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ioe-bench", default=os.path.join(ROOT, "build", "bench", "ioe-bench"))
    p.add_argument("--peer", default=os.path.join(ROOT, "build", "bench", "uring-loop"),
                   help="hand-written liburing loop run next to the io_uring O_DIRECT rows (built when liburing-dev "
                        "is installed); skipped if missing")
    p.add_argument("--crate-peer", default=os.path.join(ROOT, "build", "io-engine-peer", "release", "io-engine-peer"),
                   help="io-engine 0.12 bench program (bench/io-engine-peer, built with cargo if missing)")
    p.add_argument("--no-crate-peer", action="store_true", help="leave io-engine 0.12 out")
    p.add_argument("--file", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "ioe-vs-fio.dat"))
    p.add_argument("--size", default="1g")
    p.add_argument("--runtime", type=float, default=5)
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="fewer queue depths (1, 32, 128)")
    p.add_argument("--soak", type=float, default=60, help="seconds of the long run that checks RSS stays flat")
    p.add_argument("--out-dir", default=os.path.join(ROOT, "bench", "results"))
    p.add_argument("--markdown", default=os.path.join(ROOT, "BENCHMARKS.md"))
    p.add_argument("--pool", nargs="+", metavar="JSON",
                   help="with --render-only: also pool the single runs of these earlier results files with the "
                        "latest ones, row by row, into a second table (more pairs, steadier medians)")
    p.add_argument("--scaling-only", action="store_true",
                   help="measure only the several-submitting-threads table, keeping the rest of latest.json")
    p.add_argument("--render-only", action="store_true",
                   help="rewrite BENCHMARKS.md and the plot from the saved latest.json, measuring nothing")
    args = p.parse_args()
    args.block_stat = block_stat_path(args.file)
    if args.render_only:
        with open(os.path.join(args.out_dir, "latest.json")) as f:
            results = json.load(f)
        if args.pool:
            results["pooled"] = pool_runs([results] + [json.load(open(path)) for path in args.pool])
            results["pooled"]["command"] = shlex.join(["python3", "bench/vs_fio.py", "--render-only", "--pool",
                                                       *[os.path.relpath(path, ROOT) for path in args.pool]])
            with open(os.path.join(args.out_dir, "latest.json"), "w") as f:
                json.dump(results, f, indent=1)
        svg_plot([c for c in results["comparisons"] if c["workload"]["direct"] and not c["workload"].get("workers")],
                 os.path.join(args.out_dir, "iops_vs_qd.svg"))
        write_markdown(results, args.markdown)
        return
    if args.pairs < 3:
        sys.exit("vs_fio: at least 3 pairs are needed for a meaningful median")
    if not os.path.exists(args.ioe_bench):
        sys.exit(f"vs_fio: {args.ioe_bench} not found; build it with: bash scripts/run-bench.sh --help")
    os.makedirs(args.out_dir, exist_ok=True)

    # The file is written in full once, so reads hit real blocks.
    print(f"writing {args.size} to {args.file}", flush=True)
    run(["fio", "--name=fill", f"--filename={args.file}", f"--size={args.size}", "--rw=write", "--bs=1m",
         "--direct=1", "--ioengine=psync", "--output-format=json"])

    if args.scaling_only:
        with open(os.path.join(args.out_dir, "latest.json")) as f:
            results = json.load(f)
        print("several submitting threads", flush=True)
        results["scaling"] = scaling(args)
        with open(os.path.join(args.out_dir, "latest.json"), "w") as f:
            json.dump(results, f, indent=1)
        write_markdown(results, args.markdown)
        print(f"wrote {args.out_dir}/latest.json and {args.markdown}")
        os.unlink(args.file)
        return

    qds = [1, 32, 128] if args.quick else [1, 4, 16, 32, 64, 128]
    comparisons = []
    print("O_DIRECT 4 KiB random read (workloads 1 and 2)", flush=True)
    with_peer = os.path.exists(args.peer)
    if not with_peer:
        print(f"  ({args.peer} not found: no hand-written liburing loop rows; install liburing-dev and rebuild)")
    with_crate = not args.no_crate_peer and build_crate_peer(args)
    for backend in ("uring", "aio"):
        for qd in qds:
            comparisons.append(compare(args, {"label": f"randread 4k direct QD{qd} {backend}", "backend": backend,
                                              "rw": "randread", "qd": qd, "direct": 1},
                                       with_peer=with_peer and backend == "uring",
                                       with_crate=with_crate and qd in (1, 32, 128)))
    print("the same with callbacks on a one-thread pool instead of the poller (the cost of pool mode)", flush=True)
    for backend in ("uring", "aio"):
        for qd in (4, 32):
            comparisons.append(compare(args, {"label": f"randread 4k direct QD{qd} {backend} pool", "backend": backend,
                                              "rw": "randread", "qd": qd, "direct": 1, "workers": 1},
                                       with_crate=with_crate and qd == 32))
    print("page-cache 4 KiB random read (workload 3)", flush=True)
    subprocess.run(["cat", args.file], stdout=subprocess.DEVNULL, check=True)  # warm the cache
    for backend in ("uring", "aio"):
        for qd in (1, 32, 128):
            comparisons.append(compare(args, {"label": f"randread 4k page cache QD{qd} {backend}", "backend": backend,
                                              "rw": "randread", "qd": qd, "direct": 0}, with_crate=with_crate))
        comparisons.append(compare(args, {"label": f"randread 4k page cache QD32 {backend} pool", "backend": backend,
                                          "rw": "randread", "qd": 32, "direct": 0, "workers": 1},
                                   with_crate=with_crate))
    print("4 KiB sequential writes, merged up to 128 KiB against unmerged (workload 4)", flush=True)
    merging = []
    for backend in ("uring", "aio"):
        for direct, kind in ((0, "page cache"), (1, "direct")):
            base = {"backend": backend, "rw": "write", "qd": 128, "direct": direct}
            merging.append(merge_pair(args, dict(base, label=f"seq write 4k {kind} QD128 {backend}", merge="128k"),
                                      dict(base, label=f"seq write 4k {kind} QD128 {backend} (unmerged)")))

    print("several submitting threads", flush=True)
    scaling_results = scaling(args)

    print(f"long run: {args.soak:.0f} s of 4 KiB random read/write, RSS at start and end", flush=True)
    soak_cmd = [ioe_cmd(args, {"backend": "auto", "rw": "randrw", "qd": 32, "direct": 1})[0], "--rw", "randrw", "--iodepth", "32", "--direct", "1", "--filename", args.file,
                "--size", args.size, "--runtime", str(args.soak), "--verify", "1", "--json"]
    soak = json.loads(run(soak_cmd))
    soak = {"command": shlex.join(soak_cmd), "seconds": soak["seconds"], "ios": soak["ios"],
            "rss_kib_start": soak["rss_kib_start"], "rss_kib_end": soak["rss_kib_end"], "errors": soak["errors"],
            "verify_mismatches": soak["verify_mismatches"]}
    print(f"  RSS {soak['rss_kib_start']} KiB at start, {soak['rss_kib_end']} KiB after {soak['ios']} I/Os", flush=True)

    version = json.loads(run([args.ioe_bench, "--rw", "randread", "--number", "1", "--filename", args.file,
                              "--size", args.size, "--verify", "0", "--json"]))["version"]
    results = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "arguments": " ".join(shlex.quote(a) for a in sys.argv[1:]), "pairs": args.pairs,
               "ioengine_version": version, "machine": machine(args), "comparisons": comparisons, "merging": merging, "soak": soak,
               "scaling": scaling_results}
    with open(os.path.join(args.out_dir, "latest.json"), "w") as f:
        json.dump(results, f, indent=1)
    direct_points = [c for c in comparisons if c["workload"]["direct"] and not c["workload"].get("workers")]
    svg_plot(direct_points, os.path.join(args.out_dir, "iops_vs_qd.svg"))
    write_markdown(results, args.markdown)
    print(f"wrote {args.out_dir}/latest.json, {args.out_dir}/iops_vs_qd.svg and {args.markdown}")
    os.unlink(args.file)


if __name__ == "__main__":
    main()
