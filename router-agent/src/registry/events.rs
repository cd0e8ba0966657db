//! The recent registry events (containers added and removed, state changes, overrides) for
//! the dashboard and `GET /api/events`: a small ring buffer the registry appends to and the admin
//! API reads. Only those two touch its lock, never the request path.
use std::{collections::VecDeque, sync::Mutex};

use serde::Serialize;

use super::entry::unix_ms;

/// Events kept; older ones fall off.
pub const EVENTS_KEPT: usize = 200;

#[derive(Serialize, Clone, Debug)]
pub struct Event {
    /// Increases by one per event, so a poller can ask only for what it has not seen.
    pub seq: u64,
    pub at_unix_ms: u64,
    pub container: String,
    pub event: String,
}

#[derive(Default)]
pub struct EventLog {
    inner: Mutex<(u64, VecDeque<Event>)>,
}

impl EventLog {
    pub fn push(&self, container: &str, event: String) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        let (next, events) = &mut *inner;
        *next += 1;
        if events.len() == EVENTS_KEPT {
            events.pop_front();
        }
        events.push_back(Event {
            seq: *next,
            at_unix_ms: unix_ms(),
            container: container.to_owned(),
            event,
        });
    }

    /// The events after `seq` (all kept ones for 0), oldest first.
    pub fn since(&self, seq: u64) -> Vec<Event> {
        self.inner.lock().map_or_else(
            |_| Vec::new(),
            |inner| inner.1.iter().filter(|e| e.seq > seq).cloned().collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_latest_and_filters_by_seq() {
        let log = EventLog::default();
        for i in 0..(EVENTS_KEPT + 5) {
            log.push("c", format!("e{i}"));
        }
        let all = log.since(0);
        assert_eq!(all.len(), EVENTS_KEPT);
        assert_eq!(all[0].event, "e5");
        let last = all.last().unwrap().seq;
        assert!(log.since(last).is_empty());
        assert_eq!(log.since(last - 2).len(), 2);
    }
}
