//! What the registry's decisions ask of the outside world, and the shell that does it.
//!
//! The registry itself never spawns: it returns [`Effect`]s, which [`Checkers`] carries out
//! (probe and recovery tasks, one per container at most). Tests apply messages and look at the
//! effects and the published table, with no task, timer or Docker engine involved.
use std::{collections::HashMap, net::SocketAddr, time::Duration};

use tokio::sync::mpsc;

use super::Message;
use crate::{
    discovery::DockerHandle,
    labels::ProbeSpec,
    probe::{self, ProbeTarget, TaskGuard},
};

#[derive(Debug)]
pub enum Effect {
    /// Run the container's probe (replacing whatever checks it now); the first check after
    /// `first_delay`.
    StartProbe {
        target: ProbeTarget,
        spec: ProbeSpec,
        first_delay: Duration,
    },
    /// A backend without a probe was taken out: check its port after `hold`, until it
    /// accepts again (replacing whatever checks it now).
    StartRecovery {
        id: String,
        generation: u64,
        addr: SocketAddr,
        hold: Duration,
    },
    /// Nothing checks the container any more (removed, or no probe at its new address).
    StopChecks { id: String },
}

/// The checker task of each container, by container id; dropping one stops it.
pub struct Checkers {
    docker: DockerHandle,
    registry: mpsc::UnboundedSender<Message>,
    tasks: HashMap<String, TaskGuard>,
}

impl Checkers {
    pub fn new(docker: DockerHandle, registry: mpsc::UnboundedSender<Message>) -> Self {
        Self {
            docker,
            registry,
            tasks: HashMap::new(),
        }
    }

    pub fn carry_out(&mut self, effect: Effect) {
        match effect {
            Effect::StartProbe {
                target,
                spec,
                first_delay,
            } => {
                let id = target.container_id.clone();
                let task = probe::spawn_probe(
                    target,
                    spec,
                    first_delay,
                    self.docker.clone(),
                    self.registry.clone(),
                );
                self.tasks.insert(id, task);
            }
            Effect::StartRecovery {
                id,
                generation,
                addr,
                hold,
            } => {
                let task = probe::spawn_recovery(
                    id.clone(),
                    generation,
                    addr,
                    hold,
                    self.registry.clone(),
                );
                self.tasks.insert(id, task);
            }
            Effect::StopChecks { id } => {
                self.tasks.remove(&id);
            }
        }
    }
}
