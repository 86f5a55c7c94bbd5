#!/usr/bin/env python3
"""Turns the JSON lines that scripts/bench collected into a markdown report.

    report.py RESULTS.jsonl > latest.md

Every figure is the median over rounds, with the spread (min–max) of the
rounds. Ratios and differences are computed within each round (targets
measured minutes apart, alternating) and then their median is taken.
"""

import sys

from rounds import by_round, fmt, load, med, series

# "hyper-floor" only with scripts/bench --floor, "llm-proxy-pgo" with --pgo,
# "hyper-floor-pgo" with both.
ALL_TARGETS = ["direct", "nginx", "llm-proxy", "llm-proxy-pgo", "hyper-floor", "hyper-floor-pgo"]


def mib(kb):
    return kb / 1024.0


def main():
    records = load(sys.argv[1])
    meta = next((r for r in records if r.get("kind") == "meta"), {})
    rss = next((r for r in records if r.get("kind") == "rss"), {})
    tput = by_round(records, "kind", "tput")
    seen = {r.get("target") for r in records}
    targets = [t for t in ALL_TARGETS if t in seen]
    lat = by_round(records, "kind", "lat")
    ttft = by_round(records, "kind", "ttft")
    inter = by_round(records, "kind", "whole")
    out = []
    w = out.append

    w(f"# llm-proxy benchmark — {meta.get('date', '?')}")
    w("")
    w(f"- commit `{meta.get('commit', '?')}`; {meta.get('cpu', '?')}, {meta.get('nproc', '?')} cores "
      f"shared by load generator, proxy and upstream; kernel {meta.get('kernel', '?')}")
    w(f"- {meta.get('rounds', '?')} round(s) × {meta.get('duration', '?')} s per wrk run, targets "
      f"alternating (order rotated each round); {meta.get('wrk', 'wrk')}, {meta.get('nginx', 'nginx')} "
      f"with worker_processes {meta.get('nginx_workers', '?')}")
    w(f"- load average at start: {meta.get('loadavg', '?')}; other rustc/cargo processes at start: "
      f"{meta.get('busy', '?')}")
    w("- figures are medians over rounds with the (min–max) of the rounds; ratios and differences "
      "are taken within each round first")
    w("")

    # Throughput.
    w("## Throughput: 32 connections (`wrk -t2 -c32`), non-streamed chat completion")
    w("")
    w("| target | req/s | ÷ direct | wrk errors |")
    w("| --- | --- | --- | --- |")
    for t in targets:
        rps = series(tput, lambda r, t=t: r[t]["rps"])
        ratio = series(tput, lambda r, t=t: r[t]["rps"] / r["direct"]["rps"])
        errs = sum(sum(v for k, v in r[t].items() if k.startswith("err_"))
                   for r in tput.values() if t in r)
        w(f"| {t} | {fmt(rps, ',.0f')} | {fmt(ratio, '.2f') if t != 'direct' else '1'} | {errs} |")
    w("")

    # Latency.
    w("## Latency: 1 connection (`wrk -t1 -c1 --latency`), µs")
    w("")
    w("| target | p50 | p99 | added p50 vs direct | added p99 vs direct |")
    w("| --- | --- | --- | --- | --- |")
    for t in targets:
        p50 = series(lat, lambda r, t=t: r[t]["p50_us"])
        p99 = series(lat, lambda r, t=t: r[t]["p99_us"])
        a50 = series(lat, lambda r, t=t: r[t]["p50_us"] - r["direct"]["p50_us"])
        a99 = series(lat, lambda r, t=t: r[t]["p99_us"] - r["direct"]["p99_us"])
        if t == "direct":
            w(f"| {t} | {fmt(p50, '.0f')} | {fmt(p99, '.0f')} | – | – |")
        else:
            w(f"| {t} | {fmt(p50, '.0f')} | {fmt(p99, '.0f')} | {fmt(a50, '+.0f')} | {fmt(a99, '+.0f')} |")
    w("")

    # Latency, interleaved.
    if inter:
        n = med(series(inter, lambda r: r["direct"]["n"]))
        w(f"## Latency: 1 connection, targets interleaved request by request "
          f"({int(n) if n else '?'} requests per target per round), µs")
        w("")
        w("The same request, from one client (`scripts/bench-lib/ttft.py --whole`: time from writing "
          "the request to the answer's last byte) that sends to each target in turn: every target "
          "sees the same drift, and each request finds the proxy idle since its previous one.")
        w("")
        w("| target | p50 | p99 | added p50 vs direct | added p50 − nginx's |")
        w("| --- | --- | --- | --- | --- |")
        for t in targets:
            p50 = series(inter, lambda r, t=t: r[t]["whole_p50_us"])
            p99 = series(inter, lambda r, t=t: r[t]["whole_p99_us"])
            a50 = series(inter, lambda r, t=t: r[t]["whole_p50_us"] - r["direct"]["whole_p50_us"])
            an = series(inter, lambda r, t=t: r[t]["whole_p50_us"] - r["nginx"]["whole_p50_us"])
            if t == "direct":
                w(f"| {t} | {fmt(p50, '.0f')} | {fmt(p99, '.0f')} | – | – |")
            else:
                w(f"| {t} | {fmt(p50, '.0f')} | {fmt(p99, '.0f')} | {fmt(a50, '+.0f')} | "
                  f"{fmt(an, '+.0f') if t != 'nginx' else '–'} |")
        w("")

    # TTFT.
    n = med(series(ttft, lambda r: r["direct"]["n"]))
    w(f"## Time to first streamed token (mock at {meta.get('ttft_tps', '?')} tokens/s, "
      f"{int(n) if n else '?'} sequential requests per target per round, interleaved), µs")
    w("")
    w("The mock sends the role chunk at once and the first token one token interval later; "
      "\"first data\" is the role chunk, \"first token\" the first content delta.")
    w("")
    w("| target | first data p50 | first token p50 | first token p99 | Δ first token p50 vs direct |")
    w("| --- | --- | --- | --- | --- |")
    for t in targets:
        fd = series(ttft, lambda r, t=t: r[t]["first_data_p50_us"])
        ft = series(ttft, lambda r, t=t: r[t]["first_token_p50_us"])
        ft99 = series(ttft, lambda r, t=t: r[t]["first_token_p99_us"])
        d = series(ttft, lambda r, t=t: r[t]["first_token_p50_us"] - r["direct"]["first_token_p50_us"])
        w(f"| {t} | {fmt(fd, '.0f')} | {fmt(ft, '.0f')} | {fmt(ft99, '.0f')} | "
          f"{fmt(d, '+.0f') if t != 'direct' else '–'} |")
    w("")

    # RSS.
    w("## Memory (llm-proxy process, /proc/PID/status)")
    w("")
    w("| measure | MiB |")
    w("| --- | --- |")
    if rss:
        w(f"| llm-proxy idle after start (VmRSS) | {mib(rss['proxy_idle_kb']):.1f} |")
        w(f"| llm-proxy peak under 32-connection load (VmHWM) | {mib(rss['proxy_hwm_kb']):.1f} |")
        w(f"| llm-proxy after the run (VmRSS) | {mib(rss['proxy_after_kb']):.1f} |")
        if rss.get("nginx_hwm_kb"):
            w(f"| nginx master + workers, peak (sum of VmHWM) | {mib(rss['nginx_hwm_kb']):.1f} |")
    w("")

    # Headline and targets.
    r_pd = series(tput, lambda r: r["llm-proxy"]["rps"] / r["direct"]["rps"])
    r_nd = series(tput, lambda r: r["nginx"]["rps"] / r["direct"]["rps"])
    r_pn = series(tput, lambda r: r["llm-proxy"]["rps"] / r["nginx"]["rps"])
    a_p = series(lat, lambda r: r["llm-proxy"]["p50_us"] - r["direct"]["p50_us"])
    a_n = series(lat, lambda r: r["nginx"]["p50_us"] - r["direct"]["p50_us"])
    a_pn = series(lat, lambda r: (r["llm-proxy"]["p50_us"] - r["nginx"]["p50_us"]))
    d_tt = series(ttft, lambda r: r["llm-proxy"]["first_token_p50_us"] - r["direct"]["first_token_p50_us"])
    d_tn = series(ttft, lambda r: r["nginx"]["first_token_p50_us"] - r["direct"]["first_token_p50_us"])

    def verdict(ok, near=False):
        return "met" if ok else ("within 5% (not measurably slower)" if near else "**missed**")

    w("## Summary against the targets")
    w("")
    w("| measure | this run | target | verdict |")
    w("| --- | --- | --- | --- |")
    w(f"| throughput llm-proxy ÷ direct | {fmt(r_pd, '.2f')} | – | – |")
    w(f"| throughput nginx ÷ direct | {fmt(r_nd, '.2f')} | – | – |")
    if r_pn:
        m = med(r_pn)
        w(f"| throughput llm-proxy ÷ nginx | {fmt(r_pn, '.2f')} | ≥ 1 | {verdict(m >= 1.0, m >= 0.95)} |")
    if a_p and a_n and a_pn:
        w(f"| added p50 at 1 connection: llm-proxy / nginx | {med(a_p):+.0f} µs / {med(a_n):+.0f} µs "
          f"(llm-proxy − nginx: {fmt(a_pn, '+.0f', ' µs')}) | llm-proxy ≤ nginx | "
          f"{verdict(med(a_pn) <= 0)} |")
    i_pn = series(inter, lambda r: r["llm-proxy"]["whole_p50_us"] - r["nginx"]["whole_p50_us"])
    if i_pn:
        w(f"| added p50 at 1 connection, interleaved: llm-proxy − nginx | {fmt(i_pn, '+.0f', ' µs')} | "
          f"≤ 0 | {verdict(med(i_pn) <= 0)} |")
    if "llm-proxy-pgo" in targets:
        r_gn = series(tput, lambda r: r["llm-proxy-pgo"]["rps"] / r["nginx"]["rps"])
        r_gp = series(tput, lambda r: r["llm-proxy-pgo"]["rps"] / r["llm-proxy"]["rps"])
        a_g = series(lat, lambda r: r["llm-proxy-pgo"]["p50_us"] - r["direct"]["p50_us"])
        a_gn = series(lat, lambda r: r["llm-proxy-pgo"]["p50_us"] - r["nginx"]["p50_us"])
        if r_gn:
            m = med(r_gn)
            w(f"| throughput llm-proxy PGO build ÷ nginx | {fmt(r_gn, '.2f')} | ≥ 1 | "
              f"{verdict(m >= 1.0, m >= 0.95)} |")
        w(f"| throughput llm-proxy PGO build ÷ plain build | {fmt(r_gp, '.2f')} | – | – |")
        if a_g and a_gn:
            w(f"| added p50 at 1 connection: llm-proxy PGO build | {med(a_g):+.0f} µs "
              f"(− nginx: {fmt(a_gn, '+.0f', ' µs')}) | ≤ nginx | {verdict(med(a_gn) <= 0)} |")
        i_gn = series(inter, lambda r: r["llm-proxy-pgo"]["whole_p50_us"] - r["nginx"]["whole_p50_us"])
        if i_gn:
            w(f"| added p50 at 1 connection, interleaved: PGO build − nginx | {fmt(i_gn, '+.0f', ' µs')} | "
              f"≤ 0 | {verdict(med(i_gn) <= 0)} |")
    if "hyper-floor" in targets:
        r_fn = series(tput, lambda r: r["hyper-floor"]["rps"] / r["nginx"]["rps"])
        r_pf = series(tput, lambda r: r["llm-proxy"]["rps"] / r["hyper-floor"]["rps"])
        a_f = series(lat, lambda r: r["hyper-floor"]["p50_us"] - r["direct"]["p50_us"])
        w(f"| throughput hyper floor ÷ nginx (reference) | {fmt(r_fn, '.2f')} | – | – |")
        w(f"| throughput llm-proxy ÷ hyper floor | {fmt(r_pf, '.2f')} | – | – |")
        w(f"| added p50 at 1 connection: hyper floor (reference) | {fmt(a_f, '+.0f', ' µs')} | – | – |")
    if "hyper-floor-pgo" in targets and "llm-proxy-pgo" in targets:
        # Both built with PGO: what llm-proxy's own layers cost, the build alike.
        r_qn = series(tput, lambda r: r["hyper-floor-pgo"]["rps"] / r["nginx"]["rps"])
        r_gq = series(tput, lambda r: r["llm-proxy-pgo"]["rps"] / r["hyper-floor-pgo"]["rps"])
        i_qn = series(inter, lambda r: r["hyper-floor-pgo"]["whole_p50_us"] - r["nginx"]["whole_p50_us"])
        i_gq = series(inter, lambda r: r["llm-proxy-pgo"]["whole_p50_us"]
                      - r["hyper-floor-pgo"]["whole_p50_us"])
        w(f"| throughput hyper floor PGO build ÷ nginx (reference) | {fmt(r_qn, '.2f')} | – | – |")
        w(f"| throughput llm-proxy PGO ÷ hyper floor PGO | {fmt(r_gq, '.2f')} | – | – |")
        if i_qn and i_gq:
            w(f"| added p50 at 1 connection, interleaved: hyper floor PGO − nginx (reference) | "
              f"{fmt(i_qn, '+.0f', ' µs')} | – | – |")
            w(f"| added p50 at 1 connection, interleaved: llm-proxy PGO − hyper floor PGO | "
              f"{fmt(i_gq, '+.0f', ' µs')} | – | – |")
    if d_tt:
        w(f"| TTFT Δ vs direct: llm-proxy | {fmt(d_tt, '+.0f', ' µs')} | ≤ 1000 µs | "
          f"{verdict(med(d_tt) <= 1000)} |")
    if d_tn:
        w(f"| TTFT Δ vs direct: nginx (reference) | {fmt(d_tn, '+.0f', ' µs')} | – | – |")
    if rss:
        idle = mib(rss["proxy_idle_kb"])
        w(f"| llm-proxy idle RSS | {idle:.1f} MiB | < 20 MiB | {verdict(idle < 20)} |")
        w(f"| llm-proxy peak RSS under load | {mib(rss['proxy_hwm_kb']):.1f} MiB | – | – |")
    print("\n".join(out))


if __name__ == "__main__":
    main()
