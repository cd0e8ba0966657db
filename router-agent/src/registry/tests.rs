//! The registry's decisions, message by message: what it publishes and which effects (probe
//! and recovery checks) it asks for. No task runs and no engine is contacted.
use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::sync::{mpsc, oneshot};

use super::{Effect, Message, Published, Registry, RegistrySettings};
use crate::{
    discovery::{ContainerInfo, DockerHandle, Update},
    health::BackendState,
    probe::ProbeOutcome,
};

struct Setup {
    registry: Registry,
    published: Arc<Published>,
}

impl Setup {
    fn new() -> Self {
        let published = Arc::new(Published::new(None));
        let (sender, _) = mpsc::unbounded_channel();
        let registry = Registry::new(
            RegistrySettings {
                default_domain: "test".into(),
                // Fixed ranges: the host's addresses are not read.
                auto_cidrs: false,
                backend_max_connections: None,
                overrides: crate::registry::overrides::Overrides::default(),
            },
            DockerHandle::default(),
            sender,
            published.clone(),
        );
        Self {
            registry,
            published,
        }
    }

    fn send(&mut self, message: Message) -> Vec<Effect> {
        self.registry.handle([message])
    }

    fn discover(&mut self, info: ContainerInfo) -> Vec<Effect> {
        self.send(Message::Discovery(Update::Container(info)))
    }

    /// The backend's state in the published table for `domain`, if it is there.
    fn state(&self, domain: &str, id: &str) -> Option<BackendState> {
        let table = self.published.table.load();
        let route = table.lookup(domain.as_bytes(), b"/")?;
        route
            .backends
            .iter()
            .find(|b| &*b.container_id == id)
            .map(|b| b.state)
    }

    fn probe_result(&mut self, id: &str, generation: u64, outcome: ProbeOutcome) -> Vec<Effect> {
        self.send(Message::ProbeResult {
            id: id.into(),
            generation,
            outcome,
        })
    }

    fn views(&mut self) -> Vec<super::ContainerView> {
        let (reply, mut answer) = oneshot::channel();
        assert!(self.send(Message::ViewContainers(reply)).is_empty());
        answer.try_recv().expect("views answered at once")
    }
}

const ADDRESS: &str = "198.18.0.7";

/// A running container (started long ago) with these labels.
fn container(id: &str, labels: &[(&str, &str)]) -> ContainerInfo {
    ContainerInfo {
        id: id.into(),
        name: format!("name-{id}"),
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<HashMap<_, _>>(),
        address: Some(ADDRESS.parse().unwrap()),
        networks: Vec::new(),
        docker_health: None,
        started_at: Some(SystemTime::UNIX_EPOCH),
    }
}

const ROUTE: (&str, &str) = ("aliyun.routing.port_80", "web");
const PROBE: (&str, &str) = ("aliyun.probe.url", "http://container:8080/health");

/// The generation of the one probe started, checking its target and delay.
fn started_probe(effects: &[Effect], id: &str, ip: &str) -> u64 {
    match effects {
        [
            Effect::StartProbe {
                target,
                first_delay,
                ..
            },
        ] => {
            assert_eq!(target.container_id, id);
            assert_eq!(target.ip, ip.parse::<IpAddr>().unwrap());
            assert_eq!(
                *first_delay,
                Duration::ZERO,
                "running long enough: due at once"
            );
            target.generation
        }
        other => panic!("expected one StartProbe, got {other:?}"),
    }
}

#[test]
fn a_labeled_container_with_a_probe_starts_it_and_is_up_once_it_passes() {
    let mut setup = Setup::new();
    let effects = setup.discover(container("c1", &[ROUTE, PROBE]));
    let generation = started_probe(&effects, "c1", ADDRESS);
    assert_eq!(setup.state("web.test", "c1"), Some(BackendState::Starting));

    let effects = setup.probe_result("c1", generation, ProbeOutcome::Passed("200".into()));
    assert!(effects.is_empty(), "{effects:?}");
    assert_eq!(setup.state("web.test", "c1"), Some(BackendState::Up));

    // Three failures (the default threshold) take it down; fewer do not.
    for n in 1..=3 {
        setup.probe_result("c1", generation, ProbeOutcome::Failed("500".into()));
        let expected = if n < 3 {
            BackendState::Up
        } else {
            BackendState::Down
        };
        assert_eq!(
            setup.state("web.test", "c1"),
            Some(expected),
            "after {n} failure(s)"
        );
    }
    // A check that could not run is no verdict.
    setup.probe_result("c1", generation, ProbeOutcome::NotRun("no fd".into()));
    assert_eq!(setup.state("web.test", "c1"), Some(BackendState::Down));
}

#[test]
fn results_of_a_replaced_probe_are_ignored() {
    let mut setup = Setup::new();
    let first = started_probe(
        &setup.discover(container("c1", &[ROUTE, PROBE])),
        "c1",
        ADDRESS,
    );
    // A new address: the probe restarts against it, with a new generation.
    let mut moved = container("c1", &[ROUTE, PROBE]);
    moved.address = Some("198.18.0.9".parse().unwrap());
    let second = started_probe(&setup.discover(moved), "c1", "198.18.0.9");
    assert_ne!(first, second);

    setup.probe_result("c1", first, ProbeOutcome::Passed("old".into()));
    assert_eq!(setup.state("web.test", "c1"), Some(BackendState::Starting));
    setup.probe_result("c1", second, ProbeOutcome::Passed("new".into()));
    assert_eq!(setup.state("web.test", "c1"), Some(BackendState::Up));
}

#[test]
fn a_container_without_a_probe_is_up_at_once_and_nothing_checks_it() {
    let mut setup = Setup::new();
    let effects = setup.discover(container("c1", &[ROUTE]));
    assert!(
        matches!(&effects[..], [Effect::StopChecks { id }] if id == "c1"),
        "{effects:?}"
    );
    assert_eq!(setup.state("web.test", "c1"), Some(BackendState::Up));
}

#[test]
fn stopping_drains_and_gone_removes_and_stops_the_probe() {
    let mut setup = Setup::new();
    let generation = started_probe(
        &setup.discover(container("c1", &[ROUTE, PROBE])),
        "c1",
        ADDRESS,
    );
    setup.probe_result("c1", generation, ProbeOutcome::Passed("200".into()));

    let effects = setup.send(Message::Discovery(Update::Stopping { id: "c1".into() }));
    assert!(effects.is_empty(), "{effects:?}");
    assert_eq!(setup.state("web.test", "c1"), Some(BackendState::Draining));

    let effects = setup.send(Message::Discovery(Update::Gone { id: "c1".into() }));
    assert!(
        matches!(&effects[..], [Effect::StopChecks { id }] if id == "c1"),
        "{effects:?}"
    );
    assert_eq!(setup.state("web.test", "c1"), None);
    assert!(setup.views().is_empty());
}

#[test]
fn a_container_gone_while_the_engine_was_away_is_removed_at_resync() {
    let mut setup = Setup::new();
    setup.discover(container("stays", &[ROUTE]));
    setup.discover(container("went", &[ROUTE]));
    let effects = setup.send(Message::Discovery(Update::Resynced {
        ids: HashSet::from(["stays".to_owned()]),
    }));
    assert!(
        matches!(&effects[..], [Effect::StopChecks { id }] if id == "went"),
        "{effects:?}"
    );
    assert_eq!(setup.state("web.test", "stays"), Some(BackendState::Up));
    assert_eq!(setup.state("web.test", "went"), None);
}

#[test]
fn a_bad_label_is_reported_and_the_container_skipped_without_a_probe() {
    let mut setup = Setup::new();
    let effects = setup.discover(container(
        "bad",
        &[("aliyun.routing.port_80", "Bad_Domain!"), PROBE],
    ));
    assert!(
        matches!(&effects[..], [Effect::StopChecks { id }] if id == "bad"),
        "a container with label errors must not be probed: {effects:?}"
    );
    // Another container's route is unaffected.
    setup.discover(container("good", &[ROUTE]));
    assert_eq!(setup.state("web.test", "good"), Some(BackendState::Up));
    assert_eq!(setup.published.table.load().routes().len(), 1);

    let views = setup.views();
    let bad = views.iter().find(|v| v.id == "bad").expect("bad is shown");
    assert!(!bad.routed);
    assert_eq!(bad.errors.len(), 1, "{:?}", bad.errors);
    assert_eq!(bad.errors[0].label, "aliyun.routing.port_80");
    assert!(
        bad.history
            .iter()
            .any(|h| h.event.starts_with("label error")),
        "{:?}",
        bad.history
    );
}

/// A refused connect takes an `up` backend without a probe out at once, and a recovery check
/// is started; its report brings the backend back. A report of an older check does not.
#[test]
fn a_refused_connect_takes_a_backend_out_until_the_recovery_check_reports() {
    let mut setup = Setup::new();
    setup.discover(container("c1", &[ROUTE]));
    let addr = format!("{ADDRESS}:80").parse().unwrap();
    let effects = setup.send(Message::ConnectFailed {
        id: "c1".into(),
        addr,
        error: "refused".into(),
    });
    let generation = match &effects[..] {
        [
            Effect::StartRecovery {
                id,
                generation,
                addr: checked,
                hold,
            },
        ] => {
            assert_eq!((id.as_str(), *checked, *hold), ("c1", addr, Duration::ZERO));
            *generation
        }
        other => panic!("expected one StartRecovery, got {other:?}"),
    };
    assert_eq!(setup.state("web.test", "c1"), Some(BackendState::Down));

    // Already down: a second refusal changes nothing and starts nothing.
    let effects = setup.send(Message::ConnectFailed {
        id: "c1".into(),
        addr,
        error: "refused".into(),
    });
    assert!(effects.is_empty(), "{effects:?}");

    setup.send(Message::Recovered {
        id: "c1".into(),
        generation: generation - 1,
    });
    assert_eq!(setup.state("web.test", "c1"), Some(BackendState::Down));
    setup.send(Message::Recovered {
        id: "c1".into(),
        generation,
    });
    assert_eq!(setup.state("web.test", "c1"), Some(BackendState::Up));
}

/// Failed exchanges take a backend out only while at least half of its route stays up: one
/// client's bad requests must not empty a route.
#[test]
fn an_error_streak_never_takes_out_more_than_half_of_a_route() {
    let mut setup = Setup::new();
    setup.discover(container("a", &[ROUTE]));
    setup.discover(container("b", &[ROUTE]));
    let streak = |id: &str| Message::ErrorStreak {
        id: id.into(),
        addr: format!("{ADDRESS}:80").parse().unwrap(),
        errors: 10,
        last_error: "invalid response head".into(),
    };
    let effects = setup.send(streak("a"));
    assert!(
        matches!(&effects[..], [Effect::StartRecovery { id, hold, .. }] if id == "a" && !hold.is_zero()),
        "{effects:?}"
    );
    assert_eq!(setup.state("web.test", "a"), Some(BackendState::Down));

    let effects = setup.send(streak("b"));
    assert!(effects.is_empty(), "{effects:?}");
    assert_eq!(
        setup.state("web.test", "b"),
        Some(BackendState::Up),
        "the last one is kept"
    );
}

/// The agent is ready after the first sync and the first result of every check due at once.
#[test]
fn ready_after_the_first_sync_and_the_first_checks() {
    let mut setup = Setup::new();
    let generation = started_probe(
        &setup.discover(container("c1", &[ROUTE, PROBE])),
        "c1",
        ADDRESS,
    );
    setup.discover(container("plain", &[ROUTE]));
    assert!(!*setup.published.ready.borrow());
    setup.send(Message::Discovery(Update::Resynced {
        ids: HashSet::from(["c1".to_owned(), "plain".to_owned()]),
    }));
    assert!(!*setup.published.ready.borrow(), "c1's first check is due");
    setup.probe_result("c1", generation, ProbeOutcome::Failed("500".into()));
    assert!(*setup.published.ready.borrow());
}
