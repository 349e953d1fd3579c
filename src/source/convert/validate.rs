//! The API server's validation of names, labels and port names, and the error it reports.

use crate::model::Labels;
use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{path}: {message}")]
pub struct InvalidField {
    pub path: String,
    pub message: String,
}

pub(super) fn invalid(path: impl Into<String>, message: impl Into<String>) -> InvalidField {
    InvalidField {
        path: path.into(),
        message: message.into(),
    }
}

/// A DNS-1123 label: 1-63 lower-case alphanumerics or '-', alphanumeric at both ends.
pub(super) fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A DNS-1123 subdomain: at most 253 characters of dot-separated DNS labels.
pub(super) fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// The name part of a label key, or a label value: at most 63 alphanumerics, '-', '_' or '.',
/// alphanumeric at both ends.
pub(super) fn is_label_word(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric()
}

pub(super) fn validate_label_key(key: &str, path: &str) -> Result<(), InvalidField> {
    let ok = match key.split_once('/') {
        Some((prefix, name)) => is_dns_subdomain(prefix) && is_label_word(name),
        None => is_label_word(key),
    };
    if ok {
        Ok(())
    } else {
        Err(invalid(
            path,
            format!(
                "{key:?} is not a valid label key (optional DNS prefix and '/', then 1-63 of [A-Za-z0-9-_.], alphanumeric at both ends)"
            ),
        ))
    }
}

pub(super) fn validate_label_value(value: &str, path: &str) -> Result<(), InvalidField> {
    if value.is_empty() || is_label_word(value) {
        Ok(())
    } else {
        Err(invalid(
            path,
            format!(
                "{value:?} is not a valid label value (at most 63 of [A-Za-z0-9-_.], alphanumeric at both ends)"
            ),
        ))
    }
}

pub(super) fn validate_labels(labels: &Labels, path: &str) -> Result<(), InvalidField> {
    for (k, v) in labels {
        validate_label_key(k, &format!("{path}[{k:?}]"))?;
        validate_label_value(v, &format!("{path}[{k:?}]"))?;
    }
    Ok(())
}

pub(super) fn labels_of(meta: &meta::ObjectMeta) -> Result<Labels, InvalidField> {
    let labels = meta.labels.clone().unwrap_or_default();
    validate_labels(&labels, "metadata.labels")?;
    Ok(labels)
}

/// `metadata.name`, which must be a DNS-1123 subdomain (or label, for namespaces).
pub(super) fn required_name(
    meta: &meta::ObjectMeta,
    label_only: bool,
) -> Result<String, InvalidField> {
    let name = match meta.name.as_deref() {
        Some(n) if !n.is_empty() => n,
        _ => return Err(invalid("metadata.name", "is required")),
    };
    let ok = if label_only {
        is_dns_label(name)
    } else {
        is_dns_subdomain(name)
    };
    if !ok {
        let rule = if label_only {
            "a DNS-1123 label: 1-63 of [a-z0-9-], alphanumeric at both ends"
        } else {
            "a DNS-1123 subdomain: at most 253 characters of dot-separated DNS labels"
        };
        return Err(invalid("metadata.name", format!("{name:?} is not {rule}")));
    }
    Ok(name.to_string())
}

pub(super) fn namespace_of(meta: &meta::ObjectMeta) -> Result<String, InvalidField> {
    match meta.namespace.as_deref() {
        None | Some("") => Ok("default".to_string()),
        Some(ns) if is_dns_label(ns) => Ok(ns.to_string()),
        Some(ns) => Err(invalid(
            "metadata.namespace",
            format!("{ns:?} is not a valid namespace name"),
        )),
    }
}
/// IANA service names, as Kubernetes requires for named ports: 1-15 characters, lower-case
/// letters, digits and '-', at least one letter, no '-' at either end or twice in a row.
pub(super) fn validate_port_name(name: &str, path: &str) -> Result<(), InvalidField> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && name.chars().any(|c| c.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--");
    if ok {
        Ok(())
    } else {
        Err(invalid(
            path,
            format!(
                "{name:?} is not a valid port name (1-15 lower-case letters, digits and '-', with a letter)"
            ),
        ))
    }
}
