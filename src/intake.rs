//! The intake: `POST /v1/events` on `intake.listen`, EventGate's HTTP side. A wiki of your own
//! (MediaWiki's EventBus extension) posts one event or a JSON array of them; each is checked
//! against the JSON Schema its `$schema` names, and the valid ones are handed to this host's
//! ingester, which publishes them through the same dedupe by `meta.id` as upstream events.
//!
//! Answers as EventGate does: 201 when every event was accepted, 207 with the per-event errors
//! when some were not, 400 when none were; 401 without the bearer token, 413 for a body over
//! `intake.max_body_bytes`, 503 when the ingester could not publish in time (re-sending is safe:
//! repeats are dropped by `meta.id`).

use crate::bus::handoff::{HandoffSender, Outcome, Submitted};
use crate::config::IntakeConfig;
use crate::http::ServeError;
use crate::metrics::{IntakeMetrics, IntakeOutcome, IntakeStatus};
use crate::schema::{CompileError, Rule, SchemaVersion, Schemas, Violation};
use crate::ComponentContext;
use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use serde_json::value::RawValue;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::Arc;
use warp::http::StatusCode;
use warp::{Buf, Filter, Reply};

/// What stops the intake.
#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error(transparent)]
    Schema(#[from] CompileError),
    #[error(transparent)]
    Serve(#[from] ServeError),
}

/// What every request is served with.
struct Intake {
    config: IntakeConfig,
    schemas: Schemas,
    handoff: HandoffSender,
    metrics: IntakeMetrics,
}

/// One posted event, as far as it got.
enum Checked {
    Valid(Submitted),
    Invalid(Option<String>, Vec<Violation>),
}

/// Serves `POST /v1/events` on `intake.listen` until shutdown; a listener that fails is returned
/// to the supervisor.
pub async fn run(
    ctx: ComponentContext<IntakeConfig>,
    handoff: HandoffSender,
) -> Result<(), IntakeError> {
    let Some(listen) = ctx.config.listen else {
        return Ok(());
    };
    let (listener, addr) = crate::http::bind(listen).await?;
    tracing::info!(%addr, token = !ctx.config.token.is_empty(), "intake listening for POST /v1/events");
    let routes = routes(&ctx, handoff)?;
    let limits = crate::http::Limits::new(
        ctx.config.max_connections,
        ctx.config.header_timeout,
        ctx.metrics.http.listener(crate::metrics::Listener::Intake),
    );
    crate::http::serve(listener, routes, limits, ctx.shutdown.clone()).await?;
    Ok(())
}

/// The intake's routes.
pub fn routes(
    ctx: &ComponentContext<IntakeConfig>,
    handoff: HandoffSender,
) -> Result<
    impl Filter<Extract = (warp::reply::Response,), Error = Infallible> + Clone + Send + Sync + 'static,
    CompileError,
> {
    let intake = Arc::new(Intake {
        config: ctx.config.clone(),
        schemas: Schemas::new()?,
        handoff,
        metrics: ctx.metrics.intake.clone(),
    });
    let metrics = intake.metrics.clone();
    let events = warp::path!("v1" / "events")
        .and(warp::post())
        .and(warp::header::optional::<String>("authorization"))
        .and(warp::body::stream())
        .then(move |authorization: Option<String>, body| {
            let intake = intake.clone();
            async move { intake.handle(authorization, body).await }
        });
    Ok(events
        .recover(move |rejection: warp::Rejection| {
            let metrics = metrics.clone();
            async move {
                let (status, message) = if rejection.is_not_found() {
                    (StatusCode::NOT_FOUND, "only POST /v1/events is served here")
                } else if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
                    (StatusCode::METHOD_NOT_ALLOWED, "only POST is accepted")
                } else {
                    metrics.requests.inc(IntakeStatus::BadRequest);
                    (StatusCode::BAD_REQUEST, "bad request")
                };
                Ok::<_, Infallible>(error_reply(status, message))
            }
        })
        .unify())
}

fn error_reply(status: StatusCode, message: &str) -> warp::reply::Response {
    json_reply(status, &json!({ "error": message }))
}

fn json_reply(status: StatusCode, body: &Value) -> warp::reply::Response {
    crate::health::json(status, Bytes::from(body.to_string()))
}

/// Compares in time independent of where the strings differ.
fn same_secret(given: &str, expected: &str) -> bool {
    let (a, b) = (given.as_bytes(), expected.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Intake {
    async fn handle(
        &self,
        authorization: Option<String>,
        body: impl Stream<Item = Result<impl Buf, warp::Error>> + Unpin,
    ) -> warp::reply::Response {
        let (status, response) = self.answer(authorization, body).await;
        self.metrics.requests.inc(status);
        response
    }

    async fn answer(
        &self,
        authorization: Option<String>,
        body: impl Stream<Item = Result<impl Buf, warp::Error>> + Unpin,
    ) -> (IntakeStatus, warp::reply::Response) {
        if !self.config.token.is_empty() {
            let given = authorization
                .as_deref()
                .and_then(|value| value.strip_prefix("Bearer "))
                .unwrap_or_default();
            if !same_secret(given, &self.config.token) {
                let mut response = error_reply(
                    StatusCode::UNAUTHORIZED,
                    "a valid bearer token is required (Authorization: Bearer <intake.token>)",
                );
                response.headers_mut().insert(
                    warp::http::header::WWW_AUTHENTICATE,
                    warp::http::HeaderValue::from_static("Bearer"),
                );
                return (IntakeStatus::Unauthorized, response);
            }
        }
        let body = match read_capped(body, self.config.max_body_bytes).await {
            Ok(body) => body,
            Err(Some(limit)) => {
                return (
                    IntakeStatus::TooLarge,
                    error_reply(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        &format!("the body is larger than intake.max_body_bytes ({limit} bytes)"),
                    ),
                )
            }
            Err(None) => {
                return (
                    IntakeStatus::BadRequest,
                    error_reply(StatusCode::BAD_REQUEST, "the body could not be read"),
                )
            }
        };
        let raw = match split_events(&body) {
            Ok(raw) if raw.is_empty() => {
                return (
                    IntakeStatus::BadRequest,
                    error_reply(StatusCode::BAD_REQUEST, "the body holds no event"),
                )
            }
            Ok(raw) => raw,
            Err(message) => {
                return (
                    IntakeStatus::BadRequest,
                    error_reply(StatusCode::BAD_REQUEST, &message),
                )
            }
        };
        let checked: Vec<Checked> = raw.iter().map(|event| self.check(event)).collect();
        let mut invalid = Vec::new();
        let mut valid = Vec::new();
        let mut at = Vec::new();
        for (index, checked) in checked.into_iter().enumerate() {
            match checked {
                Checked::Valid(event) => {
                    at.push(index);
                    valid.push(event);
                }
                Checked::Invalid(id, violations) => {
                    self.metrics.events.inc(IntakeOutcome::Invalid);
                    if let Some(first) = violations.first() {
                        self.metrics.schema_failures.inc(first.rule);
                    }
                    invalid.push(json!({
                        "index": index,
                        "status": "invalid",
                        "event": id,
                        "context": { "errors": violations },
                    }));
                }
            }
        }
        let mut errors = Vec::new();
        let mut accepted = 0;
        if !valid.is_empty() {
            let count = valid.len();
            match self.handoff.submit(valid, self.config.timeout).await {
                Ok(outcomes) => {
                    for (outcome, index) in outcomes.into_iter().zip(&at) {
                        match outcome {
                            Outcome::Published => {
                                accepted += 1;
                                self.metrics.events.inc(IntakeOutcome::Accepted);
                            }
                            Outcome::Repeat => {
                                accepted += 1;
                                self.metrics.events.inc(IntakeOutcome::Repeat);
                            }
                            Outcome::Refused(reason) => {
                                self.metrics.events.inc(IntakeOutcome::Failed);
                                errors.push(json!({
                                    "index": index,
                                    "status": "error",
                                    "context": { "message": reason },
                                }));
                            }
                        }
                    }
                }
                Err(error) => {
                    for _ in 0..count {
                        self.metrics.events.inc(IntakeOutcome::Failed);
                    }
                    tracing::warn!(%error, events = count, "intake events could not be published");
                    return (
                        IntakeStatus::Unavailable,
                        error_reply(
                            StatusCode::SERVICE_UNAVAILABLE,
                            &format!(
                                "{error}; send the events again (repeats are dropped by meta.id)"
                            ),
                        ),
                    );
                }
            }
        }
        tracing::debug!(
            events = raw.len(),
            accepted,
            invalid = invalid.len(),
            "intake request"
        );
        let detail = json!({ "invalid": invalid, "error": errors });
        if accepted == raw.len() {
            let response = warp::reply::with_status(warp::reply(), StatusCode::CREATED);
            (IntakeStatus::Created, response.into_response())
        } else if accepted == 0 {
            (
                IntakeStatus::BadRequest,
                json_reply(StatusCode::BAD_REQUEST, &detail),
            )
        } else {
            (
                IntakeStatus::MultiStatus,
                json_reply(StatusCode::MULTI_STATUS, &detail),
            )
        }
    }

    /// Checks one posted event: its schema (the `$schema` it names; the legacy format is not
    /// accepted here), a `meta.id` (what makes a re-sent event count once) and a `meta.dt`
    /// that Pleiades can place in a day.
    fn check(&self, raw: &RawValue) -> Checked {
        let violation = |rule, path: &str, message: &str| Violation {
            rule,
            path: path.to_owned(),
            message: message.to_owned(),
        };
        let Ok(event) = serde_json::from_str::<Value>(raw.get()) else {
            return Checked::Invalid(None, vec![violation(Rule::Type, "/", "not JSON")]);
        };
        let id = event
            .pointer("/meta/id")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let mut violations = match self.schemas.check(&event) {
            Ok(SchemaVersion::Legacy) => vec![violation(
                Rule::Required,
                "/",
                "\"$schema\" is a required property",
            )],
            Ok(_) => Vec::new(),
            Err(error) => error.violations,
        };
        if !violations.is_empty() {
            return Checked::Invalid(id, violations);
        }
        let time_ms = match crate::event::inspect(raw.get()) {
            Ok(head) => head.time_ms,
            Err(invalid) => {
                violations.push(violation(Rule::Format, "/meta/dt", &invalid.to_string()));
                return Checked::Invalid(id, violations);
            }
        };
        match id {
            Some(id) => Checked::Valid(Submitted {
                data: raw.get().to_owned(),
                id,
                time_ms,
            }),
            None => Checked::Invalid(
                None,
                vec![violation(
                    Rule::Required,
                    "/meta",
                    "\"id\" is required by the intake: it is what makes a re-sent event count once",
                )],
            ),
        }
    }
}

/// Reads the body, refusing it once it is longer than `limit`: `Err(Some(limit))` then, and
/// `Err(None)` when the body cannot be read at all.
async fn read_capped(
    mut body: impl Stream<Item = Result<impl Buf, warp::Error>> + Unpin,
    limit: u64,
) -> Result<Bytes, Option<u64>> {
    let mut read = BytesMut::new();
    while let Some(chunk) = body.next().await {
        let mut chunk = chunk.map_err(|_| None)?;
        if read.len() as u64 + chunk.remaining() as u64 > limit {
            return Err(Some(limit));
        }
        while chunk.has_remaining() {
            let piece = chunk.chunk();
            read.extend_from_slice(piece);
            let n = piece.len();
            chunk.advance(n);
        }
    }
    Ok(read.freeze())
}

/// The events of a body: the elements of a JSON array, or the one object it is, each exactly
/// as it was sent.
fn split_events(body: &[u8]) -> Result<Vec<&RawValue>, String> {
    let text = std::str::from_utf8(body).map_err(|e| format!("the body is not UTF-8: {e}"))?;
    let parsed = if text.trim_start().starts_with('[') {
        serde_json::from_str::<Vec<&RawValue>>(text)
    } else {
        serde_json::from_str::<&RawValue>(text).map(|one| vec![one])
    };
    parsed.map_err(|e| format!("the body is not a JSON event or array of events: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_split_into_events_as_sent() {
        let one = split_events(br#" {"a": 1} "#).unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].get(), r#"{"a": 1}"#);
        let many = split_events(br#"[{"a":1}, {"b" : 2}]"#).unwrap();
        assert_eq!(
            many.iter().map(|r| r.get()).collect::<Vec<_>>(),
            vec![r#"{"a":1}"#, r#"{"b" : 2}"#]
        );
        assert!(split_events(b"[]").unwrap().is_empty());
        assert!(split_events(b"{").is_err());
        assert!(split_events(b"\xff").is_err());
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abd", "abc"));
        assert!(!same_secret("ab", "abc"));
        assert!(!same_secret("", "abc"));
    }
}
