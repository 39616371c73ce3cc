#!/usr/bin/env python3
"""pg8000 (pure Python: it builds every protocol message itself, no libpq) through leasegate,
TLS with certificate verification (an ssl.SSLContext with the CA, host-name check and the
client's certificate) and a client certificate.

pg8000 frames the extended protocol its own way: Parse+Sync, then Describe+Sync with Bind and
Flush sent before the second ReadyForQuery is read, then Execute+Flush+Sync; COPY FROM STDIN
also runs through that sequence and ends with CopyDone+Sync. Driven by
tests/integration/compat_pg8000.rs; the connection comes from the LG_* variables (lgconn.py).

Prints one JSON line {"ok": ..., "checks": {...}, versions...} and exits 0 only when every
check passed. Install: pip install -r tests/clients/python/requirements.txt
"""

import collections
import datetime
import decimal
import io
import json
import ssl
import struct
import sys
import time
import traceback
import uuid

import lgconn

try:
    import pg8000
    import pg8000.dbapi
    import pg8000.native
except ImportError as exc:  # pragma: no cover - reported to the Rust test
    print(json.dumps({"ok": False, "error": f"pg8000 not importable: {exc}; "
                      "run `pip install -r tests/clients/python/requirements.txt`"}))
    sys.exit(2)

RESULT = {
    "client": "pg8000",
    "pg8000": pg8000.__version__,
    "python": sys.version.split()[0],
    "checks": {},
}


def tls(cafile=None):
    """verify-full: the CA, the host name, and the client's certificate and key."""
    ctx = ssl.create_default_context(cafile=cafile or lgconn.env("LG_SSLROOTCERT"))
    ctx.load_cert_chain(lgconn.env("LG_SSLCERT"), lgconn.env("LG_SSLKEY"))
    return ctx


def conn_args(**kw):
    # pg8000 passes `host` as the TLS server name: LG_HOST is the name in leasegate's
    # certificate ("localhost", which resolves to LG_HOSTADDR).
    args = {"user": lgconn.env("LG_USER"), "host": lgconn.env("LG_HOST"),
            "port": int(lgconn.env("LG_PORT")), "database": lgconn.env("LG_DBNAME"),
            "ssl_context": tls(), "timeout": 30}
    args.update(kw)
    return args


def connect(**kw):
    return pg8000.native.Connection(**conn_args(**kw))


def key_pid(con):
    """The pid of the BackendKeyData the server (leasegate) sent."""
    return struct.unpack("!i", con._backend_key_data[:4])[0]


def sqlstate(exc):
    return exc.args[0].get("C") if exc.args and isinstance(exc.args[0], dict) else None


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
    con = connect()
    try:
        (user, backend), = con.run("select current_user::text, pg_backend_pid()")
        expect(user != lgconn.env("LG_USER"), f"session user {user} is a dynamic role")
        details = {"session_user": user, "backend_pid": backend, "key_pid": key_pid(con),
                   "password_asked": False}
    finally:
        con.close()
    # TLS 1.2 works too (leasegate offers 1.2 and 1.3).
    tls12 = tls()
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    con = pg8000.native.Connection(**conn_args(ssl_context=tls12))
    try:
        expect(con.run("select 1") == [[1]], "a query over TLS 1.2")
        details["tls12"] = con._usock.version()
    finally:
        con.close()
    # Negative control: a CA that did not sign leasegate's certificate is refused.
    untrusted = ssl.create_default_context()
    untrusted.load_cert_chain(lgconn.env("LG_SSLCERT"), lgconn.env("LG_SSLKEY"))
    try:
        pg8000.native.Connection(**conn_args(ssl_context=untrusted)).close()
    except pg8000.InterfaceError as exc:
        cause = exc.__cause__ or exc.__context__
        expect(isinstance(cause, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY" in str(exc),
               f"untrusted CA refused for another reason: {exc!r} ({cause!r})")
        details["untrusted_ca_refused"] = str(cause or exc)[:200]
    except ssl.SSLCertVerificationError as exc:
        details["untrusted_ca_refused"] = str(exc)[:200]
    else:
        raise AssertionError("a server certificate from an untrusted CA was accepted")
    return details


def queries():
    con = connect()
    try:
        # Simple query protocol (no parameters): several statements in one Query message.
        con.run("create temp table q (id int primary key, v text); insert into q values (1, 'one')")
        expect(con.run("select v from q") == [["one"]], "simple query")
        # Extended protocol with pg8000's native :name parameters (sent as text, typed by
        # the server), results decoded from text.
        when = datetime.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=datetime.timezone.utc)
        u = uuid.UUID("12345678-1234-5678-1234-567812345678")
        row, = con.run(
            "select :i::int + 1, :t::text || '!', :b::bytea, :n::numeric * 2, :ts::timestamptz,"
            " :u::uuid, :arr::int[], :j::jsonb, :flag::bool, :nul::text",
            i=41, t="héllo", b=b"\x00\x01\xffbin", n=decimal.Decimal("12.25"), ts=when, u=u,
            arr=[1, 2, 3], j=json.dumps({"k": [1, None]}), flag=True, nul=None)
        expect(row[0] == 42 and row[1] == "héllo!", f"int/text {row[:2]}")
        expect(row[2] == b"\x00\x01\xffbin", f"bytea {row[2]!r}")
        expect(row[3] == decimal.Decimal("24.50"), f"numeric {row[3]!r}")
        expect(row[4] == when, f"timestamptz {row[4]!r}")
        expect(row[5] == u and row[6] == [1, 2, 3], f"uuid/array {row[5:7]}")
        expect(row[7] == {"k": [1, None]} and row[8] is True and row[9] is None, f"json/bool/null {row[7:]}")
        # A value of 3 MiB as a parameter and back.
        big = "x" * (3 << 20)
        n, = con.run("select length(:s)", s=big)[0]
        expect(n == len(big), f"3 MiB parameter length {n}")
        # Explicitly typed parameters (pg8000 sends the OIDs in Parse).
        t, = con.run("select pg_typeof(:v)::text", v="7", types={"v": pg8000.native.INTEGER})[0]
        expect(t == "integer", f"typed parameter is {t}")
        # DB-API 2.0 (paramstyle format): cursor.execute and executemany.
        db = pg8000.dbapi.Connection(**conn_args())
        try:
            cur = db.cursor()
            cur.execute("create temp table d (a int, b text)")
            cur.executemany("insert into d values (%s, %s)", [(i, str(i)) for i in range(50)])
            cur.execute("select count(*), sum(a) from d where b <> %s", ("none",))
            count, total = cur.fetchone()
            expect((count, total) == (50, sum(range(50))), f"executemany {count} {total}")
            db.commit()
        finally:
            db.close()
        return {"paramstyle": pg8000.dbapi.paramstyle, "rows": count}
    finally:
        con.close()


def prepared_statements():
    con = connect()
    try:
        ps = con.prepare("select :a::int * 2, :b::text || '?'")
        rows = [ps.run(a=i, b=f"x{i}")[0] for i in range(10)]
        expect(rows == [[i * 2, f"x{i}?"] for i in range(10)], f"prepared results {rows}")
        n = con.run("select count(*) from pg_prepared_statements")[0][0]
        expect(n == 1, f"{n} server-side prepared statements")
        ps.close()
        n = con.run("select count(*) from pg_prepared_statements")[0][0]
        expect(n == 0, f"{n} prepared statements after close")
        # A statement that fails to parse does not break the session.
        try:
            con.prepare("selec 1")
            raise AssertionError("a syntax error was prepared")
        except pg8000.native.DatabaseError as exc:
            expect(sqlstate(exc) == "42601", f"sqlstate {sqlstate(exc)}")
        expect(con.run("select 5") == [[5]], "session after a failed prepare")
        return {"runs": len(rows)}
    finally:
        con.close()


def errors_and_transactions():
    con = connect()
    try:
        con.run("create temp table tx (id int primary key, v text)")
        con.run("insert into tx values (1, 'a')")
        codes = {}
        for what, sql, params in (("unique_violation", "insert into tx values (:i, 'b')", {"i": 1}),
                                  ("division_by_zero", "select 1/0", {}),
                                  ("division_by_zero_extended", "select 1/:z::int", {"z": 0})):
            try:
                con.run(sql, **params)
                raise AssertionError(f"{what} accepted")
            except pg8000.native.DatabaseError as exc:
                codes[what] = sqlstate(exc)
        expect(codes == {"unique_violation": "23505", "division_by_zero": "22012",
                         "division_by_zero_extended": "22012"}, f"sqlstates {codes}")
        # Transaction with a savepoint rolled back to after an error inside it.
        con.run("begin")
        con.run("insert into tx values (2, 'kept')")
        con.run("savepoint s1")
        try:
            con.run("insert into tx values (:i, 'dup')", i=2)
            raise AssertionError("duplicate accepted")
        except pg8000.native.DatabaseError as exc:
            expect(sqlstate(exc) == "23505", f"in savepoint {sqlstate(exc)}")
        con.run("rollback to savepoint s1")
        con.run("insert into tx values (3, 'after savepoint')")
        con.run("commit")
        con.run("begin")
        con.run("insert into tx values (4, 'rolled back')")
        con.run("rollback")
        ids = [r[0] for r in con.run("select id from tx order by id")]
        expect(ids == [1, 2, 3], f"committed rows {ids}")
        # DB-API: an error rolls back with the connection's rollback(), then it goes on.
        db = pg8000.dbapi.Connection(**conn_args())
        try:
            cur = db.cursor()
            try:
                cur.execute("select 1/0")
                raise AssertionError("division by zero accepted")
            except pg8000.dbapi.DatabaseError as exc:
                codes["dbapi"] = sqlstate(exc)
            db.rollback()
            cur.execute("select 7")
            expect(cur.fetchone() == [7], "dbapi after rollback")
        finally:
            db.close()
        expect(codes["dbapi"] == "22012", f"dbapi sqlstate {codes['dbapi']}")
        return {"sqlstates": codes, "ids": ids}
    finally:
        con.close()


def copy():
    con = connect()
    try:
        con.run("create temp table cp (a int, b text)")
        data = "".join(f"{i}\tr{i}\n" for i in range(20000))
        con.run("copy cp from stdin", stream=io.StringIO(data))
        expect(con.row_count == 20000, f"COPY IN row count {con.row_count}")
        # COPY FROM STDIN from an iterable of chunks (one CopyData each).
        con.run("copy cp from stdin", stream=[f"{i}\tit{i}\n" for i in range(100000, 100100)])
        n = con.run("select count(*) from cp")[0][0]
        expect(n == 20100, f"{n} rows after COPY IN")
        out = io.BytesIO()
        con.run("copy (select a, b from cp where a < 3 order by a) to stdout", stream=out)
        expect(out.getvalue() == b"0\tr0\n1\tr1\n2\tr2\n", f"COPY OUT {out.getvalue()!r}")
        text = io.StringIO()
        con.run("copy (select a from cp order by a) to stdout with (format csv)", stream=text)
        expect(len(text.getvalue().splitlines()) == 20100, "COPY OUT csv lines")
        # Binary COPY out.
        raw = io.BytesIO()
        con.run("copy (select 1::int) to stdout with (format binary)", stream=raw)
        expect(raw.getvalue().startswith(b"PGCOPY\n\xff\r\n\x00"), f"binary COPY {raw.getvalue()[:12]!r}")
        # A COPY that fails mid-stream (bad row) reports 22P02 and the session goes on.
        try:
            con.run("copy cp from stdin", stream=io.StringIO("1\tok\nnot-a-number\tbad\n"))
            raise AssertionError("a bad COPY row was accepted")
        except pg8000.native.DatabaseError as exc:
            expect(sqlstate(exc) == "22P02", f"bad COPY sqlstate {sqlstate(exc)}")
        expect(con.run("select count(*) from cp")[0][0] == 20100, "failed COPY left no rows")
        return {"copy_in": n, "copy_out_csv_bytes": len(text.getvalue())}
    finally:
        con.close()


def wait_notification(con, channel, deadline=10.0):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        for n in list(con.notifications):
            if n[1] == channel:
                return n
        con.run("select 1")  # pg8000 reads notifications that arrive with a reply
        time.sleep(0.05)
    raise AssertionError(f"no notification on {channel} within {deadline} s")


def listen_notify():
    con = connect()
    other = connect()
    try:
        con.run("listen lg_compat")
        other.run("select pg_notify('lg_compat', :p)", p="hello")
        other_backend = other.run("select pg_backend_pid()")[0][0]
        pid, _, payload = wait_notification(con, "lg_compat")
        expect(payload == "hello", f"payload {payload}")
        expect(pid == other_backend, f"another session's notification has pid {pid}, its backend is {other_backend}")
        # The session's own notification carries the pid of the BackendKeyData leasegate sent.
        con.run("listen lg_own")
        con.run("notify lg_own, 'mine'")
        own, _, _ = wait_notification(con, "lg_own")
        expect(own == key_pid(con), f"own notification pid {own} vs key pid {key_pid(con)}")
        return {"own_pid": own, "key_pid": key_pid(con), "other_pid": pid}
    finally:
        con.close()
        other.close()


def notify_burst():
    """20000 own notifications delivered at one commit: the server writes them back to back,
    so leasegate's reads of the upstream end at every offset of a NotificationResponse, pid
    included. Every one must carry the key's pid."""
    con = connect()
    try:
        con.notifications = collections.deque()  # pg8000 keeps the last 100 by default
        con.run("listen lg_burst")
        con.run("begin")
        con.run("select count(pg_notify('lg_burst', repeat('x', g % 13) || g)) from generate_series(1, 20000) g")
        con.run("commit")
        end = time.monotonic() + 20
        while len(con.notifications) < 20000 and time.monotonic() < end:
            con.run("select 1")
        pids = collections.Counter(n[0] for n in con.notifications)
        expect(len(con.notifications) == 20000, f"{len(con.notifications)} of 20000 notifications")
        expect(set(pids) == {key_pid(con)}, f"pids {dict(pids)}, key pid {key_pid(con)}")
        return {"notifications": len(con.notifications)}
    finally:
        con.close()


def startup_settings():
    con = connect(application_name="pg8000-compat",
                  startup_params={"search_path": "pg_catalog,public", "TimeZone": "UTC"})
    try:
        app, path, tz = con.run("select current_setting('application_name'),"
                                " current_setting('search_path'), current_setting('TimeZone')")[0]
        expect(app == "pg8000-compat", f"application_name {app}")
        expect(path.replace(" ", "") == "pg_catalog,public", f"search_path {path}")
        expect(tz == "UTC", f"TimeZone {tz}")
        con.run("set application_name = 'renamed'")
        expect(con.parameter_statuses.get("application_name") == "renamed",
               f"ParameterStatus after SET: {con.parameter_statuses.get('application_name')}")
    finally:
        con.close()
    # Values as PostgreSQL takes them: non-ASCII (application_name keeps printable ASCII only,
    # '?' for each other byte) and a quoted schema name with a space, a comma and a 'ü'.
    con = connect(application_name="pg8000-ünï", startup_params={"search_path": '"my schema, ü", public'})
    try:
        app2, path2 = con.run("select current_setting('application_name'), current_setting('search_path')")[0]
        expect(app2 == "pg8000-??n??", f"non-ASCII application_name {app2!r}")
        expect(path2 == '"my schema, ü", public', f"quoted search_path {path2!r}")
    finally:
        con.close()
    return {"application_name": app, "non_ascii_application_name": app2}


for name, fn in (("verify_full_tls", verify_full_tls), ("queries", queries),
                 ("prepared_statements", prepared_statements),
                 ("errors_and_transactions", errors_and_transactions), ("copy", copy),
                 ("listen_notify", listen_notify), ("notify_burst", notify_burst),
                 ("startup_settings", startup_settings)):
    check(name, fn)

RESULT["ok"] = all(c.get("ok") for c in RESULT["checks"].values())
print(json.dumps(RESULT))
sys.exit(0 if RESULT["ok"] else 1)
