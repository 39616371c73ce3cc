#!/usr/bin/env python3
"""Turns the raw output of benches/e2e/run.sh (one directory) into a JSON document with every
raw number and a Markdown report with every figure against its target.

  python3 benches/e2e/report.py --dir OUT [--log FILE]... --json results/TS.json --md RESULTS.md
  python3 benches/e2e/report.py --from-json results/TS.json --md RESULTS.md   (re-render)

--log: a server log to summarise (line count, WARN/ERROR/FATAL/PANIC lines and samples).
"""

import argparse
import glob
import json
import os
import re
import statistics

TARGETS = ["direct", "pgbouncer", "leasegate"]
WORKLOADS = {"select": "select-only (`-S`)", "tpcb": "TPC-B-like (default script)",
             "select1": "select-only, one client (`-S -c 1 -j 1`)"}
SETUP_TARGETS = ["direct", "pgbouncer", "leasegate", "leasegate_prefetch", "leasegate_warm"]
KIB = 1024
COMPONENTS = ("leasegate", "pgbouncer", "openbao", "postgres", "leasegate_alt")


def load(path, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def parse_pgbench(text):
    def num(pattern):
        m = re.search(pattern, text, re.M)
        return float(m.group(1)) if m else None
    return {
        "tps": num(r"^tps = ([0-9.]+)"),
        "latency_avg_ms": num(r"^latency average = ([0-9.]+) ms"),
        "latency_stddev_ms": num(r"^latency stddev = ([0-9.]+) ms"),
        "initial_connection_ms": num(r"^initial connection time = ([0-9.]+) ms"),
        "transactions": num(r"^number of transactions actually processed: ([0-9]+)"),
        "failed": num(r"^number of failed transactions: ([0-9]+)"),
        "errors": [l for l in text.splitlines()
                   if re.search(r"error|FATAL|could not|aborted", l, re.I)][:5],
    }


def summarise_logs(paths):
    """{file name: {lines, warn_error_lines, samples}} of the logs that exist."""
    out = {}
    for path in paths:
        try:
            lines = open(path, errors="replace").read().splitlines()
        except OSError:
            continue
        bad = [l for l in lines if re.search(r"\b(WARN|ERROR|FATAL|PANIC|panicked)\b", l)]
        out[os.path.basename(path)] = {"lines": len(lines), "warn_error_lines": len(bad), "samples": bad[:8]}
    return out


def bulk_summary(d, cpu):
    """Per target: median seconds of the bulk COPY, MiB/s, and the proxy's CPU ms per 100 MiB."""
    rows = []
    try:
        rows = [json.loads(line) for line in open(os.path.join(d, "bulk.jsonl")) if line.strip()]
    except (OSError, ValueError):
        return {}
    out = {}
    for tg in sorted({r["target"] for r in rows}):
        rs = [r for r in rows if r["target"] == tg]
        secs = statistics.median(r["seconds"] for r in rs)
        cpus = [(cpu.get(("bulk", r["round"], tg, "bulk")) or {}).get(tg) for r in rs]
        cpus = [c / r["mib"] * 100 * 1000 for c, r in zip(cpus, rs) if c is not None]
        out[tg] = {"seconds_median": secs, "mib": rs[0]["mib"], "mib_per_s": rs[0]["mib"] / secs if secs else None,
                   "seconds_rounds": [r["seconds"] for r in sorted(rs, key=lambda r: r["round"])],
                   "proxy_cpu_ms_per_100mib": statistics.median(cpus) if cpus else None}
    return out


def collect(d, logs=()):
    doc = {"meta": load(os.path.join(d, "meta.json"), {})}
    runs = []
    for path in sorted(glob.glob(os.path.join(d, "pgbench", "r*-*-*.txt"))):
        m = re.match(r"r(\d+)-(\w+)-(\w+)\.txt$", os.path.basename(path))
        if not m:
            continue
        r = parse_pgbench(open(path, errors="replace").read())
        r.update(round=int(m.group(1)), target=m.group(2), workload=m.group(3))
        runs.append(r)
    cpu = {}
    try:
        for line in open(os.path.join(d, "cpu.jsonl")):
            rec = json.loads(line)
            b, a = rec["before"], rec["after"]
            clk = a.get("clk_tck", 100)
            keys = COMPONENTS + ("client", "system_busy", "irq", "steal")
            ctx = {k + "_ctxsw": a[k + "_ctxsw"] - b[k + "_ctxsw"] for k in ("leasegate", "pgbouncer", "leasegate_alt")
                   if a.get(k + "_ctxsw") is not None and b.get(k + "_ctxsw") is not None}
            delta = {k: (a[k] - b[k]) / clk for k in keys if a.get(k) is not None and b.get(k) is not None}
            delta["wall_s"] = a["time"] - b["time"]
            delta.update(ctx)
            if "system_busy" in delta:
                # CPU used on the machine by anything that is not part of the benchmark
                delta["foreign"] = max(0.0, delta["system_busy"] - sum(delta.get(k, 0.0) for k in COMPONENTS + ("client",)))
                delta["foreign_cores"] = delta["foreign"] / delta["wall_s"] if delta["wall_s"] else None
                for k in ("irq", "steal"):
                    if k in delta and delta["wall_s"]:
                        delta[k + "_cores"] = delta[k] / delta["wall_s"]
            cpu[(rec["phase"], rec["round"], rec["target"], rec["workload"])] = delta
    except (OSError, ValueError, KeyError):
        pass
    for r in runs:
        c = cpu.get(("steady", r["round"], r["target"], r["workload"]))
        if c:
            r["cpu_s"] = c
            proxy = c.get(r["target"]) if r["target"] in ("pgbouncer", "leasegate", "leasegate_alt") else None
            if proxy is not None and c.get("wall_s"):
                r["proxy_cpu_cores"] = proxy / c["wall_s"]
            r["foreign_cores"] = c.get("foreign_cores")
            if r["transactions"]:
                if proxy is not None:
                    r["proxy_cpu_us_per_tx"] = proxy / r["transactions"] * 1e6
                if c.get(r["target"] + "_ctxsw") is not None:
                    r["proxy_ctxsw_per_tx"] = c[r["target"] + "_ctxsw"] / r["transactions"]
                if c.get("postgres") is not None:
                    r["postgres_cpu_us_per_tx"] = c["postgres"] / r["transactions"] * 1e6
                parts = [c.get("postgres"), c.get("client")] + ([proxy] if proxy is not None else [])
                if None not in parts:
                    r["all_cpu_us_per_tx"] = sum(parts) / r["transactions"] * 1e6
    doc["steady_runs"] = runs
    # LG_ALT_THREADS=N: a second leasegate with N session threads, steady state only (informational).
    doc["targets"] = TARGETS + (["leasegate_alt"] if any(r["target"] == "leasegate_alt" for r in runs) else [])
    for name in ("setup", "setup_b2b", "floor", "ceiling", "ceiling_login", "ceiling_after", "ceiling_login_after",
                 "idle", "churn", "churn_fresh", "leftovers"):
        doc[name] = load(os.path.join(d, name + ".json"))
    for phase, key, count in (("setup", ("setup", 0, "all", "setup"), None),
                              ("churn", ("churn", 0, "leasegate", "churn"), "sessions"),
                              ("churn_fresh", ("churn_fresh", 0, "leasegate", "churn"), "sessions"),
                              ("ceiling", ("ceiling", 0, "openbao", "ceiling"), "pairs"),
                              ("ceiling_login", ("ceiling_login", 0, "openbao", "ceiling"), "pairs"),
                              ("ceiling_after", ("ceiling_after", 0, "openbao", "ceiling"), "pairs"),
                              ("ceiling_login_after", ("ceiling_login_after", 0, "openbao", "ceiling"), "pairs"),
                              ("idle", ("idle", 0, "leasegate", "idle"), None)):
        c = cpu.get(key)
        if c and doc.get(phase) is not None:
            doc[phase]["cpu_s"] = c
            n = doc[phase].get(count) if count else None
            if n:
                per = {k: v / n * 1000 for k, v in c.items() if k in COMPONENTS}
                if doc[phase].get("client_cpu_s") is not None:
                    per["client"] = doc[phase]["client_cpu_s"] / n * 1000
                doc[phase]["cpu_ms_per_session"] = per
    doc["bulk"] = bulk_summary(d, cpu)
    doc["metrics_final"] = load(os.path.join(d, "metrics-final.json"), {})
    doc["perf"] = {}
    for path in sorted(glob.glob(os.path.join(d, "perf-*.txt"))):
        doc["perf"][os.path.basename(path)[5:-4]] = open(path, errors="replace").read()
    doc["logs"] = summarise_logs(logs) if logs else load(os.path.join(d, "log-summary.json"), {})
    analyse(doc)
    return doc


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def ratio(a, b):
    return a / b if a is not None and b else None


def added_latency_us(runs):
    """Median over rounds of (proxy's c=1 latency - direct's c=1 latency in the same round), µs;
    also the per-round values."""
    by = {(r["round"], r["target"]): r.get("latency_avg_ms") for r in runs if r["workload"] == "select1"}
    out = {}
    for tg in ("leasegate", "pgbouncer", "leasegate_alt"):
        per = [(by[(rd, tg)] - by[(rd, "direct")]) * 1000 for (rd, t) in sorted(by)
               if t == tg and by.get((rd, "direct")) is not None and by[(rd, t)] is not None]
        out[tg] = med(per)
        out[tg + "_rounds"] = per
    return out


def analyse(doc):
    s = {}
    for wl in WORKLOADS:
        row = {}
        for tg in doc["targets"]:
            rs = [r for r in doc["steady_runs"] if r["workload"] == wl and r["target"] == tg]
            row[tg] = {
                "tps_median": med([r["tps"] for r in rs]),
                "latency_ms_median": med([r["latency_avg_ms"] for r in rs]),
                "tps_rounds": [r["tps"] for r in sorted(rs, key=lambda r: r["round"])],
                "proxy_cpu_us_per_tx_median": med([r.get("proxy_cpu_us_per_tx") for r in rs]),
                "postgres_cpu_us_per_tx_median": med([r.get("postgres_cpu_us_per_tx") for r in rs]),
                "all_cpu_us_per_tx_median": med([r.get("all_cpu_us_per_tx") for r in rs]),
                "proxy_ctxsw_per_tx_median": med([r.get("proxy_ctxsw_per_tx") for r in rs]),
                "foreign_cores_rounds": [r.get("foreign_cores") for r in sorted(rs, key=lambda r: r["round"])],
                "proxy_cpu_cores_median": med([r.get("proxy_cpu_cores") for r in rs]),
                "failed_runs": sum(1 for r in rs if r["tps"] is None),
            }
        row["ratio_leasegate_pgbouncer"] = ratio(row["leasegate"]["tps_median"], row["pgbouncer"]["tps_median"])
        row["ratio_leasegate_direct"] = ratio(row["leasegate"]["tps_median"], row["direct"]["tps_median"])
        row["ratio_pgbouncer_direct"] = ratio(row["pgbouncer"]["tps_median"], row["direct"]["tps_median"])
        s[wl] = row
    doc["steady"] = s

    checks = []

    def check(name, value, target, ok, unit=""):
        checks.append({"check": name, "value": value, "target": target,
                       "met": None if ok is None else bool(ok), "unit": unit})

    def steady(wl, tg, key):
        return ((s.get(wl) or {}).get(tg) or {}).get(key)

    r = s["select"]["ratio_leasegate_pgbouncer"]
    check("select-only c=8: leasegate TPS / pgbouncer TPS", r, ">= 1.05", None if r is None else r >= 1.05)
    lg, pb = steady("select", "leasegate", "proxy_cpu_us_per_tx_median"), steady("select", "pgbouncer", "proxy_cpu_us_per_tx_median")
    check("select-only c=8: proxy CPU µs/tx, leasegate / pgbouncer", ratio(lg, pb), "<= 0.90",
          None if ratio(lg, pb) is None else ratio(lg, pb) <= 0.90)
    lg, pb = steady("select", "leasegate", "proxy_ctxsw_per_tx_median"), steady("select", "pgbouncer", "proxy_ctxsw_per_tx_median")
    check("select-only c=8: proxy context switches/tx, leasegate / pgbouncer", ratio(lg, pb), "<= 1.00",
          None if ratio(lg, pb) is None else ratio(lg, pb) <= 1.0)
    # Added latency per round (a proxy's c=1 run against direct's c=1 run of the same round, which
    # ran minutes apart at most), then the median over rounds: the machine's drift between rounds
    # is larger than the few microseconds measured.
    added = added_latency_us(doc["steady_runs"])
    lg, pb = added.get("leasegate"), added.get("pgbouncer")
    if None not in (lg, pb):
        doc["added_latency_us"] = added
        check("select-only c=1: latency added over direct, leasegate µs (pgbouncer's in the target)", lg,
              f"<= pgbouncer's {pb:.1f} µs", lg <= pb, "µs")
    else:
        check("select-only c=1: latency added over direct", None, "<= pgbouncer's", None)
    r = s["tpcb"]["ratio_leasegate_pgbouncer"]
    check("TPC-B-like c=8: leasegate TPS / pgbouncer TPS", r, ">= 1.00", None if r is None else r >= 1.0)
    r = s["select"]["ratio_leasegate_direct"]
    check("select-only c=8: leasegate TPS / direct TPS (informational)", r, "(no target)", None)
    bulk = doc.get("bulk") or {}
    r = ratio((bulk.get("leasegate") or {}).get("mib_per_s"), (bulk.get("pgbouncer") or {}).get("mib_per_s"))
    check("bulk COPY out: leasegate MiB/s / pgbouncer MiB/s (informational)", r, "(no target)", None)

    su, fl = doc.get("setup") or {}, doc.get("floor") or {}
    try:
        direct = su["targets"]["direct"]["ms"]["p50"]
        lg = su["targets"]["leasegate"]["ms"]["p50"]
        floor = fl["total_ms"]["p50"]
        limit = (direct + floor) * 1.10
        doc["setup_target_ms"] = limit
        check("session setup p50 (leasegate)", lg, f"<= (direct p50 {direct:.2f} + floor p50 {floor:.2f}) x 1.10 = {limit:.2f} ms",
              lg <= limit, "ms")
    except (KeyError, TypeError):
        check("session setup p50 (leasegate)", None, "<= (direct + floor) x 1.10", None, "ms")
    try:
        targets = su["targets"]
        direct, pgb = targets["direct"]["ms"]["p50"], targets["pgbouncer"]["ms"]["p50"]
        warm = (targets.get("leasegate_warm") or {}).get("ms", {}).get("p50")
        check("session setup p50, warm sessions: ms (target: <= 0.6 x direct and <= pgbouncer)", warm,
              f"<= {min(0.6 * direct, pgb):.2f} ms", None if warm is None else warm <= min(0.6 * direct, pgb), "ms")
    except (KeyError, TypeError):
        check("session setup p50, warm sessions", None, "<= 0.6 x direct and <= pgbouncer", None, "ms")
    b2b = (doc.get("setup_b2b") or {}).get("targets") or {}
    try:
        warm, direct = b2b["leasegate_warm"]["ms"]["p50"], b2b["direct"]["ms"]["p50"]
        check("session setup p50, warm sessions, back to back: leasegate_warm / direct (informational)",
              warm / direct, "(no target)", None)
    except (KeyError, TypeError, ZeroDivisionError):
        pass
    idle = doc.get("idle") or {}
    b = idle.get("bytes_per_idle_session")
    n = idle.get("sessions_at_max")
    check(f"bytes per idle TLS session (at {n} sessions)", b, "<= 16384 (16 KiB)", None if b is None else b <= 16 * KIB, "B")
    ch = doc.get("churn") or {}
    check("churn errors", ch.get("errors"), "0", None if ch.get("errors") is None else ch["errors"] == 0)
    # The ceilings measured in the same state as the churn they are compared with (after the
    # memory test: its 5,000+ roles created and dropped slow PostgreSQL down for everyone).
    ce = doc.get("ceiling_after") or doc.get("ceiling") or {}
    r = ratio(ch.get("sessions_per_s"), ce.get("pairs_per_s"))
    check("churn: sessions/s through leasegate / OpenBao creds+revoke ceiling (same cluster state)", r, ">= 0.90",
          None if r is None else r >= 0.9)
    cl = doc.get("ceiling_login_after") or doc.get("ceiling_login") or {}
    r = ratio(ch.get("sessions_per_s"), cl.get("pairs_per_s"))
    check("churn: sessions/s through leasegate / the same sessions without a proxy (creds + login + revoke; informational)",
          r, "(no target)", None)
    lo = doc.get("leftovers") or {}
    check("no dynamic roles / leases left after churn", lo.get("ok"), "true", lo.get("ok"))
    doc["checks"] = checks


# ----------------------------------------------------------------------------------------------

def f(x, nd=1, unit=""):
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    return f"{x:,.{nd}f}{unit}"


def verdict(ok):
    return "n/a" if ok is None else ("**met**" if ok else "**MISSED**")


def render(doc):
    m = doc.get("meta", {})
    mach, ver, knobs, cmds = m.get("machine", {}), m.get("versions", {}), m.get("knobs", {}), m.get("commands", {})
    L = []
    add = L.append
    add("# leasegate end-to-end benchmark results")
    add("")
    if m.get("quick"):
        add("> **QUICK run** (short durations, few iterations): a smoke test, not representative figures.")
        add("")
    add(f"Run `{m.get('timestamp', '?')}` by `benches/e2e/run.sh` (raw numbers: "
        f"`benches/results/{m.get('timestamp', '?')}.json`). Everything on one machine, over loopback; "
        "the three targets are measured round by round with the order rotated every round.")
    add("")
    add("## Machine and versions")
    add("")
    add(f"- CPU: {mach.get('cpu_model')} — `nproc` = {mach.get('nproc')}; memory {mach.get('mem_total')}; kernel {mach.get('kernel')}")
    add(f"- open-file limit: {mach.get('nofile_limit')} (PostgreSQL postmaster: {mach.get('postgres_nofile_limit')})")
    for k in ("postgresql", "pgbench", "pgbouncer", "openbao", "leasegate", "leasegate_build_info", "python", "psycopg"):
        add(f"- {k}: `{ver.get(k)}`")
    add("")
    add("## Setup")
    add("")
    upstream = "over PostgreSQL's Unix socket" if knobs.get("UPSTREAM_SOCKET") == "1" else "on loopback"
    add("- **direct**: PostgreSQL 15 (ssl=on, dev server certificate, scram-sha-256), static password user `bench`, "
        f"client `sslmode=verify-full`. `max_connections={knobs.get('PG_MAX_CONNECTIONS')}`, `shared_buffers=256MB`, "
        f"`synchronous_commit={knobs.get('PG_SYNC_COMMIT')}`.")
    add("- **pgbouncer**: `pool_mode=session`, `client_tls_sslmode=require` (same dev server certificate), "
        "`auth_type=scram-sha-256` with user `bench` in `userlist.txt`, plaintext upstream "
        f"{upstream}, "
        "`max_client_conn=10000`, `default_pool_size=50`, other settings default.")
    add("- **leasegate**: release build, mutual TLS (client certificate, no password), per-session credentials "
        "from an OpenBao dev server's database secrets engine (`readonly` for select-only and session setup, "
        "`readwrite` for TPC-B), plaintext upstream "
        f"{upstream}, "
        "`[limits]` raised, log level `info`.")
    add(f"- Every process of the benchmark runs at nice {knobs.get('NICE') or '0'} (the machine may be shared).")
    add("")
    add("Commands:")
    add("")
    add("```")
    add("run: " + " ".join(f"{k}={v}" for k, v in knobs.items()) + " benches/e2e/run.sh")
    for k, v in cmds.items():
        add(f"{k}: {v}")
    add("```")
    add("")
    add("## Targets")
    add("")
    add("| check | value | target | verdict |")
    add("| --- | ---: | --- | --- |")
    for c in doc["checks"]:
        v = c["value"]
        if isinstance(v, float):
            v = f"{v:,.3f}" if c["unit"] == "" else f"{v:,.2f} {c['unit']}"
            if c["unit"] == "B":
                v = f"{c['value']:,.0f} B ({c['value'] / KIB:.1f} KiB)"
        add(f"| {c['check']} | {v} | {c['target']} | {verdict(c['met'])} |")
    add("")

    add("## 1. Steady state")
    add("")
    add(f"`pgbench -n -c {knobs.get('PGBENCH_CLIENTS')} -j {knobs.get('PGBENCH_JOBS')} -T {knobs.get('PGBENCH_SECONDS')}` "
        f"(scale {knobs.get('SCALE')}), {knobs.get('ROUNDS')} round(s); medians across rounds. "
        "TPS excludes initial connection time. CPU columns: user+system CPU of the proxy process, and of "
        "PostgreSQL (postmaster and all backends), during the run (from /proc/PID/stat), per transaction; "
        "all CPU = proxy + PostgreSQL + pgbench: on 2 saturated cores TPS cannot exceed 2 s / all CPU per tx, "
        "so a proxy's own CPU per transaction, plus what the extra hop costs PostgreSQL and pgbench, comes "
        "straight out of TPS. proxy cores = proxy CPU seconds / wall seconds. Proxy context switches = "
        "voluntary + involuntary switches of all the proxy's threads per transaction (each is a sleep/wake-up). "
        "Foreign cores = CPU used on the machine by processes outside the benchmark during the run "
        "(/proc/stat user+nice+system time minus every benchmark process): other people's builds and tests; "
        "large values mean that run was disturbed.")
    add("")
    for wl, title in WORKLOADS.items():
        row = doc["steady"][wl]
        add(f"### {title}")
        add("")
        if wl == "select1":
            add(f"{knobs.get('C1_REPS') or knobs.get('ROUNDS')} interleaved runs of "
                f"`pgbench -n -S -c 1 -j 1 -T {knobs.get('C1_SECONDS') or knobs.get('PGBENCH_SECONDS')}` per target "
                "(order rotated every repetition), after the rounds above; \"per round\" means per repetition.")
            add("")
        add("| target | TPS (median) | avg latency ms | TPS per round | proxy CPU µs/tx | PostgreSQL CPU µs/tx | all CPU µs/tx | proxy cores | proxy context switches/tx | foreign cores per round |")
        add("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |")
        for tg in doc["targets"]:
            t = row[tg]
            add(f"| {tg} | {f(t['tps_median'])} | {f(t['latency_ms_median'], 3)} | "
                f"{', '.join(f(x) for x in t['tps_rounds'])} | {f(t['proxy_cpu_us_per_tx_median'])} | "
                f"{f(t['postgres_cpu_us_per_tx_median'])} | {f(t['all_cpu_us_per_tx_median'])} | "
                f"{f(t['proxy_cpu_cores_median'], 2)} | {f(t.get('proxy_ctxsw_per_tx_median'), 2)} | {', '.join(f(x, 2) for x in t['foreign_cores_rounds'])} |")
        add("")
        add(f"leasegate / pgbouncer = **{f(row['ratio_leasegate_pgbouncer'], 3)}**, "
            f"leasegate / direct = **{f(row['ratio_leasegate_direct'], 3)}** "
            f"(pgbouncer / direct = {f(row['ratio_pgbouncer_direct'], 3)}).")
        add("")
        alt = row.get("leasegate_alt") or {}
        if alt.get("tps_median"):
            pb = row["pgbouncer"]
            add(f"Informational, the second leasegate with `[runtime] worker_threads = {knobs.get('LG_ALT_THREADS')}` "
                f"(`leasegate_alt`): TPS / pgbouncer = **{f(ratio(alt['tps_median'], pb['tps_median']), 3)}**, "
                f"proxy CPU µs/tx / pgbouncer = {f(ratio(alt['proxy_cpu_us_per_tx_median'], pb['proxy_cpu_us_per_tx_median']), 3)}, "
                f"context switches/tx / pgbouncer = {f(ratio(alt['proxy_ctxsw_per_tx_median'], pb['proxy_ctxsw_per_tx_median']), 3)}.")
            add("")
        al = doc.get("added_latency_us") or {}
        if wl == "select1" and al:
            add("Latency added over direct, per round (a proxy's average latency minus direct's in the same round), "
                f"µs: leasegate {', '.join(f(x, 1) for x in al.get('leasegate_rounds', []))} (median "
                f"**{f(al.get('leasegate'), 1)}**); pgbouncer {', '.join(f(x, 1) for x in al.get('pgbouncer_rounds', []))} "
                f"(median **{f(al.get('pgbouncer'), 1)}**)"
                + (f"; leasegate_alt {', '.join(f(x, 1) for x in al.get('leasegate_alt_rounds', []))} "
                   f"(median {f(al.get('leasegate_alt'), 1)})" if al.get("leasegate_alt") is not None else "") + ".")
            add("")

    bulk = doc.get("bulk") or {}
    if bulk:
        add("### bulk transfer (informational)")
        add("")
        mib = next(iter(bulk.values()))["mib"]
        add(f"One session copies {mib} MiB out (`COPY (select repeat('x', 1023) ...) TO STDOUT` with psql into "
            "/dev/null, 1 KiB rows), once per target and round, order rotated; wall time (connection set-up included), and the proxy's CPU per "
            "100 MiB relayed. Direct: PostgreSQL's own TLS (OpenSSL); the proxies: TLS to the client, plaintext "
            "upstream.")
        add("")
        add("| target | seconds (median) | MiB/s | seconds per round | proxy CPU ms per 100 MiB |")
        add("| --- | ---: | ---: | --- | ---: |")
        for tg in doc["targets"]:
            b = bulk.get(tg)
            if b:
                add(f"| {tg} | {f(b['seconds_median'], 3)} | {f(b['mib_per_s'], 0)} | "
                    f"{', '.join(f(x, 3) for x in b['seconds_rounds'])} | {f(b['proxy_cpu_ms_per_100mib'], 1)} |")
        add("")

    add("## 2. Session setup")
    add("")
    su = doc.get("setup") or {}
    fl = doc.get("floor") or {}
    add(f"connect → `select 1` → disconnect, {knobs.get('SETUP_N')} sequential iterations per target with psycopg "
        f"(TLS, `sslmode=verify-full`), interleaved in blocks of {knobs.get('SETUP_BLOCK')} with the order rotated; "
        f"5 warm-up iterations per target not counted; {knobs.get('SETUP_GAP_MS') or 0} ms pause after every "
        "iteration (setup latency below saturation: the background refills of prefetched credentials and warm "
        "sessions keep up; back-to-back setup is what the churn section measures).")
    add("")
    add("| target | p50 ms | p90 ms | p99 ms | mean ms | errors |")
    add("| --- | ---: | ---: | ---: | ---: | ---: |")
    for tg in SETUP_TARGETS:
        t = (su.get("targets") or {}).get(tg)
        if t:
            ms = t["ms"]
            add(f"| {tg} | {f(ms['p50'], 2)} | {f(ms['p90'], 2)} | {f(ms['p99'], 2)} | {f(ms['mean'], 2)} | {t['errors']} |")
    if fl:
        add(f"| credential floor (OpenBao creds + revoke, n={fl['total_ms']['n']}) | {f(fl['total_ms']['p50'], 2)} | "
            f"{f(fl['total_ms']['p90'], 2)} | {f(fl['total_ms']['p99'], 2)} | {f(fl['total_ms']['mean'], 2)} | {fl['errors']} |")
        add(f"| … of which GET creds | {f(fl['creds_ms']['p50'], 2)} | {f(fl['creds_ms']['p90'], 2)} | "
            f"{f(fl['creds_ms']['p99'], 2)} | {f(fl['creds_ms']['mean'], 2)} | |")
        add(f"| … of which PUT revoke | {f(fl['revoke_ms']['p50'], 2)} | {f(fl['revoke_ms']['p90'], 2)} | "
            f"{f(fl['revoke_ms']['p99'], 2)} | {f(fl['revoke_ms']['mean'], 2)} | |")
    add("")
    b2b = (doc.get("setup_b2b") or {}).get("targets") or {}
    if b2b:
        add("The same back to back (informational: no pause, half the iterations), p50 / p90 ms: "
            + "; ".join(f"{tg} {f(b2b[tg]['ms']['p50'], 2)} / {f(b2b[tg]['ms']['p90'], 2)}"
                        for tg in SETUP_TARGETS if tg in b2b)
            + ". A single client opening sessions back to back asks for more than a warm pool's refill (a "
            "credential and a login per session, in the background on the same 2 cores) sustains, so "
            "warm hits turn into misses and cold setups; the idle gap between iterations also lets the "
            "machine's cores sleep, which makes every round trip of a login slower (more of them for "
            "SCRAM: direct and pgbouncer).")
        add("")
    if doc.get("setup_target_ms") is not None:
        add(f"Target for leasegate's p50: (direct p50 + floor p50) × 1.10 = **{doc['setup_target_ms']:.2f} ms**.")
        add("")
    sc = su.get("cpu_s")
    if sc:
        add("CPU used during the whole setup measurement (all three targets, warm-ups included), seconds: "
            + ", ".join(f"{k} {f(v, 2)}" for k, v in sc.items()) + ".")
        add("")
    ph = su.get("leasegate_phases")
    if ph:
        add("leasegate's own breakdown over the same iterations (`leasegate_session_setup_duration_seconds` "
            "sum/count per phase, difference of two scrapes):")
        add("")
        add("| phase | sessions | average ms |")
        add("| --- | ---: | ---: |")
        for p in ("tls", "vault", "upstream_login", "total"):
            v = ph.get(p, {})
            add(f"| {p} | {f(v.get('count'), 0)} | {f(v.get('avg_ms'), 2)} |")
        add("")

    add("## 3. Memory per idle session")
    add("")
    idle = doc.get("idle") or {}
    add(f"Idle TLS sessions through leasegate (role `readonly`) opened by an asyncio client speaking the startup "
        f"protocol, {knobs.get('IDLE_CONCURRENCY')} at a time; leasegate's VmRSS from /proc/PID/status "
        "(median of 5 readings after a 2 s settle).")
    add("")
    add("| sessions held | VmRSS KiB | RssAnon KiB | B/session vs first stage | threads | open time s | opened per s | PostgreSQL RssAnon KiB (B/session) | MemAvailable MiB |")
    add("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for st in idle.get("stages", []):
        add(f"| {st['held']} | {f(st['rss_kib'], 0)} | {f(st['rss_anon_kib'], 0)} | {f(st.get('bytes_per_session_vs_first'), 0)} | "
            f"{st.get('threads')} | {f(st['open_seconds'], 1)} | {f(st.get('open_rate_per_s'), 1)} | "
            f"{f(st.get('postgres_anon_kib'), 0)} ({f(st.get('postgres_bytes_per_session_vs_first'), 0)}) | {f(st.get('mem_available_mib'), 0)} |")
    ac = idle.get("rss_after_close_kib") or {}
    add(f"| 0 (after closing all; drained: {f(idle.get('drained'))}, {f(idle.get('close_seconds'), 1)} s) | "
        f"{f(ac.get('VmRSS'), 0)} | {f(ac.get('RssAnon'), 0)} | | {ac.get('Threads')} | | | | |")
    add("")
    if idle.get("stopped"):
        add(f"Stopped early: {idle['stopped']}.")
        add("")
    b = idle.get("bytes_per_idle_session")
    ro = idle.get("reopen")
    if ro and ro.get("held"):
        add(f"After closing them all, {ro['held']} sessions were opened again: VmRSS {f(ro['rss_kib'], 0)} KiB, "
            f"{f(ro['growth_kib_vs_after_close'], 0)} KiB more than after the close "
            f"({'memory kept after closing is reused, not leaked' if ro['growth_kib_vs_after_close'] < ro['held'] * 8 else 'grew again: looks like a leak'}); "
            f"after closing those: {f(ro['rss_after_second_close_kib'], 0)} KiB.")
        add("")
    add(f"Bytes per idle session = (RSS@max − RSS@min) / (sessions difference) = **{f(b, 0)} B "
        f"({f(b / KIB if b else None, 1)} KiB)**; target ≤ 16 KiB. Errors while opening: {idle.get('errors')} "
        f"{idle.get('error_samples') or ''}")
    add("")

    add("## 4. Churn")
    add("")
    ch = doc.get("churn") or {}
    lo = doc.get("leftovers") or {}
    add(f"{ch.get('clients')} concurrent clients connect / `select 1` / disconnect as fast as they can "
        "through leasegate (asyncio client, role `readonly`), once before the memory test (fresh cluster) and "
        "once after it (the official figure: after 5,000+ dynamic roles were created and dropped). CPU per "
        "session: user+system CPU of each process during the run divided by sessions (2 cores in total).")
    add("")
    add("| run | seconds | sessions | sessions/s | p50 ms | p99 ms | errors | CPU ms/session: leasegate | OpenBao | PostgreSQL | client | foreign cores |")
    add("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    def ceiling_row(label, c):
        per = c.get("cpu_ms_per_session") or {}
        lat = c.get("latency_ms") or {}
        add(f"| {label} | {f(c.get('seconds'), 1)} | {c.get('pairs')} | **{f(c.get('pairs_per_s'), 1)}** | "
            f"{f(lat.get('p50'), 1)} | {f(lat.get('p99'), 1)} | {c.get('errors')} | | {f(per.get('openbao'), 2)} | "
            f"{f(per.get('postgres'), 2)} | {f(per.get('client'), 2)} | {f((c.get('cpu_s') or {}).get('foreign_cores'), 2)} |")

    rows = (("fresh: OpenBao ceiling, {n} loops of creds + revoke (no proxy, no PostgreSQL login)", "ceiling"),
            ("fresh: no proxy, {n} loops of creds + PostgreSQL login (plaintext, SCRAM) + `select 1` + revoke", "ceiling_login"),
            ("fresh: through leasegate (before the memory test)", "churn_fresh"),
            ("after the memory test: OpenBao ceiling (creds + revoke)", "ceiling_after"),
            ("after the memory test: no proxy, creds + login + `select 1` + revoke", "ceiling_login_after"),
            ("after the memory test: through leasegate (the official figure)", "churn"))
    for label, key in rows:
        c = doc.get(key) or {}
        if not c:
            continue
        if key.startswith("ceiling"):
            ceiling_row(label.format(n=c.get("clients")), c)
            continue
        per = c.get("cpu_ms_per_session") or {}
        lat = c.get("latency_ms") or {}
        add(f"| {label} | {f(c.get('seconds'), 1)} | {c.get('sessions')} | **{f(c.get('sessions_per_s'), 1)}** | "
            f"{f(lat.get('p50'), 1)} | {f(lat.get('p99'), 1)} | {c.get('errors')} | {f(per.get('leasegate'), 2)} | "
            f"{f(per.get('openbao'), 2)} | {f(per.get('postgres'), 2)} | {f(per.get('client'), 2)} | "
            f"{f((c.get('cpu_s') or {}).get('foreign_cores'), 2)} |")
    add("")
    for c in (doc.get("churn_fresh"), ch):
        if c and c.get("error_samples"):
            add(f"Error samples: {c['error_samples'][:3]}")
    add(f"- afterwards (polled up to 60 s, waited {lo.get('waited_s')} s): dynamic roles `lgb_%` in pg_roles = "
        f"{lo.get('roles')}, leases readonly = {lo.get('leases_readonly')}, readwrite = {lo.get('leases_readwrite')} "
        f"→ **{'clean' if lo.get('ok') else 'LEFTOVERS'}**")
    add("")

    if doc.get("perf"):
        add("## Profile (PERF=1)")
        add("")
        add("`perf record -F 499 -g -p <leasegate>` (cpu-clock: this VM has no hardware counters, so kernel time "
            "tends to be charged where interrupts are re-enabled, e.g. finish_task_switch).")
        add("")
        for name in sorted(doc["perf"], key=lambda n: n != "select"):
            text = "\n".join(re.sub(r"(\s+-)?\s+-\s*$", "", l).rstrip() for l in doc["perf"][name].splitlines())
            add("```")
            add(text.rstrip())
            add("```")
            add("")
    add("## leasegate counters at the end of the run")
    add("")
    mf = doc.get("metrics_final") or {}
    keys = [k for k in sorted(mf) if re.match(
        r"leasegate_(sessions_total|sessions_active|leases_active|leases_issued_total|lease_revocations_total|"
        r"revocations_pending|auth_failures_total|upstream_errors_total|vault_requests_total|tls_handshake_failures_total|"
        r"lease_renewals_total)", k)]
    add("```")
    for k in keys:
        add(f"{k} {mf[k]:g}")
    add("```")
    logs = doc.get("logs") or {}
    if logs:
        add("")
        add("Log lines with WARN/ERROR/FATAL: " + ", ".join(
            f"{k}: {v['warn_error_lines']} of {v['lines']}" for k, v in logs.items()))
        for k, v in logs.items():
            if v["samples"]:
                add("")
                add(f"{k} samples:")
                add("```")
                for s in v["samples"][:5]:
                    add(s[:300])
                add("```")
    add("")
    return "\n".join(L)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir")
    ap.add_argument("--from-json")
    ap.add_argument("--json")
    ap.add_argument("--md")
    ap.add_argument("--log", action="append", default=[])
    a = ap.parse_args()
    if a.from_json:
        doc = load(a.from_json)
        analyse(doc)
    else:
        doc = collect(a.dir, a.log)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(doc, fh, indent=2, sort_keys=True)
    md = render(doc)
    if a.md:
        with open(a.md, "w") as fh:
            fh.write(md)
    for c in doc["checks"]:
        print(f"[e2e]   {c['check']}: {c['value']} (target {c['target']}) -> {verdict(c['met'])}")


if __name__ == "__main__":
    main()
