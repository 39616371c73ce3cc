#!/usr/bin/env bash
# AppRole login for leasegate on Vault/OpenBao: enables the approle auth method, writes the
# leasegate policy (deploy/leasegate-policy.hcl), creates a role whose tokens are periodic (they
# renew indefinitely while leasegate runs, and die soon after it stops), and writes the role_id
# and a secret_id to files for [vault.auth] method = "approle". Run deploy/openbao-setup.sh
# first (database secrets engine). Safe to run again: the role is updated, and the secret_id in
# SECRET_ID_FILE is kept while Vault still accepts it (ROTATE_SECRET_ID=1 forces a new one).
#
# Environment (defaults in brackets):
#   VAULT_ADDR            Vault/OpenBao address, e.g. http://127.0.0.1:8200   (required)
#   VAULT_TOKEN           a token that may enable auth methods, write policies
#                         and roles                                            (required)
#   VAULT_CACERT          CA bundle for an https VAULT_ADDR                    []
#   VAULT_NAMESPACE       namespace (Vault Enterprise / OpenBao namespaces)    []
#   ROLE_ID_FILE          where to write the role_id (mode 600)                (required)
#   SECRET_ID_FILE        where to write the secret_id (mode 600)              (required)
#   MOUNT                 database secrets engine mount the policy covers      [database]
#   POLICY_NAME           policy written and attached   [leasegate; leasegate-<mount> for other
#                         mounts: the same names deploy/openbao-setup.sh uses]
#   APPROLE_MOUNT         approle auth method mount                            [approle]
#   ROLE_NAME             AppRole role name                                    [leasegate]
#   TOKEN_PERIOD          period of leasegate's tokens: renewed before it
#                         runs out, they never expire while leasegate runs;
#                         also how long a crashed (SIGKILLed) replica's leases
#                         outlive it: Vault revokes them with the token        [2m]
#   SECRET_ID_TTL         lifetime of a secret_id; 0 = until revoked           [0]
#   SECRET_ID_BOUND_CIDRS comma-separated CIDRs allowed to log in              []
#   TOKEN_BOUND_CIDRS     comma-separated CIDRs allowed to use the tokens      []
#   ROTATE_SECRET_ID=1    always issue a new secret_id (the old one is destroyed)
#   SKIP_VERIFY=1         skip the final check (log in once and look at the token)
#
# leasegate then needs, in its config:
#   [vault.auth]
#   method         = "approle"
#   mount          = "approle"            # APPROLE_MOUNT
#   role_id_file   = "<ROLE_ID_FILE>"
#   secret_id_file = "<SECRET_ID_FILE>"
#
# Needs: curl, python3. No bao/vault CLI.
set -euo pipefail

die() { printf 'openbao-approle: error: %s\n' "$*" >&2; exit 1; }
say() { printf 'openbao-approle: %s\n' "$*"; }

for tool in curl python3; do
    command -v "$tool" >/dev/null || die "$tool not found in PATH"
done
: "${VAULT_ADDR:?VAULT_ADDR must be set, e.g. http://127.0.0.1:8200}"
: "${VAULT_TOKEN:?VAULT_TOKEN must be set (a token allowed to enable auth methods and write policies)}"
: "${ROLE_ID_FILE:?ROLE_ID_FILE must be set (where the role_id is written)}"
: "${SECRET_ID_FILE:?SECRET_ID_FILE must be set (where the secret_id is written)}"
MOUNT="${MOUNT:-database}"
MOUNT="${MOUNT%/}"
if [[ "$MOUNT" == database ]]; then POLICY_NAME="${POLICY_NAME:-leasegate}"
else POLICY_NAME="${POLICY_NAME:-leasegate-${MOUNT//\//-}}"; fi
APPROLE_MOUNT="${APPROLE_MOUNT:-approle}"
APPROLE_MOUNT="${APPROLE_MOUNT%/}"
ROLE_NAME="${ROLE_NAME:-leasegate}"
TOKEN_PERIOD="${TOKEN_PERIOD:-2m}"
SECRET_ID_TTL="${SECRET_ID_TTL:-0}"
VAULT_ADDR="${VAULT_ADDR%/}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
POLICY_FILE="$HERE/leasegate-policy.hcl"

[[ "$MOUNT" =~ ^[A-Za-z0-9_./-]+$ ]] || die "MOUNT '$MOUNT' has characters that do not belong in a mount path"
[[ "$APPROLE_MOUNT" =~ ^[A-Za-z0-9_./-]+$ ]] || die "APPROLE_MOUNT '$APPROLE_MOUNT' has characters that do not belong in a mount path"
[[ "$ROLE_NAME" =~ ^[A-Za-z0-9_.-]+$ ]] || die "ROLE_NAME '$ROLE_NAME' may only contain letters, digits, '.', '_' and '-'"
[[ "$POLICY_NAME" =~ ^[A-Za-z0-9_.-]+$ ]] || die "POLICY_NAME '$POLICY_NAME' may only contain letters, digits, '.', '_' and '-'"
[[ "$TOKEN_PERIOD" =~ ^[0-9]+[smh]?$ && ! "$TOKEN_PERIOD" =~ ^0+[smh]?$ ]] \
    || die "TOKEN_PERIOD '$TOKEN_PERIOD' must be a positive duration such as 1h, 30m or 3600"
[[ "$SECRET_ID_TTL" =~ ^[0-9]+[smh]?$ ]] || die "SECRET_ID_TTL '$SECRET_ID_TTL' must be a duration such as 0, 720h"
[[ -f "$POLICY_FILE" ]] || die "policy file $POLICY_FILE not found"

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

# ---------------------------------------------------------------------------------------------
# Vault HTTP API (as in openbao-setup.sh). api METHOD PATH [JSON] prints the body; any status
# but 2xx is fatal, except those listed in API_OK. The token travels in a header file, never on
# a command line.
CURL_TLS=()
[[ -n "${VAULT_CACERT:-}" ]] && CURL_TLS=(--cacert "$VAULT_CACERT")
CURL_NS=()
[[ -n "${VAULT_NAMESPACE:-}" ]] && CURL_NS=(-H "X-Vault-Namespace: $VAULT_NAMESPACE")

api() {
    local method="$1" path="$2" body="${3:-}" code
    local token="${API_TOKEN:-$VAULT_TOKEN}"
    # API_TOKEN=- : no token (login endpoints).
    [[ "$token" == - ]] && token=""
    (umask 077 && printf 'X-Vault-Token: %s\n' "$token" >"$TMP/auth-header")
    local args=(-sS -o "$TMP/body" -w '%{http_code}' -X "$method" --max-time 30
        -H "@$TMP/auth-header" -H "X-Vault-Request: true")
    args+=("${CURL_TLS[@]+"${CURL_TLS[@]}"}" "${CURL_NS[@]+"${CURL_NS[@]}"}")
    if [[ -n "$body" ]]; then
        (umask 077 && printf '%s' "$body" >"$TMP/req")
        args+=(-H "Content-Type: application/json" --data-binary "@$TMP/req")
    fi
    code="$(curl "${args[@]}" "$VAULT_ADDR/v1/$path")" \
        || die "$method $VAULT_ADDR/v1/$path: could not reach Vault/OpenBao"
    rm -f "$TMP/req"
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

# write_secret FILE VALUE: mode 600 from the moment it exists, replaced atomically.
write_secret() {
    local file="$1" value="$2" dir
    dir="$(dirname "$file")"
    mkdir -p "$dir"
    (umask 077 && printf '%s\n' "$value" >"$file.tmp.$$")
    chmod 600 "$file.tmp.$$"
    mv -f "$file.tmp.$$" "$file"
}

# ---------------------------------------------------------------------------------------------
say "Vault $VAULT_ADDR: approle auth method at $APPROLE_MOUNT/"
auths="$(api GET sys/auth)"
existing_type="$(printf '%s' "$auths" | python3 -c '
import json, sys
m = json.load(sys.stdin)
m = m.get("data", m)
e = m.get(sys.argv[1] + "/")
print(e.get("type", "") if isinstance(e, dict) else "")' "$APPROLE_MOUNT")"
case "$existing_type" in
    "") api POST "sys/auth/$APPROLE_MOUNT" '{"type":"approle"}' >/dev/null; say "enabled approle at $APPROLE_MOUNT/" ;;
    approle) say "$APPROLE_MOUNT/ already enabled" ;;
    *) die "$APPROLE_MOUNT/ is already an auth method of type '$existing_type', not 'approle'" ;;
esac

policy_text="$(sed "s#^path \"database/#path \"$MOUNT/#" "$POLICY_FILE")"
export POLICY_TEXT="$policy_text"
api PUT "sys/policies/acl/$POLICY_NAME" "$(json '{"policy": env["POLICY_TEXT"]}')" >/dev/null
say "wrote policy $POLICY_NAME (read $MOUNT/creds/*, renew/revoke leases, renew/lookup self)"

export POLICY_NAME TOKEN_PERIOD SECRET_ID_TTL
export SECRET_ID_BOUND_CIDRS="${SECRET_ID_BOUND_CIDRS:-}" TOKEN_BOUND_CIDRS="${TOKEN_BOUND_CIDRS:-}"
# Periodic service tokens with only the leasegate policy: leasegate renews its token at 2/3 of
# its TTL, so a periodic token lives as long as leasegate does and expires one period after
# it stops (or crashes: Vault then revokes every lease the token created, so a crashed replica
# leaks credentials for one period at most; tests/integration/lb_crash.rs measures it). Each
# replica logs in for its own token. No explicit max TTL (it would end the renewals), no default policy.
api POST "auth/$APPROLE_MOUNT/role/$ROLE_NAME" "$(json '{
    "token_policies": [env["POLICY_NAME"]],
    "token_no_default_policy": True,
    "token_period": env["TOKEN_PERIOD"],
    "token_ttl": 0,
    "token_max_ttl": 0,
    "token_explicit_max_ttl": 0,
    "token_type": "service",
    "bind_secret_id": True,
    "secret_id_ttl": env["SECRET_ID_TTL"],
    "secret_id_num_uses": 0,
    "secret_id_bound_cidrs": [c for c in env["SECRET_ID_BOUND_CIDRS"].split(",") if c],
    "token_bound_cidrs": [c for c in env["TOKEN_BOUND_CIDRS"].split(",") if c],
}')" >/dev/null
say "wrote role $APPROLE_MOUNT/role/$ROLE_NAME (policy $POLICY_NAME, periodic tokens, period $TOKEN_PERIOD)"

role_id="$(api GET "auth/$APPROLE_MOUNT/role/$ROLE_NAME/role-id" | jget data.role_id)"
[[ -n "$role_id" ]] || die "auth/$APPROLE_MOUNT/role/$ROLE_NAME/role-id returned no role_id"
write_secret "$ROLE_ID_FILE" "$role_id"
say "wrote the role_id to $ROLE_ID_FILE"

existing=""
[[ -s "$SECRET_ID_FILE" ]] && existing="$(tr -d '[:space:]' <"$SECRET_ID_FILE")"
keep=0
if [[ -n "$existing" && "${ROTATE_SECRET_ID:-0}" != 1 ]]; then
    export SECRET_ID="$existing"
    # 2xx with data: still valid. OpenBao answers 204 or 404 for an unknown secret_id.
    looked="$(API_OK="204 400 404" api POST "auth/$APPROLE_MOUNT/role/$ROLE_NAME/secret-id/lookup" \
        "$(json '{"secret_id": env["SECRET_ID"]}')" || true)"
    if [[ -n "$(printf '%s' "$looked" | jget data.secret_id_accessor 2>/dev/null || true)" ]]; then
        keep=1
    fi
fi
if ((keep)); then
    say "the secret_id in $SECRET_ID_FILE is still valid, keeping it"
    secret_id="$existing"
else
    if [[ -n "$existing" ]]; then
        export SECRET_ID="$existing"
        API_OK="204 400 404" api POST "auth/$APPROLE_MOUNT/role/$ROLE_NAME/secret-id/destroy" \
            "$(json '{"secret_id": env["SECRET_ID"]}')" >/dev/null || true
    fi
    export SECRET_ID_META_HOST="${HOSTNAME:-}"
    secret_id="$(api POST "auth/$APPROLE_MOUNT/role/$ROLE_NAME/secret-id" \
        "$(json '{"metadata": json.dumps({"issued_by": "openbao-approle.sh", "host": env["SECRET_ID_META_HOST"]})}')" \
        | jget data.secret_id)"
    [[ -n "$secret_id" ]] || die "auth/$APPROLE_MOUNT/role/$ROLE_NAME/secret-id returned no secret_id"
    write_secret "$SECRET_ID_FILE" "$secret_id"
    say "wrote a new secret_id to $SECRET_ID_FILE"
fi

# ---------------------------------------------------------------------------------------------
if [[ "${SKIP_VERIFY:-0}" != 1 ]]; then
    export ROLE_ID="$role_id" SECRET_ID="$secret_id"
    login="$(API_TOKEN=- api POST "auth/$APPROLE_MOUNT/login" \
        "$(json '{"role_id": env["ROLE_ID"], "secret_id": env["SECRET_ID"]}')")"
    token="$(printf '%s' "$login" | jget auth.client_token)"
    accessor="$(printf '%s' "$login" | jget auth.accessor)"
    [[ -n "$token" && -n "$accessor" ]] || die "AppRole login returned no client_token"
    self="$(API_TOKEN="$token" api GET auth/token/lookup-self)"
    policies="$(printf '%s' "$self" | jget data.policies)"
    period="$(printf '%s' "$self" | jget data.period)"
    renewable="$(printf '%s' "$self" | jget data.renewable)"
    [[ "$policies" == "[\"$POLICY_NAME\"]" ]] || die "the AppRole token has policies $policies, expected only $POLICY_NAME"
    [[ -n "$period" && "$period" != 0 ]] || die "the AppRole token is not periodic (period '$period')"
    [[ "$renewable" == true ]] || die "the AppRole token is not renewable"
    API_TOKEN="$token" api PUT auth/token/renew-self '{}' >/dev/null
    # The check's token is not needed any more.
    export ACCESSOR="$accessor"
    api POST auth/token/revoke-accessor "$(json '{"accessor": env["ACCESSOR"]}')" >/dev/null
    say "verified: login gives a renewable periodic token (period ${period}s) with only policy $POLICY_NAME"
fi
say "done: [vault.auth] method = \"approle\", mount = \"$APPROLE_MOUNT\", role_id_file = \"$ROLE_ID_FILE\", secret_id_file = \"$SECRET_ID_FILE\""
