//! The audit log's file: created with mode 0600 (an existing one its group or every user may
//! write is refused), and followed by its path. When the path no longer names the open file
//! (removed by a clean-up job, renamed away by log rotation without `copytruncate`), the next
//! line creates the file anew there, so lines keep reaching the file an operator reads
//! instead of an unlinked inode.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The open audit file and the path it must stay at.
pub(super) struct AuditFile {
    /// The configured `[audit] path`, looked at before each write.
    path: PathBuf,
    /// Where lines go now.
    file: File,
    /// A reopen failed and was logged: the next failure is not logged again.
    reopen_failed: bool,
}

impl AuditFile {
    /// Opens (or creates) the file at `path`.
    pub(super) fn open(path: &Path) -> std::io::Result<AuditFile> {
        Ok(AuditFile {
            path: path.to_owned(),
            file: open_file(path)?,
            reopen_failed: false,
        })
    }

    /// Reopens the path when it no longer names the open file. When that fails (the
    /// directory is gone, a file in the way is writable by others), lines keep going to the
    /// open file and the failure is logged once.
    fn follow_path(&mut self) {
        let same = match (std::fs::metadata(&self.path), self.file.metadata()) {
            (Ok(at_path), Ok(open)) => at_path.dev() == open.dev() && at_path.ino() == open.ino(),
            _ => false,
        };
        if same {
            return;
        }
        match open_file(&self.path) {
            Ok(file) => {
                tracing::warn!(path = %self.path.display(),
                    "the audit log file was removed or moved away: writing to a new one at its path");
                self.file = file;
                self.reopen_failed = false;
            }
            Err(e) if !self.reopen_failed => {
                self.reopen_failed = true;
                tracing::error!(path = %self.path.display(), error = %e,
                    "the audit log file was removed or moved away and cannot be created again: \
                     writing to the old one");
            }
            Err(_) => {}
        }
    }
}

impl Write for AuditFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.follow_path();
        self.file.write(buf)
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.follow_path();
        self.file.write_all(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Opens the audit file for appending, creating it with mode 0600. An existing file that its
/// group or every user may write is refused (its lines could be forged or removed); one they
/// may read is used with a warning.
pub(super) fn open_file(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    let mode = file.metadata()?.permissions().mode() & 0o777;
    if mode & 0o022 != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "{}: writable by its group or by every user (mode {mode:o}); run chmod 600",
                path.display()
            ),
        ));
    }
    if mode & 0o044 != 0 {
        tracing::warn!(path = %path.display(), mode = format!("{mode:o}"),
            "the audit log is readable by other users than leasegate's (chmod 600)");
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn the_file_is_created_0600_and_a_writable_one_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.log");
        open_file(&path).expect("created");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o620)).expect("chmod");
        let err = open_file(&path).expect_err("group-writable refused");
        assert!(err.to_string().contains("chmod 600"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        open_file(&path).expect("group-readable: used, with a warning");
    }

    fn text(path: &Path) -> String {
        std::fs::read_to_string(path).unwrap_or_default()
    }

    #[test]
    fn a_removed_or_renamed_file_is_created_anew_at_its_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.log");
        let mut file = AuditFile::open(&path).expect("opened");
        file.write_all(b"one\n").expect("write");
        std::fs::remove_file(&path).expect("remove");
        file.write_all(b"two\n").expect("write");
        assert_eq!(text(&path), "two\n");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        let rotated = dir.path().join("audit.log.1");
        std::fs::rename(&path, &rotated).expect("rename");
        file.write_all(b"three\n").expect("write");
        assert_eq!(text(&rotated), "two\n");
        assert_eq!(text(&path), "three\n");
    }

    #[test]
    fn a_file_that_cannot_be_created_again_leaves_lines_in_the_old_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.log");
        let mut file = AuditFile::open(&path).expect("opened");
        let rotated = dir.path().join("audit.log.1");
        std::fs::rename(&path, &rotated).expect("rename");
        // Someone puts a file every user may write in its place: refused, not written.
        std::fs::write(&path, "").expect("create");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).expect("chmod");
        file.write_all(b"kept\n").expect("write");
        file.write_all(b"kept too\n").expect("write");
        assert_eq!(text(&rotated), "kept\nkept too\n");
        assert_eq!(text(&path), "");
    }
}
