//! Retention on the event-file bus: the supervised component that deletes counted segments
//! older than `file.retention`, or while the segments take more than `file.max_bytes`, and says
//! loudly when uncounted segments keep the bus over its limits (it never deletes them). It runs
//! beside the aggregators, on the host that has both the event files and the store, because the
//! store's positions are what prove a segment counted.

use super::AggregateError;
use crate::bus::file::retention::{plan, Deletion, SegmentState};
use crate::bus::file::{compressed, event_times, is_compressed, segment_len, segments, source_key};
use crate::bus::Trouble;
use crate::config::FileConfig;
use crate::metrics::{DeleteReason, RetentionMetrics};
use crate::store::Store;
use crate::ComponentContext;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, SystemTime};

/// A closed segment still plain this recently is left to the compressor, which is about to
/// replace it; deleting it under the compressor would bring it back as a compressed copy.
const SETTLE: Duration = Duration::from_secs(10);

/// What retention remembers between passes: facts about closed segments, which never change.
#[derive(Default)]
struct Known {
    /// First and last event times of closed segments.
    times: HashMap<u64, (Option<i64>, Option<i64>)>,
    /// Closed segments whose stored position reached their length: counted for good.
    counted: HashSet<u64>,
    /// The newest event time any pass has read. A pass can miss the newest segments (being
    /// compressed as it looks, or the one being written not yet holding a whole line), and age
    /// is measured from the newest event on the bus, not from the newest one this pass read.
    newest_ms: Option<i64>,
}

/// Runs retention passes every `file.retention_interval` until shutdown; `blocked` carries the
/// blocked state to `/readyz`.
pub async fn run(
    ctx: ComponentContext<FileConfig>,
    store: Store,
    blocked: Trouble,
) -> Result<(), AggregateError> {
    let metrics = ctx.metrics.retention.clone();
    let mut known = Known::default();
    tracing::info!(dir = %ctx.config.dir.display(), retention = ?ctx.config.retention, max_bytes = ctx.config.max_bytes, "retention starting");
    while !ctx.shutdown.is_cancelled() {
        pass(&ctx.config, &store, &metrics, &blocked, &mut known).await?;
        tokio::select! {
            _ = ctx.shutdown.cancelled() => {}
            _ = tokio::time::sleep(ctx.config.retention_interval) => {}
        }
    }
    Ok(())
}

/// One look at the bus: measure, delete what may go, report what may not.
async fn pass(
    config: &FileConfig,
    store: &Store,
    metrics: &RetentionMetrics,
    blocked: &Trouble,
    known: &mut Known,
) -> Result<(), AggregateError> {
    let listed = tokio::task::block_in_place(|| segments(&config.dir))?;
    let newest = listed.last().map(|(n, _)| *n);
    let mut states = Vec::with_capacity(listed.len());
    let mut paths = HashMap::new();
    let mut unreadable: Option<String> = None;
    for (number, path) in listed {
        let closed = Some(number) != newest;
        let Some(state) = tokio::task::block_in_place(|| inspect(&path, number, closed, known))?
        else {
            continue; // deleted or compressed under us; the next pass sees it as it is
        };
        let mut state = state;
        if known.counted.contains(&number) {
            state.stored = state.content_len;
        } else {
            match store.position(&source_key(number)).await {
                Ok(stored) => state.stored = stored,
                // What cannot be proven counted is kept: the pass goes on and reports it.
                Err(e) => {
                    unreadable.get_or_insert(e.to_string());
                }
            }
            if closed && state.stored >= state.content_len {
                known.counted.insert(number);
            }
        }
        paths.insert(number, path);
        states.push(state);
    }
    let seen = states.iter().filter_map(|s| s.last_event_ms).max();
    known.newest_ms = known.newest_ms.max(seen);
    if let (Some(open), Some(newest_ms)) = (states.last_mut(), known.newest_ms) {
        // The segment being written is never deleted: carrying the newest time seen keeps the
        // age of every other segment right when this pass could not read the newest ones.
        if Some(open.number) == newest && open.last_event_ms.is_none_or(|t| t < newest_ms) {
            open.last_event_ms = Some(newest_ms);
        }
    }
    let retention_ms = config.retention.as_millis().min(i64::MAX as u128) as i64;
    // Room for the segment being written to grow to its full size, and for the one just
    // closed until it is compressed, keeps the bus under its budget between passes, not only
    // right after one.
    let target = config
        .max_bytes
        .saturating_sub(config.segment_bytes.saturating_mul(2));
    let decided = plan(
        &states,
        retention_ms,
        target,
        chrono::Utc::now().timestamp_millis(),
    );
    // A rebuild in progress (`pleiades reaggregate`) still has to read what its own space has
    // not counted: such segments wait for it, and for the live positions it takes over.
    let held = if decided.delete.is_empty() {
        None
    } else {
        Some(
            store
                .rebuild_hold(chrono::Utc::now().timestamp_millis())
                .await,
        )
    };
    let (mut kept, mut kept_bytes) = (0, 0);
    for (number, why) in &decided.delete {
        let Some(path) = paths.get(number) else {
            continue;
        };
        let state = states.iter().find(|s| s.number == *number);
        if let Some(hold) = &held {
            let needed = match hold {
                Ok(Some(rebuilt)) => {
                    let length = state.map_or(u64::MAX, |s| s.content_len);
                    rebuilt.get(&source_key(*number)).copied().unwrap_or(0) < length
                }
                Ok(None) => false,
                // What cannot be proven unneeded is kept.
                Err(_) => true,
            };
            if needed {
                tracing::debug!(segment = %path.display(), "kept for the rebuild in progress");
                kept += 1;
                kept_bytes += state.map_or(0, |s| s.disk_bytes);
                continue;
            }
        }
        let bytes = state.map_or(0, |s| s.disk_bytes);
        tokio::task::block_in_place(|| delete(path))?;
        let reason = match why {
            Deletion::Retention => DeleteReason::Retention,
            Deletion::Budget => DeleteReason::Budget,
        };
        metrics.deleted.inc(reason);
        metrics.deleted_bytes.inc_by(bytes);
        known.times.remove(number);
        known.counted.remove(number);
        tracing::info!(
            segment = %path.display(),
            reason = reason.as_str(),
            bytes,
            stored_position = state.map_or(0, |s| s.stored),
            length = state.map_or(0, |s| s.content_len),
            "deleted a counted event segment"
        );
    }
    metrics
        .bus_bytes
        .set(decided.bytes_after.saturating_add(kept_bytes) as i64);
    metrics
        .segments
        .set((states.len() + kept - decided.delete.len()) as i64);
    if let Some(oldest) = decided.oldest_kept_event_ms {
        metrics.oldest_event.set(oldest as f64 / 1000.0);
    }
    metrics.blocked_bytes.set(decided.blocked_bytes as i64);
    metrics.blocked_segments.set(decided.blocked.len() as i64);
    if decided.blocked.is_empty() {
        if blocked.clear() {
            tracing::info!(
                "retention is no longer blocked: every segment past its limits is counted"
            );
        }
    } else {
        let store = unreadable.map_or(String::new(), |e| {
            format!(" (the store cannot be read: {e})")
        });
        let reason = format!(
            "{} event segment(s) ({} bytes, oldest number {}) are past file.retention or over file.max_bytes ({} bytes on disk) but not counted yet; they are kept: check the aggregators and the store{store}",
            decided.blocked.len(),
            decided.blocked_bytes,
            decided.blocked[0],
            decided.bytes_after
        );
        if blocked.set(reason.clone()) {
            tracing::error!(segments = ?decided.blocked, bytes = decided.blocked_bytes, "retention blocked: {reason}");
        }
    }
    Ok(())
}

/// What retention needs to know of one segment; `None` when it is gone.
fn inspect(
    path: &Path,
    number: u64,
    closed: bool,
    known: &mut Known,
) -> Result<Option<SegmentState>, AggregateError> {
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(crate::bus::file::FileBusError::Io {
                op: "inspect",
                path: path.to_owned(),
                source: e,
            }
            .into())
        }
    };
    // A segment deleted between the listing and now is no error.
    let gone = || !path.exists() && !compressed::compressed_path(path).exists();
    let content_len = match segment_len(path) {
        Ok(len) => len,
        Err(_) if gone() => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let times = match known.times.get(&number) {
        Some(times) => *times,
        None => {
            let times = match event_times(path) {
                Ok(times) => times,
                Err(_) if gone() => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            if closed {
                known.times.insert(number, times);
            }
            times
        }
    };
    let recent = meta
        .modified()
        .ok()
        .and_then(|m| SystemTime::now().duration_since(m).ok())
        .is_none_or(|age| age < SETTLE);
    Ok(Some(SegmentState {
        number,
        disk_bytes: meta.len(),
        content_len,
        stored: 0,
        first_event_ms: times.0,
        last_event_ms: times.1,
        settling: closed && !is_compressed(path) && recent,
    }))
}

/// Removes a segment file, in whichever form it is now.
fn delete(path: &Path) -> Result<(), AggregateError> {
    let removed = match std::fs::remove_file(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !is_compressed(path) => {
            // Compressed since it was listed.
            let packed = compressed::compressed_path(path);
            std::fs::remove_file(&packed).map_err(|e| (packed, e))
        }
        other => other.map_err(|e| (path.to_owned(), e)),
    };
    removed.map_err(|(path, source)| {
        crate::bus::file::FileBusError::Io {
            op: "delete",
            path,
            source,
        }
        .into()
    })
}
