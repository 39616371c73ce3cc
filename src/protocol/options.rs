//! Startup parameter values as PostgreSQL reads them, without I/O: the `options` parameter
//! (split like `pg_split_opts`, switches read like `process_postgres_switches`), boolean
//! values (`parse_bool`, for `replication`), and what a setting name looks like.
//!
//! PostgreSQL splits `options` at unescaped whitespace, a backslash taking the next character
//! literally, then reads the words as `postgres` command-line switches: `-c name=value`,
//! `-cname=value` and `--name=value` set a setting (a `-` in the name counts as `_`), every
//! other switch sets something else (`-W` is `post_auth_delay`, `-B` `shared_buffers`, ...)
//! and a word that is not a switch ends the connection. [`parse`] accepts only the setting
//! forms, so a caller can check each name and knows exactly what the upstream would apply.

/// One setting from `options`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    /// The name as PostgreSQL sees it: `-` already turned into `_`, case kept.
    pub name: String,
    /// Everything after the first `=`.
    pub value: String,
}

/// Why an `options` value is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionsError {
    /// A switch other than `-c` and `--`, e.g. `-W` (`post_auth_delay`).
    #[error("switch -{switch} is not a setting")]
    Switch {
        /// The switch letter.
        switch: char,
        /// What PostgreSQL sets with it, where it sets a setting.
        sets: Option<&'static str>,
    },
    /// `-c name` or `--name` without `=value`.
    #[error("-c {0} requires a value")]
    NoValue(String),
    /// `-c` as the last word.
    #[error("-c requires an argument")]
    NoArgument,
    /// A word that is not a switch (PostgreSQL: "invalid command-line argument").
    #[error("invalid command-line argument {0:?}")]
    Argument(String),
}

/// The characters C's `isspace` accepts in the "C" locale.
fn is_c_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\x0b' | '\x0c' | '\r')
}

/// Splits `options` into words as PostgreSQL's `pg_split_opts` does: whitespace separates
/// words, a backslash makes the next character part of the word (a trailing backslash is
/// dropped; alone it leaves an empty word, which [`parse`] refuses as PostgreSQL does).
pub fn split(options: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut chars = options.chars().peekable();
    loop {
        while chars.next_if(|c| is_c_space(*c)).is_some() {}
        if chars.peek().is_none() {
            return words;
        }
        let mut word = String::new();
        while let Some(c) = chars.next_if(|c| !is_c_space(*c)) {
            if c == '\\' {
                word.extend(chars.next());
            } else {
                word.push(c);
            }
        }
        words.push(word);
    }
}

/// The settings `options` makes, or why PostgreSQL would read it as something else.
pub fn parse(options: &str) -> Result<Vec<Setting>, OptionsError> {
    let mut words = split(options).into_iter();
    let mut settings = Vec::new();
    while let Some(word) = words.next() {
        let mut chars = word.chars();
        // `-` alone is an argument for getopt, `--` alone ends the switches: both leave an
        // argument PostgreSQL refuses (or nothing at all); neither is a setting.
        let (Some('-'), Some(switch)) = (chars.next(), chars.next()) else {
            return Err(OptionsError::Argument(word));
        };
        let attached = chars.as_str();
        let argument = match switch {
            '-' if attached.is_empty() => return Err(OptionsError::Argument(word)),
            '-' => attached.to_owned(),
            'c' if attached.is_empty() => words.next().ok_or(OptionsError::NoArgument)?,
            'c' => attached.to_owned(),
            other => {
                return Err(OptionsError::Switch {
                    switch: other,
                    sets: switch_setting(other),
                });
            }
        };
        // PostgreSQL's ParseLongOption: the name ends at the first `=`; `-` counts as `_`.
        let Some((name, value)) = argument.split_once('=') else {
            return Err(OptionsError::NoValue(argument.replace('-', "_")));
        };
        settings.push(Setting {
            name: name.replace('-', "_"),
            value: value.to_owned(),
        });
    }
    Ok(settings)
}

/// `options` text that [`parse`] reads back as exactly `settings`, as `-c name=value` words
/// with whitespace and backslashes escaped. Names must not contain `=` or `-` (no name
/// [`parse`] returns does).
pub fn to_options(settings: &[Setting]) -> String {
    let mut out = String::new();
    for s in settings {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str("-c ");
        for c in s
            .name
            .chars()
            .chain(std::iter::once('='))
            .chain(s.value.chars())
        {
            if is_c_space(c) || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
    }
    out
}

/// The setting a `postgres` switch other than `-c` changes, for messages.
fn switch_setting(switch: char) -> Option<&'static str> {
    Some(match switch {
        'B' => "shared_buffers",
        'd' => "log_min_messages",
        'e' => "DateStyle",
        'F' => "fsync",
        'f' => "enable_* planner settings",
        'h' | 'i' => "listen_addresses",
        'k' => "unix_socket_directories",
        'l' => "ssl",
        'N' => "max_connections",
        'O' => "allow_system_table_mods",
        'P' => "ignore_system_indexes",
        'p' => "port",
        'S' => "work_mem",
        's' => "log_statement_stats",
        't' => "log_*_stats",
        'W' => "post_auth_delay",
        _ => return None,
    })
}

/// PostgreSQL's `parse_bool`: a case-insensitive, non-empty prefix of `true`, `false`,
/// `yes` or `no`, at least two letters of `on` or `off`, or `1` / `0`. No trimming.
pub fn parse_bool(value: &str) -> Option<bool> {
    let v = value.to_ascii_lowercase();
    let prefix_of = |word: &str| !v.is_empty() && word.starts_with(v.as_str());
    match v.as_bytes().first()? {
        b't' if prefix_of("true") => Some(true),
        b'f' if prefix_of("false") => Some(false),
        b'y' if prefix_of("yes") => Some(true),
        b'n' if prefix_of("no") => Some(false),
        // A lone `o` is neither.
        b'o' if v.len() >= 2 && prefix_of("on") => Some(true),
        b'o' if v.len() >= 2 && prefix_of("off") => Some(false),
        b'1' if v.len() == 1 => Some(true),
        b'0' if v.len() == 1 => Some(false),
        _ => None,
    }
}

/// Startup parameters PostgreSQL reads itself instead of as settings (besides `_pq_.*`
/// protocol options), compared exactly as it does.
pub const NOT_SETTINGS: &[&str] = &["user", "database", "replication", "options"];

/// True when PostgreSQL reads startup parameter `name` itself: [`NOT_SETTINGS`] and the
/// `_pq_.` protocol options.
pub fn is_protocol_parameter(name: &str) -> bool {
    NOT_SETTINGS.contains(&name) || name.starts_with("_pq_.")
}

/// True for names that look like PostgreSQL setting names: one or more dot-separated parts
/// of ASCII letters, digits and `_`, each starting with a letter or `_` (`work_mem`,
/// `myapp.tenant`).
pub fn is_setting_name(name: &str) -> bool {
    name.len() <= 128
        && name.split('.').all(|part| {
            let mut bytes = part.bytes();
            bytes
                .next()
                .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
                && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(name: &str, value: &str) -> Setting {
        Setting {
            name: name.into(),
            value: value.into(),
        }
    }

    #[test]
    fn splits_like_pg_split_opts() {
        assert_eq!(split(""), Vec::<String>::new());
        assert_eq!(split(" \t\n "), Vec::<String>::new());
        assert_eq!(split("  -c  a=b\t-c\x0bc=d "), ["-c", "a=b", "-c", "c=d"]);
        assert_eq!(split(r"-c search_path=a\,\ b"), ["-c", "search_path=a, b"]);
        assert_eq!(split(r"a\\b c\\"), [r"a\b", r"c\"]);
        // A trailing backslash escapes nothing and disappears.
        assert_eq!(split(r"abc\"), ["abc"]);
        assert_eq!(split(r"-c a=b \"), ["-c", "a=b", ""]);
        assert_eq!(
            parse(r"-c a=b \"),
            Err(OptionsError::Argument(String::new()))
        );
        assert_eq!(split("\\\u{e9}t\u{e9}"), ["\u{e9}t\u{e9}"]);
    }

    #[test]
    fn reads_the_setting_switches() {
        assert_eq!(
            parse(
                "-c statement_timeout=1234 -clock_timeout=5s --idle-in-transaction-session-timeout=7"
            ),
            Ok(vec![
                set("statement_timeout", "1234"),
                set("lock_timeout", "5s"),
                set("idle_in_transaction_session_timeout", "7"),
            ])
        );
        // `-` becomes `_` after -c too; the value keeps its `-` and later `=`.
        assert_eq!(
            parse("-c post-auth-delay=-1=2"),
            Ok(vec![set("post_auth_delay", "-1=2")])
        );
        assert_eq!(
            parse(r"-c search_path=a\,\ b -c x="),
            Ok(vec![set("search_path", "a, b"), set("x", "")])
        );
        // getopt hands -c the next word whatever it looks like.
        assert_eq!(parse("-c -W=2"), Ok(vec![set("_W", "2")]));
        assert_eq!(parse(""), Ok(vec![]));
    }

    #[test]
    fn refuses_everything_else() {
        let switch = |c, sets| Err(OptionsError::Switch { switch: c, sets });
        assert_eq!(parse("-W 2"), switch('W', Some("post_auth_delay")));
        assert_eq!(parse("-W2"), switch('W', Some("post_auth_delay")));
        assert_eq!(parse("-c a=b -B 1000"), switch('B', Some("shared_buffers")));
        assert_eq!(parse("-Pc a=b"), switch('P', Some("ignore_system_indexes")));
        assert_eq!(parse("-E"), switch('E', None));
        assert_eq!(parse("-c"), Err(OptionsError::NoArgument));
        assert_eq!(
            parse("-c statement-timeout"),
            Err(OptionsError::NoValue("statement_timeout".into()))
        );
        assert_eq!(
            parse("--post-auth-delay"),
            Err(OptionsError::NoValue("post_auth_delay".into()))
        );
        for word in ["x", "-", "--", "myapp", "c=d"] {
            assert_eq!(
                parse(word),
                Err(OptionsError::Argument(word.into())),
                "{word}"
            );
        }
        assert_eq!(
            parse("-c a=b myapp"),
            Err(OptionsError::Argument("myapp".into()))
        );
    }

    #[test]
    fn serialized_settings_parse_back() {
        let settings = vec![
            set("search_path", "a, b"),
            set("x", r"back\slash"),
            set("y", "tab\there\r\n\x0b\x0cend"),
            set("z", ""),
            set("app", "-W 2 -c post_auth_delay=9"),
            set("", "=="),
        ];
        let text = to_options(&settings);
        assert_eq!(parse(&text), Ok(settings));
        assert_eq!(
            to_options(&[set("search_path", "a, b")]),
            r"-c search_path=a,\ b"
        );
    }

    #[test]
    fn bool_values_as_postgres_reads_them() {
        for v in ["t", "tr", "TRU", "true", "y", "yes", "YeS", "on", "ON", "1"] {
            assert_eq!(parse_bool(v), Some(true), "{v}");
        }
        for v in [
            "f", "fa", "FALSE", "false", "n", "no", "NO", "of", "off", "OFF", "0",
        ] {
            assert_eq!(parse_bool(v), Some(false), "{v}");
        }
        for v in [
            "", "o", "maybe", "truee", "offf", "nope", "00", "10", " true", "true ", "database",
            "2", "yess",
        ] {
            assert_eq!(parse_bool(v), None, "{v:?}");
        }
    }

    #[test]
    fn setting_names() {
        for ok in ["work_mem", "DateStyle", "_x", "myapp.tenant", "a.b.c_1"] {
            assert!(is_setting_name(ok), "{ok}");
        }
        for bad in [
            "", ".", "a.", ".a", "a..b", "1abc", "a-b", "a b", "a=b", "é", "a.1b", "x\0",
        ] {
            assert!(!is_setting_name(bad), "{bad:?}");
        }
        assert!(!is_setting_name(&"x".repeat(129)));
    }
}
