#!/usr/bin/env python3
"""Turns the JSON lines that scripts/bench-scenarios collected into a markdown
report.

    scenarios_report.py RESULTS.jsonl > scenarios.md

Every figure is the median over rounds, with the spread (min–max) of the
rounds. Ratios and differences are computed within each round (the two sides
of a comparison run back to back, in an order alternating from round to
round), then their median is taken.
"""

import sys

from rounds import by_round, fmt, load, med, series

# A throughput shortfall this small is not told apart from noise on a shared
# 2-core VM (see docs/BENCHMARKS.md).
NOISE_RATIO = 0.05
# Dialects: a dialect's added p50 is "the same as chat's" when it is within
# 10% of chat's added p50, or within this many µs of it, whichever is larger;
# one below that is cheaper than chat's, which the target (no dialect costs
# more than chat) also accepts.
# On this VM a target's p50 moves by a few µs even with requests interleaved
# (scheduling of client, proxy and mock on the 2 vCPUs), so a few µs of
# difference between dialects is below what one run can resolve.
DIALECT_FLOOR_US = 5


def errors(rounds, target):
    return sum(sum(v for k, v in r[target].items() if k.startswith("err_"))
               for r in rounds.values() if target in r)


def main():
    records = load(sys.argv[1])
    meta = next((r for r in records if r.get("kind") == "meta"), {})
    metrics = next((r for r in records if r.get("kind") == "metrics"), {})
    out = []
    w = out.append

    w(f"# llm-proxy scenario benchmarks — {meta.get('date', '?')}")
    w("")
    w(f"- commit `{meta.get('commit', '?')}`; {meta.get('cpu', '?')}, {meta.get('nproc', '?')} cores "
      f"shared by load generator, proxies and mocks; kernel {meta.get('kernel', '?')}; {meta.get('wrk', 'wrk')}")
    w(f"- {meta.get('rounds', '?')} round(s) × {meta.get('duration', '?')} s per wrk run (dialects: 200 requests "
      "per target per second of it); in every round "
      "each comparison's targets run back to back, order rotated each round (so is the order of the "
      "scenarios)")
    w(f"- load average at start: {meta.get('loadavg', '?')}; other rustc/cargo processes at start: "
      f"{meta.get('busy', '?')}")
    w("- mocks: no latency, 8 tokens per answer, streams as fast as the client reads; every proxy's "
      "upstreams have `apis = [\"chat_completions\", \"responses\", \"messages\"]`")
    w("- figures are medians over rounds with the (min–max) of the rounds; ratios and differences are "
      "taken within each round first")
    w("")

    summary = []

    def verdict_min(ratio, target):
        if ratio is None:
            return "n/a"
        if ratio >= target:
            return "met"
        if ratio >= target - NOISE_RATIO:
            return f"within {NOISE_RATIO:.0%} (not measurably below)"
        return "**missed**"

    def verdict_cost(cost, limit):
        if cost is None:
            return "n/a"
        return "met" if cost < limit else "**missed**"

    def tput_table(rounds, rows, base, base_label):
        w(f"| target | req/s | ÷ {base_label} | p50 µs | p99 µs | wrk errors |")
        w("| --- | --- | --- | --- | --- | --- |")
        for t, label in rows:
            rps = series(rounds, lambda r, t=t: r[t]["rps"])
            ratio = series(rounds, lambda r, t=t: r[t]["rps"] / r[base]["rps"])
            p50 = series(rounds, lambda r, t=t: r[t]["p50_us"])
            p99 = series(rounds, lambda r, t=t: r[t]["p99_us"])
            w(f"| {label} | {fmt(rps, ',.0f')} | {fmt(ratio, '.2f') if t != base else '1'} | "
              f"{fmt(p50, '.0f')} | {fmt(p99, '.0f')} | {errors(rounds, t)} |")
        w("")

    # Cache.
    hit = by_round(records, "group", "cache-hit")
    miss = by_round(records, "group", "cache-miss")
    bal = by_round(records, "group", "balance")
    if hit or miss:
        w("## Cache (`[cache] backend = \"memory\"`), `wrk -t2 -c32`, non-streamed chat completion")
        w("")
        w("**Hits**: the same request over and over (all hits after the first), against the mock itself.")
        w("")
        tput_table(hit, [("direct", "direct (mock)"), ("cache-hit", "llm-proxy, cache hits")], "direct", "direct")
        ref = series({k: {**hit.get(k, {}), **{"one": v["one"]}} for k, v in bal.items() if "one" in v},
                     lambda r: r["one"]["rps"] / r["direct"]["rps"])
        if ref:
            w(f"For reference, llm-proxy without cache forwarding the same request (the balancer's "
              f"one-upstream run of the same round) ÷ direct: {fmt(ref, '.2f')}.")
            w("")
        w("**Misses**: every body different (a counter in the message, `scripts/bench-lib/unique.lua`); "
          "llm-proxy with the cache on vs the same proxy without `[cache]`.")
        w("")
        tput_table(miss, [("cache-off", "llm-proxy, no cache"), ("cache-on", "llm-proxy, cache on (all misses)")],
                   "cache-off", "no cache")
        ev = metrics.get("cache_events")
        if ev:
            w("Cache events counted by the cache proxy over the whole run (`llm_proxy_cache_events_total`): "
              + ", ".join(f"`{k}` {int(v):,}" for k, v in sorted(ev.items())) + ".")
            w("")
        r_hit = series(hit, lambda r: r["cache-hit"]["rps"] / r["direct"]["rps"])
        r_miss = series(miss, lambda r: r["cache-on"]["rps"] / r["cache-off"]["rps"])
        summary.append(("cache hits: llm-proxy ÷ direct", fmt(r_hit, ".2f"), "≥ 0.80",
                        verdict_min(med(r_hit), 0.80)))
        if r_miss:
            c = [1 - x for x in r_miss]
            summary.append(("cache miss cost: 1 − (cache on ÷ no cache), unique bodies", fmt(c, "+.1%"), "< 5%",
                            verdict_cost(med(c), 0.05)))

    # Auth.
    auth = by_round(records, "group", "auth")
    if auth:
        w("## Auth (`[auth]`, one key, limits far above the load), `wrk -t2 -c32`, non-streamed chat completion")
        w("")
        w("Both send `authorization: Bearer <key>`; the proxy without `[auth]` ignores it.")
        w("")
        tput_table(auth, [("no-auth", "llm-proxy, no auth"), ("auth", "llm-proxy, auth")], "no-auth", "no auth")
        r_auth = series(auth, lambda r: r["auth"]["rps"] / r["no-auth"]["rps"])
        if r_auth:
            c = [1 - x for x in r_auth]
            summary.append(("auth cost: 1 − (auth ÷ no auth)", fmt(c, "+.1%"), "< 5%", verdict_cost(med(c), 0.05)))

    # Balancer.
    if bal:
        w("## Balancer (default `p2c_ewma`), `wrk -t2 -c32`, non-streamed chat completion")
        w("")
        w("Two upstreams (two upstream entries, both on one `mock_server` process, so that the comparison is of the balancer and not of a second busy process on 2 cores) vs one.")
        w("")
        tput_table(bal, [("one", "llm-proxy, 1 upstream"), ("two", "llm-proxy, 2 upstreams")], "one", "1 upstream")
        up = metrics.get("two_upstream_requests")
        if up:
            w("Requests per upstream of the two-upstream proxy over the whole run: "
              + ", ".join(f"`{k}` {int(v):,}" for k, v in sorted(up.items())) + ".")
            w("")
        r_bal = series(bal, lambda r: r["two"]["rps"] / r["one"]["rps"])
        summary.append(("balancer: 2 upstreams ÷ 1 upstream", fmt(r_bal, ".2f"), "≥ 1 (no loss)",
                        verdict_min(med(r_bal), 1.0)))

    # Dialects: one interleaved run per round, targets named DIALECT/TARGET.
    drounds = by_round(records, "group", "dialects")
    if drounds:
        w("## Dialects, streamed: whole-request latency, one request at a time, µs")
        w("")
        w("Mock at full speed, 8 tokens. Chat: `POST /v1/chat/completions` `\"stream\":true`; Responses: "
          "`POST /v1/responses` `\"stream\":true`; Messages: `POST /v1/messages` with "
          "`anthropic-version: 2023-06-01`, `\"stream\":true`. Direct = the mock; nginx = a plain "
          "reverse proxy in front of the same mock (the reference: what any proxy adds to these "
          "streams); llm-proxy = one upstream, no cache, no auth. The nine dialect × target pairs "
          "are measured in one client, one request at a time, interleaved request by request "
          "(`scripts/bench-lib/ttft.py --whole`: time from writing the request to the response's "
          "last byte), so that the machine's drift hits them alike.")
        w("")
        w("| dialect | direct p50 | nginx added p50 | llm-proxy p50 | llm-proxy added p50 | direct p99 | "
          "llm-proxy p99 | llm-proxy added p99 | errors |")
        w("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        dialects = [("chat", "chat completions"), ("responses", "Responses"), ("messages", "Messages")]
        added, nginx_added = {}, {}
        for d, label in dialects:
            def at(r, target, figure, d=d):
                return r[f"{d}/{target}"][f"whole_{figure}_us"]

            def added_over_direct(target, d=d):
                # Rounds where both figures exist (a target with no request
                # done in time has none).
                return {k: at(v, target, "p50") - at(v, "direct", "p50") for k, v in drounds.items()
                        if v.get(f"{d}/{target}", {}).get("whole_p50_us") is not None
                        and v.get(f"{d}/direct", {}).get("whole_p50_us") is not None}
            added[d] = added_over_direct("llm-proxy")
            nginx_added[d] = added_over_direct("nginx")
            dp50 = series(drounds, lambda r: at(r, "direct", "p50"))
            pp50 = series(drounds, lambda r: at(r, "llm-proxy", "p50"))
            dp99 = series(drounds, lambda r: at(r, "direct", "p99"))
            pp99 = series(drounds, lambda r: at(r, "llm-proxy", "p99"))
            a99 = series(drounds, lambda r: at(r, "llm-proxy", "p99") - at(r, "direct", "p99"))
            errs = sum(r.get(f"{d}/{t}", {}).get("errors", 0)
                       for r in drounds.values() for t in ("direct", "nginx", "llm-proxy"))
            w(f"| {label} | {fmt(dp50, '.0f')} | {fmt(list(nginx_added[d].values()), '+.0f')} | "
              f"{fmt(pp50, '.0f')} | {fmt(list(added[d].values()), '+.0f')} | "
              f"{fmt(dp99, '.0f')} | {fmt(pp99, '.0f')} | {fmt(a99, '+.0f')} | {errs} |")
        w("")
        chat_added = med(list(added["chat"].values()))
        w(f"Judged \"same as chat\" when a dialect's added p50 is within 10% of chat's added p50 or within "
          f"{DIALECT_FLOOR_US} µs of it, whichever is larger (differences taken within each round, then the "
          "median). nginx's own difference on the same streams is given beside it: a dialect whose answer "
          "is larger (Responses sends about twice chat's bytes and events) costs any proxy more.")
        w("")
        for d, label in dialects[1:]:
            diffs = [added[d][k] - added["chat"][k] for k in sorted(added[d]) if k in added["chat"]]
            if not diffs or chat_added is None:
                continue
            m = med(diffs)
            allowed = max(0.10 * abs(chat_added), DIALECT_FLOOR_US)
            ok = abs(m) <= allowed
            pct = f", {m / chat_added:+.0%} of chat's" if chat_added else ""
            summary.append((f"{label} added p50 − chat's added p50", f"{fmt(diffs, '+.0f', ' µs')}{pct}",
                            f"within ±{allowed:.0f} µs (10% of chat's {chat_added:+.0f} µs, floor "
                            f"{DIALECT_FLOOR_US} µs)",
                            "met" if ok else ("**slower than chat**" if m > 0 else "met (cheaper than chat)")))
            ndiffs = [nginx_added[d][k] - nginx_added["chat"][k]
                      for k in sorted(nginx_added[d]) if k in nginx_added["chat"]]
            if ndiffs:
                summary.append((f"reference: nginx's {label} added p50 − its chat added p50",
                                fmt(ndiffs, '+.0f', ' µs'), "–", "–"))
        chat_vs_nginx = [added["chat"][k] - nginx_added["chat"][k]
                         for k in sorted(added["chat"]) if k in nginx_added["chat"]]
        if chat_vs_nginx:
            summary.append(("streamed chat: llm-proxy added p50 − nginx's", fmt(chat_vs_nginx, '+.0f', ' µs'),
                            "–", "–"))

    w("## Summary against the targets")
    w("")
    w("| measure | this run | target | verdict |")
    w("| --- | --- | --- | --- |")
    for row in summary:
        w("| " + " | ".join(row) + " |")
    print("\n".join(out))


if __name__ == "__main__":
    main()
