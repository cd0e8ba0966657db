//! What the proxy's failures do to this node's backends: a refused connection takes a backend
//! out at once; a streak of failed exchanges does, within the ejection cap; a backend taken
//! out comes back through its probe or a recovery check.
use std::{net::SocketAddr, time::Duration};

use tracing::warn;

use super::{Effect, Registry, publish::route_key};
use crate::{discovery::short, health::BackendState};

/// How long a backend without a probe stays out after failed exchanges before its port is
/// checked again: it accepts connections all along, so only time can tell whether it
/// recovered (Envoy's outlier detection ejects for a base time in the same way).
const EJECTION_TIME: Duration = Duration::from_secs(10);

impl Registry {
    /// A refused or unreachable backend is out at once: nothing was sent, so this is about
    /// the backend, not about a request.
    pub(super) fn connect_failed(&mut self, id: &str, addr: SocketAddr, error: &str) -> bool {
        let up = self
            .containers
            .get(id)
            .is_some_and(|e| e.health.state() == BackendState::Up);
        if !up {
            return false;
        }
        self.take_out(
            id,
            addr,
            &format!("connection to {addr} failed: {error}"),
            Duration::ZERO,
        )
    }

    /// The error limit was reached. Failed exchanges can be caused by the requests themselves,
    /// so they take a backend out only while at least half of every route it serves stays up
    /// (`health::may_eject`); either way the streak starts over.
    pub(super) fn error_streak(
        &mut self,
        id: &str,
        addr: SocketAddr,
        errors: u32,
        last_error: &str,
    ) -> bool {
        let Some(entry) = self.containers.get(id) else {
            return false;
        };
        entry.stats.reset_errors();
        if entry.health.state() != BackendState::Up {
            return false;
        }
        let why = format!("{errors} failed exchanges in a row (last: {last_error})");
        if let Some(route) = self.route_kept_by_ejection_cap(id) {
            let entry = self.containers.get_mut(id).expect("checked above");
            warn!(container = %entry.info.name, id = %short(id), %addr, "{why}; kept in: taking it out would leave fewer than half of {route} up");
            entry.remember(format!(
                "{why}; kept in to leave at least half of {route} up"
            ));
            return false;
        }
        self.take_out(id, addr, &why, EJECTION_TIME)
    }

    /// A route of the container that passive health must not thin out further, if any. Counts
    /// the route's backends on every node: the route is one, wherever its replicas run.
    fn route_kept_by_ejection_cap(&self, id: &str) -> Option<String> {
        let spec = self.containers.get(id)?.spec.as_ref().ok()?;
        spec.routes.iter().find_map(|route| {
            let key = route_key(route);
            let (mut up, mut backends) = (0, 0);
            for entry in self.containers.values() {
                let serves = entry
                    .spec
                    .as_ref()
                    .is_ok_and(|s| s.routes.iter().any(|r| route_key(r) == key));
                if serves && entry.info.address.is_some() {
                    backends += 1;
                    up += usize::from(entry.health.state() == BackendState::Up);
                }
            }
            let (remote_up, remote_backends) = self.remote.count_serving(&key);
            (!crate::health::may_eject(up + remote_up, backends + remote_backends))
                .then(|| format!("{}://{}{}", route.scheme, route.domain, route.path))
        })
    }

    /// Takes an `up` backend out until its probe passes again, or, without a probe, until its
    /// port accepts connections again (checked after `hold`, then every recovery period).
    fn take_out(&mut self, id: &str, addr: SocketAddr, why: &str, hold: Duration) -> bool {
        self.next_generation += 1;
        let generation = self.next_generation;
        let Some(entry) = self.containers.get_mut(id) else {
            return false;
        };
        let before = entry.health.state();
        warn!(container = %entry.info.name, id = %short(id), %addr, "{why}; taking the backend out");
        entry.health.record_passive_failure();
        entry.remember(why.to_owned());
        if entry.health.probe.is_none() {
            // No probe will notice the recovery: check the port until it accepts again.
            entry.generation = generation;
            self.effects.push(Effect::StartRecovery {
                id: id.to_owned(),
                generation,
                addr,
                hold,
            });
        }
        self.note_transition(id, before)
    }
}
