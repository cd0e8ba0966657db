//! Backend health: the pure state machine. Probing itself lives in `probe`.
//!
//! Several independent signals decide whether a backend gets traffic, and the published state is
//! derived from them rather than stored (Pingora's `ready = healthy && enabled`): the active
//! probe's verdict, Docker's own HEALTHCHECK status, passive failures seen by the proxy, and
//! whether Docker is stopping the container (draining, which is not a health verdict).
use serde::{Deserialize, Serialize};

/// What the routing table and the admin API show for a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    /// Has a probe (ours or Docker's) that has not passed yet: no traffic.
    Starting,
    Up,
    Down,
    /// Docker is stopping it: no new requests, in-flight ones finish.
    Draining,
    /// An operator drained it (`router-agent ctl drain`): no new requests, in-flight ones and
    /// sticky sessions finish. Not a health verdict; the probes go on.
    Drained,
    /// An operator put it in maintenance: out of rotation whatever its probes say.
    Maintenance,
}

/// Docker's HEALTHCHECK status, when the image or run defines one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DockerHealth {
    Starting,
    Healthy,
    Unhealthy,
}

impl DockerHealth {
    /// The `State.Health.Status` / `health_status: <x>` spelling.
    pub fn from_docker(status: &str) -> Option<Self> {
        match status.trim() {
            "starting" => Some(Self::Starting),
            "healthy" => Some(Self::Healthy),
            "unhealthy" => Some(Self::Unhealthy),
            _ => None,
        }
    }
}

/// Verdict of an active probe, from consecutive results (Kubernetes' threshold semantics).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProbeVerdict {
    /// No result has passed yet.
    Pending,
    Passing,
    Failing,
}

#[derive(Clone, Debug)]
pub struct ProbeTracker {
    verdict: ProbeVerdict,
    consecutive_successes: u32,
    consecutive_failures: u32,
    success_threshold: u32,
    failure_threshold: u32,
}

impl ProbeTracker {
    pub fn new(success_threshold: u32, failure_threshold: u32) -> Self {
        Self {
            verdict: ProbeVerdict::Pending,
            consecutive_successes: 0,
            consecutive_failures: 0,
            success_threshold: success_threshold.max(1),
            failure_threshold: failure_threshold.max(1),
        }
    }

    pub fn verdict(&self) -> ProbeVerdict {
        self.verdict
    }

    /// Records one probe result; a result of the other kind resets the opposite counter.
    pub fn record(&mut self, success: bool) {
        if success {
            self.consecutive_failures = 0;
            self.consecutive_successes = self.consecutive_successes.saturating_add(1);
            if self.consecutive_successes >= self.success_threshold {
                self.verdict = ProbeVerdict::Passing;
            }
        } else {
            self.consecutive_successes = 0;
            self.consecutive_failures = self.consecutive_failures.saturating_add(1);
            // Failures before the first pass keep the backend starting, as "not yet passed".
            if self.consecutive_failures >= self.failure_threshold
                && self.verdict == ProbeVerdict::Passing
            {
                self.verdict = ProbeVerdict::Failing;
            }
        }
    }

    /// A connection error seen by the proxy: the backend is failing now, without waiting for
    /// the threshold (the proxy has already moved the request elsewhere).
    pub fn force_failing(&mut self) {
        self.consecutive_successes = 0;
        self.consecutive_failures = self.failure_threshold;
        self.verdict = ProbeVerdict::Failing;
    }
}

/// All the signals for one backend container.
#[derive(Clone, Debug)]
pub struct BackendHealth {
    /// `None` without a probe label.
    pub probe: Option<ProbeTracker>,
    pub docker: Option<DockerHealth>,
    /// Set by a passive failure on a backend without an active probe; cleared by a successful
    /// recovery check.
    pub passive_down: bool,
    pub draining: bool,
}

impl BackendHealth {
    pub fn new(probe: Option<ProbeTracker>, docker: Option<DockerHealth>) -> Self {
        Self {
            probe,
            docker,
            passive_down: false,
            draining: false,
        }
    }

    pub fn state(&self) -> BackendState {
        if self.draining {
            return BackendState::Draining;
        }
        let probe = self.probe.as_ref().map(ProbeTracker::verdict);
        if self.passive_down
            || probe == Some(ProbeVerdict::Failing)
            || self.docker == Some(DockerHealth::Unhealthy)
        {
            return BackendState::Down;
        }
        if probe == Some(ProbeVerdict::Pending) || self.docker == Some(DockerHealth::Starting) {
            return BackendState::Starting;
        }
        BackendState::Up
    }

    /// A connection to the backend failed.
    pub fn record_passive_failure(&mut self) {
        match &mut self.probe {
            Some(probe) => probe.force_failing(),
            None => self.passive_down = true,
        }
    }
}

/// Whether passive health may take one more `up` backend out of a route on the strength of
/// failed exchanges alone. Such failures can be caused by the requests themselves (a request
/// that makes every replica close without answering), so at least half of the route's
/// backends always stay in: one client can never empty a route. Refused connections and
/// failing health checks are not limited by this: they are the backend's own verdict.
pub fn may_eject(up_now: usize, backends: usize) -> bool {
    up_now > backends.div_ceil(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ejection_keeps_half_the_route() {
        let cases = [
            // (up now, backends in the route, may eject one more)
            (1, 1, false),
            (2, 2, true),
            (1, 2, false),
            (3, 3, true),
            (2, 3, false),
            (4, 4, true),
            (3, 4, true),
            (2, 4, false),
            (0, 3, false),
            (5, 10, false),
            (6, 10, true),
        ];
        for (up, backends, expected) in cases {
            assert_eq!(
                may_eject(up, backends),
                expected,
                "up={up} backends={backends}"
            );
        }
    }

    /// Feeds results ('+' success, '-' failure) and returns the verdict after each.
    fn run(success_threshold: u32, failure_threshold: u32, results: &str) -> String {
        let mut tracker = ProbeTracker::new(success_threshold, failure_threshold);
        results
            .chars()
            .map(|c| {
                tracker.record(c == '+');
                match tracker.verdict() {
                    ProbeVerdict::Pending => 'P',
                    ProbeVerdict::Passing => 'U',
                    ProbeVerdict::Failing => 'D',
                }
            })
            .collect()
    }

    #[test]
    fn thresholds() {
        let cases = [
            // (success, failure, results, verdicts)
            (1, 3, "+", "U"),
            (1, 3, "---", "PPP"),
            (1, 3, "+---", "UUUD"),
            (1, 3, "+--+--", "UUUUUU"),
            (1, 3, "+---+", "UUUDU"),
            (2, 1, "+-++", "PPPU"),
            (2, 1, "++-+", "PUDD"),
            (2, 1, "++-++", "PUDDU"),
            (3, 2, "+++--+++", "PPUUDDDU"),
        ];
        for (s, f, results, expected) in cases {
            assert_eq!(
                run(s, f, results),
                expected,
                "success={s} failure={f} {results}"
            );
        }
    }

    #[test]
    fn derived_state() {
        let passing = || {
            let mut t = ProbeTracker::new(1, 1);
            t.record(true);
            t
        };
        let cases = [
            (BackendHealth::new(None, None), BackendState::Up),
            (
                BackendHealth::new(Some(ProbeTracker::new(1, 1)), None),
                BackendState::Starting,
            ),
            (BackendHealth::new(Some(passing()), None), BackendState::Up),
            (
                BackendHealth::new(None, Some(DockerHealth::Starting)),
                BackendState::Starting,
            ),
            (
                BackendHealth::new(None, Some(DockerHealth::Healthy)),
                BackendState::Up,
            ),
            (
                BackendHealth::new(None, Some(DockerHealth::Unhealthy)),
                BackendState::Down,
            ),
            (
                BackendHealth::new(Some(passing()), Some(DockerHealth::Starting)),
                BackendState::Starting,
            ),
            (
                BackendHealth::new(Some(passing()), Some(DockerHealth::Unhealthy)),
                BackendState::Down,
            ),
        ];
        for (i, (health, expected)) in cases.into_iter().enumerate() {
            assert_eq!(health.state(), expected, "case {i}");
            let mut draining = health.clone();
            draining.draining = true;
            assert_eq!(
                draining.state(),
                BackendState::Draining,
                "case {i} draining"
            );
        }
    }

    #[test]
    fn passive_failure_takes_backend_down_at_once() {
        let mut without_probe = BackendHealth::new(None, None);
        without_probe.record_passive_failure();
        assert_eq!(without_probe.state(), BackendState::Down);

        let mut probe = ProbeTracker::new(1, 3);
        probe.record(true);
        let mut with_probe = BackendHealth::new(Some(probe), None);
        with_probe.record_passive_failure();
        assert_eq!(with_probe.state(), BackendState::Down);
        // One passing probe brings it back (success threshold 1).
        with_probe.probe.as_mut().unwrap().record(true);
        assert_eq!(with_probe.state(), BackendState::Up);
    }
}
