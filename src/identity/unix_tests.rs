//! Unix identities against patterns: they match `unix:` patterns only, and certificate
//! principals never match `unix:` patterns.

use super::*;

fn principal(uris: &[&str], dns: &[&str], cn: Option<&str>) -> Principal {
    Principal::new(
        uris.iter().map(|s| s.to_string()).collect(),
        dns.iter().map(|s| s.to_string()).collect(),
        cn.map(str::to_owned),
    )
}

#[test]
fn unix_and_certificate_identities_never_meet() {
    let p = |s: &str| IdentityPattern::parse(s).expect("parses");
    let peer = Principal::from_unix(UnixIdentity::new(
        1000,
        1001,
        None,
        Some("billing".into()),
        vec![
            UnixGroup::new(1001, Some("apps".into())),
            UnixGroup::new(27, Some("sudo".into())),
        ],
    ));
    assert_eq!(peer.display_name(), "unix:user=billing");
    assert_eq!(
        peer.all_identities(),
        [
            "unix:user=billing",
            "unix:uid=1000",
            "unix:group=apps",
            "unix:group=sudo",
            "unix:gid=1001",
            "unix:gid=27"
        ]
    );
    let nameless = Principal::from_unix(UnixIdentity::lookup(4_000_000_000, 7, None));
    assert_eq!(nameless.display_name(), "unix:uid=4000000000");
    assert_eq!(
        p("unix:user=billing").matched(&peer).as_deref(),
        Some("unix:user=billing")
    );
    assert_eq!(
        p("unix:user=bill*").matched(&peer).as_deref(),
        Some("unix:user=billing")
    );
    assert!(p("unix:uid=1000").matches(&peer));
    assert!(p("unix:group=sudo").matches(&peer));
    assert!(p("unix:gid=1001").matches(&peer));
    assert!(!p("unix:uid=1001").matches(&peer), "a gid is not a uid");
    assert!(
        !p("unix:group=billing").matches(&peer),
        "a user is not a group"
    );
    for cert_pattern in [
        "cn:billing",
        "cn:*",
        "uri:**",
        "dns:*",
        "cn:unix:user=billing",
    ] {
        assert!(!p(cert_pattern).matches(&peer), "{cert_pattern}");
    }
    let cert = principal(&["unix:user=billing"], &["billing"], Some("billing"));
    for unix_pattern in [
        "unix:user=billing",
        "unix:user=*",
        "unix:uid=0",
        "unix:group=*",
    ] {
        assert!(!p(unix_pattern).matches(&cert), "{unix_pattern}");
    }
    for bad in [
        "unix:uid=*",
        "unix:uid=x",
        "unix:gid=",
        "unix:name=a",
        "unix:user",
        "unix:",
    ] {
        assert!(IdentityPattern::parse(bad).is_err(), "{bad}");
    }
}
