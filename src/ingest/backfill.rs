//! The progress of a backfill: while the events read are well behind the clock (a `since` start,
//! a resume after downtime), how far the stream has caught up, shown as [`crate::progress`] does.

use crate::progress::Progress;

/// Events this far behind the clock mean the stream is being read from the past; within it, the
/// stream is live and the backfill is over. Upstream's own delivery delay is a few seconds.
const BEHIND_MS: i64 = 60_000;

/// A backfill in progress, if any.
#[derive(Default)]
pub struct Backfill {
    progress: Option<Progress>,
}

impl Backfill {
    /// Notes `events` more published, the newest at event time `newest_ms`, the clock at
    /// `now_ms`: starts showing a catch-up when they are behind, ends it once they are not.
    pub fn advance(&mut self, events: u64, newest_ms: i64, now_ms: i64) {
        let behind = now_ms - newest_ms > BEHIND_MS;
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
}
