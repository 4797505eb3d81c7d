//! The progress of a backfill: while the events read are well behind the clock (a `since` start,
//! a resume after downtime), how far the stream has caught up, shown as [`crate::progress`] does.

use crate::progress::Progress;

/// Events this far behind the clock mean the stream is being read from the past: a backfill
/// starts. Upstream's own delivery delay is a few seconds, but a live stream can fall a minute
/// or two behind for a while (a slow upstream, a short reconnect), which is no backfill.
const START_BEHIND_MS: i64 = 300_000;
/// Within this of the clock the stream is live and a backfill is over. Kept well below
/// [`START_BEHIND_MS`], so that a stream whose lag hovers around one threshold does not start
/// and end a backfill over and over.
const END_BEHIND_MS: i64 = 60_000;

/// A backfill in progress, if any.
#[derive(Default)]
pub struct Backfill {
    progress: Option<Progress>,
}

impl Backfill {
    /// Notes `events` more published, the newest at event time `newest_ms`, the clock at
    /// `now_ms`: starts showing a catch-up when they are behind, ends it once they are not.
    pub fn advance(&mut self, events: u64, newest_ms: i64, now_ms: i64) {
        let lag = now_ms - newest_ms;
        let behind = match self.progress {
            None => lag > START_BEHIND_MS,
            Some(_) => lag > END_BEHIND_MS,
        };
        match (&self.progress, behind) {
            (None, true) => {
                let progress = Progress::catch_up("backfill", newest_ms, now_ms);
                progress.advance(events, newest_ms, now_ms);
                self.progress = Some(progress);
            }
            (Some(progress), true) => progress.advance(events, newest_ms, now_ms),
            (Some(progress), false) => {
                progress.advance(events, newest_ms, now_ms);
                progress.finish();
                self.progress = None;
                tracing::info!("the backfill has caught up with the live stream");
            }
            (None, false) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_behind_the_clock_and_ends_once_caught_up() {
        let mut backfill = Backfill::default();
        backfill.advance(10, 1_000_000, 1_000_500);
        assert!(backfill.progress.is_none(), "live events start nothing");
        backfill.advance(10, 0, 1_000_000);
        backfill.advance(10, 500_000, 1_000_000);
        assert_eq!(backfill.progress.as_ref().map(|p| p.count()), Some(20));
        backfill.advance(10, 990_000, 1_000_000);
        assert!(backfill.progress.is_none());
    }

    #[test]
    fn a_lag_hovering_around_a_minute_or_two_is_no_backfill() {
        let mut backfill = Backfill::default();
        for lag in [50_000, 70_000, 130_000, 55_000, 240_000] {
            backfill.advance(10, 10_000_000 - lag, 10_000_000);
            assert!(backfill.progress.is_none(), "{lag} ms behind");
        }
        // Once started, a backfill lasts until the stream is within a minute of the clock.
        backfill.advance(10, 10_000_000 - 400_000, 10_000_000);
        for lag in [250_000, 90_000, 61_000] {
            backfill.advance(10, 10_000_000 - lag, 10_000_000);
            assert!(backfill.progress.is_some(), "{lag} ms behind");
        }
        backfill.advance(10, 10_000_000 - 60_000, 10_000_000);
        assert!(backfill.progress.is_none());
    }
}
