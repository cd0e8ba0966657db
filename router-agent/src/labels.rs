//! Container labels -> what the router should do with the container.
//!
//! The `aliyun.routing.*` / `aliyun.probe.*` scheme of Alibaba Cloud Container Service (swarm
//! edition), so existing compose files work unchanged. This module is pure: it validates every
//! label and either returns a complete [`ContainerSpec`] or every problem found, so one bad label
//! is reported with its reason and never half-applied.
use std::{collections::HashMap, fmt, time::Duration};

use serde::Serialize;

const ROUTING_PREFIX: &str = "aliyun.routing.";
const PORT_PREFIX: &str = "aliyun.routing.port_";
const PROBE_PREFIX: &str = "aliyun.probe.";
const MAX_DOMAIN_LEN: usize = 128;

/// How a route's traffic is spoken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    Http,
    /// HTTP that may upgrade to WebSocket; routed like http.
    Ws,
    /// A raw TCP route on its own listening port.
    Tcp,
    /// A domain exposed with TLS ended in front of the router (acsrouting's meaning): the route
    /// itself carries plain HTTP and is served exactly as `Http`.
    Https,
    /// `Ws` behind a TLS terminator: served exactly as `Ws`.
    Wss,
}

impl Scheme {
    /// The domain's clients speak TLS to a terminator in front of the router (`https`, `wss`):
    /// the backend is told so in `X-Forwarded-Proto`.
    #[must_use]
    pub fn behind_tls(self) -> bool {
        matches!(self, Self::Https | Self::Wss)
    }

    /// The scheme the route is served with: `https`/`wss` routes arrive as plain HTTP from the
    /// TLS terminator in front of the router.
    #[must_use]
    pub fn served_as(self) -> Self {
        match self {
            Self::Https => Self::Http,
            Self::Wss => Self::Ws,
            other => other,
        }
    }

    /// Whether the route is meant to carry WebSocket (`ws` or `wss`).
    pub fn is_websocket(self) -> bool {
        self.served_as() == Self::Ws
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Http => "http",
            Self::Ws => "ws",
            Self::Tcp => "tcp",
            Self::Https => "https",
            Self::Wss => "wss",
        })
    }
}

/// One `[scheme://]host[:port][/context_path]` entry of an `aliyun.routing.port_<n>` label.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct RouteSpec {
    pub scheme: Scheme,
    pub domain: String,
    /// Context path, `/` when the label gives none.
    pub path: String,
    /// For `tcp://` routes: the port the router listens on for this route.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen_port: Option<u16>,
    /// The container port the route forwards to.
    pub container_port: u16,
}

/// An active health probe.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ProbeKind {
    /// GET `path` on the container; 2xx and 3xx are healthy.
    Http { port: u16, path: String },
    /// A connection to the port is accepted.
    Tcp { port: u16 },
    /// `sh -c <command>` run in the container exits 0.
    Exec { command: String },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProbeSpec {
    pub kind: ProbeKind,
    #[serde(serialize_with = "as_secs")]
    pub initial_delay: Duration,
    #[serde(serialize_with = "as_secs")]
    pub timeout: Duration,
    #[serde(serialize_with = "as_secs")]
    pub period: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

fn as_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_secs())
}

/// Defaults of the probe timing labels (documented in README.md).
pub mod probe_defaults {
    pub const INITIAL_DELAY_SECONDS: u64 = 0;
    pub const TIMEOUT_SECONDS: u64 = 1;
    pub const PERIOD_SECONDS: u64 = 2;
    pub const SUCCESS_THRESHOLD: u32 = 1;
    pub const FAILURE_THRESHOLD: u32 = 3;
}

pub const DEFAULT_WEIGHT: u32 = 100;
pub const MAX_WEIGHT: u32 = 100;

/// Everything the router does with one container.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ContainerSpec {
    pub routes: Vec<RouteSpec>,
    pub sticky: bool,
    pub weight: u32,
    pub probe: Option<ProbeSpec>,
}

/// One rejected label, with what to change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LabelError {
    pub label: String,
    pub value: String,
    pub reason: String,
}

impl fmt::Display for LabelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "label {}={:?}: {}", self.label, self.value, self.reason)
    }
}

/// Whether the container carries any label of the routing scheme (and so concerns the router).
#[expect(
    clippy::implicit_hasher,
    reason = "labels always come from the Docker API as a std `HashMap`; a hasher parameter \
              would only add generics"
)]
pub fn is_router_container(labels: &HashMap<String, String>) -> bool {
    labels
        .keys()
        .any(|k| k.starts_with(ROUTING_PREFIX) || k.starts_with(PROBE_PREFIX))
}

/// Parses a container's labels. `default_domain` completes hosts without a dot.
#[expect(
    clippy::implicit_hasher,
    reason = "labels always come from the Docker API as a std `HashMap`; a hasher parameter \
              would only add generics"
)]
pub fn parse(
    labels: &HashMap<String, String>,
    default_domain: &str,
) -> Result<ContainerSpec, Vec<LabelError>> {
    let mut errors = Vec::new();
    let mut fail = |label: &str, value: &str, reason: String| {
        errors.push(LabelError {
            label: label.to_owned(),
            value: value.to_owned(),
            reason,
        });
    };

    // Sorted so that errors and routes come out in a stable order.
    let mut keys: Vec<&String> = labels.keys().collect();
    keys.sort();

    let mut routes: Vec<RouteSpec> = Vec::new();
    let mut sticky = true;
    let mut weight = DEFAULT_WEIGHT;
    let mut probe_target: Option<ProbeKind> = None;
    let mut timing = ProbeTiming::default();

    for key in keys {
        let value = labels[key].as_str();
        if let Some(port) = key.strip_prefix(PORT_PREFIX) {
            let container_port = match parse_port(port) {
                Ok(p) => p,
                Err(reason) => {
                    fail(key, value, format!("the port in the label name {reason}"));
                    continue;
                }
            };
            for entry in value.split(';').map(str::trim) {
                if entry.is_empty() {
                    continue;
                }
                match parse_route(entry, container_port, default_domain) {
                    Ok(route) if routes.iter().any(|r| same_route(r, &route)) => fail(
                        key,
                        value,
                        format!(
                            "duplicate route {entry:?}: each route may appear once per container"
                        ),
                    ),
                    Ok(route) => routes.push(route),
                    Err(reason) => fail(key, value, format!("route {entry:?}: {reason}")),
                }
            }
        } else if let Some(name) = key.strip_prefix(ROUTING_PREFIX) {
            match name {
                "session_sticky" => match value.trim() {
                    "true" => sticky = true,
                    "false" => sticky = false,
                    _ => fail(key, value, "must be true or false".into()),
                },
                "weight" => match value.trim().parse::<u32>() {
                    Ok(w) if w <= MAX_WEIGHT => weight = w,
                    _ => fail(
                        key,
                        value,
                        format!("must be an integer from 0 to {MAX_WEIGHT}"),
                    ),
                },
                _ => fail(
                    key,
                    value,
                    "unknown routing label; known: port_<container port>, session_sticky, weight"
                        .into(),
                ),
            }
        } else if let Some(name) = key.strip_prefix(PROBE_PREFIX) {
            match name {
                "url" | "cmd" if probe_target.is_some() => fail(
                    key,
                    value,
                    "aliyun.probe.url and aliyun.probe.cmd are exclusive; keep one".into(),
                ),
                "url" => match parse_probe_url(value.trim()) {
                    Ok(kind) => probe_target = Some(kind),
                    Err(reason) => fail(key, value, reason),
                },
                "cmd" if value.trim().is_empty() => fail(key, value, "empty command".into()),
                "cmd" => {
                    probe_target = Some(ProbeKind::Exec {
                        command: value.trim().to_owned(),
                    });
                }
                _ => {
                    if let Err(reason) = timing.set(name, value.trim()) {
                        fail(key, value, reason);
                    }
                }
            }
        }
    }

    if routes.is_empty() && errors.is_empty() {
        errors.push(LabelError {
            label: "aliyun.routing.port_<port>".into(),
            value: String::new(),
            reason: "no route: add a label such as aliyun.routing.port_80: myservice.local".into(),
        });
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(ContainerSpec {
        routes,
        sticky,
        weight,
        probe: probe_target.map(|kind| timing.into_spec(kind)),
    })
}

/// Two entries are the same route when they would answer the same requests.
fn same_route(a: &RouteSpec, b: &RouteSpec) -> bool {
    match (a.scheme, b.scheme) {
        (Scheme::Tcp, Scheme::Tcp) => a.listen_port == b.listen_port,
        (Scheme::Tcp, _) | (_, Scheme::Tcp) => false,
        _ => a.domain == b.domain && a.path == b.path,
    }
}

#[derive(Debug)]
struct ProbeTiming {
    initial_delay: u64,
    timeout: u64,
    period: u64,
    success_threshold: u32,
    failure_threshold: u32,
}

impl Default for ProbeTiming {
    fn default() -> Self {
        use probe_defaults as d;
        Self {
            initial_delay: d::INITIAL_DELAY_SECONDS,
            timeout: d::TIMEOUT_SECONDS,
            period: d::PERIOD_SECONDS,
            success_threshold: d::SUCCESS_THRESHOLD,
            failure_threshold: d::FAILURE_THRESHOLD,
        }
    }
}

impl ProbeTiming {
    fn set(&mut self, name: &str, value: &str) -> Result<(), String> {
        let number = || {
            value
                .parse::<u32>()
                .map_err(|_| "must be a non-negative integer".to_owned())
        };
        let positive = || match number()? {
            0 => Err("must be at least 1".to_owned()),
            n => Ok(n),
        };
        match name {
            "initial_delay_seconds" => self.initial_delay = u64::from(number()?),
            "timeout_seconds" => self.timeout = u64::from(positive()?),
            "period_seconds" => self.period = u64::from(positive()?),
            "success_threshold" => self.success_threshold = positive()?,
            "failure_threshold" => self.failure_threshold = positive()?,
            _ => {
                return Err(
                    "unknown probe label; known: url, cmd, initial_delay_seconds, \
                            timeout_seconds, period_seconds, success_threshold, failure_threshold"
                        .into(),
                );
            }
        }
        Ok(())
    }

    fn into_spec(self, kind: ProbeKind) -> ProbeSpec {
        ProbeSpec {
            kind,
            initial_delay: Duration::from_secs(self.initial_delay),
            timeout: Duration::from_secs(self.timeout),
            period: Duration::from_secs(self.period),
            success_threshold: self.success_threshold,
            failure_threshold: self.failure_threshold,
        }
    }
}

fn parse_port(text: &str) -> Result<u16, String> {
    match text.parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("{text:?} is not a port number (1-65535)")),
        Ok(p) => Ok(p),
    }
}

/// `[scheme://]host[:port][/context_path]`.
fn parse_route(
    entry: &str,
    container_port: u16,
    default_domain: &str,
) -> Result<RouteSpec, String> {
    let (scheme, rest) = match entry.split_once("://") {
        None => (Scheme::Http, entry),
        Some(("http", rest)) => (Scheme::Http, rest),
        Some(("ws", rest)) => (Scheme::Ws, rest),
        Some(("tcp", rest)) => (Scheme::Tcp, rest),
        // TLS is ended in front of the router (acsrouting's meaning): served as http / ws.
        Some(("https", rest)) => (Scheme::Https, rest),
        Some(("wss", rest)) => (Scheme::Wss, rest),
        Some((other, _)) => {
            return Err(format!(
                "unknown scheme {other:?}; use http, https, ws, wss or tcp"
            ));
        }
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let (host, listen_port) = match authority.rsplit_once(':') {
        Some((host, port)) => (host, Some(parse_port(port)?)),
        None => (authority, None),
    };
    let domain = expand_domain(host, default_domain)?;
    match scheme {
        Scheme::Tcp => {
            if !path.is_empty() {
                return Err("tcp routes have no context path".into());
            }
            let Some(listen_port) = listen_port else {
                return Err(
                    "tcp routes need the port the router listens on, e.g. tcp://redis.local:16379"
                        .into(),
                );
            };
            Ok(RouteSpec {
                scheme,
                domain,
                path: String::new(),
                listen_port: Some(listen_port),
                container_port,
            })
        }
        Scheme::Http | Scheme::Ws | Scheme::Https | Scheme::Wss => {
            if listen_port.is_some() {
                return Err("a port is only allowed on tcp:// routes; http routes are served on the --listen addresses".into());
            }
            Ok(RouteSpec {
                scheme,
                domain,
                path: parse_context_path(path)?,
                listen_port: None,
                container_port,
            })
        }
    }
}

/// A host without a dot is a prefix of the default domain.
fn expand_domain(host: &str, default_domain: &str) -> Result<String, String> {
    let domain = if host.contains('.') || default_domain.is_empty() {
        host.to_owned()
    } else {
        format!("{host}.{default_domain}")
    };
    validate_domain(&domain)?;
    Ok(domain)
}

fn validate_domain(domain: &str) -> Result<(), String> {
    if domain.is_empty() {
        return Err("empty host".into());
    }
    if domain.len() > MAX_DOMAIN_LEN {
        return Err(format!("domain longer than {MAX_DOMAIN_LEN} characters"));
    }
    if domain.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(format!(
            "domains are lower-case: write {:?}",
            domain.to_ascii_lowercase()
        ));
    }
    for label in domain.split('.') {
        let valid = !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !valid {
            return Err(format!(
                "{domain:?} is not a DNS name (labels of a-z, 0-9 and inner '-', separated by single dots)"
            ));
        }
    }
    Ok(())
}

/// `^/[a-z0-9-_/.]+$`, or nothing (meaning `/`).
fn parse_context_path(path: &str) -> Result<String, String> {
    if path.is_empty() || path == "/" {
        return Ok("/".into());
    }
    let valid = path.len() > 1
        && path[1..]
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_/.".contains(&b));
    if !valid {
        return Err(format!("context path {path:?} must match ^/[a-z0-9-_/.]+$"));
    }
    // "/api/" and "/api" route the same requests; keep one spelling.
    Ok(path.trim_end_matches('/').to_owned())
}

/// `http://container[:port][/path]` or `tcp://container:port`.
fn parse_probe_url(url: &str) -> Result<ProbeKind, String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or("must be http://container[:port][/path] or tcp://container:port")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = match authority.split_once(':') {
        Some((host, port)) => (host, Some(parse_port(port)?)),
        None => (authority, None),
    };
    if host != "container" {
        return Err(format!(
            "the host must be the literal word `container` (it stands for the container's address), not {host:?}"
        ));
    }
    match scheme {
        "http" => Ok(ProbeKind::Http {
            port: port.unwrap_or(80),
            path: path.to_owned(),
        }),
        "tcp" => match (port, path) {
            (Some(port), "/") => Ok(ProbeKind::Tcp { port }),
            (None, _) => Err("tcp probes need a port: tcp://container:<port>".into()),
            (Some(_), _) => Err("tcp probes have no path".into()),
        },
        other => Err(format!("unknown probe scheme {other:?}; use http or tcp")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn route(domain: &str, path: &str, port: u16) -> RouteSpec {
        RouteSpec {
            scheme: Scheme::Http,
            domain: domain.into(),
            path: path.into(),
            listen_port: None,
            container_port: port,
        }
    }

    #[test]
    fn seed_labels() {
        let spec = parse(
            &labels(&[
                ("aliyun.routing.port_80", "restserver.local"),
                ("aliyun.scale", "2"),
                ("aliyun.probe.url", "http://container:80"),
                ("aliyun.probe.initial_delay_seconds", "2"),
                ("aliyun.probe.timeout_seconds", "2"),
                ("com.docker.compose.service", "restserver"),
            ]),
            "local",
        )
        .unwrap();
        assert_eq!(spec.routes, vec![route("restserver.local", "/", 80)]);
        assert!(spec.sticky);
        assert_eq!(spec.weight, 100);
        let probe = spec.probe.unwrap();
        assert_eq!(
            probe.kind,
            ProbeKind::Http {
                port: 80,
                path: "/".into()
            }
        );
        assert_eq!(probe.initial_delay, Duration::from_secs(2));
        assert_eq!(probe.timeout, Duration::from_secs(2));
        assert_eq!(
            probe.period,
            Duration::from_secs(probe_defaults::PERIOD_SECONDS)
        );
        assert_eq!(probe.failure_threshold, probe_defaults::FAILURE_THRESHOLD);
    }

    #[test]
    fn valid_routes() {
        let cases: &[(&str, &[RouteSpec])] = &[
            ("web", &[route("web.local", "/", 8080)]),
            (
                "http://web.example.com/api",
                &[route("web.example.com", "/api", 8080)],
            ),
            ("web.local/api/", &[route("web.local", "/api", 8080)]),
            (
                "a.local;b.local/x",
                &[route("a.local", "/", 8080), route("b.local", "/x", 8080)],
            ),
            (
                "a.local; b.local",
                &[route("a.local", "/", 8080), route("b.local", "/", 8080)],
            ),
            (
                "a.local/v1.2/x_y-z",
                &[route("a.local", "/v1.2/x_y-z", 8080)],
            ),
        ];
        for (value, expected) in cases {
            let spec = parse(&labels(&[("aliyun.routing.port_8080", value)]), "local")
                .unwrap_or_else(|e| panic!("{value}: {e:?}"));
            assert_eq!(&spec.routes, expected, "{value}");
        }
    }

    #[test]
    fn ws_and_tcp_routes() {
        let spec = parse(
            &labels(&[
                ("aliyun.routing.port_80", "ws://chat.local"),
                ("aliyun.routing.port_6379", "tcp://redis.local:16379"),
            ]),
            "local",
        )
        .unwrap();
        let ws = spec.routes.iter().find(|r| r.container_port == 80).unwrap();
        assert_eq!((ws.scheme, ws.domain.as_str()), (Scheme::Ws, "chat.local"));
        let tcp = spec
            .routes
            .iter()
            .find(|r| r.container_port == 6379)
            .unwrap();
        assert_eq!((tcp.scheme, tcp.listen_port), (Scheme::Tcp, Some(16379)));
    }

    #[test]
    fn https_and_wss_routes_are_served_as_http_and_ws() {
        let spec = parse(
            &labels(&[
                (
                    "aliyun.routing.port_80",
                    "https://shop.local/api;https://www",
                ),
                ("aliyun.routing.port_8080", "wss://chat.example.com"),
            ]),
            "local",
        )
        .unwrap();
        let found = |domain: &str| spec.routes.iter().find(|r| r.domain == domain).unwrap();
        let shop = found("shop.local");
        assert_eq!(
            (
                shop.scheme,
                shop.path.as_str(),
                shop.container_port,
                shop.listen_port
            ),
            (Scheme::Https, "/api", 80, None)
        );
        let www = found("www.local");
        assert_eq!((www.scheme, www.path.as_str()), (Scheme::Https, "/"));
        let chat = found("chat.example.com");
        assert_eq!((chat.scheme, chat.container_port), (Scheme::Wss, 8080));
        // The label's scheme is kept (shown in /api/routes); it is served as http / ws.
        assert_eq!(Scheme::Https.to_string(), "https");
        assert_eq!(Scheme::Wss.to_string(), "wss");
        assert_eq!(Scheme::Https.served_as(), Scheme::Http);
        assert_eq!(Scheme::Wss.served_as(), Scheme::Ws);
        assert!(Scheme::Wss.is_websocket() && Scheme::Ws.is_websocket());
        assert!(!Scheme::Https.is_websocket() && !Scheme::Tcp.is_websocket());
        assert_eq!(
            serde_json::to_value(Scheme::Wss).unwrap(),
            serde_json::json!("wss")
        );
    }

    #[test]
    fn bad_labels_are_reported_with_a_reason() {
        let cases: &[(&str, &str, &str)] = &[
            ("aliyun.routing.port_80", "Web.local", "lower-case"),
            ("aliyun.routing.port_80", "web..local", "DNS name"),
            ("aliyun.routing.port_80", "-web.local", "DNS name"),
            ("aliyun.routing.port_80", "web_1.local", "DNS name"),
            (
                "aliyun.routing.port_80",
                &format!("{}.local", "a".repeat(130)),
                "longer than 128",
            ),
            ("aliyun.routing.port_80", "web.local/API", "context path"),
            ("aliyun.routing.port_80", "web.local/a b", "context path"),
            (
                "aliyun.routing.port_80",
                "https://web.local:443",
                "only allowed on tcp",
            ),
            (
                "aliyun.routing.port_80",
                "http://web.local;https://web.local",
                "duplicate route",
            ),
            (
                "aliyun.routing.port_80",
                "ftp://web.local",
                "unknown scheme",
            ),
            (
                "aliyun.routing.port_80",
                "web.local:8080",
                "only allowed on tcp",
            ),
            (
                "aliyun.routing.port_80",
                "tcp://redis.local",
                "need the port",
            ),
            (
                "aliyun.routing.port_80",
                "tcp://redis.local:1/x",
                "no context path",
            ),
            (
                "aliyun.routing.port_80",
                "a.local;a.local",
                "duplicate route",
            ),
            (
                "aliyun.routing.port_80",
                "a.local/x;a.local/x/",
                "duplicate route",
            ),
            ("aliyun.routing.port_http", "web.local", "not a port"),
            ("aliyun.routing.port_0", "web.local", "not a port"),
            ("aliyun.routing.port_70000", "web.local", "not a port"),
            ("aliyun.routing.weight", "101", "0 to 100"),
            ("aliyun.routing.weight", "-1", "0 to 100"),
            ("aliyun.routing.weight", "ten", "0 to 100"),
            ("aliyun.routing.session_sticky", "yes", "true or false"),
            ("aliyun.routing.bogus", "1", "unknown routing label"),
            (
                "aliyun.probe.url",
                "http://localhost:80",
                "literal word `container`",
            ),
            ("aliyun.probe.url", "container:80", "must be http"),
            ("aliyun.probe.url", "tcp://container", "need a port"),
            (
                "aliyun.probe.url",
                "udp://container:53",
                "unknown probe scheme",
            ),
            ("aliyun.probe.cmd", " ", "empty command"),
            ("aliyun.probe.timeout_seconds", "0", "at least 1"),
            ("aliyun.probe.period_seconds", "1.5", "non-negative integer"),
            (
                "aliyun.probe.failure_threshold",
                "x",
                "non-negative integer",
            ),
            (
                "aliyun.probe.initial_delay_seconds",
                "-2",
                "non-negative integer",
            ),
            ("aliyun.probe.retries", "3", "unknown probe label"),
        ];
        for (key, value, reason) in cases {
            let mut pairs = vec![(*key, *value)];
            if !key.starts_with(PORT_PREFIX) {
                pairs.push(("aliyun.routing.port_80", "ok.local"));
            }
            let errors = parse(&labels(&pairs), "local").expect_err(&format!("{key}={value}"));
            assert_eq!(errors.len(), 1, "{key}={value}: {errors:?}");
            assert_eq!(errors[0].label, *key);
            assert!(
                errors[0].reason.contains(reason),
                "{key}={value}: {:?} lacks {reason:?}",
                errors[0].reason
            );
        }
    }

    #[test]
    fn url_and_cmd_are_exclusive() {
        let errors = parse(
            &labels(&[
                ("aliyun.routing.port_80", "a.local"),
                ("aliyun.probe.url", "http://container/health"),
                ("aliyun.probe.cmd", "true"),
            ]),
            "local",
        )
        .unwrap_err();
        assert!(errors[0].reason.contains("exclusive"), "{errors:?}");
    }

    #[test]
    fn probe_kinds_and_timing() {
        let spec = parse(
            &labels(&[
                ("aliyun.routing.port_80", "a.local"),
                ("aliyun.probe.url", "tcp://container:5432"),
                ("aliyun.probe.period_seconds", "1"),
                ("aliyun.probe.success_threshold", "2"),
                ("aliyun.probe.failure_threshold", "1"),
            ]),
            "local",
        )
        .unwrap();
        let probe = spec.probe.unwrap();
        assert_eq!(probe.kind, ProbeKind::Tcp { port: 5432 });
        assert_eq!(probe.period, Duration::from_secs(1));
        assert_eq!((probe.success_threshold, probe.failure_threshold), (2, 1));

        let spec = parse(
            &labels(&[
                ("aliyun.routing.port_80", "a.local"),
                ("aliyun.probe.url", "http://container:8080/healthz?full=1"),
            ]),
            "local",
        )
        .unwrap();
        assert_eq!(
            spec.probe.unwrap().kind,
            ProbeKind::Http {
                port: 8080,
                path: "/healthz?full=1".into()
            }
        );

        let spec = parse(
            &labels(&[
                ("aliyun.routing.port_80", "a.local"),
                ("aliyun.probe.cmd", "test -f /ok"),
            ]),
            "local",
        )
        .unwrap();
        assert_eq!(
            spec.probe.unwrap().kind,
            ProbeKind::Exec {
                command: "test -f /ok".into()
            }
        );
    }

    #[test]
    fn weight_and_stickiness() {
        let spec = parse(
            &labels(&[
                ("aliyun.routing.port_80", "a.local"),
                ("aliyun.routing.weight", "0"),
                ("aliyun.routing.session_sticky", "false"),
            ]),
            "local",
        )
        .unwrap();
        assert_eq!((spec.weight, spec.sticky), (0, false));
    }

    #[test]
    fn deployment_labels_are_ignored_and_no_route_is_reported() {
        assert!(!is_router_container(&labels(&[("aliyun.scale", "2")])));
        assert!(is_router_container(&labels(&[(
            "aliyun.probe.url",
            "tcp://container:1"
        )])));
        let errors = parse(
            &labels(&[("aliyun.probe.url", "tcp://container:1")]),
            "local",
        )
        .unwrap_err();
        assert!(errors[0].reason.contains("no route"), "{errors:?}");
    }
}
