//! Dev PKI: a clusterset CA and gateway certificates (rcgen), and reading certificates back
//! (x509-parser) so `fedgate analyze` can check them.
//!
//! A gateway certificate carries the SAN URI `spiffe://<clusterset>/cluster/<id>` (what peers
//! check) and the DNS SAN `<id>.<clusterset>.fedgate` (for tools that want a DNS name), with
//! both clientAuth and serverAuth EKUs since each gateway is client and server of the tunnel.
//! The CA carries the SAN URI `spiffe://<clusterset>`, from which `certs issue` reads the
//! clusterset name.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use fedgate_discovery::model::{ClusterId, SpiffeId};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber, SignatureAlgorithm,
};
use x509_parser::extensions::GeneralName;
use x509_parser::pem::Pem;

/// File name of the CA certificate in a CA directory (and copied next to issued certs).
pub const CA_CERT_FILE: &str = "ca.crt";
/// File name of the CA private key in a CA directory.
pub const CA_KEY_FILE: &str = "ca.key";
/// Default lifetime of a CA: 365 days.
pub const DEFAULT_CA_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// Default lifetime of a gateway certificate: 90 days.
pub const DEFAULT_CERT_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);
/// How far back `not_before` is set, so peers with a slightly slow clock accept a new cert.
pub const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(5 * 60);
/// Suffix of the DNS SAN of gateway certificates: `<id>.<clusterset>.fedgate`.
pub const DNS_SAN_SUFFIX: &str = "fedgate";

/// Everything that can go wrong making or reading certificates.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("invalid clusterset name {name:?}: {reason}")]
    InvalidClusterset { name: String, reason: &'static str },
    #[error(transparent)]
    InvalidClusterId(#[from] fedgate_discovery::model::InvalidClusterId),
    #[error("validity must be longer than zero")]
    ZeroValidity,
    #[error("validity {0:?} is too long")]
    ValidityTooLong(Duration),
    #[error(
        "validity {} would make a certificate that is expired, or expires within the {} clock-skew \
         allowance, as it is issued (it starts {} in the past and would end at {not_after}); \
         pass a longer --validity (`m` is minutes, `M` months), or --allow-expired to make it anyway",
        humantime::format_duration(*validity),
        humantime::format_duration(CLOCK_SKEW_ALLOWANCE),
        humantime::format_duration(CLOCK_SKEW_ALLOWANCE)
    )]
    ExpiresTooSoon { validity: Duration, not_after: jiff::Timestamp },
    #[error("cannot generate {what}: {source}")]
    Generate { what: &'static str, source: rcgen::Error },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("{path} already exists (remove it or pass --force)")]
    Exists { path: PathBuf },
    #[error("no PEM certificate found")]
    NoCertificate,
    #[error("invalid PEM certificate: {0}")]
    Parse(String),
    #[error("invalid private key: {0}")]
    Key(String),
    #[error("the CA certificate names no clusterset (no spiffe:// URI SAN); pass --clusterset")]
    NoClusterset,
}

/// The key algorithm of a new certificate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum KeyType {
    /// ECDSA on P-256 with SHA-256.
    #[default]
    EcdsaP256,
    /// ECDSA on P-384 with SHA-384.
    EcdsaP384,
    /// Ed25519.
    Ed25519,
}

impl KeyType {
    fn algorithm(self) -> &'static SignatureAlgorithm {
        match self {
            KeyType::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyType::EcdsaP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            KeyType::Ed25519 => &rcgen::PKCS_ED25519,
        }
    }
}

/// How to make a certificate.
#[derive(Clone, Debug)]
pub struct CertOptions {
    /// Lifetime from `not_before`.
    pub validity: Duration,
    pub key_type: KeyType,
    /// Start of validity; `None` = now minus [`CLOCK_SKEW_ALLOWANCE`]. Tests set it in the
    /// past to make expired certificates: an explicit start is taken as given.
    pub not_before: Option<jiff::Timestamp>,
    /// Make the certificate even when the default window ends within
    /// [`CLOCK_SKEW_ALLOWANCE`] of now (`--allow-expired`); otherwise that is
    /// [`CertError::ExpiresTooSoon`].
    pub allow_expired: bool,
}

impl CertOptions {
    pub fn new(validity: Duration) -> Self {
        Self { validity, key_type: KeyType::default(), not_before: None, allow_expired: false }
    }
}

/// Whether a certificate valid until `not_after` is expired at `now`, or expires within the
/// [`CLOCK_SKEW_ALLOWANCE`] (a peer whose clock runs that far ahead refuses it already). Pure.
pub fn expires_too_soon(not_after: jiff::Timestamp, now: jiff::Timestamp) -> bool {
    let skew = jiff::SignedDuration::try_from(CLOCK_SKEW_ALLOWANCE).unwrap_or_default();
    now.checked_add(skew).is_ok_and(|limit| not_after <= limit)
}

/// A certificate and its private key, both PEM.
#[derive(Clone, Debug)]
pub struct CertPair {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Checks a clusterset name: it is the SPIFFE trust domain
/// ([`SpiffeId::check_trust_domain`]).
pub fn check_clusterset(name: &str) -> Result<(), CertError> {
    SpiffeId::check_trust_domain(name)
        .map_err(|reason| CertError::InvalidClusterset { name: name.to_owned(), reason })
}

fn validity_window(
    opts: &CertOptions,
) -> Result<(time::OffsetDateTime, time::OffsetDateTime), CertError> {
    if opts.validity.is_zero() {
        return Err(CertError::ZeroValidity);
    }
    let now = jiff::Timestamp::now();
    let start = match opts.not_before {
        Some(ts) => ts,
        None => now
            .checked_sub(
                jiff::SignedDuration::try_from(CLOCK_SKEW_ALLOWANCE)
                    .map_err(|_| CertError::ZeroValidity)?,
            )
            .map_err(|_| CertError::ValidityTooLong(opts.validity))?,
    };
    let validity = jiff::SignedDuration::try_from(opts.validity)
        .map_err(|_| CertError::ValidityTooLong(opts.validity))?;
    let end = start.checked_add(validity).map_err(|_| CertError::ValidityTooLong(opts.validity))?;
    if opts.not_before.is_none() && !opts.allow_expired && expires_too_soon(end, now) {
        return Err(CertError::ExpiresTooSoon { validity: opts.validity, not_after: end });
    }
    let conv = |ts: jiff::Timestamp| {
        time::OffsetDateTime::from_unix_timestamp(ts.as_second())
            .map_err(|_| CertError::ValidityTooLong(opts.validity))
    };
    Ok((conv(start)?, conv(end)?))
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // A positive DER integer without a leading zero byte.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    SerialNumber::from_slice(&bytes)
}

fn san_uri(uri: String) -> Result<SanType, CertError> {
    let value = uri
        .try_into()
        .map_err(|e| CertError::Generate { what: "subject alternative name", source: e })?;
    Ok(SanType::URI(value))
}

fn san_dns(name: String) -> Result<SanType, CertError> {
    let value = name
        .try_into()
        .map_err(|e| CertError::Generate { what: "subject alternative name", source: e })?;
    Ok(SanType::DnsName(value))
}

/// A new key (`what` names it in errors) and the parameters every certificate made here
/// shares: `opts`' validity window, a random serial, organization `fedgate` and `common_name`.
fn key_and_params(
    opts: &CertOptions,
    what: &'static str,
    common_name: String,
) -> Result<(KeyPair, CertificateParams), CertError> {
    let key = KeyPair::generate_for(opts.key_type.algorithm())
        .map_err(|source| CertError::Generate { what, source })?;
    let mut params = CertificateParams::default();
    let (not_before, not_after) = validity_window(opts)?;
    params.not_before = not_before;
    params.not_after = not_after;
    params.serial_number = Some(random_serial());
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "fedgate");
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    Ok((key, params))
}

/// Makes a self-signed clusterset CA.
pub fn create_ca(clusterset: &str, opts: &CertOptions) -> Result<CertPair, CertError> {
    check_clusterset(clusterset)?;
    let (key, mut params) = key_and_params(opts, "CA key", format!("fedgate {clusterset} CA"))?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.subject_alt_names = vec![san_uri(SpiffeId::trust_domain_uri(clusterset))?];
    let cert = params
        .self_signed(&key)
        .map_err(|source| CertError::Generate { what: "CA certificate", source })?;
    Ok(CertPair { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

/// Issues a gateway certificate for `cluster`, signed by `ca`. The clusterset defaults to
/// the one the CA names.
pub fn issue(
    ca: &CertPair,
    clusterset: Option<&str>,
    cluster: &ClusterId,
    opts: &CertOptions,
) -> Result<CertPair, CertError> {
    let ca_key = KeyPair::from_pem(&ca.key_pem).map_err(|e| CertError::Key(e.to_string()))?;
    let ca_info = inspect(&ca.cert_pem)?;
    if !key_matches(&ca_info, &ca.key_pem)? {
        return Err(CertError::Key("the CA key does not belong to the CA certificate".to_owned()));
    }
    let clusterset = match clusterset {
        Some(c) => c.to_owned(),
        None => ca_info.clusterset().ok_or(CertError::NoClusterset)?,
    };
    check_clusterset(&clusterset)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key)
        .map_err(|source| CertError::Generate { what: "issuer from the CA certificate", source })?;

    let (key, mut params) =
        key_and_params(opts, "gateway key", format!("{cluster}.{clusterset}.{DNS_SAN_SUFFIX}"))?;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages =
        vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    params.subject_alt_names = vec![
        san_uri(SpiffeId::new(clusterset.as_str(), cluster.clone()).to_string())?,
        san_dns(format!("{cluster}.{clusterset}.{DNS_SAN_SUFFIX}"))?,
    ];
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|source| CertError::Generate { what: "gateway certificate", source })?;
    Ok(CertPair { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

/// What `inspect` finds in a certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    pub subject: String,
    pub issuer: String,
    /// URI SANs that start with `spiffe://`.
    pub spiffe_ids: Vec<String>,
    pub dns_names: Vec<String>,
    pub not_before: jiff::Timestamp,
    pub not_after: jiff::Timestamp,
    pub is_ca: bool,
    /// DER SubjectPublicKeyInfo, to match a private key.
    pub public_key_der: Vec<u8>,
    /// The whole certificate, DER.
    pub der: Vec<u8>,
}

impl CertInfo {
    /// The clusterset a CA names with its `spiffe://<clusterset>` SAN, or a gateway cert
    /// with `spiffe://<clusterset>/cluster/<id>`.
    pub fn clusterset(&self) -> Option<String> {
        self.spiffe_ids.iter().find_map(|id| SpiffeId::trust_domain_of(id).map(str::to_owned))
    }

    /// Whether `at` lies inside the validity window.
    pub fn valid_at(&self, at: jiff::Timestamp) -> bool {
        self.not_before <= at && at <= self.not_after
    }
}

/// Reads the first certificate of a PEM text.
pub fn inspect(pem: &str) -> Result<CertInfo, CertError> {
    inspect_all(pem)?.into_iter().next().ok_or(CertError::NoCertificate)
}

/// Reads every certificate of a PEM text (a chain or a bundle). Non-certificate PEM blocks
/// are skipped.
pub fn inspect_all(pem: &str) -> Result<Vec<CertInfo>, CertError> {
    let mut out = Vec::new();
    for block in Pem::iter_from_buffer(pem.as_bytes()) {
        let block = block.map_err(|e| CertError::Parse(e.to_string()))?;
        if block.label != "CERTIFICATE" {
            continue;
        }
        let cert = block.parse_x509().map_err(|e| CertError::Parse(e.to_string()))?;
        let mut spiffe_ids = Vec::new();
        let mut dns_names = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::URI(uri) if uri.starts_with(SpiffeId::SCHEME) => {
                        spiffe_ids.push((*uri).to_owned())
                    }
                    GeneralName::DNSName(dns) => dns_names.push((*dns).to_owned()),
                    _ => {}
                }
            }
        }
        let ts = |t: x509_parser::time::ASN1Time| {
            jiff::Timestamp::from_second(t.timestamp())
                .map_err(|e| CertError::Parse(format!("validity out of range: {e}")))
        };
        out.push(CertInfo {
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            spiffe_ids,
            dns_names,
            not_before: ts(cert.validity().not_before)?,
            not_after: ts(cert.validity().not_after)?,
            is_ca: cert.is_ca(),
            public_key_der: cert.public_key().raw.to_vec(),
            der: block.contents.clone(),
        });
    }
    if out.is_empty() {
        return Err(CertError::NoCertificate);
    }
    Ok(out)
}

/// Whether the private key in `key_pem` belongs to the certificate.
pub fn key_matches(cert: &CertInfo, key_pem: &str) -> Result<bool, CertError> {
    use rcgen::PublicKeyData;
    let key = KeyPair::from_pem(key_pem).map_err(|e| CertError::Key(e.to_string()))?;
    Ok(key.subject_public_key_info() == cert.public_key_der)
}

/// Whether `cert` carries a valid signature by `issuer`'s key.
pub fn signed_by(cert: &CertInfo, issuer: &CertInfo) -> bool {
    use x509_parser::prelude::FromDer;
    let Ok((_, c)) = x509_parser::certificate::X509Certificate::from_der(&cert.der) else {
        return false;
    };
    let Ok((_, i)) = x509_parser::certificate::X509Certificate::from_der(&issuer.der) else {
        return false;
    };
    c.verify_signature(Some(i.public_key())).is_ok()
}

fn read(path: &Path) -> Result<String, CertError> {
    fs::read_to_string(path).map_err(|source| CertError::Read { path: path.to_owned(), source })
}

/// Writes `contents` to `path`; keys get mode 0600 from the moment they exist.
fn write_file(path: &Path, contents: &str, private: bool, force: bool) -> Result<(), CertError> {
    if !force && path.exists() {
        return Err(CertError::Exists { path: path.to_owned() });
    }
    let wrap = |source| CertError::Write { path: path.to_owned(), source };
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    options.mode(if private { 0o600 } else { 0o644 });
    let mut file = options.open(path).map_err(wrap)?;
    // `mode` applies only when the file is created; an overwritten key is tightened too.
    if private {
        file.set_permissions(fs::Permissions::from_mode(0o600)).map_err(wrap)?;
    }
    file.write_all(contents.as_bytes()).map_err(wrap)?;
    file.sync_all().map_err(wrap)
}

fn ensure_dir(dir: &Path) -> Result<(), CertError> {
    fs::create_dir_all(dir).map_err(|source| CertError::Write { path: dir.to_owned(), source })
}

/// Writes a CA as `ca.crt` and `ca.key` (0600) into `dir`, creating it. Returns the paths.
pub fn write_ca(dir: &Path, ca: &CertPair, force: bool) -> Result<Vec<PathBuf>, CertError> {
    ensure_dir(dir)?;
    let cert = dir.join(CA_CERT_FILE);
    let key = dir.join(CA_KEY_FILE);
    write_pair(&cert, &key, ca, force)?;
    Ok(vec![cert, key])
}

/// Writes `pair` as `cert` and `key` (0600); unless `force`, neither may exist yet.
fn write_pair(cert: &Path, key: &Path, pair: &CertPair, force: bool) -> Result<(), CertError> {
    for p in [cert, key] {
        if !force && p.exists() {
            return Err(CertError::Exists { path: p.to_owned() });
        }
    }
    write_file(key, &pair.key_pem, true, force)?;
    write_file(cert, &pair.cert_pem, false, force)
}

/// Reads the CA written by [`write_ca`] from `dir`.
pub fn read_ca(dir: &Path) -> Result<CertPair, CertError> {
    Ok(CertPair {
        cert_pem: read(&dir.join(CA_CERT_FILE))?,
        key_pem: read(&dir.join(CA_KEY_FILE))?,
    })
}

/// Writes a gateway certificate as `<id>.crt`, `<id>.key` (0600) and a copy of the CA
/// certificate as `ca.crt` into `dir`, creating it. Returns the paths.
pub fn write_issued(
    dir: &Path,
    cluster: &ClusterId,
    pair: &CertPair,
    ca_cert_pem: &str,
    force: bool,
) -> Result<Vec<PathBuf>, CertError> {
    ensure_dir(dir)?;
    let cert = dir.join(format!("{cluster}.crt"));
    let key = dir.join(format!("{cluster}.key"));
    let ca = dir.join(CA_CERT_FILE);
    write_pair(&cert, &key, pair, force)?;
    // The CA dir itself may be `dir`: its ca.crt is the same file, leave it be.
    let same_ca = fs::read_to_string(&ca).is_ok_and(|existing| existing == ca_cert_pem);
    if !same_ca {
        write_file(&ca, ca_cert_pem, false, true)?;
    }
    Ok(vec![cert, key, ca])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> ClusterId {
        ClusterId::new(s).expect("valid id")
    }

    #[test]
    fn ca_and_leaf_have_the_promised_shape() {
        for key_type in [KeyType::EcdsaP256, KeyType::EcdsaP384, KeyType::Ed25519] {
            let opts = CertOptions { key_type, ..CertOptions::new(DEFAULT_CA_VALIDITY) };
            let ca = create_ca("demo", &opts).expect("ca");
            let ca_info = inspect(&ca.cert_pem).expect("ca parses");
            assert!(ca_info.is_ca);
            assert_eq!(ca_info.clusterset().as_deref(), Some("demo"));
            assert!(key_matches(&ca_info, &ca.key_pem).expect("key parses"));

            let leaf = issue(
                &ca,
                None,
                &id("east"),
                &CertOptions { key_type, ..CertOptions::new(DEFAULT_CERT_VALIDITY) },
            )
            .expect("leaf");
            let info = inspect(&leaf.cert_pem).expect("leaf parses");
            assert!(!info.is_ca);
            assert_eq!(info.spiffe_ids, vec!["spiffe://demo/cluster/east".to_owned()]);
            assert_eq!(info.dns_names, vec!["east.demo.fedgate".to_owned()]);
            assert!(info.valid_at(jiff::Timestamp::now()));
            let days = (info.not_after.as_second() - info.not_before.as_second()) / 86_400;
            assert_eq!(days, 90);
            assert!(signed_by(&info, &ca_info), "{key_type:?}: leaf verifies against the CA");
            assert!(!signed_by(&ca_info, &info));
            assert!(key_matches(&info, &leaf.key_pem).expect("key parses"));
            assert!(!key_matches(&info, &ca.key_pem).expect("key parses"));
        }
    }

    #[test]
    fn explicit_clusterset_and_bad_inputs() {
        let ca = create_ca("demo", &CertOptions::new(DEFAULT_CA_VALIDITY)).expect("ca");
        let leaf = issue(&ca, Some("other"), &id("west"), &CertOptions::new(DEFAULT_CERT_VALIDITY))
            .expect("leaf");
        assert_eq!(
            inspect(&leaf.cert_pem).expect("parses").spiffe_ids,
            vec!["spiffe://other/cluster/west".to_owned()]
        );

        let err =
            create_ca("Demo Set", &CertOptions::new(DEFAULT_CA_VALIDITY)).expect_err("bad name");
        assert!(err.to_string().starts_with("invalid clusterset name \"Demo Set\""), "{err}");
        let err = create_ca("demo", &CertOptions::new(Duration::ZERO)).expect_err("zero validity");
        assert_eq!(err.to_string(), "validity must be longer than zero");
        assert!(matches!(inspect("not pem at all"), Err(CertError::NoCertificate)));
        assert!(matches!(inspect(&ca.key_pem), Err(CertError::NoCertificate)));
        let wrong = CertPair { cert_pem: ca.cert_pem.clone(), key_pem: leaf.key_pem.clone() };
        let err = issue(&wrong, None, &id("x"), &CertOptions::new(DEFAULT_CERT_VALIDITY))
            .expect_err("mismatch");
        assert_eq!(
            err.to_string(),
            "invalid private key: the CA key does not belong to the CA certificate"
        );
    }

    #[test]
    fn expired_certificates_can_be_made_for_tests() {
        let ca = create_ca("demo", &CertOptions::new(DEFAULT_CA_VALIDITY)).expect("ca");
        let past = jiff::Timestamp::from_second(1_600_000_000).expect("timestamp");
        let opts =
            CertOptions { not_before: Some(past), ..CertOptions::new(Duration::from_secs(3600)) };
        let leaf = issue(&ca, None, &id("east"), &opts).expect("leaf");
        let info = inspect(&leaf.cert_pem).expect("parses");
        assert_eq!(info.not_after.as_second(), 1_600_003_600);
        assert!(!info.valid_at(jiff::Timestamp::now()));
    }

    #[test]
    fn a_certificate_expired_when_issued_is_refused_unless_allowed() {
        let ca = create_ca("demo", &CertOptions::new(DEFAULT_CA_VALIDITY)).expect("ca");
        let east = id("east");
        let minutes = |m: u64| CertOptions::new(Duration::from_secs(m * 60));
        // (validity in minutes, allow_expired, issued?)
        let table = [(1, false, false), (10, false, false), (11, false, true), (1, true, true)];
        for (m, allow, ok) in table {
            let opts = CertOptions { allow_expired: allow, ..minutes(m) };
            match issue(&ca, None, &east, &opts) {
                Ok(pair) => {
                    assert!(ok, "{m}m allow={allow} was issued");
                    let info = inspect(&pair.cert_pem).expect("parses");
                    assert_eq!(
                        expires_too_soon(info.not_after, jiff::Timestamp::now()),
                        m <= 10,
                        "{m}m"
                    );
                }
                Err(e) => {
                    assert!(!ok, "{m}m allow={allow}: {e}");
                    let text = e.to_string();
                    assert!(
                        text.starts_with("validity 1m would make a certificate that is expired")
                            || text.starts_with("validity 10m would"),
                        "{text}"
                    );
                    assert!(text.contains("--allow-expired"), "{text}");
                }
            }
        }
        assert!(matches!(create_ca("demo", &minutes(1)), Err(CertError::ExpiresTooSoon { .. })));
    }

    #[test]
    fn files_are_written_with_private_keys_0600() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = create_ca("demo", &CertOptions::new(DEFAULT_CA_VALIDITY)).expect("ca");
        write_ca(dir.path(), &ca, false).expect("write ca");
        let mode =
            fs::metadata(dir.path().join(CA_KEY_FILE)).expect("key").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(write_ca(dir.path(), &ca, false), Err(CertError::Exists { .. })));
        let back = read_ca(dir.path()).expect("read back");
        assert_eq!(back.cert_pem, ca.cert_pem);

        let leaf = issue(&back, None, &id("east"), &CertOptions::new(DEFAULT_CERT_VALIDITY))
            .expect("leaf");
        let out = dir.path().join("east");
        let paths =
            write_issued(&out, &id("east"), &leaf, &ca.cert_pem, false).expect("write leaf");
        assert_eq!(paths, vec![out.join("east.crt"), out.join("east.key"), out.join("ca.crt")]);
        let mode = fs::metadata(out.join("east.key")).expect("key").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Issuing into the CA directory itself leaves its ca.crt alone.
        write_issued(dir.path(), &id("east"), &leaf, &ca.cert_pem, false).expect("into ca dir");
        assert_eq!(fs::read_to_string(dir.path().join(CA_CERT_FILE)).expect("ca"), ca.cert_pem);
    }
}
