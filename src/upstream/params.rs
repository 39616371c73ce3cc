//! Which client startup parameters reach the upstream: an allow-list of settings (the
//! defaults below plus a database entry's `allow_startup_parameters`), given as startup
//! parameters or as `-c name=value` / `--name=value` in `options`. Anything else is refused
//! before a credential is issued: PostgreSQL lets any role set backend-start settings such as
//! `post_auth_delay` from the startup packet, and no role setting can override them.
//!
//! The settings of `options` are sent upstream as startup parameters of their own, not as
//! `options` text: PostgreSQL splits `options` again at bytes its `isspace` takes for
//! whitespace in the server's locale, which for a multi-byte character need not be what was
//! checked here. A separate parameter is never split, so the upstream applies exactly the
//! name and value that were checked.

use std::collections::BTreeMap;

use crate::protocol::options::{self, OptionsError};
use crate::protocol::sqlstate::SqlState;

/// Settings every client may send: what libpq, pgjdbc, Npgsql, asyncpg, pgx, lib/pq, node
/// `pg` and tokio-postgres send at startup, and session defaults any role may `SET`.
pub const DEFAULT_ALLOWED: &[&str] = &[
    "application_name",
    "client_encoding",
    "DateStyle",
    "TimeZone",
    "IntervalStyle",
    "extra_float_digits",
    "search_path",
    "standard_conforming_strings",
    "statement_timeout",
    "lock_timeout",
    "idle_in_transaction_session_timeout",
    "idle_session_timeout",
    "bytea_output",
    "default_transaction_isolation",
    "default_transaction_read_only",
    "default_transaction_deferrable",
    "geqo",
];

/// libpq's name for "application_name unless the user gave one"; node `pg`, lib/pq and pgx
/// know it too. Sent upstream as `application_name` when no `application_name` was given.
pub const FALLBACK_APPLICATION_NAME: &str = "fallback_application_name";

/// Why a client's startup parameters are refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParamRefusal {
    /// A startup parameter that is not an allowed setting.
    NotAllowed(String),
    /// A `-c name=value` or `--name=value` in `options` whose name is not allowed.
    NotAllowedInOptions(String),
    /// `options` holds something other than settings.
    Options(OptionsError),
}

impl ParamRefusal {
    /// SQLSTATE for the client: 42601 (as PostgreSQL) for `options` it cannot read, 42501
    /// for what it would read but leasegate does not allow.
    pub(crate) fn sqlstate(&self) -> SqlState {
        match self {
            ParamRefusal::Options(
                OptionsError::NoValue(_) | OptionsError::NoArgument | OptionsError::Argument(_),
            ) => SqlState::SyntaxError,
            _ => SqlState::InsufficientPrivilege,
        }
    }

    /// The client's message; `quote` quotes client-supplied text.
    pub fn message(&self, quote: impl Fn(&str) -> String) -> String {
        const NOT: &str = "is not allowed through leasegate";
        match self {
            ParamRefusal::NotAllowed(name) => format!("startup parameter {} {NOT}", quote(name)),
            ParamRefusal::NotAllowedInOptions(name) => {
                format!(
                    "setting {} in startup parameter \"options\" {NOT}",
                    quote(name)
                )
            }
            ParamRefusal::Options(OptionsError::Switch { switch, sets }) => {
                let sets = sets.map(|s| format!(" (sets {s})")).unwrap_or_default();
                format!(
                    "startup option {}{sets} {NOT}: \"options\" may only hold -c name=value",
                    quote(&format!("-{switch}"))
                )
            }
            ParamRefusal::Options(OptionsError::NoValue(name)) => {
                format!(
                    "-c {} in startup parameter \"options\" requires a value",
                    quote(name)
                )
            }
            ParamRefusal::Options(OptionsError::NoArgument) => {
                "-c at the end of startup parameter \"options\" requires an argument".into()
            }
            ParamRefusal::Options(OptionsError::Argument(word)) => format!(
                "invalid command-line argument {} in startup parameter \"options\"",
                quote(word)
            ),
        }
    }
}

/// The allowed spelling of `name` (compared as PostgreSQL compares setting names, ignoring
/// ASCII case), from the defaults or `extra`.
fn allowed<'a>(name: &str, extra: &'a [String]) -> Option<&'a str> {
    DEFAULT_ALLOWED
        .iter()
        .copied()
        .chain(extra.iter().map(String::as_str))
        .find(|a| a.eq_ignore_ascii_case(name))
}

/// Sets `name` in `out`: a setting given twice counts once, with its last value, as upstream.
fn put(out: &mut Vec<(String, String)>, name: &str, value: &str) {
    match out.iter_mut().find(|(n, _)| n == name) {
        Some(entry) => entry.1 = value.to_owned(),
        None => out.push((name.to_owned(), value.to_owned())),
    }
}

/// The settings to send upstream as startup parameters, in their allowed spelling: those of
/// `options` first, then the startup parameters (PostgreSQL applies them in that order), or
/// the first that is not allowed. `user`, `database`, `replication` and `_pq_.*` are not
/// settings and are left out (leasegate sets or checks them elsewhere).
pub fn check(
    client: &BTreeMap<String, String>,
    extra: &[String],
) -> Result<Vec<(String, String)>, ParamRefusal> {
    let mut out = Vec::new();
    if let Some(text) = client.get("options") {
        for setting in options::parse(text).map_err(ParamRefusal::Options)? {
            let Some(name) = allowed(&setting.name, extra) else {
                return Err(ParamRefusal::NotAllowedInOptions(setting.name));
            };
            put(&mut out, name, &setting.value);
        }
    }
    for (key, value) in client {
        if options::is_protocol_parameter(key) || key == FALLBACK_APPLICATION_NAME {
            continue;
        }
        let Some(name) = allowed(key, extra) else {
            return Err(ParamRefusal::NotAllowed(key.clone()));
        };
        put(&mut out, name, value);
    }
    if let Some(fallback) = client.get(FALLBACK_APPLICATION_NAME)
        && !out.iter().any(|(n, _)| n == "application_name")
    {
        out.push(("application_name".into(), fallback.clone()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn owned(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn allowed_settings_pass_in_their_allowed_spelling() {
        let client = params(&[
            ("user", "readonly"),
            ("database", "myapp"),
            ("replication", "off"),
            ("_pq_.x", "1"),
            ("datestyle", "ISO"),
            ("TIMEZONE", "UTC"),
            ("application_name", "app"),
            (
                "options",
                r"-c search_path=a,\ b --statement-timeout=1234 -c TimeZone=Asia/Tokyo",
            ),
        ]);
        assert_eq!(
            check(&client, &[]),
            Ok(owned(&[
                ("search_path", "a, b"),
                ("statement_timeout", "1234"),
                // The startup parameter comes after `options`, as PostgreSQL applies them.
                ("TimeZone", "UTC"),
                ("application_name", "app"),
                ("DateStyle", "ISO"),
            ]))
        );
    }

    #[test]
    fn other_settings_are_refused() {
        let refused = |pairs: &[(&str, &str)]| check(&params(pairs), &[]).unwrap_err();
        assert_eq!(
            refused(&[("post_auth_delay", "2000")]),
            ParamRefusal::NotAllowed("post_auth_delay".into())
        );
        assert_eq!(
            refused(&[("POST_AUTH_DELAY", "2000")]),
            ParamRefusal::NotAllowed("POST_AUTH_DELAY".into())
        );
        assert_eq!(
            refused(&[("options", "-c post_auth_delay=2000")]),
            ParamRefusal::NotAllowedInOptions("post_auth_delay".into())
        );
        assert_eq!(
            refused(&[("options", "--post-auth-delay=2")]),
            ParamRefusal::NotAllowedInOptions("post_auth_delay".into())
        );
        assert_eq!(
            refused(&[("options", "-c statement_timeout=1 -W 2")]),
            ParamRefusal::Options(OptionsError::Switch {
                switch: 'W',
                sets: Some("post_auth_delay")
            })
        );
        // Only the exact `options` is read; another spelling is an unknown setting.
        assert_eq!(
            refused(&[("Options", "-c statement_timeout=1")]),
            ParamRefusal::NotAllowed("Options".into())
        );
        assert_eq!(
            refused(&[("work_mem", "1GB")]),
            ParamRefusal::NotAllowed("work_mem".into())
        );
    }

    #[test]
    fn operators_add_names() {
        let extra = vec!["work_mem".to_string(), "myapp.tenant".to_string()];
        let client = params(&[("WORK_MEM", "64MB"), ("options", "-c myapp.tenant=42")]);
        assert_eq!(
            check(&client, &extra),
            Ok(owned(&[("myapp.tenant", "42"), ("work_mem", "64MB")]))
        );
    }

    #[test]
    fn fallback_application_name_is_the_application_name_unless_one_is_given() {
        let fallback = params(&[("fallback_application_name", "tool")]);
        assert_eq!(
            check(&fallback, &[]),
            Ok(owned(&[("application_name", "tool")]))
        );
        let both = params(&[
            ("fallback_application_name", "tool"),
            ("application_name", "app"),
        ]);
        assert_eq!(check(&both, &[]), Ok(owned(&[("application_name", "app")])));
        let via_options = params(&[
            ("fallback_application_name", "tool"),
            ("options", "-c application_name=opt"),
        ]);
        assert_eq!(
            check(&via_options, &[]),
            Ok(owned(&[("application_name", "opt")]))
        );
    }

    #[test]
    fn messages_name_the_parameter() {
        let q = |s: &str| format!("\"{s}\"");
        let m = ParamRefusal::NotAllowed("post_auth_delay".into());
        assert_eq!(m.sqlstate().code(), "42501");
        assert_eq!(
            m.message(q),
            "startup parameter \"post_auth_delay\" is not allowed through leasegate"
        );
        let m = ParamRefusal::Options(OptionsError::Switch {
            switch: 'W',
            sets: Some("post_auth_delay"),
        });
        assert_eq!(m.sqlstate().code(), "42501");
        assert!(
            m.message(q).contains("\"-W\" (sets post_auth_delay)"),
            "{}",
            m.message(q)
        );
        let m = ParamRefusal::Options(OptionsError::NoValue("x".into()));
        assert_eq!(m.sqlstate().code(), "42601");
    }
}
