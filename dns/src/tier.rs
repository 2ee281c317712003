//! Failover priority tiers as DNS applies them to headless clusterset answers: the same rule
//! as the data plane's, from `fedgate_discovery::failover`.

pub use fedgate_discovery::failover::{PriorityLabel, tier};

/// Parses a whole `failoverPriority` list.
pub fn parse_priority(entries: &[String]) -> Vec<PriorityLabel> {
    PriorityLabel::parse_all(entries)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

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
