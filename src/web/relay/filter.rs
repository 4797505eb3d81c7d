//! Server-side filters of the relay: `?wiki=enwiki,dewiki`, `?type=edit,new`, `?bot=false`,
//! `?namespace=0,1`. Parameters combine (all must hold); a list matches any of its values. The
//! four fields are read once per event by the relay's reader, not once per client.

use serde::Deserialize;
use std::collections::HashMap;

/// What the filters look at in one event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fields {
    pub wiki: Option<Box<str>>,
    /// `type`, a string or an integer written in decimal.
    pub kind: Option<Box<str>>,
    pub bot: Option<bool>,
    pub namespace: Option<i64>,
}

#[derive(Deserialize)]
struct Borrowed<'a> {
    #[serde(borrow, default)]
    wiki: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, rename = "type")]
    kind: Option<serde_json::Value>,
    #[serde(default)]
    bot: Option<serde_json::Value>,
    #[serde(default)]
    namespace: Option<serde_json::Value>,
}

impl Fields {
    /// The fields of `data`; whatever is missing or of another type is `None` (and so matches
    /// no filter on it).
    pub fn of(data: &str) -> Fields {
        let Ok(event) = serde_json::from_str::<Borrowed<'_>>(data) else {
            return Fields::default();
        };
        Fields {
            wiki: event.wiki.map(|w| w.into()),
            kind: match event.kind {
                Some(serde_json::Value::String(s)) => Some(s.into()),
                Some(serde_json::Value::Number(n)) if n.is_i64() => Some(n.to_string().into()),
                _ => None,
            },
            bot: event.bot.and_then(|b| b.as_bool()),
            namespace: event.namespace.and_then(|n| n.as_i64()),
        }
    }
}

/// A filter parameter the relay cannot read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("?{parameter}={value:?}: {reason}")]
pub struct BadFilter {
    pub parameter: &'static str,
    pub value: String,
    pub reason: &'static str,
}

/// The filters of one client; no filter selects every event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    wiki: Option<Vec<String>>,
    kind: Option<Vec<String>>,
    bot: Option<bool>,
    namespace: Option<Vec<i64>>,
}

fn list(parameter: &'static str, value: &str) -> Result<Vec<String>, BadFilter> {
    let items: Vec<String> = value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    if items.is_empty() {
        return Err(BadFilter {
            parameter,
            value: value.to_owned(),
            reason: "names nothing",
        });
    }
    Ok(items)
}

impl Filter {
    /// The filters of a query; other parameters are left alone.
    pub fn from_query(query: &HashMap<String, String>) -> Result<Filter, BadFilter> {
        let mut filter = Filter::default();
        if let Some(value) = query.get("wiki") {
            filter.wiki = Some(list("wiki", value)?);
        }
        if let Some(value) = query.get("type") {
            filter.kind = Some(list("type", value)?);
        }
        if let Some(value) = query.get("bot") {
            filter.bot = Some(match value.trim() {
                "true" | "1" => true,
                "false" | "0" => false,
                _ => {
                    return Err(BadFilter {
                        parameter: "bot",
                        value: value.clone(),
                        reason: "is neither true nor false",
                    })
                }
            });
        }
        if let Some(value) = query.get("namespace") {
            let numbers = list("namespace", value)?
                .iter()
                .map(|n| n.parse::<i64>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| BadFilter {
                    parameter: "namespace",
                    value: value.clone(),
                    reason: "is not a comma list of integers",
                })?;
            filter.namespace = Some(numbers);
        }
        Ok(filter)
    }

    /// True when the event with these fields is selected.
    pub fn matches(&self, fields: &Fields) -> bool {
        let listed = |wanted: &Option<Vec<String>>, have: &Option<Box<str>>| match wanted {
            None => true,
            Some(wanted) => have
                .as_deref()
                .is_some_and(|have| wanted.iter().any(|w| w == have)),
        };
        listed(&self.wiki, &fields.wiki)
            && listed(&self.kind, &fields.kind)
            && self.bot.is_none_or(|bot| fields.bot == Some(bot))
            && self
                .namespace
                .as_ref()
                .is_none_or(|wanted| fields.namespace.is_some_and(|n| wanted.contains(&n)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn filters_combine_and_lists_match_any() {
        let edit =
            Fields::of(r#"{"wiki":"enwiki","type":"edit","bot":false,"namespace":0,"meta":{}}"#);
        let bot_new = Fields::of(r#"{"wiki":"dewiki","type":"new","bot":true,"namespace":1}"#);
        let numeric = Fields::of(r#"{"wiki":"enwiki","type":3}"#);
        let f = |pairs: &[(&str, &str)]| Filter::from_query(&query(pairs)).unwrap();
        assert!(f(&[]).matches(&edit) && f(&[]).matches(&Fields::default()));
        assert!(f(&[("wiki", "enwiki,dewiki")]).matches(&bot_new));
        assert!(!f(&[("wiki", "frwiki")]).matches(&edit));
        assert!(f(&[("type", "edit,new"), ("bot", "false")]).matches(&edit));
        assert!(!f(&[("type", "edit,new"), ("bot", "false")]).matches(&bot_new));
        assert!(f(&[("namespace", "1, 2")]).matches(&bot_new));
        assert!(
            !f(&[("namespace", "0")]).matches(&numeric),
            "no namespace, no match"
        );
        assert!(f(&[("type", "3")]).matches(&numeric));
        assert!(!f(&[("bot", "true")]).matches(&numeric));
        for bad in [("bot", "maybe"), ("namespace", "main"), ("wiki", ",")] {
            let error = Filter::from_query(&query(&[bad])).unwrap_err();
            assert_eq!(error.parameter, bad.0, "{error}");
        }
        assert_eq!(Fields::of("not json"), Fields::default());
    }
}
