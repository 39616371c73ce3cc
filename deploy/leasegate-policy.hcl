# Least-privilege Vault/OpenBao policy for leasegate.
#
# Replace "database" with your database secrets engine mount if it differs
# (deploy/openbao-setup.sh does that for you with MOUNT=...). Add one creds path per mount
# when [[databases]] use several mounts.
#
#   bao policy write leasegate deploy/leasegate-policy.hcl
#   bao token create -orphan -policy=leasegate -no-default-policy -period=24h

# Dynamic credentials: GET <mount>/creds/<role> for the roles named in [[databases]].roles.
# Narrow "*" to the role names if this mount also serves other applications.
path "database/creds/*" {
  capabilities = ["read"]
}

# Renew a session's lease while the session outlives its TTL.
path "sys/leases/renew" {
  capabilities = ["update"]
}

# Revoke the lease as soon as the client session ends.
path "sys/leases/revoke" {
  capabilities = ["update"]
}

# Keep leasegate's own (periodic) token alive, and read its TTL to know when to renew.
path "auth/token/renew-self" {
  capabilities = ["update"]
}

path "auth/token/lookup-self" {
  capabilities = ["read"]
}

# Revoke a token leasegate logged in for (AppRole, cert, Kubernetes) once it was replaced and
# no lease needs it any more, and at shutdown. Never used on an operator's token.
path "auth/token/revoke-self" {
  capabilities = ["update"]
}
