//! The shared PostgreSQL 15 cluster: initdb with SCRAM, start, readiness, fixtures, and
//! superuser queries the tests use to look at roles and activity, and backend process titles.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{Root, free_port, set_mode, tail};

/// PostgreSQL 15 binaries (initdb, postgres, psql); `PGBIN` overrides.
pub fn pg_bin(tool: &str) -> PathBuf {
    let dir = std::env::var_os("PGBIN").unwrap_or_else(|| "/usr/lib/postgresql/15/bin".into());
    Path::new(&dir).join(tool)
}

/// A running cluster, listening on 127.0.0.1 only.
#[derive(Clone, Debug)]
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

/// Where a cluster lives on disk, and the OS user it runs as.
struct Layout {
    dir: PathBuf,
    data: PathBuf,
    sock: PathBuf,
    owner: Option<(u32, u32)>,
}

/// Creates `dir` (owned by the `postgres` OS user when running as root) and runs initdb with
/// SCRAM and the superuser password `password`.
fn init_cluster(dir: &Path, password: &str) -> Result<Layout, String> {
    let layout = Layout {
        dir: dir.to_path_buf(),
        data: dir.join("data"),
        sock: dir.join("sock"),
        owner: os_user()?,
    };
    for d in [&layout.dir, &layout.sock] {
        std::fs::create_dir_all(d).map_err(|e| format!("mkdir {}: {e}", d.display()))?;
    }
    let pwfile = dir.join("pwfile");
    std::fs::write(&pwfile, password).map_err(|e| format!("write pwfile: {e}"))?;
    set_mode(&pwfile, 0o600)?;
    set_mode(dir, 0o755)?;
    if let Some((uid, gid)) = layout.owner {
        for p in [&layout.dir, &layout.sock, &pwfile] {
            std::os::unix::fs::chown(p, Some(uid), Some(gid))
                .map_err(|e| format!("chown {}: {e}", p.display()))?;
        }
    }

    let initdb_log = dir.join("initdb.log");
    let mut initdb = Command::new(pg_bin("initdb"));
    initdb
        .arg("-D")
        .arg(&layout.data)
        .args(["-U", "postgres", "--auth=scram-sha-256", "--encoding=UTF8"])
        .args(["--locale=C", "--no-sync"])
        .arg(format!("--pwfile={}", pwfile.display()));
    let status = as_postgres(&mut initdb, dir, layout.owner, &initdb_log)?
        .status()
        .map_err(|e| format!("run initdb: {e}"))?;
    if !status.success() {
        return Err(format!(
            "initdb failed ({status}):\n{}",
            tail(&initdb_log, 4000)
        ));
    }
    Ok(layout)
}

/// Starts the postmaster of `layout` on `port`, logging to `log`.
fn spawn_postgres(layout: &Layout, port: u16, log: &Path) -> Result<Child, String> {
    let mut postgres = Command::new(pg_bin("postgres"));
    postgres
        .arg("-D")
        .arg(&layout.data)
        .arg("-p")
        .arg(port.to_string());
    for setting in [
        "listen_addresses=127.0.0.1".to_string(),
        format!("unix_socket_directories={}", layout.sock.display()),
        "max_connections=300".to_string(),
        "fsync=off".to_string(),
        "synchronous_commit=off".to_string(),
        "full_page_writes=off".to_string(),
    ] {
        postgres.arg("-c").arg(setting);
    }
    as_postgres(&mut postgres, &layout.dir, layout.owner, log)?
        .spawn()
        .map_err(|e| format!("spawn postgres: {e}"))
}

/// Polls `select 1` until the cluster answers, at most `within`.
fn wait_ready(pg: &Pg, child: &mut Child, within: Duration) -> Result<(), String> {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "postgres exited ({status}):\n{}",
                tail(&pg.log, 4000)
            ));
        }
        match pg.psql("postgres", "select 1") {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(format!(
                    "postgres not ready after {within:?}: {e}\n{}",
                    tail(&pg.log, 4000)
                ));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// The contract's database and group roles.
fn setup_contract(pg: &Pg) -> Result<(), String> {
    for stmt in SETUP_CLUSTER.split(";\n") {
        pg.psql("postgres", stmt)?;
    }
    pg.psql("myapp", SETUP_MYAPP)?;
    Ok(())
}

impl Pg {
    pub fn start(root: &Root) -> Result<Pg, String> {
        let dir = root.path.join("pg");
        let password = format!("pg-super-{}", std::process::id());
        let layout = init_cluster(&dir, &password)?;
        let port = free_port();
        let log = dir.join("postgres.log");
        let mut child = spawn_postgres(&layout, port, &log)?;
        // SIGINT = fast shutdown: works even with clients still connected.
        root.register("INT", child.id(), "postgres");
        let pg = Pg {
            port,
            password,
            log,
        };
        wait_ready(&pg, &mut child, Duration::from_secs(60))?;
        setup_contract(&pg)?;
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

/// A PostgreSQL cluster of one test, for tests that restart it; set up like the shared one
/// (database `myapp`, the contract's group roles). Stopped and removed when dropped.
pub struct Cluster {
    pub pg: Pg,
    layout: Layout,
    child: Option<Child>,
    starts: usize,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// initdb, start, set up (blocking: call it from `spawn_blocking` in async tests).
    pub fn start() -> Result<Cluster, String> {
        let dir = super::root().tempdir("pg-");
        let password = format!("pg-own-{}", super::next_id());
        let layout = init_cluster(dir.path(), &password)?;
        let port = free_port();
        let mut cluster = Cluster {
            pg: Pg {
                port,
                password,
                log: dir.path().join("postgres-1.log"),
            },
            layout,
            child: None,
            starts: 0,
            _dir: dir,
        };
        cluster.spawn()?;
        setup_contract(&cluster.pg)?;
        Ok(cluster)
    }

    fn spawn(&mut self) -> Result<(), String> {
        self.starts += 1;
        self.pg.log = self
            .layout
            .dir
            .join(format!("postgres-{}.log", self.starts));
        let mut child = spawn_postgres(&self.layout, self.pg.port, &self.pg.log)?;
        super::root().register("INT", child.id(), "postgres");
        let ready = wait_ready(&self.pg, &mut child, Duration::from_secs(60));
        self.child = Some(child);
        ready
    }

    /// Fast shutdown (SIGINT, like `pg_ctl stop -m fast`: open sessions are terminated),
    /// waits for the postmaster to exit, at most `within`.
    pub fn stop_fast(&mut self, within: Duration) -> Result<(), String> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let _ = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + within;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return Ok(()),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!("postgres did not stop within {within:?}"));
                }
            }
        }
    }

    /// `pg_ctl restart -m fast`: fast shutdown, then start again on the same port; returns
    /// when the cluster answers queries (blocking).
    pub fn restart_fast(&mut self) -> Result<(), String> {
        self.stop_fast(Duration::from_secs(30))?;
        self.spawn()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Err(e) = self.stop_fast(Duration::from_secs(10)) {
            eprintln!("dedicated cluster: {e}");
        }
    }
}

/// Roles whose name starts with `prefix` (the per-mount username prefix), sorted.
pub async fn dynamic_roles(prefix: &str) -> Vec<String> {
    dynamic_roles_on(&super::env().pg, prefix).await
}

/// Roles of the cluster `pg` whose name starts with `prefix`, sorted.
pub async fn dynamic_roles_on(pg: &Pg, prefix: &str) -> Vec<String> {
    let client = pg.superuser().await;
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

/// Process titles of the backends of cluster `pg` (the children of its postmaster) that
/// contain `needle` (a role prefix, a role, a database name), e.g.
/// `postgres: lgt3_abc myapp 127.0.0.1(40022) startup`. A backend still starting (in
/// authentication, or sleeping in `post_auth_delay`) is not in `pg_stat_activity`; its title
/// shows it.
pub fn backend_titles(pg: &Pg, needle: &str) -> Vec<String> {
    let data = pg.log.parent().expect("cluster directory").join("data");
    let pid_file = data.join("postmaster.pid");
    let postmaster: u32 = std::fs::read_to_string(&pid_file)
        .ok()
        .and_then(|t| t.lines().next().and_then(|l| l.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no postmaster pid in {}", pid_file.display()));
    let mut titles = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        panic!("cannot list /proc");
    };
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // Field 4 of /proc/<pid>/stat is the parent pid; the command name in field 2 may
        // hold spaces but ends with the last ')'.
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let parent = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if parent != Some(postmaster) {
            continue;
        }
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let title = String::from_utf8_lossy(&cmdline)
            .replace('\0', " ")
            .trim()
            .to_string();
        if title.contains(needle) {
            titles.push(format!("{pid}: {title}"));
        }
    }
    titles
}
