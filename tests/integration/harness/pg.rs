//! The shared PostgreSQL 15 cluster: initdb with SCRAM, start, readiness, fixtures, and
//! superuser queries the tests use to look at roles and activity.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{Root, free_port, set_mode, tail};

/// PostgreSQL 15 binaries (initdb, postgres, psql); `PGBIN` overrides.
pub fn pg_bin(tool: &str) -> PathBuf {
    let dir = std::env::var_os("PGBIN").unwrap_or_else(|| "/usr/lib/postgresql/15/bin".into());
    Path::new(&dir).join(tool)
}

/// A running cluster, listening on 127.0.0.1 only.
pub struct Pg {
    pub port: u16,
    /// Password of the superuser `postgres` (SCRAM everywhere).
    pub password: String,
    /// Server log, shown when startup fails.
    pub log: PathBuf,
}

/// SQL run once after startup: the contract's database and group roles.
const SETUP_CLUSTER: &str = "CREATE DATABASE myapp;
CREATE ROLE leasegate_readonly NOLOGIN;
CREATE ROLE leasegate_readwrite NOLOGIN;
GRANT CONNECT ON DATABASE myapp TO leasegate_readonly, leasegate_readwrite;";

const SETUP_MYAPP: &str = "GRANT USAGE ON SCHEMA public TO leasegate_readonly;
GRANT USAGE, CREATE ON SCHEMA public TO leasegate_readwrite;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO leasegate_readonly;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO leasegate_readonly;";

impl Pg {
    pub fn start(root: &Root) -> Result<Pg, String> {
        let dir = root.path.join("pg");
        let data = dir.join("data");
        let sock = dir.join("sock");
        for d in [&dir, &sock] {
            std::fs::create_dir_all(d).map_err(|e| format!("mkdir {}: {e}", d.display()))?;
        }
        let password = format!("pg-super-{}", std::process::id());
        let pwfile = dir.join("pwfile");
        std::fs::write(&pwfile, &password).map_err(|e| format!("write pwfile: {e}"))?;
        set_mode(&pwfile, 0o600)?;
        let owner = os_user()?;
        if let Some((uid, gid)) = owner {
            for p in [&dir, &sock, &pwfile] {
                std::os::unix::fs::chown(p, Some(uid), Some(gid))
                    .map_err(|e| format!("chown {}: {e}", p.display()))?;
            }
        }

        let initdb_log = dir.join("initdb.log");
        let mut initdb = Command::new(pg_bin("initdb"));
        initdb
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=scram-sha-256", "--encoding=UTF8"])
            .args(["--locale=C", "--no-sync"])
            .arg(format!("--pwfile={}", pwfile.display()));
        let status = as_postgres(&mut initdb, &dir, owner, &initdb_log)?
            .status()
            .map_err(|e| format!("run initdb: {e}"))?;
        if !status.success() {
            return Err(format!(
                "initdb failed ({status}):\n{}",
                tail(&initdb_log, 4000)
            ));
        }

        let port = free_port();
        let log = dir.join("postgres.log");
        let mut postgres = Command::new(pg_bin("postgres"));
        postgres
            .arg("-D")
            .arg(&data)
            .arg("-p")
            .arg(port.to_string());
        for setting in [
            "listen_addresses=127.0.0.1".to_string(),
            format!("unix_socket_directories={}", sock.display()),
            "max_connections=300".to_string(),
            "fsync=off".to_string(),
            "synchronous_commit=off".to_string(),
            "full_page_writes=off".to_string(),
        ] {
            postgres.arg("-c").arg(setting);
        }
        let mut child = as_postgres(&mut postgres, &dir, owner, &log)?
            .spawn()
            .map_err(|e| format!("spawn postgres: {e}"))?;
        // SIGINT = fast shutdown: works even with clients still connected.
        root.register("INT", child.id(), "postgres");

        let pg = Pg {
            port,
            password,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "postgres exited ({status}):\n{}",
                    tail(&pg.log, 4000)
                ));
            }
            match pg.psql("postgres", "select 1") {
                Ok(_) => break,
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!(
                        "postgres not ready after 60 s: {e}\n{}",
                        tail(&pg.log, 4000)
                    ));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
        for stmt in SETUP_CLUSTER.split(";\n") {
            pg.psql("postgres", stmt)?;
        }
        pg.psql("myapp", SETUP_MYAPP)?;
        Ok(pg)
    }

    /// Runs SQL as superuser over TCP with psql (synchronous; for setup only).
    pub fn psql(&self, db: &str, sql: &str) -> Result<String, String> {
        let out = Command::new(pg_bin("psql"))
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .args(["-h", "127.0.0.1", "-U", "postgres", "-d", db])
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-c")
            .arg(sql)
            .env("PGPASSWORD", &self.password)
            .env("PGSSLMODE", "disable")
            .env("PGCONNECT_TIMEOUT", "5")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("run psql: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "psql {sql:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// A superuser connection over plain TCP (the driver task runs on the caller's runtime).
    pub async fn superuser(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::Config::new()
            .host("127.0.0.1")
            .port(self.port)
            .user("postgres")
            .password(&self.password)
            .dbname("myapp")
            .connect_timeout(Duration::from_secs(5))
            .connect(tokio_postgres::NoTls)
            .await
            .expect("superuser connection to the test cluster");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        client
    }
}

/// Roles whose name starts with `prefix` (the per-mount username prefix), sorted.
pub async fn dynamic_roles(prefix: &str) -> Vec<String> {
    let client = super::env().pg.superuser().await;
    let rows = client
        .query(
            "select rolname::text from pg_roles where starts_with(rolname, $1) order by 1",
            &[&prefix],
        )
        .await
        .expect("query pg_roles");
    rows.iter().map(|r| r.get::<_, String>(0)).collect()
}

/// Number of active backends of roles with `prefix` whose query contains `fragment`.
pub async fn active_queries(prefix: &str, fragment: &str) -> i64 {
    let client = super::env().pg.superuser().await;
    let row = client
        .query_one(
            "select count(*) from pg_stat_activity where starts_with(usename, $1) \
             and state = 'active' and strpos(query, $2) > 0",
            &[&prefix, &fragment],
        )
        .await
        .expect("query pg_stat_activity");
    row.get(0)
}

/// uid/gid of the `postgres` OS user when running as root (initdb refuses root).
fn os_user() -> Result<Option<(u32, u32)>, String> {
    if id(&["-u"])? != 0 {
        return Ok(None);
    }
    Ok(Some((id(&["-u", "postgres"])?, id(&["-g", "postgres"])?)))
}

fn id(args: &[&str]) -> Result<u32, String> {
    let out = Command::new("id")
        .args(args)
        .output()
        .map_err(|e| format!("run id: {e}"))?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .map_err(|_| {
            format!(
                "`id {}` failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

fn as_postgres<'a>(
    cmd: &'a mut Command,
    cwd: &Path,
    owner: Option<(u32, u32)>,
    log: &Path,
) -> Result<&'a mut Command, String> {
    let out = std::fs::File::create(log).map_err(|e| format!("create {}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| format!("dup log fd: {e}"))?;
    cmd.current_dir(cwd)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    if let Some((uid, gid)) = owner {
        cmd.uid(uid)
            .gid(gid)
            .env("HOME", cwd)
            .env("USER", "postgres");
    }
    Ok(cmd)
}
