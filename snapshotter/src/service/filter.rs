//! The subset of containerd's filter syntax that snapshot listings use:
//! `field==value`, `field!=value`, `field` (present), with fields `name`,
//! `parent`, `kind` and `labels.KEY` (KEY may be double-quoted); `,` joins
//! conditions that must all hold; several filters match if any one does.

use std::collections::BTreeMap;

#[derive(Debug, PartialEq, Eq)]
enum Field {
    Name,
    Parent,
    Kind,
    Label(String),
}

#[derive(Debug, PartialEq, Eq)]
enum Test {
    Present,
    Equals(String),
    NotEquals(String),
}

#[derive(Debug, PartialEq, Eq)]
struct Condition {
    field: Field,
    test: Test,
}

/// One filter: all its conditions must hold.
#[derive(Debug, PartialEq, Eq)]
pub struct Filter(Vec<Condition>);

/// What a filter can look at.
pub struct Candidate<'a> {
    pub name: &'a str,
    pub parent: &'a str,
    pub kind: &'a str,
    pub labels: &'a BTreeMap<String, String>,
}

impl Filter {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut conditions = Vec::new();
        for part in split_outside_quotes(text) {
            let part = part.trim();
            if part.is_empty() {
                return Err(format!("filter {text:?}: empty condition"));
            }
            conditions.push(parse_condition(part).map_err(|e| format!("filter {text:?}: {e}"))?);
        }
        Ok(Self(conditions))
    }

    pub fn matches(&self, candidate: &Candidate<'_>) -> bool {
        self.0.iter().all(|condition| {
            let value = match &condition.field {
                Field::Name => Some(candidate.name),
                Field::Parent => Some(candidate.parent),
                Field::Kind => Some(candidate.kind),
                Field::Label(key) => candidate.labels.get(key).map(String::as_str),
            };
            match (&condition.test, value) {
                // An empty value (no parent) counts as absent.
                (Test::Present, value) => value.is_some_and(|v| !v.is_empty()),
                (Test::Equals(want), value) => value == Some(want.as_str()),
                (Test::NotEquals(want), value) => value != Some(want.as_str()),
            }
        })
    }
}

/// Whether any of `filters` matches; no filters match everything.
pub fn any_matches(filters: &[Filter], candidate: &Candidate<'_>) -> bool {
    filters.is_empty() || filters.iter().any(|f| f.matches(candidate))
}

fn split_outside_quotes(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut quoted = false;
    for (i, c) in text.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

fn parse_condition(part: &str) -> Result<Condition, String> {
    let (field, test) = if let Some((field, value)) = split_operator(part, "!=") {
        (field, Test::NotEquals(unquote(value)?))
    } else if let Some((field, value)) = split_operator(part, "==") {
        (field, Test::Equals(unquote(value)?))
    } else if part.contains(['=', '~', '!']) && !part.starts_with("labels.\"") {
        return Err(format!("unsupported operator in {part:?} (use == or !=)"));
    } else {
        (part, Test::Present)
    };
    Ok(Condition {
        field: parse_field(field.trim())?,
        test,
    })
}

/// Splits at the first `op` that is outside double quotes.
fn split_operator<'a>(part: &'a str, op: &str) -> Option<(&'a str, &'a str)> {
    let mut quoted = false;
    for (i, c) in part.char_indices() {
        if c == '"' {
            quoted = !quoted;
        } else if !quoted && part[i..].starts_with(op) {
            return Some((&part[..i], &part[i + op.len()..]));
        }
    }
    None
}

fn parse_field(field: &str) -> Result<Field, String> {
    match field {
        "name" => Ok(Field::Name),
        "parent" => Ok(Field::Parent),
        "kind" => Ok(Field::Kind),
        _ => match field.strip_prefix("labels.") {
            Some(key) if !key.is_empty() => Ok(Field::Label(unquote(key)?)),
            _ => Err(format!("unknown field {field:?}")),
        },
    }
}

fn unquote(text: &str) -> Result<String, String> {
    let text = text.trim();
    match text.strip_prefix('"') {
        Some(rest) => rest
            .strip_suffix('"')
            .filter(|inner| !inner.contains('"'))
            .map(|inner| inner.replace("\\\\", "\\"))
            .ok_or_else(|| format!("unbalanced quotes in {text:?}")),
        None if text.contains('"') => Err(format!("stray quote in {text:?}")),
        None => Ok(text.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn candidate<'a>(labels: &'a BTreeMap<String, String>) -> Candidate<'a> {
        Candidate {
            name: "sha256:abc",
            parent: "",
            kind: "committed",
            labels,
        }
    }

    #[test]
    fn conditions_and_alternatives() {
        let labels: BTreeMap<_, _> = [("containerd.io/snapshot.ref".to_string(), "x".to_string())]
            .into_iter()
            .collect();
        let c = candidate(&labels);
        let parse = |t: &str| Filter::parse(t).unwrap();
        assert!(parse("name==sha256:abc").matches(&c));
        assert!(parse("kind==committed,labels.\"containerd.io/snapshot.ref\"==x").matches(&c));
        assert!(!parse("kind==active,name==sha256:abc").matches(&c));
        assert!(parse("labels.\"containerd.io/snapshot.ref\"").matches(&c));
        assert!(!parse("parent").matches(&c));
        // containerd looks for a layer's snapshot with parent=="" for the first layer.
        assert!(parse("parent==\"\"").matches(&c));
        assert!(parse("kind!=view").matches(&c));
        assert!(any_matches(
            &[parse("kind==view"), parse("kind==committed")],
            &c
        ));
        assert!(any_matches(&[], &c));
    }

    #[test]
    fn malformed_filters_are_errors() {
        for bad in [
            "",
            "name~=x",
            "colour==red",
            "labels.==x",
            "name==\"x",
            "a,,b",
            "labels.\"k==x",
        ] {
            assert!(Filter::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    proptest! {
        #[test]
        fn parsing_never_panics(text in ".{0,64}") {
            let _ = Filter::parse(&text);
        }
    }
}
