#!/usr/bin/env python3
"""psycopg 3 (libpq) startup parameters through leasegate: allowed settings (libpq `options`
with backslash escapes, application_name, fallback_application_name) reach the server, and
`options` with post_auth_delay is refused before anything is issued.

Driven by tests/integration/sec_params.rs; the connection comes from the same LG_* variables
as psycopg_compat.py. Prints one JSON line {"ok": ..., "checks": {...}} and exits 0 only when
every check passed.
"""

import json
import sys
import traceback

import lgconn

try:
    import psycopg
except ImportError as exc:  # pragma: no cover - reported to the Rust test
    print(json.dumps({"ok": False, "error": f"psycopg not importable: {exc}"}))
    sys.exit(2)

RESULT = {"client": "psycopg", "psycopg": psycopg.__version__, "checks": {}}


def connect(**params):
    return psycopg.connect(psycopg.conninfo.make_conninfo(**lgconn.params(**params)), autocommit=True)


def settings(conn, *names):
    row = conn.execute(
        "select " + ", ".join("current_setting(%s)" for _ in names), names
    ).fetchone()
    return dict(zip(names, row))


def check(name, fn):
    try:
        RESULT["checks"][name] = dict(fn() or {}, ok=True)
    except Exception as exc:  # noqa: BLE001 - everything is reported
        RESULT["checks"][name] = {
            "ok": False,
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(),
        }


def expect(cond, what):
    if not cond:
        raise AssertionError(what)


def allowed():
    with connect(
        application_name="psycopg-params",
        options=r"-c statement_timeout=1234 -c search_path=a\,\ b --lock-timeout=4321",
    ) as conn:
        got = settings(conn, "application_name", "statement_timeout", "search_path", "lock_timeout")
    want = {
        "application_name": "psycopg-params",
        "statement_timeout": "1234ms",
        "search_path": "a, b",
        "lock_timeout": "4321ms",
    }
    expect(got == want, f"settings {got}, expected {want}")
    return got


def fallback():
    with connect(fallback_application_name="psycopg-fallback") as conn:
        got = settings(conn, "application_name")
    expect(got["application_name"] == "psycopg-fallback", f"application_name {got}")
    return got


def refused():
    try:
        connect(options="-c post_auth_delay=2").close()
    except psycopg.OperationalError as exc:
        msg = str(exc)
        expect("post_auth_delay" in msg and "not allowed" in msg, f"refusal names it: {msg}")
        return {"message": msg.strip().splitlines()[-1][:200], "sqlstate": exc.sqlstate}
    raise AssertionError("options=-c post_auth_delay=2 was accepted")


check("allowed", allowed)
check("fallback_application_name", fallback)
check("post_auth_delay_refused", refused)
RESULT["ok"] = all(c.get("ok") for c in RESULT["checks"].values())
print(json.dumps(RESULT))
sys.exit(0 if RESULT["ok"] else 1)
