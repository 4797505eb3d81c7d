//! Live updates: one task reads today's and all-time counters once per `web.live_interval` and
//! publishes them when they changed; every open dashboard receives them as server-sent events.
//! The store is read at the same rate whatever the number of viewers. The task runs as its own
//! supervised component (`live`), so a failure restarts it without touching the web server.

use crate::config::WebConfig;
use crate::store::Store;
use crate::ComponentContext;
use std::convert::Infallible;
use tokio::sync::watch;

/// Publishes `{"day": "D", "since": s, "counters": {…}, "all_time": {…}}` on `tx` until shutdown.
/// A store that cannot be read skips an update; nothing else stops it.
pub async fn run(
    ctx: ComponentContext<WebConfig>,
    store: Store,
    tx: std::sync::Arc<watch::Sender<String>>,
) -> Result<(), Infallible> {
    let mut ticker = tokio::time::interval(ctx.config.live_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return Ok(()),
            _ = ticker.tick() => {}
        }
        let day = super::api::today();
        let (today, all_time) = match tokio::try_join!(store.day(day), store.all_time()) {
            Ok(read) => read,
            Err(error) => {
                tracing::debug!(%error, "live update skipped: store unreadable");
                continue;
            }
        };
        let message = serde_json::json!({
            "day": day.to_string(),
            "since": day.saturating_mul(86_400),
            "counters": today.unwrap_or_default(),
            "all_time": all_time,
        })
        .to_string();
        tx.send_if_modified(|current| {
            if *current == message {
                false
            } else {
                *current = message;
                true
            }
        });
    }
}
