//! From the text of one file to objects and problems: split into YAML documents, read each
//! document's `apiVersion`/`kind`/`metadata`, convert the kinds the source knows and report
//! the rest with the line (and column) of the offending field, 1-based and relative to the
//! file.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::model::LocalService;
use crate::objects::{
    ConvertError, DEFAULT_NAMESPACE, ExportSpec, FieldPath, Seg, SliceEndpoints, wire,
};
use crate::yaml::{self, Kind as NodeKind, Node};

/// A document the source could not use, or a warning about one it did.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Problem {
    pub file: PathBuf,
    /// 1-based line in the file; 0 when the problem concerns the whole file (unreadable).
    pub line: usize,
    /// 1-based column; 0 when unknown.
    pub column: usize,
    /// The object concerned (`Service default/web`), when the document says which.
    pub object: Option<String>,
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file.display(), self.line, self.column)?;
        if let Some(o) = &self.object {
            write!(f, "{o}: ")?;
        }
        f.write_str(&self.reason)
    }
}

/// The kinds the file source reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    ServiceExport,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::ServiceExport => "ServiceExport",
        }
    }
}

/// Identity of an object: last-good values and duplicates are keyed by it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind.as_str(), self.namespace, self.name)
    }
}

/// A valid object, converted into the model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ObjectValue {
    /// Endpoints empty: they come from the EndpointSlices. Boxed: a Service is three times
    /// the size of the other kinds, and the loader keeps every object of every file.
    Service(Box<LocalService>),
    EndpointSlice(SliceEndpoints),
    ServiceExport(ExportSpec),
}

/// One valid object of a file (the file is the one it was parsed from).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Object {
    pub id: ObjectRef,
    /// 1-based line where the object's document (or `kind: List` item) starts.
    pub line: usize,
    pub value: ObjectValue,
}

/// Everything parsing one file tells the loader.
#[derive(Debug, Default)]
pub(crate) struct ParsedFile {
    pub objects: Vec<Object>,
    pub problems: Vec<Problem>,
    /// Objects whose document is bad: their last good value stays in force.
    pub bad: Vec<ObjectRef>,
    /// A document was too broken to say which object it is: every object the file held
    /// before and no longer yields stays in force.
    pub unidentified_bad: bool,
}

/// Parses every YAML document of `text` (the contents of `file`): valid objects of known
/// kinds, and a problem for each bad document. Unknown kinds are skipped (debug log).
pub fn parse_documents(file: &Path, text: &str) -> (Vec<Object>, Vec<Problem>) {
    let parsed = parse_file(file, text);
    (parsed.objects, parsed.problems)
}

pub(crate) fn parse_file(file: &Path, text: &str) -> ParsedFile {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut p = Parser { file, doc_line: 0, out: ParsedFile::default() };
    for chunk in split_documents(text) {
        let Some(doc_line) = first_content_line(&chunk) else { continue };
        p.doc_line = doc_line;
        match yaml::parse_document(chunk.text) {
            Ok(None) => {}
            Ok(Some(root)) => p.object(&chunk, &root, doc_line, &root, &[]),
            Err(e) => {
                // A key given twice is reported where its mapping starts, as before.
                let (mark, reason) = match &e.duplicate_key {
                    Some((key, map)) => (*map, format!("duplicate entry with key {key:?}")),
                    None => {
                        let m = &e.error.message;
                        (e.error.mark, m.strip_prefix("invalid yaml: ").unwrap_or(m).to_owned())
                    }
                };
                p.problem(
                    mark.line + chunk.line0,
                    mark.column,
                    None,
                    format!("invalid YAML: {reason}"),
                );
                p.out.unidentified_bad = true;
            }
        }
    }
    p.out
}

/// One YAML document of a file.
struct Chunk<'a> {
    text: &'a str,
    /// 0-based index in the file of the chunk's first line.
    line0: usize,
}

fn is_marker(line: &str, marker: &str) -> bool {
    line.strip_prefix(marker).is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t']))
}

/// Splits at `---` (the marker line starts the next document) and after `...`. Splitting
/// before parsing keeps one broken document from hiding the ones after it.
fn split_documents(text: &str) -> Vec<Chunk<'_>> {
    let mut chunks = Vec::new();
    let (mut start, mut start_line, mut offset) = (0, 0, 0);
    for (idx, line) in text.split_inclusive('\n').enumerate() {
        let body = line.trim_end_matches(['\n', '\r']);
        if is_marker(body, "---") && offset > start {
            chunks.push(Chunk { text: &text[start..offset], line0: start_line });
            (start, start_line) = (offset, idx);
        }
        offset += line.len();
        if is_marker(body, "...") {
            chunks.push(Chunk { text: &text[start..offset], line0: start_line });
            (start, start_line) = (offset, idx + 1);
        }
    }
    if start < text.len() {
        chunks.push(Chunk { text: &text[start..], line0: start_line });
    }
    chunks
}

/// The 1-based file line of the document's first content, `None` for an empty document
/// (only comments, markers and directives).
fn first_content_line(chunk: &Chunk<'_>) -> Option<usize> {
    for (i, line) in chunk.text.lines().enumerate() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') || line.starts_with('%') || is_marker(line, "...") {
            continue;
        }
        if is_marker(line, "---") {
            let rest = line[3..].trim();
            if rest.is_empty() || rest.starts_with('#') {
                continue;
            }
        }
        return Some(chunk.line0 + i + 1);
    }
    None
}

struct Parser<'f> {
    file: &'f Path,
    /// Start line of the document (or List item) being read.
    doc_line: usize,
    out: ParsedFile,
}

enum Class {
    Known(Kind),
    WrongVersion(Kind, &'static str),
    Unknown,
}

fn classify(api_version: &str, kind: &str) -> Class {
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    match (group, kind) {
        ("", "Service") if version == "v1" => Class::Known(Kind::Service),
        ("", "Service") => Class::WrongVersion(Kind::Service, "v1"),
        ("discovery.k8s.io", "EndpointSlice") if version == "v1" => {
            Class::Known(Kind::EndpointSlice)
        }
        ("discovery.k8s.io", "EndpointSlice") => {
            Class::WrongVersion(Kind::EndpointSlice, "discovery.k8s.io/v1")
        }
        ("multicluster.x-k8s.io", "ServiceExport") if matches!(version, "v1alpha1" | "v1beta1") => {
            Class::Known(Kind::ServiceExport)
        }
        ("multicluster.x-k8s.io", "ServiceExport") => Class::WrongVersion(
            Kind::ServiceExport,
            "multicluster.x-k8s.io/v1alpha1 or multicluster.x-k8s.io/v1beta1",
        ),
        _ => Class::Unknown,
    }
}

/// A non-empty, non-null scalar under `key` of a mapping node.
fn str_field<'v>(map: &'v Node, key: &str) -> Option<&'v str> {
    map.get(key).filter(|n| !n.is_null()).and_then(Node::scalar).filter(|s| !s.is_empty())
}

fn fld(k: &'static str) -> Seg {
    Seg::Key(k.into())
}

impl Parser<'_> {
    /// Records a problem; when it points inside a document, the reason also names the line
    /// where that document (or List item) starts.
    fn problem(&mut self, line: usize, column: usize, object: Option<String>, mut reason: String) {
        if line != self.doc_line {
            reason.push_str(&format!(" (in the document starting at line {})", self.doc_line));
        }
        self.out.problems.push(Problem {
            file: self.file.to_path_buf(),
            line,
            column,
            object,
            reason,
        });
    }

    /// Handles one document (`prefix` empty) or one item of a `kind: List` document.
    fn object(
        &mut self,
        chunk: &Chunk<'_>,
        root: &Node,
        doc_line: usize,
        value: &Node,
        prefix: &[Seg],
    ) {
        self.doc_line = doc_line;
        let at = |path: &[Seg]| -> (usize, usize) {
            let mut full = prefix.to_vec();
            full.extend_from_slice(path);
            locate(chunk, root, &full)
        };
        let NodeKind::Map(_) = &value.kind else {
            if value.is_null() && prefix.is_empty() {
                return; // an empty document, e.g. `--- ~`
            }
            let (line, col) = at(&[]);
            self.problem(
                line,
                col,
                None,
                "not a Kubernetes object (expected a mapping with apiVersion, kind and metadata)"
                    .to_owned(),
            );
            self.out.unidentified_bad = true;
            return;
        };
        let (line, col) = at(&[]);
        let (Some(api_version), Some(kind)) =
            (str_field(value, "apiVersion"), str_field(value, "kind"))
        else {
            let missing =
                if str_field(value, "apiVersion").is_none() { "apiVersion" } else { "kind" };
            self.problem(line, col, None, format!("missing {missing}"));
            self.out.unidentified_bad = true;
            return;
        };

        if api_version == "v1" && kind == "List" && prefix.is_empty() {
            match value.get("items") {
                Some(Node { kind: NodeKind::Seq(items), .. }) => {
                    for (i, item) in items.iter().enumerate() {
                        let (item_line, _) = at(&[fld("items"), Seg::Index(i)]);
                        let prefix = [fld("items"), Seg::Index(i)];
                        self.object(chunk, root, item_line, item, &prefix);
                    }
                }
                None => {}
                Some(n) if n.is_null() => {}
                Some(_) => {
                    let (l, c) = at(&[fld("items")]);
                    self.problem(l, c, None, "items of a List must be a sequence".to_owned());
                    self.out.unidentified_bad = true;
                }
            }
            return;
        }

        let class = classify(api_version, kind);
        let kind = match class {
            Class::Unknown => {
                tracing::debug!(
                    file = %self.file.display(),
                    line,
                    api_version,
                    kind,
                    "file source ignores this kind"
                );
                return;
            }
            Class::Known(k) | Class::WrongVersion(k, _) => k,
        };
        let meta = value.get("metadata").filter(|m| matches!(m.kind, NodeKind::Map(_)));
        let Some(name) = meta.and_then(|m| str_field(m, "name")) else {
            let (l, c) = at(&[fld("metadata")]);
            self.problem(l, c, None, format!("missing metadata.name of a {}", kind.as_str()));
            self.out.unidentified_bad = true;
            return;
        };
        let namespace = meta.and_then(|m| str_field(m, "namespace")).unwrap_or(DEFAULT_NAMESPACE);
        let id = ObjectRef { kind, namespace: namespace.to_owned(), name: name.to_owned() };

        if let Class::WrongVersion(_, expected) = class {
            let (l, c) = at(&[fld("apiVersion")]);
            self.problem(
                l,
                c,
                Some(id.to_string()),
                format!("unsupported apiVersion {api_version:?} (expected {expected})"),
            );
            self.out.bad.push(id);
            return;
        }

        let converted = match kind {
            Kind::Service => convert::<wire::Service, LocalService>(value)
                .map(|s| ObjectValue::Service(Box::new(s))),
            Kind::EndpointSlice => convert::<wire::EndpointSlice, SliceEndpoints>(value)
                .map(ObjectValue::EndpointSlice),
            Kind::ServiceExport => {
                convert::<wire::ServiceExport, ExportSpec>(value).map(ObjectValue::ServiceExport)
            }
        };
        match converted {
            Ok(value) => {
                self.out.objects.push(Object { id, line, value });
            }
            Err(e) => {
                let (l, c) = at(&e.path.0);
                self.problem(l, c, Some(id.to_string()), e.to_string());
                self.out.bad.push(id);
            }
        }
    }
}

/// Deserializes the wire type (errors carry the path of the field) and converts it.
fn convert<W, M>(value: &Node) -> Result<M, ConvertError>
where
    W: DeserializeOwned,
    M: TryFrom<W, Error = ConvertError>,
{
    let wire: W = serde_path_to_error::deserialize(yaml::NodeDe(value)).map_err(|e| {
        let path = FieldPath(
            e.path()
                .iter()
                .filter_map(|seg| match seg {
                    serde_path_to_error::Segment::Seq { index } => Some(Seg::Index(*index)),
                    serde_path_to_error::Segment::Map { key } => Some(Seg::Key(key.clone().into())),
                    _ => None,
                })
                .collect(),
        );
        ConvertError { path, reason: e.into_inner().to_string() }
    })?;
    M::try_from(wire)
}

/// The (file line, column) of the node at `path` in the document, or of its closest existing
/// ancestor.
fn locate(chunk: &Chunk<'_>, root: &Node, path: &[Seg]) -> (usize, usize) {
    let mut node = root;
    for seg in path {
        let next = match seg {
            Seg::Key(k) => node.get(k),
            Seg::Index(i) => node.item(*i),
        };
        match next {
            Some(n) => node = n,
            None => break,
        }
    }
    (node.mark.line + chunk.line0, node.mark.column)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> (Vec<Object>, Vec<Problem>) {
        parse_documents(Path::new("c.yaml"), text)
    }

    const SERVICE: &str = "apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
spec:
  clusterIP: 10.96.0.1
  ports:
  - name: http
    port: 80
";

    /// (name, text, expected problems as (line, column or 0 for any, reason fragment),
    /// expected object ids).
    #[allow(clippy::type_complexity)]
    const CASES: &[(&str, &str, &[(usize, usize, &str)], &[&str])] = &[
        ("one service", SERVICE, &[], &["Service shop/web"]),
        (
            "invalid yaml in the middle keeps the others",
            "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.0.0.1}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {name: b\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {name: c}\nspec: {clusterIP: None}\n",
            &[(9, 0, "invalid YAML")],
            &["Service default/a", "Service default/c"],
        ),
        (
            "bad indentation",
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: a\n bad: x\n",
            &[(5, 0, "invalid YAML")],
            &[],
        ),
        (
            "missing name",
            "---\napiVersion: v1\nkind: Service\nmetadata:\n  namespace: x\nspec: {}\n",
            &[(5, 3, "missing metadata.name")],
            &[],
        ),
        (
            "port out of range",
            "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec:\n  clusterIP: 10.0.0.1\n  \
             ports:\n  - port: 70000\n",
            &[(7, 11, "spec.ports[0].port: port 70000 is out of range")],
            &[],
        ),
        (
            "port not a number",
            "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec:\n  clusterIP: 10.0.0.1\n  \
             ports:\n  - port: http\n",
            &[(7, 11, "spec.ports[0].port: invalid type")],
            &[],
        ),
        (
            "bad cluster ip",
            "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec:\n  clusterIP: 10.0.0.300\n",
            &[(5, 14, "invalid IP address \"10.0.0.300\"")],
            &[],
        ),
        (
            "unknown protocol",
            "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec:\n  clusterIP: 10.0.0.1\n  \
             ports:\n  - port: 80\n    protocol: TPC\n",
            &[(8, 15, "unknown protocol \"TPC\"")],
            &[],
        ),
        (
            "bad timestamp",
            "apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata:\n  \
             name: a\n  creationTimestamp: yesterday\n",
            &[(5, 22, "invalid creationTimestamp \"yesterday\"")],
            &[],
        ),
        (
            "bad endpoint address",
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: a-1\n  \
             labels: {kubernetes.io/service-name: a}\naddressType: IPv4\nendpoints:\n- \
             addresses: [10.0.0.1]\n- addresses:\n  - 10.0.0.2\n  - nope\n",
            &[(11, 5, "endpoints[1].addresses[1]: invalid IP address \"nope\"")],
            &[],
        ),
        (
            "address of the wrong family",
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: a-1\n  \
             labels: {kubernetes.io/service-name: a}\naddressType: IPv6\nendpoints:\n- \
             addresses: [10.0.0.1]\n",
            &[(8, 15, "does not match addressType")],
            &[],
        ),
        (
            "fqdn slice",
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: a-1\n  \
             labels: {kubernetes.io/service-name: a}\naddressType: FQDN\nendpoints: []\n",
            &[(6, 14, "addressType: FQDN is not supported")],
            &[],
        ),
        (
            "slice without service label",
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: a-1\n\
             addressType: IPv4\n",
            &[(4, 3, "missing label kubernetes.io/service-name")],
            &[],
        ),
        (
            "unknown kinds are ignored",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ndata: {a: b}\n---\n\
             apiVersion: serving.knative.dev/v1\nkind: Service\nmetadata: {name: k}\n",
            &[],
            &[],
        ),
        (
            "missing apiVersion",
            "# a comment\n\nkind: Service\nmetadata: {name: a}\n",
            &[(3, 1, "missing apiVersion")],
            &[],
        ),
        (
            "unsupported version",
            "apiVersion: discovery.k8s.io/v1beta1\nkind: EndpointSlice\nmetadata: {name: a}\n",
            &[(1, 13, "unsupported apiVersion")],
            &[],
        ),
        (
            "not a mapping",
            "- a\n- b\n---\njust a string\n---\n~\n---\n# only a comment\n",
            &[(1, 1, "not a Kubernetes object"), (4, 1, "not a Kubernetes object")],
            &[],
        ),
        (
            "missing cluster ip: loaded, no problem (no cluster.local address, not headless)",
            "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec:\n  ports: [{port: 80}]\n",
            &[],
            &["Service default/a"],
        ),
        (
            "list items",
            "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  \
             metadata: {name: a}\n  spec: {clusterIP: None}\n- apiVersion: v1\n  kind: Service\n  \
             metadata: {name: b}\n  spec: {clusterIP: None, type: Bogus}\n",
            &[(11, 33, "unknown service type \"Bogus\"")],
            &["Service default/a"],
        ),
        (
            "duplicate key",
            "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nkind: Service\n",
            // reported at the start of the mapping
            &[(1, 1, "duplicate entry with key \"kind\"")],
            &[],
        ),
        (
            "document end markers and crlf",
            "apiVersion: v1\r\nkind: Service\r\nmetadata: {name: a}\r\nspec: {clusterIP: None}\r\n\
             ...\r\n---\r\napiVersion: v1\r\nkind: Service\r\nmetadata: {name: 'B'}\r\n",
            &[(9, 18, "invalid name \"B\"")],
            &["Service default/a"],
        ),
    ];

    #[test]
    fn documents_become_objects_or_located_problems() {
        for (name, text, want_problems, want_objects) in CASES {
            let (objects, problems) = parse(text);
            let ids: Vec<String> = objects.iter().map(|o| o.id.to_string()).collect();
            assert_eq!(&ids, want_objects, "{name}: objects (problems: {problems:#?})");
            assert_eq!(problems.len(), want_problems.len(), "{name}: {problems:#?}");
            for (p, (line, column, fragment)) in problems.iter().zip(want_problems.iter()) {
                assert_eq!(p.file, Path::new("c.yaml"), "{name}");
                assert_eq!(p.line, *line, "{name}: line of {p}");
                if *column != 0 {
                    assert_eq!(p.column, *column, "{name}: column of {p}");
                }
                assert!(p.reason.contains(fragment), "{name}: {:?} lacks {fragment:?}", p.reason);
            }
        }
    }

    #[test]
    fn objects_know_their_line() {
        let text = format!("# header\n---\n{SERVICE}---\n\n{SERVICE}");
        let (objects, problems) = parse(&text);
        assert!(problems.is_empty(), "{problems:?}");
        let lines: Vec<usize> = objects.iter().map(|o| o.line).collect();
        assert_eq!(lines, vec![3, 15]);
    }

    #[test]
    fn bad_documents_name_their_object() {
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: n}\nspec:\n  \
                    type: Nope\n---\n{{{\n";
        let parsed = parse_file(Path::new("c.yaml"), text);
        assert_eq!(
            parsed.bad,
            vec![ObjectRef { kind: Kind::Service, namespace: "n".into(), name: "a".into() }]
        );
        assert!(parsed.unidentified_bad);
        assert_eq!(parsed.problems[0].object.as_deref(), Some("Service n/a"));
        assert_eq!(
            parsed.problems[0].to_string(),
            "c.yaml:5:9: Service n/a: spec.type: unknown service type \"Nope\" (expected ClusterIP, NodePort, LoadBalancer or ExternalName) (in the document starting at line 1)"
        );
    }

    #[test]
    fn error_messages_count_lines_from_the_file() {
        // The reader's positions are relative to the document; a problem carries the file's
        // line, and its message no document-relative line number.
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\n---\n# b\n\n\
                    apiVersion: v1\nkind: Service\nmetadata: [name\n";
        let (_, problems) = parse(text);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].line, 10, "{}", problems[0]);
        assert!(!problems[0].reason.contains("line 6"), "{}", problems[0]);
    }

    #[test]
    fn garbage_never_panics() {
        let inputs = [
            "",
            "---",
            "\u{feff}apiVersion: v1",
            "*alias",
            "&a [*a]",
            "!!binary x",
            "? [a]\n: b",
            "apiVersion: [v1]\nkind: {}\n",
            "apiVersion: v1\nkind: Service\nmetadata: 5\n",
            "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: [1]\n",
            "apiVersion: v1\nkind: List\nitems: 7\n",
            "%YAML 1.2\n---\na: b\n",
            "\t\t\n",
        ];
        for input in inputs {
            let _ = parse(input);
        }
    }
}
