//! Checks of the files a config names (certificate, key, CA bundle, file-source directory,
//! kubeconfig), as they are now. The value rules are in [`super::rules`].

use std::path::Path;
use std::time::Duration;

use fedgate_tunnel::identity::{IdentityPart, PartNames, check_identity};
use fedgate_tunnel::tls::Expected;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};

use super::{CaSource, ConfigError, FileInputs, Locator, SourceKind};
use crate::certs;

/// Reads the certificate, key and CA bundle (each unreadable one is an error of its own),
/// then checks what did read with [`check_identity`], the check a reload applies too.
fn identity_files(config: &FileInputs, loc: &Locator, now: jiff::Timestamp) -> Vec<ConfigError> {
    let mut out = Vec::new();
    // A path still empty is a default named after the id: checked once the id is known.
    let pending = |p: &Path| p.as_os_str().is_empty();
    let certs = |path: &Path, what: &str| {
        read_pem(path, what).and_then(|pem| {
            certs::inspect_all(&pem)
                .map(|all| all.into_iter().map(|c| CertificateDer::from(c.der)).collect::<Vec<_>>())
                .map_err(|e| format!("{}: {e}", path.display()))
        })
    };
    let chain = match certs(&config.tls.cert, "certificate") {
        _ if pending(&config.tls.cert) => None,
        Err(msg) => {
            out.push(loc.error("tls.cert", msg));
            None
        }
        Ok(chain) => Some(chain),
    };
    let key = match read_pem(&config.tls.key, "private key") {
        _ if pending(&config.tls.key) => None,
        Err(msg) => {
            out.push(loc.error("tls.key", msg));
            None
        }
        Ok(pem) => match PrivateKeyDer::from_pem_slice(pem.as_bytes()) {
            Err(e) => {
                let file = config.tls.key.display();
                out.push(loc.error("tls.key", format!("{file}: invalid private key: {e}")));
                None
            }
            Ok(key) => Some(key),
        },
    };
    // `system` is refused by the rules; there is no bundle to check then.
    let ca_path = match &config.tls.ca {
        CaSource::File(path) => Some(path),
        CaSource::System => None,
    };
    let ca = ca_path.and_then(|path| match certs(path, "CA bundle") {
        Err(msg) => {
            out.push(loc.error("tls.ca", msg));
            None
        }
        Ok(bundle) => Some(bundle),
    });
    let Some(chain) = chain else { return out };
    let names = PartNames {
        cert: config.tls.cert.display().to_string(),
        key: config.tls.key.display().to_string(),
        ca: ca_path.map_or_else(|| "tls.ca".to_owned(), |p| p.display().to_string()),
    };
    // Without the id (kube source, id from the ClusterProperty) the certificate must name some
    // cluster of the clusterset; the exact id is checked once it is known.
    let expected = config.id.as_ref().map_or(Expected::AnyCluster, Expected::Exactly);
    let at = UnixTime::since_unix_epoch(Duration::from_secs(
        u64::try_from(now.as_second()).unwrap_or(0),
    ));
    let checked =
        check_identity(&chain, key.as_ref(), ca.as_deref(), &config.clusterset, expected, at);
    for problem in checked.err().unwrap_or_default() {
        let field = match problem.part() {
            IdentityPart::Cert => "tls.cert",
            IdentityPart::Key => "tls.key",
            IdentityPart::Ca => "tls.ca",
        };
        out.push(loc.error(field, problem.describe(&names)));
    }
    out
}

fn read_pem(path: &Path, what: &str) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {what} {}: {e}", path.display()))
}

/// Checks the files the config names, as they are at `now`.
pub(crate) fn files(config: &FileInputs, loc: &Locator, now: jiff::Timestamp) -> Vec<ConfigError> {
    let mut out = identity_files(config, loc, now);
    if config.discovery.source == SourceKind::File && !config.discovery.file.dir.is_dir() {
        out.push(loc.error(
            "discovery.file.dir",
            format!("{} is not a directory", config.discovery.file.dir.display()),
        ));
    }
    if let Some(kubeconfig) = &config.discovery.kube.kubeconfig
        && config.discovery.source == SourceKind::Kube
        && !kubeconfig.is_file()
    {
        out.push(
            loc.error(
                "discovery.kube.kubeconfig",
                format!("{} is not a file", kubeconfig.display()),
            ),
        );
    }
    out.sort_by(|a, b| (a.line, a.column, &a.path).cmp(&(b.line, b.column, &b.path)));
    out
}
