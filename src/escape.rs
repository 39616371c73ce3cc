//! The one escaping rule for text leasegate did not write itself: names a client sends (role,
//! database) and names its certificate carries (URI SAN, DNS SAN, CN). Wherever such text
//! reaches a client message, a log field or the audit log it goes through this module, so a
//! hostile name cannot forge a line, move the terminal cursor, reorder what a reader sees, or
//! close the quotes around it.
//!
//! Escaped (as Rust's `char::escape_default` writes them: `\n`, `\r`, `\t`, `\\`, `\"`,
//! `\u{1b}`): every control character (C0, DEL, C1), the Unicode bidirectional controls, the
//! backslash (so the escaping is unambiguous), and, in quoted forms, the double quote.

/// Characters of a name shown in a client message; longer names are cut with `…`.
pub(crate) const MESSAGE_MAX_CHARS: usize = 64;

/// Characters of a name shown in a log field; longer names are cut with `…` (the audit log
/// has the whole value).
pub(crate) const LOG_MAX_CHARS: usize = 256;

/// Unicode bidirectional formatting characters: they reorder the text around them on screen
/// (the "Trojan Source" trick), so a name could display as something it is not.
fn is_bidi_control(c: char) -> bool {
    matches!(
        c,
        '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
    )
}

fn needs_escape(c: char, quotes: bool) -> bool {
    c.is_control() || is_bidi_control(c) || c == '\\' || (quotes && c == '"')
}

/// Appends `text` escaped, at most `max` characters of it (then `…`).
fn escape_into(out: &mut String, text: &str, quotes: bool, max: Option<usize>) {
    for (i, c) in text.chars().enumerate() {
        if max == Some(i) {
            out.push('…');
            return;
        }
        if needs_escape(c, quotes) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
}

/// The whole of `text` with control characters, bidirectional controls and backslashes
/// escaped, for fields of the JSON audit log (JSON quotes the value itself).
pub(crate) fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    escape_into(&mut out, text, false, None);
    out
}

/// `text` in double quotes for a client message: escaped, quotes included, cut at
/// [`MESSAGE_MAX_CHARS`] characters.
pub(crate) fn quoted(text: &str) -> String {
    quoted_max(text, MESSAGE_MAX_CHARS)
}

/// `text` in double quotes for a log field: escaped, quotes included, cut at
/// [`LOG_MAX_CHARS`] characters.
pub(crate) fn logged(text: &str) -> String {
    quoted_max(text, LOG_MAX_CHARS)
}

fn quoted_max(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max) + 2);
    out.push('"');
    escape_into(&mut out, text, true, Some(max));
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_escapes_and_truncates() {
        assert_eq!(quoted("readonly"), "\"readonly\"");
        assert_eq!(quoted("a\nb\0"), "\"a\\nb\\u{0}\"");
        assert_eq!(quoted("x\" on \"y"), "\"x\\\" on \\\"y\"");
        assert_eq!(quoted("a\\b"), "\"a\\\\b\"");
        assert_eq!(quoted(&"x".repeat(100)).chars().count(), 64 + 3);
        assert_eq!(logged(&"x".repeat(1000)).chars().count(), 256 + 3);
        assert_eq!(logged("short"), "\"short\"");
    }

    #[test]
    fn every_control_character_is_escaped() {
        assert_eq!(printable("ro\u{7}\u{7f}\u{85}x"), "ro\\u{7}\\u{7f}\\u{85}x");
        assert_eq!(printable("a\r\n\u{1b}[31m"), "a\\r\\n\\u{1b}[31m");
        assert_eq!(printable("evil\u{202e}gpj.exe"), "evil\\u{202e}gpj.exe");
        // JSON escapes quotes itself; the backslash is escaped so that a literal `\n` in a
        // name cannot pass for an escaped newline.
        assert_eq!(printable("O\"Brien"), "O\"Brien");
        assert_eq!(printable("a\\nb"), "a\\\\nb");
        for s in [printable("\u{0}\u{1f}\u{9f}\u{2067}"), quoted("\u{9b}2J")] {
            assert!(!s.chars().any(|c| c.is_control()), "{s:?}");
        }
    }
}
