//! The gateway's configuration: a YAML file (schema in DESIGN.md, reference in
//! `docs/configuration.md`), parsed into [`Config`].
//!
//! Parsing reports *every* problem, each as `file:line:col: field.path: message`: each
//! top-level section is deserialized on its own from a span-aware YAML tree (see [`yaml`]),
//! an offending node is dropped and the section retried, and then the semantic rules run
//! over whatever did parse. [`parse`] is pure; [`load`] reads the file and also checks the
//! files the config names (certificates, key, CA, file-source directory).

mod check;
mod types;
mod yaml;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

pub use types::*;

use self::yaml::{DeError, Kind, Mark, Node};

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

/// What deserialized of each section; `None` when it had errors.
#[derive(Default)]
pub(crate) struct Sections {
    pub cluster: Option<ClusterConfig>,
    pub discovery: Option<DiscoveryConfig>,
    /// Each peer that parsed, with its index in the file (entries with errors are left
    /// out, so indexes can have gaps).
    pub peers: Option<Vec<(usize, PeerConfig)>>,
    /// Whether every peer entry parsed.
    pub peers_clean: bool,
    /// `cluster.id` when it is valid, even if the rest of `cluster` is not.
    pub cluster_id: Option<fedgate_discovery::model::ClusterId>,
    pub tls: Option<TlsConfig>,
    pub tunnel: Option<TunnelConfig>,
    pub dns: Option<DnsConfig>,
    pub front: Option<FrontConfig>,
    pub admin: Option<AdminConfig>,
    pub traffic: Option<TrafficConfig>,
}

/// Parses a config file's text. `path_for_messages` names the file in errors, and its
/// directory is the base of relative paths in the config. Checks syntax, types and the
/// cross-field rules, but touches no file: see [`load`].
pub fn parse(path_for_messages: &Path, text: &str) -> Result<Config, ConfigErrors> {
    parse_inner(path_for_messages, text).0.map_err(ConfigErrors)
}

/// Reads and parses the config file at `path`, then checks the files it names: the
/// certificate (readable, unexpired, naming `spiffe://<clusterset>/cluster/<id>`), its key,
/// the CA bundle, and the file source's directory.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: path.to_owned(),
            line: 0,
            column: 0,
            path: String::new(),
            message: format!("cannot read config file: {e}"),
        }])
    })?;
    let (parsed, files) = parse_inner(path, &text);
    // The files are checked even when other sections have errors: all problems at once.
    let file_errors = match &files {
        Some((inputs, locator)) => check::files(inputs, locator, jiff::Timestamp::now()),
        None => Vec::new(),
    };
    match parsed {
        Ok(config) if file_errors.is_empty() => Ok(config),
        Ok(_) => Err(ConfigErrors(file_errors)),
        Err(mut errors) => {
            errors.extend(file_errors);
            errors.sort_by(|a, b| (a.line, a.column, &a.path).cmp(&(b.line, b.column, &b.path)));
            Err(ConfigErrors(errors))
        }
    }
}

/// What the file checks need, with paths resolved; there when `cluster`, `tls` and
/// `discovery` parsed, even if other sections did not.
pub(crate) struct FileInputs {
    pub id: fedgate_discovery::model::ClusterId,
    pub clusterset: String,
    pub tls: TlsConfig,
    pub discovery: DiscoveryConfig,
}

type Parsed = (Result<Config, Vec<ConfigError>>, Option<(FileInputs, Locator)>);

fn parse_inner(path: &Path, text: &str) -> Parsed {
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
        .and_then(|id| fedgate_discovery::model::ClusterId::new(id).ok());
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
                .filter_map(|(i, item)| yaml::collect(item, &mut de_errors).map(|p| (i, p)))
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
    for (path, message) in check::semantics(&sections) {
        errors.push(locator.error(&path, message));
    }

    let base = path.parent().unwrap_or(Path::new(""));
    let files = match (&sections.cluster, &sections.tls, &sections.discovery) {
        (Some(cluster), Some(tls), Some(discovery)) => {
            let mut inputs = FileInputs {
                id: cluster.id.clone(),
                clusterset: cluster.clusterset.clone(),
                tls: tls.clone(),
                discovery: discovery.clone(),
            };
            resolve_tls(&mut inputs.tls, &inputs.id, base);
            resolve_discovery(&mut inputs.discovery, &inputs.id, base);
            Some(inputs)
        }
        _ => None,
    };
    let result = match sections {
        Sections {
            cluster: Some(cluster),
            discovery: Some(mut discovery),
            peers: Some(peers),
            peers_clean: true,
            cluster_id: _,
            tls: Some(mut tls),
            tunnel: Some(tunnel),
            dns: Some(dns),
            front: Some(mut front),
            admin: Some(admin),
            traffic: Some(traffic),
        } if errors.is_empty() => {
            let peers = peers.into_iter().map(|(_, p)| p).collect();
            resolve_tls(&mut tls, &cluster.id, base);
            resolve_discovery(&mut discovery, &cluster.id, base);
            front.state_dir = front.state_dir.map(|p| join(base, &p));
            Ok(Config { cluster, discovery, peers, tls, tunnel, dns, front, admin, traffic })
        }
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

/// Fills the TLS file defaults (`<id>.crt`, `<id>.key`) and resolves the paths.
fn resolve_tls(tls: &mut TlsConfig, id: &fedgate_discovery::model::ClusterId, base: &Path) {
    if tls.cert.as_os_str().is_empty() {
        tls.cert = PathBuf::from(format!("{id}.crt"));
    }
    if tls.key.as_os_str().is_empty() {
        tls.key = PathBuf::from(format!("{id}.key"));
    }
    tls.cert = join(base, &tls.cert);
    tls.key = join(base, &tls.key);
    if let CaSource::File(p) = &tls.ca {
        tls.ca = CaSource::File(join(base, p));
    }
}

/// Fills the file-source directory default (`clusters/<id>`) and resolves the paths.
fn resolve_discovery(
    d: &mut DiscoveryConfig,
    id: &fedgate_discovery::model::ClusterId,
    base: &Path,
) {
    if d.file.dir.as_os_str().is_empty() {
        d.file.dir = Path::new(DEFAULT_FILE_DIR_PARENT).join(id.as_str());
    }
    d.file.dir = join(base, &d.file.dir);
    d.kube.kubeconfig = d.kube.kubeconfig.take().map(|k| join(base, &k));
}

#[cfg(test)]
mod tests;
