//! A gateway's TLS identity: certificate chain, private key and the CA bundle that peers'
//! certificates must chain to.

use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

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
