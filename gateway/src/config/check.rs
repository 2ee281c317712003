//! Checks of the files a config names (certificate, key, CA bundle, file-source directory,
//! kubeconfig), as they are now. The value rules are in [`super::rules`].

use std::path::Path;

use super::{CaSource, ConfigError, FileInputs, Locator, SourceKind};
use crate::certs::{self, CertInfo};

fn read_pem(path: &Path, what: &str) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {what} {}: {e}", path.display()))
}

/// Checks the files the config names, as they are at `now`.
pub(crate) fn files(config: &FileInputs, loc: &Locator, now: jiff::Timestamp) -> Vec<ConfigError> {
    let mut out = Vec::new();
    // Without the id (kube source, id from the ClusterProperty) the certificate must name some
    // cluster of the clusterset; the exact id is checked once it is known.
    let (want, any_cluster) = match &config.id {
        Some(id) => (certs::spiffe_id(&config.clusterset, id.as_str()), false),
        None => (certs::spiffe_id(&config.clusterset, ""), true),
    };
    let names_it = |s: &String| if any_cluster { s.starts_with(&want) } else { *s == want };
    let expected = if any_cluster { format!("{want}<cluster id>") } else { want.clone() };
    // A path still empty is a default named after the id: checked once the id is known.
    let pending = |p: &Path| p.as_os_str().is_empty();

    let leaf: Option<CertInfo> = match read_pem(&config.tls.cert, "certificate") {
        _ if pending(&config.tls.cert) => None,
        Err(msg) => {
            out.push(loc.error("tls.cert", msg));
            None
        }
        Ok(pem) => match certs::inspect(&pem) {
            Err(e) => {
                out.push(loc.error("tls.cert", format!("{}: {e}", config.tls.cert.display())));
                None
            }
            Ok(info) => {
                let file = config.tls.cert.display();
                if now > info.not_after {
                    out.push(loc.error(
                        "tls.cert",
                        format!("certificate {file} expired at {}", info.not_after),
                    ));
                } else if now < info.not_before {
                    out.push(loc.error(
                        "tls.cert",
                        format!("certificate {file} is not valid before {}", info.not_before),
                    ));
                }
                if !info.spiffe_ids.iter().any(names_it) {
                    let found = if info.spiffe_ids.is_empty() {
                        "no spiffe:// URI SAN".to_owned()
                    } else {
                        info.spiffe_ids.join(", ")
                    };
                    out.push(loc.error(
                        "tls.cert",
                        format!("certificate {file} names {found}, expected SAN URI {expected}"),
                    ));
                }
                Some(info)
            }
        },
    };

    match read_pem(&config.tls.key, "private key") {
        _ if pending(&config.tls.key) => {}
        Err(msg) => out.push(loc.error("tls.key", msg)),
        Ok(pem) => match &leaf {
            Some(info) => match certs::key_matches(info, &pem) {
                Ok(true) => {}
                Ok(false) => out.push(loc.error(
                    "tls.key",
                    format!(
                        "{} is not the key of {}",
                        config.tls.key.display(),
                        config.tls.cert.display()
                    ),
                )),
                Err(e) => {
                    out.push(loc.error("tls.key", format!("{}: {e}", config.tls.key.display())))
                }
            },
            None => {
                if let Err(e) = rcgen::KeyPair::from_pem(&pem) {
                    out.push(loc.error(
                        "tls.key",
                        format!("{}: invalid private key: {e}", config.tls.key.display()),
                    ));
                }
            }
        },
    }

    if let CaSource::File(ca_path) = &config.tls.ca {
        match read_pem(ca_path, "CA bundle").and_then(|pem| {
            certs::inspect_all(&pem).map_err(|e| format!("{}: {e}", ca_path.display()))
        }) {
            Err(msg) => out.push(loc.error("tls.ca", msg)),
            Ok(cas) => {
                let usable: Vec<&CertInfo> = cas.iter().filter(|c| c.valid_at(now)).collect();
                if usable.is_empty() {
                    out.push(loc.error(
                        "tls.ca",
                        format!(
                            "no certificate in {} is valid now (all expired or not yet valid)",
                            ca_path.display()
                        ),
                    ));
                } else if let Some(info) = &leaf
                    && !usable.iter().any(|ca| certs::signed_by(info, ca))
                {
                    out.push(loc.error(
                        "tls.cert",
                        format!(
                            "certificate {} is not signed by any CA in {}",
                            config.tls.cert.display(),
                            ca_path.display()
                        ),
                    ));
                }
            }
        }
    }

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
