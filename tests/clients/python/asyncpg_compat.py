#!/usr/bin/env python3
"""asyncpg (Python, its own implementation of the protocol: no libpq) through leasegate, TLS
with certificate verification and a client certificate.

Driven by tests/integration/compat_asyncpg.rs. The connection comes from the environment
(see lgconn.py): LG_HOST (name the server certificate must match), LG_HOSTADDR, LG_PORT,
LG_DBNAME, LG_USER (the Vault role), LG_SSLROOTCERT, LG_SSLCERT, LG_SSLKEY.

Prints one JSON line {"ok": ..., "checks": {...}, versions...} and exits 0 only when every
check passed. Install: pip install -r tests/clients/python/requirements.txt
"""

import asyncio
import json
import ssl
import sys
import time
import traceback

import lgconn

try:
    import asyncpg
except ImportError as exc:  # pragma: no cover - reported to the Rust test
    print(json.dumps({"ok": False, "error": f"asyncpg not importable: {exc}; "
                      "run `pip install -r tests/clients/python/requirements.txt`"}))
    sys.exit(2)

RESULT = {
    "client": "asyncpg",
    "asyncpg": asyncpg.__version__,
    "python": sys.version.split()[0],
    "checks": {},
}


def tls():
    """verify-full: the CA, the host name, and the client's certificate and key."""
    ctx = ssl.create_default_context(cafile=lgconn.env("LG_SSLROOTCERT"))
    ctx.load_cert_chain(lgconn.env("LG_SSLCERT"), lgconn.env("LG_SSLKEY"))
    return ctx


async def connect(**kw):
    # The certificate names LG_HOST; asyncpg checks the name it connects to, so LG_HOST must
    # resolve to LG_HOSTADDR (it is "localhost").
    return await asyncpg.connect(host=lgconn.env("LG_HOST"), port=int(lgconn.env("LG_PORT")),
                                 user=lgconn.env("LG_USER"), database=lgconn.env("LG_DBNAME"),
                                 ssl=tls(), timeout=15, **kw)


def expect(cond, what):
    if not cond:
        raise AssertionError(what)


async def check(name, fn):
    started = time.monotonic()
    try:
        details = await asyncio.wait_for(fn(), 60) or {}
    except Exception as exc:  # noqa: BLE001 - everything is reported
        RESULT["checks"][name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                                  "traceback": traceback.format_exc()}
        return
    details["ok"] = True
    details["ms"] = round((time.monotonic() - started) * 1000)
    RESULT["checks"][name] = details


async def verify_full_tls():
    conn = await connect()
    try:
        user = await conn.fetchval("select current_user::text")
        expect(user != lgconn.env("LG_USER"), f"session user {user} is a dynamic role, not the Vault role")
        details = {"session_user": user, "server_version": conn.get_server_version().major}
    finally:
        await conn.close()
    # Negative control: with only the system's CAs trusted, leasegate's certificate is refused.
    untrusted = ssl.create_default_context()
    untrusted.load_cert_chain(lgconn.env("LG_SSLCERT"), lgconn.env("LG_SSLKEY"))
    try:
        await (await asyncpg.connect(host=lgconn.env("LG_HOST"), port=int(lgconn.env("LG_PORT")),
                                     user=lgconn.env("LG_USER"), database=lgconn.env("LG_DBNAME"),
                                     ssl=untrusted, timeout=15)).close()
    except ssl.SSLCertVerificationError as exc:
        details["untrusted_ca_refused"] = str(exc)[:200]
    else:
        raise AssertionError("a server certificate from an untrusted CA was accepted")
    return details


async def transactions():
    conn = await connect()
    try:
        await conn.execute("create temp table tx (id int primary key, v text)")
        async with conn.transaction():
            await conn.execute("insert into tx values (1, 'a'), (2, 'b')")
        try:
            async with conn.transaction():
                await conn.execute("insert into tx values (3, 'rolled back')")
                raise RuntimeError("abort this block")
        except RuntimeError:
            pass
        try:
            await conn.execute("insert into tx values (1, 'duplicate')")
            raise AssertionError("duplicate key accepted")
        except asyncpg.UniqueViolationError as exc:
            expect(exc.sqlstate == "23505", f"sqlstate {exc.sqlstate}")
        async with conn.transaction():
            await conn.execute("insert into tx values (6, 'outer')")
            try:
                async with conn.transaction():  # a savepoint
                    await conn.execute("insert into tx values (7, 'inner')")
                    raise RuntimeError("roll back the savepoint")
            except RuntimeError:
                pass
        ids = [r["id"] for r in await conn.fetch("select id from tx order by id")]
        expect(ids == [1, 2, 6], f"committed rows {ids}")
        try:
            await conn.execute("select 1/0")
            raise AssertionError("division by zero accepted")
        except asyncpg.DivisionByZeroError as exc:
            expect(exc.sqlstate == "22012", f"sqlstate {exc.sqlstate}")
        expect(await conn.fetchval("select 2") == 2, "the session goes on after an error")
        return {"ids": ids}
    finally:
        await conn.close()


async def prepared_statements():
    conn = await connect()
    try:
        stmt = await conn.prepare("select $1::int * 2 as d, $2::text || '!' as t")
        rows = [await stmt.fetchrow(i, f"x{i}") for i in range(10)]
        expect([r["d"] for r in rows] == [i * 2 for i in range(10)], "prepared results")
        await conn.execute("create temp table em (a int, b text)")
        await conn.executemany("insert into em values ($1, $2)", [(i, str(i)) for i in range(50)])
        n = await conn.fetchval("select count(*) from em")
        expect(n == 50, f"executemany inserted {n}")
        # Types asyncpg decodes in binary: arrays, json, timestamps, numerics.
        arr, num = await conn.fetchrow("select array[1,2,3]::int[], 12.50::numeric")
        expect(list(arr) == [1, 2, 3] and str(num) == "12.50", f"binary types {arr} {num}")
        return {"executemany_rows": n}
    finally:
        await conn.close()


async def cursor_and_copy():
    conn = await connect()
    try:
        async with conn.transaction():
            cur = await conn.cursor("select g from generate_series(1, 1000) g")
            first = await cur.fetch(100)
            await cur.forward(800)
            rest = await cur.fetch(500)
        expect([r["g"] for r in first] == list(range(1, 101)), "cursor fetch")
        expect([r["g"] for r in rest] == list(range(901, 1001)), "cursor after forward")
        await conn.execute("create temp table cp (a int, b text)")
        copied = await conn.copy_records_to_table("cp", records=[(i, f"r{i}") for i in range(500)])
        out = []

        async def sink(chunk):
            out.append(chunk)

        await conn.copy_from_query("select a from cp where a < 3 order by a", output=sink)
        expect(b"".join(out) == b"0\n1\n2\n", f"COPY TO {b''.join(out)!r}")
        return {"copy_in": copied}
    finally:
        await conn.close()


async def cancel_by_timeout():
    # A query timeout makes asyncpg send a CancelRequest on a new (TLS) connection to the same
    # address, then wait for the backend to answer: the session is usable at once.
    conn = await connect()
    try:
        started = time.monotonic()
        try:
            await conn.fetchval("select pg_sleep(30)", timeout=0.5)
            raise AssertionError("pg_sleep(30) returned within its 0.5 s timeout")
        except asyncio.TimeoutError:
            pass
        expect(await conn.fetchval("select 3") == 3, "the session after the cancel")
        took = time.monotonic() - started
        expect(took < 10, f"the cancel took {took:.1f} s: the statement ran on")
        return {"seconds": round(took, 2)}
    finally:
        await conn.close()


async def settings_and_notify():
    conn = await connect(server_settings={"application_name": "asyncpg-compat", "search_path": "pg_catalog,public"})
    other = await connect()
    try:
        app = await conn.fetchval("show application_name")
        path = await conn.fetchval("show search_path")
        expect(app == "asyncpg-compat", f"application_name {app}")
        expect(path.replace(" ", "") == "pg_catalog,public", f"search_path {path}")
        got = asyncio.get_running_loop().create_future()
        await conn.add_listener("lg_compat", lambda *args: got.done() or got.set_result(args[3]))
        await other.execute("notify lg_compat, 'hello'")
        payload = await asyncio.wait_for(got, 10)
        expect(payload == "hello", f"notification payload {payload}")
        # Its own notification: the listener callback's pid is get_server_pid() (the pid of
        # the BackendKeyData leasegate sent).
        mine = asyncio.get_running_loop().create_future()
        await conn.add_listener("lg_own", lambda _c, pid, _ch, _p: mine.done() or mine.set_result(pid))
        await conn.execute("notify lg_own, 'mine'")
        own_pid = await asyncio.wait_for(mine, 10)
        expect(own_pid == conn.get_server_pid(), f"own pid {own_pid} vs {conn.get_server_pid()}")
        return {"application_name": app, "notification": payload, "own_pid": own_pid}
    finally:
        await conn.close()
        await other.close()


async def pool():
    # A pool resets each connection it gets back (RESET ALL, UNLISTEN, advisory unlocks...).
    p = await asyncpg.create_pool(host=lgconn.env("LG_HOST"), port=int(lgconn.env("LG_PORT")),
                                  user=lgconn.env("LG_USER"), database=lgconn.env("LG_DBNAME"),
                                  ssl=tls(), min_size=2, max_size=4, timeout=15)
    try:
        pids = await asyncio.gather(*[p.fetchval("select pg_backend_pid()") for _ in range(16)])
        async with p.acquire() as c:
            await c.execute("set statement_timeout = '7s'")
        async with p.acquire() as c:
            t = await c.fetchval("show statement_timeout")
        expect(t == "0", f"the pool reset the setting: statement_timeout {t}")
        expect(1 <= len(set(pids)) <= 4, f"backends {sorted(set(pids))}")
        return {"backends": len(set(pids))}
    finally:
        await asyncio.wait_for(p.close(), 20)


async def main():
    for name, fn in (("verify_full_tls", verify_full_tls), ("transactions", transactions),
                     ("prepared_statements", prepared_statements), ("cursor_and_copy", cursor_and_copy),
                     ("cancel_by_timeout", cancel_by_timeout), ("settings_and_notify", settings_and_notify),
                     ("pool", pool)):
        await check(name, fn)


asyncio.run(main())
RESULT["ok"] = all(c.get("ok") for c in RESULT["checks"].values())
print(json.dumps(RESULT))
sys.exit(0 if RESULT["ok"] else 1)
