//! Kubernetes label selectors, and their canonical form (the identity of what they select).

use super::Labels;
use std::collections::BTreeMap;
use std::fmt;

/// A Kubernetes label selector. An empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LabelSelector {
    pub match_labels: BTreeMap<String, String>,
    pub match_expressions: Vec<Requirement>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Requirement {
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

impl LabelSelector {
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| r.matches(labels))
    }
}

impl LabelSelector {
    /// The same selection in one normal form: expressions sorted and deduplicated, their values
    /// sorted and deduplicated. Two selectors with equal canonical forms select the same labels.
    pub fn canonical(&self) -> LabelSelector {
        let mut match_expressions: Vec<Requirement> = self
            .match_expressions
            .iter()
            .map(|r| match r {
                Requirement::In(k, v) => Requirement::In(k.clone(), sorted(v)),
                Requirement::NotIn(k, v) => Requirement::NotIn(k.clone(), sorted(v)),
                other => other.clone(),
            })
            .collect();
        match_expressions.sort();
        match_expressions.dedup();
        LabelSelector {
            match_labels: self.match_labels.clone(),
            match_expressions,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }
}

fn sorted(values: &[String]) -> Vec<String> {
    let mut v = values.to_vec();
    v.sort();
    v.dedup();
    v
}

impl Requirement {
    pub fn matches(&self, labels: &Labels) -> bool {
        match self {
            Requirement::In(k, values) => labels.get(k).is_some_and(|v| values.contains(v)),
            // As in apimachinery: a missing key satisfies NotIn.
            Requirement::NotIn(k, values) => labels.get(k).is_none_or(|v| !values.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        }
    }
}

impl fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = self
            .match_labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        for r in &self.match_expressions {
            parts.push(match r {
                Requirement::In(k, v) => format!("{k} in ({})", v.join(",")),
                Requirement::NotIn(k, v) => format!("{k} notin ({})", v.join(",")),
                Requirement::Exists(k) => k.clone(),
                Requirement::DoesNotExist(k) => format!("!{k}"),
            });
        }
        write!(f, "{}", parts.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn empty_selector_matches_everything() {
        let s = LabelSelector::default();
        assert!(s.matches(&labels(&[])));
        assert!(s.matches(&labels(&[("a", "b")])));
    }

    #[test]
    fn match_labels_need_every_pair() {
        let s = LabelSelector {
            match_labels: [("app", "web"), ("tier", "front")]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            match_expressions: vec![],
        };
        assert!(s.matches(&labels(&[("app", "web"), ("tier", "front"), ("x", "y")])));
        assert!(!s.matches(&labels(&[("app", "web")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("tier", "back")])));
    }

    #[test]
    fn expressions_follow_apimachinery() {
        let l = labels(&[("env", "prod"), ("team", "a")]);
        let none = labels(&[]);
        let vals = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let r_in = Requirement::In("env".into(), vals(&["prod", "dev"]));
        assert!(r_in.matches(&l));
        assert!(!r_in.matches(&none));
        let r_notin = Requirement::NotIn("env".into(), vals(&["prod"]));
        assert!(!r_notin.matches(&l));
        assert!(r_notin.matches(&none), "missing key satisfies NotIn");
        assert!(r_notin.matches(&labels(&[("env", "dev")])));
        assert!(Requirement::Exists("team".into()).matches(&l));
        assert!(!Requirement::Exists("team".into()).matches(&none));
        assert!(Requirement::DoesNotExist("team".into()).matches(&none));
        assert!(!Requirement::DoesNotExist("team".into()).matches(&l));
    }

    #[test]
    fn canonical_form_ignores_order_and_repeats() {
        let vals = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let a = LabelSelector {
            match_labels: BTreeMap::new(),
            match_expressions: vec![
                Requirement::In("env".into(), vals(&["prod", "dev", "prod"])),
                Requirement::Exists("team".into()),
            ],
        };
        let b = LabelSelector {
            match_labels: BTreeMap::new(),
            match_expressions: vec![
                Requirement::Exists("team".into()),
                Requirement::In("env".into(), vals(&["dev", "prod"])),
                Requirement::Exists("team".into()),
            ],
        };
        assert_ne!(a, b);
        assert_eq!(a.canonical(), b.canonical());
        assert_eq!(
            a.canonical().match_expressions[0],
            Requirement::In("env".into(), vals(&["dev", "prod"]))
        );
    }
}
