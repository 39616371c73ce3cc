#!/usr/bin/env bash
# Development PKI for leasegate: a throwaway CA, a server certificate and client certificates.
# Not for production: see certs/README.md for real PKI options. The dev environment
# (`cargo xtask devenv up --certs`, used by the demo and the benchmarks) writes the same file
# names with rcgen; `client NAME --dir $DEVENV_CERTS` adds client certificates to its CA.
#
#   certs/gen-dev-certs.sh [--dir DIR] [--force]       CA + server + client "app" (the default)
#   certs/gen-dev-certs.sh ca [--force]                CA only (kept unless --force)
#   certs/gen-dev-certs.sh server [--dns NAME]... [--ip ADDR]...
#   certs/gen-dev-certs.sh client NAME [--uri URI]... [--dns NAME]... [--cn CN | --no-cn]
#   certs/gen-dev-certs.sh revoke NAME                 mark DIR/NAME.pem revoked, rewrite ca.crl
#   certs/gen-dev-certs.sh crl                         rewrite ca.crl (lists every revoked cert)
#
# Options (anywhere on the line):
#   --dir DIR     where files go (default: the directory of this script; env CERTS_DIR)
#   --force       reissue even if a valid certificate exists; for the default run and `ca`
#                 this also replaces the CA (every certificate it issued stops verifying)
#   --days N      validity of server/client certificates (default 365; the CA gets 3650)
#
# Keys are ECDSA P-256 in PKCS#8 PEM, mode 600. Certificates are X.509 v3 signed with SHA-256:
# the server gets serverAuth and SANs localhost, 127.0.0.1, ::1 (plus --dns/--ip); clients get
# clientAuth, CN=NAME unless --cn/--no-cn, and the SANs given. leasegate sees a client as
# uri:<URI SAN>, dns:<DNS SAN> and cn:<CN>.
#
# Idempotent: the CA is never replaced without --force, and a server/client certificate is kept
# when it still verifies against the CA, is valid for 7 more days and has the requested subject
# and SANs; otherwise it is reissued with a new key.
set -euo pipefail

die() { printf 'gen-dev-certs: error: %s\n' "$*" >&2; exit 1; }
say() { printf 'gen-dev-certs: %s\n' "$*"; }
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

command -v openssl >/dev/null || die "openssl not found in PATH (apt-get install openssl)"

DIR="${CERTS_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}"
FORCE=0
DAYS=365
CA_DAYS=3650
CMD=""
NAME=""
URIS=()
DNSS=()
IPS=()
CN=""
CN_SET=0
NO_CN=0

while (($#)); do
    case "$1" in
        --dir) [[ $# -ge 2 ]] || die "--dir needs a value"; DIR="$2"; shift 2 ;;
        --dir=*) DIR="${1#--dir=}"; shift ;;
        --force) FORCE=1; shift ;;
        --days) [[ $# -ge 2 ]] || die "--days needs a value"; DAYS="$2"; shift 2 ;;
        --uri) [[ $# -ge 2 ]] || die "--uri needs a value"; URIS+=("$2"); shift 2 ;;
        --dns) [[ $# -ge 2 ]] || die "--dns needs a value"; DNSS+=("$2"); shift 2 ;;
        --ip) [[ $# -ge 2 ]] || die "--ip needs a value"; IPS+=("$2"); shift 2 ;;
        --cn) [[ $# -ge 2 ]] || die "--cn needs a value"; CN="$2"; CN_SET=1; shift 2 ;;
        --no-cn) NO_CN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        -*) die "unknown option $1 (see --help)" ;;
        *)
            if [[ -z "$CMD" ]]; then CMD="$1"
            elif [[ -z "$NAME" ]]; then NAME="$1"
            else die "unexpected argument $1 (see --help)"
            fi
            shift ;;
    esac
done
CMD="${CMD:-all}"
[[ "$DAYS" =~ ^[1-9][0-9]*$ ]] || die "--days must be a positive integer, got '$DAYS'"
((CN_SET && NO_CN)) && die "--cn and --no-cn exclude each other"

mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

CA_CERT="$DIR/ca.pem"
CA_KEY="$DIR/ca-key.pem"

# new_key FILE: ECDSA P-256, PKCS#8, mode 600 from the moment it exists.
new_key() {
    rm -f "$1"
    (umask 077 && openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null) \
        || die "could not create key $1"
    chmod 600 "$1"
}

serial() { printf '0x%s' "$(openssl rand -hex 16)"; }

# ca_conf: config for `openssl ca`, used only for revocation and CRLs.
ca_conf() {
    cat >"$TMP/ca.cnf" <<EOF
[ca]
default_ca = dev
[dev]
database         = $DIR/ca-index.txt
crlnumber        = $DIR/ca-crlnumber
certificate      = $CA_CERT
private_key      = $CA_KEY
default_md       = sha256
default_crl_days = 30
crl_extensions   = crl_ext
[crl_ext]
authorityKeyIdentifier = keyid:always
EOF
    [[ -f "$DIR/ca-index.txt" ]] || : >"$DIR/ca-index.txt"
    [[ -f "$DIR/ca-crlnumber" ]] || echo 1000 >"$DIR/ca-crlnumber"
}

make_ca() {
    if [[ -f "$CA_CERT" && -f "$CA_KEY" && $FORCE -eq 0 ]]; then
        openssl x509 -in "$CA_CERT" -noout -checkend 0 >/dev/null \
            || die "$CA_CERT has expired: rerun with --force to make a new CA"
        say "CA exists, keeping $CA_CERT (use --force to replace it)"
        return
    fi
    if [[ -f "$CA_CERT" ]]; then
        say "replacing CA $CA_CERT: certificates it issued will stop verifying"
    fi
    cat >"$TMP/ca-req.cnf" <<'EOF'
[req]
distinguished_name = dn
prompt             = no
x509_extensions    = v3_ca
[dn]
O  = leasegate development
CN = leasegate dev CA
[v3_ca]
basicConstraints       = critical, CA:TRUE, pathlen:0
keyUsage               = critical, keyCertSign, cRLSign
subjectKeyIdentifier   = hash
authorityKeyIdentifier = keyid:always
EOF
    new_key "$CA_KEY"
    openssl req -config "$TMP/ca-req.cnf" -x509 -new -sha256 -key "$CA_KEY" \
        -days "$CA_DAYS" -set_serial "$(serial)" -out "$CA_CERT" \
        || die "could not create the CA certificate"
    chmod 644 "$CA_CERT"
    rm -f "$DIR/ca-index.txt" "$DIR/ca-index.txt.attr" "$DIR/ca-index.txt.old" \
        "$DIR/ca-index.txt.attr.old" "$DIR/ca-crlnumber" "$DIR/ca-crlnumber.old" "$DIR/ca.crl"
    say "created CA $CA_CERT (key $CA_KEY)"
}

require_ca() {
    if [[ ! -f "$CA_CERT" || ! -f "$CA_KEY" ]]; then
        say "no CA in $DIR yet, creating one"
        make_ca
    fi
}

# summary_of x509|req FILE: subject and SAN text, for comparing what exists with what is asked.
summary_of() {
    local kind="$1" file="$2"
    openssl "$kind" -in "$file" -noout -subject -nameopt RFC2253 2>/dev/null || return 1
    openssl "$kind" -in "$file" -noout -text 2>/dev/null \
        | { grep -A1 'X509v3 Subject Alternative Name' || true; } | tail -n 1 | tr -d ' '
}

# issue BASENAME PURPOSE SUBJECT SAN EKU: keeps or (re)issues DIR/BASENAME.pem + -key.pem.
# SAN may be empty (a CN-only client certificate).
issue() {
    local base="$1" purpose="$2" subject="$3" san="$4" eku="$5"
    local cert="$DIR/$base.pem" key="$DIR/$base-key.pem" san_ext="" want_args=()
    if [[ -n "$san" ]]; then
        san_ext="subjectAltName = $san"
        # A certificate without a subject must mark its SANs critical (RFC 5280 4.2.1.6).
        [[ "$subject" == "/" ]] && san_ext="subjectAltName = critical, $san"
        want_args=(-addext "$san_ext")
    fi

    if [[ $FORCE -eq 0 && -f "$cert" && -f "$key" ]]; then
        openssl req -new -key "$key" -subj "$subject" "${want_args[@]+"${want_args[@]}"}" -out "$TMP/want.csr" 2>/dev/null \
            || die "could not read existing key $key"
        if openssl verify -CAfile "$CA_CERT" -purpose "$purpose" "$cert" >/dev/null 2>&1 \
            && openssl x509 -in "$cert" -noout -checkend 604800 >/dev/null \
            && [[ "$(summary_of x509 "$cert")" == "$(summary_of req "$TMP/want.csr")" ]]; then
            chmod 600 "$key"
            say "$base: valid certificate exists, keeping $cert (use --force to reissue)"
            return
        fi
        say "$base: existing certificate is stale, expired or different from the request, reissuing"
    fi

    new_key "$key"
    openssl req -new -key "$key" -subj "$subject" -out "$TMP/$base.csr" \
        || die "could not create a request for $base"
    cat >"$TMP/$base.ext" <<EOF
[v3]
basicConstraints       = critical, CA:FALSE
keyUsage               = critical, digitalSignature
extendedKeyUsage       = $eku
subjectKeyIdentifier   = hash
authorityKeyIdentifier = keyid
$san_ext
EOF
    openssl x509 -req -in "$TMP/$base.csr" -CA "$CA_CERT" -CAkey "$CA_KEY" -set_serial "$(serial)" \
        -days "$DAYS" -sha256 -extfile "$TMP/$base.ext" -extensions v3 -out "$cert" 2>/dev/null \
        || die "could not sign the certificate for $base"
    chmod 644 "$cert"
    openssl verify -CAfile "$CA_CERT" -purpose "$purpose" "$cert" >/dev/null \
        || die "the new certificate $cert does not verify against $CA_CERT"
    say "$base: issued $cert (key $key, mode 600): subject '${subject}', SAN ${san:-none}"
}

make_server() {
    require_ca
    local san="DNS:localhost" d i
    for d in "${DNSS[@]+"${DNSS[@]}"}"; do san+=",DNS:$d"; done
    san+=",IP:127.0.0.1,IP:::1"
    for i in "${IPS[@]+"${IPS[@]}"}"; do san+=",IP:$i"; done
    issue server sslserver "/CN=localhost" "$san" serverAuth
}

make_client() {
    local name="$1" subject san="" u d
    [[ "$name" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] \
        || die "client NAME must be letters, digits, '.', '_' or '-' (it becomes NAME.pem), got '$name'"
    [[ "$name" == ca || "$name" == server ]] && die "client NAME '$name' would clash with the $name certificate"
    require_ca
    for u in "${URIS[@]+"${URIS[@]}"}"; do
        [[ "$u" == *:* ]] || die "--uri needs a URI with a scheme (e.g. spiffe://example.org/app), got '$u'"
        san+="${san:+,}URI:$u"
    done
    for d in "${DNSS[@]+"${DNSS[@]}"}"; do san+="${san:+,}DNS:$d"; done
    if ((NO_CN)); then
        [[ -n "$san" ]] || die "--no-cn needs at least one --uri or --dns"
        subject="/"
    else
        local cn="$name"
        ((CN_SET)) && cn="$CN"
        [[ "$cn" != */* ]] || die "--cn must not contain '/', got '$cn'"
        subject="/CN=$cn"
    fi
    issue "$name" sslclient "$subject" "$san" clientAuth
}

make_crl() {
    [[ -f "$CA_CERT" && -f "$CA_KEY" ]] || die "no CA in $DIR: run $0 first"
    ca_conf
    openssl ca -config "$TMP/ca.cnf" -gencrl -out "$DIR/ca.crl" 2>/dev/null || die "could not write $DIR/ca.crl"
    chmod 644 "$DIR/ca.crl"
    say "wrote CRL $DIR/ca.crl ($(grep -c '^R' "$DIR/ca-index.txt" || true) revoked)"
}

revoke() {
    local name="$1" cert="$DIR/$1.pem"
    [[ -f "$cert" ]] || die "no certificate $cert to revoke"
    [[ -f "$CA_CERT" && -f "$CA_KEY" ]] || die "no CA in $DIR"
    ca_conf
    local out
    if ! out="$(openssl ca -config "$TMP/ca.cnf" -revoke "$cert" 2>&1)"; then
        grep -q 'Already revoked' <<<"$out" || die "could not revoke $cert: $out"
        say "$name: already revoked"
    else
        say "$name: revoked"
    fi
    make_crl
}

case "$CMD" in
    all)
        [[ -z "$NAME" ]] || die "unexpected argument $NAME (see --help)"
        make_ca
        # A new CA invalidates the leaf certificates: reissue them too.
        make_server
        URIS=("spiffe://example.org/app/demo"); DNSS=(); CN_SET=0; NO_CN=0
        make_client app
        ;;
    ca) make_ca ;;
    server) make_server ;;
    client)
        [[ -n "$NAME" ]] || die "usage: $0 client NAME [--uri URI]... [--dns NAME]... [--cn CN | --no-cn]"
        make_client "$NAME" ;;
    revoke)
        [[ -n "$NAME" ]] || die "usage: $0 revoke NAME"
        revoke "$NAME" ;;
    crl) make_crl ;;
    *) die "unknown command '$CMD' (ca, server, client, revoke, crl; see --help)" ;;
esac
