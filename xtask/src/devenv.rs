//! `cargo xtask devenv up|env|down`: the dev environment of `leasegate-devenv`, started
//! detached so that it outlives this process, with its state in its directory.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use devenv::process::{self, Registry};
use devenv::stack::{self, Options, Stack};
use devenv::{Context, Error, Result, bao, contract, pg, ports, state};

/// How long a stopped process may take before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(20);

/// How long deploy/openbao-setup.sh may take.
const SETUP_TIMEOUT: Duration = Duration::from_secs(120);

/// What `up` starts.
pub struct Up {
    pub dir: Option<PathBuf>,
    pub pg_settings: Vec<String>,
    pub throwaway: bool,
    pub pg_tls: bool,
    pub certs: bool,
    pub ports: Vec<String>,
    pub mount: Option<Mount>,
}

/// A secrets engine mount set up by deploy/openbao-setup.sh.
pub struct Mount {
    pub mount: String,
    pub prefix: String,
    pub token_file: Option<PathBuf>,
}

/// Starts the environment; on any error stops what did start and removes the directory.
pub fn up(req: Up) -> Result<()> {
    for name in &req.ports {
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(Error::new(format!(
                "--port {name:?}: a name of letters, digits and _ (it becomes DEVENV_PORT_NAME)"
            )));
        }
    }
    let started = Instant::now();
    let dir = create_dir(req.dir.as_deref())?;
    let registry = Registry::create(&dir.join(state::REGISTRY))?;
    let started_vars =
        start(&dir, &registry, &req).and_then(|vars| state::write(&dir, &vars).map(|()| vars));
    match started_vars {
        Ok(vars) => {
            let certs = if req.certs || req.pg_tls {
                ", certificates"
            } else {
                ""
            };
            eprintln!(
                "devenv: up in {:.1} s: PostgreSQL, OpenBao{certs} in {dir} \
                 (`cargo xtask devenv down --dir {dir}` stops them)",
                started.elapsed().as_secs_f64(),
                dir = dir.display(),
            );
            print!("{}", state::render(&vars));
            Ok(())
        }
        Err(e) => {
            let _ = registry.stop_all(STOP_GRACE);
            let _ = std::fs::remove_dir_all(&dir);
            Err(e)
        }
    }
}

fn start(dir: &Path, registry: &Registry, req: &Up) -> Result<Vec<(String, String)>> {
    let mut settings: Vec<String> = Vec::new();
    if req.throwaway {
        settings.extend(pg::THROWAWAY_SETTINGS.iter().map(|s| s.to_string()));
    }
    settings.extend(req.pg_settings.iter().cloned());
    let opts = Options {
        pg_settings: settings,
        certs: req.certs,
        pg_tls: req.pg_tls,
        detach: true,
    };
    let stack = stack::start(dir, &opts, registry)?;
    let mut vars = stack.vars();
    for name in &req.ports {
        vars.push((
            format!("DEVENV_PORT_{}", name.to_ascii_uppercase()),
            ports::free_port()?.to_string(),
        ));
    }
    if let Some(mount) = &req.mount {
        vars.extend(setup_mount(&stack, mount)?);
    }
    Ok(vars)
}

/// A new directory (mode 0755: the OS user postgres must enter it) at `dir`, or a fresh one
/// below /tmp.
fn create_dir(dir: Option<&Path>) -> Result<PathBuf> {
    let dir = match dir {
        Some(d) => d.to_path_buf(),
        None => std::env::temp_dir().join(format!("leasegate-devenv-{}", process::random_hex(4)?)),
    };
    if dir.join(state::REGISTRY).exists() {
        return Err(Error::new(format!(
            "a dev environment already lives in {0}: `cargo xtask devenv down --dir {0}` first",
            dir.display()
        )));
    }
    let occupied = std::fs::read_dir(&dir).is_ok_and(|mut d| d.next().is_some());
    if occupied {
        return Err(Error::new(format!(
            "{} exists and is not empty",
            dir.display()
        )));
    }
    process::make_dir(&dir, 0o755)?;
    dir.canonicalize()
        .context(|| format!("resolve {}", dir.display()))
}

/// Runs the shipped deploy/openbao-setup.sh against the environment (as an operator would
/// against theirs); returns the mount's variables.
fn setup_mount(stack: &Stack, m: &Mount) -> Result<Vec<(String, String)>> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/openbao-setup.sh");
    let token_file = m
        .token_file
        .clone()
        .unwrap_or_else(|| stack.dir.join("vault-token"));
    let log = stack.dir.join("openbao-setup.log");
    let out = std::fs::File::create(&log).context(|| format!("create {}", log.display()))?;
    let err = out.try_clone().context(|| "dup log fd".into())?;
    let mut child = Command::new("bash")
        .arg(&script)
        .env("VAULT_ADDR", &stack.bao.addr)
        .env("VAULT_TOKEN", bao::ROOT_TOKEN)
        .env("PGHOST", "127.0.0.1")
        .env("PGPORT", stack.pg.conn.port.to_string())
        .env("PGUSER", "postgres")
        .env("PGPASSWORD", &stack.pg.conn.password)
        .env("PGDATABASE", contract::DATABASE)
        .env("MOUNT", &m.mount)
        .env("USERNAME_PREFIX", &m.prefix)
        .env("LEASEGATE_TOKEN_FILE", &token_file)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .context(|| format!("run {}", script.display()))?;
    let deadline = Instant::now() + SETUP_TIMEOUT;
    let status = loop {
        if let Some(status) = child
            .try_wait()
            .context(|| "wait for openbao-setup.sh".into())?
        {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::new(format!(
                "deploy/openbao-setup.sh did not finish within {SETUP_TIMEOUT:?}"
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    if !status.success() {
        return Err(Error::new(format!(
            "deploy/openbao-setup.sh failed ({status}); {}:\n{}",
            log.display(),
            process::tail(&log, 3000)
        )));
    }
    Ok(vec![
        ("DEVENV_MOUNT".into(), m.mount.clone()),
        ("DEVENV_MOUNT_PREFIX".into(), m.prefix.clone()),
        ("DEVENV_TOKEN_FILE".into(), token_file.display().to_string()),
    ])
}

/// Prints the variables of the environment in `dir`.
pub fn env(dir: Option<PathBuf>) -> Result<()> {
    let dir = dir.ok_or_else(|| Error::new("which environment? pass --dir or set DEVENV_DIR"))?;
    print!("{}", state::render(&state::read(&dir)?));
    Ok(())
}

/// Stops every process the environment in `dir` registered, then removes the directory.
pub fn down(dir: Option<PathBuf>, keep_dir: bool) -> Result<()> {
    let dir = dir.ok_or_else(|| Error::new("which environment? pass --dir or set DEVENV_DIR"))?;
    let registry_path = dir.join(state::REGISTRY);
    if !registry_path.exists() {
        if dir.exists() {
            return Err(Error::new(format!(
                "{} holds no dev environment (no {}): not touching it",
                dir.display(),
                state::REGISTRY
            )));
        }
        eprintln!("devenv: nothing to stop ({} does not exist)", dir.display());
        return Ok(());
    }
    for line in Registry::open(&registry_path).stop_all(STOP_GRACE)? {
        eprintln!("devenv: {line}");
    }
    if keep_dir {
        // The registry stays: a later `down` finds nothing running and removes the directory.
        eprintln!("devenv: stopped; kept {}", dir.display());
    } else {
        std::fs::remove_dir_all(&dir).context(|| format!("remove {}", dir.display()))?;
        eprintln!("devenv: stopped; removed {}", dir.display());
    }
    Ok(())
}
