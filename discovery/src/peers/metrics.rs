//! Metrics of the peer sessions (the export exchange and the leases), declared in one place.
//! The transport's own metrics (connections, disconnects, handshakes) stay in the tunnel.

/// Peer export sessions reset because of a bad or failed exchange, by `reason`.
pub const PEER_SESSION_RESETS_TOTAL: &str = "fedgate_peer_session_resets_total";
/// Peer leases that expired (their exports were withdrawn).
pub const PEER_LEASE_EXPIRIES_TOTAL: &str = "fedgate_peer_lease_expiries_total";

/// Registers the help text of every peer-session metric with the installed recorder.
pub fn describe_metrics() {
    metrics::describe_counter!(
        PEER_SESSION_RESETS_TOTAL,
        "Export exchange sessions with a peer reset after an error, by reason."
    );
    metrics::describe_counter!(
        PEER_LEASE_EXPIRIES_TOTAL,
        "Peer leases that expired: the peer was silent too long and its exports were withdrawn."
    );
}
