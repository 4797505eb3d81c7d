//! The `mediawiki/recentchange` JSON Schemas (1.0.0 and 1.0.1) compiled into the binary, and the
//! check of an event against the version its `$schema` names: EventGate's job, done here.
//!
//! Events of the older format (no `$schema`, a `meta.schema_uri` instead, no `meta.stream`, as
//! in 2018) are *legacy*: they are checked against 1.0.0 without its two required fields that
//! format lacks. Pure: the schemas are constants and nothing is ever fetched.

mod fast;

use serde_json::Value;

/// The schemas as shipped in `schema/` (copies of Wikimedia's, see `schema/README.md`).
pub const SCHEMA_1_0_0: &str = include_str!("../../schema/mediawiki_recentchange_1.0.0.json");
pub const SCHEMA_1_0_1: &str = include_str!("../../schema/mediawiki_recentchange_1.0.1.json");

/// The most violations one error keeps; the rest are counted.
const KEPT_VIOLATIONS: usize = 8;

/// The schema an event was checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchemaVersion {
    V1_0_0,
    V1_0_1,
    /// The 2018 format: 1.0.0 without `$schema` and `meta.stream` required.
    Legacy,
}

impl SchemaVersion {
    pub const ALL: [SchemaVersion; 3] = [
        SchemaVersion::V1_0_0,
        SchemaVersion::V1_0_1,
        SchemaVersion::Legacy,
    ];

    /// The label value: `1.0.0`, `1.0.1` or `legacy`.
    pub fn as_str(self) -> &'static str {
        match self {
            SchemaVersion::V1_0_0 => "1.0.0",
            SchemaVersion::V1_0_1 => "1.0.1",
            SchemaVersion::Legacy => "legacy",
        }
    }
}

/// The rule an event broke: the schema keyword that failed, or `schema` when its `$schema`
/// names no schema this build knows. The names are metric label values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rule {
    Schema,
    Required,
    Type,
    Format,
    MinLength,
    MaxLength,
    Minimum,
    Maximum,
    /// A keyword the recentchange schemas do not use today.
    Other,
}

impl Rule {
    pub const ALL: [Rule; 9] = [
        Rule::Schema,
        Rule::Required,
        Rule::Type,
        Rule::Format,
        Rule::MinLength,
        Rule::MaxLength,
        Rule::Minimum,
        Rule::Maximum,
        Rule::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Rule::Schema => "schema",
            Rule::Required => "required",
            Rule::Type => "type",
            Rule::Format => "format",
            Rule::MinLength => "min_length",
            Rule::MaxLength => "max_length",
            Rule::Minimum => "minimum",
            Rule::Maximum => "maximum",
            Rule::Other => "other",
        }
    }

    fn of(kind: &jsonschema::error::ValidationErrorKind) -> Rule {
        use jsonschema::error::ValidationErrorKind as K;
        match kind {
            K::Required { .. } => Rule::Required,
            K::Type { .. } => Rule::Type,
            K::Format { .. } => Rule::Format,
            K::MinLength { .. } => Rule::MinLength,
            K::MaxLength { .. } => Rule::MaxLength,
            K::Minimum { .. } | K::ExclusiveMinimum { .. } => Rule::Minimum,
            K::Maximum { .. } | K::ExclusiveMaximum { .. } => Rule::Maximum,
            _ => Rule::Other,
        }
    }
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One broken rule, where it broke (a JSON pointer into the event) and what the schema says.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Violation {
    pub rule: Rule,
    pub path: String,
    pub message: String,
}

impl serde::Serialize for Rule {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} at {}: {}", self.rule, self.path, self.message)
    }
}

/// Why an event does not match its schema: the version it was checked against (none when its
/// `$schema` named no known one) and the first violations found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaError {
    pub version: Option<SchemaVersion>,
    pub violations: Vec<Violation>,
    /// Violations found beyond the ones kept.
    pub more: usize,
}

impl SchemaError {
    /// The rule of the first violation: the one counted and logged.
    pub fn rule(&self) -> Rule {
        self.violations.first().map_or(Rule::Other, |v| v.rule)
    }

    fn single(version: Option<SchemaVersion>, violation: Violation) -> Self {
        SchemaError {
            version,
            violations: vec![violation],
            more: 0,
        }
    }
}

impl std::fmt::Display for SchemaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.version {
            Some(version) => write!(
                f,
                "does not match mediawiki/recentchange {}",
                version.as_str()
            )?,
            None => f.write_str("cannot be checked")?,
        }
        for (n, violation) in self.violations.iter().enumerate() {
            f.write_str(if n == 0 { ": " } else { "; " })?;
            write!(f, "{violation}")?;
        }
        if self.more > 0 {
            write!(f, "; and {} more", self.more)?;
        }
        Ok(())
    }
}

/// Why the shipped schemas did not compile (a build defect, reported rather than panicking).
#[derive(Debug, thiserror::Error)]
#[error("the built-in schema {name} does not compile: {reason}")]
pub struct CompileError {
    pub name: &'static str,
    pub reason: String,
}

/// The compiled validators. Build once and share: compiling costs milliseconds, checking an
/// event microseconds.
pub struct Schemas {
    v1_0_0: jsonschema::Validator,
    v1_0_1: jsonschema::Validator,
    legacy: jsonschema::Validator,
}

impl std::fmt::Debug for Schemas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Schemas(mediawiki/recentchange 1.0.0, 1.0.1, legacy)")
    }
}

/// Moves every `required` that sits beside `properties` into an `allOf`, which means the same.
/// The validator (0.45) skips `required` in a schema with fifteen or more `properties`, as the
/// recentchange schemas have at their root; a test keeps it honest.
fn required_apart(schema: &mut Value) {
    let Value::Object(map) = schema else {
        return;
    };
    if map.contains_key("properties") {
        if let Some(required) = map.remove("required") {
            let mut all_of = match map.remove("allOf") {
                Some(Value::Array(list)) => list,
                _ => Vec::new(),
            };
            all_of.push(serde_json::json!({ "required": required }));
            map.insert("allOf".to_owned(), Value::Array(all_of));
        }
    }
    if let Some(Value::Object(properties)) = map.get_mut("properties") {
        properties.values_mut().for_each(required_apart);
    }
}

fn compile(name: &'static str, schema: &Value) -> Result<jsonschema::Validator, CompileError> {
    let mut schema = schema.clone();
    required_apart(&mut schema);
    jsonschema::draft7::options()
        // Draft 7 leaves `format` to the validator; EventGate checks it, so do we.
        .should_validate_formats(true)
        .build(&schema)
        .map_err(|e| CompileError {
            name,
            reason: e.to_string(),
        })
}

fn parse(name: &'static str, text: &str) -> Result<Value, CompileError> {
    serde_json::from_str(text).map_err(|e| CompileError {
        name,
        reason: e.to_string(),
    })
}

/// 1.0.0 without the two fields the 2018 format does not have: `$schema` and `meta.stream`.
fn legacy_of(mut schema: Value) -> Value {
    let drop = |required: Option<&mut Value>, field: &str| {
        if let Some(Value::Array(list)) = required {
            list.retain(|v| v != field);
        }
    };
    drop(schema.get_mut("required"), "$schema");
    drop(schema.pointer_mut("/properties/meta/required"), "stream");
    schema["$id"] = Value::from("/mediawiki/recentchange/1.0.0/legacy");
    schema
}

impl Schemas {
    /// Compiles the built-in schemas.
    pub fn new() -> Result<Self, CompileError> {
        let v1_0_0 = parse("mediawiki/recentchange 1.0.0", SCHEMA_1_0_0)?;
        let v1_0_1 = parse("mediawiki/recentchange 1.0.1", SCHEMA_1_0_1)?;
        Ok(Schemas {
            legacy: compile("mediawiki/recentchange legacy", &legacy_of(v1_0_0.clone()))?,
            v1_0_0: compile("mediawiki/recentchange 1.0.0", &v1_0_0)?,
            v1_0_1: compile("mediawiki/recentchange 1.0.1", &v1_0_1)?,
        })
    }

    /// The version an event's `$schema` names, or legacy for the 2018 format.
    pub fn version_of(event: &Value) -> Result<SchemaVersion, SchemaError> {
        let violation = |rule, path: &str, message: String| {
            SchemaError::single(
                None,
                Violation {
                    rule,
                    path: path.to_owned(),
                    message,
                },
            )
        };
        match event.get("$schema") {
            None if event
                .pointer("/meta/schema_uri")
                .is_some_and(Value::is_string) =>
            {
                Ok(SchemaVersion::Legacy)
            }
            None => Err(violation(
                Rule::Required,
                "/",
                "\"$schema\" is a required property (or meta.schema_uri, in the legacy format)"
                    .into(),
            )),
            Some(Value::String(uri)) => {
                // A schema URI is relative (`/mediawiki/recentchange/1.0.0`) or absolute (a
                // schema repository's URL): its path ends the same way.
                let path = uri.split(['?', '#']).next().unwrap_or_default();
                match path.rsplit_once("/mediawiki/recentchange/") {
                    Some((_, "1.0.0")) => Ok(SchemaVersion::V1_0_0),
                    Some((_, "1.0.1")) => Ok(SchemaVersion::V1_0_1),
                    _ => Err(violation(
                        Rule::Schema,
                        "/$schema",
                        format!("{uri:?} names no schema this build knows (mediawiki/recentchange 1.0.0 or 1.0.1)"),
                    )),
                }
            }
            Some(other) => Err(violation(
                Rule::Type,
                "/$schema",
                format!("{other} is not of type \"string\""),
            )),
        }
    }

    /// Checks `event` against the version its `$schema` names.
    pub fn check(&self, event: &Value) -> Result<SchemaVersion, SchemaError> {
        let version = Self::version_of(event)?;
        let validator = match version {
            SchemaVersion::V1_0_0 => &self.v1_0_0,
            SchemaVersion::V1_0_1 => &self.v1_0_1,
            SchemaVersion::Legacy => &self.legacy,
        };
        // The fast path allocates nothing; errors are collected only for an invalid event.
        if validator.is_valid(event) {
            return Ok(version);
        }
        let mut violations = Vec::new();
        let mut more = 0;
        for error in validator.iter_errors(event) {
            if violations.len() == KEPT_VIOLATIONS {
                more += 1;
                continue;
            }
            let path = error.instance_path().to_string();
            violations.push(Violation {
                rule: Rule::of(error.kind()),
                path: if path.is_empty() {
                    "/".to_owned()
                } else {
                    path
                },
                message: error.to_string(),
            });
        }
        Ok(version).and(Err(SchemaError {
            version: Some(version),
            violations,
            more,
        }))
    }

    /// Parses `data` and checks it; text that is not JSON breaks the `type` rule at the root.
    pub fn check_text(&self, data: &str) -> Result<SchemaVersion, SchemaError> {
        // Most events plainly pass: proven so without building a `Value`.
        if let Some(version) = fast::valid(data) {
            return Ok(version);
        }
        self.check_text_fully(data)
    }

    /// [`Schemas::check_text`] without the quick proof: the compiled schema decides.
    fn check_text_fully(&self, data: &str) -> Result<SchemaVersion, SchemaError> {
        match serde_json::from_str::<Value>(data) {
            Ok(event) => self.check(&event),
            Err(e) => Err(SchemaError::single(
                None,
                Violation {
                    rule: Rule::Type,
                    path: "/".into(),
                    message: format!("not JSON: {e}"),
                },
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schemas() -> Schemas {
        Schemas::new().unwrap()
    }

    use crate::event::recorded::lines as recorded;

    #[test]
    fn the_shipped_schemas_are_the_shared_ones() {
        for (name, text) in [
            ("mediawiki_recentchange_1.0.0.json", SCHEMA_1_0_0),
            ("mediawiki_recentchange_1.0.1.json", SCHEMA_1_0_1),
        ] {
            let path = format!(
                "{}/../shared/data/schema/{name}",
                env!("CARGO_MANIFEST_DIR")
            );
            assert_eq!(std::fs::read_to_string(path).unwrap(), text, "{name}");
        }
    }

    #[test]
    fn every_recorded_event_passes() {
        let schemas = schemas();
        let mut by_version = std::collections::HashMap::new();
        for file in crate::event::recorded::FILES {
            for (n, line) in recorded(file).iter().enumerate() {
                let version = schemas
                    .check_text(line)
                    .unwrap_or_else(|e| panic!("{file}:{}: {e}", n + 1));
                *by_version.entry(version).or_insert(0) += 1;
            }
        }
        assert_eq!(by_version[&SchemaVersion::Legacy], 5689, "{by_version:?}");
        assert_eq!(by_version[&SchemaVersion::V1_0_0], 681, "{by_version:?}");
    }

    #[test]
    fn legacy_events_fail_plain_1_0_0_only_on_the_two_fields() {
        let schemas = schemas();
        for line in recorded("recentchange-2018-wikidata.jsonl") {
            let mut event: Value = serde_json::from_str(&line).unwrap();
            event["$schema"] = Value::from("/mediawiki/recentchange/1.0.0");
            let error = schemas.check(&event).unwrap_err();
            assert_eq!(error.violations.len(), 1, "{error}");
            assert_eq!(error.rule(), Rule::Required, "{error}");
            assert_eq!(error.violations[0].path, "/meta", "{error}");
            assert!(error.violations[0].message.contains("stream"), "{error}");
            // Without $schema and schema_uri it is not legacy: $schema is required.
            let mut bare: Value = serde_json::from_str(&line).unwrap();
            bare["meta"].as_object_mut().unwrap().remove("schema_uri");
            let error = schemas.check(&bare).unwrap_err();
            assert_eq!(error.rule(), Rule::Required);
            assert!(error.to_string().contains("$schema"), "{error}");
        }
    }

    #[test]
    fn mutated_events_fail_with_the_rule_named() {
        let schemas = schemas();
        let base: Value =
            serde_json::from_str(&recorded("recentchange-2022-2026.jsonl")[0]).unwrap();
        type Mutation = Box<dyn Fn(&mut Value)>;
        let cases: Vec<(&str, Mutation, Rule, &str)> = vec![
            (
                "bot as a string",
                Box::new(|e| e["bot"] = "yes".into()),
                Rule::Type,
                "/bot",
            ),
            (
                "namespace as a float",
                Box::new(|e| e["namespace"] = 0.5.into()),
                Rule::Type,
                "/namespace",
            ),
            (
                "length.new as a string",
                Box::new(|e| e["length"] = serde_json::json!({"new": "9"})),
                Rule::Type,
                "/length/new",
            ),
            (
                "no meta",
                Box::new(|e| {
                    e.as_object_mut().unwrap().remove("meta");
                }),
                Rule::Required,
                "/",
            ),
            (
                "no meta.dt",
                Box::new(|e| {
                    e["meta"].as_object_mut().unwrap().remove("dt");
                }),
                Rule::Required,
                "/meta",
            ),
            (
                "no meta.stream",
                Box::new(|e| {
                    e["meta"].as_object_mut().unwrap().remove("stream");
                }),
                Rule::Required,
                "/meta",
            ),
            (
                "meta.dt not a date-time",
                Box::new(|e| e["meta"]["dt"] = "2024-13-45 25:00".into()),
                Rule::Format,
                "/meta/dt",
            ),
            (
                "meta.dt without a zone",
                Box::new(|e| e["meta"]["dt"] = "2024-01-01T00:00:00".into()),
                Rule::Format,
                "/meta/dt",
            ),
            // A time Pleiades itself could read, but not in the format the schema requires.
            (
                "meta.dt with a space",
                Box::new(|e| e["meta"]["dt"] = "2024-01-01 00:00:00Z".into()),
                Rule::Format,
                "/meta/dt",
            ),
            (
                "an empty stream",
                Box::new(|e| e["meta"]["stream"] = "".into()),
                Rule::MinLength,
                "/meta/stream",
            ),
            (
                "a namespace beyond 2^53",
                Box::new(|e| e["namespace"] = 9007199254740992_i64.into()),
                Rule::Maximum,
                "/namespace",
            ),
            (
                "an unknown version",
                Box::new(|e| e["$schema"] = "/mediawiki/recentchange/9.9.9".into()),
                Rule::Schema,
                "/$schema",
            ),
            (
                "$schema as a number",
                Box::new(|e| e["$schema"] = 1.into()),
                Rule::Type,
                "/$schema",
            ),
        ];
        assert!(schemas.check(&base).is_ok());
        for (what, mutate, rule, path) in cases {
            let mut event = base.clone();
            mutate(&mut event);
            let error = schemas
                .check(&event)
                .expect_err(&format!("{what} must fail"));
            assert_eq!(error.rule(), rule, "{what}: {error}");
            assert_eq!(error.violations[0].path, path, "{what}: {error}");
            assert!(error.to_string().contains(rule.as_str()), "{what}: {error}");
        }
        // Absolute schema URIs name the same versions.
        let mut event = base.clone();
        event["$schema"] =
            "https://schema.wikimedia.org/repositories/primary/jsonschema/mediawiki/recentchange/1.0.1"
                .into();
        assert_eq!(schemas.check(&event), Ok(SchemaVersion::V1_0_1));
        assert_eq!(
            schemas.check_text("not json").unwrap_err().rule(),
            Rule::Type
        );
    }

    /// Every recorded event, and every mutation of a sample of them made here: the quick proof
    /// never calls valid what the compiled schema rejects, and proves the recorded events.
    #[test]
    fn the_quick_proof_agrees_with_the_schema() {
        let schemas = schemas();
        let mut events: Vec<String> = Vec::new();
        for file in crate::event::recorded::FILES {
            events.extend(recorded(file));
        }
        let capture = format!(
            "{}/../shared/data/sse/pdm-g10_wikimedia-recentchange-sample_2026-06-20.sse.txt",
            env!("CARGO_MANIFEST_DIR")
        );
        let capture = std::fs::read_to_string(capture).unwrap();
        events.extend(
            capture
                .lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .map(str::to_owned),
        );
        for event in &events {
            let slow = schemas.check_text_fully(event).unwrap();
            assert_eq!(fast::valid(event), Some(slow), "{event}");
        }

        let values = [
            "null",
            "true",
            "false",
            "0",
            "-1",
            "1.5",
            "1.0",
            "1e3",
            "9007199254740991",
            "9007199254740992",
            "-9007199254740992",
            "\"\"",
            "\"x\"",
            "\"\\u00e9\"",
            "{}",
            "[]",
            "[1]",
            "{\"new\":1.5}",
            "{\"new\":null,\"old\":2}",
            "{\"old\":\"3\"}",
            "\"2026-06-20T15:49:48Z\"",
            "\"2026-06-20T15:49:48\"",
            "\"2026-06-20T15:49:48.5+01:00\"",
            "\"https://x.org/a?b#c\"",
            "\"/relative\"",
            "\"https://[::1]/\"",
            "\"a b\"",
            "\"/mediawiki/recentchange/1.0.1\"",
            "\"/mediawiki/recentchange/2.0.0\"",
        ];
        let root = [
            "$schema",
            "meta",
            "title",
            "type",
            "bot",
            "comment",
            "id",
            "length",
            "log_action",
            "log_action_comment",
            "log_id",
            "log_params",
            "log_type",
            "minor",
            "namespace",
            "parsedcomment",
            "patrolled",
            "revision",
            "server_name",
            "server_script_path",
            "server_url",
            "timestamp",
            "user",
            "wiki",
        ];
        let meta = [
            "domain",
            "dt",
            "id",
            "request_id",
            "stream",
            "uri",
            "schema_uri",
        ];
        let (mut proven, mut rejected, mut tried) = (0, 0, 0);
        let sample: Vec<&String> = events.iter().step_by(97).collect();
        for event in sample {
            let original: Value = serde_json::from_str(event).unwrap();
            let mut variants: Vec<Value> = Vec::new();
            for value in values {
                let value: Value = serde_json::from_str(value).unwrap();
                for field in root {
                    let mut v = original.clone();
                    v[field] = value.clone();
                    variants.push(v);
                    let mut v = original.clone();
                    v.as_object_mut().unwrap().remove(field);
                    variants.push(v);
                }
                for field in meta {
                    let mut v = original.clone();
                    v["meta"][field] = value.clone();
                    variants.push(v);
                    let mut v = original.clone();
                    v["meta"].as_object_mut().unwrap().remove(field);
                    variants.push(v);
                }
            }
            for variant in variants {
                let text = variant.to_string();
                tried += 1;
                let slow = schemas.check_text_fully(&text);
                match fast::valid(&text) {
                    Some(version) => {
                        proven += 1;
                        assert_eq!(slow.as_ref().ok(), Some(&version), "{text}");
                    }
                    None if slow.is_err() => rejected += 1,
                    None => {}
                }
            }
        }
        println!(
            "{tried} variants: {proven} proven valid quickly, {rejected} rejected by the schema"
        );
        // Both kinds happen, so the comparison above says something.
        assert!(
            proven > tried / 4 && rejected > tried / 10,
            "{proven} proven, {rejected} rejected of {tried}"
        );
        // A repeated key and a JSON array are left to the full check.
        assert_eq!(fast::valid(r#"{"meta":{},"meta":{}}"#), None);
        assert_eq!(fast::valid("[1]"), None);
    }
}
