#!/usr/bin/env python3
"""scripts/soak's sampler and report. Standard library only.

  soak.py sample --pid PID --metrics URL --seconds S --every E --phase NAME
      one JSON line per sample: the proxy's VmRSS, VmHWM, threads, open file
      descriptors, and the number of series /metrics exposes
  soak.py report RESULTS.jsonl
      the markdown report, with the verdict
"""

import argparse
import json
import os
import statistics
import sys
import time
import urllib.request

# RSS may grow by this much between the second and the last quarter of the
# run before the run reads "growing": the bounded structures fill in the
# first minutes, and the allocator keeps some slack.
GROWTH_FRACTION = 0.10
GROWTH_FLOOR_KB = 4 * 1024


def status(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "Threads"):
                out[k] = int(v.split()[0])
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


def series(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    return sum(1 for line in text.splitlines() if line and not line.startswith("#"))


def sample(a):
    start = time.monotonic()
    deadline = start + a.seconds
    while True:
        now = time.monotonic()
        try:
            st = status(a.pid)
        except OSError:
            print(json.dumps({"kind": "sample", "phase": a.phase, "t": round(now - start, 1),
                              "gone": True}), flush=True)
            return 1
        print(json.dumps({
            "kind": "sample", "phase": a.phase, "t": round(now - start, 1),
            "rss_kb": st["VmRSS"], "hwm_kb": st["VmHWM"], "threads": st["Threads"],
            "fds": st["fds"], "series": series(a.metrics),
        }), flush=True)
        if now >= deadline:
            return 0
        time.sleep(min(a.every, max(0.0, deadline - time.monotonic())))


def mib(kb):
    return f"{kb / 1024:.1f}"


def report(a):
    rows = [json.loads(line) for line in open(a.results) if line.strip()]
    meta = next((r for r in rows if r["kind"] == "meta"), {})
    load = [r for r in rows if r["kind"] == "sample" and r["phase"] == "load" and not r.get("gone")]
    idle = [r for r in rows if r["kind"] == "sample" and r["phase"] == "idle"]
    after = [r for r in rows if r["kind"] == "sample" and r["phase"] == "after"]
    wrk = next((r for r in rows if r["kind"] == "wrk"), None)
    abort = next((r for r in rows if r["kind"] == "abort"), None)
    final = next((r for r in rows if r["kind"] == "final"), {})
    out = []
    w = out.append
    w("# llm-proxy soak run")
    w("")
    w(f"{meta.get('date', '?')}, commit {meta.get('commit', '?')}, {meta.get('nproc', '?')} CPUs, "
      f"{meta.get('minutes', '?')} min of load at {meta.get('connections', '?')} connections "
      f"plus one client that leaves early; load average at start {meta.get('loadavg', '?')}.")
    w("")
    if not load:
        w("No samples under load: the run failed.")
        print("\n".join(out))
        return 1
    w("| phase | t (s) | RSS MiB | peak RSS MiB | threads | open fds | /metrics series |")
    w("| --- | --- | --- | --- | --- | --- | --- |")
    step = max(1, len(load) // 20)
    shown = idle[-1:] + load[::step] + ([load[-1]] if (len(load) - 1) % step else []) + after[-1:]
    for r in shown:
        w(f"| {r['phase']} | {r['t']} | {mib(r['rss_kb'])} | {mib(r['hwm_kb'])} | {r['threads']} | "
          f"{r['fds']} | {r['series'] if r['series'] is not None else '?'} |")
    w("")
    if wrk:
        errs = {k[4:]: v for k, v in wrk.items() if k.startswith("err_") and v}
        w(f"wrk: {wrk['requests']:,} requests, {wrk['rps']:,.0f} req/s; non-2xx and errors: "
          f"{json.dumps(errs) if errs else 'none'} (the limited key's 429s and the malformed "
          "bodies' 400s count here).")
    if abort:
        w(f"Clients that left early: {json.dumps({k: v for k, v in abort.items() if k != 'kind'})}.")
    w("")
    n = len(load)
    q2 = [r["rss_kb"] for r in load[n // 4: n // 2]] or [load[0]["rss_kb"]]
    q4 = [r["rss_kb"] for r in load[3 * n // 4:]] or [load[-1]["rss_kb"]]
    m2, m4 = statistics.median(q2), statistics.median(q4)
    growth = m4 - m2
    flat = growth <= max(GROWTH_FRACTION * m2, GROWTH_FLOOR_KB)
    series_load = [r["series"] for r in load if r["series"] is not None]
    series_flat = not series_load or series_load[-1] <= series_load[len(series_load) // 2] + 8
    alive = final.get("status") == 200
    w("| check | measured | verdict |")
    w("| --- | --- | --- |")
    w(f"| RSS, median of the last quarter − of the second quarter | {growth / 1024:+.1f} MiB "
      f"({mib(m2)} → {mib(m4)}) | {'flat' if flat else '**growing**'} (allowed: "
      f"{int(GROWTH_FRACTION * 100)}% or {GROWTH_FLOOR_KB // 1024} MiB) |")
    if series_load:
        w(f"| /metrics series, half-way → end | {series_load[len(series_load) // 2]} → "
          f"{series_load[-1]} | {'bounded' if series_flat else '**growing**'} |")
    if idle and after:
        w(f"| open fds: idle before → after the load | {idle[-1]['fds']} → {after[-1]['fds']} | "
          "reported (idle upstream connections may stay pooled) |")
    w(f"| a request after the run | status {final.get('status', '?')} | "
      f"{'answered' if alive else '**failed**'} |")
    print("\n".join(out))
    return 0 if flat and series_flat and alive else 1


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sample")
    s.add_argument("--pid", type=int, required=True)
    s.add_argument("--metrics", required=True)
    s.add_argument("--seconds", type=float, required=True)
    s.add_argument("--every", type=float, default=10)
    s.add_argument("--phase", required=True)
    r = sub.add_parser("report")
    r.add_argument("results")
    a = p.parse_args()
    return sample(a) if a.cmd == "sample" else report(a)


if __name__ == "__main__":
    sys.exit(main())
