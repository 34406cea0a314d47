#!/usr/bin/env python3
"""TCP echo: the ioengine server (io_uring and epoll backends, one thread)
against an epoll server written the usual way (bench/epoll-echo, one
thread) and a libuv server (bench/uv-echo), with bench/echo-load as the
client. Servers run pinned to CPU 0, the load generator to CPU 1; the
servers take turns, in a rotating order, every round; figures are medians
over the rounds and ratios are paired (each run against the peer's run of
the same round, so drift between rounds cancels).

Closed loop: as fast as it goes, D messages in flight per connection. On a
2-core machine the load generator on one core saturates at about what a
good server does on the other, so the client's CPU is shown: near 100%,
the generator sets the pace. Fixed load: the generator sends at a set total
rate (open loop, half of what the epoll server sustained in the same run),
and what counts is the server's CPU per message and the latency, measured
from when each message was due.

Also the server's memory per idle connection (RSS with 10,000 idle
connections against RSS before).

Writes bench/results/echo-latest.json and the "net" section of BENCHMARKS.md.
"""

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from vs_fio import medians, paired_ratio, paired_text, terminate, verdict, write_section  # noqa: E402

CLOSED_CASES = [  # connections, depth, message size
    (1, 1, 64), (100, 1, 64), (100, 4, 64), (1000, 1, 64), (1000, 4, 64), (10, 1, 65536),
]
OPEN_CASES = [(1, 64), (100, 64), (1000, 64)]  # connections, size; rate: half of epoll's closed loop (depth 1)


def servers(build):
    ioe = os.path.join(build, "examples", "echo_server")
    found = {
        "ioe-uring": ([ioe, "{port}", "0"], {"IOENGINE_NET_BACKEND": "uring"}),
        "ioe-epoll": ([ioe, "{port}", "0"], {"IOENGINE_NET_BACKEND": "epoll"}),
        "epoll": ([os.path.join(build, "bench", "epoll-echo"), "{port}", "1"], {}),
    }
    uv = os.path.join(build, "bench", "uv-echo")
    if os.path.exists(uv):
        found["libuv"] = ([uv, "{port}"], {})
    return found


class Server:
    """A server process pinned to CPU 0, started fresh for each run."""

    def __init__(self, spec, port):
        argv, env = spec
        argv = ["taskset", "-c", "0"] + [a.format(port=port) for a in argv]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     env=dict(os.environ, **env), text=True)
        line = self.proc.stdout.readline()
        if "listening" not in line:
            raise RuntimeError(f"{argv}: {line!r}")

    def cpu_ns(self):
        """CPU time of every thread of the server, in nanoseconds."""
        total = 0
        task_dir = f"/proc/{self.proc.pid}/task"
        for tid in os.listdir(task_dir):
            try:
                with open(f"{task_dir}/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except OSError:
                pass
        return total

    def rss_kib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def fds(self):
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def stop(self):
        terminate(self.proc)


def load(args, port, conns, depth, size, rate=0.0):
    cmd = [args.echo_load, "--port", str(port), "--connections", str(conns), "--depth", str(depth),
           "--size", str(size), "--duration", str(args.duration), "--cpu", "1", "--json"]
    if rate:
        cmd += ["--rate", f"{rate:.0f}"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out), " ".join(cmd)


def one_run(args, spec, port, conns, depth, size, rate=0.0):
    server = Server(spec, port)
    try:
        cpu0 = server.cpu_ns()
        result, cmd = load(args, port, conns, depth, size, rate)
        cpu = server.cpu_ns() - cpu0
    finally:
        server.stop()
    if result["errors"]:
        raise RuntimeError(f"echo mismatch: {result}")
    msgs = result["messages"] or 1
    return {
        "msgs_per_s": result["msgs_per_s"],
        "server_cpu_us_per_msg": cpu / 1000 / msgs,
        "server_cpu_pct": 100 * cpu / 1e9 / result["elapsed_s"],
        "client_cpu_pct": 100 * result["client_cpu_s"] / result["elapsed_s"],
        "p50_us": result["p50_us"],
        "p99_us": result["p99_us"],
        "p999_us": result["p999_us"],
        "missed": result.get("missed", 0),
    }, cmd


def measure_case(args, specs, label, conns, depth, size, rate=0.0):
    names = list(specs)
    runs = {n: [] for n in names}
    commands = {}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            fig, cmd = one_run(args, specs[n], args.port, conns, depth, size, rate)
            runs[n].append(fig)
            commands[n] = cmd
        line = "  ".join(f"{n} {runs[n][-1]['msgs_per_s']:.0f}/s {runs[n][-1]['server_cpu_us_per_msg']:.2f}us"
                         for n in names)
        print(f"{label} round {r + 1}: {line}", flush=True)
    med = {n: medians(runs[n]) for n in names}
    paired = {}
    for n in names:
        if n == "epoll":
            continue
        paired[n] = {
            "msgs": paired_ratio(runs[n], runs["epoll"], "msgs_per_s"),
            "cpu": paired_ratio(runs[n], runs["epoll"], "server_cpu_us_per_msg"),
            "p99": paired_ratio(runs[n], runs["epoll"], "p99_us"),
        }
    if "libuv" in names:
        paired["ioe-uring/libuv"] = {"msgs": paired_ratio(runs["ioe-uring"], runs["libuv"], "msgs_per_s")}
    return {"label": label, "connections": conns, "depth": depth, "size": size, "rate": rate,
            "runs": runs, "medians": med, "paired": paired, "commands": commands}


def idle_memory(args, specs, n=10000):
    out = {}
    for name, spec in specs.items():
        server = Server(spec, args.port)
        try:
            before = server.rss_kib()
            fds0 = server.fds()
            gen = subprocess.Popen([args.echo_load, "--port", str(args.port), "--connections", str(n), "--idle"],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            gen.stdout.readline()
            deadline = time.time() + 60
            while server.fds() < fds0 + n and time.time() < deadline:
                time.sleep(0.05)  # the server accepts in the background
            after = server.rss_kib()
            gen.stdin.close()
            gen.wait()
        finally:
            server.stop()
        out[name] = {"connections": n, "rss_before_kib": before, "rss_after_kib": after,
                     "bytes_per_connection": (after - before) * 1024 / n}
        print(f"idle {name}: {before} -> {after} KiB, {out[name]['bytes_per_connection']:.0f} B/connection", flush=True)
    return out


def machine():
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpus": os.cpu_count(), "cpu": cpu, "kernel": platform.release()}


def fmt(x, digits=1):
    return "-" if x is None else f"{x:.{digits}f}"


def render(results):
    m = results["machine"]
    names = results["servers"]
    peers = [n for n in names if n != "epoll"]
    lines = ["# Benchmarks: TCP echo server", "",
             f"Measured {results['date']} with `python3 bench/vs_echo.py {results['arguments']}`. Each server runs "
             "alone on CPU 0 (`taskset -c 0`; ioengine with one loop thread, `echo_server PORT 0`; the peers with one "
             "thread), `bench/echo-load` on CPU 1; servers take turns in a rotating order every round, started fresh "
             "for each run. Medians over the rounds; paired ratios are medians of per-round ratios with a 95% "
             "bootstrap interval, against the hand-written epoll server. Server CPU is the CPU time of all its "
             "threads (schedstat) over the messages echoed. Latency is from when a message was due to when its echo "
             "was complete.", "",
             f"Machine: {m['cpus']} CPUs ({m['cpu']}), kernel {m['kernel']}.", "",
             "## Closed loop (as fast as it goes)", "",
             "Client CPU near 100%: the load generator, not the server, sets the pace.", "",
             "| case | " + " | ".join(f"{n} msgs/s" for n in names) + " | " +
             " | ".join(f"{n}/epoll msgs (95% CI)" for n in peers) + " | " +
             " | ".join(f"{n} server CPU us/msg" for n in names) + " | client CPU % |",
             "| --- |" + " ---: |" * (2 * len(names) + len(peers) + 1)]
    for c in results["closed"]:
        med, paired = c["medians"], c["paired"]
        row = [c["label"]] + [fmt(med[n]["msgs_per_s"], 0) for n in names]
        row += [f"{paired_text(paired[n]['msgs'])} {verdict(paired[n]['msgs'])}" for n in peers]
        row += [fmt(med[n]["server_cpu_us_per_msg"], 2) for n in names]
        row += [" / ".join(fmt(med[n]["client_cpu_pct"], 0) for n in names)]
        lines.append("| " + " | ".join(row) + " |")
    if any("ioe-uring/libuv" in c["paired"] for c in results["closed"]):
        lines += ["", "ioe-uring / libuv, paired msgs/s: " + "; ".join(
            f"{c['label']} {paired_text(c['paired']['ioe-uring/libuv']['msgs'])}" for c in results["closed"]
            if "ioe-uring/libuv" in c["paired"])]
    lines += ["", "## Fixed offered load (open loop)", "",
              "| case | rate msgs/s | " + " | ".join(f"{n} server CPU us/msg" for n in names) + " | " +
              " | ".join(f"{n}/epoll CPU (95% CI)" for n in peers) + " | " +
              " | ".join(f"{n} p50 / p99 us" for n in names) + " |",
              "| --- | ---: |" + " ---: |" * (2 * len(names) + len(peers))]
    for c in results["open"]:
        med, paired = c["medians"], c["paired"]
        row = [c["label"], fmt(c["rate"], 0)] + [fmt(med[n]["server_cpu_us_per_msg"], 2) for n in names]
        row += [f"{paired_text(paired[n]['cpu'])} {verdict(paired[n]['cpu'])}" for n in peers]
        row += [f"{fmt(med[n]['p50_us'])} / {fmt(med[n]['p99_us'])}" for n in names]
        lines.append("| " + " | ".join(row) + " |")
    if results.get("idle"):
        lines += ["", "## Memory per idle connection", "",
                  "| server | RSS before KiB | RSS with 10,000 idle connections KiB | bytes per connection |",
                  "| --- | ---: | ---: | ---: |"]
        for n, v in results["idle"].items():
            lines.append(f"| {n} | {v['rss_before_kib']} | {v['rss_after_kib']} | {v['bytes_per_connection']:.0f} |")
    lines += ["", "Exact commands (server side: `taskset -c 0`):", ""]
    for c in results["closed"][:1] + results["open"][:1]:
        for n, cmd in c["commands"].items():
            lines.append(f"- {c['label']}, {n}: `{cmd}`")
    lines += ["", "Raw runs: `bench/results/echo-latest.json`.", ""]
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build", default=os.path.join(ROOT, "build"))
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--port", type=int, default=9100)
    p.add_argument("--no-idle", action="store_true", help="skip the 10,000 idle connections")
    p.add_argument("--quick", action="store_true", help="fewer cases (100 connections only)")
    p.add_argument("--render-only", action="store_true")
    p.add_argument("--markdown", default=os.path.join(ROOT, "BENCHMARKS.md"))
    p.add_argument("--out", default=os.path.join(HERE, "results", "echo-latest.json"))
    args = p.parse_args()
    if args.render_only:
        with open(args.out) as f:
            write_section(args.markdown, "net", render(json.load(f)))
        return
    args.echo_load = os.path.join(args.build, "bench", "echo-load")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # 10,000 connections, both ends
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(65536, hard)), hard))
    specs = servers(args.build)
    closed_cases = [c for c in CLOSED_CASES if not args.quick or c[0] == 100]
    open_cases = [c for c in OPEN_CASES if not args.quick or c[0] == 100]
    results = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "arguments": " ".join(sys.argv[1:]), "machine": machine(), "servers": list(specs),
               "closed": [], "open": []}
    for conns, depth, size in closed_cases:
        label = f"{conns} conn x {depth}, {size} B"
        results["closed"].append(measure_case(args, specs, label, conns, depth, size))
    for conns, size in open_cases:
        base = next((c for c in results["closed"] if c["connections"] == conns and c["depth"] == 1
                     and c["size"] == size), None)
        rate = base["medians"]["epoll"]["msgs_per_s"] / 2 if base else 20000
        label = f"{conns} conn, {size} B at {rate:.0f}/s"
        results["open"].append(measure_case(args, specs, label, conns, 1, size, rate))
    if not args.no_idle:
        results["idle"] = idle_memory(args, specs)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    write_section(args.markdown, "net", render(results))


if __name__ == "__main__":
    main()
