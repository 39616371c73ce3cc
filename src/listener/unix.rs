//! The local Unix-socket listener (`listen.unix_socket_dir`): binds
//! `<dir>/.s.PGSQL.<port>` (libpq's name for a server's socket), replacing a stale socket file
//! only when nothing listens on it, sets the file's mode before the name appears (the socket
//! is bound under a temporary name, chmod-ed, then renamed into place), accepts with its own
//! slots ([`crate::limits::slots`]), runs each connection as a Unix session
//! ([`crate::session::unix::run`]), and removes the socket file when accepting stops.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::StaticListen;
use crate::config::socket_dir::check_dir;
use crate::runtime::Shards;
use crate::state::AppState;

/// A bound Unix socket; dropping it removes the socket file (when it is still ours).
pub(crate) struct UnixSocket {
    listener: UnixListener,
    /// `<dir>/.s.PGSQL.<port>`.
    path: PathBuf,
    /// Device and inode of the socket file bound, so that the removal never takes away a
    /// file another process put there since.
    file: (u64, u64),
}

impl UnixSocket {
    /// The socket of `listen` (none without `unix_socket_dir`), named after `port`, the TCP
    /// listener's port.
    pub(crate) fn bind(listen: &StaticListen, port: u16) -> Result<Option<UnixSocket>, String> {
        let Some(dir) = &listen.unix_socket_dir else {
            return Ok(None);
        };
        check_dir(dir)?;
        let path = dir.join(format!(".s.PGSQL.{port}"));
        clear_stale(&path)?;
        let tmp = dir.join(format!(".s.PGSQL.{port}.{}.tmp", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let shown = path.display();
        let bind = || -> std::io::Result<(UnixListener, (u64, u64))> {
            let listener = UnixListener::bind(&tmp)?;
            std::fs::set_permissions(
                &tmp,
                std::fs::Permissions::from_mode(listen.unix_socket_mode),
            )?;
            std::fs::rename(&tmp, &path)?;
            let meta = std::fs::symlink_metadata(&path)?;
            Ok((listener, (meta.dev(), meta.ino())))
        };
        match bind() {
            Ok((listener, file)) => Ok(Some(UnixSocket {
                listener,
                path,
                file,
            })),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(format!("cannot listen on {shown}: {e}"))
            }
        }
    }

    /// The socket file's path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for UnixSocket {
    fn drop(&mut self) {
        let ours =
            std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.file);
        if ours && let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot remove the unix socket");
        }
    }
}

/// A socket file left by a process that is gone is removed (it refuses connections); one that
/// accepts them belongs to a running server and stops this start, as does a file that is not
/// a socket.
fn clear_stale(path: &Path) -> Result<(), String> {
    let shown = path.display();
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("{shown}: {e}")),
    };
    if !meta.file_type().is_socket() {
        return Err(format!(
            "{shown} exists and is not a socket: leasegate does not replace it"
        ));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(format!("{shown} is in use: another server listens on it")),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            tracing::info!(path = %shown, "replacing a stale unix socket (nothing listens on it)");
            std::fs::remove_file(path).map_err(|e| format!("cannot remove stale {shown}: {e}"))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("{shown}: {e}")),
    }
}

/// Accepts on `socket` until `accepting` is cancelled, then removes the socket file.
pub(crate) async fn accept_loop(
    socket: UnixSocket,
    state: Arc<AppState>,
    max_connections: usize,
    tracker: TaskTracker,
    accepting: CancellationToken,
    sessions: CancellationToken,
    shards: Shards,
) {
    let slots = crate::limits::slots::Slots::new(max_connections);
    while let Some((admission, (stream, _))) =
        super::next_connection(&slots, &accepting, || socket.listener.accept()).await
    {
        let state = state.clone();
        let stop = sessions.child_token();
        shards.spawn(&tracker, stream, move |stream| {
            crate::session::unix::run(state, stream, stop, admission)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listen(dir: &Path) -> StaticListen {
        StaticListen {
            address: "127.0.0.1:6432".parse().expect("addr"),
            max_connections: 1,
            unix_socket_dir: Some(dir.to_path_buf()),
            unix_socket_mode: 0o640,
        }
    }

    #[tokio::test]
    async fn binds_with_the_mode_replaces_only_a_dead_socket_and_cleans_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let path = dir.path().join(".s.PGSQL.6432");
        // A stale socket: bound, then its listener gone.
        drop(std::os::unix::net::UnixListener::bind(&path).expect("stale"));
        let socket = UnixSocket::bind(&listen(dir.path()), 6432)
            .expect("bind")
            .expect("some");
        assert_eq!(socket.path(), path);
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        let e = UnixSocket::bind(&listen(dir.path()), 6432)
            .err()
            .expect("in use");
        assert!(e.contains("is in use"), "{e}");
        drop(socket);
        assert!(!path.exists(), "removed when dropped");
        std::fs::write(&path, "not a socket").expect("file");
        let e = UnixSocket::bind(&listen(dir.path()), 6432)
            .err()
            .expect("a file");
        assert!(e.contains("is not a socket"), "{e}");
        assert_eq!(
            std::fs::read_to_string(&path).expect("kept"),
            "not a socket"
        );
    }
}
