//! The startup `options` reader on arbitrary text: `split` and `parse` never panic, the words
//! `split` returns are what PostgreSQL's `pg_split_opts` would make of the text (only a
//! trailing lone backslash leaves an empty word; without a backslash no word holds
//! whitespace), what `parse` accepts writes back
//! with `to_options` to text that parses to the same settings, and no accepted setting name
//! holds `-` or `=`. The allow-list check on top never lets an unlisted name through.

#![no_main]

use std::collections::BTreeMap;

use leasegate::protocol::options::{parse, split, to_options};
use leasegate::upstream::params::{DEFAULT_ALLOWED, check};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let words = split(text);
    // Only a lone backslash at the very end makes an empty word (as in pg_split_opts).
    if let Some((last, rest)) = words.split_last() {
        assert!(
            rest.iter().all(|w| !w.is_empty()),
            "empty word from {text:?}"
        );
        assert!(!last.is_empty() || text.ends_with('\\'), "{text:?}");
    }
    if !text.contains('\\') {
        let spaces = [' ', '\t', '\n', '\x0b', '\x0c', '\r'];
        assert!(words.iter().all(|w| !w.contains(spaces)), "{words:?}");
    }
    if let Ok(settings) = parse(text) {
        for s in &settings {
            assert!(!s.name.contains(['-', '=']), "{s:?}");
        }
        let again = to_options(&settings);
        assert_eq!(parse(&again).as_ref(), Ok(&settings), "{again:?}");
    }
    let client = BTreeMap::from([("options".to_string(), text.to_string())]);
    if let Ok(out) = check(&client, &[]) {
        for (name, _) in &out {
            assert!(DEFAULT_ALLOWED.contains(&name.as_str()), "{name}");
        }
    }
});
