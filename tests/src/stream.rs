//! A steady stream of requests in a background thread, each on a new connection, recording when
//! it started and how it ended, for failover measurements.
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::client;

#[derive(Debug, Clone)]
pub struct Outcome {
    pub started: Instant,
    pub took: Duration,
    /// The answering backend's short id, or what went wrong.
    pub result: Result<String, String>,
}

pub struct RequestStream {
    stop: Arc<AtomicBool>,
    /// Requests finished so far.
    done: Arc<AtomicUsize>,
    handle: Option<JoinHandle<Vec<Outcome>>>,
}

impl RequestStream {
    /// Requests `path` with this Host header back to back until stopped.
    pub fn start(addr: SocketAddr, host: &str, path: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicUsize::new(0));
        let (host, path, flag, counter) =
            (host.to_owned(), path.to_owned(), stop.clone(), done.clone());
        let handle = std::thread::spawn(move || {
            let mut outcomes = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                let started = Instant::now();
                let result = match client::get(addr, &host, &path, &[]) {
                    Ok(r) if r.status == 200 => r
                        .backend()
                        .map(str::to_owned)
                        .ok_or_else(|| "no X-Backend".to_owned()),
                    Ok(r) => Err(format!("HTTP {}", r.status)),
                    Err(e) => Err(e.to_string()),
                };
                outcomes.push(Outcome {
                    started,
                    took: started.elapsed(),
                    result,
                });
                counter.fetch_add(1, Ordering::Relaxed);
                // A steady pace rather than a flood: the backends and the router share 2 cores.
                std::thread::sleep(Duration::from_millis(2));
            }
            outcomes
        });
        Self {
            stop,
            done,
            handle: Some(handle),
        }
    }

    /// Requests finished so far (for waiting until enough ran).
    pub fn count(&self) -> usize {
        self.done.load(Ordering::Relaxed)
    }

    pub fn finish(mut self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .take()
            .expect("joined once")
            .join()
            .expect("stream thread")
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
