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
