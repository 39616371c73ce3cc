//! The local admin socket (`[admin] socket`): the operator's console, `leasegate sessions
//! list|end` and `leasegate leases check`, as HTTP/1 over a Unix socket. Never on TCP.
//!
//! Who may talk to it: the file is created 0600 (bound inside a fresh 0700 directory, then
//! renamed into place, so it is never reachable with looser permissions), and every
//! connection's `SO_PEERCRED` uid must be leasegate's own effective uid or root; anyone else
//! gets 403 and an audit line. Every request is audited with the caller's uid (`routes`).
//! As on the metrics server, at most [`MAX_CONNECTIONS`] connections are served at once,
//! headers must arrive within [`HEADER_READ_TIMEOUT`], and a connection lasts at most
//! [`CONNECTION_TIMEOUT`] (long enough for `leases check` to look up many leases).
//!
//! At start a stale socket file (nothing accepts on it) is replaced; a live one, or a path
//! that is not a socket, is a startup error, as is a missing directory. The file is removed
//! when the server stops, unless another process replaced it meanwhile.

pub(crate) mod api;
mod leases;
mod routes;

use std::convert::Infallible;
use std::io::ErrorKind;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;

use crate::state::AppState;
use crate::tasks::Tasks;

/// Admin socket connections served at once.
pub(crate) const MAX_CONNECTIONS: usize = 16;
/// Limit for a request's headers to arrive (also the idle time between requests).
pub(crate) const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Limit for a whole connection.
pub(crate) const CONNECTION_TIMEOUT: Duration = Duration::from_secs(120);

/// Why the admin socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum AdminSocketError {
    /// The socket's directory is missing.
    #[error("admin.socket {0}: directory {1} does not exist")]
    NoDirectory(PathBuf, PathBuf),
    /// Something answers on the path already.
    #[error("admin.socket {0}: another process is listening on it")]
    InUse(PathBuf),
    /// The path exists and is no socket: never removed.
    #[error("admin.socket {0}: exists and is not a socket; not replacing it")]
    NotSocket(PathBuf),
    /// Binding, setting permissions or moving it into place failed.
    #[error("admin.socket {0}: {1}")]
    Io(PathBuf, std::io::Error),
}

/// The bound socket; removes its file when dropped (if it is still this one).
pub(crate) struct AdminSocket {
    /// The bound socket.
    listener: UnixListener,
    /// Its path, for the audit lines and the removal.
    path: PathBuf,
    /// Device and inode of the file bound, to leave a newer instance's socket alone.
    inode: (u64, u64),
}

impl Drop for AdminSocket {
    fn drop(&mut self) {
        let ours =
            std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.inode);
        if ours && let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot remove the admin socket");
        }
    }
}

/// The directory of the socket `path`.
fn directory(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// What `check-config` reports about `[admin] socket` (its directory must exist).
pub fn problem(path: &Path) -> Option<String> {
    let dir = directory(path);
    let missing = AdminSocketError::NoDirectory(path.to_owned(), dir.to_owned());
    (!dir.is_dir()).then(|| missing.to_string())
}

/// Binds `path`: 0600 from the start, a stale file replaced.
pub(crate) fn bind(path: &Path) -> Result<AdminSocket, AdminSocketError> {
    let io = |e| AdminSocketError::Io(path.to_owned(), e);
    let dir = directory(path);
    if !dir.is_dir() {
        return Err(AdminSocketError::NoDirectory(
            path.to_owned(),
            dir.to_owned(),
        ));
    }
    clear_stale(path)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let private = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::create_dir(&private).map_err(io)?;
    let placed = (|| {
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700))?;
        let inner = private.join("admin.sock");
        let listener = UnixListener::bind(&inner)?;
        std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&inner, path)?;
        Ok(listener)
    })();
    let _ = std::fs::remove_dir_all(&private);
    let listener = placed.map_err(io)?;
    let meta = std::fs::symlink_metadata(path).map_err(io)?;
    Ok(AdminSocket {
        listener,
        path: path.to_owned(),
        inode: (meta.dev(), meta.ino()),
    })
}

/// Removes a socket file nothing listens on; refuses a live one and anything else.
fn clear_stale(path: &Path) -> Result<(), AdminSocketError> {
    use std::os::unix::fs::FileTypeExt;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(AdminSocketError::Io(path.to_owned(), e)),
    };
    if !meta.file_type().is_socket() {
        return Err(AdminSocketError::NotSocket(path.to_owned()));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(AdminSocketError::InUse(path.to_owned())),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
            tracing::info!(path = %path.display(), "replacing a stale admin socket");
            std::fs::remove_file(path).map_err(|e| AdminSocketError::Io(path.to_owned(), e))
        }
        Err(e) => Err(AdminSocketError::Io(path.to_owned(), e)),
    }
}

/// leasegate's effective uid: callers with it (or root) are served.
fn own_uid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// Serves `socket` until the token of `tasks` is cancelled; its file is removed then.
pub(crate) async fn serve(socket: AdminSocket, state: Arc<AppState>, tasks: Tasks) {
    let stop = tasks.stop();
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let me = own_uid();
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = stop.cancelled() => return,
        };
        let stream = tokio::select! {
            r = socket.listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "admin socket accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let (state, stop, path) = (state.clone(), stop.clone(), socket.path.clone());
        tasks.spawn(async move {
            tokio::select! {
                () = connection(stream, state, path, me) => {}
                _ = stop.cancelled() => {}
            }
            drop(permit);
        });
    }
}

/// One connection: the caller's uid checked, then its requests answered.
async fn connection(stream: UnixStream, state: Arc<AppState>, path: PathBuf, me: u32) {
    let uid = stream.peer_cred().ok().map(|c| c.uid());
    let allowed = uid.is_some_and(|u| u == me || u == 0);
    let caller = routes::Caller {
        uid: uid.unwrap_or(u32::MAX),
        allowed,
        socket: path,
    };
    let caller = Arc::new(caller);
    let service = service_fn(move |req| {
        let (state, caller) = (state.clone(), caller.clone());
        async move { Ok::<_, Infallible>(routes::answer(&state, &caller, req).await) }
    });
    let conn = http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn binds_0600_replaces_a_stale_socket_and_refuses_a_live_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("admin.sock");
        // A stale socket: bound, then its listener dropped.
        drop(std::os::unix::net::UnixListener::bind(&path).expect("stale"));
        let socket = bind(&path).expect("stale socket replaced");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = bind(&path).err().map(|e| e.to_string());
        assert!(
            again.is_some_and(|e| e.contains("another process")),
            "live socket kept"
        );
        drop(socket);
        assert!(!path.exists(), "removed at the end");
        std::fs::write(&path, "not a socket").expect("file");
        assert!(matches!(bind(&path), Err(AdminSocketError::NotSocket(_))));
        let missing = dir.path().join("no/such/dir/admin.sock");
        let e = bind(&missing)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("does not exist"), "{e}");
    }
}
