#!/usr/bin/env python3
"""Turns the JSON lines that scripts/bench-translate collected into markdown.

    translate_report.py RESULTS.jsonl > translate.md

Per dialect and target, every figure is the median over rounds with the
spread (min–max) of the rounds. The difference translated − native is taken
within each round (the two are measured interleaved, request by request) and
then its median over rounds is compared with the target.
"""

import statistics
import sys

from rounds import load, med

DIALECTS = [("messages", "Messages (`POST /v1/messages`)"),
            ("responses", "Responses (`POST /v1/responses`)")]
TARGETS = [("native", "llm-proxy, native"),
           ("translated", "llm-proxy, translated over chat"),
           ("direct", "mock directly (reference)")]


def fmt(values, scale=1000.0, spec=".2f", sign=False):
    """'median (min–max)' in ms, or just the value for one round."""
    if not values:
        return "n/a"
    s = "+" if sign else ""
    v = [x / scale for x in values]
    m = statistics.median(v)
    if len(v) == 1:
        return f"{m:{s}{spec}}"
    return f"{m:{s}{spec}} ({min(v):{s}{spec}} – {max(v):{s}{spec}})"


def main():
    records = load(sys.argv[1])
    meta = next((r for r in records if r.get("kind") == "meta"), {})
    end = next((r for r in records if r.get("kind") == "end"), {})
    rounds = {}  # (dialect, round) -> {target: record}
    for r in records:
        if r.get("kind") == "ttft":
            rounds.setdefault((r["dialect"], r["round"]), {})[r["target"]] = r
    target_us = meta.get("target_us", 500)
    out = []
    w = out.append

    w("# Translation: time to first token")
    w("")
    w(f"{meta.get('date', '?')}, commit {meta.get('commit', '?')}; {meta.get('cpu', '?')}, "
      f"{meta.get('nproc', '?')} CPUs, kernel {meta.get('kernel', '?')}.")
    w(f"Load average {meta.get('loadavg_start', '?')} at the start, {end.get('loadavg_end', '?')} "
      f"at the end; rustc/cargo processes running: {meta.get('busy_start', '?')} at the start, "
      f"{end.get('busy_end', '?')} at the end.")
    w(f"{meta.get('rounds', '?')} round(s); per round, dialect and target "
      f"{meta.get('requests', '?')} streamed requests (after 10 warm-up), the three targets "
      f"interleaved request by request over keep-alive connections; mock at "
      f"{meta.get('tps', '?')} tokens/s, so the first token comes about "
      f"{1000 / float(meta.get('tps', 50)):.0f} ms after the stream opens.")
    w("")
    w("Figures in ms: median over rounds (min – max over rounds) of each round's percentile.")
    w("")
    verdicts = []
    for dialect, title in DIALECTS:
        rs = [v for (d, _), v in sorted(rounds.items()) if d == dialect]
        if not rs:
            continue
        w(f"## {title}")
        w("")
        w("| target | first event p50 | first token p50 | first token p90 | first token p99 | errors |")
        w("|---|---:|---:|---:|---:|---:|")
        for t, label in TARGETS:
            rows = [r[t] for r in rs if t in r]
            if not rows:
                continue
            def col(key):
                return fmt([x[key] for x in rows if x.get(key) is not None])
            w(f"| {label} | {col('first_data_p50_us')} | {col('first_token_p50_us')} | "
              f"{col('first_token_p90_us')} | {col('first_token_p99_us')} | "
              f"{sum(x['errors'] for x in rows)} |")
        w("")
        diffs = [r["translated"]["first_token_p50_us"] - r["native"]["first_token_p50_us"]
                 for r in rs if "translated" in r and "native" in r]
        diffs99 = [r["translated"]["first_token_p99_us"] - r["native"]["first_token_p99_us"]
                   for r in rs if "translated" in r and "native" in r]
        over = [r["native"]["first_token_p50_us"] - r["direct"]["first_token_p50_us"]
                for r in rs if "native" in r and "direct" in r]
        m = med(diffs)
        ok = m is not None and m <= target_us
        verdicts.append((title, diffs, ok))
        w(f"- translated − native, first token p50: **{fmt(diffs, sign=True, spec='.3f')} ms** "
          f"(target ≤ {target_us / 1000:.1f} ms: {'met' if ok else 'NOT met'})")
        w(f"- translated − native, first token p99: {fmt(diffs99, sign=True, spec='.3f')} ms")
        w(f"- native through llm-proxy − mock directly, first token p50: "
          f"{fmt(over, sign=True, spec='.3f')} ms")
        w("")
    w("## Verdict")
    w("")
    for title, diffs, ok in verdicts:
        w(f"- {title.split(' ')[0]}: translated − native first-token p50 "
          f"{fmt(diffs, sign=True, spec='.3f')} ms → {'within' if ok else 'NOT within'} "
          f"{target_us / 1000:.1f} ms")
    print("\n".join(out))


if __name__ == "__main__":
    main()
