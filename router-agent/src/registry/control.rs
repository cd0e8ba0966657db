//! What the admin API's writes and `why` ask of the registry: operator overrides (drain,
//! weight, maintenance, clear) on this node's containers, and the explanation of why a
//! container is or is not routed.
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tracing::info;

use super::{
    Registry,
    entry::{Entry, unix_ms},
    overrides::Change,
};
use crate::{
    discovery::short,
    health::{BackendState, ProbeTracker, ProbeVerdict},
    table::is_internal_domain,
};

/// An operator's request. Containers are named by name, full id or id prefix.
#[derive(Debug)]
pub enum Control {
    Change {
        container: String,
        change: Change,
    },
    /// Removes the overrides of these names (running or not).
    Clear {
        names: Vec<String>,
    },
    /// Removes the overrides whose container is not running here.
    ClearStale,
    /// Every override, with whether its container runs here.
    List,
    Why {
        container: String,
    },
}

/// The answer: a JSON body, or an HTTP status with a message saying what to do.
pub type ControlReply = Result<Value, ControlError>;

#[derive(Debug, Serialize)]
pub struct ControlError {
    #[serde(skip)]
    pub status: u16,
    pub error: String,
}

impl ControlError {
    fn new(status: u16, error: String) -> Self {
        Self { status, error }
    }
}

/// A registry message carrying a control request and where to answer.
#[derive(Debug)]
pub struct ControlMessage {
    pub request: Control,
    pub reply: oneshot::Sender<ControlReply>,
}

impl Registry {
    /// Carries out a control request; returns whether the routing table must be rebuilt.
    pub(super) fn control(&mut self, message: ControlMessage) -> bool {
        let (reply, changed) = match message.request {
            Control::Change { container, change } => self.change_override(&container, change),
            Control::Clear { names } => self.clear_overrides(&names),
            Control::ClearStale => {
                let stale: Vec<String> = self
                    .overrides
                    .iter()
                    .map(|(name, _)| name.clone())
                    .filter(|name| self.local_by_name(name).is_none())
                    .collect();
                self.clear_overrides(&stale)
            }
            Control::List => (Ok(self.list_overrides()), false),
            Control::Why { container } => (self.why(&container), false),
        };
        let _ = message.reply.send(reply);
        if changed {
            self.published
                .overrides
                .store(std::sync::Arc::new(self.overrides.snapshot()));
        }
        changed
    }

    fn local_by_name(&self, name: &str) -> Option<&Entry> {
        self.containers.values().find(|e| e.info.name == name)
    }

    /// This node's container by name, full id, or unique id prefix; an error that says what
    /// else it could be.
    fn resolve(&self, container: &str) -> Result<&Entry, ControlError> {
        if let Some(entry) = self.local_by_name(container) {
            return Ok(entry);
        }
        let by_id: Vec<&Entry> = self
            .containers
            .values()
            .filter(|e| container.len() >= 4 && e.info.id.starts_with(container))
            .collect();
        match by_id.as_slice() {
            [entry] => return Ok(entry),
            [] => {}
            several => {
                let names: Vec<&str> = several.iter().map(|e| e.info.name.as_str()).collect();
                return Err(ControlError::new(
                    409,
                    format!("{container:?} is the start of several ids ({names:?}); use a name"),
                ));
            }
        }
        let remote = self.remote.nodes.iter().find_map(|(node, n)| {
            n.containers
                .values()
                .any(|e| e.shared.name == container || e.shared.id.starts_with(container))
                .then_some(node)
        });
        Err(match remote {
            Some(node) => ControlError::new(
                409,
                format!(
                    "{container:?} runs on another node ({node}): set overrides on that node's \
                     agent, which shares them with the cluster"
                ),
            ),
            None => ControlError::new(
                404,
                format!(
                    "no container {container:?} among the running labelled containers of this \
                     host; `router-agent ctl why {container}` says more"
                ),
            ),
        })
    }

    fn change_override(&mut self, container: &str, change: Change) -> (ControlReply, bool) {
        let change = match change.validate() {
            Ok(change) => change,
            Err(e) => return (Err(ControlError::new(400, e)), false),
        };
        let (id, name) = match self.resolve(container) {
            Ok(entry) => (entry.info.id.clone(), entry.info.name.clone()),
            Err(e) => return (Err(e), false),
        };
        let now = unix_ms();
        let result = match self.overrides.change(&name, change, now) {
            Ok(o) => o,
            Err(e) => return (Err(ControlError::new(500, format!("{e:#}"))), false),
        };
        info!(container = %name, id = %short(&id), "{}", change.describe());
        self.published.events.push(&name, change.describe());
        if let Some(entry) = self.containers.get_mut(&id) {
            entry.remember(change.describe());
        }
        // Shared with the other nodes' agents: the override travels with the stream.
        self.dirty.insert(id.clone());
        let view = self.containers.get(&id).map(|e| e.view(Some(&result)));
        (
            Ok(json!({
                "container": name,
                "id": id,
                "override": result,
                "state": view.as_ref().map(|v| v.state),
                "weight": view.as_ref().and_then(|v| v.weight),
            })),
            true,
        )
    }

    fn clear_overrides(&mut self, names: &[String]) -> (ControlReply, bool) {
        let removed = match self.overrides.clear(names) {
            Ok(removed) => removed,
            Err(e) => return (Err(ControlError::new(500, format!("{e:#}"))), false),
        };
        for name in &removed {
            info!(container = %name, "override cleared");
            self.published.events.push(name, "override cleared".into());
            let id = self.local_by_name(name).map(|e| e.info.id.clone());
            if let Some(id) = id {
                if let Some(entry) = self.containers.get_mut(&id) {
                    entry.remember("override cleared".into());
                }
                self.dirty.insert(id);
            }
        }
        let changed = !removed.is_empty();
        (Ok(json!({ "cleared": removed })), changed)
    }

    fn list_overrides(&self) -> Value {
        let overrides: Vec<Value> = self
            .overrides
            .iter()
            .map(|(name, o)| {
                let running = self.local_by_name(name);
                json!({
                    "container": name,
                    "override": o,
                    "running": running.is_some(),
                    "id": running.map(|e| e.info.id.clone()),
                    // Kept until `ctl clear`: it applies again if a container of this name comes back.
                    "stale": running.is_none(),
                })
            })
            .collect();
        json!({ "overrides": overrides })
    }

    /// Why a container is or is not routed: `reasons` are what keeps it from new requests
    /// (empty when routed), `notes` what else matters to who asks.
    fn why(&self, container: &str) -> ControlReply {
        let entry = match self.resolve(container) {
            Ok(entry) => entry,
            Err(e) if e.status == 409 => return self.why_remote(container).ok_or(e),
            Err(e) => return Err(e),
        };
        let over = self.overrides.get(&entry.info.name);
        let view = entry.view(over);
        let mut reasons = Vec::new();
        let mut notes = Vec::new();
        match &entry.spec {
            Err(errors) => {
                for e in errors {
                    reasons.push(format!("bad label: {e}"));
                }
            }
            Ok(spec) if spec.routes.is_empty() => reasons.push(
                "no route: it has probe labels but no aliyun.routing.port_<port> label".into(),
            ),
            Ok(_) => {}
        }
        if entry.info.address.is_none() {
            let networks: Vec<&str> = entry
                .info
                .networks
                .iter()
                .map(|n| n.network.as_str())
                .collect();
            reasons.push(format!(
                "not on a network this agent reaches: no IPv4 address on {networks:?}"
            ));
        }
        let health = entry.health.state();
        let last_probe = entry
            .history
            .iter()
            .rev()
            .find(|h| h.event.starts_with("probe "))
            .map(|h| h.event.clone());
        match health {
            BackendState::Starting => reasons.push(match &last_probe {
                Some(p) => format!("starting: its health check has not passed yet (last: {p})"),
                None => "starting: its health check has not passed yet".into(),
            }),
            BackendState::Down => reasons.push(match &last_probe {
                Some(p) => format!("down: failing its health check (last: {p})"),
                None if entry.health.passive_down => {
                    "down: the proxy could not connect to it; a recovery check is running".into()
                }
                None => "down: Docker's HEALTHCHECK says unhealthy".into(),
            }),
            BackendState::Draining => {
                reasons.push("draining: Docker is stopping it".into());
            }
            _ => {}
        }
        if let Some(o) = over {
            if o.maintenance {
                reasons.push(
                    "maintenance (operator override): out of rotation, its probes are ignored; \
                     `router-agent ctl maintenance <name> off` ends it"
                        .into(),
                );
            }
            if o.drained {
                reasons.push(
                    "drained (operator override): no new requests; `router-agent ctl undrain \
                     <name>` ends it"
                        .into(),
                );
            }
            if o.weight == Some(0) {
                reasons.push("weight 0 (operator override): no new requests".into());
            }
        }
        if let Ok(spec) = &entry.spec
            && spec.weight == 0
            && over.and_then(|o| o.weight).is_none()
        {
            reasons.push("weight 0 (aliyun.routing.weight label): no new requests".into());
        }
        if let Some(p) = &last_probe
            && matches!(health, BackendState::Up)
        {
            notes.push(format!("last health check: {p}"));
        }
        if entry.health.probe.as_ref().map(ProbeTracker::verdict) == Some(ProbeVerdict::Passing) {
            notes.push("its probe passes".into());
        }
        for route in view.routes.iter().filter(|r| r.listen_port.is_none()) {
            if is_internal_domain(&route.domain) {
                notes.push(format!(
                    "{} is internal-only: only clients from the internal CIDRs reach it (others \
                     get 404)",
                    route.domain
                ));
            }
        }
        Ok(json!({
            "container": entry.info.name,
            "id": entry.info.id,
            "routed": reasons.is_empty(),
            "state": view.state,
            "weight": view.weight,
            "override": over,
            "reasons": reasons,
            "notes": notes,
            "routes": view.routes,
            "address": entry.info.address,
            "history": view.history,
        }))
    }

    /// `why` for another node's container: what its agent shared (that agent knows more).
    fn why_remote(&self, container: &str) -> Option<Value> {
        let (node_id, node, entry) = self.remote.nodes.iter().find_map(|(node_id, node)| {
            node.containers
                .values()
                .find(|e| e.shared.name == container || e.shared.id.starts_with(container))
                .map(|e| (node_id, node, e))
        })?;
        let view =
            super::ContainerView::remote(node_id, &entry.shared, &entry.spec, node.reachable);
        let mut reasons: Vec<String> = view.not_routed_because.iter().cloned().collect();
        reasons.extend(view.errors.iter().map(|e| format!("bad label: {e}")));
        Some(json!({
            "container": view.name,
            "id": view.id,
            "node": node_id,
            "routed": reasons.is_empty(),
            "state": view.state,
            "weight": view.weight,
            "reasons": reasons,
            "notes": [format!(
                "it runs on node {node_id}: its agent there probes it and holds its overrides \
                 (`router-agent ctl why` against that agent says more)"
            )],
            "routes": view.routes,
        }))
    }
}
