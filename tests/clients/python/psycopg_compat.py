#!/usr/bin/env python3
"""psycopg 3 (libpq) through leasegate, with sslmode=verify-full and a client certificate.

Driven by tests/integration/compat_psycopg.rs. The connection comes from the environment:
LG_HOST (name the server certificate must match), LG_HOSTADDR, LG_PORT, LG_DBNAME, LG_USER
(the Vault role, e.g. readwrite), LG_SSLROOTCERT, LG_SSLCERT, LG_SSLKEY.

Prints one JSON line {"ok": ..., "checks": {...}, versions...} and exits 0 only when every
check passed. Install: pip install -r tests/clients/python/requirements.txt
"""

import json
import random
import sys
import threading
import time
import traceback

import lgconn

try:
    import psycopg
    from psycopg import errors
except ImportError as exc:  # pragma: no cover - reported to the Rust test
    print(json.dumps({"ok": False, "error": f"psycopg not importable: {exc}; "
                      "run `pip install -r tests/clients/python/requirements.txt`"}))
    sys.exit(2)

RESULT = {
    "client": "psycopg",
    "psycopg": psycopg.__version__,
    "libpq": psycopg.pq.version(),
    "impl": psycopg.pq.__impl__,
    "python": sys.version.split()[0],
    "checks": {},
}


def conninfo(**override):
    return psycopg.conninfo.make_conninfo(
        **lgconn.params(**{"application_name": "psycopg-compat", **override})
    )


def connect(**override):
    return psycopg.connect(conninfo(**override), autocommit=True)


def check(name):
    """Runs the decorated function as check `name`; its return value (a dict) is recorded."""

    def wrap(fn):
        started = time.monotonic()
        try:
            details = fn() or {}
        except Exception as exc:  # noqa: BLE001 - everything is reported
            RESULT["checks"][name] = {
                "ok": False,
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(),
            }
            return fn
        details["ok"] = True
        details["ms"] = round((time.monotonic() - started) * 1000)
        RESULT["checks"][name] = details
        return fn

    return wrap


def expect(cond, what):
    if not cond:
        raise AssertionError(what)


@check("verify_full_tls")
def _():
    with connect() as conn:
        pg = conn.pgconn
        expect(pg.ssl_in_use, "TLS in use")
        user = conn.execute("select current_user::text").fetchone()[0]
        expect(user != lgconn.env("LG_USER"), f"session user {user} is a dynamic role, not the Vault role")
        version = conn.execute("select current_setting('server_version_num')::int").fetchone()[0]
        details = {
            "session_user": user,
            "server_version_num": version,
            "server_version_param": conn.info.parameter_status("server_version"),
        }
    # Negative control: the same connection under a name the certificate does not carry.
    try:
        psycopg.connect(conninfo(host="wrong-name.invalid")).close()
    except psycopg.OperationalError as exc:
        msg = str(exc)
        expect("does not match host name" in msg or "certificate" in msg,
               f"wrong host name refused for a certificate reason: {msg}")
        details["wrong_host_refused"] = msg.strip().splitlines()[-1][:200]
    else:
        raise AssertionError("verify-full accepted a wrong host name")
    return details


@check("transactions")
def _():
    with connect() as conn:
        conn.execute("create temp table tx (id int primary key, v text)")
        with conn.transaction():
            conn.execute("insert into tx values (1, 'a'), (2, 'b')")
        try:
            with conn.transaction():
                conn.execute("insert into tx values (3, 'rolled back')")
                raise RuntimeError("abort this block")
        except RuntimeError:
            pass
        # Explicit commit / rollback with autocommit off.
        conn.autocommit = False
        conn.execute("insert into tx values (4, 'committed')")
        conn.commit()
        conn.execute("insert into tx values (5, 'rolled back')")
        conn.rollback()
        try:
            conn.execute("insert into tx values (1, 'duplicate')")
            raise AssertionError("duplicate key accepted")
        except errors.UniqueViolation:
            conn.rollback()
        conn.autocommit = True
        with conn.transaction() as outer:
            conn.execute("insert into tx values (6, 'outer')")
            try:
                with conn.transaction():  # savepoint
                    conn.execute("insert into tx values (7, 'inner')")
                    raise RuntimeError("roll back the savepoint")
            except RuntimeError:
                pass
            expect(outer is not None, "outer transaction")
        ids = [r[0] for r in conn.execute("select id from tx order by id")]
        expect(ids == [1, 2, 4, 6], f"committed rows {ids}")
        return {"ids": ids}


@check("prepared_statements")
def _():
    with connect() as conn:
        cur = conn.cursor()
        for i in range(10):
            row = cur.execute("select %s::int * 2, %s::text || '!'", (i, f"v{i}"), prepare=True).fetchone()
            expect(row == (i * 2, f"v{i}!"), f"row {row}")
        cur.execute("create temp table many (id int, b bytea)")
        cur.executemany("insert into many values (%s, %s)", [(i, bytes([i % 256]) * 100) for i in range(200)])
        total = cur.execute("select count(*), sum(length(b)) from many").fetchone()
        expect(total == (200, 20000), f"executemany result {total}")
        return {"prepared_rows": 10, "executemany_rows": total[0]}


@check("server_side_cursor")
def _():
    with connect() as conn:
        with conn.transaction():
            with conn.cursor(name="compat_named") as cur:
                cur.execute("select g, repeat('y', 100) from generate_series(1, 5000) g")
                batches = 0
                total = 0
                count = 0
                while True:
                    rows = cur.fetchmany(700)
                    if not rows:
                        break
                    batches += 1
                    count += len(rows)
                    total += sum(r[0] for r in rows)
        expect(count == 5000 and total == 5000 * 5001 // 2, f"fetched {count} rows, sum {total}")
        return {"rows": count, "batches": batches}


@check("copy")
def _():
    with connect() as conn:
        cur = conn.cursor()
        cur.execute("create temp table c (id int, name text, data bytea)")
        rows = [(i, f"name {i}\ttab \\ backslash ✓", bytes(range(i % 7, i % 7 + 5))) for i in range(5000)]
        with cur.copy("COPY c (id, name, data) FROM STDIN") as copy:
            for r in rows:
                copy.write_row(r)
        # COPY FROM a file-like block of text, as copy.write.
        with cur.copy("COPY c (id, name) FROM STDIN WITH (FORMAT csv)") as copy:
            copy.write("100000,\"csv, with comma\"\n100001,plain\n")
        n = cur.execute("select count(*) from c").fetchone()[0]
        expect(n == 5002, f"{n} rows after COPY FROM")
        out = []
        with cur.copy("COPY (select id, name, data from c where id < 100000 order by id) TO STDOUT") as copy:
            copy.set_types(["int4", "text", "bytea"])
            for row in copy.rows():
                out.append(row)
        expect(out == rows, "COPY TO returns exactly the rows written")
        with cur.copy("COPY (select id from c where id >= 100000 order by id) TO STDOUT") as copy:
            raw = b"".join(bytes(block) for block in copy)
        expect(raw == b"100000\n100001\n", f"raw COPY TO {raw!r}")
        return {"rows_in": n, "rows_out": len(out)}


def cancel_with(method):
    """Runs pg_sleep(30) on one connection and cancels it with `method` as soon as a second
    connection sees the statement's advisory lock (so exactly one cancel is sent)."""
    key = random.randint(1, 2**31 - 1)
    with connect() as conn, connect() as watcher:
        outcome = {}

        def run():
            try:
                conn.execute("select pg_advisory_xact_lock(%s), pg_sleep(30)", (key,))
                outcome["error"] = "completed"
            except errors.QueryCanceled as exc:
                outcome["sqlstate"] = exc.sqlstate
            except Exception as exc:  # noqa: BLE001
                outcome["error"] = f"{type(exc).__name__}: {exc}"
            outcome["ended"] = time.monotonic()

        worker = threading.Thread(target=run)
        worker.start()
        deadline = time.monotonic() + 15
        while True:
            held = watcher.execute(
                "select count(*) from pg_locks where locktype = 'advisory' and granted "
                "and classid = 0 and objid = %s",
                (key,),
            ).fetchone()[0]
            if held:
                break
            if time.monotonic() > deadline:
                raise AssertionError("the sleeping statement never started")
            time.sleep(0.05)
        sent = time.monotonic()
        cancel_error = None
        try:
            if method == "cancel_safe":
                conn.cancel_safe(timeout=10)
            else:
                conn.cancel()
        except psycopg.OperationalError as exc:
            cancel_error = str(exc).strip()
            # Did the cancel take effect anyway? Bounded wait, then stop the sleeper.
            worker.join(5)
            if worker.is_alive():
                conn.cancel()
                worker.join(15)
            raise AssertionError(
                f"conn.{method}() raised OperationalError: {cancel_error!r}; "
                f"the query itself ended with {outcome}"
            ) from exc
        worker.join(15)
        expect(not worker.is_alive(), "query ended after the cancel")
        expect(outcome.get("sqlstate") == "57014", f"query outcome {outcome}")
        latency = round((outcome["ended"] - sent) * 1000)
        # The session is still usable.
        expect(conn.execute("select 42").fetchone()[0] == 42, "session usable after cancel")
        return {"sqlstate": outcome["sqlstate"], "cancel_to_error_ms": latency}


@check("cancel_from_thread")
def _():
    # conn.cancel(): libpq's PQcancel, a plaintext CancelRequest.
    return cancel_with("cancel")


@check("cancel_safe")
def _():
    # conn.cancel_safe(): with libpq >= 17 the new cancel API (PQcancelCreate), which connects
    # with the same sslmode/sslnegotiation/certificate as the session.
    return cancel_with("cancel_safe")


@check("listen_notify")
def _():
    # Another session's notification, then its own: Notify.pid is then conn.info.backend_pid
    # (PQbackendPID, the pid of leasegate's key), the way an app skips its own notifications.
    with connect() as conn, connect() as other:
        conn.execute("listen lg_psycopg")
        other_pid = other.execute("select pg_backend_pid()").fetchone()[0]
        other.execute("notify lg_psycopg, 'theirs'")
        conn.execute("notify lg_psycopg, 'mine'")
        got = {}
        for n in conn.notifies(timeout=10, stop_after=2):
            got[n.payload] = n.pid
        expect(got.get("theirs") == other_pid, f"their pid {got} vs {other_pid}")
        expect(got.get("mine") == conn.info.backend_pid, f"own pid {got} vs {conn.info.backend_pid}")
        return {"own_pid": got["mine"], "their_pid": got["theirs"]}


if psycopg.pq.version() >= 170000:

    @check("direct_tls")
    def _():
        with connect(sslnegotiation="direct") as conn:
            expect(conn.pgconn.ssl_in_use, "TLS in use")
            one = conn.execute("select 1").fetchone()[0]
            expect(one == 1, "query over direct TLS")
            # leasegate refuses direct TLS without ALPN "postgresql", so this session proves
            # libpq negotiated it.
            return {"sslnegotiation": "direct"}
else:
    RESULT["checks"]["direct_tls"] = {
        "ok": True,
        "skipped": f"libpq {psycopg.pq.version()} < 17 has no sslnegotiation=direct",
    }

if psycopg.pq.version() >= 180000:

    @check("protocol_3_2_request")
    def _():
        # libpq 18 asks for protocol 3.2; leasegate answers NegotiateProtocolVersion (3.0) and
        # libpq must carry on with 3.0.
        with connect(max_protocol_version="3.2") as conn:
            full = conn.info.full_protocol_version
            expect(full == 30000, f"negotiated protocol {full}, expected 30000 (3.0)")
            expect(conn.execute("select 7").fetchone()[0] == 7, "query after the negotiation")
            return {"requested": "3.2", "negotiated": full}
else:
    RESULT["checks"]["protocol_3_2_request"] = {
        "ok": True,
        "skipped": f"libpq {psycopg.pq.version()} < 18 cannot request protocol 3.2",
    }

RESULT["ok"] = all(c.get("ok") for c in RESULT["checks"].values())
print(json.dumps(RESULT))
sys.exit(0 if RESULT["ok"] else 1)
