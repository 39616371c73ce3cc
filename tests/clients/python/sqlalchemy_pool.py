"""SQLAlchemy 2 with a pooled engine on psycopg 3 through leasegate (TLS verify-full with the
test client's certificate, from the LG_* variables): a transaction, pool_recycle replacing an
old connection at checkout, and a pooled connection that leasegate ends at the database's
max_session_duration (FATAL 57P01 while it sits idle in the pool): with pool_pre_ping the
next checkout replaces it unseen; without, the first use fails with 57P01, the pool discards
the connection and the next checkout works. LG_METRICS_URL is leasegate's /metrics, polled to
know when leasegate has ended the idle sessions. Prints one JSON line with the checks."""

import json
import os
import sys
import time
import urllib.request

import psycopg
import sqlalchemy
from sqlalchemy import create_engine, text

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lgconn  # noqa: E402


def engine(**options):
    p = lgconn.params()
    url = sqlalchemy.engine.URL.create(
        "postgresql+psycopg",
        username=p.pop("user"),
        host=p.pop("host"),
        port=int(p.pop("port")),
        database=p.pop("dbname"),
    )
    return create_engine(url, connect_args=p, pool_size=2, max_overflow=0, **options)


def backend_pid(eng):
    with eng.connect() as conn:
        return conn.execute(text("select pg_backend_pid()")).scalar_one()


def active_sessions():
    with urllib.request.urlopen(os.environ["LG_METRICS_URL"], timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("leasegate_sessions_active "):
                return float(line.split()[1])
    return None


def wait_sessions_ended(timeout):
    """Polls leasegate's metrics until no session is active (leasegate ended them)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if active_sessions() == 0:
            return True
        time.sleep(0.1)
    return False


def check_transaction():
    eng = engine(pool_pre_ping=True)
    with eng.begin() as conn:
        conn.execute(text("create temp table t (x int)"))
    with eng.connect() as conn:  # the same pooled connection: its temp table is there
        with conn.begin():
            conn.execute(text("insert into t values (1)"))
        trans = conn.begin()
        conn.execute(text("insert into t values (2)"))
        trans.rollback()
        rows = conn.execute(text("select count(*) from t")).scalar_one()
        user = conn.execute(text("select current_user")).scalar_one()
    eng.dispose()
    return {"ok": rows == 1, "rows": rows, "session_user": user}


def check_recycle():
    eng = engine(pool_recycle=1)
    first = backend_pid(eng)
    time.sleep(1.5)  # pool_recycle is a time: the connection must be older than 1 s
    second = backend_pid(eng)
    eng.dispose()
    return {"ok": first != second, "first_pid": first, "second_pid": second}


def check_max_lifetime(pre_ping):
    eng = engine(pool_pre_ping=pre_ping)
    first = backend_pid(eng)  # back in the pool, idle
    ended = wait_sessions_ended(30)
    out = {"leasegate_ended_it": ended, "first_pid": first}
    if not pre_ping:
        try:
            backend_pid(eng)
            out["first_use"] = "worked"
        except sqlalchemy.exc.OperationalError as e:
            orig = e.orig
            out["first_use_sqlstate"] = getattr(orig, "sqlstate", None)
            out["first_use_message"] = str(orig).strip().splitlines()[0] if str(orig) else ""
            out["invalidated"] = e.connection_invalidated
    second = backend_pid(eng)
    out["second_pid"] = second
    eng.dispose()
    ok = ended and second != first
    if not pre_ping:
        ok = ok and out.get("first_use_sqlstate") == "57P01"
    out["ok"] = ok
    return out


def main():
    checks = {}
    for name, fn in [
        ("transaction", check_transaction),
        ("pool_recycle", check_recycle),
        ("max_lifetime_pre_ping", lambda: check_max_lifetime(True)),
        ("max_lifetime_no_pre_ping", lambda: check_max_lifetime(False)),
    ]:
        try:
            checks[name] = fn()
        except Exception as e:  # reported, not raised: the test names the failed check
            checks[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    print(
        json.dumps(
            {
                "sqlalchemy": sqlalchemy.__version__,
                "psycopg": psycopg.__version__,
                "python": sys.version.split()[0],
                "checks": checks,
            }
        )
    )


if __name__ == "__main__":
    main()
