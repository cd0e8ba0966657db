//! The exposition of a populated table, and docs/metrics.md kept in step with it.
use std::{collections::BTreeSet, sync::Arc, time::Duration};

use super::render;
use crate::{
    access_log::AccessLog,
    config::{DatapathMode, ProxySettings},
    health::BackendState,
    labels::Scheme,
    metrics::{BackendError, Metrics, Source},
    proxy::{Admission, Phase, PipePool, Pool, ProxyContext},
    registry::Published,
    table::{Backend, RouteInput, RouteKey, RoutingTable},
};

fn backend(name: &str, id: &str, state: BackendState) -> Backend {
    Backend {
        container_id: id.into(),
        container_name: name.into(),
        addr: "198.18.0.2:80".parse().unwrap(),
        weight: 100,
        state,
        stats: Arc::default(),
        via: None,
    }
}

fn table(backends: Vec<Backend>, stats: &Arc<crate::table::RouteStats>) -> RoutingTable {
    RoutingTable::build(vec![RouteInput {
        key: RouteKey::Http {
            domain: "web.local".into(),
            path: "/".into(),
        },
        domain: "web.local".into(),
        scheme: Scheme::Http,
        sticky: true,
        backends,
        cursor: Arc::default(),
        stats: stats.clone(),
    }])
}

fn context() -> Arc<ProxyContext> {
    let (registry, _) = tokio::sync::mpsc::unbounded_channel();
    let (_, phase) = tokio::sync::watch::channel(Phase::Serving);
    Arc::new(ProxyContext {
        published: Arc::new(Published::new(None)),
        settings: ProxySettings::default(),
        metrics: Arc::new(Metrics::default()),
        registry,
        phase,
        datapath: DatapathMode::Auto,
        offload: None,
        pool: Pool::new(16),
        pipes: PipePool::new(64 * 1024, 4).unwrap(),
        admission: Admission::new(16),
        cluster: std::sync::OnceLock::new(),
        access_log: AccessLog::off(),
    })
}

/// Sample lines of one series, by its name up to the labels.
fn samples<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
    text.lines()
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .collect()
}

#[test]
fn per_backend_series_follow_the_table() {
    let ctx = context();
    let stats = Arc::default();
    let one = backend("web-1", "0123456789abcdef", BackendState::Up);
    let two = backend("web-2", "fedcba9876543210", BackendState::Draining);
    one.stats
        .requests
        .fetch_add(3, std::sync::atomic::Ordering::Relaxed);
    ctx.metrics.backend_error(&two.stats, BackendError::Timeout);
    ctx.published
        .table
        .store(Arc::new(table(vec![one.clone(), two], &stats)));
    stats.durations.observe(Duration::from_millis(3));
    stats.durations.observe(Duration::from_millis(30));
    ctx.metrics.responses.add(404, Source::Router);
    ctx.metrics.responses.add(200, Source::Backend);

    let text = render(&ctx, None);
    for line in [
        "router_backend_requests_total{route=\"web.local\",backend=\"web-1\",id=\"0123456789ab\"} 3",
        "router_backend_errors_total{route=\"web.local\",backend=\"web-2\",id=\"fedcba987654\",kind=\"timeout\"} 1",
        "router_backend_state{route=\"web.local\",backend=\"web-2\",id=\"fedcba987654\",state=\"draining\"} 1",
        "router_backend_state{route=\"web.local\",backend=\"web-2\",id=\"fedcba987654\",state=\"up\"} 0",
        "router_request_duration_seconds_bucket{le=\"0.0025\",route=\"web.local\"} 0",
        "router_request_duration_seconds_bucket{le=\"0.005\",route=\"web.local\"} 1",
        "router_request_duration_seconds_bucket{le=\"0.05\",route=\"web.local\"} 2",
        "router_request_duration_seconds_bucket{le=\"+Inf\",route=\"web.local\"} 2",
        "router_request_duration_seconds_count{route=\"web.local\"} 2",
        "router_responses_total{code=\"404\",source=\"router\"} 1",
        "router_responses_total{code=\"200\",source=\"backend\"} 1",
        "router_exchange_errors_total{kind=\"timeout\"} 1",
    ] {
        assert!(text.contains(line), "{line} missing from\n{text}");
    }

    // web-2 removed: its series go with it.
    ctx.published
        .table
        .store(Arc::new(table(vec![one], &stats)));
    let text = render(&ctx, None);
    assert!(!text.contains("web-2"), "{text}");
    assert_eq!(samples(&text, "router_backend_requests_total").len(), 1);
}

#[test]
fn every_series_is_documented_and_every_documented_one_exists() {
    let ctx = context();
    let text = render(&ctx, None);
    let rendered: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| {
            let (name, kind) = l.split_once(' ').expect("TYPE line");
            if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_owned()
            }
        })
        .collect();
    let docs_path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/metrics.md");
    let docs = std::fs::read_to_string(docs_path).expect("docs/metrics.md");
    // Series are the first column of the tables: "| `router_x` | type | labels | meaning |".
    let documented: BTreeSet<String> = docs
        .lines()
        .filter_map(|l| l.strip_prefix("| `router_"))
        .map(|l| format!("router_{}", l.split('`').next().unwrap_or_default()))
        .collect();
    let undocumented: Vec<_> = rendered.difference(&documented).collect();
    let stale: Vec<_> = documented.difference(&rendered).collect();
    assert!(
        undocumented.is_empty() && stale.is_empty(),
        "docs/metrics.md is out of step: add {undocumented:?}, remove {stale:?}"
    );
}
