//! Which segments may go: the retention rule, pure. A closed segment is deleted when it is
//! older than `file.retention` or the bus is over `file.max_bytes`, and only when it is counted:
//! a newer segment exists and the stored position equals its length. A segment that should go
//! but is not counted is reported as blocked, never deleted. The newest segment (the one being
//! written) never goes, so numbering always continues after it.
//!
//! Age is measured in event time: a segment is older than the retention when its newest event
//! is more than `file.retention` older than the newest event on the bus. Live, that is the wall
//! clock; a backfill or a replay keeps the window it covers, and an ingester that was stopped
//! for a month does not return to an empty bus.

/// What the retention rule knows of one segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentState {
    pub number: u64,
    /// Bytes on disk (compressed or not).
    pub disk_bytes: u64,
    /// Bytes of content: what a fully counted segment's stored position equals.
    pub content_len: u64,
    /// The position the store records for it.
    pub stored: u64,
    /// `meta.dt` of its first and last event (ms), when they could be read.
    pub first_event_ms: Option<i64>,
    pub last_event_ms: Option<i64>,
    /// True while it may not be deleted yet for reasons of its own (a closed segment the
    /// compressor has not finished with).
    pub settling: bool,
}

/// Why a segment went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deletion {
    /// Older than `file.retention`.
    Retention,
    /// The bus was over `file.max_bytes`.
    Budget,
}

/// What to do now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Segments to delete, oldest first, with the reason.
    pub delete: Vec<(u64, Deletion)>,
    /// Segments that should go but are not counted.
    pub blocked: Vec<u64>,
    pub blocked_bytes: u64,
    /// Bytes on disk before and after the deletions.
    pub bytes_before: u64,
    pub bytes_after: u64,
    /// The newest event on the bus, and the oldest one left after the deletions (ms).
    pub newest_event_ms: Option<i64>,
    pub oldest_kept_event_ms: Option<i64>,
}

/// Applies the rule to `segments` (in write order) under `retention_ms` and `max_bytes`. The
/// newest event on the bus counts as at most `now_ms` (the wall clock), so that one event
/// stamped in the future cannot age everything else out.
pub fn plan(segments: &[SegmentState], retention_ms: i64, max_bytes: u64, now_ms: i64) -> Plan {
    let mut plan = Plan {
        bytes_before: segments.iter().map(|s| s.disk_bytes).sum(),
        newest_event_ms: segments
            .iter()
            .filter_map(|s| s.last_event_ms)
            .max()
            .map(|newest| newest.min(now_ms)),
        ..Plan::default()
    };
    let mut total = plan.bytes_before;
    let closed = segments.len().saturating_sub(1);
    let mut deleted = vec![false; segments.len()];
    for (index, segment) in segments[..closed].iter().enumerate() {
        let expired = match (plan.newest_event_ms, segment.last_event_ms) {
            (Some(newest), Some(last)) => newest.saturating_sub(last) > retention_ms,
            _ => false,
        };
        let over = total > max_bytes;
        if !expired && !over {
            continue;
        }
        let counted = segment.stored >= segment.content_len;
        if counted && !segment.settling {
            plan.delete.push((
                segment.number,
                if expired {
                    Deletion::Retention
                } else {
                    Deletion::Budget
                },
            ));
            total -= segment.disk_bytes;
            deleted[index] = true;
        } else if !counted {
            plan.blocked.push(segment.number);
            plan.blocked_bytes += segment.disk_bytes;
        }
    }
    plan.bytes_after = total;
    plan.oldest_kept_event_ms = segments
        .iter()
        .zip(&deleted)
        .filter(|(_, gone)| !**gone)
        .find_map(|(s, _)| s.first_event_ms);
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400_000;
    const NOW: i64 = 1000 * DAY;

    #[test]
    fn an_event_from_the_future_ages_nothing_out() {
        let mut segments: Vec<_> = (1..=3).map(|n| day(n, true)).collect();
        segments[2].last_event_ms = Some(NOW * 10);
        let p = plan(&segments, 7 * DAY, u64::MAX, 4 * DAY);
        assert!(p.delete.is_empty(), "{p:?}");
    }

    /// Segment `n` of 100 bytes holding day `n`'s events, counted when `counted`.
    fn day(n: u64, counted: bool) -> SegmentState {
        SegmentState {
            number: n,
            disk_bytes: 100,
            content_len: 1000,
            stored: if counted { 1000 } else { 400 },
            first_event_ms: Some(n as i64 * DAY),
            last_event_ms: Some(n as i64 * DAY + DAY - 1),
            settling: false,
        }
    }

    #[test]
    fn old_counted_segments_go_and_the_newest_never_does() {
        let segments: Vec<_> = (1..=10).map(|n| day(n, true)).collect();
        let p = plan(&segments, 7 * DAY, u64::MAX, NOW);
        // Day 10 is the newest; days 1 and 2 end more than seven days before its last event.
        assert_eq!(
            p.delete,
            vec![(1, Deletion::Retention), (2, Deletion::Retention)]
        );
        assert_eq!(p.oldest_kept_event_ms, Some(3 * DAY));
        assert!(p.blocked.is_empty());
        let alone = plan(&segments[9..], 0, 0, NOW);
        assert!(alone.delete.is_empty(), "the segment being written stays");
    }

    #[test]
    fn the_budget_deletes_oldest_first_until_under_it() {
        let segments: Vec<_> = (1..=10).map(|n| day(n, true)).collect();
        let p = plan(&segments, 365 * DAY, 650, NOW);
        assert_eq!(
            p.delete.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
            vec![1, 2, 3, 4]
        );
        assert!(p.delete.iter().all(|(_, why)| *why == Deletion::Budget));
        assert_eq!((p.bytes_before, p.bytes_after), (1000, 600));
    }

    #[test]
    fn uncounted_segments_are_blocked_not_deleted() {
        let mut segments: Vec<_> = (1..=10).map(|n| day(n, true)).collect();
        segments[1] = day(2, false);
        segments[4] = day(5, false);
        let p = plan(&segments, 365 * DAY, 650, NOW);
        assert!(p.delete.iter().all(|(n, _)| *n != 2 && *n != 5), "{p:?}");
        assert_eq!(p.blocked, vec![2, 5]);
        assert_eq!(p.blocked_bytes, 200);
        assert_eq!(p.oldest_kept_event_ms, Some(2 * DAY));
        // Nothing counted at all: nothing goes, however far over.
        let stuck: Vec<_> = (1..=10).map(|n| day(n, false)).collect();
        let p = plan(&stuck, DAY, 1, NOW);
        assert!(p.delete.is_empty());
        assert_eq!(p.blocked.len(), 9);
    }

    #[test]
    fn a_settling_segment_waits_without_being_called_blocked() {
        let mut segments: Vec<_> = (1..=3).map(|n| day(n, true)).collect();
        segments[0].settling = true;
        let p = plan(&segments, 0, u64::MAX, NOW);
        assert_eq!(p.delete, vec![(2, Deletion::Retention)]);
        assert!(p.blocked.is_empty());
    }
}
