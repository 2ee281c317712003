//! Mutual TLS for the tunnel: rustls configurations for quinn whose verifiers check the peer's
//! chain against the CA bundle (webpki, through rustls) *and* its SPIFFE identity
//! `spiffe://<clusterset>/cluster/<id>`: on the dialing side `<id>` must be the peer configured
//! for that address, on the accepting side one of the configured peers.
//!
//! The certificate, key and CA bundle live in [`Credentials`], swapped atomically when the
//! files change ([`crate::reload`]): every new handshake, either side, reads the current
//! ones; established connections keep what they negotiated.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use fedgate_discovery::model::{ClusterId, SpiffeId};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::ResolvesClientCert;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::expiry::{
    CertExpiry, CertRef, EXPIRY_WARNING, ExpiryLog, ExpiryWarning, expiry_warnings,
};
use crate::identity::{
    Identity, IdentityProblems, LeafValidity, PartNames, check_identity, server_chain,
};
use crate::metrics::{PEER_HANDSHAKE_FAILURES_TOTAL, TLS_CERT_EXPIRY_TIMESTAMP_SECONDS};

/// The ALPN protocol of the tunnel.
pub const ALPN: &[u8] = b"fedgate/1";
/// How long the same rejection is not logged again (the peer keeps retrying).
const REJECTION_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Why building the TLS configuration failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("CA bundle certificate #{index} is not usable as a trust anchor: {source}")]
    BadCa {
        index: usize,
        #[source]
        source: rustls::Error,
    },
    #[error("building the peer certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error(
        "the gateway certificate or key is not usable: {0} (does the key match the certificate?)"
    )]
    Identity(#[source] rustls::Error),
    #[error("the gateway identity does not check out: {0}")]
    OwnIdentity(IdentityProblems),
    #[error("QUIC needs TLS 1.3 with an AES-128-GCM suite: {0}")]
    Quic(String),
}

/// Bounded reasons a peer's certificate is refused (the `reason` label of
/// `fedgate_peer_handshake_failures_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// The chain does not verify against the CA bundle.
    UnknownCa,
    /// The SPIFFE id names another clusterset (trust domain).
    WrongClusterset,
    /// The SPIFFE id names another cluster than the peer configured for that address.
    WrongCluster,
    /// The SPIFFE id names a cluster that is not a configured peer.
    UnknownPeer,
    /// The certificate expired.
    Expired,
    /// The peer presented no certificate.
    NoCertificate,
    /// Anything else (no or several SPIFFE ids, malformed certificate, ...).
    Other,
}

impl RejectReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::UnknownCa => "unknown_ca",
            RejectReason::WrongClusterset => "wrong_clusterset",
            RejectReason::WrongCluster => "wrong_cluster",
            RejectReason::UnknownPeer => "unknown_peer",
            RejectReason::Expired => "expired",
            RejectReason::NoCertificate => "no_certificate",
            RejectReason::Other => "other",
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refused peer certificate: the bounded reason and what exactly was wrong.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Rejection {
    pub reason: RejectReason,
    pub detail: String,
}

impl Rejection {
    fn new(reason: RejectReason, detail: impl Into<String>) -> Self {
        Self { reason, detail: detail.into() }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.detail, self.reason)
    }
}

impl std::error::Error for Rejection {}

/// Which cluster ids a certificate may name.
#[derive(Clone, Copy, Debug)]
pub enum Expected<'a> {
    /// Exactly this one (dialing a configured peer; or checking our own certificate).
    Exactly(&'a ClusterId),
    /// Any of these (accepting).
    AnyOf(&'a [ClusterId]),
    /// Any cluster of the clusterset (our own certificate before the cluster id is known).
    AnyCluster,
}

/// Checks the identity a (chain-verified) leaf certificate claims. Pure: no I/O, no clock.
pub fn check_peer_identity(
    leaf: &CertificateDer<'_>,
    clusterset: &str,
    expected: Expected<'_>,
) -> Result<ClusterId, Rejection> {
    let (_, cert) = X509Certificate::from_der(leaf.as_ref())
        .map_err(|e| Rejection::new(RejectReason::Other, format!("unparsable certificate: {e}")))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| Rejection::new(RejectReason::Other, format!("bad subjectAltName: {e}")))?;
    let uris: Vec<&str> = san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) if u.starts_with(SpiffeId::SCHEME) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let uri = match uris.as_slice() {
        [one] => *one,
        [] => {
            return Err(Rejection::new(
                RejectReason::Other,
                "certificate has no spiffe:// URI SAN",
            ));
        }
        many => {
            return Err(Rejection::new(
                RejectReason::Other,
                format!("certificate has {} spiffe:// URI SANs, expected exactly one", many.len()),
            ));
        }
    };
    let trust_domain = SpiffeId::trust_domain_of(uri).unwrap_or_default();
    if trust_domain != clusterset {
        return Err(Rejection::new(
            RejectReason::WrongClusterset,
            format!(
                "certificate names clusterset {trust_domain:?} ({uri}), expected {clusterset:?}"
            ),
        ));
    }
    let id = SpiffeId::parse(uri).map(|id| id.cluster).map_err(|_| {
        Rejection::new(
            RejectReason::Other,
            format!("{uri} is not of the form spiffe://<clusterset>/cluster/<id>"),
        )
    })?;
    match expected {
        Expected::Exactly(want) if &id != want => Err(Rejection::new(
            RejectReason::WrongCluster,
            format!("certificate names cluster \"{id}\", expected \"{want}\""),
        )),
        Expected::AnyOf(peers) if !peers.contains(&id) => Err(Rejection::new(
            RejectReason::UnknownPeer,
            format!("certificate names cluster \"{id}\", which is not a configured peer"),
        )),
        _ => Ok(id),
    }
}

/// Maps a rustls chain-verification error to a bounded reason.
fn classify(err: &rustls::Error) -> RejectReason {
    match err {
        rustls::Error::InvalidCertificate(e) => match e {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                RejectReason::UnknownCa
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                RejectReason::Expired
            }
            _ => RejectReason::Other,
        },
        rustls::Error::NoCertificatesPresented => RejectReason::NoCertificate,
        _ => RejectReason::Other,
    }
}

/// What one log line of refusals stands for: the side (`accept`, `dial`) and the reason.
type RejectionKind = (&'static str, RejectReason);

/// Where rejections go: a counter per reason, a rate-limited log line, and the last one
/// (so the dialer can turn a failed handshake into `PeerRejected`).
#[derive(Debug, Default)]
pub struct RejectionSink {
    last: Mutex<Option<Rejection>>,
    /// Per kind (side and reason, never the detail: it names the remote port or the
    /// verification time, and keying by it let 11 500 bad handshakes log 11 126 lines), when
    /// it was last logged and how many were held back since.
    logged: Mutex<HashMap<RejectionKind, (Instant, u64)>>,
    /// The dialing side logs through its own retry loop instead.
    quiet: bool,
}

impl RejectionSink {
    pub fn new(quiet: bool) -> Self {
        Self { quiet, ..Self::default() }
    }

    /// Counts and (at most once a minute per side and reason) logs `rejection`.
    pub fn record(&self, side: &'static str, rejection: Rejection) {
        metrics::counter!(PEER_HANDSHAKE_FAILURES_TOTAL, "reason" => rejection.reason.as_str())
            .increment(1);
        if !self.quiet {
            let mut logged = self.logged.lock().unwrap_or_else(PoisonError::into_inner);
            let now = Instant::now();
            let key = (side, rejection.reason);
            let due = match logged.get_mut(&key) {
                None => Some(0),
                Some((at, held)) if now.duration_since(*at) >= REJECTION_LOG_INTERVAL => {
                    Some(std::mem::take(held))
                }
                Some((_, held)) => {
                    *held += 1;
                    None
                }
            };
            if let Some(held) = due {
                logged.insert(key, (now, 0));
                tracing::warn!(side, reason = %rejection.reason, detail = %rejection.detail, similar_since_last = held, "peer certificate refused");
            }
        }
        *self.last.lock().unwrap_or_else(PoisonError::into_inner) = Some(rejection);
    }

    /// The last rejection, taken.
    pub fn take(&self) -> Option<Rejection> {
        self.last.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

/// The handshake-signature methods `ClientCertVerifier` and `ServerCertVerifier` declare
/// alike: both verifiers check with the provider's algorithms (`self.credentials`).
macro_rules! handshake_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                self.credentials.algorithms(),
            )
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                self.credentials.algorithms(),
            )
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.credentials.algorithms().supported_schemes()
        }
    };
}

/// The accepting side's verifier: chain via webpki (against the current CA bundle), then the
/// SPIFFE id among the peers.
#[derive(Debug)]
struct PeerClientVerifier {
    credentials: Arc<Credentials>,
    peers: Vec<ClusterId>,
    sink: Arc<RejectionSink>,
}

impl ClientCertVerifier for PeerClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        true
    }
    /// No CA names are sent: the bundle can change under a live config, and a gateway has
    /// exactly one certificate to offer anyway.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let chain = self.credentials.current.load().client_verifier.verify_client_cert(
            end_entity,
            intermediates,
            now,
        );
        self.credentials.verify_peer(
            &self.sink,
            "accept",
            chain.map(drop),
            end_entity,
            Expected::AnyOf(&self.peers),
        )?;
        Ok(ClientCertVerified::assertion())
    }
    handshake_signatures!();
}

/// The dialing side's verifier: chain via webpki (no DNS name check: the SPIFFE id is the
/// name), then the SPIFFE id must be exactly the peer configured for the address.
#[derive(Debug)]
struct PeerServerVerifier {
    credentials: Arc<Credentials>,
    expected: ClusterId,
    sink: Arc<RejectionSink>,
}

impl ServerCertVerifier for PeerServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let roots = self.credentials.current.load().roots.clone();
        let chain =
            server_chain(end_entity, intermediates, &roots, &self.credentials.provider, now);
        self.credentials.verify_peer(
            &self.sink,
            "dial",
            chain.map(drop),
            end_entity,
            Expected::Exactly(&self.expected),
        )?;
        Ok(ServerCertVerified::assertion())
    }
    handshake_signatures!();
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(identity: &Identity) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for (index, ca) in identity.ca.iter().enumerate() {
        roots.add(ca.clone()).map_err(|source| TlsError::BadCa { index, source })?;
    }
    Ok(Arc::new(roots))
}

/// Checks our own identity now with [`check_identity`] (valid now, names `local` in
/// `clusterset`, key matches, chains to the bundle): a clear error instead of every peer
/// refusing us.
pub fn check_own_identity(
    identity: &Identity,
    clusterset: &str,
    local: &ClusterId,
) -> Result<LeafValidity, TlsError> {
    check_identity(
        &identity.cert_chain,
        Some(&identity.key),
        Some(&identity.ca),
        clusterset,
        Expected::Exactly(local),
        UnixTime::now(),
    )
    .map_err(|problems| {
        TlsError::OwnIdentity(IdentityProblems { problems, names: PartNames::default() })
    })
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// What the handshakes of both sides use right now.
struct Current {
    key: Arc<CertifiedKey>,
    roots: Arc<RootCertStore>,
    client_verifier: Arc<dyn ClientCertVerifier>,
    /// What it was built from, to tell a changed identity from a rewritten unchanged one.
    source: Identity,
    /// The leaf's validity window (`None` only for unchecked test identities).
    validity: Option<LeafValidity>,
}

/// The gateway's certificate, key and CA bundle, replaceable while the tunnel runs: the
/// resolvers and verifiers of every QUIC config built from it read the latest on each
/// handshake.
pub struct Credentials {
    provider: Arc<CryptoProvider>,
    clusterset: String,
    local: ClusterId,
    current: ArcSwap<Current>,
    /// `notAfter` of the leaf each peer presented at its last verified handshake.
    peers: Mutex<BTreeMap<ClusterId, i64>>,
    expiry_log: ExpiryLog,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("clusterset", &self.clusterset)
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// Checks `identity` (it must name `local` in `clusterset`, its key must match, the CA
    /// bundle must be usable) and holds it.
    pub fn new(
        identity: &Identity,
        clusterset: &str,
        local: &ClusterId,
    ) -> Result<Arc<Self>, TlsError> {
        let validity = check_own_identity(identity, clusterset, local)?;
        let credentials = Self::build(identity, clusterset, local, Some(validity))?;
        credentials.own_changed();
        Ok(credentials)
    }

    /// Like [`new`](Self::new) without checking that the certificate names `local` (tests
    /// present such certificates on purpose, to see peers refuse them).
    #[cfg(any(test, feature = "test-util"))]
    pub fn without_identity_check(
        identity: &Identity,
        clusterset: &str,
        local: &ClusterId,
    ) -> Result<Arc<Self>, TlsError> {
        Self::build(identity, clusterset, local, None)
    }

    fn build(
        identity: &Identity,
        clusterset: &str,
        local: &ClusterId,
        validity: Option<LeafValidity>,
    ) -> Result<Arc<Self>, TlsError> {
        let provider = provider();
        let current = build_current(identity, &provider, validity)?;
        Ok(Arc::new(Self {
            provider,
            clusterset: clusterset.to_owned(),
            local: local.clone(),
            current: ArcSwap::from_pointee(current),
            peers: Mutex::default(),
            expiry_log: ExpiryLog::default(),
        }))
    }

    /// Replaces the identity for new handshakes, after the same [`check_own_identity`] as at
    /// start. Returns `Ok(false)` when nothing changed; on an error the current identity stays.
    pub fn update(&self, identity: &Identity) -> Result<bool, TlsError> {
        let old = self.current.load();
        if old.source.cert_chain == identity.cert_chain
            && old.source.key.secret_der() == identity.key.secret_der()
            && old.source.ca == identity.ca
        {
            return Ok(false);
        }
        let validity = check_own_identity(identity, &self.clusterset, &self.local)?;
        let next = build_current(identity, &self.provider, Some(validity))?;
        self.current.store(Arc::new(next));
        self.own_changed();
        Ok(true)
    }

    /// Our leaf's validity window (`None` only for unchecked test credentials).
    pub fn validity(&self) -> Option<LeafValidity> {
        self.current.load().validity
    }

    /// When our leaf and each peer's last verified leaf expire, ours first.
    pub fn expiries(&self) -> Vec<CertExpiry> {
        let own =
            self.validity().map(|v| CertExpiry { cert: CertRef::Own, not_after: v.not_after });
        let peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        own.into_iter()
            .chain(peers.iter().map(|(id, not_after)| CertExpiry {
                cert: CertRef::Peer(id.clone()),
                not_after: *not_after,
            }))
            .collect()
    }

    /// The certificates within [`EXPIRY_WARNING`] of their `notAfter` (or past it) now.
    pub fn expiry_warnings(&self) -> Vec<ExpiryWarning> {
        expiry_warnings(&self.expiries(), unix_now(), EXPIRY_WARNING)
    }

    /// Logs the expiry warnings due (each certificate at most once a day).
    pub fn log_expiry_warnings(&self) {
        self.expiry_log.log(&self.expiry_warnings(), unix_now());
    }

    /// Our leaf changed (start, reload): its expiry gauge and warning.
    fn own_changed(&self) {
        if let Some(v) = self.validity() {
            metrics::gauge!(TLS_CERT_EXPIRY_TIMESTAMP_SECONDS, "cert" => "own")
                .set(v.not_after as f64);
        }
        self.log_expiry_warnings();
    }

    /// The second half of either side's verification, after the chain check (`chain`): a
    /// failed chain is recorded in `sink` under `side`, then the leaf's SPIFFE id must be
    /// `expected`; a peer that passes updates its expiry gauge and warning.
    fn verify_peer(
        &self,
        sink: &RejectionSink,
        side: &'static str,
        chain: Result<(), rustls::Error>,
        end_entity: &CertificateDer<'_>,
        expected: Expected<'_>,
    ) -> Result<(), rustls::Error> {
        chain.map_err(|e| {
            sink.record(side, Rejection::new(classify(&e), format!("certificate chain: {e}")));
            e
        })?;
        let peer = check_peer_identity(end_entity, &self.clusterset, expected).map_err(|r| {
            sink.record(side, r);
            rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
        })?;
        self.peer_verified(&peer, end_entity);
        Ok(())
    }

    /// The signature algorithms both sides verify handshake signatures with.
    fn algorithms(&self) -> &rustls::crypto::WebPkiSupportedAlgorithms {
        &self.provider.signature_verification_algorithms
    }

    /// A peer's leaf passed verification: its expiry gauge and warning.
    fn peer_verified(&self, peer: &ClusterId, leaf: &CertificateDer<'_>) {
        let Some(v) = LeafValidity::of(leaf) else { return };
        let changed = self
            .peers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(peer.clone(), v.not_after)
            != Some(v.not_after);
        metrics::gauge!(TLS_CERT_EXPIRY_TIMESTAMP_SECONDS, "cert" => "peer", "peer" => peer.to_string())
            .set(v.not_after as f64);
        if changed {
            self.log_expiry_warnings();
        }
    }

    /// The certificate chain new handshakes present (leaf first).
    pub fn cert_chain(&self) -> Vec<CertificateDer<'static>> {
        self.current.load().key.cert.clone()
    }
}

fn build_current(
    identity: &Identity,
    provider: &Arc<CryptoProvider>,
    validity: Option<LeafValidity>,
) -> Result<Current, TlsError> {
    let key =
        CertifiedKey::from_der(identity.cert_chain.clone(), identity.key.clone_key(), provider)
            .map_err(TlsError::Identity)?;
    let roots = roots(identity)?;
    let client_verifier =
        WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone()).build()?;
    Ok(Current { key: Arc::new(key), roots, client_verifier, source: identity.clone(), validity })
}

/// Presents the current certificate, server and client side alike.
#[derive(Debug)]
struct CurrentCert(Arc<Credentials>);

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current.load().key.clone())
    }
}

impl ResolvesClientCert for CurrentCert {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current.load().key.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// The QUIC server crypto: TLS 1.3, ALPN `fedgate/1`, client certificates required and
/// checked against the current CA bundle and `peers`.
pub fn server_crypto(
    credentials: &Arc<Credentials>,
    peers: Vec<ClusterId>,
    sink: Arc<RejectionSink>,
) -> Result<QuicServerConfig, TlsError> {
    let verifier = Arc::new(PeerClientVerifier { credentials: credentials.clone(), peers, sink });
    let mut tls = rustls::ServerConfig::builder_with_provider(credentials.provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Identity)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(CurrentCert(credentials.clone())));
    tls.alpn_protocols = vec![ALPN.to_vec()];
    QuicServerConfig::try_from(tls).map_err(|e| TlsError::Quic(e.to_string()))
}

/// The QUIC client crypto for dialing `peer`: TLS 1.3, ALPN `fedgate/1`, our current
/// certificate, and the peer's certificate must name exactly `peer`.
pub fn client_crypto(
    credentials: &Arc<Credentials>,
    peer: ClusterId,
    sink: Arc<RejectionSink>,
) -> Result<QuicClientConfig, TlsError> {
    let verifier =
        Arc::new(PeerServerVerifier { credentials: credentials.clone(), expected: peer, sink });
    let mut tls = rustls::ClientConfig::builder_with_provider(credentials.provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Identity)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(CurrentCert(credentials.clone())));
    tls.alpn_protocols = vec![ALPN.to_vec()];
    QuicClientConfig::try_from(tls).map_err(|e| TlsError::Quic(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestPki;

    fn id(s: &str) -> ClusterId {
        ClusterId::new(s).expect("valid id")
    }

    #[test]
    fn identity_scenarios() {
        let pki = TestPki::new("demo");
        let other_set = TestPki::new("other");
        let east = pki.issue("east").cert_chain[0].clone();
        let foreign_set = other_set.issue("east").cert_chain[0].clone();
        let two = pki
            .issue_with_sans("east", &["spiffe://demo/cluster/east", "spiffe://demo/cluster/west"])
            .cert_chain[0]
            .clone();
        let none = pki.issue_with_sans("east", &[]).cert_chain[0].clone();
        let bad_path =
            pki.issue_with_sans("east", &["spiffe://demo/node/east"]).cert_chain[0].clone();
        let peers = [id("east"), id("south")];
        let west = id("west");
        let east_id = id("east");

        let cases: Vec<(&str, &CertificateDer<'_>, Expected<'_>, Result<&str, RejectReason>)> = vec![
            ("dial, right peer", &east, Expected::Exactly(&east_id), Ok("east")),
            (
                "dial, other cluster",
                &east,
                Expected::Exactly(&west),
                Err(RejectReason::WrongCluster),
            ),
            ("accept, configured peer", &east, Expected::AnyOf(&peers), Ok("east")),
            (
                "accept, unknown peer",
                &east,
                Expected::AnyOf(&peers[1..]),
                Err(RejectReason::UnknownPeer),
            ),
            (
                "other clusterset",
                &foreign_set,
                Expected::AnyOf(&peers),
                Err(RejectReason::WrongClusterset),
            ),
            ("two spiffe ids", &two, Expected::AnyOf(&peers), Err(RejectReason::Other)),
            ("no spiffe id", &none, Expected::AnyOf(&peers), Err(RejectReason::Other)),
            ("not a cluster path", &bad_path, Expected::AnyOf(&peers), Err(RejectReason::Other)),
        ];
        for (name, cert, expected, want) in cases {
            let got = check_peer_identity(cert, "demo", expected);
            match (got, want) {
                (Ok(got), Ok(want)) => assert_eq!(got.as_str(), want, "{name}"),
                (Err(got), Err(want)) => assert_eq!(got.reason, want, "{name}: {got}"),
                (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
            }
        }
        let garbage = CertificateDer::from(vec![1u8, 2, 3]);
        assert_eq!(
            check_peer_identity(&garbage, "demo", Expected::AnyOf(&peers))
                .expect_err("garbage")
                .reason,
            RejectReason::Other
        );
    }

    #[test]
    fn own_identity_must_name_us() {
        let pki = TestPki::new("demo");
        let identity = pki.issue("east");
        check_own_identity(&identity, "demo", &id("east")).expect("names us");
        let err = check_own_identity(&identity, "demo", &id("west")).expect_err("names east");
        assert!(err.to_string().contains("expected SAN URI spiffe://demo/cluster/west"), "{err}");
    }
}
