//! A gateway's TLS identity: certificate chain, private key and the CA bundle that peers'
//! certificates must chain to, and [`check_identity`], the one check of our own identity that
//! start-up (the config check, `fedgate run`) and every hot reload apply.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fedgate_discovery::model::SpiffeId;
use rustls::crypto::CryptoProvider;
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, InconsistentKeys, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::tls::{Expected, check_peer_identity};

/// Why an identity could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("reading certificate {path}: {source} (expected PEM `CERTIFICATE` blocks)")]
    ReadCerts {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error(
        "{path} holds no certificate (expected PEM `CERTIFICATE` blocks; `fedgate certs` writes them)"
    )]
    NoCerts { path: PathBuf },
    #[error("reading private key {path}: {source} (expected one PEM PKCS#8, PKCS#1 or SEC1 key)")]
    ReadKey {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
}

/// Certificate chain (leaf first), private key, and CA bundle of a gateway.
#[derive(Debug)]
pub struct Identity {
    pub cert_chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub ca: Vec<CertificateDer<'static>>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Self { cert_chain: self.cert_chain.clone(), key: self.key.clone_key(), ca: self.ca.clone() }
    }
}

impl Identity {
    /// Loads PEM files: `cert` (the gateway's chain, leaf first), `key`, `ca` (the bundle).
    pub fn from_pem_files(cert: &Path, key: &Path, ca: &Path) -> Result<Self, IdentityError> {
        let cert_chain = read_certs(cert)?;
        let key = PrivateKeyDer::from_pem_file(key)
            .map_err(|source| IdentityError::ReadKey { path: key.to_owned(), source })?;
        let ca = read_certs(ca)?;
        Ok(Self { cert_chain, key, ca })
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|source| IdentityError::ReadCerts { path: path.to_owned(), source })?;
    if certs.is_empty() {
        return Err(IdentityError::NoCerts { path: path.to_owned() });
    }
    Ok(certs)
}

/// Which of the three parts of an identity a problem is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdentityPart {
    Cert,
    Key,
    Ca,
}

/// How the three parts are named in messages: their file paths when they came from files,
/// else the config fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartNames {
    pub cert: String,
    pub key: String,
    pub ca: String,
}

impl Default for PartNames {
    fn default() -> Self {
        Self { cert: "tls.cert".to_owned(), key: "tls.key".to_owned(), ca: "tls.ca".to_owned() }
    }
}

/// Start of a leaf's validity window and its end (`notAfter`), unix seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeafValidity {
    pub not_before: i64,
    pub not_after: i64,
}

impl LeafValidity {
    /// The validity window of a DER certificate, `None` when it does not parse.
    pub fn of(der: &CertificateDer<'_>) -> Option<Self> {
        let (_, cert) = X509Certificate::from_der(der.as_ref()).ok()?;
        Some(Self::from_parsed(&cert))
    }

    /// Whether `secs` (unix seconds) lies inside the window.
    pub fn contains(&self, secs: i64) -> bool {
        self.not_before <= secs && secs <= self.not_after
    }

    fn from_parsed(cert: &X509Certificate<'_>) -> Self {
        Self {
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
        }
    }
}

/// One thing wrong with a gateway's own identity. What `fedgate run` refuses to start with
/// and a reload refuses to swap in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdentityProblem {
    /// The leaf is missing or does not parse.
    Unparsable(String),
    /// `notAfter` is in the past.
    Expired { not_after: i64 },
    /// `notBefore` is in the future.
    NotYetValid { not_before: i64 },
    /// The SPIFFE URI SAN does not name this cluster of this clusterset.
    WrongName { found: Vec<String>, expected: String, detail: String },
    /// The private key belongs to another certificate.
    KeyMismatch,
    /// The private key is not usable (unsupported type, malformed).
    BadKey(String),
    /// A CA bundle entry does not parse or is not usable as a trust anchor.
    BadCa { index: usize, detail: String },
    /// No certificate of the bundle is inside its validity window now.
    NoValidCa,
    /// The leaf is not signed by any usable CA of the bundle (through its intermediates).
    NotSignedByCa,
    /// The chain to the bundle fails for another reason (wrong key usage, expired
    /// intermediate, ...).
    Chain(String),
}

impl IdentityProblem {
    /// The part to fix.
    pub fn part(&self) -> IdentityPart {
        match self {
            IdentityProblem::KeyMismatch | IdentityProblem::BadKey(_) => IdentityPart::Key,
            IdentityProblem::BadCa { .. } | IdentityProblem::NoValidCa => IdentityPart::Ca,
            _ => IdentityPart::Cert,
        }
    }

    /// A bounded label (logs, metrics).
    pub fn reason(&self) -> &'static str {
        match self {
            IdentityProblem::Unparsable(_) => "unparsable",
            IdentityProblem::Expired { .. } => "expired",
            IdentityProblem::NotYetValid { .. } => "not_yet_valid",
            IdentityProblem::WrongName { .. } => "wrong_name",
            IdentityProblem::KeyMismatch => "key_mismatch",
            IdentityProblem::BadKey(_) => "bad_key",
            IdentityProblem::BadCa { .. } => "bad_ca",
            IdentityProblem::NoValidCa => "no_valid_ca",
            IdentityProblem::NotSignedByCa => "unknown_ca",
            IdentityProblem::Chain(_) => "chain",
        }
    }

    /// The problem in words, the parts named by `names`.
    pub fn describe(&self, names: &PartNames) -> String {
        let PartNames { cert, key, ca } = names;
        match self {
            IdentityProblem::Unparsable(e) => format!("certificate {cert}: {e}"),
            IdentityProblem::Expired { not_after } => {
                format!("certificate {cert} expired at {}", crate::expiry::rfc3339(*not_after))
            }
            IdentityProblem::NotYetValid { not_before } => format!(
                "certificate {cert} is not valid before {}",
                crate::expiry::rfc3339(*not_before)
            ),
            IdentityProblem::WrongName { found, expected, detail } => match found.len() {
                0 => format!(
                    "certificate {cert} names no spiffe:// URI SAN, expected SAN URI {expected}"
                ),
                1 => format!("certificate {cert} names {}, expected SAN URI {expected}", found[0]),
                _ => format!("certificate {cert} names {}: {detail}", found.join(", ")),
            },
            IdentityProblem::KeyMismatch => format!("{key} is not the key of {cert}"),
            IdentityProblem::BadKey(e) => format!("{key}: invalid private key: {e}"),
            IdentityProblem::BadCa { index, detail } => {
                format!("{ca}: certificate #{index} is not usable as a CA: {detail}")
            }
            IdentityProblem::NoValidCa => {
                format!("no certificate in {ca} is valid now (all expired or not yet valid)")
            }
            IdentityProblem::NotSignedByCa => {
                format!("certificate {cert} is not signed by any CA in {ca}")
            }
            IdentityProblem::Chain(e) => format!("certificate {cert} does not chain to {ca}: {e}"),
        }
    }
}

/// Everything wrong with an identity, with the names to describe it by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityProblems {
    pub problems: Vec<IdentityProblem>,
    pub names: PartNames,
}

impl IdentityProblems {
    /// The same problems, the parts named `names` (file paths).
    pub fn named(self, names: PartNames) -> Self {
        Self { names, ..self }
    }

    /// The bounded reason of the first problem.
    pub fn reason(&self) -> &'static str {
        self.problems.first().map_or("other", IdentityProblem::reason)
    }
}

impl fmt::Display for IdentityProblems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            f.write_str(&p.describe(&self.names))?;
        }
        Ok(())
    }
}

impl std::error::Error for IdentityProblems {}

/// The one check of a gateway's own identity, at start (`fedgate run`, the config check) and
/// on every reload: the leaf is valid `now`, its SPIFFE id names `expected` in `clusterset`,
/// `key` (when given) is its key, and (when `ca` is given) the bundle holds a CA valid now
/// that the leaf chains to, as a peer would check it, both as server and as client. Returns
/// every problem found; pure apart from the crypto.
pub fn check_identity(
    cert_chain: &[CertificateDer<'_>],
    key: Option<&PrivateKeyDer<'_>>,
    ca: Option<&[CertificateDer<'_>]>,
    clusterset: &str,
    expected: Expected<'_>,
    now: UnixTime,
) -> Result<LeafValidity, Vec<IdentityProblem>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut problems = Vec::new();
    let Some(leaf) = cert_chain.first() else {
        return Err(vec![IdentityProblem::Unparsable("the certificate chain is empty".to_owned())]);
    };
    let parsed = match X509Certificate::from_der(leaf.as_ref()) {
        Ok((_, cert)) => cert,
        Err(e) => return Err(vec![IdentityProblem::Unparsable(format!("unparsable: {e}"))]),
    };
    let validity = LeafValidity::from_parsed(&parsed);
    let now_secs = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
    if now_secs > validity.not_after {
        problems.push(IdentityProblem::Expired { not_after: validity.not_after });
    } else if now_secs < validity.not_before {
        problems.push(IdentityProblem::NotYetValid { not_before: validity.not_before });
    }

    if let Err(rejection) = check_peer_identity(leaf, clusterset, expected) {
        let found = spiffe_uris(&parsed);
        let expected = match expected {
            Expected::Exactly(id) => SpiffeId::new(clusterset, id.clone()).to_string(),
            _ => format!("spiffe://{clusterset}/cluster/<cluster id>"),
        };
        problems.push(IdentityProblem::WrongName { found, expected, detail: rejection.detail });
    }

    if let Some(key) = key {
        match provider.key_provider.load_private_key(key.clone_key()) {
            Err(e) => problems.push(IdentityProblem::BadKey(e.to_string())),
            Ok(signing) => {
                if let Err(rustls::Error::InconsistentKeys(InconsistentKeys::KeyMismatch)) =
                    CertifiedKey::new(vec![leaf.clone().into_owned()], signing).keys_match()
                {
                    problems.push(IdentityProblem::KeyMismatch);
                }
            }
        }
    }

    if let Some(bundle) = ca {
        let mut roots = RootCertStore::empty();
        let mut unusable = 0;
        for (index, cert) in bundle.iter().enumerate() {
            match X509Certificate::from_der(cert.as_ref()) {
                Err(e) => {
                    unusable += 1;
                    problems.push(IdentityProblem::BadCa { index, detail: e.to_string() });
                }
                Ok((_, c)) if !LeafValidity::from_parsed(&c).contains(now_secs) => {}
                Ok(_) => {
                    if let Err(e) = roots.add(cert.clone().into_owned()) {
                        unusable += 1;
                        problems.push(IdentityProblem::BadCa { index, detail: e.to_string() });
                    }
                }
            }
        }
        if roots.is_empty() {
            if unusable < bundle.len() || bundle.is_empty() {
                problems.push(IdentityProblem::NoValidCa);
            }
        } else if let Some(p) = chain_problem(leaf, &cert_chain[1..], roots, &provider, {
            // An expired (or early) leaf is reported above: check the chain inside its window.
            let at = if validity.contains(now_secs) { now_secs } else { validity.not_before };
            UnixTime::since_unix_epoch(Duration::from_secs(u64::try_from(at).unwrap_or(0)))
        }) {
            problems.push(p);
        }
    }
    if problems.is_empty() { Ok(validity) } else { Err(problems) }
}

/// Whether `leaf` chains to `roots` at `at` as the dialing side of a handshake checks it
/// (webpki, no DNS name: the SPIFFE id is the name).
pub(crate) fn server_chain(
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    roots: &RootCertStore,
    provider: &CryptoProvider,
    at: UnixTime,
) -> Result<(), rustls::Error> {
    ParsedCertificate::try_from(leaf).and_then(|parsed| {
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            roots,
            intermediates,
            at,
            provider.signature_verification_algorithms.all,
        )
    })
}

/// Whether `leaf` chains to `roots` at `at` as both sides of a handshake check it.
fn chain_problem(
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    roots: RootCertStore,
    provider: &Arc<CryptoProvider>,
    at: UnixTime,
) -> Option<IdentityProblem> {
    let roots = Arc::new(roots);
    let server = server_chain(leaf, intermediates, &roots, provider, at);
    let client = server.and_then(|()| {
        let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        verifier.verify_client_cert(leaf, intermediates, at).map(|_| ())
    });
    match client {
        Ok(()) => None,
        Err(rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        )) => Some(IdentityProblem::NotSignedByCa),
        Err(e) => Some(IdentityProblem::Chain(e.to_string())),
    }
}

fn spiffe_uris(cert: &X509Certificate<'_>) -> Vec<String> {
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) if u.starts_with(SpiffeId::SCHEME) => Some((*u).to_owned()),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use fedgate_discovery::model::ClusterId;

    use super::*;
    use crate::testing::TestPki;

    fn at(secs: u64) -> UnixTime {
        UnixTime::since_unix_epoch(Duration::from_secs(secs))
    }

    /// Now-ish: after rcgen's default notBefore (1975) and before its notAfter (4096). (In
    /// 1970, the "not yet valid" case, the test CA is not valid yet either.)
    const NOW: u64 = 1_700_000_000;

    #[test]
    fn own_identity_scenarios() {
        let pki = TestPki::new("demo");
        let foreign = pki.foreign_ca();
        let east = id("east");
        let good = pki.issue("east");
        let other_key = Identity { key: pki.issue("east").key, ..good.clone() };
        let mut foreign_leaf = foreign.issue("east");
        foreign_leaf.ca = vec![pki.ca_cert()];
        let mut two_cas = pki.issue("east");
        two_cas.ca = vec![foreign.ca_cert(), pki.ca_cert()];
        let (expired, west) = (pki.issue_expired("east"), pki.issue("west"));
        let other_set = TestPki::new("other").issue("east");
        let garbage_ca =
            Identity { ca: vec![CertificateDer::from(vec![1u8, 2, 3])], ..good.clone() };

        type Want = Result<(), Vec<&'static str>>;
        let cases: Vec<(&str, &Identity, Expected<'_>, UnixTime, Want)> = vec![
            ("ok", &good, Expected::Exactly(&east), at(NOW), Ok(())),
            ("ok, any cluster of the set", &good, Expected::AnyCluster, at(NOW), Ok(())),
            ("bundle with another CA too", &two_cas, Expected::Exactly(&east), at(NOW), Ok(())),
            ("expired", &expired, Expected::Exactly(&east), at(NOW), Err(vec!["expired"])),
            (
                "not yet valid",
                &good,
                Expected::Exactly(&east),
                at(3600),
                Err(vec!["not_yet_valid", "no_valid_ca"]),
            ),
            ("wrong SAN", &west, Expected::Exactly(&east), at(NOW), Err(vec!["wrong_name"])),
            (
                "other clusterset",
                &other_set,
                Expected::AnyCluster,
                at(NOW),
                Err(vec!["wrong_name"]),
            ),
            ("wrong key", &other_key, Expected::Exactly(&east), at(NOW), Err(vec!["key_mismatch"])),
            (
                "foreign CA",
                &foreign_leaf,
                Expected::Exactly(&east),
                at(NOW),
                Err(vec!["unknown_ca"]),
            ),
            ("garbage CA", &garbage_ca, Expected::Exactly(&east), at(NOW), Err(vec!["bad_ca"])),
            (
                "everything expired",
                &good,
                Expected::Exactly(&east),
                at(4_200_000_000_000),
                Err(vec!["expired", "no_valid_ca"]),
            ),
        ];
        for (name, identity, expected, now, want) in cases {
            let got = check_identity(
                &identity.cert_chain,
                Some(&identity.key),
                Some(&identity.ca),
                "demo",
                expected,
                now,
            );
            match (got, want) {
                (Ok(_), Ok(())) => {}
                (Err(got), Err(want)) => {
                    let reasons: Vec<&str> = got.iter().map(IdentityProblem::reason).collect();
                    assert_eq!(reasons, want, "{name}: {got:?}");
                }
                (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn problems_name_the_files() {
        let pki = TestPki::new("demo");
        let expired = pki.issue_expired("east");
        let problems = check_identity(
            &expired.cert_chain,
            Some(&pki.issue("east").key),
            Some(&expired.ca),
            "demo",
            Expected::Exactly(&id("west")),
            at(NOW),
        )
        .expect_err("three problems");
        let names = PartNames {
            cert: "/tls/west.crt".into(),
            key: "/tls/west.key".into(),
            ca: "/tls/ca.crt".into(),
        };
        let text = IdentityProblems { problems, names }.to_string();
        assert_eq!(
            text,
            "certificate /tls/west.crt expired at 2001-01-01T00:00:00Z; certificate /tls/west.crt \
             names spiffe://demo/cluster/east, expected SAN URI spiffe://demo/cluster/west; \
             /tls/west.key is not the key of /tls/west.crt"
        );
    }

    #[test]
    fn the_validity_of_a_good_leaf_is_returned() {
        let pki = TestPki::new("demo");
        let good = pki.issue_expired("east");
        let v = LeafValidity::of(&good.cert_chain[0]).expect("parses");
        assert_eq!((v.not_before, v.not_after), (946_684_800, 978_307_200));
        assert!(v.contains(950_000_000) && !v.contains(NOW as i64));
        let ok = check_identity(
            &good.cert_chain,
            None,
            None,
            "demo",
            Expected::Exactly(&id("east")),
            at(960_000_000),
        );
        assert_eq!(ok, Ok(v));
    }

    fn id(s: &str) -> ClusterId {
        ClusterId::new(s).expect("valid id")
    }
}
