//! The console's human output: `psql`-style aligned tables (a centred header, ` | ` between
//! columns, `-+-` under the header, numbers right-aligned, `(N rows)` at the end) and the
//! one-line summaries of `sessions end`.

use crate::admin_socket::api::{CheckAnswer, Listed};

/// A column: its header and whether its values are numbers (right-aligned).
struct Column(&'static str, bool);

/// An aligned table of `rows` under `columns`.
fn aligned(columns: &[Column], rows: &[Vec<String>]) -> String {
    let width = |i: usize| {
        rows.iter()
            .map(|r| r[i].chars().count())
            .chain([columns[i].0.len()])
            .max()
            .unwrap_or(0)
    };
    let widths: Vec<usize> = (0..columns.len()).map(width).collect();
    let line = |cells: Vec<String>| format!(" {}\n", cells.join(" | ").trim_end());
    let mut out = line(
        columns
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{:^w$}", c.0, w = *w))
            .collect(),
    );
    let rule: Vec<String> = widths.iter().map(|w| "-".repeat(w + 2)).collect();
    out.push_str(&rule.join("+"));
    out.push('\n');
    for row in rows {
        let cells = row
            .iter()
            .zip(columns.iter().zip(&widths))
            .map(|(v, (c, w))| {
                if c.1 {
                    format!("{v:>w$}", w = *w)
                } else {
                    format!("{v:<w$}", w = *w)
                }
            });
        out.push_str(&line(cells.collect()));
    }
    let n = rows.len();
    out.push_str(&format!("({n} {})\n", if n == 1 { "row" } else { "rows" }));
    out
}

/// The last 8 characters of a lease id (the table's form; `--json` has it whole).
fn short_lease(id: &str) -> String {
    let chars: Vec<char> = id.chars().collect();
    chars[chars.len().saturating_sub(8)..].iter().collect()
}

/// `sessions list` as a table.
pub(super) fn sessions(rows: &[Listed]) -> String {
    const COLUMNS: &[Column] = &[
        Column("id", true),
        Column("kind", false),
        Column("transport", false),
        Column("client", false),
        Column("identities", false),
        Column("database", false),
        Column("role", false),
        Column("upstream user", false),
        Column("lease", false),
        Column("started", false),
        Column("last renewed", false),
        Column("lease expires", false),
        Column("bytes in", true),
        Column("bytes out", true),
        Column("state", false),
    ];
    let opt = |v: &Option<String>| v.clone().unwrap_or_default();
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.id.map(|i| i.to_string()).unwrap_or_default(),
                r.kind.as_str().to_owned(),
                opt(&r.transport),
                opt(&r.client_addr),
                r.identities.join(", "),
                r.database.clone(),
                r.role.clone(),
                opt(&r.upstream_user),
                r.lease_id.as_deref().map(short_lease).unwrap_or_default(),
                opt(&r.started),
                opt(&r.last_renewed),
                opt(&r.lease_expires),
                r.bytes_to_upstream.to_string(),
                r.bytes_to_client.to_string(),
                r.state.clone(),
            ]
        })
        .collect();
    aligned(COLUMNS, &cells)
}

/// One line per session `sessions end` ended.
pub(super) fn ended(row: &Listed) -> String {
    format!(
        "ended session {}: {} on {} as {} ({}, lease {})",
        row.id.map(|i| i.to_string()).unwrap_or_default(),
        row.identities.join(", "),
        row.database,
        row.role,
        row.client_addr.as_deref().unwrap_or("-"),
        row.lease_id.as_deref().unwrap_or("-"),
    )
}

/// `leases check` as a summary line and a table of the unheld leases.
pub(super) fn leases(answer: &CheckAnswer) -> String {
    const COLUMNS: &[Column] = &[
        Column("lease", false),
        Column("issued", false),
        Column("expires", false),
        Column("this token's", false),
        Column("action", false),
    ];
    let mut out = format!(
        "{} leases under {} paths: {} held by this instance, {} not held\n",
        answer.listed,
        answer.paths.len(),
        answer.held,
        answer.unheld.len(),
    );
    let rows: Vec<Vec<String>> = answer
        .unheld
        .iter()
        .map(|u| {
            let action = match (&u.error, u.revoked, u.recent, u.ours) {
                (Some(e), _, _, _) => format!("revocation failed: {e}"),
                (None, true, _, _) => "revoked".into(),
                (None, false, true, _) => "too recent to judge".into(),
                (None, false, false, true) => "revocable (--revoke)".into(),
                (None, false, false, false) => "left alone: not this token's".into(),
            };
            let yes = if u.ours { "yes" } else { "no" };
            vec![
                u.lease_id.clone(),
                u.issued.clone().unwrap_or_default(),
                u.expires.clone().unwrap_or_default(),
                yes.into(),
                action,
            ]
        })
        .collect();
    if !rows.is_empty() {
        out.push_str(&aligned(COLUMNS, &rows));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Kind;

    #[test]
    fn reads_like_psql() {
        let row = Listed {
            kind: Kind::Session,
            id: Some(7),
            transport: Some("tls".into()),
            client_addr: Some("127.0.0.1:5000".into()),
            identities: vec!["uri:spiffe://x/a".into()],
            database: "myapp".into(),
            role: "readonly".into(),
            upstream_user: Some("v-token-readonly-abc".into()),
            lease_id: Some("database/creds/readonly/0123456789abcdef".into()),
            started: Some("2026-01-01T00:00:00Z".into()),
            last_renewed: None,
            lease_expires: None,
            bytes_to_upstream: 12,
            bytes_to_client: 3456,
            state: "idle".into(),
        };
        let text = sessions(&[row]);
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].starts_with(" id |  kind   | transport |"),
            "{text}"
        );
        assert!(
            lines[1].starts_with("----+---------+-----------+"),
            "{text}"
        );
        assert!(
            lines[2].starts_with("  7 | session | tls       |"),
            "{text}"
        );
        assert!(
            lines[2].contains("| 89abcdef |"),
            "last 8 characters: {text}"
        );
        assert!(lines[2].contains("|       12 |      3456 | idle"), "{text}");
        assert_eq!(lines[3], "(1 row)");
        assert_eq!(sessions(&[]).lines().last(), Some("(0 rows)"));
    }
}
