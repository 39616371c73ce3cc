//! What leasegate expects of PostgreSQL and of the database secrets engine (README, "Vault /
//! OpenBao setup"): the database `myapp`, the group roles `leasegate_readonly` and
//! `leasegate_readwrite`, and the Vault roles `readonly` and `readwrite` whose dynamic
//! roles join them. `deploy/openbao-setup.sh` sets up the same for real deployments.

use serde_json::{Value, json};

use crate::pg::Conn;
use crate::{Error, Result};

/// The application database.
pub const DATABASE: &str = "myapp";

/// The Vault roles of every mount, and the group role each joins (`leasegate_<role>`).
pub const ROLES: [&str; 2] = ["readonly", "readwrite"];

/// Run in database `postgres`, each in its own transaction (`CREATE DATABASE` needs that).
const CLUSTER_SQL: [&str; 4] = [
    "CREATE DATABASE myapp",
    "CREATE ROLE leasegate_readonly NOLOGIN",
    "CREATE ROLE leasegate_readwrite NOLOGIN",
    "GRANT CONNECT ON DATABASE myapp TO leasegate_readonly, leasegate_readwrite",
];

/// Run in database `myapp`.
const DATABASE_SQL: &str = "GRANT USAGE ON SCHEMA public TO leasegate_readonly;
GRANT USAGE, CREATE ON SCHEMA public TO leasegate_readwrite;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO leasegate_readonly;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO leasegate_readonly;";

/// Creates the database and the group roles on a fresh cluster.
pub fn create_database(pg: &Conn) -> Result<()> {
    pg.psql_each("postgres", &CLUSTER_SQL)?;
    pg.psql(DATABASE, DATABASE_SQL)?;
    Ok(())
}

/// Body of `POST <mount>/config/pg`: the connection the engine uses (as superuser, to
/// `myapp` on 127.0.0.1 of `pg`) and the username template with `prefix`.
pub fn connection_config(pg: &Conn, prefix: &str) -> Value {
    json!({
        "plugin_name": "postgresql-database-plugin",
        "connection_url": format!(
            "postgresql://{{{{username}}}}:{{{{password}}}}@127.0.0.1:{}/{DATABASE}?sslmode=disable",
            pg.port
        ),
        "username": "postgres",
        "password": pg.password,
        "allowed_roles": "*",
        "username_template": format!("{prefix}{{{{random 12 | lowercase}}}}"),
    })
}

/// Body of `POST <mount>/roles/<role>` for `readonly` or `readwrite` with these TTLs
/// (durations as Vault takes them, e.g. "4s", "1h"), with the shipped revocation statements:
/// end the role's backends, hand its objects over (readwrite), drop it.
pub fn role(role: &str, default_ttl: &str, max_ttl: &str) -> Result<Value> {
    role_body(role, default_ttl, max_ttl, true)
}

/// As [`role`], but the revocation does not end the role's backends: for tests that show
/// leasegate itself leaves no backend behind.
pub fn role_keeping_backends(role: &str, default_ttl: &str, max_ttl: &str) -> Result<Value> {
    role_body(role, default_ttl, max_ttl, false)
}

fn role_body(role: &str, default_ttl: &str, max_ttl: &str, terminate: bool) -> Result<Value> {
    let mut revocation = Vec::new();
    if terminate {
        revocation.push(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{{name}}';",
        );
    }
    match role {
        "readonly" => {}
        "readwrite" => revocation.extend([
            "REASSIGN OWNED BY \"{{name}}\" TO leasegate_readwrite;",
            "DROP OWNED BY \"{{name}}\";",
        ]),
        other => {
            return Err(Error::new(format!(
                "unknown contract role {other:?} (readonly, readwrite)"
            )));
        }
    }
    revocation.push("DROP ROLE IF EXISTS \"{{name}}\";");
    let creation = format!(
        "CREATE ROLE \"{{{{name}}}}\" WITH LOGIN PASSWORD '{{{{password}}}}' \
         VALID UNTIL '{{{{expiration}}}}' IN ROLE leasegate_{role};"
    );
    Ok(json!({
        "db_name": "pg",
        "default_ttl": default_ttl,
        "max_ttl": max_ttl,
        "creation_statements": [creation],
        "revocation_statements": revocation,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_name_the_group_role_and_the_prefix() {
        let pg = Conn {
            port: 5999,
            password: "pw".into(),
        };
        let config = connection_config(&pg, "lgt1_");
        assert_eq!(
            config["connection_url"],
            "postgresql://{{username}}:{{password}}@127.0.0.1:5999/myapp?sslmode=disable"
        );
        assert_eq!(
            config["username_template"],
            "lgt1_{{random 12 | lowercase}}"
        );
        let rw = role("readwrite", "5m", "1h").unwrap();
        assert!(
            rw["creation_statements"][0]
                .as_str()
                .unwrap()
                .ends_with("IN ROLE leasegate_readwrite;")
        );
        let revocation = rw["revocation_statements"].as_array().unwrap();
        assert_eq!(revocation.len(), 4);
        assert!(
            revocation[0]
                .as_str()
                .unwrap()
                .contains("pg_terminate_backend")
        );
        let kept = role_keeping_backends("readwrite", "5m", "1h").unwrap();
        assert_eq!(kept["revocation_statements"].as_array().unwrap().len(), 3);
        assert!(role("admin", "5m", "1h").is_err());
    }
}
