#!/usr/bin/env python3
"""Client side of the leasegate end-to-end benchmark (driven by benches/e2e/run.sh).

Subcommands (each writes one JSON document to --out):
  setup   connect -> select 1 -> disconnect, timed per iteration with psycopg, for several
          targets interleaved block by block; optionally diffs leasegate's setup-phase metrics
  floor   the credential floor: GET /v1/<mount>/creds/<role> + PUT /v1/sys/leases/revoke
          against OpenBao directly, timed per pair
  idle    hold many idle TLS sessions through leasegate (raw asyncio client speaking the
          startup protocol) and read leasegate's RSS at each stage
  churn   N concurrent clients connecting / select 1 / disconnecting for a fixed time
  drain   a burst of closes must not starve new sessions: hold N idle sessions, close them
          all at once, and while leasegate revokes their leases open new sessions one after
          another, timed each; reports the setup times during the drain, how long the drain
          took (leasegate_revocations_pending back to 0) and the revocation window it used
  metrics print leasegate's /metrics as JSON {series: value}
  leftovers  poll until no dynamic role (prefix) is in pg_roles and no lease of the mount's
          roles is listed, at most --timeout seconds
  meta    the machine, the versions of every program and the knobs of the run
  show    one progress line per figure of a setup / floor / idle / churn result file

Every network wait has a deadline: nothing here can hang forever.
"""

import argparse
import asyncio
import json
import os
import re
import ssl
import statistics
import struct
import sys
import time
import urllib.error
import urllib.request
import http.client
import platform
import subprocess
from urllib.parse import urlparse


# ----------------------------------------------------------------------------------------------
# small helpers

def pct(values, p):
    """Percentile with linear interpolation (p in 0..100); None for an empty list."""
    if not values:
        return None
    v = sorted(values)
    if len(v) == 1:
        return v[0]
    k = (len(v) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def summary(values):
    return {
        "n": len(values),
        "p50": pct(values, 50),
        "p90": pct(values, 90),
        "p99": pct(values, 99),
        "mean": statistics.fmean(values) if values else None,
        "min": min(values) if values else None,
        "max": max(values) if values else None,
    }


def write_out(path, doc):
    text = json.dumps(doc, indent=2, sort_keys=True)
    if path and path != "-":
        with open(path, "w") as f:
            f.write(text + "\n")
    print(text if len(text) < 4000 else text[:4000] + "\n...", flush=True)


_SERIES = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)')


def scrape(url, timeout=5.0):
    """Prometheus text -> {"name{labels}": float}."""
    with urllib.request.urlopen(url, timeout=timeout) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SERIES.match(line)
        if m:
            try:
                out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
            except ValueError:
                pass
    return out


def setup_phases(before, after):
    """Average of leasegate_session_setup_duration_seconds per phase between two scrapes (ms)."""
    res = {}
    for phase in ("tls", "vault", "upstream_login", "total"):
        s = f'leasegate_session_setup_duration_seconds_sum{{phase="{phase}"}}'
        c = f'leasegate_session_setup_duration_seconds_count{{phase="{phase}"}}'
        ds = after.get(s, 0.0) - before.get(s, 0.0)
        dc = after.get(c, 0.0) - before.get(c, 0.0)
        res[phase] = {"count": dc, "sum_s": ds, "avg_ms": (ds / dc * 1000.0) if dc else None}
    return res


def mem_available_mib():
    """MemAvailable of the machine (MiB)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    return None


def tree_anon_kib(pid):
    """RssAnon summed over a process and its direct children (PostgreSQL: postmaster + backends)."""
    total = 0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if int(d) == pid or ppid == pid:
                total += rss_kib(int(d)).get("RssAnon", 0)
        except (OSError, ValueError, IndexError):
            continue
    return total


def rss_kib(pid):
    """VmRSS, RssAnon, VmHWM (KiB) and thread count of a process."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile", "VmHWM", "Threads"):
                out[k] = int(v.split()[0])
    return out


# ----------------------------------------------------------------------------------------------
# setup: psycopg, sequential, interleaved targets

def cmd_setup(a):
    import psycopg

    targets = []
    for spec in a.target:
        name, _, conninfo = spec.partition("=")
        targets.append((name, conninfo))
    times = {n: [] for n, _ in targets}
    errors = {n: [] for n, _ in targets}

    def once(conninfo):
        t0 = time.perf_counter()
        with psycopg.connect(conninfo, connect_timeout=10, autocommit=True) as conn:
            conn.execute("select 1").fetchone()
        return (time.perf_counter() - t0) * 1000.0

    for name, ci in targets:  # warm-up, not counted
        for _ in range(a.warmup):
            try:
                once(ci)
            except Exception as e:  # noqa: BLE001
                errors[name].append(f"warmup: {e}")
    before = scrape(a.metrics_url) if a.metrics_url else {}
    deadline = time.monotonic() + a.max_seconds
    done = 0
    rnd = 0
    while done < a.n and time.monotonic() < deadline:
        block = min(a.block, a.n - done)
        order = targets[rnd % len(targets):] + targets[:rnd % len(targets)]
        for name, ci in order:
            for _ in range(block):
                try:
                    times[name].append(once(ci))
                except Exception as e:  # noqa: BLE001
                    errors[name].append(str(e).strip()[:300])
                if a.gap_ms:
                    time.sleep(a.gap_ms / 1000.0)
        done += block
        rnd += 1
    after = scrape(a.metrics_url) if a.metrics_url else {}
    doc = {
        "iterations_requested": a.n,
        "gap_ms": a.gap_ms,
        "timed_out": done < a.n,
        "targets": {n: {"ms": summary(times[n]), "errors": len(errors[n]),
                        "error_samples": errors[n][:5], "raw_ms": [round(x, 3) for x in times[n]]}
                    for n, _ in targets},
    }
    if a.metrics_url:
        doc["leasegate_phases"] = setup_phases(before, after)
    write_out(a.out, doc)


# ----------------------------------------------------------------------------------------------
# floor: OpenBao creds + revoke, persistent HTTP connection

def cmd_floor(a):
    u = urlparse(a.vault)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    hdr = {"X-Vault-Token": a.token, "X-Vault-Request": "true"}

    def call(method, path, body=None):
        h = dict(hdr)
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            h["Content-Type"] = "application/json"
        conn.request(method, "/v1/" + path, body=data, headers=h)
        r = conn.getresponse()
        payload = r.read()
        if r.status // 100 != 2:
            raise RuntimeError(f"{method} {path}: HTTP {r.status}: {payload[:200]!r}")
        return json.loads(payload) if payload else None

    creds, revoke, total, errors = [], [], [], []
    for i in range(a.warmup + a.n):
        try:
            t0 = time.perf_counter()
            c = call("GET", f"{a.mount}/creds/{a.role}")
            t1 = time.perf_counter()
            call("PUT", "sys/leases/revoke", {"lease_id": c["lease_id"]})
            t2 = time.perf_counter()
        except Exception as e:  # noqa: BLE001
            errors.append(str(e)[:300])
            continue
        if i >= a.warmup:
            creds.append((t1 - t0) * 1000.0)
            revoke.append((t2 - t1) * 1000.0)
            total.append((t2 - t0) * 1000.0)
    write_out(a.out, {"creds_ms": summary(creds), "revoke_ms": summary(revoke),
                      "total_ms": summary(total), "errors": len(errors),
                      "error_samples": errors[:5]})


def cmd_ceiling(a):
    """What OpenBao alone sustains: --clients loops of creds + revoke, each on its own HTTP
    connection, for --seconds: the most sessions per second any proxy could set up and tear
    down with a credential per session. With --login CONNINFO each loop also logs in to
    PostgreSQL with the credential (plaintext, SCRAM), runs `select 1` and logs out before the
    revoke: the same work a proxy's session does, without the proxy."""
    import threading
    u = urlparse(a.vault)
    hdr = {"X-Vault-Token": a.token, "X-Vault-Request": "true"}
    done, errors, lat = [0], [], []
    lock = threading.Lock()
    stop = time.monotonic() + a.seconds

    def loop():
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            try:
                conn.request("GET", f"/v1/{a.mount}/creds/{a.role}", headers=hdr)
                r = conn.getresponse()
                body = r.read()
                if r.status != 200:
                    raise RuntimeError(f"creds: HTTP {r.status}")
                doc = json.loads(body)
                lease = doc["lease_id"]
                if a.login:  # the same session a proxy sets up: log in, select 1, log out
                    import psycopg
                    creds = doc["data"]
                    with psycopg.connect(a.login, user=creds["username"], password=creds["password"],
                                         connect_timeout=10, autocommit=True) as pg:
                        pg.execute("select 1").fetchone()
                h = dict(hdr, **{"Content-Type": "application/json"})
                conn.request("PUT", "/v1/sys/leases/revoke", body=json.dumps({"lease_id": lease}), headers=h)
                r = conn.getresponse()
                r.read()
                if r.status // 100 != 2:
                    raise RuntimeError(f"revoke: HTTP {r.status}")
                with lock:
                    done[0] += 1
                    lat.append((time.perf_counter() - t0) * 1000.0)
            except Exception as e:  # noqa: BLE001
                with lock:
                    errors.append(str(e)[:200])
                conn.close()
                conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
                time.sleep(0.05)

    t0 = time.monotonic()
    cpu0 = time.process_time()
    threads = [threading.Thread(target=loop) for _ in range(a.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    write_out(a.out, {"clients": a.clients, "login": bool(a.login), "client_cpu_s": time.process_time() - cpu0,
                      "seconds": round(elapsed, 3), "pairs": done[0],
                      "pairs_per_s": done[0] / elapsed, "latency_ms": summary(lat),
                      "errors": len(errors), "error_samples": errors[:5]})


# ----------------------------------------------------------------------------------------------
# raw PostgreSQL protocol client over asyncio (SSLRequest, TLS with a client certificate,
# StartupMessage without password: leasegate logs in upstream for us)

class PgError(Exception):
    pass


def _fields(body):
    out = {}
    for part in body.split(b"\0"):
        if part:
            out[chr(part[0])] = part[1:].decode(errors="replace")
    return out


async def _read_msg(reader):
    hdr = await reader.readexactly(5)
    t = hdr[:1]
    (ln,) = struct.unpack("!i", hdr[1:])
    body = await reader.readexactly(ln - 4) if ln > 4 else b""
    return t, body


async def _until_ready(reader):
    while True:
        t, body = await _read_msg(reader)
        if t == b"E":
            f = _fields(body)
            raise PgError(f"{f.get('C', '?')}: {f.get('M', '?')}")
        if t == b"R":
            (code,) = struct.unpack("!i", body[:4])
            if code != 0:
                raise PgError(f"server asked for authentication method {code}")
        if t == b"Z":
            return


class Session:
    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer

    async def query(self, sql, timeout):
        q = sql.encode() + b"\0"
        self.writer.write(b"Q" + struct.pack("!i", 4 + len(q)) + q)
        await asyncio.wait_for(_until_ready(self.reader), timeout)

    async def close(self, timeout=5.0):
        try:
            self.writer.write(b"X\0\0\0\x04")
            self.writer.close()
            await asyncio.wait_for(self.writer.wait_closed(), timeout)
        except Exception:  # noqa: BLE001 - the peer may already be gone
            try:
                self.writer.transport.abort()
            except Exception:  # noqa: BLE001
                pass


async def open_session(host, port, ctx, user, database, timeout):
    async def go():
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(struct.pack("!ii", 8, 80877103))
            await writer.drain()
            if await reader.readexactly(1) != b"S":
                raise PgError("server refused SSL")
            await writer.start_tls(ctx, server_hostname="localhost")
            params = (b"user\0" + user.encode() + b"\0database\0" + database.encode()
                      + b"\0application_name\0lgbench\0\0")
            writer.write(struct.pack("!ii", 8 + len(params), 196608) + params)
            await writer.drain()
            await _until_ready(reader)
            return Session(reader, writer)
        except BaseException:
            writer.transport.abort()
            raise
    return await asyncio.wait_for(go(), timeout)


def client_ctx(a):
    ctx = ssl.create_default_context(cafile=a.ca)
    ctx.load_cert_chain(a.cert, a.key)
    return ctx


def add_client_args(p):
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--user", default="readonly")
    p.add_argument("--database", default="myapp")
    p.add_argument("--metrics-url")
    p.add_argument("--out")


# ----------------------------------------------------------------------------------------------
# idle: hold sessions, read RSS

async def poll(pred, seconds, step=0.25):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if pred():
                return True
        except Exception:  # noqa: BLE001
            pass
        await asyncio.sleep(step)
    return False


def metric(url, name):
    return scrape(url).get(name, 0.0)


async def idle_main(a):
    ctx = client_ctx(a)
    stages = [int(x) for x in a.stages.split(",")]
    sessions = []
    errors = []
    result = {"stages": [], "errors": 0, "error_samples": []}
    sem = asyncio.Semaphore(a.concurrency)
    t_start = time.monotonic()
    base = rss_kib(a.pid)
    result["rss_before_kib"] = base
    # Leases held before the test (prefetch pools): the drain waits for this many again.
    base_leases = metric(a.metrics_url, "leasegate_leases_active")
    result["leases_before"] = base_leases

    async def one():
        async with sem:
            if result.get("stopped"):
                return
            avail = mem_available_mib()
            if a.min_available_mib and avail is not None and avail < a.min_available_mib:
                result["stopped"] = (f"MemAvailable {avail} MiB < {a.min_available_mib} MiB: no more sessions "
                                     f"opened (each also costs PostgreSQL a backend)")
                return
            try:
                s = await open_session(a.host, a.port, ctx, a.user, a.database, a.open_timeout)
                sessions.append(s)
            except Exception as e:  # noqa: BLE001
                errors.append(f"{type(e).__name__}: {e}"[:300])

    for target in stages:
        if time.monotonic() - t_start > a.max_seconds:
            result["aborted"] = "max_seconds reached"
            break
        t0 = time.monotonic()
        attempts = 0
        # Open what is missing; retry failures a bounded number of times.
        while len(sessions) < target and attempts < 3 and not result.get("stopped"):
            need = target - len(sessions)
            await asyncio.gather(*(one() for _ in range(need)))
            attempts += 1
        opened_s = time.monotonic() - t0
        ok = await poll(lambda: metric(a.metrics_url, "leasegate_sessions_active") >= len(sessions), 30)
        await asyncio.sleep(a.settle)  # let leasegate's allocator settle before sampling
        samples = []
        for _ in range(5):
            samples.append(rss_kib(a.pid))
            await asyncio.sleep(0.2)
        m = scrape(a.metrics_url)
        st = {
            "target": target,
            "held": len(sessions),
            "open_seconds": round(opened_s, 3),
            "open_rate_per_s": round((target - (result["stages"][-1]["held"] if result["stages"] else 0)) / opened_s, 1) if opened_s > 0 else None,
            "sessions_active_metric": m.get("leasegate_sessions_active"),
            "metric_caught_up": ok,
            "rss_kib": statistics.median(s["VmRSS"] for s in samples),
            "rss_anon_kib": statistics.median(s.get("RssAnon", 0) for s in samples),
            "threads": samples[-1].get("Threads"),
            "hwm_kib": samples[-1].get("VmHWM"),
            "mem_available_mib": mem_available_mib(),
        }
        if a.pg_pid:
            st["postgres_anon_kib"] = tree_anon_kib(a.pg_pid)
        result["stages"].append(st)
        print(f"idle: {st}", flush=True)
        if result.get("stopped"):
            print(f"idle: stopped: {result['stopped']}", flush=True)
            break
    stopped = result.pop("stopped", None)

    # Close everything, then see what leasegate gives back.
    t0 = time.monotonic()
    for i in range(0, len(sessions), 200):
        await asyncio.gather(*(s.close() for s in sessions[i:i + 200]))
    sessions.clear()
    drained = await poll(lambda: metric(a.metrics_url, "leasegate_sessions_active") == 0
                         and metric(a.metrics_url, "leasegate_leases_active") <= base_leases, a.drain_seconds, 0.5)
    result["close_seconds"] = round(time.monotonic() - t0, 3)
    result["drained"] = drained
    await asyncio.sleep(a.settle)
    result["rss_after_close_kib"] = rss_kib(a.pid)

    # Reopen some sessions: if RSS hardly grows, the memory kept after closing is reused by the
    # allocator (retained, not leaked); if it grows by the per-session cost again, it leaked.
    if a.reopen:
        t0 = time.monotonic()
        await asyncio.gather(*(one() for _ in range(a.reopen)))
        open_s = time.monotonic() - t0
        await poll(lambda: metric(a.metrics_url, "leasegate_sessions_active") >= len(sessions), 30)
        await asyncio.sleep(a.settle)
        r = rss_kib(a.pid)
        held = len(sessions)
        for i in range(0, len(sessions), 200):
            await asyncio.gather(*(s.close() for s in sessions[i:i + 200]))
        sessions.clear()
        drained2 = await poll(lambda: metric(a.metrics_url, "leasegate_sessions_active") == 0
                              and metric(a.metrics_url, "leasegate_leases_active") <= base_leases, a.drain_seconds, 0.5)
        await asyncio.sleep(a.settle)
        r2 = rss_kib(a.pid)
        result["reopen"] = {
            "held": held, "open_seconds": round(open_s, 3), "rss_kib": r["VmRSS"], "rss_anon_kib": r.get("RssAnon"),
            "growth_kib_vs_after_close": r["VmRSS"] - result["rss_after_close_kib"]["VmRSS"],
            "rss_after_second_close_kib": r2["VmRSS"], "drained": drained2,
        }
        print(f"idle: reopen {result['reopen']}", flush=True)
    if stopped:
        result["stopped"] = stopped
    result["errors"] = len(errors)
    result["error_samples"] = errors[:10]
    # Bytes per session from the first stage to each later one (the last: the headline figure).
    held = result["stages"]
    for st in held[1:]:
        n = st["held"] - held[0]["held"]
        if n > 0:
            st["bytes_per_session_vs_first"] = (st["rss_kib"] - held[0]["rss_kib"]) * 1024 / n
            if "postgres_anon_kib" in st and "postgres_anon_kib" in held[0]:
                st["postgres_bytes_per_session_vs_first"] = (st["postgres_anon_kib"] - held[0]["postgres_anon_kib"]) * 1024 / n
    if len(held) > 1 and held[-1]["held"] > held[0]["held"]:
        n = held[-1]["held"] - held[0]["held"]
        result["bytes_per_idle_session"] = (held[-1]["rss_kib"] - held[0]["rss_kib"]) * 1024 / n
        result["anon_bytes_per_idle_session"] = (held[-1]["rss_anon_kib"] - held[0]["rss_anon_kib"]) * 1024 / n
        result["sessions_at_max"] = held[-1]["held"]
    return result


def cmd_idle(a):
    write_out(a.out, asyncio.run(idle_main(a)))


# ----------------------------------------------------------------------------------------------
# churn: connect / select 1 / disconnect as fast as possible

async def churn_main(a):
    ctx = client_ctx(a)
    lat, errors = [], []
    stop = time.monotonic() + a.seconds

    async def worker():
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            try:
                s = await open_session(a.host, a.port, ctx, a.user, a.database, a.open_timeout)
                try:
                    await s.query("select 1", a.open_timeout)
                finally:
                    await s.close()
                lat.append((time.perf_counter() - t0) * 1000.0)
            except Exception as e:  # noqa: BLE001
                errors.append(f"{type(e).__name__}: {e}"[:300])
                await asyncio.sleep(0.05)

    t0 = time.monotonic()
    c0 = os.times()
    await asyncio.gather(*(worker() for _ in range(a.clients)))
    elapsed = time.monotonic() - t0
    c1 = os.times()
    return {"client_cpu_s": (c1.user - c0.user) + (c1.system - c0.system), "clients": a.clients, "seconds": round(elapsed, 3), "sessions": len(lat),
            "sessions_per_s": len(lat) / elapsed, "latency_ms": summary(lat),
            "errors": len(errors), "error_samples": errors[:10]}


def cmd_churn(a):
    write_out(a.out, asyncio.run(churn_main(a)))


# ----------------------------------------------------------------------------------------------
# drain: new sessions while the revocations of a burst of closes drain

def revoker_state(url):
    m = scrape(url)
    return {k: m.get(f"leasegate_{k}", 0.0) for k in
            ("revocations_pending", "revocations_in_flight", "revocation_window",
             "revocation_window_cuts_total", "leases_active")}


async def drain_main(a):
    ctx = client_ctx(a)
    sem = asyncio.Semaphore(a.concurrency)
    sessions, errors = [], []

    async def one():
        async with sem:
            try:
                sessions.append(await open_session(a.host, a.port, ctx, a.user, a.database, a.open_timeout))
            except Exception as e:  # noqa: BLE001
                errors.append(f"open: {type(e).__name__}: {e}"[:300])

    t0 = time.monotonic()
    await asyncio.gather(*(one() for _ in range(a.sessions)))
    result = {"sessions": len(sessions), "open_seconds": round(time.monotonic() - t0, 3)}
    await poll(lambda: revoker_state(a.metrics_url)["revocations_pending"] == 0, 60, 0.5)
    before = revoker_state(a.metrics_url)
    # Close them all at once.
    closed = time.monotonic()
    await asyncio.gather(*(s.close() for s in sessions))
    sessions.clear()
    setups, probes = [], []
    drained_at, window_max = None, 0.0
    deadline = closed + a.max_seconds
    while time.monotonic() < deadline:
        st = revoker_state(a.metrics_url)
        window_max = max(window_max, st["revocation_window"])
        if st["revocations_pending"] == 0 and time.monotonic() - closed > 0.5:
            drained_at = time.monotonic()
            break
        t1 = time.perf_counter()
        try:
            s = await open_session(a.host, a.port, ctx, a.user, a.database, a.open_timeout)
            try:
                await s.query("select 1", a.open_timeout)
            finally:
                await s.close()
            ms = (time.perf_counter() - t1) * 1000.0
            setups.append(ms)
            probes.append({"t_s": round(time.monotonic() - closed, 3), "setup_ms": round(ms, 2), **st})
        except Exception as e:  # noqa: BLE001
            errors.append(f"during drain: {type(e).__name__}: {e}"[:300])
        await asyncio.sleep(a.gap)
    after = revoker_state(a.metrics_url)
    result.update({
        "drain_seconds": round(drained_at - closed, 3) if drained_at else None,
        "drained": drained_at is not None,
        "setup_during_drain_ms": summary(setups),
        "revocation_window_max": window_max,
        "revocation_window_cuts": after["revocation_window_cuts_total"] - before["revocation_window_cuts_total"],
        "probes": probes[:: max(1, len(probes) // 50)],
        "errors": len(errors), "error_samples": errors[:10],
    })
    return result


def cmd_drain(a):
    if not a.metrics_url:
        sys.exit("drain: --metrics-url is required (the revoker's gauges tell when the drain is over)")
    write_out(a.out, asyncio.run(drain_main(a)))


def _ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is the state (field 3): utime=14, stime=15, cutime=16, cstime=17, ppid=4
    return int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14]), int(fields[1])


def cmd_cpu(a):
    """CPU ticks (user+system) of processes; for --tree also reaped children and live children."""
    out = {"time": time.time(), "clk_tck": os.sysconf("SC_CLK_TCK")}
    for spec in a.proc:
        name, _, pid = spec.partition("=")
        try:
            out[name] = _ticks(int(pid))[0]
        except (OSError, ValueError, IndexError):
            out[name] = None
        # context switches of all its threads (voluntary + involuntary)
        cs = 0
        try:
            for t in os.listdir(f"/proc/{pid}/task"):
                try:
                    with open(f"/proc/{pid}/task/{t}/status") as f:
                        for line in f:
                            if "ctxt_switches" in line:  # voluntary_ and nonvoluntary_
                                cs += int(line.split()[-1])
                except OSError:
                    pass
            out[name + "_ctxsw"] = cs
        except OSError:
            out[name + "_ctxsw"] = None
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...
    out["system_busy"] = v[0] + v[1] + v[2]          # user + nice + system: charged to processes
    out["irq"] = v[5] + v[6]                          # irq + softirq (loopback networking, mostly ours)
    out["steal"] = v[7]
    for spec in a.reaped:
        name, _, pid = spec.partition("=")
        try:
            own, reaped, _ = _ticks(int(pid))
            out[name] = own + reaped
        except (OSError, ValueError, IndexError):
            out[name] = None
    for spec in a.tree:
        name, _, pid = spec.partition("=")
        try:
            own, reaped, _ = _ticks(int(pid))
            total = own + reaped
            for d in os.listdir("/proc"):
                if d.isdigit():
                    try:
                        t, _, ppid = _ticks(int(d))
                    except (OSError, IndexError, ValueError):
                        continue
                    if ppid == int(pid):
                        total += t
            out[name] = total
        except (OSError, ValueError, IndexError):
            out[name] = None
    print(json.dumps(out))


def cmd_metrics(a):
    write_out(a.out, scrape(a.metrics_url))


# ----------------------------------------------------------------------------------------------
# run bookkeeping: what is left after the run, what ran it, progress lines

def cmd_leftovers(a):
    import psycopg

    def roles():
        with psycopg.connect(a.pg, connect_timeout=10) as conn:
            row = conn.execute("select count(*) from pg_roles where starts_with(rolname, %s)",
                               (a.prefix,)).fetchone()
            return row[0]

    def leases(role):  # OpenBao answers 404 when there is none
        req = urllib.request.Request(f"{a.vault}/v1/sys/leases/lookup/{a.mount}/creds/{role}",
                                     method="LIST", headers={"X-Vault-Token": a.token})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return len(json.load(r)["data"]["keys"])
        except urllib.error.HTTPError as e:
            return 0 if e.code == 404 else f"error-{e.code}"

    t0 = time.monotonic()
    while True:
        left = {"roles": roles(), "leases_readonly": leases("readonly"),
                "leases_readwrite": leases("readwrite")}
        ok = all(isinstance(v, int) and v <= a.allow for v in left.values())
        if ok or time.monotonic() - t0 >= a.timeout:
            break
        time.sleep(0.2)
    write_out(a.out, {"ok": ok, "waited_s": int(time.monotonic() - t0), "allowed": a.allow,
                      **{k: str(v) for k, v in left.items()}})


def _sh(command):
    try:
        return subprocess.run(command, shell=True, capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception as e:  # noqa: BLE001
        return f"? {e}"


def _proc_field(path, key):
    with open(path) as f:
        return next((l.split(":", 1)[1].strip() for l in f if l.startswith(key)), "?")


def cmd_meta(a):
    knobs = {}
    for spec in a.knob:
        k, _, v = spec.partition("=")
        knobs[k] = int(v) if v.isdigit() else v
    k = knobs.get
    pgbench = f"-n -c {k('PGBENCH_CLIENTS')} -j {k('PGBENCH_JOBS')} -T {k('PGBENCH_SECONDS')}"
    doc = {
        "timestamp": a.timestamp, "quick": a.quick,
        "machine": {"nproc": os.cpu_count(), "cpu_model": _proc_field("/proc/cpuinfo", "model name"),
                    "mem_total": _proc_field("/proc/meminfo", "MemTotal"), "kernel": platform.release(),
                    "nofile_limit": a.nofile, "postgres_nofile_limit": a.pg_nofile},
        "versions": {"postgresql": _sh(f"{a.pgbin}/postgres --version"), "pgbench": _sh("pgbench --version"),
                     "pgbouncer": _sh("pgbouncer --version | head -n1"), "openbao": _sh(f"{a.bao} version"),
                     "leasegate": a.leasegate,
                     "leasegate_build_info": "\n".join(f"{n} {v:g}" for n, v in scrape(a.metrics_url).items()
                                                       if n.startswith("leasegate_build_info")),
                     "python": platform.python_version(),
                     "psycopg": _sh("python3 -c 'import psycopg;print(psycopg.__version__, psycopg.pq.version())'")},
        "knobs": knobs,
        "commands": {
            "steady_select": f"pgbench {pgbench} -S   (leasegate: user=readonly)",
            "steady_tpcb": f"pgbench {pgbench}      (leasegate: user=readwrite)",
            "before_each_pgbench": "vacuum pgbench_branches; vacuum pgbench_tellers; truncate pgbench_history; "
                                   "checkpoint  (as superuser)",
            "setup": f"python3 benches/e2e/lgbench.py setup --n {k('SETUP_N')} --block {k('SETUP_BLOCK')} "
                     "--target direct=... --target pgbouncer=... --target leasegate=...",
            "floor": f"python3 benches/e2e/lgbench.py floor --n {k('FLOOR_N')} --mount {a.mount} --role readonly",
            "idle": f"python3 benches/e2e/lgbench.py idle --stages {k('IDLE_STAGES')} "
                    f"--concurrency {k('IDLE_CONCURRENCY')}",
            "churn": f"python3 benches/e2e/lgbench.py churn --clients {k('CHURN_CLIENTS')} --seconds {k('CHURN_SECONDS')}"},
        "leasegate_rss_end_kib": rss_kib(a.pid).get("VmRSS", 0),
        "clk_tck": os.sysconf("SC_CLK_TCK"),
    }
    write_out(a.out, doc)


def cmd_show(a):
    with open(a.file) as f:
        d = json.load(f)
    if a.kind == "setup":
        for n, t in d["targets"].items():
            print(f"{n}: p50 {t['ms']['p50']:.2f} ms  p99 {t['ms']['p99']:.2f} ms  errors {t['errors']}")
        for p, v in d.get("leasegate_phases", {}).items():
            print(f"leasegate phase {p}: avg {v['avg_ms'] or 0:.2f} ms over {v['count']:.0f}")
    elif a.kind == "floor":
        print(f"floor p50 {round(d['total_ms']['p50'], 2)} ms")
    elif a.kind == "ceiling":
        print("%.1f creds+revoke pairs/s with %d clients, %d errors" % (d["pairs_per_s"], d["clients"], d["errors"]))
    elif a.kind == "churn":
        print("%.1f sessions/s, %d errors" % (d["sessions_per_s"], d["errors"]))
    elif a.kind == "idle":
        print(f"bytes per idle session: {d.get('bytes_per_idle_session')}")


# ----------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("setup")
    p.add_argument("--target", action="append", required=True, help="NAME=libpq conninfo")
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--block", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--gap-ms", type=float, default=0,
                   help="pause after every session (latency below saturation: background refills keep up)")
    p.add_argument("--max-seconds", type=float, default=240)
    p.add_argument("--metrics-url")
    p.add_argument("--out")
    p.set_defaults(fn=cmd_setup)

    p = sub.add_parser("floor")
    p.add_argument("--vault", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--mount", default="database")
    p.add_argument("--role", default="readonly")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out")
    p.set_defaults(fn=cmd_floor)

    p = sub.add_parser("ceiling")
    p.add_argument("--vault", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--mount", default="database")
    p.add_argument("--role", default="readonly")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--login", help="libpq conninfo (no user/password): also log in with each credential")
    p.add_argument("--out")
    p.set_defaults(fn=cmd_ceiling)

    p = sub.add_parser("idle")
    add_client_args(p)
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--stages", default="1,1000,5000")
    p.add_argument("--concurrency", type=int, default=50)
    p.add_argument("--open-timeout", type=float, default=30)
    p.add_argument("--settle", type=float, default=2.0)
    p.add_argument("--drain-seconds", type=float, default=180)
    p.add_argument("--reopen", type=int, default=0, help="after closing all, open this many again and read RSS")
    p.add_argument("--min-available-mib", type=int, default=0,
                   help="open no more sessions once the machine's MemAvailable is below this")
    p.add_argument("--pg-pid", type=int, help="postmaster PID: PostgreSQL's RssAnon is read at every stage")
    p.add_argument("--max-seconds", type=float, default=400)
    p.set_defaults(fn=cmd_idle)

    p = sub.add_parser("churn")
    add_client_args(p)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--open-timeout", type=float, default=15)
    p.set_defaults(fn=cmd_churn)

    p = sub.add_parser("drain")
    add_client_args(p)
    p.add_argument("--sessions", type=int, default=2000, help="idle sessions closed at once")
    p.add_argument("--concurrency", type=int, default=50, help="opened at most at once")
    p.add_argument("--gap", type=float, default=0.1, help="seconds between new sessions during the drain")
    p.add_argument("--open-timeout", type=float, default=30)
    p.add_argument("--max-seconds", type=float, default=300)
    p.set_defaults(fn=cmd_drain)

    p = sub.add_parser("cpu")
    p.add_argument("--proc", action="append", default=[], help="NAME=PID")
    p.add_argument("--tree", action="append", default=[], help="NAME=PID (with its children)")
    p.add_argument("--reaped", action="append", default=[], help="NAME=PID (own + reaped children only)")
    p.set_defaults(fn=cmd_cpu)

    p = sub.add_parser("metrics")
    p.add_argument("--metrics-url", required=True)
    p.add_argument("--out")
    p.set_defaults(fn=cmd_metrics)

    p = sub.add_parser("leftovers")
    p.add_argument("--pg", required=True, help="libpq conninfo or URL of a superuser")
    p.add_argument("--prefix", required=True, help="username prefix of the dynamic roles")
    p.add_argument("--vault", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--mount", default="database")
    p.add_argument("--timeout", type=float, default=60)
    p.add_argument("--allow", type=int, default=0,
                   help="roles/leases per kind that may remain (a prefetch pool the running proxy holds)")
    p.add_argument("--out")
    p.set_defaults(fn=cmd_leftovers)

    p = sub.add_parser("meta")
    p.add_argument("--timestamp", required=True)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--knob", action="append", default=[], help="NAME=VALUE (digits become numbers)")
    p.add_argument("--pgbin", required=True)
    p.add_argument("--bao", required=True)
    p.add_argument("--leasegate", required=True, help="the commit measured")
    p.add_argument("--metrics-url", required=True)
    p.add_argument("--pid", type=int, required=True, help="leasegate's PID (RSS at the end)")
    p.add_argument("--mount", default="database")
    p.add_argument("--nofile", default="?")
    p.add_argument("--pg-nofile", default="?")
    p.add_argument("--out")
    p.set_defaults(fn=cmd_meta)

    p = sub.add_parser("show")
    p.add_argument("kind", choices=["setup", "floor", "ceiling", "idle", "churn"])
    p.add_argument("file")
    p.set_defaults(fn=cmd_show)

    a = ap.parse_args()
    a.fn(a)


if __name__ == "__main__":
    main()
