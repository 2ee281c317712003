//! ServiceExport `status.conditions`: what to write, keeping transition times.

use crate::kube::crd;
use crate::model::{Condition, ConditionStatus};

/// `status.conditions` to write for `want`, keeping each condition's `lastTransitionTime`
/// from `prev` while its status stays the same.
pub fn merge_conditions(
    prev: &[crd::Condition],
    want: &[Condition],
    now: jiff::Timestamp,
) -> Vec<crd::Condition> {
    let now = now.round(jiff::Unit::Second).unwrap_or(now).to_string();
    want.iter()
        .map(|c| {
            let status = match c.status {
                ConditionStatus::True => "True",
                ConditionStatus::False => "False",
                ConditionStatus::Unknown => "Unknown",
            };
            let since = prev
                .iter()
                .find(|p| p.type_ == c.type_ && p.status == status)
                .map_or_else(|| now.clone(), |p| p.last_transition_time.clone());
            crd::Condition {
                last_transition_time: since,
                message: c.message.clone(),
                observed_generation: None,
                reason: c.reason.clone(),
                status: status.to_owned(),
                type_: c.type_.clone(),
            }
        })
        .collect()
}

/// Whether `written` already says what `want` says (times aside).
pub fn conditions_match(written: &[crd::Condition], want: &[Condition]) -> bool {
    written.len() == want.len()
        && want.iter().all(|c| {
            written.iter().any(|w| {
                w.type_ == c.type_
                    && w.reason == c.reason
                    && w.message == c.message
                    && w.status
                        == match c.status {
                            ConditionStatus::True => "True",
                            ConditionStatus::False => "False",
                            ConditionStatus::Unknown => "Unknown",
                        }
            })
        })
}
