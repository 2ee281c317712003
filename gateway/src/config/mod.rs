//! The gateway's configuration: a YAML file (schema in DESIGN.md, reference in
//! `docs/configuration.md`), parsed into [`Config`].
//!
//! Parsing reports *every* problem, each as `file:line:col: field.path: message`: each
//! top-level section is deserialized on its own from a span-aware YAML tree (see [`yaml`]),
//! an offending node is dropped and the section retried, and then the semantic rules run
//! over whatever did parse. [`parse`] is pure; [`load`] reads the file and also checks the
//! files the config names (certificates, key, CA, file-source directory).
//!
//! With `discovery.source: kube`, `cluster.id` may be left out: the cluster id is then the
//! ClusterProperty `cluster.clusterset.k8s.io` (KEP-2149), which only the gateway can read.
//! [`load`] returns such a config as [`Loaded::NeedsClusterId`] (its kubeconfig resolved, so
//! the caller can read the ClusterProperty), and [`PendingConfig::with_cluster_id`] finishes
//! it: the id goes in as a default before anything is derived from it (TLS file names, the
//! certificate's SPIFFE id, the peer-is-own-id check), exactly as if the file had named it.

mod check;
mod rules;
mod traffic;
mod types;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

pub use traffic::*;
pub use types::*;

use fedgate_discovery::model::ClusterId;

use fedgate_discovery::yaml::{self, DeError, Kind, Mark, Node, Partial};

/// One problem in a config file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The file as named by the caller.
    pub file: PathBuf,
    /// 1-based line; 0 when the problem has no place in the file (it could not be read).
    pub line: usize,
    /// 1-based column; 0 when `line` is 0.
    pub column: usize,
    /// Dotted field path (`traffic.healthCheck.interval`, `peers[1].id`); empty for the
    /// document as a whole.
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        if !self.path.is_empty() {
            write!(f, ": {}", self.path)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every problem found in a config file, in file order. Never empty.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl ConfigErrors {
    pub fn iter(&self) -> impl Iterator<Item = &ConfigError> {
        self.0.iter()
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Turns field paths into positions in the file: the node's own position if the field is
/// in the file, else that of its nearest ancestor that is (a defaulted field points at its
/// section, or at the top of the file).
pub(crate) struct Locator {
    file: PathBuf,
    marks: BTreeMap<String, Mark>,
}

impl Locator {
    pub(crate) fn error(&self, path: &str, message: impl Into<String>) -> ConfigError {
        let mut probe = path;
        let mark = loop {
            if let Some(m) = self.marks.get(probe) {
                break *m;
            }
            match probe.rfind(['.', '[']) {
                Some(i) => probe = &probe[..i],
                None => break Mark::START,
            }
        };
        ConfigError {
            file: self.file.clone(),
            line: mark.line,
            column: mark.column,
            path: path.to_owned(),
            message: message.into(),
        }
    }

    fn de_error(&self, e: DeError) -> ConfigError {
        let (mark, path) = match e.at {
            Some((_, mark, path)) => (mark, path),
            None => (Mark::START, String::new()),
        };
        ConfigError {
            file: self.file.clone(),
            line: mark.line,
            column: mark.column,
            path,
            message: e.message,
        }
    }
}

/// The top-level sections, in schema order.
const SECTIONS: [&str; 9] =
    ["cluster", "discovery", "peers", "tls", "tunnel", "dns", "front", "admin", "traffic"];

/// What deserialized of each section: `None` when the section itself is wrong, else the
/// value with the fields that had errors at their defaults ([`Partial::reading`] tells which
/// fields a rule may still read).
#[derive(Default)]
pub(crate) struct Sections {
    pub cluster: Option<Partial<ClusterSection>>,
    pub discovery: Option<Partial<DiscoveryConfig>>,
    /// Each peer that parsed, with its index in the file (entries with errors are left
    /// out, so indexes can have gaps).
    pub peers: Option<Vec<(usize, PeerConfig)>>,
    /// Whether every peer entry parsed.
    pub peers_clean: bool,
    /// `cluster.id` when it is valid, even if the rest of `cluster` is not; else the id the
    /// caller supplied (from the ClusterProperty).
    pub cluster_id: Option<ClusterId>,
    pub tls: Option<Partial<TlsConfig>>,
    pub tunnel: Option<Partial<TunnelConfig>>,
    pub dns: Option<Partial<DnsConfig>>,
    pub front: Option<Partial<FrontConfig>>,
    pub admin: Option<Partial<AdminConfig>>,
    pub traffic: Option<Partial<TrafficConfig>>,
}

/// A config file that parsed and passed its checks.
#[derive(Clone, Debug, PartialEq)]
pub enum Loaded {
    /// Everything is known.
    Complete(Box<Config>),
    /// `discovery.source: kube` without `cluster.id`: the id is to be read from the
    /// ClusterProperty `cluster.clusterset.k8s.io`, then given to
    /// [`PendingConfig::with_cluster_id`].
    NeedsClusterId(Box<PendingConfig>),
}

/// A config still waiting for its cluster id (see [`Loaded::NeedsClusterId`]).
#[derive(Clone, Debug, PartialEq)]
pub struct PendingConfig {
    path: PathBuf,
    text: String,
    /// Whether the files the config names are checked too ([`load`]) or not ([`parse_loaded`]).
    check_files: bool,
    /// `cluster.clusterset`.
    pub clusterset: String,
    /// `discovery`, paths resolved: the kubeconfig to read the ClusterProperty with.
    pub discovery: DiscoveryConfig,
}

impl PendingConfig {
    /// The complete config with `id` as `cluster.id`; every default and check that depends
    /// on the id uses it (errors name the config file, as for an id written in it).
    pub fn with_cluster_id(&self, id: &ClusterId) -> Result<Config, ConfigErrors> {
        let checks = Checks { files: self.check_files, pending: false };
        match finish(&self.path, &self.text, Some(id), checks)? {
            Loaded::Complete(config) => Ok(*config),
            // Unreachable with an id given; reported rather than assumed.
            Loaded::NeedsClusterId(_) => Err(ConfigErrors(vec![ConfigError {
                file: self.path.clone(),
                line: 0,
                column: 0,
                path: "cluster.id".to_owned(),
                message: "still unknown after the ClusterProperty was read".to_owned(),
            }])),
        }
    }
}

impl Loaded {
    /// `discovery` (paths resolved).
    pub fn discovery(&self) -> &DiscoveryConfig {
        match self {
            Loaded::Complete(c) => &c.discovery,
            Loaded::NeedsClusterId(p) => &p.discovery,
        }
    }

    /// `cluster.clusterset`.
    pub fn clusterset(&self) -> &str {
        match self {
            Loaded::Complete(c) => &c.cluster.clusterset,
            Loaded::NeedsClusterId(p) => &p.clusterset,
        }
    }

    /// The config file's own `cluster.id`, if it has one.
    pub fn configured_id(&self) -> Option<&ClusterId> {
        match self {
            Loaded::Complete(c) => Some(&c.cluster.id),
            Loaded::NeedsClusterId(_) => None,
        }
    }

    /// The complete config with `id` as its cluster id: a complete config must already name
    /// it (the caller compared them), a pending one takes it.
    pub fn with_cluster_id(self, id: &ClusterId) -> Result<Config, ConfigErrors> {
        match self {
            Loaded::Complete(c) => Ok(*c),
            Loaded::NeedsClusterId(p) => p.with_cluster_id(id),
        }
    }
}

/// Parses a config file's text. `path_for_messages` names the file in errors, and its
/// directory is the base of relative paths in the config. Checks syntax, types and the
/// cross-field rules, but touches no file: see [`load`]. `cluster.id` is required here
/// whatever the source (a kube-source config without it: [`parse_loaded`]).
pub fn parse(path_for_messages: &Path, text: &str) -> Result<Config, ConfigErrors> {
    match finish(path_for_messages, text, None, Checks { files: false, pending: false })? {
        Loaded::Complete(config) => Ok(*config),
        // `pending: false` reports a missing id instead.
        Loaded::NeedsClusterId(p) => Err(ConfigErrors(vec![ConfigError {
            file: p.path,
            line: 0,
            column: 0,
            path: "cluster".to_owned(),
            message: MISSING_ID_KUBE.to_owned(),
        }])),
    }
}

/// [`parse`], but a kube-source config without `cluster.id` is [`Loaded::NeedsClusterId`].
pub fn parse_loaded(path_for_messages: &Path, text: &str) -> Result<Loaded, ConfigErrors> {
    finish(path_for_messages, text, None, Checks { files: false, pending: true })
}

/// The message of a missing `cluster.id` with the file source.
const MISSING_ID_FILE: &str = "missing field `id` (required with discovery.source: file; with \
     `kube` the ClusterProperty cluster.clusterset.k8s.io may provide it)";
/// The message of a missing `cluster.id` where nothing can read the ClusterProperty.
const MISSING_ID_KUBE: &str = "missing field `id` (only `fedgate run` reads it from the \
     ClusterProperty cluster.clusterset.k8s.io)";

/// Reads and parses the config file at `path`, then checks the files it names: the
/// certificate (readable, unexpired, naming `spiffe://<clusterset>/cluster/<id>`), its key,
/// the CA bundle, and the file source's directory. A kube-source config without `cluster.id`
/// is [`Loaded::NeedsClusterId`]; its certificate is then only checked to name some cluster of
/// the clusterset until the id is known, and files named after the id (the default
/// `tls.cert`/`tls.key`) are checked by [`PendingConfig::with_cluster_id`].
pub fn load(path: &Path) -> Result<Loaded, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: path.to_owned(),
            line: 0,
            column: 0,
            path: String::new(),
            message: format!("cannot read config file: {e}"),
        }])
    })?;
    finish(path, &text, None, Checks { files: true, pending: true })
}

/// What [`finish`] does besides parsing.
#[derive(Clone, Copy)]
struct Checks {
    /// Check the files the config names.
    files: bool,
    /// A kube-source config without `cluster.id` is pending rather than an error.
    pending: bool,
}

/// Parses `text` with `default_id` standing in for a missing `cluster.id`, and checks what
/// `checks` asks for.
fn finish(
    path: &Path,
    text: &str,
    default_id: Option<&ClusterId>,
    checks: Checks,
) -> Result<Loaded, ConfigErrors> {
    let (parsed, files) = parse_inner(path, text, default_id, checks.pending);
    // The files are checked even when other sections have errors: all problems at once.
    let file_errors = match &files {
        Some((inputs, locator)) if checks.files => {
            check::files(inputs, locator, jiff::Timestamp::now())
        }
        _ => Vec::new(),
    };
    match parsed {
        Ok(outcome) if file_errors.is_empty() => Ok(match outcome {
            Outcome::Complete(config) => Loaded::Complete(config),
            Outcome::Pending { clusterset, discovery } => {
                Loaded::NeedsClusterId(Box::new(PendingConfig {
                    path: path.to_owned(),
                    text: text.to_owned(),
                    check_files: checks.files,
                    clusterset,
                    discovery,
                }))
            }
        }),
        Ok(_) => Err(ConfigErrors(file_errors)),
        Err(mut errors) => {
            errors.extend(file_errors);
            errors.sort_by(|a, b| (a.line, a.column, &a.path).cmp(&(b.line, b.column, &b.path)));
            Err(ConfigErrors(errors))
        }
    }
}

/// What parsing found: a complete config, or (kube source, no id) what is needed to read the
/// ClusterProperty.
enum Outcome {
    Complete(Box<Config>),
    Pending { clusterset: String, discovery: DiscoveryConfig },
}

/// What the file checks need, with paths resolved; there when `cluster`, `tls` and
/// `discovery` parsed, even if other sections did not.
pub(crate) struct FileInputs {
    /// `None` while the id is still to come from the ClusterProperty.
    pub id: Option<ClusterId>,
    pub clusterset: String,
    pub tls: TlsConfig,
    pub discovery: DiscoveryConfig,
}

type Parsed = (Result<Outcome, Vec<ConfigError>>, Option<(FileInputs, Locator)>);

fn parse_inner(
    path: &Path,
    text: &str,
    default_id: Option<&ClusterId>,
    allow_pending: bool,
) -> Parsed {
    let mut locator = Locator { file: path.to_owned(), marks: BTreeMap::new() };
    let root = match yaml::parse(text) {
        Ok(root) => root,
        Err(e) => {
            let error = ConfigError {
                file: path.to_owned(),
                line: e.mark.line,
                column: e.mark.column,
                path: String::new(),
                message: e.message,
            };
            return (Err(vec![error]), None);
        }
    };
    root.index_marks(&mut locator.marks);

    let mut de_errors: Vec<DeError> = Vec::new();
    let mut errors: Vec<ConfigError> = Vec::new();
    let entries = match root.kind {
        Kind::Map(entries) => entries,
        _ => {
            let error = locator.error("", "expected a mapping of sections (cluster, peers, ...)");
            return (Err(vec![error]), None);
        }
    };
    let mut present: BTreeMap<&'static str, Node> = BTreeMap::new();
    for (key, value) in entries {
        match SECTIONS.iter().find(|s| key.scalar() == Some(s)) {
            Some(section) => {
                present.insert(section, value);
            }
            None => {
                let name = key.scalar().unwrap_or("?");
                let expected = SECTIONS.map(|s| format!("`{s}`")).join(", ");
                errors.push(ConfigError {
                    file: path.to_owned(),
                    line: key.mark.line,
                    column: key.mark.column,
                    path: key.path.clone(),
                    message: format!("unknown field `{name}`, expected one of {expected}"),
                });
            }
        }
    }
    let cluster_id = present
        .get("cluster")
        .and_then(|c| match &c.kind {
            Kind::Map(entries) => entries.iter().find(|(k, _)| k.scalar() == Some("id")),
            _ => None,
        })
        .and_then(|(_, v)| v.scalar())
        .and_then(|id| ClusterId::new(id).ok())
        .or_else(|| default_id.cloned());
    let mut take = |name: &str| -> Node {
        present.remove(name).unwrap_or_else(|| Node::empty_map(usize::MAX, name))
    };
    let mut sections = Sections {
        cluster: yaml::collect(take("cluster"), &mut de_errors),
        discovery: yaml::collect(take("discovery"), &mut de_errors),
        peers: None,
        peers_clean: false,
        cluster_id,
        tls: yaml::collect(take("tls"), &mut de_errors),
        tunnel: yaml::collect(take("tunnel"), &mut de_errors),
        dns: yaml::collect(take("dns"), &mut de_errors),
        front: yaml::collect(take("front"), &mut de_errors),
        admin: yaml::collect(take("admin"), &mut de_errors),
        traffic: yaml::collect(take("traffic"), &mut de_errors),
    };
    sections.peers = match present.remove("peers").map(Node::into_items) {
        // Entries one by one, so one bad peer does not hide the checks of the others.
        Some(Ok(items)) => {
            let before = de_errors.len();
            let peers: Vec<(usize, PeerConfig)> = items
                .into_iter()
                .enumerate()
                .filter_map(|(i, item)| {
                    yaml::collect(item, &mut de_errors).and_then(Partial::complete).map(|p| (i, p))
                })
                .collect();
            sections.peers_clean = de_errors.len() == before;
            Some(peers)
        }
        Some(Err(node))
            if node.scalar().is_some_and(|s| s.is_empty() || s == "~" || s == "null") =>
        {
            sections.peers_clean = true;
            Some(Vec::new())
        }
        Some(Err(node)) => {
            yaml::collect::<Vec<PeerConfig>>(node, &mut de_errors).map(|_| Vec::new())
        }
        None => {
            errors.push(locator.error(
                "",
                "missing field `peers` (list the other gateways, or write `peers: []`)",
            ));
            None
        }
    };
    errors.extend(de_errors.into_iter().map(|e| locator.de_error(e)));
    for (path, message) in rules::semantics(&sections) {
        errors.push(locator.error(&path, message));
    }
    // The id: the file's, else the caller's; only the kube source may still be without one.
    // (An id that was written but is invalid is reported as such, not as missing.)
    let written_id = sections.cluster.as_ref().and_then(|c| c.reading(&["cluster.id"]));
    let id: Option<ClusterId> =
        written_id.and_then(|c| c.id.clone()).or_else(|| default_id.cloned());
    let source = sections.discovery.as_ref().and_then(|d| d.reading(&["discovery.source"]));
    if let (Some(_), Some(discovery), None) = (written_id, source, &id) {
        match discovery.source {
            SourceKind::File => errors.push(locator.error("cluster", MISSING_ID_FILE)),
            SourceKind::Kube if !allow_pending => {
                errors.push(locator.error("cluster", MISSING_ID_KUBE))
            }
            SourceKind::Kube => {}
        }
    }

    let base = path.parent().unwrap_or(Path::new(""));
    // Only sections as written: a path at its default because of an error names no file.
    let files = match (&sections.cluster, &sections.tls, &sections.discovery) {
        (Some(cluster), Some(tls), Some(discovery))
            if cluster.removed.is_empty()
                && tls.removed.is_empty()
                && discovery.removed.is_empty() =>
        {
            let (cluster, tls, discovery) = (&cluster.value, &tls.value, &discovery.value);
            let mut inputs = FileInputs {
                id: id.clone(),
                clusterset: cluster.clusterset.clone(),
                tls: tls.clone(),
                discovery: discovery.clone(),
            };
            resolve_tls(&mut inputs.tls, inputs.id.as_ref(), base);
            resolve_discovery(&mut inputs.discovery, inputs.id.as_ref(), base);
            Some(inputs)
        }
        _ => None,
    };
    // No error means no section had a node taken out: every value is as written.
    let result = match sections {
        Sections {
            cluster: Some(Partial { value: cluster, .. }),
            discovery: Some(Partial { value: mut discovery, .. }),
            peers: Some(peers),
            peers_clean: true,
            cluster_id: _,
            tls: Some(Partial { value: mut tls, .. }),
            tunnel: Some(Partial { value: tunnel, .. }),
            dns: Some(Partial { value: dns, .. }),
            front: Some(Partial { value: mut front, .. }),
            admin: Some(Partial { value: admin, .. }),
            traffic: Some(Partial { value: traffic, .. }),
        } if errors.is_empty() => match id {
            Some(id) => {
                let peers = peers.into_iter().map(|(_, p)| p).collect();
                resolve_tls(&mut tls, Some(&id), base);
                resolve_discovery(&mut discovery, Some(&id), base);
                front.state_dir = front.state_dir.map(|p| join(base, &p));
                let cluster = cluster.with_id(id);
                Ok(Outcome::Complete(Box::new(Config {
                    cluster,
                    discovery,
                    peers,
                    tls,
                    tunnel,
                    dns,
                    front,
                    admin,
                    traffic,
                })))
            }
            None => {
                resolve_discovery(&mut discovery, None, base);
                Ok(Outcome::Pending { clusterset: cluster.clusterset, discovery })
            }
        },
        _ => {
            errors.sort_by_key(|e| (e.line, e.column));
            Err(errors)
        }
    };
    (result, files.map(|f| (f, locator)))
}

/// `p` resolved against the config file's directory. `components()` drops inner `.`
/// segments: `./clusters/east` → `<base>/clusters/east`.
fn join(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() { p.components().collect() } else { base.join(p).components().collect() }
}

/// Fills the TLS file defaults (`<id>.crt`, `<id>.key`) and resolves the paths. Without an id
/// yet, a path left to its default stays empty (checked once the id is known).
fn resolve_tls(tls: &mut TlsConfig, id: Option<&ClusterId>, base: &Path) {
    if let Some(id) = id {
        if tls.cert.as_os_str().is_empty() {
            tls.cert = PathBuf::from(format!("{id}.crt"));
        }
        if tls.key.as_os_str().is_empty() {
            tls.key = PathBuf::from(format!("{id}.key"));
        }
    }
    for p in [&mut tls.cert, &mut tls.key] {
        if !p.as_os_str().is_empty() {
            *p = join(base, p);
        }
    }
    if let CaSource::File(p) = &tls.ca {
        tls.ca = CaSource::File(join(base, p));
    }
}

/// Fills the file-source directory default (`clusters/<id>`) and resolves the paths. Without
/// an id (kube source only) a defaulted directory stays empty: the kube source has none.
fn resolve_discovery(d: &mut DiscoveryConfig, id: Option<&ClusterId>, base: &Path) {
    if d.file.dir.as_os_str().is_empty()
        && let Some(id) = id
    {
        d.file.dir = Path::new(DEFAULT_FILE_DIR_PARENT).join(id.as_str());
    }
    if !d.file.dir.as_os_str().is_empty() {
        d.file.dir = join(base, &d.file.dir);
    }
    d.kube.kubeconfig = d.kube.kubeconfig.take().map(|k| join(base, &k));
}

#[cfg(test)]
mod rules_tests;
#[cfg(test)]
mod tests;
