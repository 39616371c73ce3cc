//! Permission checks for files that hold secrets: private keys, Vault tokens, AppRole
//! secret IDs, and the configuration file when it holds a token inline. A secret file every
//! user can read is refused; one its group can read is accepted with a warning (Kubernetes
//! projects Secrets as 0440 with the pod's `fsGroup`, a group of the pod's own user).

use std::path::Path;

/// How much a secret file's mode exposes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Exposure {
    /// Only the owner can read it.
    Private,
    /// Its group can read it.
    Group,
    /// Every user can read it.
    World,
}

/// What a check found: nothing, a warning, or a problem that refuses the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Finding {
    /// Readable by the owner only (or the file is missing, which other checks report).
    Fine,
    /// Accepted, with this warning.
    Warning(String),
    /// Refused, with this problem.
    Problem(String),
}

/// The exposure of `path` and its permission bits, `None` when it cannot be examined.
pub(crate) fn exposure(path: &Path) -> Option<(Exposure, u32)> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    let exposure = if mode & 0o004 != 0 {
        Exposure::World
    } else if mode & 0o040 != 0 {
        Exposure::Group
    } else {
        Exposure::Private
    };
    Some((exposure, mode))
}

/// Checks the secret file `path` configured as `key` (e.g. `listen.key`). `strict`: every
/// user reading it is a problem (else only a warning, for files that are not secret on their
/// own, such as an AppRole role ID).
pub(crate) fn check_secret_file(key: &str, path: &Path, strict: bool) -> Finding {
    let Some((exposure, mode)) = exposure(path) else {
        return Finding::Fine;
    };
    let shown = path.display();
    match exposure {
        Exposure::Private => Finding::Fine,
        Exposure::World if strict => Finding::Problem(format!(
            "{key}: {shown} is readable by every user (mode {mode:o}); run chmod 600"
        )),
        Exposure::World => Finding::Warning(format!(
            "{key}: {shown} is readable by every user (mode {mode:o}); chmod 600 is advised"
        )),
        Exposure::Group => Finding::Warning(format!(
            "{key}: {shown} is readable by its group (mode {mode:o})"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn world_readable_is_a_problem_group_readable_a_warning() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("key.pem");
        std::fs::write(&key, "x").expect("write");
        let chmod = |mode| {
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).expect("chmod")
        };
        chmod(0o644);
        let Finding::Problem(p) = check_secret_file("listen.key", &key, true) else {
            panic!("world-readable key accepted");
        };
        assert!(
            p.starts_with("listen.key: ") && p.contains("chmod 600"),
            "{p}"
        );
        assert!(matches!(
            check_secret_file("vault.auth.role_id_file", &key, false),
            Finding::Warning(_)
        ));
        chmod(0o640);
        let Finding::Warning(w) = check_secret_file("listen.key", &key, true) else {
            panic!("group-readable key: want a warning");
        };
        assert!(w.contains("group") && w.contains("640"), "{w}");
        chmod(0o600);
        assert_eq!(check_secret_file("listen.key", &key, true), Finding::Fine);
        let missing = dir.path().join("missing");
        assert_eq!(
            check_secret_file("listen.key", &missing, true),
            Finding::Fine
        );
    }
}
