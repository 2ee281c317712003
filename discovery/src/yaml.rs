//! The one YAML reader of fedgate: a span-aware tree and a serde `Deserializer` over it, used
//! by the gateway's config loader and the file cluster source, so both report problems as
//! `file:line:col`.
//!
//! serde stops at the first error and `serde_norway` forgets where a value came from once it
//! is a `Value`, so YAML is parsed here (with `saphyr-parser`, which reports a span for every
//! event) into [`Node`]s that remember their line, column and field path. The deserializer
//! ([`NodeDe`]) attaches the innermost node to every error, and [`collect`] removes the
//! offending node and tries again, so one pass reports every problem of a section;
//! [`Node::get`] and [`Node::item`] walk to any field, to report where it is.

use std::collections::BTreeMap;
use std::fmt;

use saphyr_parser::{Event, Parser, ScalarStyle, Span};
use serde::de::{self, DeserializeOwned, DeserializeSeed, IntoDeserializer, Visitor};

/// Where a node starts: 1-based line and column.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mark {
    pub line: usize,
    pub column: usize,
}

impl Mark {
    pub const START: Mark = Mark { line: 1, column: 1 };

    fn from_span(span: &Span) -> Mark {
        Mark { line: span.start.line(), column: span.start.col() + 1 }
    }
}

/// One YAML node with its position and its field path (`traffic.healthCheck.interval`,
/// `peers[1].id`).
#[derive(Clone, Debug)]
pub struct Node {
    pub id: usize,
    pub mark: Mark,
    pub path: String,
    pub kind: Kind,
}

#[derive(Clone, Debug)]
pub enum Kind {
    /// A scalar with its text; `plain` when unquoted (only plain scalars resolve to null,
    /// booleans and numbers, per the YAML 1.2 core schema).
    Scalar {
        text: String,
        plain: bool,
    },
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

/// A syntax error of the YAML text itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyntaxError {
    pub mark: Mark,
    pub message: String,
}

/// A syntax error of [`parse_document`], and for a key given twice the key and where its
/// mapping starts (the file source reports it there).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DocumentError {
    pub error: SyntaxError,
    pub duplicate_key: Option<(String, Mark)>,
}

impl DocumentError {
    fn new(mark: Mark, message: impl Into<String>) -> Self {
        Self { error: SyntaxError { mark, message: message.into() }, duplicate_key: None }
    }
}

impl Node {
    /// The node of a mapping's value under `key`.
    pub fn get(&self, key: &str) -> Option<&Node> {
        match &self.kind {
            Kind::Map(entries) => {
                entries.iter().find(|(k, _)| k.scalar() == Some(key)).map(|(_, v)| v)
            }
            _ => None,
        }
    }

    /// The node of a sequence's `index`-th element.
    pub fn item(&self, index: usize) -> Option<&Node> {
        match &self.kind {
            Kind::Seq(items) => items.get(index),
            _ => None,
        }
    }

    /// The elements of a sequence node.
    pub fn into_items(self) -> Result<Vec<Node>, Node> {
        match self.kind {
            Kind::Seq(items) => Ok(items),
            kind => Err(Node { kind, ..self }),
        }
    }

    pub fn scalar(&self) -> Option<&str> {
        match &self.kind {
            Kind::Scalar { text, .. } => Some(text),
            _ => None,
        }
    }

    /// An empty mapping standing in for a section that is absent from the file.
    pub fn empty_map(id: usize, path: &str) -> Node {
        Node { id, mark: Mark::START, path: path.to_owned(), kind: Kind::Map(Vec::new()) }
    }

    /// Number of nodes in this subtree.
    fn size(&self) -> usize {
        1 + match &self.kind {
            Kind::Scalar { .. } => 0,
            Kind::Seq(items) => items.iter().map(Node::size).sum(),
            Kind::Map(entries) => entries.iter().map(|(k, v)| k.size() + v.size()).sum(),
        }
    }

    /// A plain `~`, `null` or empty scalar.
    pub fn is_null(&self) -> bool {
        matches!(&self.kind, Kind::Scalar { text, plain: true } if is_null_text(text))
    }

    /// Records the position of this node and all below it, by path.
    pub fn index_marks(&self, out: &mut BTreeMap<String, Mark>) {
        out.entry(self.path.clone()).or_insert(self.mark);
        match &self.kind {
            Kind::Scalar { .. } => {}
            Kind::Seq(items) => items.iter().for_each(|n| n.index_marks(out)),
            // A field points at its value, like deserialization errors do.
            Kind::Map(entries) => entries.iter().for_each(|(_, v)| v.index_marks(out)),
        }
    }

    /// Removes the node `id` (a map entry, by its key or value, or a sequence element) from
    /// below this node.
    fn remove(&mut self, id: usize) -> Option<Removed> {
        let own = self.id;
        match &mut self.kind {
            Kind::Scalar { .. } => None,
            Kind::Seq(items) => {
                if let Some(i) = items.iter().position(|n| n.id == id) {
                    let item = items.remove(i);
                    return Some(Removed { container: own, key: String::new(), path: item.path });
                }
                items.iter_mut().find_map(|n| n.remove(id))
            }
            Kind::Map(entries) => {
                if let Some(i) = entries.iter().position(|(k, v)| k.id == id || v.id == id) {
                    let (k, _) = entries.remove(i);
                    let key = k.scalar().unwrap_or_default().to_owned();
                    return Some(Removed { container: own, key, path: k.path });
                }
                entries.iter_mut().find_map(|(_, v)| v.remove(id))
            }
        }
    }
}

/// A node [`Node::remove`] took out.
struct Removed {
    /// The id of the map or sequence it was in.
    container: usize,
    /// Its key in a map; empty in a sequence.
    key: String,
    /// Its field path (`tunnel.socketBufferSize`, `traffic.failoverPriority[1]`).
    path: String,
}

/// A section that deserialized after the nodes with errors were taken out (their fields have
/// their defaults). Rules may still read the fields that were not touched: a range error is
/// then reported beside a type error of the same section.
#[derive(Clone, Debug)]
pub struct Partial<T> {
    pub value: T,
    /// Paths of the nodes taken out; empty when the section is as written.
    pub removed: Vec<String>,
}

impl<T> Partial<T> {
    /// The whole value, if nothing was taken out.
    pub fn complete(self) -> Option<T> {
        self.removed.is_empty().then_some(self.value)
    }

    /// The value, if none of `fields` (dotted paths) is, holds or lies inside a node that was
    /// taken out: only then does the value show those fields as the file wrote them.
    pub fn reading(&self, fields: &[&str]) -> Option<&T> {
        let within = |inner: &str, outer: &str| {
            inner.strip_prefix(outer).is_some_and(|rest| {
                rest.is_empty() || rest.starts_with('.') || rest.starts_with('[')
            })
        };
        let touched =
            self.removed.iter().any(|r| fields.iter().any(|f| within(f, r) || within(r, f)));
        (!touched).then_some(&self.value)
    }
}

fn is_null_text(text: &str) -> bool {
    matches!(text, "" | "~" | "null" | "Null" | "NULL")
}

fn child_path(parent: &str, key: &str) -> String {
    if parent.is_empty() { key.to_owned() } else { format!("{parent}.{key}") }
}

/// Deepest nesting accepted. The config needs 4 levels; the limit keeps the recursive walks
/// over the tree far from the stack's end whatever the input.
const MAX_DEPTH: usize = 64;

/// Most nodes all aliases together may copy.
const MAX_ALIAS_NODES: usize = 10_000;

enum Frame {
    Seq { start: Node, items: Vec<Node>, anchor: usize },
    Map { start: Node, entries: Vec<(Node, Node)>, pending_key: Option<Node>, anchor: usize },
}

/// Parses one YAML document into a tree. An empty (or null) document is an empty mapping.
pub fn parse(text: &str) -> Result<Node, SyntaxError> {
    let root = match parse_document(text).map_err(|e| e.error)? {
        Some(root) if !root.is_null() => root,
        _ => Node::empty_map(0, ""),
    };
    Ok(root)
}

/// Parses one YAML document into a tree as written; `None` when it holds no node at all.
pub fn parse_document(text: &str) -> Result<Option<Node>, DocumentError> {
    let mut next_id = 0usize;
    let mut stack: Vec<Frame> = Vec::new();
    let mut anchors: BTreeMap<usize, Node> = BTreeMap::new();
    let mut expanded = 0usize;
    let mut root: Option<Node> = None;
    let mut documents = 0usize;

    for event in Parser::new_from_str(text) {
        let (event, span) = event.map_err(|e| {
            DocumentError::new(
                Mark { line: e.marker().line(), column: e.marker().col() + 1 },
                format!("invalid yaml: {}", e.info()),
            )
        })?;
        let mark = Mark::from_span(&span);
        let mut new_node = |kind: Kind| {
            next_id += 1;
            Node { id: next_id, mark, path: String::new(), kind }
        };
        let finished = match event {
            Event::DocumentStart(_) => {
                documents += 1;
                if documents > 1 {
                    return Err(DocumentError::new(
                        mark,
                        "expected a single yaml document, found several",
                    ));
                }
                None
            }
            Event::Scalar(value, style, anchor, tag) => {
                // A `!!str` tag makes a plain scalar a string, as YAML says.
                let tagged_str = tag.as_ref().is_some_and(|t| t.suffix == "str");
                let plain = style == ScalarStyle::Plain && !tagged_str;
                let node = new_node(Kind::Scalar { text: value.into_owned(), plain });
                if anchor > 0 {
                    anchors.insert(anchor, node.clone());
                }
                Some(node)
            }
            Event::Alias(anchor) => match anchors.get(&anchor) {
                Some(node) => {
                    // Aliases copy their anchor: bound the total so that nested aliases
                    // ("billion laughs") cannot blow up memory.
                    expanded += node.size();
                    if expanded > MAX_ALIAS_NODES {
                        return Err(DocumentError::new(
                            mark,
                            format!("yaml aliases expand to more than {MAX_ALIAS_NODES} nodes"),
                        ));
                    }
                    let mut node = node.clone();
                    node.mark = mark;
                    Some(node)
                }
                None => {
                    return Err(DocumentError::new(mark, "unknown yaml alias"));
                }
            },
            Event::SequenceStart(..) | Event::MappingStart(..) if stack.len() >= MAX_DEPTH => {
                return Err(DocumentError::new(
                    mark,
                    format!("yaml nested deeper than {MAX_DEPTH} levels"),
                ));
            }
            Event::SequenceStart(anchor, _) => {
                let start = new_node(Kind::Seq(Vec::new()));
                stack.push(Frame::Seq { start, items: Vec::new(), anchor });
                None
            }
            Event::MappingStart(anchor, _) => {
                let start = new_node(Kind::Map(Vec::new()));
                stack.push(Frame::Map { start, entries: Vec::new(), pending_key: None, anchor });
                None
            }
            Event::SequenceEnd => match stack.pop() {
                Some(Frame::Seq { mut start, items, anchor }) => {
                    start.kind = Kind::Seq(items);
                    if anchor > 0 {
                        anchors.insert(anchor, start.clone());
                    }
                    Some(start)
                }
                _ => None,
            },
            Event::MappingEnd => match stack.pop() {
                Some(Frame::Map { mut start, entries, anchor, .. }) => {
                    start.kind = Kind::Map(entries);
                    if anchor > 0 {
                        anchors.insert(anchor, start.clone());
                    }
                    Some(start)
                }
                _ => None,
            },
            _ => None,
        };
        let Some(node) = finished else { continue };
        match stack.last_mut() {
            None => root = Some(node),
            Some(Frame::Seq { items, .. }) => items.push(node),
            Some(Frame::Map { start, entries, pending_key, .. }) => match pending_key.take() {
                None => {
                    if let Some(key) = node.scalar()
                        && entries.iter().any(|(k, _)| k.scalar() == Some(key))
                    {
                        return Err(DocumentError {
                            error: SyntaxError {
                                mark: node.mark,
                                message: format!("duplicate key {key:?}"),
                            },
                            duplicate_key: Some((key.to_owned(), start.mark)),
                        });
                    }
                    *pending_key = Some(node);
                }
                Some(key) => entries.push((key, node)),
            },
        }
    }
    Ok(root.map(|mut root| {
        assign_paths(&mut root, String::new(), &mut next_id);
        root
    }))
}

/// Gives every node its path, and nodes copied from an anchor fresh ids.
fn assign_paths(node: &mut Node, path: String, next_id: &mut usize) {
    *next_id += 1;
    node.id = *next_id;
    node.path = path;
    match &mut node.kind {
        Kind::Scalar { .. } => {}
        Kind::Seq(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                assign_paths(item, format!("{}[{i}]", node.path), next_id);
            }
        }
        Kind::Map(entries) => {
            for (k, v) in entries.iter_mut() {
                let key = match k.scalar() {
                    Some(s) => s.to_owned(),
                    None => "?".to_owned(),
                };
                let p = child_path(&node.path, &key);
                assign_paths(k, p.clone(), next_id);
                assign_paths(v, p, next_id);
            }
        }
    }
}

/// A deserialization error with the innermost node it happened at.
#[derive(Clone, Debug)]
pub struct DeError {
    pub message: String,
    pub at: Option<(usize, Mark, String)>,
    /// Set for `missing field` errors: which field.
    pub missing: Option<&'static str>,
}

impl DeError {
    fn at(mut self, node: &Node) -> Self {
        if self.at.is_none() {
            self.at = Some((node.id, node.mark, node.path.clone()));
        }
        self
    }
}

impl fmt::Display for DeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for DeError {}

impl de::Error for DeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        DeError { message: msg.to_string(), at: None, missing: None }
    }

    fn missing_field(field: &'static str) -> Self {
        DeError { message: format!("missing field `{field}`"), at: None, missing: Some(field) }
    }
}

/// Deserializes `T` from `node`; on an error, records it, removes the offending node and
/// tries again, so every independent problem is reported. A `missing field` caused by a
/// removal is not reported again: the removed value was already named. Returns the value
/// with the paths of what was removed: a field at or around a removed node must not be
/// checked further (list indexes would have shifted, emptied lists would look empty), see
/// [`Partial::reading`]. `None` when the node itself is wrong.
pub fn collect<T: DeserializeOwned>(
    mut node: Node,
    errors: &mut Vec<DeError>,
) -> Option<Partial<T>> {
    let mut removed: Vec<Removed> = Vec::new();
    // Every round removes a node, so the tree bounds the rounds; the cap is a safety net.
    for _ in 0..1000 {
        match T::deserialize(NodeDe(&node)) {
            Ok(value) => {
                let removed = removed.into_iter().map(|r| r.path).collect();
                return Some(Partial { value, removed });
            }
            Err(e) => {
                let (id, ..) = e.at.clone().unwrap_or((node.id, node.mark, node.path.clone()));
                let caused_by_us = e
                    .missing
                    .is_some_and(|f| removed.iter().any(|r| r.container == id && r.key == f));
                if !caused_by_us {
                    errors.push(e.at(&node));
                }
                if id == node.id {
                    return None;
                }
                match node.remove(id) {
                    Some(r) => removed.push(r),
                    None => return None,
                }
            }
        }
    }
    None
}

/// A serde deserializer reading one [`Node`].
pub struct NodeDe<'a>(pub &'a Node);

impl<'a> NodeDe<'a> {
    fn invalid(&self, exp: &dyn de::Expected) -> DeError {
        let unexp = match &self.0.kind {
            Kind::Scalar { text, plain: true } if is_null_text(text) => de::Unexpected::Unit,
            Kind::Scalar { text, .. } => de::Unexpected::Str(text),
            Kind::Seq(_) => de::Unexpected::Seq,
            Kind::Map(_) => de::Unexpected::Map,
        };
        <DeError as de::Error>::invalid_type(unexp, exp)
    }
}

fn parse_int(text: &str) -> Option<i128> {
    let (neg, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    let value = if let Some(hex) = digits.strip_prefix("0x") {
        i128::from_str_radix(hex, 16).ok()?
    } else if let Some(oct) = digits.strip_prefix("0o") {
        i128::from_str_radix(oct, 8).ok()?
    } else if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        digits.parse().ok()?
    } else {
        return None;
    };
    Some(if neg { -value } else { value })
}

fn parse_float(text: &str) -> Option<f64> {
    match text {
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => Some(f64::INFINITY),
        "-.inf" | "-.Inf" | "-.INF" => Some(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => Some(f64::NAN),
        _ if text.bytes().any(|b| b.is_ascii_digit())
            && text.bytes().all(|b| b.is_ascii_digit() || b"+-.eE".contains(&b)) =>
        {
            text.parse().ok()
        }
        _ => None,
    }
}

struct SeqAccess<'a>(std::slice::Iter<'a, Node>);

impl<'de, 'a> de::SeqAccess<'de> for SeqAccess<'a> {
    type Error = DeError;
    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, DeError> {
        match self.0.next() {
            None => Ok(None),
            Some(node) => seed.deserialize(NodeDe(node)).map(Some).map_err(|e| e.at(node)),
        }
    }
}

struct MapAccess<'a> {
    entries: std::slice::Iter<'a, (Node, Node)>,
    value: Option<&'a Node>,
}

impl<'de, 'a> de::MapAccess<'de> for MapAccess<'a> {
    type Error = DeError;
    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DeError> {
        match self.entries.next() {
            None => Ok(None),
            Some((k, v)) => {
                self.value = Some(v);
                // Keys are always strings here; a numeric key still names a field.
                seed.deserialize(KeyDe(k)).map(Some).map_err(|e| e.at(k))
            }
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, DeError> {
        match self.value.take() {
            Some(v) => seed.deserialize(NodeDe(v)).map_err(|e| e.at(v)),
            None => Err(<DeError as de::Error>::custom("value requested before key")),
        }
    }
}

/// Deserializes a mapping key: any scalar as its text.
struct KeyDe<'a>(&'a Node);

impl<'de, 'a> de::Deserializer<'de> for KeyDe<'a> {
    type Error = DeError;
    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match &self.0.kind {
            Kind::Scalar { text, .. } => visitor.visit_str(text),
            _ => Err(NodeDe(self.0).invalid(&visitor)),
        }
    }
    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map struct enum identifier ignored_any
    }
}

impl<'de, 'a> de::Deserializer<'de> for NodeDe<'a> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let node = self.0;
        let result = match &node.kind {
            Kind::Scalar { text, plain: false } => visitor.visit_str(text),
            Kind::Scalar { text, plain: true } => {
                if is_null_text(text) {
                    visitor.visit_unit()
                } else if matches!(text.as_str(), "true" | "True" | "TRUE") {
                    visitor.visit_bool(true)
                } else if matches!(text.as_str(), "false" | "False" | "FALSE") {
                    visitor.visit_bool(false)
                } else if let Some(i) = parse_int(text) {
                    if let Ok(u) = u64::try_from(i) {
                        visitor.visit_u64(u)
                    } else if let Ok(s) = i64::try_from(i) {
                        visitor.visit_i64(s)
                    } else {
                        visitor.visit_i128(i)
                    }
                } else if let Some(f) = parse_float(text) {
                    visitor.visit_f64(f)
                } else {
                    visitor.visit_str(text)
                }
            }
            Kind::Seq(items) => visitor.visit_seq(SeqAccess(items.iter())),
            Kind::Map(entries) => {
                visitor.visit_map(MapAccess { entries: entries.iter(), value: None })
            }
        };
        result.map_err(|e| e.at(node))
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_string(visitor)
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        // Like serde_yaml: any non-null scalar reads as a string (`zone: 1` is the label "1").
        match &self.0.kind {
            Kind::Scalar { text, .. } if !self.0.is_null() => {
                visitor.visit_str(text).map_err(|e: DeError| e.at(self.0))
            }
            _ => Err(self.invalid(&visitor).at(self.0)),
        }
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_string(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        if self.0.is_null() {
            visitor.visit_none().map_err(|e: DeError| e.at(self.0))
        } else {
            visitor.visit_some(self)
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        // Only unit variants are spelled in fedgate's config: a scalar names the variant.
        match &self.0.kind {
            Kind::Scalar { text, .. } if !self.0.is_null() => {
                let de: de::value::StrDeserializer<'_, DeError> = text.as_str().into_deserializer();
                visitor.visit_enum(de).map_err(|e| e.at(self.0))
            }
            _ => Err(self.invalid(&"a string").at(self.0)),
        }
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_unit()
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char
        bytes byte_buf unit unit_struct seq tuple
        tuple_struct map struct
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    struct Inner {
        count: u16,
        #[serde(default)]
        name: Option<String>,
    }

    #[derive(Debug, serde::Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Outer {
        a: Inner,
        #[serde(default)]
        list: Vec<Inner>,
    }

    fn run(text: &str) -> (Option<Outer>, Vec<String>) {
        let (out, msgs) = run_partial(text);
        (out.and_then(Partial::complete), msgs)
    }

    fn run_partial(text: &str) -> (Option<Partial<Outer>>, Vec<String>) {
        let tree = parse(text).expect("yaml parses");
        let mut errors = Vec::new();
        let out = collect::<Outer>(tree, &mut errors);
        let msgs = errors
            .into_iter()
            .map(|e| {
                let (_, mark, path) = e.at.expect("errors carry a node");
                format!("{}:{}: {}: {}", mark.line, mark.column, path, e.message)
            })
            .collect();
        (out, msgs)
    }

    #[test]
    fn good_document_deserializes() {
        let (out, errs) = run("a: { count: 3, name: 7 }\nlist:\n  - count: 0x10\n");
        assert!(errs.is_empty(), "{errs:?}");
        let out = out.expect("value");
        assert_eq!(out.a, Inner { count: 3, name: Some("7".into()) });
        assert_eq!(out.list, vec![Inner { count: 16, name: None }]);
    }

    #[test]
    fn every_error_is_reported_with_its_position() {
        let text =
            "a:\n  count: many\n  bogus: 1\nlist:\n  - count: 70000\n  - count: 1\n    extra: x\n";
        let (out, errs) = run(text);
        assert!(out.is_none());
        assert_eq!(
            errs,
            vec![
                "2:10: a.count: invalid type: string \"many\", expected u16",
                "3:3: a.bogus: unknown field `bogus`, expected `count` or `name`",
                "5:12: list[0].count: invalid value: integer `70000`, expected u16",
                "7:5: list[1].extra: unknown field `extra`, expected `count` or `name`",
            ]
        );
    }

    #[test]
    fn a_value_with_nodes_taken_out_names_them_and_hides_only_their_fields() {
        let text = "a: { count: 1, bogus: 2 }\nlist:\n  - count: 2\n  - count: x\n";
        let (out, errs) = run_partial(text);
        assert_eq!(errs.len(), 2, "{errs:?}");
        let out = out.expect("the rest deserializes");
        assert_eq!(out.removed, ["a.bogus", "list[1].count", "list[1]"]);
        assert_eq!(out.value.a.count, 1);
        // (fields read, whether a rule may read them)
        let table: &[(&[&str], bool)] = &[
            (&["a.count"], true),
            (&["a.name"], true),
            (&["a.bogus"], false),
            (&["a"], false),
            (&["list"], false),
            (&["list[0].count"], true),
            (&["list[1].count"], false),
            (&["a.count", "list"], false),
            (&["lis"], true),
        ];
        for (fields, readable) in table {
            assert_eq!(out.reading(fields).is_some(), *readable, "{fields:?}");
        }
        assert!(out.complete().is_none());
    }

    #[test]
    fn syntax_errors_and_duplicate_keys_have_positions() {
        let err = parse("a: [1, 2\n").expect_err("unterminated flow sequence");
        assert_eq!(err.mark.line, 2);
        let err = parse("a: 1\nb: 2\na: 3\n").expect_err("duplicate key");
        assert_eq!(
            err,
            SyntaxError {
                mark: Mark { line: 3, column: 1 },
                message: "duplicate key \"a\"".into()
            }
        );
        let err = parse("a: 1\n---\na: 2\n").expect_err("two documents");
        assert_eq!(err.message, "expected a single yaml document, found several");
    }

    #[test]
    fn deep_nesting_is_refused_not_a_crash() {
        let deep = format!("a: {}{}\n", "[".repeat(100), "]".repeat(100));
        let err = parse(&deep).expect_err("too deep");
        assert_eq!(err.message, "yaml nested deeper than 64 levels");
        // Far deeper input stops in the parser's own limit, still as an error.
        let deeper = format!("a: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
        assert!(parse(&deeper).is_err());
        let ok = format!("a: {}{}\n", "[".repeat(10), "]".repeat(10));
        assert!(parse(&ok).is_ok());
    }

    #[test]
    fn alias_bombs_are_refused() {
        let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..10 {
            let refs = vec![format!("*a{}", i - 1); 10].join(", ");
            text.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
        }
        let err = parse(&text).expect_err("bomb");
        assert_eq!(err.message, "yaml aliases expand to more than 10000 nodes");
    }

    #[test]
    fn empty_and_null_documents_are_empty_maps() {
        for text in ["", "# only a comment\n", "~\n"] {
            let node = parse(text).expect("parses");
            assert!(matches!(node.kind, Kind::Map(ref e) if e.is_empty()), "{text:?}");
        }
    }

    #[test]
    fn anchors_and_quoted_scalars() {
        let node = parse("x: &v { count: 2 }\na: *v\nq: '12'\n").expect("parses");
        assert_eq!(node.get("a").and_then(|a| a.get("count")).and_then(Node::scalar), Some("2"));
        assert!(matches!(node.get("q").map(|n| &n.kind), Some(Kind::Scalar { plain: false, .. })));
    }
}
