//! The ingest cursor: where to resume upstream, and the window of recently delivered `meta.id`s.
//!
//! Both are rebuilt from the bus tail after a restart, so they always agree with what the bus
//! durably holds: the cursor can never run ahead of the data.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

/// A bounded first-in, first-out set of event ids.
#[derive(Debug)]
pub struct DedupeWindow {
    capacity: usize,
    seen: HashSet<Arc<str>>,
    order: VecDeque<Arc<str>>,
}

impl DedupeWindow {
    /// A window remembering at most `capacity` ids.
    pub fn new(capacity: usize) -> Self {
        DedupeWindow {
            capacity: capacity.max(1),
            seen: HashSet::new(),
            order: VecDeque::new(),
        }
    }

    /// Remembers `id`; returns false when it was already in the window (a repeat).
    pub fn insert(&mut self, id: &str) -> bool {
        if self.seen.contains(id) {
            return false;
        }
        if self.order.len() == self.capacity {
            if let Some(oldest) = self.order.pop_front() {
                self.seen.remove(&oldest);
            }
        }
        let id: Arc<str> = Arc::from(id);
        self.seen.insert(id.clone());
        self.order.push_back(id);
        true
    }

    /// True when `id` is remembered (it was delivered recently).
    pub fn contains(&self, id: &str) -> bool {
        self.seen.contains(id)
    }

    /// How many ids are remembered now.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// True when nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

/// Where the ingester stands: the last SSE id whose events are all on the bus, and the repeats
/// filter.
#[derive(Debug)]
pub struct Cursor {
    pub last_id: Option<String>,
    pub window: DedupeWindow,
}

impl Cursor {
    /// Rebuilds the cursor from the bus tail. With `resume` off the position is forgotten (start
    /// at "now"), but the window is kept: repeats are still repeats.
    pub fn from_tail(tail: crate::bus::Tail, capacity: usize, resume: bool) -> Self {
        let mut window = DedupeWindow::new(capacity);
        for id in &tail.recent_ids {
            window.insert(id);
        }
        Cursor {
            last_id: if resume { tail.last_id } else { None },
            window,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_repeats_and_forgets_the_oldest() {
        let mut w = DedupeWindow::new(3);
        assert!(w.insert("a"));
        assert!(!w.insert("a"));
        assert!(w.insert("b"));
        assert!(w.insert("c"));
        assert!(w.insert("d")); // evicts a
        assert_eq!(w.len(), 3);
        assert!(w.insert("a"));
        assert!(!w.insert("d"));
    }
}
