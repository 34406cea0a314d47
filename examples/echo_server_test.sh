#!/usr/bin/env bash
# Starts the echo server example on a port the kernel picks, echoes 1 MB
# through it with a Python client, then stops it with SIGTERM.
set -euo pipefail
server=$1
coproc SERVER { exec "$server" 0 1; }
# Kept now: bash unsets SERVER_PID as soon as it reaps the coprocess, which
# may happen between the kill and the wait below.
server_pid=$SERVER_PID
read -r -t 30 line <&"${SERVER[0]}" || { echo "the server did not start"; exit 1; }
echo "$line"
port=${line#listening on port }
port=${port%% *}
python3 - "$port" <<'PY'
import os, socket, sys
data = os.urandom(1 << 20)
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=30)
s.sendall(data)
s.shutdown(socket.SHUT_WR)
back = bytearray()
while chunk := s.recv(65536):
    back += chunk
assert bytes(back) == data, f"echoed {len(back)} bytes, different"
print(f"echoed {len(back)} bytes")
PY
kill -TERM "$server_pid"
wait "$server_pid"
