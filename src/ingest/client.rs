//! The HTTP side of ingest: opening the upstream stream politely, and backing off when refused.

use rand::Rng;
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, RETRY_AFTER};
use reqwest::StatusCode;
use std::time::{Duration, SystemTime};

/// Why a connection attempt failed. Each names the peer.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{peer} asked us to slow down ({status}), retry after {retry_after:?}")]
    Throttled {
        peer: String,
        status: StatusCode,
        retry_after: Option<Duration>,
    },
    #[error("{peer} answered {status}")]
    Status { peer: String, status: StatusCode },
    #[error("cannot reach {peer}: {source}")]
    Transport {
        peer: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("cannot build an HTTP client: {0}")]
    Client(#[source] reqwest::Error),
}

/// The upstream endpoint and the client used for it.
#[derive(Debug, Clone)]
pub struct Upstream {
    client: reqwest::Client,
    url: reqwest::Url,
}

impl Upstream {
    /// A client that sends `user_agent` on every request.
    pub fn new(
        url: reqwest::Url,
        user_agent: &str,
        connect_timeout: Duration,
    ) -> Result<Self, ConnectError> {
        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT, HeaderValue::from_static("text/event-stream"));
        let client = reqwest::Client::builder()
            .user_agent(user_agent)
            .default_headers(headers)
            .connect_timeout(connect_timeout)
            .read_timeout(Duration::from_secs(24 * 3600)) // the stall watchdog decides instead
            .build()
            .map_err(ConnectError::Client)?;
        Ok(Upstream { client, url })
    }

    /// The peer named in errors and logs.
    pub fn peer(&self) -> String {
        self.url.as_str().to_owned()
    }

    /// Opens the stream: from `last_event_id` when resuming, else from `since` (epoch ms), else
    /// from "now". Returns the response once its status is 200.
    pub async fn open(
        &self,
        last_event_id: Option<&str>,
        since_ms: Option<i64>,
        timeout: Duration,
    ) -> Result<reqwest::Response, ConnectError> {
        let mut url = self.url.clone();
        let mut request = self.client.get(url.clone());
        match (last_event_id, since_ms) {
            (Some(id), _) => request = request.header("Last-Event-ID", id),
            (None, Some(since)) => {
                url.query_pairs_mut()
                    .append_pair("since", &since.to_string());
                request = self.client.get(url);
            }
            (None, None) => {}
        }
        let response = tokio::time::timeout(timeout, request.send())
            .await
            .map_err(|_| ConnectError::Status {
                peer: self.peer(),
                status: StatusCode::GATEWAY_TIMEOUT,
            })?
            .map_err(|source| ConnectError::Transport {
                peer: self.peer(),
                source,
            })?;
        let status = response.status();
        if status == StatusCode::OK {
            return Ok(response);
        }
        if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE {
            return Err(ConnectError::Throttled {
                peer: self.peer(),
                status,
                retry_after: response
                    .headers()
                    .get(RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| parse_retry_after(v, SystemTime::now())),
            });
        }
        Err(ConnectError::Status {
            peer: self.peer(),
            status,
        })
    }
}

/// Parses `Retry-After`: delay seconds or an HTTP date (RFC 9110 §10.2.3).
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

/// A wait the server asked for (`Retry-After`, `retry:`), cut to `max`; true when it was cut.
pub fn clamp_server_delay(asked: Duration, max: Duration) -> (Duration, bool) {
    if asked > max {
        (max, true)
    } else {
        (asked, false)
    }
}

/// The wait after a throttling answer: the server's floor plus a tenth of it as jitter, so a
/// fleet of clients does not return in the same instant. Saturating: no value a server sends
/// can overflow it.
pub fn throttled_delay(retry_after: Duration) -> Duration {
    retry_after.saturating_add(retry_after / 10)
}

/// Exponential backoff with jitter: each delay is drawn from the upper half of a window that
/// doubles after every failure, up to a cap; a success resets it.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            current: initial,
        }
    }

    /// The next delay, growing the window for the one after.
    pub fn next_delay(&mut self) -> Duration {
        let window = self.current;
        self.current = (self.current * 2).min(self.max);
        let half = window / 2;
        half + rand::thread_rng().gen_range(Duration::ZERO..=half)
    }

    /// Back to the initial delay after a connection that worked.
    pub fn reset(&mut self) {
        self.current = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_in_seconds_and_as_a_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(30))
        );
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(parse_retry_after(&earlier, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn the_largest_retry_after_is_clamped_without_overflow() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let asked = parse_retry_after("18446744073709551615", now).unwrap();
        assert_eq!(asked, Duration::from_secs(u64::MAX));
        // The old arithmetic, r + r / 10, overflows here; the clamp comes first now.
        assert_eq!(throttled_delay(Duration::MAX), Duration::MAX);
        let (wait, clamped) = clamp_server_delay(asked, Duration::from_secs(300));
        assert_eq!((wait, clamped), (Duration::from_secs(300), true));
        assert_eq!(throttled_delay(wait), Duration::from_secs(330));
        let (wait, clamped) = clamp_server_delay(Duration::from_secs(2), Duration::from_secs(300));
        assert_eq!((wait, clamped), (Duration::from_secs(2), false));
        let date = parse_retry_after("Fri, 31 Dec 9999 23:59:59 GMT", now).unwrap();
        assert!(clamp_server_delay(date, Duration::from_secs(300)).1);
    }

    #[test]
    fn backoff_grows_with_jitter_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(800));
        let delays: Vec<Duration> = (0..6).map(|_| b.next_delay()).collect();
        for (d, window) in delays.iter().zip([100u64, 200, 400, 800, 800, 800]) {
            assert!(
                *d >= Duration::from_millis(window / 2) && *d <= Duration::from_millis(window),
                "{d:?} vs {window}"
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
