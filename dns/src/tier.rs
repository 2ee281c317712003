//! Failover priority tiers (Istio `failoverPriority` semantics), as DNS applies them to
//! headless clusterset answers. The data plane has its own copy of this rule; this one stays
//! pure and table-tested so the two can be compared by their tests.

use std::collections::BTreeMap;

/// One entry of `failoverPriority`: a label key, or `key=value` to compare the endpoint's label
/// with a literal instead of the client's value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PriorityLabel {
    pub key: String,
    pub value: Option<String>,
}

impl PriorityLabel {
    pub fn parse(entry: &str) -> Self {
        match entry.split_once('=') {
            Some((key, value)) => {
                Self { key: key.trim().to_owned(), value: Some(value.trim().to_owned()) }
            }
            None => Self { key: entry.trim().to_owned(), value: None },
        }
    }
}

/// Parses a whole `failoverPriority` list.
pub fn parse_priority(entries: &[String]) -> Vec<PriorityLabel> {
    entries.iter().map(|e| PriorityLabel::parse(e)).collect()
}

/// The tier of an endpoint for a client: 0 when every label matches, N when the first does not.
/// A label counts only while every earlier label matched. A label missing on either side does
/// not match.
pub fn tier(
    priority: &[PriorityLabel],
    client: &BTreeMap<String, String>,
    endpoint: &BTreeMap<String, String>,
) -> usize {
    let matched = priority
        .iter()
        .take_while(|label| {
            let Some(have) = endpoint.get(&label.key) else {
                return false;
            };
            match &label.value {
                Some(literal) => have == literal,
                None => client.get(&label.key) == Some(have),
            }
        })
        .count();
    priority.len() - matched
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn tiers_follow_leading_matches() {
        let prio = parse_priority(&["region".into(), "cluster".into(), "zone".into()]);
        let client = labels(&[("region", "us"), ("cluster", "east"), ("zone", "a")]);
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], usize);
        let cases: &[Case] = &[
            ("all match", &[("region", "us"), ("cluster", "east"), ("zone", "a")], 0),
            ("zone differs", &[("region", "us"), ("cluster", "east"), ("zone", "b")], 1),
            ("cluster differs", &[("region", "us"), ("cluster", "west"), ("zone", "a")], 2),
            (
                "region differs, rest same",
                &[("region", "eu"), ("cluster", "east"), ("zone", "a")],
                3,
            ),
            ("label missing on endpoint", &[("cluster", "east"), ("zone", "a")], 3),
            ("no labels", &[], 3),
        ];
        for (name, ep, want) in cases {
            assert_eq!(tier(&prio, &client, &labels(ep)), *want, "{name}");
        }
    }

    #[test]
    fn literal_values_compare_with_the_endpoint() {
        let prio = parse_priority(&["tier=gold".into(), "region".into()]);
        let client = labels(&[("tier", "bronze"), ("region", "us")]);
        let cases: &[(&[(&str, &str)], usize)] = &[
            (&[("tier", "gold"), ("region", "us")], 0),
            (&[("tier", "gold"), ("region", "eu")], 1),
            (&[("tier", "bronze"), ("region", "us")], 2),
        ];
        for (ep, want) in cases {
            assert_eq!(tier(&prio, &client, &labels(ep)), *want, "{ep:?}");
        }
    }

    #[test]
    fn missing_client_label_never_matches_and_empty_priority_is_tier_zero() {
        let prio = parse_priority(&["region".into()]);
        assert_eq!(tier(&prio, &labels(&[]), &labels(&[("region", "us")])), 1);
        assert_eq!(tier(&[], &labels(&[]), &labels(&[])), 0);
        assert_eq!(
            PriorityLabel::parse(" k = v "),
            PriorityLabel { key: "k".into(), value: Some("v".into()) }
        );
    }
}
