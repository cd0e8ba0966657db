//! One container of this node as the registry keeps it (what Docker said, what its labels ask,
//! its health, its history), and how it is shown: to the admin API and to the other nodes.
use std::{
    collections::{BTreeMap, VecDeque},
    net::IpAddr,
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use serde::Serialize;

use crate::{
    cluster::wire::SharedContainer,
    discovery::{ContainerInfo, NetworkAddress},
    health::{BackendHealth, BackendState, DockerHealth, ProbeTracker, ProbeVerdict},
    labels::{ContainerSpec, LabelError, ProbeSpec, RouteSpec},
    registry::overrides::Override,
    table::BackendStats,
};

/// One container as the admin API shows it ("why is this not routed?").
#[derive(Serialize, Debug, Clone)]
pub struct ContainerView {
    pub id: String,
    pub name: String,
    /// The Swarm node it runs on, for containers of other nodes (absent for this node's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub address: Option<IpAddr>,
    pub networks: Vec<NetworkAddress>,
    pub state: BackendState,
    pub routed: bool,
    /// Why it receives no new requests, when it does not.
    pub not_routed_because: Option<String>,
    pub routes: Vec<RouteSpec>,
    pub sticky: Option<bool>,
    /// The weight in force: the operator's override, else the label's.
    pub weight: Option<u32>,
    /// What an operator set (`router-agent ctl`), if anything.
    #[serde(rename = "override", skip_serializing_if = "Option::is_none")]
    pub operator_override: Option<Override>,
    pub probe: Option<ProbeSpec>,
    pub probe_verdict: Option<ProbeVerdict>,
    pub docker_health: Option<DockerHealth>,
    pub errors: Vec<LabelError>,
    pub history: Vec<HistoryItem>,
}

#[derive(Serialize, Debug, Clone)]
pub struct HistoryItem {
    pub at_unix_ms: u64,
    pub event: String,
}

const HISTORY_LEN: usize = 32;

/// The label a weight override replaces in what other nodes are told.
const WEIGHT_LABEL: &str = "aliyun.routing.weight";

pub struct Entry {
    pub info: ContainerInfo,
    pub spec: Result<ContainerSpec, Vec<LabelError>>,
    pub health: BackendHealth,
    pub stats: Arc<BackendStats>,
    /// Tags the results of the current checker task (the probe, or the recovery check after
    /// a passive failure), which the registry's shell holds.
    pub generation: u64,
    pub history: VecDeque<HistoryItem>,
    /// Its probe's first run was due when the probe task started (the container has been
    /// running longer than the initial delay).
    pub first_check_due_at_once: bool,
}

impl Entry {
    pub fn remember(&mut self, event: String) {
        if self.history.len() == HISTORY_LEN {
            self.history.pop_front();
        }
        self.history.push_back(HistoryItem {
            at_unix_ms: unix_ms(),
            event,
        });
    }

    pub fn probe_spec(&self) -> Option<&ProbeSpec> {
        self.spec.as_ref().ok().and_then(|s| s.probe.as_ref())
    }

    /// The state routing uses: the health state, unless an operator override says otherwise.
    pub fn state(&self, operator: Option<&Override>) -> BackendState {
        let health = self.health.state();
        operator.map_or(health, |o| o.state(health))
    }

    /// What the other nodes' agents are told about it. The operator's override travels with
    /// it: the state carries drain and maintenance, and a weight override replaces the weight
    /// label (the other agents parse the labels themselves), so the wire format stays as it is.
    pub fn shared(&self, operator: Option<&Override>) -> SharedContainer {
        let mut labels = router_labels(&self.info.labels);
        if let Some(weight) = operator.and_then(|o| o.weight) {
            labels.insert(WEIGHT_LABEL.into(), weight.to_string());
        }
        SharedContainer {
            id: self.info.id.clone(),
            name: self.info.name.clone(),
            labels,
            state: self.state(operator),
            address: self.info.address,
        }
    }

    pub fn view(&self, operator: Option<&Override>) -> ContainerView {
        let state = self.state(operator);
        let spec = self.spec.as_ref().ok();
        ContainerView {
            id: self.info.id.clone(),
            name: self.info.name.clone(),
            node: None,
            address: self.info.address,
            networks: self.info.networks.clone(),
            state,
            not_routed_because: not_routed_because(
                &self.spec,
                self.info.address,
                state,
                operator.and_then(|o| o.weight),
            ),
            routed: false,
            routes: spec.map(|s| s.routes.clone()).unwrap_or_default(),
            sticky: spec.map(|s| s.sticky),
            weight: spec.map(|s| operator.map_or(s.weight, |o| o.weight(s.weight))),
            operator_override: operator.cloned(),
            probe: spec.and_then(|s| s.probe.clone()),
            probe_verdict: self.health.probe.as_ref().map(ProbeTracker::verdict),
            docker_health: self.health.docker,
            errors: self.spec.as_ref().err().cloned().unwrap_or_default(),
            history: self.history.iter().cloned().collect(),
        }
        .with_routed()
    }
}

impl ContainerView {
    fn with_routed(mut self) -> Self {
        self.routed = self.not_routed_because.is_none();
        self
    }

    /// A container of another node, from what its agent shared.
    pub fn remote(
        node: &str,
        shared: &SharedContainer,
        spec: &Result<ContainerSpec, Vec<LabelError>>,
        reachable: bool,
    ) -> Self {
        let state = if reachable {
            shared.state
        } else {
            BackendState::Down
        };
        let ok = spec.as_ref().ok();
        // The owner's weight override arrives as the weight label.
        let mut because = not_routed_because(spec, shared.address, state, None);
        if !reachable {
            because = Some(format!("its node's agent ({node}) cannot be reached"));
        }
        Self {
            id: shared.id.clone(),
            name: shared.name.clone(),
            node: Some(node.to_owned()),
            address: shared.address,
            networks: Vec::new(),
            state,
            not_routed_because: because,
            routed: false,
            routes: ok.map(|s| s.routes.clone()).unwrap_or_default(),
            sticky: ok.map(|s| s.sticky),
            weight: ok.map(|s| s.weight),
            operator_override: None,
            probe: ok.and_then(|s| s.probe.clone()),
            probe_verdict: None,
            docker_health: None,
            errors: spec.as_ref().err().cloned().unwrap_or_default(),
            history: Vec::new(),
        }
        .with_routed()
    }
}

/// `weight`: an operator's weight override, if any.
fn not_routed_because(
    spec: &Result<ContainerSpec, Vec<LabelError>>,
    address: Option<IpAddr>,
    state: BackendState,
    weight: Option<u32>,
) -> Option<String> {
    let reason = match (spec, address, state) {
        (Err(_), _, _) => "label errors (see errors)",
        (_, None, _) => "no IPv4 address reachable from its node",
        (_, _, BackendState::Starting) => "starting: the health check has not passed yet",
        (_, _, BackendState::Down) => "down: failing its health check",
        (_, _, BackendState::Draining) => "draining: Docker is stopping it",
        (_, _, BackendState::Drained) => "drained by an operator: no new requests",
        (_, _, BackendState::Maintenance) => "in maintenance (operator): out of rotation",
        (Ok(spec), _, BackendState::Up) if weight.unwrap_or(spec.weight) == 0 => {
            "weight 0: no new sessions"
        }
        _ => return None,
    };
    Some(reason.to_owned())
}

/// The labels the router reads (`aliyun.*`).
pub fn router_labels(
    labels: &std::collections::HashMap<String, String>,
) -> BTreeMap<String, String> {
    labels
        .iter()
        .filter(|(key, _)| key.starts_with("aliyun."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
