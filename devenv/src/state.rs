//! The state of a detached environment, in its directory: [`REGISTRY`] (the processes to
//! stop, see [`crate::process::Registry`]) and [`VARS`], the variables as shell `export`
//! lines (what `cargo xtask devenv up` and `env` print; `source`-able by bash).

use std::path::Path;

use crate::{Context, Error, Result};

/// File name of the process registry inside the environment's directory.
pub const REGISTRY: &str = "processes";

/// File name of the variables inside the environment's directory.
pub const VARS: &str = "devenv.env";

/// `export NAME='value'` lines, single-quoted so that any value survives the shell.
pub fn render(vars: &[(String, String)]) -> String {
    vars.iter()
        .map(|(name, value)| format!("export {name}='{}'\n", value.replace('\'', r"'\''")))
        .collect()
}

/// The variables of text written by [`render`].
pub fn parse(text: &str) -> Result<Vec<(String, String)>> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|line| {
            let bad = || Error::new(format!("not an export line of devenv: {line:?}"));
            let (name, quoted) = line
                .strip_prefix("export ")
                .and_then(|rest| rest.split_once('='))
                .ok_or_else(bad)?;
            Ok((name.to_string(), unquote(quoted).ok_or_else(bad)?))
        })
        .collect()
}

/// Undoes the quoting of [`render`]: `'...'` segments, joined by `\'`.
fn unquote(quoted: &str) -> Option<String> {
    let mut out = String::new();
    let mut chars = quoted.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => loop {
                match chars.next()? {
                    '\'' => break,
                    c => out.push(c),
                }
            },
            '\\' => out.push(chars.next()?),
            _ => return None,
        }
    }
    Some(out)
}

/// Writes the variables into `dir`.
pub fn write(dir: &Path, vars: &[(String, String)]) -> Result<()> {
    let path = dir.join(VARS);
    std::fs::write(&path, render(vars)).context(|| format!("write {}", path.display()))
}

/// Reads the variables of the environment in `dir`.
pub fn read(dir: &Path) -> Result<Vec<(String, String)>> {
    let path = dir.join(VARS);
    let text = std::fs::read_to_string(&path).context(|| {
        format!(
            "read {} (is a dev environment up in {}?)",
            path.display(),
            dir.display()
        )
    })?;
    parse(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_survive_rendering_and_parsing() {
        let vars = vec![
            ("A".to_string(), "plain".to_string()),
            ("B".to_string(), "it's got 'quotes' and spaces".to_string()),
            ("C".to_string(), String::new()),
        ];
        let text = render(&vars);
        assert_eq!(text.lines().next(), Some("export A='plain'"));
        assert_eq!(parse(&text).unwrap(), vars);
        assert!(parse("export X=unquoted").is_err());
        assert!(parse("X='no export'").is_err());
    }

    #[test]
    fn bash_reads_the_values_back() {
        let vars = vec![("DEVENV_T".to_string(), "a'b \"c\" $d `e`".to_string())];
        let script = format!("{}printf %s \"$DEVENV_T\"", render(&vars));
        let out = std::process::Command::new("bash")
            .args(["-c", &script])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), vars[0].1);
    }
}
