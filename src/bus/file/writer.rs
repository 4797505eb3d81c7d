//! The single writer of a bus directory: appends with rotation and the fsync policy, and the
//! quarantine files.

use super::{cut_torn_line, io_err, open_append, segment_name, segments, sync_dir, FileBusError};
use crate::bus::{Outgoing, Published, QuarantineRecord};
use crate::config::{FileConfig, FsyncPolicy};
use crate::metrics::FileBusMetrics;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// An append-only quarantine file under `<file.dir>/quarantine/`.
pub struct QuarantineFile {
    path: PathBuf,
    file: Option<File>,
}

impl QuarantineFile {
    /// The quarantine file `name` in the bus directory `dir`; created on first use.
    pub fn new(dir: &Path, name: &str) -> Self {
        QuarantineFile {
            path: dir.join("quarantine").join(name),
            file: None,
        }
    }

    /// Appends one record and syncs it; returns the bytes written.
    pub fn write(&mut self, record: &QuarantineRecord<'_>) -> Result<u64, FileBusError> {
        let path = &self.path;
        if self.file.is_none() {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
            }
            let file = open_append(path)?;
            cut_torn_line(&file, path)?;
            self.file = Some(file);
        }
        let mut line = record.to_json();
        line.push(b'\n');
        if let Some(file) = self.file.as_mut() {
            file.write_all(&line).map_err(io_err("append to", path))?;
            file.sync_data().map_err(io_err("sync", path))?;
        }
        Ok(line.len() as u64)
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
}

impl SegmentWriter {
    /// Opens the newest segment for appending (creating the directory and a first segment if
    /// needed) and cuts a torn last line left by a crash.
    pub fn open(config: &FileConfig, metrics: FileBusMetrics) -> Result<Self, FileBusError> {
        let dir = config.dir.clone();
        std::fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
        let existing = segments(&dir)?;
        let (seq, path) = match existing.last() {
            Some((seq, path)) => (*seq, path.to_path_buf()),
            None => (1, dir.join(segment_name(1))),
        };
        let file = open_append(&path)?;
        let len = cut_torn_line(&file, &path)?;
        if existing.is_empty() {
            metrics.segments.inc();
            sync_dir(&dir)?;
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
            quarantine: QuarantineFile::new(&config.dir, "quarantine.jsonl"),
            batch: Vec::new(),
            metrics,
        })
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
        Ok(Published {
            events: events.len() as u64,
            ..Published::default()
        })
    }

    /// Appends complete lines (each ending in `\n`) and syncs them as the policy says. Lines are
    /// never split across segments.
    pub fn append(&mut self, lines: &[u8], count: u64) -> Result<(), FileBusError> {
        if lines.is_empty() {
            return Ok(());
        }
        if self.len > 0 && self.len + lines.len() as u64 > self.segment_bytes {
            self.rotate()?;
        }
        if let Err(e) = self.file.write_all(lines) {
            self.metrics.errors.inc();
            return Err(io_err("append to", &self.path)(e));
        }
        self.len += lines.len() as u64;
        self.dirty = true;
        self.metrics.events.inc_by(count);
        self.metrics.bytes.inc_by(lines.len() as u64);
        match self.fsync {
            FsyncPolicy::Batch => self.sync()?,
            FsyncPolicy::Interval if self.last_sync.elapsed() >= self.fsync_interval => {
                self.sync()?
            }
            FsyncPolicy::Interval | FsyncPolicy::Never => {}
        }
        Ok(())
    }

    /// Forces written data to disk now (policy `never` included: this is what shutdown calls).
    pub fn sync(&mut self) -> Result<(), FileBusError> {
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

    /// Keeps an invalid event, with its reason, in the quarantine file.
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
        sync_dir(&self.dir)?;
        self.metrics.segments.inc();
        tracing::info!(segment = %path.display(), "started a new event segment");
        self.file = file;
        self.path = path;
        self.seq = seq;
        self.len = 0;
        Ok(())
    }
}
