//! Metrics of the tunnel, declared in one place. (The peer sessions' own, resets and lease
//! expiries, are declared in `fedgate_discovery::peers`.)

/// Handshakes refused because the peer's certificate failed verification, by `reason`
/// (`unknown_ca`, `wrong_clusterset`, `wrong_cluster`, `unknown_peer`, `expired`,
/// `no_certificate`, `other`).
pub const PEER_HANDSHAKE_FAILURES_TOTAL: &str = "fedgate_peer_handshake_failures_total";
/// QUIC connections to peers established, by `direction` (`dial`, `accept`).
pub const PEER_CONNECTIONS_TOTAL: &str = "fedgate_peer_connections_total";
/// QUIC connections to peers that ended, by `reason` (`closed`: the peer closed it,
/// `reset`: a stateless reset, i.e. the peer restarted and no longer knows the connection,
/// `timed_out`: nothing heard for the idle timeout, `replaced`: a newer connection took over,
/// `local`: this gateway closed it, `other`).
pub const PEER_DISCONNECTS_TOTAL: &str = "fedgate_peer_disconnects_total";
/// Peers with at least one connected replica right now.
pub const PEERS_CONNECTED: &str = "fedgate_peers_connected";
/// Connected replicas (QUIC connections) of each peer, by `peer`.
pub const PEER_REPLICAS_CONNECTED: &str = "fedgate_peer_replicas_connected";
/// Connections of a peer's identity beyond the replicas its configured addresses resolve to
/// (a copied certificate, or a replica missing from `peers[].addresses`), by `peer`; those
/// beyond the hard limit are refused.
pub const PEER_UNEXPECTED_INSTANCES_TOTAL: &str = "fedgate_peer_unexpected_instances_total";

/// Times a send found the tunnel's UDP send buffer full (quinn then waits until it drains):
/// the network interface or its queue is slower than the data plane.
pub const SOCKET_FULL_TOTAL: &str = "fedgate_tunnel_socket_full_total";
/// UDP sends from the tunnel port, and the datagrams in them: their ratio is the mean GSO batch
/// (at most 64 datagrams, quinn-udp's GSO limit; 1 for request/response traffic).
pub const UDP_SENDS_TOTAL: &str = "fedgate_tunnel_udp_sends_total";
/// Datagrams sent from the tunnel port (see [`UDP_SENDS_TOTAL`]).
pub const UDP_DATAGRAMS_SENT_TOTAL: &str = "fedgate_tunnel_udp_datagrams_sent_total";
/// Datagrams at the tunnel port that cannot be QUIC for this gateway, by `reason`.
pub const JUNK_DATAGRAMS_TOTAL: &str = "fedgate_tunnel_junk_datagrams_total";

/// Reloads of the tunnel identity files, by `result` (`ok`, `read`: a file did not parse,
/// `refused`: the new certificate/key/CA failed the start-up checks, e.g. it is expired; the
/// old identity stays).
pub const TLS_RELOADS_TOTAL: &str = "fedgate_tls_reloads_total";

/// `notAfter` of a certificate as unix seconds: this gateway's own leaf (`cert="own"`, set at
/// start and on every reload) and the leaf each peer presented at its last verified handshake
/// (`cert="peer"`, `peer="<cluster id>"`). Alert on `... - time() < 7 * 86400`.
pub const TLS_CERT_EXPIRY_TIMESTAMP_SECONDS: &str = "fedgate_tls_cert_expiry_timestamp_seconds";

/// Registers the help text of every tunnel metric with the installed recorder.
pub fn describe() {
    metrics::describe_counter!(
        PEER_HANDSHAKE_FAILURES_TOTAL,
        "Peer handshakes refused because the peer's certificate failed verification, by reason."
    );
    metrics::describe_counter!(
        PEER_CONNECTIONS_TOTAL,
        "QUIC connections to peers established, by direction."
    );
    metrics::describe_counter!(
        PEER_DISCONNECTS_TOTAL,
        "QUIC connections to peers that ended, by reason (closed, reset: the peer restarted, \
         timed_out, replaced, local, other)."
    );
    metrics::describe_gauge!(PEERS_CONNECTED, "Peers with at least one connected replica.");
    metrics::describe_gauge!(
        PEER_REPLICAS_CONNECTED,
        "Connected replicas (QUIC connections) of each peer."
    );
    metrics::describe_counter!(
        PEER_UNEXPECTED_INSTANCES_TOTAL,
        "Connections of a peer's identity beyond the replicas its configured addresses \
         resolve to (a copied certificate, or a replica missing from peers[].addresses)."
    );
    metrics::describe_counter!(
        TLS_RELOADS_TOTAL,
        "Reloads of the tunnel certificate, key and CA files after they changed, by result \
         (ok, read, refused); on an error the previous identity stays in use."
    );
    metrics::describe_gauge!(
        TLS_CERT_EXPIRY_TIMESTAMP_SECONDS,
        "When a certificate expires (its notAfter, unix seconds): this gateway's own leaf \
         (cert=\"own\") and each peer's leaf at its last handshake (cert=\"peer\", peer)."
    );
    metrics::describe_counter!(
        SOCKET_FULL_TOTAL,
        "Times a send found the tunnel's UDP send buffer full and waited for it to drain."
    );
    metrics::describe_counter!(
        UDP_SENDS_TOTAL,
        "UDP sends from the tunnel port (a GSO send carries several datagrams)."
    );
    metrics::describe_counter!(
        UDP_DATAGRAMS_SENT_TOTAL,
        "Datagrams sent from the tunnel port; divided by fedgate_tunnel_udp_sends_total, the \
         mean GSO batch."
    );
    metrics::describe_counter!(
        JUNK_DATAGRAMS_TOTAL,
        "Datagrams at the tunnel port that cannot be QUIC for this gateway (quinn drops them), by \
         reason: unknown_version, too_short, connection_id (a short header with an id this \
         gateway never issued)."
    );
}
