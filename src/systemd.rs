//! systemd integration: readiness, watchdog and stopping notices over `$NOTIFY_SOCKET`
//! (the `sd_notify` protocol: one datagram of `KEY=value` lines per notice).
//!
//! Written against the protocol rather than libsystemd so that the binary links nothing extra
//! and works (doing nothing) wherever systemd is absent.

use std::collections::HashMap;
use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::PathBuf;
use std::time::Duration;

/// Where and how often to notify; empty when not started by systemd with `Type=notify`.
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    socket: Option<String>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` from the given environment.
    pub fn from_env(env: &HashMap<String, String>) -> Self {
        let socket = env.get("NOTIFY_SOCKET").filter(|s| !s.is_empty()).cloned();
        let for_us = env
            .get("WATCHDOG_PID")
            .is_none_or(|pid| pid.parse::<u32>().ok() == Some(std::process::id()));
        let watchdog = env
            .get("WATCHDOG_USEC")
            .and_then(|usec| usec.parse::<u64>().ok())
            .filter(|usec| *usec > 0 && for_us)
            .map(Duration::from_micros);
        Notifier { socket, watchdog }
    }

    /// True when systemd listens.
    pub fn enabled(&self) -> bool {
        self.socket.is_some()
    }

    /// How often to ping the watchdog: half its timeout, as systemd recommends.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.socket.as_ref()?;
        self.watchdog.map(|timeout| timeout / 2)
    }

    /// Sends one notice such as `READY=1`; does nothing without a socket.
    pub fn notify(&self, state: &str) -> io::Result<()> {
        let Some(socket) = &self.socket else {
            return Ok(());
        };
        let address = if let Some(name) = socket.strip_prefix('@') {
            // An abstract socket (Linux): the name without the leading '@'.
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name.as_bytes())?
        } else {
            SocketAddr::from_pathname(PathBuf::from(socket))?
        };
        let datagram = UnixDatagram::unbound()?;
        datagram.send_to_addr(state.as_bytes(), &address)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_environment_and_sends_datagrams() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        let env = HashMap::from([
            ("NOTIFY_SOCKET".to_owned(), path.display().to_string()),
            ("WATCHDOG_USEC".to_owned(), "2000000".to_owned()),
        ]);
        let notifier = Notifier::from_env(&env);
        assert_eq!(notifier.watchdog_interval(), Some(Duration::from_secs(1)));
        notifier.notify("READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");

        let other_pid = HashMap::from([
            ("NOTIFY_SOCKET".to_owned(), path.display().to_string()),
            ("WATCHDOG_USEC".to_owned(), "2000000".to_owned()),
            ("WATCHDOG_PID".to_owned(), "1".to_owned()),
        ]);
        assert_eq!(Notifier::from_env(&other_pid).watchdog_interval(), None);
        assert!(!Notifier::from_env(&HashMap::new()).enabled());
        Notifier::default().notify("READY=1").unwrap();
    }
}
