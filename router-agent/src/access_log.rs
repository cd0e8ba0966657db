//! The access log: one line per request (and per tunnel, when it ends), as text or JSON.
//!
//! Lines are formatted on the worker that served the request and handed to one writer thread
//! through a bounded channel; the thread writes them in batches. A full channel (the output
//! cannot keep up) drops the line and counts it (`router_access_log_dropped_total`): the
//! data path never waits for the log.
use std::{
    fmt::Write as _,
    io::Write as _,
    net::SocketAddr,
    path::PathBuf,
    str::FromStr,
    sync::{
        Arc,
        mpsc::{self, SyncSender, TrySendError},
    },
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use serde::Serialize;

use crate::{config::LogFormat, metrics::Metrics};

/// Lines waiting for the writer at most; more are dropped (about 4 MiB of lines).
const QUEUE_LINES: usize = 16 * 1024;
/// The writer gathers up to this many bytes of waiting lines into one write.
const BATCH_BYTES: usize = 64 * 1024;
/// Characters of a container id shown (as `docker ps` does).
pub const SHORT_ID: usize = 12;

/// Where access-log lines go (`--access-log`).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum AccessLogTarget {
    Off,
    /// The agent's standard output (its own logs go to standard error).
    #[default]
    Stdout,
    Stderr,
    /// Appended to this file (created if missing).
    File(PathBuf),
}

impl FromStr for AccessLogTarget {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "off" => Self::Off,
            "stdout" | "-" => Self::Stdout,
            "stderr" => Self::Stderr,
            "" => return Err("use off, stdout, stderr or a file path".into()),
            path => Self::File(PathBuf::from(path)),
        })
    }
}

impl<'de> serde::Deserialize<'de> for AccessLogTarget {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The sending side, shared by every worker.
pub struct AccessLog {
    format: LogFormat,
    lines: Option<SyncSender<String>>,
}

impl AccessLog {
    /// No access log.
    pub fn off() -> Self {
        Self {
            format: LogFormat::Text,
            lines: None,
        }
    }

    /// Opens the target and starts the writer thread.
    pub fn start(
        target: &AccessLogTarget,
        format: LogFormat,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let out: Box<dyn std::io::Write + Send> = match target {
            AccessLogTarget::Off => return Ok(Self::off()),
            AccessLogTarget::Stdout => Box::new(std::io::stdout()),
            AccessLogTarget::Stderr => Box::new(std::io::stderr()),
            AccessLogTarget::File(path) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| {
                        format!(
                            "opening the access log {}; is its directory there and writable?",
                            path.display()
                        )
                    })?,
            ),
        };
        let (tx, rx) = mpsc::sync_channel(QUEUE_LINES);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(&rx, out, &metrics))
            .context("starting the access-log thread")?;
        Ok(Self {
            format,
            lines: Some(tx),
        })
    }

    pub fn enabled(&self) -> bool {
        self.lines.is_some()
    }

    /// Formats and queues one entry; drops it (and counts it) when the writer is behind.
    pub fn log(&self, entry: &Entry<'_>, metrics: &Metrics) {
        let Some(lines) = &self.lines else { return };
        let line = match self.format {
            LogFormat::Text => entry.text(),
            LogFormat::Json => entry.json(),
        };
        match lines.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                Metrics::add(&metrics.access_log_dropped, 1);
            }
        }
    }
}

/// The writer thread: waits for a line, takes every line already waiting (up to a batch), and
/// writes them with one call, so lines never interleave with other output mid-line.
fn write_lines(
    rx: &mpsc::Receiver<String>,
    mut out: Box<dyn std::io::Write + Send>,
    metrics: &Metrics,
) {
    let mut batch = Vec::with_capacity(BATCH_BYTES);
    while let Ok(line) = rx.recv() {
        batch.extend_from_slice(line.as_bytes());
        let mut count = 1;
        while batch.len() < BATCH_BYTES
            && let Ok(line) = rx.try_recv()
        {
            batch.extend_from_slice(line.as_bytes());
            count += 1;
        }
        if out.write_all(&batch).and_then(|()| out.flush()).is_ok() {
            Metrics::add(&metrics.access_log_lines, count);
        } else {
            Metrics::add(&metrics.access_log_dropped, count);
        }
        batch.clear();
    }
}

/// What kind of exchange a line is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Http,
    /// A WebSocket upgrade, logged when the tunnel ends.
    Websocket,
    /// A `tcp://` route connection, logged when it ends.
    Tcp,
}

/// The backend that served a request.
#[derive(Clone, Copy, Debug)]
pub struct BackendRef<'a> {
    pub name: &'a str,
    pub id: &'a str,
    pub addr: SocketAddr,
    /// The agent of the node it runs on, for a backend of another cluster node.
    pub via: Option<SocketAddr>,
}

/// One access-log entry, borrowed from the connection that served the request.
#[derive(Debug)]
pub struct Entry<'a> {
    pub time: SystemTime,
    pub kind: Kind,
    pub client: SocketAddr,
    /// The request line as the client sent it (`None`: no request line was read).
    pub request_line: Option<&'a [u8]>,
    /// The matched route's domain and context path.
    pub route: Option<(&'a str, &'a str)>,
    pub backend: Option<BackendRef<'a>>,
    /// 0: no response was sent (the client went away first).
    pub status: u16,
    /// Who answered: `backend`, `router`, or `none`.
    pub answered_by: &'static str,
    /// Why the router answered itself (`no_route`, `no_backend`, `bad_request`, ...).
    pub reason: Option<&'static str>,
    /// More about the reason (the parser's complaint for a bad request).
    pub detail: Option<&'a str>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub connect: Option<Duration>,
    pub first_byte: Option<Duration>,
    pub total: Duration,
}

/// Milliseconds with microsecond precision, the unit of the text format.
fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl Entry<'_> {
    fn request_parts(&self) -> (String, String, String) {
        let Some(line) = self.request_line else {
            return ("-".into(), "-".into(), "-".into());
        };
        let line = String::from_utf8_lossy(line);
        let mut parts = line.splitn(3, ' ');
        let mut next = || parts.next().unwrap_or("-").to_owned();
        (next(), next(), next())
    }

    /// `2026-12-05T05:40:00.123Z 198.18.0.1:40312 "GET /x HTTP/1.1" 200 in=78 out=1234
    /// route=web.local/ backend=web-1 id=0123456789ab answered=backend connect_ms=0.311
    /// ttfb_ms=1.020 total_ms=1.204`
    pub fn text(&self) -> String {
        let mut line = String::with_capacity(256);
        let _ = write!(
            line,
            "{} {} \"",
            humantime::format_rfc3339_millis(self.time),
            self.client
        );
        match self.request_line {
            Some(request) => escape_into(&mut line, request),
            None => line.push('-'),
        }
        let _ = write!(
            line,
            "\" {} in={} out={} kind={}",
            self.status,
            self.bytes_in,
            self.bytes_out,
            kind_name(self.kind)
        );
        match self.route {
            Some((domain, path)) => {
                let _ = write!(line, " route={domain}{path}");
            }
            None => line.push_str(" route=-"),
        }
        match &self.backend {
            Some(b) => {
                let _ = write!(
                    line,
                    " backend={} id={} addr={}",
                    b.name,
                    short(b.id),
                    b.addr
                );
                if let Some(via) = b.via {
                    let _ = write!(line, " node={via}");
                }
            }
            None => line.push_str(" backend=- id=-"),
        }
        let _ = write!(line, " answered={}", self.answered_by);
        if let Some(reason) = self.reason {
            let _ = write!(line, " reason={reason}");
        }
        if let Some(detail) = self.detail {
            line.push_str(" detail=\"");
            escape_into(&mut line, detail.as_bytes());
            line.push('"');
        }
        for (name, value) in [("connect_ms", self.connect), ("ttfb_ms", self.first_byte)] {
            match value {
                Some(d) => {
                    let _ = write!(line, " {name}={:.3}", millis(d));
                }
                None => {
                    let _ = write!(line, " {name}=-");
                }
            }
        }
        let _ = writeln!(line, " total_ms={:.3}", millis(self.total));
        line
    }

    /// One JSON object per line; times in seconds.
    pub fn json(&self) -> String {
        #[derive(Serialize)]
        struct Line<'a> {
            time: String,
            kind: Kind,
            client: SocketAddr,
            method: String,
            target: String,
            protocol: String,
            status: u16,
            bytes_in: u64,
            bytes_out: u64,
            domain: Option<&'a str>,
            path: Option<&'a str>,
            backend: Option<&'a str>,
            backend_id: Option<&'a str>,
            backend_addr: Option<SocketAddr>,
            node: Option<SocketAddr>,
            answered_by: &'static str,
            reason: Option<&'static str>,
            detail: Option<&'a str>,
            connect_seconds: Option<f64>,
            ttfb_seconds: Option<f64>,
            total_seconds: f64,
        }
        let (method, target, protocol) = self.request_parts();
        let line = Line {
            time: humantime::format_rfc3339_millis(self.time).to_string(),
            kind: self.kind,
            client: self.client,
            method,
            target,
            protocol,
            status: self.status,
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
            domain: self.route.map(|r| r.0),
            path: self.route.map(|r| r.1),
            backend: self.backend.map(|b| b.name),
            backend_id: self.backend.map(|b| short(b.id)),
            backend_addr: self.backend.map(|b| b.addr),
            node: self.backend.and_then(|b| b.via),
            answered_by: self.answered_by,
            reason: self.reason,
            detail: self.detail,
            connect_seconds: self.connect.map(|d| d.as_secs_f64()),
            ttfb_seconds: self.first_byte.map(|d| d.as_secs_f64()),
            total_seconds: self.total.as_secs_f64(),
        };
        let mut text = serde_json::to_string(&line).unwrap_or_default();
        text.push('\n');
        text
    }
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Http => "http",
        Kind::Websocket => "websocket",
        Kind::Tcp => "tcp",
    }
}

pub fn short(id: &str) -> &str {
    id.get(..SHORT_ID).unwrap_or(id)
}

/// Client bytes in a quoted text field: `"` and `\` escaped, and anything not printable ASCII
/// as `\xNN`, so that a request cannot forge a line or a field.
fn escape_into(out: &mut String, bytes: &[u8]) {
    for &b in bytes {
        match b {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            0x20..=0x7e => out.push(b as char),
            _ => {
                let _ = write!(out, "\\x{b:02x}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry<'static> {
        Entry {
            time: SystemTime::UNIX_EPOCH + Duration::from_hours(500_000),
            kind: Kind::Http,
            client: "198.18.0.1:40312".parse().unwrap(),
            request_line: Some(b"GET /a\"b HTTP/1.1"),
            route: Some(("web.local", "/")),
            backend: Some(BackendRef {
                name: "web-1",
                id: "0123456789abcdef0123",
                addr: "198.18.0.3:80".parse().unwrap(),
                via: None,
            }),
            status: 200,
            answered_by: "backend",
            reason: None,
            detail: None,
            bytes_in: 78,
            bytes_out: 1234,
            connect: Some(Duration::from_micros(311)),
            first_byte: Some(Duration::from_micros(1020)),
            total: Duration::from_micros(1204),
        }
    }

    #[test]
    fn text_line_has_every_field_and_escapes_the_request() {
        assert_eq!(
            entry().text(),
            "2027-01-15T08:00:00.000Z 198.18.0.1:40312 \"GET /a\\\"b HTTP/1.1\" 200 in=78 \
             out=1234 kind=http route=web.local/ backend=web-1 id=0123456789ab \
             addr=198.18.0.3:80 answered=backend connect_ms=0.311 ttfb_ms=1.020 \
             total_ms=1.204\n"
        );
    }

    #[test]
    fn json_line_parses_back() {
        let mut e = entry();
        e.backend = None;
        e.status = 404;
        e.answered_by = "router";
        e.reason = Some("no_route");
        let v: serde_json::Value = serde_json::from_str(&e.json()).unwrap();
        assert_eq!(v["status"], 404);
        assert_eq!(v["answered_by"], "router");
        assert_eq!(v["reason"], "no_route");
        assert_eq!(v["target"], "/a\"b");
        assert_eq!(v["backend"], serde_json::Value::Null);
        assert!((v["total_seconds"].as_f64().unwrap() - 0.001_204).abs() < 1e-9);
    }

    #[test]
    fn targets_parse() {
        assert_eq!("off".parse(), Ok(AccessLogTarget::Off));
        assert_eq!("stdout".parse(), Ok(AccessLogTarget::Stdout));
        assert_eq!(
            "/var/log/a.log".parse(),
            Ok(AccessLogTarget::File("/var/log/a.log".into()))
        );
        assert!("".parse::<AccessLogTarget>().is_err());
    }
}
