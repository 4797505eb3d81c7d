//! Progress of long work: a bar on a terminal, periodic structured log lines everywhere else.
//!
//! One call starts it ([`Progress::events`], or [`Progress::catch_up`] for a stream read from the
//! past), `inc` or `advance` feed it, and dropping it (or [`Progress::finish`]) ends it with one
//! summary line. Whether stderr is a terminal is decided once per process: there the bars are
//! drawn by `indicatif` (at most a few times a second, so counting stays cheap) and log lines
//! written through [`LogWriter`] lift them out of the way; elsewhere (the journal, a pipe, a
//! file) no bar and no cursor control is ever written, only a `progress` log line every
//! interval, with the same figures as fields.

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How often a log line reports progress when stderr is not a terminal, unless the process sets
/// another interval with [`init`].
pub const DEFAULT_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// How the process shows progress; fixed by [`init`], or by the first bar of a process that
/// never calls it.
struct Display {
    /// Bars are drawn (stderr is a terminal); else log lines are written.
    terminal: bool,
    bars: MultiProgress,
    log_interval: Duration,
}

static DISPLAY: OnceLock<Display> = OnceLock::new();

/// Decides, once for the process, how progress is shown: bars when stderr is a terminal, else a
/// log line every `log_interval`. Later calls change nothing. A process that never calls it
/// (a test using the library) gets log lines every [`DEFAULT_LOG_INTERVAL`] and no bar: bars
/// are for the terminal of a person who ran the binary.
pub fn init(log_interval: Duration) {
    display_with(std::io::stderr().is_terminal(), log_interval);
}

fn display() -> &'static Display {
    display_with(false, DEFAULT_LOG_INTERVAL)
}

fn display_with(terminal: bool, log_interval: Duration) -> &'static Display {
    DISPLAY.get_or_init(|| {
        let target = if terminal {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        Display {
            terminal,
            bars: MultiProgress::with_draw_target(target),
            log_interval: log_interval.max(Duration::from_millis(1)),
        }
    })
}

/// Writes log lines to stderr with any progress bar lifted while the line is written, so that
/// bars and logs never overwrite each other on a terminal. Give it to the log subscriber as its
/// writer.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogWriter;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;

    fn make_writer(&'a self) -> Self::Writer {
        LogWriter
    }
}

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match DISPLAY.get().filter(|d| d.terminal) {
            Some(display) => display.bars.suspend(|| std::io::stderr().write(buf)),
            None => std::io::stderr().write(buf),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        match DISPLAY.get().filter(|d| d.terminal) {
            Some(display) => display.bars.suspend(|| std::io::stderr().write_all(buf)),
            None => std::io::stderr().write_all(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// What the bar measures.
#[derive(Debug, Clone, Copy)]
enum Measure {
    /// Events, out of a total when it is known.
    Events { total: Option<u64> },
    /// Stream time, from the event time where the work started to the wall clock: events are
    /// counted beside it, and the ETA is the time left to reach "now".
    CatchUp { from_ms: i64 },
}

/// One piece of long work being shown. Shareable between threads (`&self` everywhere).
pub struct Progress {
    task: String,
    measure: Measure,
    started: Instant,
    events: AtomicU64,
    /// With [`Measure::CatchUp`]: the newest event time reached, and the wall clock then.
    reached_ms: AtomicI64,
    now_ms: AtomicI64,
    bar: Option<ProgressBar>,
    /// When the next log line is due (no bar).
    next_log: Mutex<Instant>,
    finished: std::sync::atomic::AtomicBool,
}

impl Progress {
    /// Work counted in events: `total` of them when known (then the bar shows the fraction and
    /// the ETA), else a running count and rate.
    pub fn events(task: &str, total: Option<u64>) -> Progress {
        let style = match total {
            Some(_) => "{prefix} [{wide_bar}] {human_pos}/{human_len} events, {per_sec}, ETA {eta}",
            None => "{spinner} {prefix}: {human_pos} events, {per_sec}, {elapsed}",
        };
        let bar = Self::bar(total.unwrap_or(0), style, task, total.is_none());
        Self::new(task, Measure::Events { total }, bar)
    }

    /// Work that reads a stream from `from_ms` (event time) up to the present, as a backfill
    /// does: the bar covers stream time up to the wall clock `now_ms`, and the ETA is when the
    /// stream will have caught up at the current pace.
    pub fn catch_up(task: &str, from_ms: i64, now_ms: i64) -> Progress {
        let length = (now_ms - from_ms).max(1) as u64;
        let bar = Self::bar(
            length,
            "{prefix} [{wide_bar}] {msg}, ETA {eta}",
            task,
            false,
        );
        let progress = Self::new(task, Measure::CatchUp { from_ms }, bar);
        progress.reached_ms.store(from_ms, Ordering::Relaxed);
        progress.now_ms.store(now_ms, Ordering::Relaxed);
        progress
    }

    fn bar(length: u64, template: &str, task: &str, spinner: bool) -> Option<ProgressBar> {
        let display = display();
        if !display.terminal {
            return None;
        }
        let bar = if spinner {
            ProgressBar::new_spinner()
        } else {
            ProgressBar::new(length)
        };
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_prefix(task.to_owned());
        let bar = display.bars.add(bar);
        if spinner {
            bar.enable_steady_tick(Duration::from_millis(200));
        }
        Some(bar)
    }

    fn new(task: &str, measure: Measure, bar: Option<ProgressBar>) -> Progress {
        let started = Instant::now();
        Progress {
            task: task.to_owned(),
            measure,
            started,
            events: AtomicU64::new(0),
            reached_ms: AtomicI64::new(0),
            now_ms: AtomicI64::new(0),
            bar,
            next_log: Mutex::new(started + display().log_interval),
            finished: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Counts `events` more done.
    pub fn inc(&self, events: u64) {
        self.events.fetch_add(events, Ordering::Relaxed);
        if let Some(bar) = &self.bar {
            bar.inc(events);
        }
        self.maybe_log();
    }

    /// Counts `events` more done, the newest of them at event time `time_ms`, with the wall
    /// clock at `now_ms` (a catch-up's bar grows with the clock).
    pub fn advance(&self, events: u64, time_ms: i64, now_ms: i64) {
        self.events.fetch_add(events, Ordering::Relaxed);
        let reached = self
            .reached_ms
            .fetch_max(time_ms, Ordering::Relaxed)
            .max(time_ms);
        self.now_ms.store(now_ms, Ordering::Relaxed);
        if let (Some(bar), Measure::CatchUp { from_ms }) = (&self.bar, self.measure) {
            bar.set_length((now_ms - from_ms).max(1) as u64);
            // A clock set back must not make the range empty.
            bar.set_position((reached - from_ms).clamp(0, (now_ms - from_ms).max(0)) as u64);
            bar.set_message(format!(
                "{} events, {:.0}/s, at {}",
                self.events.load(Ordering::Relaxed),
                self.rate(),
                format_time(reached)
            ));
        } else if let Some(bar) = &self.bar {
            bar.inc(events);
        }
        self.maybe_log();
    }

    /// Events counted so far.
    pub fn count(&self) -> u64 {
        self.events.load(Ordering::Relaxed)
    }

    /// Ends the work: the bar goes and one line sums it up. Later calls, and the drop, change
    /// nothing more.
    pub fn finish(&self) {
        if self.finished.swap(true, Ordering::Relaxed) {
            return;
        }
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
            display().bars.remove(bar);
        }
        let elapsed_s = (self.started.elapsed().as_secs_f64() * 1000.0).round() / 1000.0;
        tracing::info!(
            task = %self.task,
            events = self.count(),
            elapsed_s,
            rate = self.rate().round() as u64,
            "finished"
        );
    }

    fn rate(&self) -> f64 {
        let elapsed = self.started.elapsed().as_secs_f64();
        if elapsed > 0.0 {
            self.count() as f64 / elapsed
        } else {
            0.0
        }
    }

    /// Seconds left at the current pace, when that can be told.
    fn eta_secs(&self) -> Option<u64> {
        let elapsed = self.started.elapsed().as_secs_f64();
        if elapsed <= 0.0 {
            return None;
        }
        let (done, left) = match self.measure {
            Measure::Events { total } => {
                let done = self.count() as f64;
                (done, total? as f64 - done)
            }
            Measure::CatchUp { from_ms } => {
                let reached = self.reached_ms.load(Ordering::Relaxed);
                let now = self.now_ms.load(Ordering::Relaxed);
                ((reached - from_ms) as f64, (now - reached) as f64)
            }
        };
        (done > 0.0).then(|| (left.max(0.0) / (done / elapsed)).round() as u64)
    }

    fn maybe_log(&self) {
        if self.bar.is_some() || self.finished.load(Ordering::Relaxed) {
            return;
        }
        let now = Instant::now();
        // Whoever holds the lock is writing the line that is due; the others need not wait.
        let Ok(mut next) = self.next_log.try_lock() else {
            return;
        };
        if now < *next {
            return;
        }
        *next = now + display().log_interval;
        drop(next);
        let events = self.count();
        let rate = self.rate().round() as u64;
        let eta_s = self.eta_secs();
        match self.measure {
            Measure::Events { total } => {
                tracing::info!(task = %self.task, events, total, rate, eta_s, "progress")
            }
            Measure::CatchUp { .. } => {
                let reached = format_time(self.reached_ms.load(Ordering::Relaxed));
                tracing::info!(task = %self.task, events, rate, reached = %reached, eta_s, "progress")
            }
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

/// An event time for people: RFC 3339 to the second, UTC.
fn format_time(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_else(|| ms.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_tells_the_time_left() {
        let progress = Progress::events("test", Some(100));
        progress.inc(10);
        progress.inc(15);
        assert_eq!(progress.count(), 25);
        std::thread::sleep(Duration::from_millis(5));
        // At 25 done in t, 75 more take about 3 t: some seconds, never none.
        assert!(progress.eta_secs().is_some());
        let unknown = Progress::events("test", None);
        unknown.inc(3);
        assert_eq!(unknown.eta_secs(), None);
    }

    #[test]
    fn a_catch_up_measures_stream_time() {
        let progress = Progress::catch_up("test", 0, 10_000);
        std::thread::sleep(Duration::from_millis(5));
        progress.advance(7, 5_000, 10_000);
        progress.advance(3, 4_000, 10_000); // an older event does not move it back
        assert_eq!(progress.count(), 10);
        assert_eq!(progress.reached_ms.load(Ordering::Relaxed), 5_000);
        // Half way in t: the other half takes about t more.
        let eta = progress.eta_secs().unwrap();
        assert!(eta <= progress.started.elapsed().as_secs() + 1, "{eta}");
    }
}
