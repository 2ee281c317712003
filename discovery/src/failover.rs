//! Failover priority (Istio `failoverPriority` semantics), shared by the data plane (which
//! endpoint a connection gets) and DNS (which endpoints a headless answer lists), so both
//! always agree. Pure functions over label maps.

use std::collections::BTreeMap;

use serde::Serialize;

/// One entry of `traffic.failoverPriority`: a label key, compared with the client's value, or
/// `key=value`, compared with the literal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PriorityLabel {
    pub key: String,
    pub value: Option<String>,
}

impl PriorityLabel {
    /// Parses `key` or `key=value` (split at the first `=`).
    pub fn parse(entry: &str) -> Self {
        match entry.split_once('=') {
            Some((k, v)) => Self { key: k.trim().to_owned(), value: Some(v.trim().to_owned()) },
            None => Self { key: entry.trim().to_owned(), value: None },
        }
    }

    /// Parses a whole `failoverPriority` list.
    pub fn parse_all<S: AsRef<str>>(entries: &[S]) -> Vec<Self> {
        entries.iter().map(|e| Self::parse(e.as_ref())).collect()
    }
}

/// One priority label compared on its own: what the endpoint needs (the client's value, or
/// the literal of a `key=value` entry), what it has, and whether they are equal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LabelComparison<'a> {
    pub wanted: Option<&'a str>,
    pub actual: Option<&'a str>,
    pub matched: bool,
}

/// Compares one label of the priority list; a label missing on either side does not match.
pub fn compare<'a>(
    label: &'a PriorityLabel,
    client: &'a BTreeMap<String, String>,
    endpoint: &'a BTreeMap<String, String>,
) -> LabelComparison<'a> {
    let wanted = match &label.value {
        Some(v) => Some(v.as_str()),
        None => client.get(&label.key).map(String::as_str),
    };
    let actual = endpoint.get(&label.key).map(String::as_str);
    let matched = matches!((wanted, actual), (Some(w), Some(e)) if w == e);
    LabelComparison { wanted, actual, matched }
}

/// How many leading labels of `priority` match; a label counts only if every earlier one
/// matched, and a label missing on either side does not match.
fn leading_matches<'p>(
    priority: &'p [PriorityLabel],
    client: &'p BTreeMap<String, String>,
    endpoint: &'p BTreeMap<String, String>,
) -> impl Iterator<Item = &'p PriorityLabel> {
    priority.iter().take_while(move |label| compare(label, client, endpoint).matched)
}

/// The tier of an endpoint for a client: all N labels match → 0, none → N.
pub fn tier(
    priority: &[PriorityLabel],
    client: &BTreeMap<String, String>,
    endpoint: &BTreeMap<String, String>,
) -> usize {
    priority.len() - leading_matches(priority, client, endpoint).count()
}

/// Like [`tier`], with the keys of the labels that matched, in order (for explanations).
pub fn tier_with_matches(
    priority: &[PriorityLabel],
    client: &BTreeMap<String, String>,
    endpoint: &BTreeMap<String, String>,
) -> (usize, Vec<String>) {
    let matched: Vec<String> =
        leading_matches(priority, client, endpoint).map(|l| l.key.clone()).collect();
    (priority.len() - matched.len(), matched)
}
