#!/usr/bin/env python3
"""psycopg2 (Debian python3-psycopg2, on the system libpq) through leasegate with
sslmode=verify-full and a client certificate: a query, parameterised queries (psycopg2
interpolates them client-side) and SQL PREPARE/EXECUTE, SQLSTATEs (pgcode), COPY in and out
(copy_expert), conn.cancel() (libpq PQcancel: a plaintext CancelRequest) → 57014, and
LISTEN/NOTIFY with the session's own pid.

Driven by tests/integration/compat_psycopg2.rs; the connection comes from the LG_* variables
(lgconn.py). Prints one JSON line {"ok": ..., "checks": {...}} and exits 0 only when every
check passed. Install: apt-get install python3-psycopg2 (run with /usr/bin/python3).
"""

import io
import json
import select
import sys
import threading
import time
import traceback

import lgconn

try:
    import psycopg2
    import psycopg2.errors
    import psycopg2.extensions
except ImportError as exc:  # pragma: no cover - reported to the Rust test
    print(json.dumps({"ok": False, "error": f"psycopg2 not importable: {exc}; apt-get install python3-psycopg2"}))
    sys.exit(2)

RESULT = {
    "client": "psycopg2",
    "psycopg2": psycopg2.__version__.split()[0],
    "libpq": psycopg2.extensions.libpq_version(),
    "python": sys.version.split()[0],
    "checks": {},
}


def connect(**override):
    return psycopg2.connect(**lgconn.params(**override))


def expect(cond, what):
    if not cond:
        raise AssertionError(what)


def check(name, fn):
    started = time.monotonic()
    try:
        details = fn() or {}
    except Exception as exc:  # noqa: BLE001 - everything is reported
        RESULT["checks"][name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                                  "traceback": traceback.format_exc()}
        return
    details["ok"] = True
    details["ms"] = round((time.monotonic() - started) * 1000)
    RESULT["checks"][name] = details


def verify_full_tls():
    with connect() as conn, conn.cursor() as cur:
        cur.execute("select current_user::text")
        user = cur.fetchone()[0]
        expect(user != lgconn.env("LG_USER"), f"session user {user} is a dynamic role")
        expect(conn.info.ssl_in_use, "TLS in use")
    conn.close()
    try:
        psycopg2.connect(**lgconn.params(host="wrong.example")).close()
        raise AssertionError("a wrong host name was accepted")
    except psycopg2.OperationalError as exc:
        refused = str(exc).strip()[:200]
    return {"session_user": user, "wrong_name_refused": refused}


def queries():
    conn = connect()
    try:
        cur = conn.cursor()
        cur.execute("create temp table q (id int primary key, v text)")
        cur.execute("insert into q values (%s, %s), (%s, %s)", (1, "one", 2, "two's"))
        cur.execute("select v from q where id = %(id)s", {"id": 2})
        expect(cur.fetchone() == ("two's",), "parameterised query")
        cur.execute("prepare byid (int) as select v from q where id = $1")
        cur.execute("execute byid (%s)", (1,))
        expect(cur.fetchone() == ("one",), "EXECUTE of a prepared statement")
        codes = {}
        for what, sql in (("unique_violation", "insert into q values (1, 'dup')"),
                          ("division_by_zero", "select 1/0")):
            try:
                cur.execute(sql)
                raise AssertionError(f"{what} accepted")
            except psycopg2.Error as exc:
                codes[what] = exc.pgcode
                conn.rollback()
        expect(codes == {"unique_violation": "23505", "division_by_zero": "22012"}, f"codes {codes}")
        cur.execute("select 1")
        expect(cur.fetchone() == (1,), "usable after errors")
        conn.commit()
        return {"sqlstates": codes}
    finally:
        conn.close()


def copy():
    conn = connect()
    try:
        cur = conn.cursor()
        cur.execute("create temp table cp (a int, b text)")
        cur.copy_expert("copy cp from stdin", io.StringIO("".join(f"{i}\tr{i}\n" for i in range(20000))))
        cur.execute("select count(*) from cp")
        n = cur.fetchone()[0]
        expect(n == 20000, f"COPY IN {n}")
        out = io.StringIO()
        cur.copy_expert("copy (select a, b from cp where a < 3 order by a) to stdout", out)
        expect(out.getvalue() == "0\tr0\n1\tr1\n2\tr2\n", f"COPY OUT {out.getvalue()!r}")
        return {"copy_in": n}
    finally:
        conn.close()


def cancel():
    conn = connect()
    try:
        cur = conn.cursor()
        timer = threading.Timer(0.3, conn.cancel)
        timer.start()
        started = time.monotonic()
        try:
            cur.execute("select pg_sleep(30)")
            raise AssertionError("pg_sleep(30) was not cancelled")
        except psycopg2.errors.QueryCanceled as exc:
            code = exc.pgcode
        took = time.monotonic() - started
        conn.rollback()
        expect(code == "57014" and took < 10, f"cancel {code} after {took:.1f} s")
        cur.execute("select 2")
        expect(cur.fetchone() == (2,), "usable after the cancel")
        return {"sqlstate": code, "seconds": round(took, 2)}
    finally:
        conn.close()


def large_object():
    # libpq's lo_* functions: the FunctionCall message (fastpath), one ReadyForQuery each.
    conn = connect()
    try:
        lob = conn.lobject(0, "wb")
        data = bytes(range(256)) * 4096  # 1 MiB
        lob.write(data)
        oid = lob.oid
        lob.close()
        conn.commit()
        lob = conn.lobject(oid, "rb")
        back = lob.read()
        lob.close()
        expect(back == data, f"large object read back {len(back)} bytes")
        conn.lobject(oid).unlink()
        conn.commit()
        cur = conn.cursor()
        cur.execute("select count(*) from pg_largeobject_metadata where oid = %s", (oid,))
        expect(cur.fetchone() == (0,), "unlinked")
        conn.commit()
        return {"bytes": len(back)}
    finally:
        conn.close()


def listen_notify():
    conn = connect()
    try:
        conn.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_AUTOCOMMIT)
        cur = conn.cursor()
        cur.execute("listen lg_own")
        cur.execute("notify lg_own, 'mine'")
        end = time.monotonic() + 10
        while not conn.notifies and time.monotonic() < end:
            select.select([conn], [], [], 0.5)
            conn.poll()
        expect(conn.notifies, "no own notification within 10 s")
        n = conn.notifies.pop(0)
        expect(n.pid == conn.info.backend_pid, f"own pid {n.pid} vs backend_pid {conn.info.backend_pid}")
        return {"own_pid": n.pid, "key_pid": conn.info.backend_pid}
    finally:
        conn.close()


for name, fn in (("verify_full_tls", verify_full_tls), ("queries", queries), ("copy", copy),
                 ("cancel", cancel), ("large_object", large_object),
                 ("listen_notify", listen_notify)):
    check(name, fn)

RESULT["ok"] = all(c.get("ok") for c in RESULT["checks"].values())
print(json.dumps(RESULT))
sys.exit(0 if RESULT["ok"] else 1)
