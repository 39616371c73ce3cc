//! Processes of the dev environment: the registry of what to stop, running a server as the
//! OS user `postgres` when we are root (initdb and postgres refuse root), log files, stopping
//! by PID, and small file helpers.
//!
//! The registry is a text file of lines `SIGNAL PID NAME`. Whoever cleans up reads it: the
//! test harness's watchdog shell script when the test binary has exited, or
//! [`Registry::stop_all`] (`cargo xtask devenv down`). `NAME` must occur in the process's
//! command line, which guards against a PID reused by an unrelated process.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use crate::{Context, Error, Result};

/// The signal that stops a process cleanly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// PostgreSQL's fast shutdown (works with clients still connected).
    Int,
    /// The usual polite stop.
    Term,
    /// No shutdown at all (servers whose state is thrown away anyway).
    Kill,
}

impl Signal {
    /// The name `kill -NAME` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Signal::Int => "INT",
            Signal::Term => "TERM",
            Signal::Kill => "KILL",
        }
    }
}

impl FromStr for Signal {
    type Err = Error;
    fn from_str(s: &str) -> Result<Signal> {
        match s {
            "INT" => Ok(Signal::Int),
            "TERM" => Ok(Signal::Term),
            "KILL" => Ok(Signal::Kill),
            other => Err(Error::new(format!(
                "unknown signal {other:?} (INT, TERM, KILL)"
            ))),
        }
    }
}

/// One registered process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Sent first; SIGKILL follows if the process outlives the grace period.
    pub signal: Signal,
    /// The process to stop.
    pub pid: u32,
    /// Occurs in the process's command line while it is the process we started.
    pub name: String,
}

/// The file listing every process to stop when the environment goes away.
#[derive(Clone, Debug)]
pub struct Registry {
    /// Lines `SIGNAL PID NAME`, appended as processes start.
    path: PathBuf,
}

impl Registry {
    /// A new, empty registry file at `path`.
    pub fn create(path: &Path) -> Result<Registry> {
        std::fs::write(path, "").context(|| format!("write {}", path.display()))?;
        Ok(Registry::open(path))
    }

    /// The registry at `path` (which may not exist: then nothing is registered).
    pub fn open(path: &Path) -> Registry {
        Registry {
            path: path.to_path_buf(),
        }
    }

    /// Where the registry lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records a process to stop with `signal`; `name` must occur in its command line.
    pub fn register(&self, signal: Signal, pid: u32, name: &str) -> Result<()> {
        if name.is_empty() || name.contains(char::is_whitespace) {
            return Err(Error::new(format!(
                "process name {name:?} must be one word"
            )));
        }
        let line = format!("{} {pid} {name}\n", signal.as_str());
        OpenOptions::new()
            .append(true)
            .open(&self.path)
            .and_then(|mut f| f.write_all(line.as_bytes()))
            .context(|| format!("register pid {pid} in {}", self.path.display()))
    }

    /// Every registered process, in the order registered.
    pub fn entries(&self) -> Result<Vec<Entry>> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::new(format!("read {}: {e}", self.path.display()))),
        };
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|line| {
                let bad = || Error::new(format!("{}: bad line {line:?}", self.path.display()));
                let mut words = line.split_whitespace();
                let signal = words.next().ok_or_else(bad)?.parse()?;
                let pid = words.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
                let name = words.next().ok_or_else(bad)?.to_string();
                Ok(Entry { signal, pid, name })
            })
            .collect()
    }

    /// Starts a watchdog (a detached `sh`, in its own process group so that a Ctrl-C aimed at
    /// its creator does not reach it) that waits for process `pid` to exit, then stops every
    /// registered process as [`Registry::stop_all`] does (10 s grace) and removes `dir`. For
    /// owners that cannot clean up themselves, like a test binary whose statics never drop.
    pub fn watch(&self, pid: u32, dir: &Path) -> Result<()> {
        Command::new("sh")
            .arg("-c")
            .arg(WATCHDOG)
            .arg("leasegate-devenv-watchdog")
            .arg(pid.to_string())
            .arg(&self.path)
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .map(drop)
            .context(|| "spawn the cleanup watchdog".into())
    }

    /// Stops every registered process that still runs, newest first: its signal, then SIGKILL
    /// after `grace`. Returns one line per process it had to stop.
    pub fn stop_all(&self, grace: Duration) -> Result<Vec<String>> {
        let mut report = Vec::new();
        for entry in self.entries()?.iter().rev() {
            if let Some(line) = stop(entry, grace) {
                report.push(line);
            }
        }
        Ok(report)
    }
}

/// [`Registry::watch`]'s script: `$1` the PID to outlive, `$2` the registry, `$3` the
/// directory to remove. The same steps as [`Registry::stop_all`], in sh because the process
/// that registered everything is gone by then.
const WATCHDOG: &str = r#"
alive() { [ -r "/proc/$1/cmdline" ] && tr '\0' ' ' < "/proc/$1/cmdline" 2>/dev/null | grep -q -- "$2"; }
while [ -e "/proc/$1" ] && ! grep -q '^State:.*[ZX]' "/proc/$1/status" 2>/dev/null; do sleep 0.2; done
while read -r sig pid name; do alive "$pid" "$name" && kill "-$sig" "$pid" 2>/dev/null; done < "$2"
i=0
while [ $i -lt 50 ]; do
  left=0
  while read -r sig pid name; do alive "$pid" "$name" && left=1; done < "$2"
  [ $left -eq 0 ] && break
  sleep 0.2; i=$((i+1))
done
while read -r sig pid name; do alive "$pid" "$name" && kill -9 "$pid" 2>/dev/null; done < "$2"
rm -rf "$3"
"#;

/// Stops one process (if it still is the one registered); says what it did.
fn stop(entry: &Entry, grace: Duration) -> Option<String> {
    if !alive(entry.pid, &entry.name) {
        return None;
    }
    send(entry.pid, entry.signal);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if !alive(entry.pid, &entry.name) {
            return Some(format!("stopped {} (pid {})", entry.name, entry.pid));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    send(entry.pid, Signal::Kill);
    Some(format!(
        "killed {} (pid {}): still running {grace:?} after SIG{}",
        entry.name,
        entry.pid,
        entry.signal.as_str()
    ))
}

/// The process `pid` runs and `name` occurs in its command line. A zombie has no command
/// line; neither has a process for a moment while it execs (just after it was spawned), which
/// counts as alive.
pub fn alive(pid: u32, name: &str) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    if cmdline.is_empty() {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let state = status
            .lines()
            .find_map(|l| l.strip_prefix("State:"))
            .and_then(|s| s.split_whitespace().next());
        return state.is_some_and(|s| s != "Z" && s != "X");
    }
    String::from_utf8_lossy(&cmdline)
        .replace('\0', " ")
        .contains(name)
}

/// Sends `signal` to `pid` (with kill(1); a process already gone is not an error).
pub fn send(pid: u32, signal: Signal) {
    let _ = Command::new("kill")
        .arg(format!("-{}", signal.as_str()))
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// The OS user a server runs as: `postgres` when we are root, otherwise ourselves (`None`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunAs {
    /// User id of `postgres`.
    pub uid: u32,
    /// Its primary group.
    pub gid: u32,
}

/// uid/gid of the OS user `postgres` when running as root (initdb refuses root), else `None`.
pub fn postgres_user() -> Result<Option<RunAs>> {
    if id(&["-u"])? != 0 {
        return Ok(None);
    }
    Ok(Some(RunAs {
        uid: id(&["-u", "postgres"])?,
        gid: id(&["-g", "postgres"])?,
    }))
}

fn id(args: &[&str]) -> Result<u32> {
    let out = Command::new("id")
        .args(args)
        .output()
        .context(|| "run id".into())?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .map_err(|_| {
            Error::new(format!(
                "`id {}` failed: {} (running as root needs the OS user postgres: \
                 install postgresql-15)",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        })
}

/// Prepares `cmd` to run in `cwd` with stdin closed and stdout/stderr appended to `log`, as
/// `owner` when given (with `HOME` = `cwd`), in its own process group when `detach` (so a
/// Ctrl-C at the terminal that started it does not reach it).
pub fn prepare<'a>(
    cmd: &'a mut Command,
    cwd: &Path,
    owner: Option<RunAs>,
    log: &Path,
    detach: bool,
) -> Result<&'a mut Command> {
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .context(|| format!("open {}", log.display()))?;
    if let Some(o) = owner {
        std::os::unix::fs::chown(log, Some(o.uid), Some(o.gid))
            .context(|| format!("chown {}", log.display()))?;
    }
    let err = out.try_clone().context(|| "dup log fd".into())?;
    cmd.current_dir(cwd)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    if let Some(o) = owner {
        cmd.uid(o.uid)
            .gid(o.gid)
            .env("HOME", cwd)
            .env("USER", "postgres");
    }
    if detach {
        cmd.process_group(0);
    }
    Ok(cmd)
}

/// `mkdir -p`, then `chmod mode`.
pub fn make_dir(path: &Path, mode: u32) -> Result<()> {
    std::fs::create_dir_all(path).context(|| format!("mkdir {}", path.display()))?;
    set_mode(path, mode)
}

/// `chmod mode path`.
pub fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .context(|| format!("chmod {mode:o} {}", path.display()))
}

/// `chown owner path` when an owner is given.
pub fn chown(path: &Path, owner: Option<RunAs>) -> Result<()> {
    match owner {
        Some(o) => std::os::unix::fs::chown(path, Some(o.uid), Some(o.gid))
            .context(|| format!("chown {}", path.display())),
        None => Ok(()),
    }
}

/// Writes `text` to a new file readable by its owner only (mode 0600 from the start).
pub fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .context(|| format!("write {}", path.display()))
}

/// Last `max` bytes of a text file, for error messages.
pub fn tail(path: &Path, max: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let start = text.len().saturating_sub(max);
    let start = (start..text.len())
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(text.len());
    text[start..].to_string()
}

/// `bytes` random bytes from the kernel, as lower-case hex (passwords of throwaway servers).
pub fn random_hex(bytes: usize) -> Result<String> {
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .context(|| "read /dev/urandom".into())?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_round_trips_and_stops_only_its_own_processes() {
        let dir = std::env::temp_dir().join(format!("devenv-registry-{}", std::process::id()));
        make_dir(&dir, 0o700).unwrap();
        let registry = Registry::create(&dir.join("processes")).unwrap();
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        registry
            .register(Signal::Term, child.id(), "sleep")
            .unwrap();
        // A live PID whose command line does not match: must be left alone.
        registry
            .register(Signal::Kill, std::process::id(), "no-such-name")
            .unwrap();
        assert!(registry.register(Signal::Term, 1, "two words").is_err());
        let entries = registry.entries().unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].signal, Signal::Term);
        assert_eq!(entries[0].name, "sleep");

        let reaper = std::thread::spawn(move || child.wait().unwrap());
        let report = registry.stop_all(Duration::from_secs(10)).unwrap();
        assert!(
            !reaper.join().unwrap().success(),
            "sleep was stopped by SIGTERM: {report:?}"
        );
        assert_eq!(report.len(), 1, "{report:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn watchdog_cleans_up_after_its_owner_exits() {
        let dir = std::env::temp_dir().join(format!("devenv-watch-{}", std::process::id()));
        make_dir(&dir, 0o700).unwrap();
        let registry = Registry::create(&dir.join("processes")).unwrap();
        let mut owner = Command::new("sleep").arg("0.3").spawn().unwrap();
        let server = Command::new("sleep")
            .arg("30")
            .process_group(0)
            .spawn()
            .unwrap();
        let server_pid = server.id();
        registry
            .register(Signal::Term, server_pid, "sleep")
            .unwrap();
        registry.watch(owner.id(), &dir).unwrap();
        owner.wait().unwrap();
        // The server is our child: reap it so that it does not linger as a zombie.
        let reaper = std::thread::spawn(move || {
            let mut server = server;
            server.wait().unwrap()
        });
        assert!(!reaper.join().unwrap().success(), "stopped by SIGTERM");
        let deadline = Instant::now() + Duration::from_secs(10);
        while dir.exists() {
            assert!(Instant::now() < deadline, "{} still exists", dir.display());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    #[test]
    fn signals_parse_back() {
        for s in [Signal::Int, Signal::Term, Signal::Kill] {
            assert_eq!(s.as_str().parse::<Signal>().unwrap(), s);
        }
        assert!("HUP".parse::<Signal>().is_err());
    }

    #[test]
    fn random_hex_has_the_asked_length() {
        let a = random_hex(16).unwrap();
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, random_hex(16).unwrap());
    }
}
