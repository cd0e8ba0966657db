//! Harness for the end-to-end tests: a real Docker engine, real containers, the real
//! `router-agent` binary, real HTTP clients. Nothing here fakes a component.
//!
//! Tests panic on setup failures with the command and its output, and wait on deadlines rather
//! than fixed sleeps.
pub mod agent;
pub mod client;
pub mod cluster;
pub mod docker;
pub mod inject;
pub mod netns;

use std::time::{Duration, Instant};

/// A name unique to this test process and call, for containers, domains and namespaces.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{}-{n}", std::process::id())
}

/// Polls `condition` until it holds or `timeout` passes; panics with `what` on timeout.
pub fn wait_for(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub mod pattern;
pub mod stream;
pub mod tools;
pub mod ws;
