use std::time::Duration;

use tokio::time::Instant;

use super::status::{Entry, merge};
use super::*;

fn id(s: &str) -> ClusterId {
    ClusterId::new(s).expect("valid id")
}

#[test]
fn settings_are_validated() {
    let base = SessionSettings::new(id("east"), vec![id("zeta")]);
    type Change = fn(&mut SessionSettings);
    let cases: Vec<(&str, Change, Option<&str>)> = vec![
        ("defaults", |_| {}, None),
        (
            "lease too short",
            |s| s.peer_lease_duration = Duration::from_millis(10),
            Some("too short"),
        ),
    ];
    for (name, change, want) in cases {
        let mut s = base.clone();
        change(&mut s);
        match (validate(&s), want) {
            (Ok(()), None) => {}
            (Err(e), Some(w)) => assert!(e.to_string().contains(w), "{name}: {e}"),
            (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
        }
    }
    assert_eq!(base.heartbeat_interval(), Duration::from_secs(5));
}

#[test]
fn status_merges_the_session_and_the_transport() {
    let now = Instant::now();
    let transport = |connected: bool, error: Option<&str>| TransportStatus {
        address: "10.0.0.2:15443".into(),
        connected,
        rtt_ms: connected.then_some(1.5),
        path_mtu: connected.then_some(1452),
        last_error: error.map(str::to_owned),
    };
    let session = |error: Option<&str>| Entry {
        draining: true,
        exports_version: Some(7),
        exports_withdrawn: false,
        last_seen: Some(now - Duration::from_secs(2)),
        last_error: error.map(str::to_owned),
    };
    // (case, session error, transport, expected last error)
    let cases = [
        ("nothing wrong", None, transport(true, None), None),
        ("transport error only", None, transport(false, Some("timed out")), Some("timed out")),
        (
            "a session reset wins",
            Some("bad update"),
            transport(true, Some("old")),
            Some("bad update"),
        ),
    ];
    for (name, error, t, want) in cases {
        let connected = t.connected;
        let s = merge(&id("west"), &session(error), t, now);
        assert_eq!(s.cluster, id("west"), "{name}");
        assert_eq!(s.address, "10.0.0.2:15443", "{name}");
        assert_eq!(s.connected, connected, "{name}");
        assert_eq!(s.rtt_ms, connected.then_some(1.5), "{name}");
        assert!(s.draining, "{name}");
        assert_eq!(s.exports_version, Some(7), "{name}");
        assert_eq!(s.last_seen_secs, Some(2.0), "{name}");
        assert_eq!(s.last_error.as_deref(), want, "{name}");
    }
}
