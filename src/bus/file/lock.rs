//! One writer per bus directory: an exclusive `flock(2)` on `<file.dir>/writer.lock`, held for as
//! long as the writer lives, whatever started it (the daemon or `pleiades ingest`). The file
//! names the holder (process id, host, start time) so that a refused second writer can say who
//! has the bus. The kernel drops the lock when the holder exits, `kill -9` included, so a stale
//! lock file never blocks a restart.

use super::{io_err, FileBusError};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::Path;

/// The lock file's name inside `file.dir`.
pub const LOCK_FILE: &str = "writer.lock";

/// The held lock; dropping it releases the directory.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

impl DirLock {
    /// Takes the lock on `dir` without waiting, or says who holds it.
    pub fn acquire(dir: &Path) -> Result<DirLock, FileBusError> {
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_err("open", &path))?;
        // SAFETY: flock(2) on a descriptor this function owns; it touches no memory.
        let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if locked != 0 {
            let error = std::io::Error::last_os_error();
            if error.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(io_err("lock", &path)(error));
            }
            // The holder writes who it is just after it takes the lock: a writer started at
            // the same moment gives it half a second to do so, so that the refusal names it.
            let deadline = std::time::Instant::now() + std::time::Duration::from_millis(500);
            let mut holder = String::new();
            loop {
                holder.clear();
                let _ = file
                    .seek(SeekFrom::Start(0))
                    .and_then(|_| file.read_to_string(&mut holder));
                if !holder.trim().is_empty() || std::time::Instant::now() >= deadline {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            let holder = holder.trim();
            return Err(FileBusError::Locked {
                dir: dir.to_owned(),
                holder: if holder.is_empty() {
                    "a process that has not yet said who it is".to_owned()
                } else {
                    holder.to_owned()
                },
            });
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let holder = format!(
            "held by pid {} on {} since {}",
            std::process::id(),
            host.trim(),
            chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        );
        file.set_len(0)
            .and_then(|_| file.seek(SeekFrom::Start(0)))
            .and_then(|_| file.write_all(holder.as_bytes()))
            .map_err(io_err("write", &path))?;
        Ok(DirLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_writer_is_refused_with_the_holder_named_until_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let first = DirLock::acquire(dir.path()).unwrap();
        let refused = DirLock::acquire(dir.path()).unwrap_err();
        let text = refused.to_string();
        assert!(matches!(refused, FileBusError::Locked { .. }), "{text}");
        assert!(
            text.contains(&format!("pid {}", std::process::id())),
            "{text}"
        );
        drop(first);
        DirLock::acquire(dir.path()).expect("free again once the holder is gone");
    }
}
