//! `listen.unix_socket_dir` and `listen.unix_socket_mode`: the mode as written (octal), and
//! the checks the directory must pass before leasegate puts its socket there, at load (so
//! `check-config` and the start refuse it alike) and again when the socket is bound.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// The mode of the socket file when `listen.unix_socket_mode` is not set: owner and group may
/// connect.
pub(crate) const DEFAULT_MODE: u32 = 0o660;

/// `"0660"` → 0o660: three or four octal digits, at most 0777.
pub(crate) fn parse_mode(text: &str) -> Result<u32, String> {
    let digits_ok =
        (3..=4).contains(&text.len()) && text.bytes().all(|b| (b'0'..=b'7').contains(&b));
    match u32::from_str_radix(text, 8) {
        Ok(mode) if digits_ok && mode <= 0o777 => Ok(mode),
        _ => Err(format!(
            "listen.unix_socket_mode {text:?} must be an octal file mode such as \"0660\" (at most 0777)"
        )),
    }
}

/// The longest path a Unix socket can have on Linux (`sun_path` is 108 bytes, with the NUL).
pub(crate) const PATH_MAX: usize = 107;

/// The server's socket file when a `[[databases]] host` names a socket directory (it starts
/// with `/`, as libpq tells a directory from a host name): `<host>/.s.PGSQL.<port>`.
pub(crate) fn upstream_socket(host: &str, port: u16) -> Option<std::path::PathBuf> {
    host.starts_with('/')
        .then(|| Path::new(host).join(format!(".s.PGSQL.{port}")))
}

/// The socket's path in `dir` for `port` is short enough, including the temporary name it is
/// bound under first (`.s.PGSQL.<port>.<pid>.tmp`, for the largest pid Linux gives out).
pub(crate) fn check_length(dir: &Path, port: u16) -> Result<(), String> {
    let longest = dir.join(format!(".s.PGSQL.{port}.4194304.tmp"));
    let len = longest.as_os_str().len();
    if len > PATH_MAX {
        return Err(format!(
            "listen.unix_socket_dir {} is too long for a Unix socket: the socket's path would be up to {len} bytes, at most {PATH_MAX} fit",
            dir.display()
        ));
    }
    Ok(())
}

/// The directory exists, is a directory, belongs to the user leasegate runs as (or root),
/// and neither its group nor others may write to it (whoever can write there could replace
/// the socket with one of their own).
pub(crate) fn check_dir(dir: &Path) -> Result<(), String> {
    let key = "listen.unix_socket_dir";
    let shown = dir.display();
    let meta = match std::fs::metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!(
                "{key} {shown} does not exist: create it (owned by the user leasegate runs as, mode 0755 or 0750)"
            ));
        }
        Err(e) => return Err(format!("{key} {shown}: {e}")),
    };
    if !meta.is_dir() {
        return Err(format!("{key} {shown} is not a directory"));
    }
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me && meta.uid() != 0 {
        return Err(format!(
            "{key} {shown} is owned by uid {}: it must be owned by the user leasegate runs as (uid {me}) or root",
            meta.uid()
        ));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(format!(
            "{key} {shown} has mode {mode:04o}: its group or others may write to it and so \
             replace leasegate's socket; remove the write bits (chmod go-w)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_host_that_starts_with_a_slash_is_a_socket_directory() {
        assert_eq!(
            upstream_socket("/var/run/postgresql", 5433),
            Some("/var/run/postgresql/.s.PGSQL.5433".into())
        );
        assert_eq!(
            upstream_socket("/tmp/", 5432),
            Some("/tmp/.s.PGSQL.5432".into())
        );
        assert_eq!(upstream_socket("db.internal", 5432), None);
        assert_eq!(upstream_socket("127.0.0.1", 5432), None);
        assert_eq!(upstream_socket("::1", 5432), None);
    }

    #[test]
    fn a_directory_too_long_for_the_socket_and_its_temporary_name_is_refused() {
        // "/" + 80 + "/.s.PGSQL.6432.4194304.tmp" (26) = 107 bytes: fits.
        let fits = format!("/{}", "d".repeat(80));
        assert!(check_length(Path::new(&fits), 6432).is_ok());
        let long = format!("/{}", "d".repeat(81));
        let e = check_length(Path::new(&long), 6432).expect_err("one byte too long");
        assert!(e.contains("up to 108 bytes, at most 107 fit"), "{e}");
    }

    #[test]
    fn modes_are_octal_and_at_most_0777() {
        assert_eq!(parse_mode("0660"), Ok(0o660));
        assert_eq!(parse_mode("600"), Ok(0o600));
        assert_eq!(parse_mode("0777"), Ok(0o777));
        for bad in ["", "66", "0668", "1777", "rw-rw----", "00660", "+660"] {
            assert!(parse_mode(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_directory_must_exist_and_be_closed_to_writers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        assert_eq!(check_dir(path), Ok(()));
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o775)).expect("chmod");
        let e = check_dir(path).expect_err("group-writable");
        assert!(e.contains("mode 0775") && e.contains("chmod go-w"), "{e}");
        let e = check_dir(&path.join("nope")).expect_err("missing");
        assert!(e.contains("does not exist"), "{e}");
        let file = path.join("file");
        std::fs::write(&file, "").expect("file");
        assert!(
            check_dir(&file)
                .expect_err("a file")
                .contains("not a directory")
        );
    }
}
