"""psycopg 3 through leasegate's Unix socket: no certificate, no password; the kernel tells
leasegate who the process is. Connects to LG_SOCKET_DIR / LG_PORT as LG_USER on LG_DBNAME,
reads current_user and whether it is in pg_roles, runs a transaction, and prints one JSON
line: {"ok": true, ...} or {"ok": false, "sqlstate": ..., "message": ...}.

With LG_AS_UID (and LG_AS_GID), the script imports psycopg first and then becomes that user
(dropping supplementary groups), so that an unprivileged OS user can be tested with a psycopg
installed where only root can read it."""

import json
import os

import psycopg


def become(uid, gid):
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)


def main():
    if os.environ.get("LG_AS_UID"):
        uid = int(os.environ["LG_AS_UID"])
        become(uid, int(os.environ.get("LG_AS_GID", uid)))
    out = {
        "psycopg": psycopg.__version__,
        "libpq": psycopg.pq.version(),
        "uid": os.getuid(),
    }
    params = {
        "host": os.environ["LG_SOCKET_DIR"],
        "port": os.environ["LG_PORT"],
        "dbname": os.environ["LG_DBNAME"],
        "user": os.environ["LG_USER"],
        "connect_timeout": "15",
    }
    try:
        with psycopg.connect(**params) as conn:
            row = conn.execute(
                "select current_user, (select count(*) from pg_roles where rolname = current_user)"
            ).fetchone()
            with conn.transaction():
                conn.execute("create temp table t (x int)")
                conn.execute("insert into t values (1), (2)")
            total = conn.execute("select sum(x) from t").fetchone()[0]
            out.update(ok=True, session_user=row[0], in_pg_roles=row[1], sum=total)
    except psycopg.Error as e:
        out.update(ok=False, sqlstate=e.sqlstate, message=str(e))
    if out["ok"] and os.environ.get("LG_SQLALCHEMY"):
        out["sqlalchemy_user"] = sqlalchemy_user(params)
    print(json.dumps(out))


def sqlalchemy_user(p):
    """current_user through a pooled SQLAlchemy engine whose URL names the socket directory
    (the DATABASE_URL form: postgresql+psycopg://USER@/DB?host=DIR&port=PORT)."""
    import sqlalchemy

    url = f"postgresql+psycopg://{p['user']}@/{p['dbname']}?host={p['host']}&port={p['port']}"
    engine = sqlalchemy.create_engine(url, pool_pre_ping=True)
    try:
        with engine.connect() as conn:
            return conn.execute(sqlalchemy.text("select current_user")).scalar_one()
    finally:
        engine.dispose()


if __name__ == "__main__":
    main()
