"""The connection to leasegate both psycopg scripts use: libpq keywords from the LG_*
variables the Rust tests set (TLS verify-full with the test client's certificate)."""

import os


def env(name):
    value = os.environ.get(name)
    if not value:
        raise SystemExit(f"environment variable {name} is not set")
    return value


def params(**override):
    """libpq keywords for a session through leasegate; `override` replaces or adds any."""
    base = {
        "host": env("LG_HOST"),
        "hostaddr": env("LG_HOSTADDR"),
        "port": env("LG_PORT"),
        "dbname": env("LG_DBNAME"),
        "user": env("LG_USER"),
        "sslmode": "verify-full",
        "sslrootcert": env("LG_SSLROOTCERT"),
        "sslcert": env("LG_SSLCERT"),
        "sslkey": env("LG_SSLKEY"),
        "connect_timeout": "15",
    }
    base.update(override)
    return base
