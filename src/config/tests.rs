//! Loading the configuration: every problem at once, unknown keys refused, defaults, the
//! typed model (methods with their keys, TLS modes with their CA, parsed patterns), secrets
//! kept out of Debug.

use std::time::Duration;

use super::validate::{is_safe_path_segment, startup_parameter_problem};
use super::*;

/// Every problem `load` would report for `text` (files are looked up, and do not exist).
fn problems(text: &str) -> Vec<String> {
    Examined::of(parse_file(text).expect("parses"), None).problems
}

const BASE: &str = r#"
[listen]
address = "127.0.0.1:6432"
cert = "/nonexistent/server.pem"
key = "/nonexistent/server-key.pem"
client_ca = "/nonexistent/ca.pem"
[vault]
address = "http://127.0.0.1:8200"
[vault.auth]
method = "token"
token = "s.supersecret"
[[databases]]
name = "myapp"
host = "127.0.0.1"
mount = "database"
roles = ["readonly"]
[[grants]]
identity = "uri:spiffe://example.org/app/*"
databases = ["myapp", "other"]
roles = ["readonly", "readwrite"]
"#;

#[test]
fn reports_every_problem_at_once() {
    let all = problems(BASE).join("\n");
    assert!(all.contains("listen.cert"), "{all}");
    assert!(all.contains("\"other\", which is not configured"), "{all}");
    assert!(all.contains("role \"readwrite\""), "{all}");
}

#[test]
fn unknown_keys_are_errors() {
    let text = BASE.replace("[vault]\n", "[vault]\nadress = 1\n");
    let err = parse_file(&text).err().expect("unknown key refused");
    assert!(err.contains("adress"), "{err}");
}

#[test]
fn defaults_and_debug_redaction() {
    let cfg = Config::parse(BASE).expect("parses");
    assert_eq!(cfg.reloadable.listen.login_timeout, Duration::from_secs(10));
    assert_eq!(cfg.reloadable.databases[0].port, 5432);
    assert_eq!(cfg.reloadable.databases[0].tls, UpstreamTls::Disable);
    let shown = format!("{:?}", cfg.fixed.vault);
    assert!(!shown.contains("supersecret"), "{shown}");
    // The form a reload compares holds the token's SHA-256, not the token.
    let compared = serde_json::to_string(&cfg.fixed).expect("serializes");
    assert!(!compared.contains("supersecret"), "{compared}");
    assert!(compared.contains("\"token\":\""), "{compared}");
}

#[test]
fn verify_full_needs_a_checkable_host() {
    let text = BASE.replace(
        "host = \"127.0.0.1\"\nmount",
        "host = \"not a host!\"\ntls = \"verify-full\"\nca_cert = \"/nonexistent/ca.pem\"\nmount",
    );
    let all = problems(&text).join("\n");
    assert!(
        all.contains("verify-full needs a host name or IP address"),
        "{all}"
    );
    for good in ["db.internal", "10.0.0.5", "::1"] {
        let text = text.replace("not a host!", good);
        let all = problems(&text).join("\n");
        assert!(!all.contains("verify-full needs a host"), "{good}: {all}");
    }
}

#[test]
fn a_socket_directory_host_needs_tls_disable() {
    let socket = BASE.replace(
        "host = \"127.0.0.1\"\nmount",
        "host = \"/var/run/postgresql\"\nmount",
    );
    let all = problems(&socket).join("\n");
    assert!(!all.contains("Unix socket"), "{all}");
    let text = socket.replace(
        "host = \"/var/run/postgresql\"\nmount",
        "host = \"/var/run/postgresql\"\ntls = \"require\"\nmount",
    );
    let all = problems(&text).join("\n");
    assert!(
        all.contains(
            "database \"myapp\": host \"/var/run/postgresql\" is a Unix socket directory, where TLS does not apply: set tls = \"disable\""
        ),
        "{all}"
    );
}

#[test]
fn a_socket_directory_host_must_leave_room_for_the_socket_name() {
    let long = format!("/{}", "d".repeat(96));
    let text = BASE.replace(
        "host = \"127.0.0.1\"\nmount",
        &format!("host = \"{long}\"\nmount"),
    );
    let all = problems(&text).join("\n");
    assert!(
        all.contains("is 111 bytes long, at most 107 fit in a Unix socket address"),
        "{all}"
    );
    let fits = text.replace(&long, &long[..93]);
    let all = problems(&fits).join("\n");
    assert!(!all.contains("Unix socket address"), "{all}");
}

#[test]
fn limits_must_be_finite_and_positive() {
    for (limits, key) in [
        ("max_sessions = 0", "limits.max_sessions must be at least 1"),
        (
            "max_sessions_per_identity = 0",
            "limits.max_sessions_per_identity must be at least 1",
        ),
        (
            "burst_per_identity = 0",
            "limits.burst_per_identity must be at least 1",
        ),
        ("new_sessions_per_second_per_identity = nan", "(got NaN)"),
        ("new_sessions_per_second_per_identity = inf", "(got inf)"),
        ("new_sessions_per_second_per_identity = -inf", "(got -inf)"),
        ("new_sessions_per_second_per_identity = 0.0", "(got 0)"),
        ("new_sessions_per_second_per_identity = -5.0", "(got -5)"),
    ] {
        let all = problems(&format!("{BASE}\n[limits]\n{limits}\n")).join("\n");
        assert!(all.contains(key), "{limits}: {all}");
        if limits.starts_with("new_sessions") {
            assert!(
                all.contains(
                    "limits.new_sessions_per_second_per_identity must be a finite number above 0"
                ),
                "{all}"
            );
        }
    }
    let fine = problems(&format!(
        "{BASE}\n[limits]\nnew_sessions_per_second_per_identity = 0.5\nburst_per_identity = 1\n"
    ));
    assert!(!fine.join("\n").contains("limits."));
    let negative = format!("{BASE}\n[limits]\nmax_sessions = -1\n");
    assert!(
        parse_file(&negative).is_err(),
        "a negative count does not parse"
    );
}

#[test]
fn startup_parameter_names_are_checked() {
    let text = BASE.replace(
        "roles = [\"readonly\"]\n",
        "roles = [\"readonly\"]\nallow_startup_parameters = [\"work_mem\", \"myapp.tenant\", \"options\", \"post_auth_delay\", \"a b\"]\n",
    );
    let cfg = Config::parse(&text).expect("parses");
    assert_eq!(
        cfg.reloadable.databases[0].allow_startup_parameters.len(),
        5
    );
    let all = problems(&text).join("\n");
    for bad in ["\"options\"", "\"post_auth_delay\"", "\"a b\""] {
        assert!(
            all.contains(&format!("allow_startup_parameters: {bad}")),
            "{all}"
        );
    }
    assert!(!all.contains("\"work_mem\""), "{all}");
    assert!(!all.contains("myapp.tenant"), "{all}");
    for bad in [
        "USER",
        "_pq_.x",
        "fallback_application_name",
        "Options",
        "x=1",
        "",
    ] {
        assert!(startup_parameter_problem(bad).is_some(), "{bad:?}");
    }
    assert_eq!(startup_parameter_problem("DateStyle"), None);
}

#[test]
fn safe_segments() {
    assert!(is_safe_path_segment("read-only_1.x"));
    for bad in ["", "..", "a/b", "a%2Fb", "a'b", "a\0b", &"x".repeat(200)] {
        assert!(!is_safe_path_segment(bad), "{bad:?}");
    }
}

/// `BASE` with its `[vault.auth]` table replaced.
fn with_auth(auth: &str) -> String {
    BASE.replace(
        "[vault.auth]\nmethod = \"token\"\ntoken = \"s.supersecret\"\n",
        &format!("[vault.auth]\n{auth}\n"),
    )
}

#[test]
fn each_auth_method_carries_the_keys_it_needs() {
    for (auth, needs) in [
        (
            "method = \"approle\"",
            "vault.auth: method Approle needs role_id or role_id_file",
        ),
        (
            "method = \"approle\"",
            "vault.auth: method Approle needs secret_id_file",
        ),
        (
            "method = \"approle\"\nrole_id = \"r\"",
            "vault.auth: method Approle needs secret_id_file",
        ),
        (
            "method = \"cert\"\ncert = \"/c.pem\"",
            "vault.auth: method Cert needs cert and key",
        ),
        (
            "method = \"kubernetes\"",
            "vault.auth: method Kubernetes needs role",
        ),
    ] {
        let all = problems(&with_auth(auth)).join("\n");
        assert!(all.contains(needs), "{auth}: {all}");
        assert!(
            Config::parse(&with_auth(auth)).is_err(),
            "{auth}: not typed"
        );
    }
    let approle = Config::parse(&with_auth(
        "method = \"approle\"\nrole_id_file = \"/r\"\nsecret_id_file = \"/s\"\nmount = \"ar\"",
    ))
    .expect("typed");
    let auth = &approle.fixed.vault.auth;
    assert_eq!(auth.mount(), "ar");
    assert!(matches!(
        &auth.method,
        AuthMethod::Approle { role_id: RoleId::File(f), secret_id_file: s }
            if f.to_str() == Some("/r") && s.to_str() == Some("/s")
    ));
    // The table is shared by every method: another method's keys are still accepted.
    let cert = Config::parse(&with_auth(
        "method = \"cert\"\ncert = \"/c.pem\"\nkey = \"/k.pem\"\ntoken_file = \"/t\"",
    ))
    .expect("typed");
    assert_eq!(cert.fixed.vault.auth.mount(), "cert");
    assert!(matches!(
        cert.fixed.vault.auth.method,
        AuthMethod::Cert { role: None, .. }
    ));
}

#[test]
fn a_verifying_upstream_tls_mode_carries_its_ca() {
    let db = |tls: &str| {
        BASE.replace(
            "mount = \"database\"\n",
            &format!("mount = \"database\"\n{tls}\n"),
        )
    };
    let all = problems(&db("tls = \"verify-ca\"")).join("\n");
    assert!(
        all.contains("database \"myapp\": tls = verify-ca/verify-full needs ca_cert"),
        "{all}"
    );
    let tls = |text: &str| {
        let cfg = Config::parse(&db(text)).expect("typed");
        cfg.reloadable.databases[0].tls.clone()
    };
    let ca = std::path::PathBuf::from("/ca.pem");
    assert_eq!(
        tls("tls = \"verify-full\"\nca_cert = \"/ca.pem\""),
        UpstreamTls::VerifyFull(ca.clone())
    );
    assert_eq!(
        tls("tls = \"verify-ca\"\nca_cert = \"/ca.pem\""),
        UpstreamTls::VerifyCa(ca)
    );
    assert_eq!(
        tls("tls = \"require\"\nca_cert = \"/ca.pem\""),
        UpstreamTls::Require
    );
}

#[test]
fn identity_patterns_are_parsed_at_load() {
    let text = BASE.replace(
        "uri:spiffe://example.org/app/*",
        "email:someone@example.org",
    );
    let all = problems(&text).join("\n");
    assert!(
        all.contains(
            "grants[0]: identity \"email:someone@example.org\" must start with uri:, dns:, cn:, \
             unix:user=, unix:uid=, unix:group= or unix:gid="
        ),
        "{all}"
    );
    assert!(Config::parse(&text).is_err(), "a bad pattern is no grant");
    let cfg = Config::parse(BASE).expect("typed");
    assert_eq!(
        cfg.reloadable.grants[0].identity.as_str(),
        "uri:spiffe://example.org/app/*"
    );
}

#[test]
fn cluster_needs_its_ca_and_a_peer_pattern() {
    let cluster = "[cluster]\npeers = [\"10.0.0.2:6432\"]\ncert = \"/c\"\nkey = \"/k\"\n";
    let all = problems(&format!("{BASE}{cluster}peer_identity = \"nope\"\n")).join("\n");
    assert!(all.contains(CLUSTER_CA_REQUIRED), "{all}");
    assert!(
        all.contains("cluster.peer_identity: identity \"nope\""),
        "{all}"
    );
    let cfg = Config::parse(&format!(
        "{BASE}{cluster}peer_identity = \"dns:peer\"\nca_cert = \"/ca\"\n"
    ))
    .expect("typed");
    let cluster = cfg.reloadable.cluster.expect("[cluster]");
    assert_eq!(cluster.peer_identity.as_str(), "dns:peer");
}

#[test]
fn replica_ids_are_numbers_or_the_host_names_ordinal_and_unique() {
    use super::build::ordinal;
    assert_eq!(ordinal("leasegate-2"), Some(2));
    assert_eq!(
        ordinal("leasegate-2.leasegate-peers.ns.svc.cluster.local"),
        Some(2)
    );
    assert_eq!(ordinal("lg-blue-127"), Some(127));
    for no in [
        "leasegate",
        "leasegate-",
        "leasegate-128",
        "leasegate-x1",
        "leasegate-0001",
        "2",
    ] {
        assert_eq!(ordinal(no), None, "{no}");
    }
    let cluster = |id: &str, peers: &str| {
        format!(
            "{BASE}[cluster]\n{id}peers = [{peers}]\npeer_identity = \"dns:peer\"\n\
             cert = \"/c\"\nkey = \"/k\"\nca_cert = \"/ca\"\n"
        )
    };
    let ok = cluster(
        "id = 1\n",
        "{ id = 0, address = \"a:1\" }, { id = 1, address = \"b:1\" }, \"c:1\"",
    );
    let cfg = Config::parse(&ok).expect("ids");
    let c = cfg.reloadable.cluster.expect("[cluster]");
    assert_eq!(c.id, Some(1));
    assert_eq!(
        c.peers.len(),
        3,
        "the own entry is kept (skipped when forwarding)"
    );
    let old = Config::parse(&cluster("", "\"a:1\"")).expect("old form");
    assert_eq!(old.reloadable.cluster.expect("[cluster]").id, None);
    let cases = [
        (
            cluster("id = 128\n", "\"a:1\""),
            "cluster.id 128 is out of range 0..=127",
        ),
        (
            cluster("id = \"pod\"\n", "\"a:1\""),
            "want a number or \"hostname\"",
        ),
        (
            cluster(
                "id = 0\n",
                "{ id = 1, address = \"a:1\" }, { id = 1, address = \"b:1\" }",
            ),
            "cluster.peers: id 1 is given twice (again for \"b:1\")",
        ),
        (
            cluster("", "{ id = 1, address = \"a:1\" }"),
            "cluster.peers name replica ids: set cluster.id for this instance too",
        ),
    ];
    for (text, want) in cases {
        let all = problems(&text).join("\n");
        assert!(all.contains(want), "want {want:?} in {all}");
    }
}
