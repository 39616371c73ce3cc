#!/usr/bin/env bash
# Prepares PostgreSQL and a Vault/OpenBao database secrets engine for leasegate.
# Safe to run again: every step creates what is missing and updates what exists.
#
# Environment (defaults in brackets):
#   VAULT_ADDR            Vault/OpenBao address, e.g. http://127.0.0.1:8200   (required)
#   VAULT_TOKEN           a token that may mount engines and write policies    (required)
#   VAULT_CACERT          CA bundle for an https VAULT_ADDR                    []
#   VAULT_NAMESPACE       namespace (Vault Enterprise / OpenBao namespaces)    []
#   PGHOST, PGPORT        PostgreSQL as seen from this machine AND from Vault  [127.0.0.1, 5432]
#   PGUSER, PGPASSWORD    a superuser (Vault creates and drops roles with it,  [postgres, required]
#                         and ends a revoked role's backends)
#   PGDATABASE            the application database (created if missing)        [myapp]
#   PG_SSLMODE            sslmode Vault uses to reach PostgreSQL               [disable]
#   MOUNT                 database secrets engine mount                         [database]
#   USERNAME_PREFIX       prefix of generated role names                        [lg_]
#   POLICY_NAME           name of the leasegate policy written  [leasegate; leasegate-<mount> for
#                         other mounts, so that setting up a second mount keeps the first working]
#   LEASEGATE_TOKEN_FILE  if set: create a periodic orphan token with only that policy and
#                         write it there (mode 600); an existing valid token is kept   []
#   SKIP_VERIFY=1         skip the final check (issue one credential and revoke it)
#
# Needs: curl, psql, python3. No bao/vault CLI.
set -euo pipefail

die() { printf 'openbao-setup: error: %s\n' "$*" >&2; exit 1; }
say() { printf 'openbao-setup: %s\n' "$*"; }

for tool in curl psql python3; do
    command -v "$tool" >/dev/null || die "$tool not found in PATH"
done
: "${VAULT_ADDR:?VAULT_ADDR must be set, e.g. http://127.0.0.1:8200}"
: "${VAULT_TOKEN:?VAULT_TOKEN must be set (a token allowed to mount engines and write policies)}"
: "${PGPASSWORD:?PGPASSWORD must be set (password of the PostgreSQL superuser PGUSER)}"
export PGHOST="${PGHOST:-127.0.0.1}" PGPORT="${PGPORT:-5432}" PGUSER="${PGUSER:-postgres}"
export PGPASSWORD
PGDATABASE="${PGDATABASE:-myapp}"
PG_SSLMODE="${PG_SSLMODE:-disable}"
MOUNT="${MOUNT:-database}"
MOUNT="${MOUNT%/}"
USERNAME_PREFIX="${USERNAME_PREFIX:-lg_}"
if [[ "$MOUNT" == database ]]; then POLICY_NAME="${POLICY_NAME:-leasegate}"
else POLICY_NAME="${POLICY_NAME:-leasegate-${MOUNT//\//-}}"; fi
VAULT_ADDR="${VAULT_ADDR%/}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
POLICY_FILE="$HERE/leasegate-policy.hcl"

[[ "$MOUNT" =~ ^[A-Za-z0-9_./-]+$ ]] || die "MOUNT '$MOUNT' has characters that do not belong in a mount path"
[[ "$PGDATABASE" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "PGDATABASE '$PGDATABASE' must be a plain identifier"
[[ "$USERNAME_PREFIX" =~ ^[a-z0-9_]*$ ]] || die "USERNAME_PREFIX '$USERNAME_PREFIX' must be lower-case letters, digits or _"
[[ -f "$POLICY_FILE" ]] || die "policy file $POLICY_FILE not found"

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

# ---------------------------------------------------------------------------------------------
# Vault HTTP API. api METHOD PATH [JSON] prints the body; any status but 2xx is fatal, except
# those listed in API_OK (e.g. API_OK=404 for "nothing there").
CURL_TLS=()
[[ -n "${VAULT_CACERT:-}" ]] && CURL_TLS=(--cacert "$VAULT_CACERT")
CURL_NS=()
[[ -n "${VAULT_NAMESPACE:-}" ]] && CURL_NS=(-H "X-Vault-Namespace: $VAULT_NAMESPACE")

api() {
    local method="$1" path="$2" body="${3:-}" code
    local args=(-sS -o "$TMP/body" -w '%{http_code}' -X "$method" --max-time 30
        -H "X-Vault-Token: $VAULT_TOKEN" -H "X-Vault-Request: true")
    args+=("${CURL_TLS[@]+"${CURL_TLS[@]}"}" "${CURL_NS[@]+"${CURL_NS[@]}"}")
    if [[ -n "$body" ]]; then
        printf '%s' "$body" >"$TMP/req"
        args+=(-H "Content-Type: application/json" --data-binary "@$TMP/req")
    fi
    code="$(curl "${args[@]}" "$VAULT_ADDR/v1/$path")" \
        || die "$method $VAULT_ADDR/v1/$path: could not reach Vault/OpenBao"
    if [[ "$code" != 2* && " ${API_OK:-} " != *" $code "* ]]; then
        die "$method /v1/$path answered HTTP $code: $(head -c 600 "$TMP/body")"
    fi
    cat "$TMP/body"
}

# json PYTHON-EXPR: builds a JSON document; the expression sees the environment as `env`.
json() { python3 -c 'import json,os,sys; env=os.environ; print(json.dumps(eval(sys.argv[1])))' "$1"; }
# jget KEY.PATH: reads a value from the JSON on stdin ("" if absent).
jget() {
    python3 -c '
import json, sys
raw = sys.stdin.read()
if not raw.strip():
    sys.exit(1)
v = json.loads(raw)
for k in sys.argv[1].split("."):
    v = v.get(k) if isinstance(v, dict) else None
print("" if v is None else (v if isinstance(v, str) else json.dumps(v)))' "$1"
}

# ---------------------------------------------------------------------------------------------
say "PostgreSQL $PGUSER@$PGHOST:$PGPORT: database $PGDATABASE and group roles"
pg_error="$(psql -X -d postgres -Atqc 'select 1' 2>&1 >/dev/null)" \
    || die "cannot connect to PostgreSQL at $PGHOST:$PGPORT as $PGUSER: $pg_error"

psql -X -q -v ON_ERROR_STOP=1 -v db="$PGDATABASE" -d postgres <<'SQL' >/dev/null
SELECT format('CREATE DATABASE %I', :'db')
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'db') \gexec
SELECT 'CREATE ROLE leasegate_readonly NOLOGIN'
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'leasegate_readonly') \gexec
SELECT 'CREATE ROLE leasegate_readwrite NOLOGIN'
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'leasegate_readwrite') \gexec
SELECT format('GRANT CONNECT ON DATABASE %I TO leasegate_readonly, leasegate_readwrite', :'db') \gexec
SQL

psql -X -q -v ON_ERROR_STOP=1 -d "$PGDATABASE" <<'SQL' >/dev/null
GRANT USAGE ON SCHEMA public TO leasegate_readonly;
GRANT USAGE, CREATE ON SCHEMA public TO leasegate_readwrite;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO leasegate_readonly;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO leasegate_readonly;
SQL

# ---------------------------------------------------------------------------------------------
say "Vault $VAULT_ADDR: database secrets engine at $MOUNT/"
mounts="$(api GET sys/mounts)"
existing_type="$(printf '%s' "$mounts" | python3 -c '
import json, sys
m = json.load(sys.stdin)
m = m.get("data", m)
e = m.get(sys.argv[1] + "/")
print(e.get("type", "") if isinstance(e, dict) else "")' "$MOUNT")"
case "$existing_type" in
    "") api POST "sys/mounts/$MOUNT" '{"type":"database"}' >/dev/null; say "mounted $MOUNT/" ;;
    database) say "$MOUNT/ already mounted" ;;
    *) die "$MOUNT/ is already mounted with type '$existing_type', not 'database'" ;;
esac

export CONNECTION_URL="postgresql://{{username}}:{{password}}@$PGHOST:$PGPORT/$PGDATABASE?sslmode=$PG_SSLMODE"
export USERNAME_TEMPLATE="${USERNAME_PREFIX}{{random 12 | lowercase}}"
api POST "$MOUNT/config/pg" "$(json '{
    "plugin_name": "postgresql-database-plugin",
    "connection_url": env["CONNECTION_URL"],
    "username": env["PGUSER"],
    "password": env["PGPASSWORD"],
    "allowed_roles": "*",
    "username_template": env["USERNAME_TEMPLATE"],
}')" >/dev/null
say "configured connection $MOUNT/config/pg (Vault connects to $PGHOST:$PGPORT/$PGDATABASE as $PGUSER)"

# Revocation first ends the role's backends (a second line of defence behind leasegate, which
# cancels a busy session's statement and waits for its backend to close before it revokes):
# a backend that outlived its session would keep running, and holding locks, with its role
# dropped. pg_terminate_backend needs PGUSER to be a superuser or a member of pg_signal_backend.
api POST "$MOUNT/roles/readonly" "$(json '{
    "db_name": "pg", "default_ttl": "5m", "max_ttl": "1h",
    "creation_statements": ["CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '"'"'{{password}}'"'"' VALID UNTIL '"'"'{{expiration}}'"'"' IN ROLE leasegate_readonly;"],
    "revocation_statements": [
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '"'"'{{name}}'"'"';",
        "DROP ROLE IF EXISTS \"{{name}}\";"],
}')" >/dev/null
api POST "$MOUNT/roles/readwrite" "$(json '{
    "db_name": "pg", "default_ttl": "5m", "max_ttl": "1h",
    "creation_statements": ["CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '"'"'{{password}}'"'"' VALID UNTIL '"'"'{{expiration}}'"'"' IN ROLE leasegate_readwrite;"],
    "revocation_statements": [
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '"'"'{{name}}'"'"';",
        "REASSIGN OWNED BY \"{{name}}\" TO leasegate_readwrite;",
        "DROP OWNED BY \"{{name}}\";",
        "DROP ROLE IF EXISTS \"{{name}}\";"],
}')" >/dev/null
say "wrote roles $MOUNT/roles/readonly and $MOUNT/roles/readwrite"

# ---------------------------------------------------------------------------------------------
policy_text="$(sed "s#^path \"database/#path \"$MOUNT/#" "$POLICY_FILE")"
export POLICY_TEXT="$policy_text"
api PUT "sys/policies/acl/$POLICY_NAME" "$(json '{"policy": env["POLICY_TEXT"]}')" >/dev/null
say "wrote policy $POLICY_NAME (read $MOUNT/creds/*, renew/revoke leases, renew/lookup self)"

verify_token="$VAULT_TOKEN"
if [[ -n "${LEASEGATE_TOKEN_FILE:-}" ]]; then
    existing=""
    [[ -s "$LEASEGATE_TOKEN_FILE" ]] && existing="$(tr -d '[:space:]' <"$LEASEGATE_TOKEN_FILE")"
    policies=""
    if [[ -n "$existing" ]]; then
        policies="$(VAULT_TOKEN="$existing" API_OK="400 403" api GET auth/token/lookup-self | jget data.policies)"
    fi
    if [[ "$policies" == *"\"$POLICY_NAME\""* ]]; then
        say "token in $LEASEGATE_TOKEN_FILE is valid, keeping it"
        verify_token="$existing"
    else
        export POLICY_NAME
        token="$(api POST auth/token/create-orphan "$(json '{
            "policies": [env["POLICY_NAME"]], "no_default_policy": True,
            "period": "24h", "renewable": True, "display_name": "leasegate"}')" | jget auth.client_token)"
        [[ -n "$token" ]] || die "token creation returned no client_token"
        mkdir -p "$(dirname "$LEASEGATE_TOKEN_FILE")"
        (umask 077 && printf '%s\n' "$token" >"$LEASEGATE_TOKEN_FILE")
        chmod 600 "$LEASEGATE_TOKEN_FILE"
        say "created a periodic (24h) orphan token with policy $POLICY_NAME in $LEASEGATE_TOKEN_FILE"
        verify_token="$token"
    fi
fi

# ---------------------------------------------------------------------------------------------
if [[ "${SKIP_VERIFY:-0}" != 1 ]]; then
    for role in readonly readwrite; do
        creds="$(VAULT_TOKEN="$verify_token" api GET "$MOUNT/creds/$role")"
        lease_id="$(printf '%s' "$creds" | jget lease_id)"
        user="$(printf '%s' "$creds" | jget data.username)"
        [[ -n "$lease_id" && -n "$user" ]] || die "GET $MOUNT/creds/$role returned no lease or username"
        export LEASE_ID="$lease_id"
        VAULT_TOKEN="$verify_token" api PUT sys/leases/revoke "$(json '{"lease_id": env["LEASE_ID"]}')" >/dev/null
        left="$(psql -X -d postgres -Atqc "select count(*) from pg_roles where rolname = '$user'")"
        [[ "$left" == 0 ]] || die "role $user still exists after revoking its lease"
        say "verified $role: issued $user and revoked it"
    done
fi
say "done: leasegate can use mount '$MOUNT' with roles readonly and readwrite"
