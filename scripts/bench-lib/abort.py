#!/usr/bin/env python3
"""Clients that leave early, for scripts/soak: until --seconds have passed,
one after another on new connections,

  stream   a streamed chat completion on a slow upstream's model, closed
           (half the time with a reset) as soon as the first event arrives:
           the proxy must cancel the upstream request and free its state;
  head     half a request head, then a close;
  body     a head announcing a body, half of it, then a close.

Prints one JSON line of counts at the end. Standard library only.
"""

import argparse
import json
import socket
import struct
import sys
import time


def connect(addr):
    host, port = addr.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def close(s, reset):
    if reset:
        # SO_LINGER 0: the close sends a RST instead of a FIN.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def send_and_leave(addr, i, data, wait_for_event):
    """Send `data` on a new connection, read up to the first event if asked,
    then close (every other time with a reset)."""
    s = connect(addr)
    try:
        s.sendall(data)
        seen = b""
        while wait_for_event and b"data:" not in seen:
            chunk = s.recv(4096)
            if not chunk:
                return "closed_early"
            seen += chunk
            if len(seen) > 1 << 16:
                return "no_event"
        return "ok"
    finally:
        close(s, reset=i % 2 == 0)


def stream(addr, key, model, i):
    body = json.dumps({
        "model": model,
        "stream": True,
        "messages": [{"role": "user", "content": f"abort {i}"}],
    }).encode()
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: soak\r\n"
        f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    return send_and_leave(addr, i, head + body, wait_for_event=True)


def half_head(addr, _key, _model, i):
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: soak\r\nContent-Le"
    return send_and_leave(addr, i, head, wait_for_event=False)


def half_body(addr, key, _model, i):
    data = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: soak\r\n"
        f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
        "Content-Length: 1000\r\n\r\n" + '{"model":"soak","messages":['
    ).encode()
    return send_and_leave(addr, i, data, wait_for_event=False)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--addr", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--seconds", type=float, required=True)
    a = p.parse_args()
    kinds = [("stream", stream), ("stream", stream), ("head", half_head), ("body", half_body)]
    counts = {}
    deadline = time.monotonic() + a.seconds
    i = 0
    while time.monotonic() < deadline:
        name, fn = kinds[i % len(kinds)]
        try:
            result = fn(a.addr, a.key, a.model, i)
        except OSError as e:
            result = type(e).__name__
        counts[f"{name}_{result}"] = counts.get(f"{name}_{result}", 0) + 1
        i += 1
        time.sleep(0.005)
    print(json.dumps({"kind": "abort", **counts}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
