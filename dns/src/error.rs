//! Errors of the DNS server.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

/// What can go wrong starting or running the DNS server.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error(
        "cannot bind dns {proto} socket on {addr}: {source} (is another DNS server running there?)"
    )]
    Bind {
        proto: &'static str,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot read {0}: {1} (configure dns.upstream with explicit addresses instead of `system`)"
    )]
    ResolvConf(PathBuf, #[source] io::Error),
    #[error("invalid dns settings: {0}")]
    Settings(String),
    #[error("dns {proto} socket on {addr} failed: {source}")]
    Socket {
        proto: &'static str,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

impl DnsError {
    /// A bounded string for metric labels and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            DnsError::Bind { .. } => "bind",
            DnsError::ResolvConf(..) => "resolv_conf",
            DnsError::Settings(_) => "settings",
            DnsError::Socket { .. } => "socket",
        }
    }
}
