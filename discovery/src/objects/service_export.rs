//! `multicluster.x-k8s.io` ServiceExport (v1alpha1 or v1beta1) into [`ExportSpec`].

use std::collections::BTreeMap;
use std::str::FromStr;

use crate::model::{ServiceExportObject, ServiceKey};

use super::{ConvertError, NameRule, Result, fld, non_empty, object_key, wire};

/// A ServiceExport before its creation time is settled: a file may leave
/// `metadata.creationTimestamp` out, and the source then stamps the file's mtime at first sight.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportSpec {
    pub key: ServiceKey,
    pub created: Option<jiff::Timestamp>,
    pub exported_labels: BTreeMap<String, String>,
    pub exported_annotations: BTreeMap<String, String>,
}

impl ExportSpec {
    /// The model object, with `first_seen` as the creation time when the file names none.
    pub fn into_object(self, first_seen: jiff::Timestamp) -> ServiceExportObject {
        ServiceExportObject {
            key: self.key,
            created: self.created.unwrap_or(first_seen),
            exported_labels: self.exported_labels,
            exported_annotations: self.exported_annotations,
        }
    }
}

impl TryFrom<wire::ServiceExport> for ExportSpec {
    type Error = ConvertError;

    fn try_from(export: wire::ServiceExport) -> Result<Self> {
        let key = object_key(export.metadata.as_ref(), NameRule::Rfc1035Label)?;
        let created = match export.metadata.and_then(|m| non_empty(m.creation_timestamp)) {
            None => None,
            Some(s) => Some(jiff::Timestamp::from_str(&s).map_err(|e| {
                ConvertError::at(
                    &[fld("metadata"), fld("creationTimestamp")],
                    format!(
                        "invalid creationTimestamp {s:?}: {e} (expected RFC 3339, e.g. \
                         2026-01-31T12:00:00Z)"
                    ),
                )
            })?),
        };
        let spec = export.spec.unwrap_or_default();
        let exported_labels = spec.exported_labels.unwrap_or_default();
        let exported_annotations = spec.exported_annotations.unwrap_or_default();
        check_keys(&exported_labels, "exportedLabels")?;
        check_keys(&exported_annotations, "exportedAnnotations")?;
        Ok(ExportSpec { key, created, exported_labels, exported_annotations })
    }
}

/// Label and annotation keys must be non-empty (`[prefix/]name`); values are free-form here.
fn check_keys(map: &BTreeMap<String, String>, field: &'static str) -> Result<()> {
    for k in map.keys() {
        let name = k.rsplit_once('/').map_or(k.as_str(), |(_, n)| n);
        if name.is_empty() {
            return Err(ConvertError::at(
                &[fld("spec"), fld(field)],
                format!("invalid key {k:?}: the name part must not be empty"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn export(yaml: &str) -> Result<ExportSpec> {
        let wire: wire::ServiceExport = crate::objects::from_yaml(yaml);
        ExportSpec::try_from(wire)
    }

    #[test]
    fn export_fields_and_timestamps() {
        let got = export(
            "metadata: {name: web, namespace: shop, creationTimestamp: '2026-01-02T03:04:05Z'}
spec:
  exportedLabels: {tier: gold}
  exportedAnnotations: {example.com/owner: team-a}
",
        )
        .expect("valid export");
        assert_eq!(got.key, ServiceKey::new("shop", "web"));
        let ts: jiff::Timestamp = "2026-01-02T03:04:05Z".parse().expect("timestamp");
        assert_eq!(got.created, Some(ts));
        let fallback: jiff::Timestamp = "2020-01-01T00:00:00Z".parse().expect("timestamp");
        let obj = got.into_object(fallback);
        assert_eq!(obj.created, ts);
        assert_eq!(obj.exported_labels.get("tier").map(String::as_str), Some("gold"));
        assert_eq!(
            obj.exported_annotations.get("example.com/owner").map(String::as_str),
            Some("team-a")
        );

        let bare = export("metadata: {name: web}").expect("valid export");
        assert_eq!(bare.created, None);
        assert_eq!(bare.into_object(fallback).created, fallback);

        let offset =
            export("metadata: {name: web, creationTimestamp: '2026-01-02T05:04:05+02:00'}")
                .expect("offsets are RFC 3339 too");
        assert_eq!(offset.created, Some(ts));

        for (yaml, path) in [
            (
                "metadata: {name: web, creationTimestamp: '2026-13-01T00:00:00Z'}",
                "metadata.creationTimestamp",
            ),
            (
                "metadata: {name: web, creationTimestamp: 'Jan 1 2026'}",
                "metadata.creationTimestamp",
            ),
            ("metadata: {name: web}\nspec: {exportedLabels: {'x/': y}}", "spec.exportedLabels"),
            ("metadata: {name: Web}", "metadata.name"),
        ] {
            let err = export(yaml).expect_err(yaml);
            assert_eq!(err.path.to_string(), path, "{yaml}: {err}");
        }
    }
}
