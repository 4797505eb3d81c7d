//! Schema validation of upstream events, as `ingest.validate` says: every event is checked
//! against the JSON Schema its `$schema` names, failures are counted per rule and logged at most
//! once per rule and minute, and in `"quarantine"` mode they are kept out of the bus.

use crate::config::ValidateMode;
use crate::metrics::IngestMetrics;
use crate::schema::{CompileError, Rule, SchemaError, SchemaVersion, Schemas};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often one rule's failures are logged; the lines in between are counted, not written.
const LOG_INTERVAL: Duration = Duration::from_secs(60);

/// What to do with a checked event.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Publish it (it matches, validation is off, or the mode is `"warn"`).
    Publish,
    /// Keep it in quarantine with this error.
    Quarantine(SchemaError),
}

/// The ingester's validation: the compiled schemas, the mode and the per-rule log limiter.
/// The schema's answer for one event: the version it matched, or how it broke its schema.
pub type Proof = Result<SchemaVersion, SchemaError>;

/// Proves events against the compiled schemas, on any thread: the pure half of a
/// [`Validation`], shared rather than compiled again.
#[derive(Clone)]
pub struct Prover {
    schemas: Option<Arc<Schemas>>,
}

impl Prover {
    /// The schema's answer for one event, or `None` when validation is off: the part of a
    /// check that reads nothing but the event, so that many can be proven at once, on other
    /// threads, and judged afterwards in order ([`Validation::judge`]).
    pub fn prove(&self, data: &str) -> Option<Proof> {
        self.schemas
            .as_ref()
            .map(|schemas| schemas.check_text(data))
    }
}

pub struct Validation {
    mode: ValidateMode,
    prover: Prover,
    metrics: IngestMetrics,
    logged: HashMap<Rule, (Instant, u64)>,
}

impl Validation {
    /// Compiles the schemas unless validation is off.
    pub fn new(mode: ValidateMode, metrics: IngestMetrics) -> Result<Self, CompileError> {
        let schemas = match mode {
            ValidateMode::Off => None,
            ValidateMode::Warn | ValidateMode::Quarantine => Some(Arc::new(Schemas::new()?)),
        };
        Ok(Validation {
            mode,
            prover: Prover { schemas },
            metrics,
            logged: HashMap::new(),
        })
    }

    /// Checks one event (`data` as received, already known to be a JSON object).
    pub fn check(&mut self, sse_id: &str, data: &str) -> Verdict {
        let proof = self.prover.prove(data);
        self.judge(sse_id, proof)
    }

    /// The part of this validation that proves events, to hand to whoever checks them.
    pub fn prover(&self) -> Prover {
        self.prover.clone()
    }

    /// What to do with an event the schema answered for as `proof` ([`Prover::prove`]):
    /// counted, logged at a bounded rate, and a verdict by `ingest.validate`.
    pub fn judge(&mut self, sse_id: &str, proof: Option<Proof>) -> Verdict {
        let Some(proof) = proof else {
            return Verdict::Publish;
        };
        let error = match proof {
            Ok(version) => {
                self.metrics.validated.inc(version);
                return Verdict::Publish;
            }
            Err(error) => error,
        };
        if let Some(version) = error.version {
            self.metrics.validated.inc(version);
        }
        let rule = error.rule();
        self.metrics.schema_failures.inc(rule);
        let now = Instant::now();
        let entry = self
            .logged
            .entry(rule)
            .or_insert((now - LOG_INTERVAL * 2, 0));
        if now.duration_since(entry.0) >= LOG_INTERVAL {
            let suppressed = std::mem::take(&mut entry.1);
            entry.0 = now;
            tracing::warn!(%rule, id = sse_id, %error, suppressed, mode = ?self.mode, "an event does not match its schema");
        } else {
            entry.1 += 1;
        }
        match self.mode {
            ValidateMode::Quarantine => Verdict::Quarantine(error),
            ValidateMode::Warn | ValidateMode::Off => Verdict::Publish,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    const GOOD: &str = r#"{"$schema":"/mediawiki/recentchange/1.0.0","meta":{"stream":"mediawiki.recentchange","dt":"2024-01-01T00:00:00Z"}}"#;
    const BAD: &str = r#"{"$schema":"/mediawiki/recentchange/1.0.0","meta":{"stream":"mediawiki.recentchange","dt":"2024-01-01T00:00:00Z"},"bot":"no"}"#;

    #[test]
    fn each_mode_does_what_it_says_and_counts_per_rule() {
        let metrics = Metrics::new(1).unwrap();
        let mut warn = Validation::new(ValidateMode::Warn, metrics.ingest.clone()).unwrap();
        assert_eq!(warn.check("1", GOOD), Verdict::Publish);
        assert_eq!(warn.check("2", BAD), Verdict::Publish);
        assert_eq!(warn.check("3", BAD), Verdict::Publish);
        assert_eq!(metrics.ingest.schema_failures.get(Rule::Type), 2);
        assert_eq!(
            metrics
                .ingest
                .validated
                .get(crate::schema::SchemaVersion::V1_0_0),
            3
        );
        assert_eq!(
            warn.logged[&Rule::Type].1,
            1,
            "the second failure is not logged"
        );

        let mut strict = Validation::new(ValidateMode::Quarantine, metrics.ingest.clone()).unwrap();
        assert_eq!(strict.check("4", GOOD), Verdict::Publish);
        match strict.check("5", BAD) {
            Verdict::Quarantine(error) => assert_eq!(error.rule(), Rule::Type),
            other => panic!("{other:?}"),
        }
        let mut off = Validation::new(ValidateMode::Off, metrics.ingest.clone()).unwrap();
        assert_eq!(off.check("6", BAD), Verdict::Publish);
        assert_eq!(metrics.ingest.schema_failures.get(Rule::Type), 3);
    }
}
