//! README's tables are part of the contract: its metric table must list exactly the metrics,
//! types, labels and label values the code exports (`metrics::Metrics::schema`, built from the
//! typed label sets), and its table of errors clients see exactly the SQLSTATEs leasegate
//! sends (`SqlState::ALL`). Both directions: nothing undocumented, nothing documented that
//! does not exist. Test-only.

use std::collections::{BTreeMap, BTreeSet};

use prometheus_client::metrics::MetricType;

use crate::metrics::Metrics;
use crate::protocol::sqlstate::SqlState;

const README: &str = include_str!("../README.md");

/// The cells of the rows of the first table under the heading `heading` (header and
/// separator rows skipped). A `\|` inside a cell is a literal `|`.
fn table(heading: &str) -> Vec<Vec<String>> {
    let mut lines = README.lines().skip_while(|l| l.trim() != heading).skip(1);
    let rows: Vec<&str> = lines
        .by_ref()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .collect();
    assert!(rows.len() > 2, "README has no table under {heading:?}");
    rows[2..].iter().map(|row| cells(row)).collect()
}

fn cells(row: &str) -> Vec<String> {
    let mut cells = vec![String::new()];
    let mut chars = row.trim().trim_start_matches('|').chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'|') => {
                if let Some(cell) = cells.last_mut() {
                    cell.push('|');
                }
                chars.next();
            }
            '|' => cells.push(String::new()),
            c => {
                if let Some(cell) = cells.last_mut() {
                    cell.push(c);
                }
            }
        }
    }
    if cells.last().is_some_and(|c| c.trim().is_empty()) {
        cells.pop();
    }
    cells.iter().map(|c| c.trim().to_owned()).collect()
}

/// The `code spans` of `text`.
fn code_spans(text: &str) -> Vec<&str> {
    text.split('`').skip(1).step_by(2).collect()
}

/// One documented metric: type and labels, each label with the values its row lists (`None`:
/// the row names the label without values).
type Documented = BTreeMap<String, (String, Vec<(String, Option<BTreeSet<String>>)>)>;

fn documented_metrics() -> Documented {
    let mut metrics = Documented::new();
    for row in table("## Metrics") {
        let [name, kind, label_cell, ..] = &row[..] else {
            panic!("README metric row with fewer than 3 cells: {row:?}");
        };
        let name = code_spans(name).first().copied().unwrap_or_default();
        // `a`, `b` = values; `c` = values: each group's last label takes its values.
        let mut labels: Vec<(String, Option<BTreeSet<String>>)> = Vec::new();
        for group in label_cell.split(';') {
            let (names, values) = group.split_once('=').unwrap_or((group, ""));
            labels.extend(code_spans(names).into_iter().map(|l| (l.to_owned(), None)));
            if let Some(last) = labels.last_mut()
                && !values.trim().is_empty()
            {
                last.1 = Some(code_spans(values).into_iter().map(str::to_owned).collect());
            }
        }
        let previous = metrics.insert(name.to_owned(), (kind.clone(), labels));
        assert!(previous.is_none(), "README documents {name} twice");
    }
    metrics
}

/// Labels as the code declares them: name and fixed values (none: from the configuration).
type Exported = BTreeMap<String, (String, Vec<(&'static str, &'static [&'static str])>)>;

/// What the code exports, keyed like README: counters with their `_total` suffix.
fn exported_metrics() -> Exported {
    Metrics::schema()
        .into_iter()
        .map(|(name, kind, labels)| {
            let name = match kind {
                MetricType::Counter => format!("{name}_total"),
                _ => name.to_owned(),
            };
            (name, (kind.as_str().to_owned(), labels))
        })
        .collect()
}

#[test]
fn readme_documents_exactly_the_exported_metrics_and_types() {
    let documented = documented_metrics();
    let exported = exported_metrics();
    let doc_names: BTreeSet<&String> = documented.keys().collect();
    let code_names: BTreeSet<&String> = exported.keys().collect();
    assert_eq!(
        doc_names, code_names,
        "README's metric table and the registry differ"
    );
    for (name, (kind, _)) in &exported {
        assert_eq!(&documented[name].0, kind, "type of {name}");
    }
}

#[test]
fn readme_documents_exactly_the_label_values_of_every_metric() {
    let documented = documented_metrics();
    // Every label value set README lists anywhere, by label name (`op` is listed once).
    let listed: Vec<(&String, &BTreeSet<String>)> = documented
        .values()
        .flat_map(|(_, labels)| labels.iter())
        .filter_map(|(label, values)| values.as_ref().map(|v| (label, v)))
        .collect();
    for (name, (_, labels)) in exported_metrics() {
        let doc_labels = &documented[&name].1;
        let doc_names: Vec<&str> = doc_labels.iter().map(|(l, _)| l.as_str()).collect();
        let code_names: Vec<&str> = labels.iter().map(|(l, _)| *l).collect();
        assert_eq!(doc_names, code_names, "label names of {name}");
        for ((label, values), (_, doc_values)) in labels.iter().zip(doc_labels) {
            let values: BTreeSet<String> = values.iter().map(|v| v.to_string()).collect();
            match doc_values {
                Some(doc) => assert_eq!(
                    doc, &values,
                    "{name}{{{label}}}: README's values (left) and the code's (right) differ"
                ),
                None if values.is_empty() => {}
                None => assert!(
                    listed.iter().any(|(l, v)| *l == label && **v == values),
                    "{name}{{{label}}}: README lists its values {values:?} nowhere"
                ),
            }
            if values.is_empty() {
                assert!(
                    doc_values.is_none(),
                    "{name}{{{label}}} takes its values from the configuration, README lists some"
                );
            }
        }
    }
}

#[test]
fn readme_error_table_lists_exactly_the_sqlstates_leasegate_sends() {
    let documented: BTreeSet<String> = table("## Errors clients see")
        .iter()
        .filter_map(|row| row.get(1))
        .filter(|code| {
            code.len() == 5
                && code
                    .bytes()
                    .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase())
        })
        .cloned()
        .collect();
    let sent: BTreeSet<String> = SqlState::ALL.iter().map(|s| s.code().to_owned()).collect();
    assert_eq!(
        documented, sent,
        "README's error table (left) and SqlState::ALL (right) differ"
    );
}

#[test]
fn the_table_reader_reads_escaped_pipes_and_code_spans() {
    assert_eq!(
        cells("| `a` | counter | `x` = `1` \\| `2` | y |"),
        ["`a`", "counter", "`x` = `1` | `2`", "y"]
    );
    assert_eq!(
        code_spans("`op`, `status` = `2xx`"),
        ["op", "status", "2xx"]
    );
}
