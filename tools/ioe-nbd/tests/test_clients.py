#!/usr/bin/env python3
"""ioe-nbd with clients nobody here wrote: qemu-io pattern writes and reads
(plain, aio, flush, discard, zeroes, FUA), qemu-img convert of a sparse
image onto the export and back with qemu-img map over NBD, nbdinfo --list
and --map, nbdcopy; several clients at once; a client killed mid-transfer;
the server stopped with clients connected. Every byte is compared with the
file itself; descriptors return to their count before the clients.

usage: test_clients.py IOE_NBD_BINARY [extra ioe-nbd options...]"""
import hashlib
import json
import os
import signal
import subprocess
import sys

from nbdtest import *  # noqa: F401,F403

MiB = 1 << 20


def run(*cmd, timeout=120):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout}{out.stderr}")
    return out.stdout


def qemu_io(uri, *commands):
    args = ["qemu-io", "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    out = run(*args, uri)
    # qemu-io reports a pattern mismatch on stdout and still exits 0.
    assert "Pattern verification failed" not in out and "error" not in out.lower(), out
    return out


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def qemu_io_patterns(srv, path):
    uri = f"{srv.uri}/disk0"
    sizes = [512, 4096, 4095, 65536, 1 * MiB + 512, 3 * MiB]
    commands = []
    for i, n in enumerate(sizes):
        off = i * 4 * MiB + (i * 977) % 4096
        commands += [f"write -P {0x10 + i} {off} {n}", f"read -P {0x10 + i} {off} {n}"]
    commands += [f"aio_write -P 0x61 {40 * MiB} 64k", f"aio_write -P 0x62 {41 * MiB} 128k", "aio_flush",
                 f"aio_read -P 0x61 {40 * MiB} 64k", f"aio_read -P 0x62 {41 * MiB} 128k", "aio_flush", "flush",
                 f"discard {40 * MiB} 64k", f"write -z {41 * MiB} 128k", f"read -P 0 {41 * MiB} 128k",
                 f"write -f -P 0x77 {42 * MiB} 4k", f"read -P 0x77 {42 * MiB} 4k"]
    qemu_io(uri, *commands)
    with open(path, "rb") as f:
        for i, n in enumerate(sizes):
            off = i * 4 * MiB + (i * 977) % 4096
            f.seek(off)
            assert f.read(n) == bytes([0x10 + i]) * n, f"write {i} not in the file"
        f.seek(41 * MiB)
        assert f.read(128 * 1024) == b"\0" * (128 * 1024)
        f.seek(42 * MiB)
        assert f.read(4096) == b"\x77" * 4096
    # The FUA write was written back before its reply.
    left = unwritten_pages(path, 42 * MiB, 4096)
    assert left in (None, 0), f"{left} pages of a FUA write still dirty"
    print("qemu-io patterns: ok")


def images(srv, path):
    uri = f"{srv.uri}/disk0"
    size = os.path.getsize(path)
    src = temp_image(size, [(5 * MiB, 3 * MiB), (45 * MiB, 65536), (60 * MiB + 4096, 8192)])
    back = src + ".back"
    copy = src + ".copy"
    try:
        run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, uri)
        assert sha(path) == sha(src), "the export differs from the image copied onto it"
        layout = json.loads(run("qemu-img", "map", "-f", "raw", "--output=json", uri))
        data = [(e["start"], e["length"]) for e in layout if e["data"]]
        assert data and all(e["zero"] for e in layout if not e["data"]), layout
        covered = sum(length for _, length in data)
        assert 3 * MiB + 65536 + 8192 <= covered < size // 4, f"qemu-img map sees holes: {layout}"
        run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, back)
        assert sha(back) == sha(src)
        listing = run("nbdinfo", "--list", srv.uri)
        assert 'export="disk0"' in listing and "base:allocation" in listing, listing
        extents = run("nbdinfo", "--map", uri)
        assert "hole,zero" in extents and "data" in extents, extents
        run("nbdcopy", uri, copy)
        assert sha(copy) == sha(src)
        print("qemu-img convert/map, nbdinfo --list/--map, nbdcopy: ok")
    finally:
        for p in (src, back, copy):
            if os.path.exists(p):
                os.unlink(p)


def concurrent(srv, path):
    """Eight clients at once, each writing and checking its own region."""
    uri = f"{srv.uri}/disk0"
    procs = []
    for i in range(8):
        off = i * 2 * MiB
        args = ["qemu-io", "-f", "raw", "-c", f"write -P {0x30 + i} {off} 1M", "-c", f"aio_write -P {0x40 + i} "
                f"{off + MiB} 512k", "-c", "aio_flush", "-c", f"read -P {0x30 + i} {off} 1M", "-c",
                f"read -P {0x40 + i} {off + MiB} 512k", uri]
        procs.append(subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        out = p.communicate(timeout=120)[0]
        assert p.returncode == 0 and "Pattern verification failed" not in out, out
    with open(path, "rb") as f:
        for i in range(8):
            f.seek(i * 2 * MiB)
            assert f.read(MiB) == bytes([0x30 + i]) * MiB
            assert f.read(512 * 1024) == bytes([0x40 + i]) * (512 * 1024)
    print("eight concurrent clients: ok")


def killed_client(srv, path):
    """A client killed while copying: only its connection goes."""
    uri = f"{srv.uri}/disk0"
    # The earlier clients have exited, but the server may still be closing
    # their connections: a baseline taken now could count one that goes
    # later (seen on epoll), so wait for none.
    wait_until(lambda: srv.conns() == 0, "the earlier clients' connections closed")
    before = 0
    dst = temp_image(0)
    os.unlink(dst)
    p = subprocess.Popen(["nbdcopy", "--connections=4", uri, dst], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    wait_until(lambda: srv.conns() > before or p.poll() is not None, "nbdcopy connected")
    p.send_signal(signal.SIGKILL)
    p.wait()
    if os.path.exists(dst):
        os.unlink(dst)
    wait_until(lambda: srv.conns() == before, "the killed client's connections closed")
    qemu_io(f"{srv.uri}/disk0", "write -P 0x5a 0 64k", "read -P 0x5a 0 64k")
    print("client killed mid-transfer: ok")


def stop_with_clients(binary, extra):
    """SIGTERM with clients connected and requests in flight: every reply
    that comes is right (data or NBD_ESHUTDOWN, each request at most once),
    then the connections close and the server exits with status 0."""
    size = 64 * MiB
    path = temp_image(size, [(0, MiB)])
    srv = Server(binary, path, "-x", "disk0", *extra)
    clients = []
    try:
        for _ in range(3):
            c = Client(srv.port)
            c.go(b"disk0")
            clients.append(c)
        cookies = [[c.request(CMD_READ, i * 4096, 4096) for i in range(64)] for c in clients]
        waiting = Client(srv.port)  # still in the handshake
        rc, log = srv.stop()
        assert rc == 0, log
        with open(path, "rb") as f:
            want = f.read(MiB)
        for c, sent in zip(clients, cookies):
            answered = set()
            try:
                while True:
                    cookie, err, data, _ = c.reply(read_len=4096)
                    assert cookie in sent and cookie not in answered and err in (0, ESHUTDOWN), (cookie, err)
                    if err == 0:
                        i = sent.index(cookie)
                        assert data == want[i * 4096:(i + 1) * 4096]
                    answered.add(cookie)
            except (EOFError, ConnectionResetError):
                pass
            # Requests the server had read when the stop began are answered
            # (data or NBD_ESHUTDOWN); those still on their way when it
            # closed the connection are not: the protocol's hard disconnect.
            assert answered <= set(sent)
        assert waiting.closed()
        print("stop with clients connected: ok")
    finally:
        if srv.alive():
            srv.proc.kill()
        os.unlink(path)


def unix_socket(binary, extra):
    """-k PATH: served on a Unix socket, the file gone after the stop."""
    import tempfile
    path = temp_image(8 * MiB)
    sock_dir = tempfile.mkdtemp(prefix="ioe-nbd-sock-")
    sock = os.path.join(sock_dir, "nbd.sock")
    srv = Server(binary, path, "-x", "disk0", *extra, unix=sock)
    try:
        uri = f"nbd+unix:///disk0?socket={sock}"
        qemu_io(uri, "write -P 0x4b 4096 64k", "read -P 0x4b 4096 64k")
        assert 'export="disk0"' in run("nbdinfo", "--list", f"nbd+unix://?socket={sock}")
        with open(path, "rb") as f:
            f.seek(4096)
            assert f.read(65536) == b"\x4b" * 65536
    finally:
        rc, log = srv.stop()
        os.unlink(path)
    assert rc == 0, log
    assert not os.path.exists(sock), "the socket file outlived the server"
    os.rmdir(sock_dir)
    print("unix socket: ok")


def main():
    need("qemu-io", "qemu-img", "nbdinfo", "nbdcopy")
    binary, extra = sys.argv[1], sys.argv[2:]
    path = temp_image(64 * MiB)
    srv = Server(binary, path, "-x", "disk0", "--loops=2", *extra)
    try:
        # Sessions on every loop first (see test_protocol.py), then the baseline.
        for _ in range(4):
            qemu_io(f"{srv.uri}/disk0", "read 0 512")
        wait_until(lambda: srv.conns() == 0, "the first sessions closed")
        baseline = srv.fds()
        qemu_io_patterns(srv, path)
        images(srv, path)
        concurrent(srv, path)
        killed_client(srv, path)
        # At most the baseline: it may have caught a loop's half-close watch
        # set that the loop closes a moment later.
        wait_until(lambda: srv.fds() <= baseline, f"descriptors back to {baseline}")
        assert srv.alive()
    finally:
        rc, log = srv.stop()
        os.unlink(path)
    assert rc == 0, log
    stop_with_clients(binary, extra)
    unix_socket(binary, extra)
    print("clients: ok")


if __name__ == "__main__":
    main()
