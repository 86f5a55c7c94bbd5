#!/usr/bin/env python3
"""Time to first streamed token, for scripts/bench and scripts/bench-translate
(python3 stdlib only).

    ttft.py --requests 200 --warmup 10 [--dialect chat|messages|responses] \
        NAME=HOST:PORT[@MODEL] [NAME=HOST:PORT[@MODEL] ...]
    ttft.py --whole [--max-tokens N] ... NAME=HOST:PORT[@MODEL][#DIALECT] ...
        (DIALECT: chat, messages, responses, or plain: non-streamed chat)

Sends sequential streamed requests of one API dialect (default `chat`:
`POST /v1/chat/completions`; `messages`: Anthropic's `POST /v1/messages`;
`responses`: `POST /v1/responses`) with the target's model (default `bench`)
over one keep-alive connection per target (TCP_NODELAY, raw socket, no
buffering: every recv() is timestamped as it returns, before any parsing),
interleaving the targets request by request so that noise hits them alike.
Per request it records, from just before the request is written:

  first_data   the first `data:` event (the mock sends the stream's opening
               events at once: chat's role chunk, `message_start`,
               `response.created`)
  first_token  the first event carrying non-empty text: chat, a chunk whose
               `delta.content` is non-empty; messages, a `content_block_delta`
               with non-empty `delta.text`; responses, a
               `response.output_text.delta` with non-empty `delta` (the mock
               sends it one token interval later, e.g. 20 ms at 50 tokens/s)

and prints one JSON object: per target the sample medians/percentiles in µs.

With --whole it records instead, per request, `whole`: the time to the
response's last byte (nothing is parsed but the HTTP framing, so that a
stream cut into more reads costs the client as little as possible). A
target may then name its own dialect (`NAME=HOST:PORT@MODEL#DIALECT`), so
that streams of several dialects interleave request by request too.
"""

import argparse
import json
import socket
import sys
import time

PROMPT = "Stream a short greeting."
DIALECTS = ("chat", "messages", "responses")
# With --whole only: `plain`, a non-streamed chat completion (scripts/bench's
# request: bench-lib/chat.lua).
WHOLE_ONLY = ("plain",)


def request_bytes(host, dialect, model, max_tokens=2):
    extra = ""
    if dialect == "plain":
        path = "/v1/chat/completions"
        body = {
            "model": model,
            "messages": [{"role": "user", "content": "Say hello to the benchmark."}],
            "max_tokens": 16,
        }
    elif dialect == "chat":
        path = "/v1/chat/completions"
        body = {
            "model": model,
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": max_tokens,
            "stream": True,
        }
    elif dialect == "messages":
        path = "/v1/messages"
        extra = "anthropic-version: 2023-06-01\r\n"
        body = {
            "model": model,
            "max_tokens": max_tokens,
            "stream": True,
            "messages": [{"role": "user", "content": PROMPT}],
        }
    else:
        path = "/v1/responses"
        body = {
            "model": model,
            "input": PROMPT,
            "max_output_tokens": max_tokens,
            "stream": True,
        }
    body = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\n"
        f"Host: {host}\r\n"
        "Content-Type: application/json\r\n"
        f"Accept: {'application/json' if dialect == 'plain' else 'text/event-stream'}\r\n"
        f"{extra}"
        f"Content-Length: {len(body)}\r\n"
        "\r\n"
    )
    return head.encode() + body


def event_data(event):
    """The JSON of one SSE event's `data:` lines; None when it has none or
    it is not JSON (`[DONE]`)."""
    lines = [line[5:].strip() for line in event.replace(b"\r", b"").split(b"\n")
             if line.startswith(b"data:")]
    if not lines:
        return None
    try:
        return json.loads(b"\n".join(lines))
    except ValueError:
        return None


def is_token(dialect, data):
    """Does this event's data carry the first text?"""
    if not isinstance(data, dict):
        return False
    if dialect == "chat":
        try:
            return bool(data["choices"][0].get("delta", {}).get("content"))
        except (KeyError, IndexError, TypeError, AttributeError):
            return False
    if dialect == "messages":
        delta = data.get("delta")
        return (data.get("type") == "content_block_delta" and isinstance(delta, dict)
                and bool(delta.get("text")))
    return data.get("type") == "response.output_text.delta" and bool(data.get("delta"))


class Target:
    def __init__(self, name, addr, model, dialect, timeout, whole=False, max_tokens=2):
        self.name = name
        self.dialect = dialect
        self.whole = whole
        self.last_byte = []
        host, port = addr.rsplit(":", 1)
        self.addr = (host, int(port))
        self.request = request_bytes(addr, dialect, model, max_tokens)
        self.timeout = timeout
        self.sock = None
        self.first_data = []
        self.first_token = []
        self.errors = 0
        self.connects = 0

    def connect(self):
        sock = socket.create_connection(self.addr, timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.connects += 1

    def close(self):
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None

    def one(self):
        """One streamed request; returns (first_data_ns, first_token_ns), or
        with `whole` (last_byte_ns, last_byte_ns)."""
        if self.sock is None:
            self.connect()
        sock = self.sock
        t0 = time.perf_counter_ns()
        sock.sendall(self.request)
        raw = b""          # undecoded bytes
        head = None        # parsed once complete
        chunked = False
        remaining = None   # content-length left, when not chunked
        body = b""         # decoded body not yet split into events
        t_data = t_token = None
        finished = False
        keep_alive = True
        while not finished:
            data = sock.recv(65536)
            now = time.perf_counter_ns()
            if not data:
                keep_alive = False
                if head is not None and not chunked and remaining is None:
                    break  # body delimited by close
                raise ConnectionError("connection closed mid-response")
            raw += data
            if head is None:
                end = raw.find(b"\r\n\r\n")
                if end < 0:
                    continue
                head, raw = raw[:end].decode("latin-1"), raw[end + 4:]
                lines = head.split("\r\n")
                status = lines[0].split(" ", 2)
                if len(status) < 2 or status[1] != "200":
                    raise ConnectionError(f"status line {lines[0]!r}")
                headers = {}
                for line in lines[1:]:
                    k, _, v = line.partition(":")
                    headers[k.strip().lower()] = v.strip().lower()
                chunked = "chunked" in headers.get("transfer-encoding", "")
                if "content-length" in headers and not chunked:
                    remaining = int(headers["content-length"])
                if headers.get("connection") == "close":
                    keep_alive = False
            # Decode what we have.
            if chunked:
                while True:
                    nl = raw.find(b"\r\n")
                    if nl < 0:
                        break
                    size = int(raw[:nl].split(b";")[0], 16)
                    if size == 0:
                        # Last chunk "0\r\n\r\n" (no trailers expected).
                        if len(raw) >= nl + 4:
                            finished = True
                            raw = b""
                        break
                    if len(raw) < nl + 2 + size + 2:
                        break
                    if not self.whole:
                        body += raw[nl + 2:nl + 2 + size]
                    raw = raw[nl + 2 + size + 2:]
            else:
                if not self.whole:
                    body += raw
                if remaining is not None:
                    remaining -= len(raw)
                    finished = remaining <= 0
                raw = b""
            if self.whole:
                t_data = t_token = now
                continue
            if t_data is None and b"data:" in body:
                t_data = now
            if t_token is None:
                body = body.replace(b"\r\n", b"\n")
                while b"\n\n" in body:
                    event, body = body.split(b"\n\n", 1)
                    if is_token(self.dialect, event_data(event)):
                        t_token = now
                        break
            else:
                body = b""
        if not keep_alive:
            self.close()
        if t_data is None or t_token is None:
            raise ConnectionError("stream ended without a data event / token")
        return t_data - t0, t_token - t0


def percentile(values, p):
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--timeout", type=float, default=10.0, help="per socket operation, s")
    ap.add_argument("--max-seconds", type=float, default=300.0, help="overall bound")
    ap.add_argument("--max-errors", type=int, default=10)
    ap.add_argument("--round", type=int, help="print JSON lines for scripts/bench, tagged with this round")
    ap.add_argument("--dialect", choices=DIALECTS, default="chat",
                    help="API of the requests (default chat)")
    ap.add_argument("--max-tokens", type=int, default=2,
                    help="the streamed requests' max_tokens / max_output_tokens (default 2; "
                    "`plain` asks for 16, as scripts/bench's wrk request does)")
    ap.add_argument("--whole", action="store_true",
                    help="record the time to the last byte instead (see above)")
    ap.add_argument("targets", nargs="+", help="NAME=HOST:PORT or NAME=HOST:PORT@MODEL "
                    "(model default: bench), with --whole also ...#DIALECT")
    args = ap.parse_args()
    if args.max_tokens < 1:
        ap.error("--max-tokens must be at least 1")
    targets = []
    for spec in args.targets:
        name, _, addr = spec.partition("=")
        addr, _, dialect = addr.partition("#")
        addr, _, model = addr.partition("@")
        if not name or ":" not in addr:
            ap.error(f"target {spec!r} is not NAME=HOST:PORT[@MODEL][#DIALECT]")
        if dialect and (not args.whole or dialect not in DIALECTS + WHOLE_ONLY):
            ap.error(f"target {spec!r}: a dialect of its own needs --whole and one of "
                     f"{DIALECTS + WHOLE_ONLY}")
        targets.append(Target(name, addr, model or "bench", dialect or args.dialect, args.timeout,
                              args.whole, args.max_tokens))
    deadline = time.monotonic() + args.max_seconds
    total = args.warmup + args.requests
    for i in range(total):
        if time.monotonic() > deadline:
            print(f"ttft: stopped at the {args.max_seconds} s bound after {i} requests per target",
                  file=sys.stderr)
            break
        # Rotate the order each iteration so that no target always goes first.
        for j in range(len(targets)):
            t = targets[(i + j) % len(targets)]
            try:
                d, k = t.one()
            except (OSError, ValueError) as e:
                t.errors += 1
                t.close()
                print(f"ttft: {t.name}: {e}", file=sys.stderr)
                if t.errors > args.max_errors:
                    sys.exit(f"ttft: too many errors on {t.name}")
                continue
            if i >= args.warmup:
                if t.whole:
                    t.last_byte.append(d / 1000.0)
                else:
                    t.first_data.append(d / 1000.0)
                    t.first_token.append(k / 1000.0)
    out = {}
    for t in targets:
        if t.whole:
            out[t.name] = {
                "dialect": t.dialect,
                "n": len(t.last_byte),
                "errors": t.errors,
                "connects": t.connects,
                "whole_p50_us": percentile(t.last_byte, 50),
                "whole_p90_us": percentile(t.last_byte, 90),
                "whole_p99_us": percentile(t.last_byte, 99),
            }
            t.close()
            continue
        out[t.name] = {
            "n": len(t.first_token),
            "errors": t.errors,
            "connects": t.connects,
            "first_data_p50_us": percentile(t.first_data, 50),
            "first_data_p99_us": percentile(t.first_data, 99),
            "first_token_p50_us": percentile(t.first_token, 50),
            "first_token_p90_us": percentile(t.first_token, 90),
            "first_token_p99_us": percentile(t.first_token, 99),
        }
        t.close()
    if args.round is None:
        print(json.dumps(out))
    else:
        kind = "whole" if args.whole else "ttft"
        for name, stats in out.items():
            print(json.dumps({"kind": kind, "round": args.round, "target": name, **stats}))


if __name__ == "__main__":
    main()
