//! A small reader for the Prometheus / OpenMetrics text leasegate serves on /metrics.

/// Sum of the samples named `name` whose labels include all of `labels` (so `&[]` sums
/// every series). `None` when no such sample exists.
pub fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let Some((sample_name, sample_labels, v)) = parse_sample(line) else {
            continue;
        };
        if sample_name != name {
            continue;
        }
        let all = labels
            .iter()
            .all(|(k, want)| sample_labels.iter().any(|(lk, lv)| lk == k && lv == want));
        if all {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// Like [`value`] but a missing sample counts as 0 (counters that were never incremented
/// may be absent).
pub fn value_or_zero(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    value(text, name, labels).unwrap_or(0.0)
}

type Labels = Vec<(String, String)>;

/// `name{k="v",...} value [timestamp]`
fn parse_sample(line: &str) -> Option<(String, Labels, f64)> {
    let (name, rest) = match line.find('{') {
        Some(i) if line[..i].find(' ').is_none() => (&line[..i], &line[i..]),
        _ => {
            let (n, r) = line.split_once(' ')?;
            (n, r)
        }
    };
    let (labels, rest) = if let Some(body) = rest.strip_prefix('{') {
        let end = label_end(body)?;
        (parse_labels(&body[..end])?, &body[end + 1..])
    } else {
        (Vec::new(), rest)
    };
    let v = rest.split_whitespace().next()?;
    let v = match v {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        other => other.parse().ok()?,
    };
    Some((name.to_string(), labels, v))
}

/// Index of the `}` closing a label set, honouring quoted values.
fn label_end(body: &str) -> Option<usize> {
    let mut in_quotes = false;
    let mut escaped = false;
    for (i, c) in body.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if in_quotes => escaped = true,
            '"' => in_quotes = !in_quotes,
            '}' if !in_quotes => return Some(i),
            _ => {}
        }
    }
    None
}

fn parse_labels(body: &str) -> Option<Labels> {
    let mut out = Vec::new();
    let mut rest = body.trim();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=')?;
        let after = after.strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, other)) => value.push(other),
                    None => return None,
                },
                '"' => {
                    end = Some(i);
                    break;
                }
                other => value.push(other),
            }
        }
        let end = end?;
        out.push((key.trim().to_string(), value));
        rest = after[end + 1..].trim_start_matches(',').trim();
    }
    Some(out)
}

#[test]
fn parses_counters_gauges_and_histograms() {
    let text = "# TYPE leasegate_sessions_total counter\n\
        leasegate_sessions_total{outcome=\"ok\"} 3\n\
        leasegate_sessions_total{outcome=\"rejected\"} 2\n\
        leasegate_sessions_active 0\n\
        leasegate_vault_request_duration_seconds_count{op=\"creds\"} 3\n\
        leasegate_vault_request_duration_seconds_bucket{op=\"creds\",le=\"+Inf\"} 3\n\
        # EOF\n";
    assert_eq!(
        value(text, "leasegate_sessions_total", &[("outcome", "ok")]),
        Some(3.0)
    );
    assert_eq!(value(text, "leasegate_sessions_total", &[]), Some(5.0));
    assert_eq!(value(text, "leasegate_sessions_active", &[]), Some(0.0));
    assert_eq!(
        value(
            text,
            "leasegate_vault_request_duration_seconds_count",
            &[("op", "creds")]
        ),
        Some(3.0)
    );
    assert_eq!(value(text, "leasegate_leases_active", &[]), None);
    assert_eq!(
        value_or_zero(text, "leasegate_sessions_total", &[("outcome", "error")]),
        0.0
    );
}
