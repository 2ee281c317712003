//! Certificates made on the fly for tests (feature `test-util`): a CA for a clusterset and
//! gateway identities with `spiffe://<clusterset>/cluster/<id>`, plus foreign CAs, expired
//! certificates and odd SANs for the refusal cases.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::identity::Identity;

/// A test CA of one clusterset.
pub struct TestPki {
    clusterset: String,
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl TestPki {
    /// A new CA (ECDSA P-256) for `clusterset`.
    pub fn new(clusterset: &str) -> Self {
        let key = KeyPair::generate().expect("generating a test CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("empty SAN list");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, format!("fedgate test CA {clusterset}"));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(params, key).expect("self-signing the test CA");
        Self { clusterset: clusterset.to_owned(), ca }
    }

    /// Another, unrelated CA for the same clusterset name (its certificates must be refused).
    pub fn foreign_ca(&self) -> Self {
        Self::new(&self.clusterset)
    }

    pub fn clusterset(&self) -> &str {
        &self.clusterset
    }

    /// The CA certificate.
    pub fn ca_cert(&self) -> CertificateDer<'static> {
        self.ca.der().clone()
    }

    /// The CA certificate as PEM.
    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    /// A gateway identity for `cluster_id`: SAN URI `spiffe://<clusterset>/cluster/<id>`,
    /// serverAuth and clientAuth, trusting this CA.
    pub fn issue(&self, cluster_id: &str) -> Identity {
        let uri = format!("spiffe://{}/cluster/{cluster_id}", self.clusterset);
        self.issue_with_sans(cluster_id, &[uri.as_str()])
    }

    /// Like [`issue`](Self::issue) but expired since 2001.
    pub fn issue_expired(&self, cluster_id: &str) -> Identity {
        let uri = format!("spiffe://{}/cluster/{cluster_id}", self.clusterset);
        self.build(cluster_id, &[uri.as_str()], true)
    }

    /// A gateway identity with exactly the URI SANs `uris` (for refusal tests).
    pub fn issue_with_sans(&self, common_name: &str, uris: &[&str]) -> Identity {
        self.build(common_name, uris, false)
    }

    fn build(&self, common_name: &str, uris: &[&str], expired: bool) -> Identity {
        let key = KeyPair::generate().expect("generating a test key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("empty SAN list");
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI((*u).try_into().expect("test URI is ASCII")))
            .collect();
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        if expired {
            params.not_before = rcgen::date_time_ymd(2000, 1, 1);
            params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        }
        let cert = params.signed_by(&key, &self.ca).expect("signing a test certificate");
        Identity {
            cert_chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            ca: vec![self.ca_cert()],
        }
    }

    /// Writes `cluster_id`'s certificate, key and this CA as PEM files into `dir`; returns
    /// their paths (cert, key, ca), ready for `Identity::from_pem_files`.
    pub fn write_pem(
        &self,
        dir: &Path,
        cluster_id: &str,
    ) -> std::io::Result<(PathBuf, PathBuf, PathBuf)> {
        self.write_pem_with(dir, cluster_id, false)
    }

    /// Like [`write_pem`](Self::write_pem) with a certificate expired since 2001 (for reload
    /// refusals).
    pub fn write_expired_pem(
        &self,
        dir: &Path,
        cluster_id: &str,
    ) -> std::io::Result<(PathBuf, PathBuf, PathBuf)> {
        self.write_pem_with(dir, cluster_id, true)
    }

    fn write_pem_with(
        &self,
        dir: &Path,
        cluster_id: &str,
        expired: bool,
    ) -> std::io::Result<(PathBuf, PathBuf, PathBuf)> {
        let key = KeyPair::generate().map_err(std::io::Error::other)?;
        let mut params =
            CertificateParams::new(Vec::<String>::new()).map_err(std::io::Error::other)?;
        let uri = format!("spiffe://{}/cluster/{cluster_id}", self.clusterset);
        params.subject_alt_names =
            vec![SanType::URI(uri.as_str().try_into().map_err(std::io::Error::other)?)];
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        if expired {
            params.not_before = rcgen::date_time_ymd(2000, 1, 1);
            params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        }
        let cert = params.signed_by(&key, &self.ca).map_err(std::io::Error::other)?;
        let paths = (
            dir.join(format!("{cluster_id}.crt")),
            dir.join(format!("{cluster_id}.key")),
            dir.join("ca.crt"),
        );
        std::fs::write(&paths.0, cert.pem())?;
        std::fs::write(&paths.1, key.serialize_pem())?;
        std::fs::write(&paths.2, self.ca_pem())?;
        Ok(paths)
    }
}

/// A UDP relay that holds every datagram for `delay` in each direction: a long path between
/// two tunnel endpoints on one machine (this machine's kernel has no netem). Listens on
/// `listen`; each address that sends to it gets a socket of its own towards `upstream`, as a
/// NAT would, so the endpoint behind `upstream` sees one address per dialing socket.
/// Datagrams are relayed one by one, in order, with 16 MB socket buffers (forced when the
/// process may), so a burst of a sender's window is queued rather than dropped. Relays until
/// dropped.
pub struct DelayRelay {
    address: std::net::SocketAddr,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// The relay's socket buffers (see [`DelayRelay`]).
const RELAY_BUFFER: usize = 16 << 20;

type DelayQueue = tokio::sync::mpsc::UnboundedSender<(tokio::time::Instant, Vec<u8>)>;

impl DelayRelay {
    /// Binds `listen` and starts relaying to `upstream` on the current runtime.
    pub fn start(
        listen: std::net::SocketAddr,
        upstream: std::net::SocketAddr,
        delay: std::time::Duration,
    ) -> std::io::Result<Self> {
        let front = std::sync::Arc::new(relay_socket(listen)?);
        let address = front.local_addr()?;
        let task = tokio::spawn(async move {
            let mut flows: std::collections::HashMap<std::net::SocketAddr, DelayQueue> =
                std::collections::HashMap::new();
            let mut buf = vec![0u8; 65_536];
            loop {
                let (n, client) = match front.recv_from(&mut buf).await {
                    Ok(got) => got,
                    // An ICMP port unreachable for a datagram sent back: keep going.
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
                    Err(e) => return Err(e),
                };
                let due = tokio::time::Instant::now() + delay;
                let queue = match flows.entry(client) {
                    std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::hash_map::Entry::Vacant(e) => {
                        e.insert(relay_flow(&front, client, upstream, delay)?)
                    }
                };
                let _ = queue.send((due, buf[..n].to_vec()));
            }
        });
        Ok(Self { address, task })
    }

    /// Where the relay listens.
    pub fn address(&self) -> std::net::SocketAddr {
        self.address
    }

    /// Runs until the relay fails (it returns only then).
    pub async fn run(mut self) -> std::io::Result<()> {
        (&mut self.task).await.map_err(std::io::Error::other)?
    }
}

impl Drop for DelayRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn relay_socket(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::UdpSocket> {
    use rustix::net::sockopt;
    let s = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::DGRAM, None)?;
    if sockopt::set_socket_recv_buffer_size_force(&s, RELAY_BUFFER).is_err() {
        s.set_recv_buffer_size(RELAY_BUFFER)?;
    }
    if sockopt::set_socket_send_buffer_size_force(&s, RELAY_BUFFER).is_err() {
        s.set_send_buffer_size(RELAY_BUFFER)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    tokio::net::UdpSocket::from_std(s.into())
}

/// Sends what `rx` queues to `to` (`None`: the socket's connected peer) once it is due.
fn relay_sender(
    out: std::sync::Arc<tokio::net::UdpSocket>,
    to: Option<std::net::SocketAddr>,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<(tokio::time::Instant, Vec<u8>)>,
) {
    tokio::spawn(async move {
        while let Some((due, datagram)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            // A datagram that cannot be sent is lost, as on a real path.
            let _ = match to {
                Some(to) => out.send_to(&datagram, to).await,
                None => out.send(&datagram).await,
            };
        }
    });
}

/// A new flow for `client`: its own socket towards `upstream`, and the way back.
fn relay_flow(
    front: &std::sync::Arc<tokio::net::UdpSocket>,
    client: std::net::SocketAddr,
    upstream: std::net::SocketAddr,
    delay: std::time::Duration,
) -> std::io::Result<DelayQueue> {
    let local: std::net::SocketAddr = if upstream.is_ipv4() {
        ([127, 0, 0, 1], 0).into()
    } else {
        ([0u16, 0, 0, 0, 0, 0, 0, 1], 0).into()
    };
    let back = std::sync::Arc::new(relay_socket(local)?);
    let (up_tx, up_rx) = tokio::sync::mpsc::unbounded_channel();
    let (down_tx, down_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        if back.connect(upstream).await.is_err() {
            return;
        }
        relay_sender(back.clone(), None, up_rx);
        let mut buf = vec![0u8; 65_536];
        loop {
            match back.recv(&mut buf).await {
                Ok(n) => {
                    let _ = down_tx.send((tokio::time::Instant::now() + delay, buf[..n].to_vec()));
                }
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                Err(_) => return,
            }
        }
    });
    relay_sender(front.clone(), Some(client), down_rx);
    Ok(up_tx)
}
