//! The single writer of a bus directory: appends with rotation and the fsync policy, compresses
//! the segments it closes, and the quarantine files (bounded, synced by the same policy, each
//! record once).

use super::compressed::{compress_segment, LEVEL};
use super::lock::DirLock;
use super::{
    cut_torn_line, io_err, is_compressed, open_append, segment_name, segments, sync_dir,
    FileBusError,
};
use crate::bus::{Outgoing, Published, QuarantineRecord};
use crate::config::{FileConfig, FsyncPolicy};
use crate::metrics::FileBusMetrics;
use std::collections::{HashSet, VecDeque};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The file that remembers the newest segment number ever used, so that numbering never
/// restarts after retention (or an operator) removed segments: stored positions are keyed by
/// segment number and must never meet a new segment under an old number.
pub const LAST_SEGMENT_FILE: &str = "last-segment";
/// How many recent quarantine records a file remembers to write a repeat only once.
const QUARANTINE_MEMORY: usize = 10_000;
/// How much of a quarantine file's end is read back at open to rebuild that memory.
const QUARANTINE_TAIL_BYTES: u64 = 4 << 20;

/// How quarantine files are bounded and synced: the bus's own fsync policy, and a total cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuarantinePolicy {
    /// `file.quarantine_max_bytes`: the most all quarantine files together may hold.
    pub max_bytes: u64,
    pub fsync: FsyncPolicy,
    pub fsync_interval: Duration,
}

impl QuarantinePolicy {
    pub fn of(config: &FileConfig) -> Self {
        QuarantinePolicy {
            max_bytes: config.quarantine_max_bytes,
            fsync: config.fsync,
            fsync_interval: config.fsync_interval,
        }
    }

    /// A file is rotated at an eighth of the cap, so that deleting the oldest pieces keeps the
    /// total under it.
    fn piece_bytes(&self) -> u64 {
        (self.max_bytes / 8).max(64 * 1024)
    }
}

/// An append-only quarantine file under `<file.dir>/quarantine/`, rotated into numbered pieces
/// (`<name>.<n>.jsonl`) whose oldest are deleted to keep every quarantine file together under
/// `file.quarantine_max_bytes`.
pub struct QuarantineFile {
    dir: PathBuf,
    path: PathBuf,
    file: Option<File>,
    len: u64,
    policy: QuarantinePolicy,
    dirty: bool,
    last_sync: Instant,
    seen: RecentKeys,
}

impl QuarantineFile {
    /// The quarantine file `name` in the bus directory `dir`; created on first use.
    pub fn new(dir: &Path, name: &str, policy: QuarantinePolicy) -> Self {
        let dir = dir.join("quarantine");
        QuarantineFile {
            path: dir.join(name),
            dir,
            file: None,
            len: 0,
            policy,
            dirty: false,
            last_sync: Instant::now(),
            seen: RecentKeys::default(),
        }
    }

    /// Appends one record (synced as the policy says); returns the bytes written, 0 when the
    /// same record (a resume overlap, a batch read again after a crash) was already written.
    pub fn write(&mut self, record: &QuarantineRecord<'_>) -> Result<u64, FileBusError> {
        if self.file.is_none() {
            self.open()?;
        }
        if !self.seen.insert(record.key()) {
            return Ok(0);
        }
        let mut line = record.to_json();
        line.push(b'\n');
        if self.len > 0 && self.len + line.len() as u64 > self.policy.piece_bytes() {
            self.rotate()?;
        }
        let path = &self.path;
        if let Some(file) = self.file.as_mut() {
            if let Err(e) = file.write_all(&line) {
                // Leave no partial record behind for the next write to follow.
                let _ = file.set_len(self.len);
                self.seen.forget(record.key());
                return Err(io_err("append to", path)(e));
            }
        }
        self.len += line.len() as u64;
        self.dirty = true;
        let due = match self.policy.fsync {
            FsyncPolicy::Batch | FsyncPolicy::Never => false,
            FsyncPolicy::Interval => self.last_sync.elapsed() >= self.policy.fsync_interval,
        };
        if due {
            self.sync()?;
        }
        Ok(line.len() as u64)
    }

    /// Forces written records to disk: what the owner calls once per batch (policy `batch`), on
    /// its timer and at shutdown.
    pub fn sync(&mut self) -> Result<(), FileBusError> {
        if !self.dirty {
            return Ok(());
        }
        if let Some(file) = &self.file {
            file.sync_data().map_err(io_err("sync", &self.path))?;
        }
        self.dirty = false;
        self.last_sync = Instant::now();
        Ok(())
    }

    /// Syncs as the policy says for the end of a batch.
    pub fn sync_batch(&mut self) -> Result<(), FileBusError> {
        match self.policy.fsync {
            FsyncPolicy::Batch => self.sync(),
            FsyncPolicy::Interval if self.last_sync.elapsed() >= self.policy.fsync_interval => {
                self.sync()
            }
            FsyncPolicy::Interval | FsyncPolicy::Never => Ok(()),
        }
    }

    fn open(&mut self) -> Result<(), FileBusError> {
        std::fs::create_dir_all(&self.dir).map_err(io_err("create directory", &self.dir))?;
        let file = open_append(&self.path)?;
        self.len = cut_torn_line(&file, &self.path)?;
        self.seen = RecentKeys::from_tail(&self.path, self.len);
        self.file = Some(file);
        Ok(())
    }

    /// Moves the current file aside as the next numbered piece and deletes the oldest pieces
    /// while all quarantine files together exceed the cap.
    fn rotate(&mut self) -> Result<(), FileBusError> {
        self.sync()?;
        let stem = self
            .path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let pieces = quarantine_pieces(&self.dir)?;
        let next = pieces
            .iter()
            .filter(|p| p.stem == stem)
            .map(|p| p.number)
            .max()
            .unwrap_or(0)
            + 1;
        let rotated = self.dir.join(format!("{stem}.{next}.jsonl"));
        std::fs::rename(&self.path, &rotated).map_err(io_err("rename", &self.path))?;
        let file = open_append(&self.path)?;
        sync_dir(&self.dir)?;
        self.file = Some(file);
        self.len = 0;
        let mut total: u64 = std::fs::read_dir(&self.dir)
            .map_err(io_err("list", &self.dir))?
            .filter_map(|e| e.ok()?.metadata().ok())
            .filter(|m| m.is_file())
            .map(|m| m.len())
            .sum();
        let mut oldest_first = quarantine_pieces(&self.dir)?;
        oldest_first.sort_by_key(|p| (p.modified, p.number));
        for piece in oldest_first {
            // Room is left for the new file to grow to a piece.
            if total + self.policy.piece_bytes() <= self.policy.max_bytes {
                break;
            }
            std::fs::remove_file(&piece.path).map_err(io_err("remove", &piece.path))?;
            total = total.saturating_sub(piece.bytes);
            tracing::info!(file = %piece.path.display(), bytes = piece.bytes, cap = self.policy.max_bytes, "deleted the oldest quarantine file to stay under file.quarantine_max_bytes");
        }
        Ok(())
    }
}

/// A rotated quarantine file.
struct Piece {
    path: PathBuf,
    stem: String,
    number: u64,
    bytes: u64,
    modified: std::time::SystemTime,
}

/// The rotated pieces (`<stem>.<n>.jsonl`) in a quarantine directory.
fn quarantine_pieces(dir: &Path) -> Result<Vec<Piece>, FileBusError> {
    let mut pieces = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err("list", dir))? {
        let entry = entry.map_err(io_err("list", dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_suffix(".jsonl") else {
            continue;
        };
        let Some((stem, number)) = rest.rsplit_once('.') else {
            continue;
        };
        let Ok(number) = number.parse::<u64>() else {
            continue;
        };
        let Ok(meta) = entry.metadata() else {
            continue;
        };
        pieces.push(Piece {
            path: entry.path(),
            stem: stem.to_owned(),
            number,
            bytes: meta.len(),
            modified: meta.modified().unwrap_or(std::time::UNIX_EPOCH),
        });
    }
    Ok(pieces)
}

/// The keys of the newest quarantine records, oldest first, at most [`QUARANTINE_MEMORY`].
#[derive(Default)]
struct RecentKeys {
    set: HashSet<u64>,
    order: VecDeque<u64>,
}

impl RecentKeys {
    /// The keys of the records at the end of the file at `path` (`len` bytes of whole lines).
    fn from_tail(path: &Path, len: u64) -> Self {
        use std::os::unix::fs::FileExt;
        let mut keys = RecentKeys::default();
        let from = len.saturating_sub(QUARANTINE_TAIL_BYTES);
        let mut text = vec![0u8; (len - from) as usize];
        let read = File::open(path).and_then(|f| f.read_exact_at(&mut text, from));
        if read.is_err() {
            return keys;
        }
        // The first line may be cut by the window; it does not parse and is passed over.
        for line in text.split(|&b| b == b'\n') {
            if let Some(key) = QuarantineRecord::key_of_line(line) {
                keys.insert(key);
            }
        }
        keys
    }

    /// Remembers `key`; false when it was already there.
    fn insert(&mut self, key: u64) -> bool {
        if !self.set.insert(key) {
            return false;
        }
        self.order.push_back(key);
        if self.order.len() > QUARANTINE_MEMORY {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }

    fn forget(&mut self, key: u64) {
        self.set.remove(&key);
        self.order.retain(|k| *k != key);
    }
}

/// The single writer of a bus directory.
pub struct SegmentWriter {
    dir: PathBuf,
    segment_bytes: u64,
    fsync: FsyncPolicy,
    fsync_interval: Duration,
    file: File,
    path: PathBuf,
    seq: u64,
    len: u64,
    dirty: bool,
    last_sync: Instant,
    quarantine: QuarantineFile,
    batch: Vec<u8>,
    metrics: FileBusMetrics,
    /// Held for the writer's lifetime: one writer per directory.
    _lock: DirLock,
}

impl SegmentWriter {
    /// Takes the directory's writer lock, opens the newest segment for appending (creating the
    /// directory and a first segment if needed), cuts a torn last line left by a crash, and
    /// compresses, in the background, closed segments a crash left plain.
    pub fn open(config: &FileConfig, metrics: FileBusMetrics) -> Result<Self, FileBusError> {
        let dir = config.dir.clone();
        std::fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
        let lock = DirLock::acquire(&dir)?;
        remove_partial_compressions(&dir);
        let existing = segments(&dir)?;
        let remembered = read_last_segment(&dir);
        let (seq, path) = match existing.last() {
            Some((seq, path)) if *seq >= remembered && !is_compressed(path) => {
                (*seq, path.to_path_buf())
            }
            newest => {
                // Nothing to append to: a new segment after every number ever used.
                let seq = newest.map_or(0, |(seq, _)| *seq).max(remembered) + 1;
                (seq, dir.join(segment_name(seq)))
            }
        };
        let fresh = !path.exists();
        let file = open_append(&path)?;
        let len = cut_torn_line(&file, &path)?;
        if fresh {
            metrics.segments.inc();
            write_last_segment(&dir, seq)?;
            sync_dir(&dir)?;
        }
        let closed: Vec<PathBuf> = existing
            .into_iter()
            .filter(|(number, p)| *number < seq && !is_compressed(p))
            .map(|(_, p)| p)
            .collect();
        if !closed.is_empty() {
            spawn_compression(closed, metrics.clone());
        }
        Ok(SegmentWriter {
            dir,
            segment_bytes: config.segment_bytes,
            fsync: config.fsync,
            fsync_interval: config.fsync_interval,
            file,
            path,
            seq,
            len,
            dirty: false,
            last_sync: Instant::now(),
            quarantine: QuarantineFile::new(
                &config.dir,
                "quarantine.jsonl",
                QuarantinePolicy::of(config),
            ),
            batch: Vec::new(),
            metrics,
            _lock: lock,
        })
    }

    /// The size at which a segment is closed (`file.segment_bytes`).
    pub fn segment_bytes(&self) -> usize {
        usize::try_from(self.segment_bytes).unwrap_or(usize::MAX)
    }

    /// Appends the bus lines of `events` in one write, synced as the policy says.
    pub fn publish(&mut self, events: &[Outgoing<'_>]) -> Result<Published, FileBusError> {
        let mut batch = std::mem::take(&mut self.batch);
        batch.clear();
        for event in events {
            super::encode_record(event.sse_id, event.data, &mut batch);
        }
        let appended = self.append(&batch, events.len() as u64);
        self.batch = batch;
        appended?;
        // Quarantined events of the batch are synced with it, not one by one.
        self.quarantine.sync_batch()?;
        Ok(Published {
            events: events.len() as u64,
            ..Published::default()
        })
    }

    /// Appends complete lines (each ending in `\n`) and syncs them as the policy says. Lines are
    /// never split across segments. When the disk refuses them, the segment is cut back to its
    /// length before the call, so that the same lines can be appended again once it takes them.
    pub fn append(&mut self, lines: &[u8], count: u64) -> Result<(), FileBusError> {
        if lines.is_empty() {
            return Ok(());
        }
        if self.len > 0 && self.len + lines.len() as u64 > self.segment_bytes {
            self.rotate()?;
        }
        if let Err(e) = self.file.write_all(lines) {
            self.metrics.errors.inc();
            self.cut_back();
            return Err(io_err("append to", &self.path)(e));
        }
        self.dirty = true;
        let synced = match self.fsync {
            FsyncPolicy::Batch => self.sync(),
            FsyncPolicy::Interval if self.last_sync.elapsed() >= self.fsync_interval => self.sync(),
            FsyncPolicy::Interval | FsyncPolicy::Never => Ok(()),
        };
        if let Err(e) = synced {
            // Lines whose sync failed may not be on the disk: take them back so that the
            // caller's retry writes them again rather than trusting them.
            self.cut_back();
            return Err(e);
        }
        self.len += lines.len() as u64;
        self.metrics.events.inc_by(count);
        self.metrics.bytes.inc_by(lines.len() as u64);
        Ok(())
    }

    /// Cuts the segment back to the lines accepted so far.
    fn cut_back(&mut self) {
        if let Err(e) = self.file.set_len(self.len) {
            // The next open cuts the torn line; until then appends keep failing and retrying.
            tracing::warn!(file = %self.path.display(), error = %e, "cannot cut back a failed append");
        }
    }

    /// Forces written data to disk now (policy `never` included: this is what shutdown calls).
    pub fn sync(&mut self) -> Result<(), FileBusError> {
        self.quarantine.sync()?;
        if !self.dirty {
            return Ok(());
        }
        let started = Instant::now();
        if let Err(e) = self.file.sync_data() {
            self.metrics.errors.inc();
            return Err(io_err("sync", &self.path)(e));
        }
        self.metrics
            .fsync_seconds
            .observe(started.elapsed().as_secs_f64());
        self.dirty = false;
        self.last_sync = Instant::now();
        Ok(())
    }

    /// How often [`SegmentWriter::sync_if_due`] should run: only `fsync = "interval"` needs a
    /// timer.
    pub fn sync_interval(&self) -> Option<Duration> {
        (self.fsync == FsyncPolicy::Interval).then_some(self.fsync_interval)
    }

    /// With `fsync = "interval"`, syncs data that has waited long enough; called on a timer.
    pub fn sync_if_due(&mut self) -> Result<(), FileBusError> {
        if self.fsync == FsyncPolicy::Interval && self.last_sync.elapsed() >= self.fsync_interval {
            self.sync()?;
        }
        Ok(())
    }

    /// Keeps an invalid event, with its reason, in the quarantine file (once, however often
    /// upstream repeats it), synced with the next batch.
    pub fn quarantine(&mut self, record: &QuarantineRecord<'_>) -> Result<(), FileBusError> {
        let bytes = self.quarantine.write(record)?;
        self.metrics.quarantine_bytes.inc_by(bytes);
        Ok(())
    }

    /// The segment being written.
    pub fn current_segment(&self) -> &Path {
        &self.path
    }

    fn rotate(&mut self) -> Result<(), FileBusError> {
        // The old segment is complete: make it durable before anything lands in the next one.
        self.dirty = true;
        self.sync()?;
        let seq = self.seq + 1;
        let path = self.dir.join(segment_name(seq));
        let file = open_append(&path)?;
        write_last_segment(&self.dir, seq)?;
        sync_dir(&self.dir)?;
        self.metrics.segments.inc();
        tracing::info!(segment = %path.display(), "started a new event segment");
        let closed = std::mem::replace(&mut self.path, path);
        self.file = file;
        self.seq = seq;
        self.len = 0;
        spawn_compression(vec![closed], self.metrics.clone());
        Ok(())
    }
}

/// Compresses closed segments on a thread of their own, oldest first: the ingest path never
/// waits for it. A failure leaves the segment plain (readers read both forms); the writer's
/// next start tries again.
fn spawn_compression(closed: Vec<PathBuf>, metrics: FileBusMetrics) {
    let spawned = std::thread::Builder::new()
        .name("pleiades-compress".into())
        .spawn(move || {
            run_when_idle();
            for path in closed {
                let started = Instant::now();
                match compress_segment(&path, LEVEL) {
                    Ok(done) => {
                        metrics.compressed_segments.inc();
                        metrics.compressed_content_bytes.inc_by(done.content_bytes);
                        metrics.compressed_bytes.inc_by(done.compressed_bytes);
                        tracing::info!(
                            segment = %done.path.display(),
                            content_bytes = done.content_bytes,
                            compressed_bytes = done.compressed_bytes,
                            seconds = started.elapsed().as_secs_f64(),
                            "compressed a closed event segment"
                        );
                    }
                    Err(error) if error.is_not_found() => {
                        tracing::debug!(segment = %path.display(), "a closed event segment was deleted by retention before it was compressed");
                    }
                    Err(error) => {
                        metrics.errors.inc();
                        tracing::warn!(segment = %path.display(), %error, "cannot compress a closed event segment; it stays as it is");
                    }
                }
            }
        });
    if let Err(error) = spawned {
        tracing::warn!(%error, "cannot start compressing closed event segments");
    }
}

/// Puts the calling thread in the idle scheduling class: it runs only on a core nothing else
/// wants. Compressing is background work, and a backfill keeps the cores busy in bursts: a nice
/// value only shrinks its share, so each wake-up of the ingester or an aggregator may still
/// wait behind it, while an idle-class thread gives way at once. Where the class is refused
/// (not Linux), the lowest nice value is the fallback.
fn run_when_idle() {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: `param` outlives the call, which only reads it; 0 names this thread.
        if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } == 0 {
            return;
        }
    }
    // SAFETY: setpriority reads no memory of ours; a refusal only leaves the priority.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, 19);
    }
}

/// Removes compressions a crash interrupted (`….zst.tmp-<pid>`); only the lock holder writes
/// them, and it holds the lock now.
fn remove_partial_compressions(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("segment-") && name.contains(".zst.tmp-") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

fn read_last_segment(dir: &Path) -> u64 {
    std::fs::read_to_string(dir.join(LAST_SEGMENT_FILE))
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(0)
}

/// Records `seq` as the newest segment number used (written aside, then renamed into place).
fn write_last_segment(dir: &Path, seq: u64) -> Result<(), FileBusError> {
    let path = dir.join(LAST_SEGMENT_FILE);
    let temporary = dir.join(format!("{LAST_SEGMENT_FILE}.tmp"));
    std::fs::write(&temporary, format!("{seq}\n")).map_err(io_err("append to", &temporary))?;
    std::fs::rename(&temporary, &path).map_err(io_err("append to", &path))?;
    Ok(())
}
