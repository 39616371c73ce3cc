#!/bin/sh
# Gets a short-lived client certificate for leasegate from Vault's or OpenBao's PKI secrets
# engine (POST <mount>/issue/<role>) and writes it where libpq looks, so that afterwards
#   psql "host=PROXY port=6432 dbname=myapp user=readonly sslmode=verify-full"
# works with no sslcert/sslkey/sslrootcert arguments.
#
#   scripts/client-cert.sh --role ROLE --cn NAME [--uri URI]... [--dns NAME]... [--mount pki]
#                          [--ttl 8h] [--ca PROXY_CA.pem] [--dir ~/.postgresql]
#
# Vault: VAULT_ADDR (required), VAULT_TOKEN (else ~/.vault-token), VAULT_CACERT (CA of an
# https Vault), VAULT_NAMESPACE. Writes DIR/postgresql.crt (the certificate, then the CA
# chain Vault returned), DIR/postgresql.key (mode 0600) and, with --ca, DIR/root.crt (the
# CA of leasegate's server certificate, for sslmode=verify-full). DIR is created mode 0700.
# The certificate's identities (--uri, --dns, --cn) must match a leasegate grant, and the
# PKI's CA must be in leasegate's listen.client_ca. Needs curl and jq.
set -eu

die() { printf 'client-cert.sh: %s\n' "$*" >&2; exit 1; }
usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

MOUNT=pki ROLE="" CN="" TTL=8h CA="" DIR="${HOME:-}/.postgresql" URIS="" DNS=""
while [ $# -gt 0 ]; do
    case "$1" in
        --mount) MOUNT="${2:?--mount needs a value}"; shift 2 ;;
        --role) ROLE="${2:?--role needs a value}"; shift 2 ;;
        --cn) CN="${2:?--cn needs a value}"; shift 2 ;;
        --uri) URIS="${URIS:+$URIS,}${2:?--uri needs a value}"; shift 2 ;;
        --dns) DNS="${DNS:+$DNS,}${2:?--dns needs a value}"; shift 2 ;;
        --ttl) TTL="${2:?--ttl needs a value}"; shift 2 ;;
        --ca) CA="${2:?--ca needs a value}"; shift 2 ;;
        --dir) DIR="${2:?--dir needs a value}"; shift 2 ;;
        -h|--help) usage 0 ;;
        *) printf 'client-cert.sh: unknown argument %s\n' "$1" >&2; usage 2 ;;
    esac
done
[ -n "$ROLE" ] || die "--role is required (the PKI role that may issue your identity)"
[ -n "$CN" ] || die "--cn is required (the certificate's common name)"
[ -n "${VAULT_ADDR:-}" ] || die "VAULT_ADDR is not set"
command -v curl >/dev/null || die "curl is needed"
command -v jq >/dev/null || die "jq is needed"
[ -z "$CA" ] || [ -r "$CA" ] || die "--ca $CA is not readable"
TOKEN="${VAULT_TOKEN:-}"
if [ -z "$TOKEN" ] && [ -r "${HOME:-}/.vault-token" ]; then TOKEN="$(cat "$HOME/.vault-token")"; fi
[ -n "$TOKEN" ] || die "no Vault token: set VAULT_TOKEN or log in (vault login / bao login)"

umask 077
mkdir -p "$DIR"
chmod 700 "$DIR"
work="$(mktemp -d "$DIR/.client-cert.XXXXXX")"
trap 'rm -rf "$work"' EXIT

body="$(jq -n --arg cn "$CN" --arg ttl "$TTL" --arg uris "$URIS" --arg dns "$DNS" \
    '{common_name: $cn, ttl: $ttl, format: "pem"}
     + (if $uris == "" then {} else {uri_sans: $uris} end)
     + (if $dns == "" then {} else {alt_names: $dns} end)')"
# The token goes to curl in a header file (mode 0600), never on a command line.
printf 'X-Vault-Token: %s\n' "$TOKEN" >"$work/headers"
if [ -n "${VAULT_NAMESPACE:-}" ]; then printf 'X-Vault-Namespace: %s\n' "$VAULT_NAMESPACE" >>"$work/headers"; fi
status="$(curl -sS --max-time 30 ${VAULT_CACERT:+--cacert "$VAULT_CACERT"} \
    -H @"$work/headers" -H 'Content-Type: application/json' -X POST --data "$body" \
    -o "$work/response" -w '%{http_code}' "${VAULT_ADDR%/}/v1/$MOUNT/issue/$ROLE")" \
    || die "cannot reach Vault at $VAULT_ADDR"
if [ "$status" != 200 ]; then
    errors="$(jq -r '(.errors // []) | join("; ")' "$work/response" 2>/dev/null || true)"
    die "Vault refused $MOUNT/issue/$ROLE (HTTP $status): ${errors:-no details}"
fi
jq -er '.data.certificate' "$work/response" >"$work/postgresql.crt" || die "no certificate in Vault's answer"
jq -r '.data.ca_chain // [] | .[]' "$work/response" >>"$work/postgresql.crt"
jq -er '.data.private_key' "$work/response" >"$work/postgresql.key" || die "no private key in Vault's answer"
chmod 600 "$work/postgresql.key"
chmod 644 "$work/postgresql.crt"
mv -f "$work/postgresql.key" "$DIR/postgresql.key"
mv -f "$work/postgresql.crt" "$DIR/postgresql.crt"
if [ -n "$CA" ]; then
    cp "$CA" "$DIR/root.crt.tmp" && chmod 644 "$DIR/root.crt.tmp" && mv -f "$DIR/root.crt.tmp" "$DIR/root.crt"
fi
serial="$(jq -r '.data.serial_number' "$work/response")"
expires="$(jq -r '.data.expiration | todate' "$work/response")"
printf 'wrote %s/postgresql.crt and postgresql.key (serial %s, valid until %s)\n' "$DIR" "$serial" "$expires"
[ -z "$CA" ] || printf 'wrote %s/root.crt\n' "$DIR"
printf 'connect with: psql "host=PROXY port=6432 dbname=DB user=ROLE sslmode=verify-full"\n'
