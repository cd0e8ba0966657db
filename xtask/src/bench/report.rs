//! Turning runs into results: medians per scenario and contender, ratios of the router rows to
//! the other contenders, the Markdown tables and the SVG chart (written by hand: no crates).
use std::{fmt::Write as _, time::Duration};

use super::{contenders::DatapathCounters, system::Machine};

const MIB: f64 = 1024.0 * 1024.0;

/// One measured run of one contender in one scenario.
#[derive(Debug, Clone, Default)]
pub struct Measure {
    /// `None` for the tunnel scenario.
    pub requests_per_sec: Option<f64>,
    pub bytes_per_sec: f64,
    /// Latency percentiles in seconds (`None` for the tunnel scenario).
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    /// Machine-wide busy CPU seconds per request, or per GiB for the tunnel scenario.
    pub cpu_per_unit: f64,
    pub peak_rss: Option<u64>,
    /// Non-2xx responses and socket errors (HTTP), failed connections (tunnel).
    pub errors: u64,
    pub error_detail: Option<String>,
    /// The router's data path byte counters over the measured run.
    pub counters: Option<DatapathCounters>,
    /// CPU seconds the hypervisor gave to others during the measured run.
    pub steal: f64,
    /// The proxy's own CPU (its processes' user + system time) over the measured run, in
    /// cores (`tcp-*` scenarios; `None` for `direct`).
    pub proxy_cpu: Option<f64>,
    /// Connects the kernel balanced during the measured run (`router-socket-lb`).
    pub kernel_connects: Option<u64>,
}

pub struct Sample {
    pub scenario: String,
    pub contender: String,
    pub is_router: bool,
    /// Compare by bytes/s instead of requests/s (1 MiB bodies, tunnel).
    pub by_bytes: bool,
    pub outcome: Result<Measure, String>,
    /// Other work seen on the machine during the run (e.g. someone's router-agent).
    pub disturbed: Option<String>,
}

/// The median of each metric over a contender's rounds in one scenario.
#[derive(Debug, Clone, Default)]
pub struct Row {
    pub scenario: String,
    pub contender: String,
    pub is_router: bool,
    pub by_bytes: bool,
    pub tunnel: bool,
    /// Successful runs the medians come from; 0 when every run failed.
    pub runs: usize,
    pub requests_per_sec: Option<f64>,
    pub bytes_per_sec: Option<f64>,
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    pub cpu_per_unit: Option<f64>,
    pub peak_rss: Option<f64>,
    pub errors: u64,
    pub counters: Option<DatapathCounters>,
    /// (max - min) / median of the compared metric over the rounds: how noisy the runs were.
    pub spread: Option<f64>,
    pub proxy_cpu: Option<f64>,
    pub kernel_connects: Option<f64>,
    /// Why runs failed or the contender could not take part; shown under the table.
    pub problems: Vec<String>,
    /// Set when the contender cannot run this scenario at all (shown as n/a).
    pub unavailable: Option<String>,
}

impl Row {
    /// The number contenders are compared by: requests/s, or bytes/s for bulk transfers.
    pub fn headline(&self) -> Option<f64> {
        if self.by_bytes || self.tunnel {
            self.bytes_per_sec
        } else {
            self.requests_per_sec
        }
    }
}

pub fn median(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 {
        values[mid]
    } else {
        f64::midpoint(values[mid - 1], values[mid])
    })
}

/// (max - min) / median, for two values or more.
pub fn spread(values: &[f64]) -> Option<f64> {
    if values.len() < 2 {
        return None;
    }
    let max = values.iter().copied().fold(f64::MIN, f64::max);
    let min = values.iter().copied().fold(f64::MAX, f64::min);
    ratio(Some(max - min), median(&mut values.to_vec()))
}

/// `a / b` when both are known and `b` is not zero.
pub fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

/// Groups samples by (scenario, contender), in the order they first appear, into median rows.
pub fn aggregate(samples: &[Sample]) -> Vec<Row> {
    let mut rows: Vec<Row> = Vec::new();
    let mut groups: Vec<Vec<&Sample>> = Vec::new();
    for sample in samples {
        let position = rows
            .iter()
            .position(|r| r.scenario == sample.scenario && r.contender == sample.contender);
        if let Some(i) = position {
            groups[i].push(sample);
        } else {
            rows.push(Row {
                scenario: sample.scenario.clone(),
                contender: sample.contender.clone(),
                is_router: sample.is_router,
                by_bytes: sample.by_bytes,
                ..Row::default()
            });
            groups.push(vec![sample]);
        }
    }
    for (row, group) in rows.iter_mut().zip(&groups) {
        let ok: Vec<&Measure> = group
            .iter()
            .filter_map(|s| s.outcome.as_ref().ok())
            .collect();
        let med = |f: &dyn Fn(&Measure) -> Option<f64>| {
            median(&mut ok.iter().filter_map(|m| f(m)).collect::<Vec<_>>())
        };
        row.runs = ok.len();
        row.tunnel = !ok.is_empty() && ok.iter().all(|m| m.requests_per_sec.is_none());
        row.requests_per_sec = med(&|m| m.requests_per_sec);
        row.bytes_per_sec = med(&|m| Some(m.bytes_per_sec));
        row.p50 = med(&|m| m.p50);
        row.p99 = med(&|m| m.p99);
        row.cpu_per_unit = med(&|m| Some(m.cpu_per_unit));
        row.peak_rss = med(&|m| m.peak_rss.map(|b| b as f64));
        row.errors = ok.iter().map(|m| m.errors).sum();
        row.proxy_cpu = med(&|m| m.proxy_cpu);
        row.kernel_connects = med(&|m| m.kernel_connects.map(|n| n as f64));
        let compared: Vec<f64> = ok
            .iter()
            .filter_map(|m| {
                if row.by_bytes || row.tunnel {
                    Some(m.bytes_per_sec)
                } else {
                    m.requests_per_sec
                }
            })
            .collect();
        row.spread = spread(&compared);
        if ok.iter().any(|m| m.counters.is_some()) {
            row.counters = Some(DatapathCounters {
                copied: med(&|m| m.counters.map(|c| c.copied)).unwrap_or(0.0),
                spliced: med(&|m| m.counters.map(|c| c.spliced)).unwrap_or(0.0),
                kernel: med(&|m| m.counters.map(|c| c.kernel)).unwrap_or(0.0),
            });
        }
        for detail in ok.iter().filter_map(|m| m.error_detail.as_ref()) {
            row.problems.push(detail.clone());
        }
        let disturbed: Vec<&String> = group.iter().filter_map(|s| s.disturbed.as_ref()).collect();
        if let Some(first) = disturbed.first() {
            row.problems.push(format!(
                "{} of {} runs overlapped with other work: {first}",
                disturbed.len(),
                group.len()
            ));
        }
        let failures: Vec<&String> = group
            .iter()
            .filter_map(|s| s.outcome.as_ref().err())
            .collect();
        if let Some(first) = failures.first() {
            row.problems.push(format!(
                "{} of {} runs failed; first: {first}",
                failures.len(),
                group.len()
            ));
        }
    }
    rows
}

/// The rows of `scenario` whose contender is `name`.
fn find<'a>(rows: &'a [Row], scenario: &str, name: &str) -> Option<&'a Row> {
    rows.iter()
        .find(|r| r.scenario == scenario && r.contender == name)
}

/// How a benchmark was run, for the report's header.
pub struct RunInfo {
    pub title: String,
    pub command: String,
    pub machine: Machine,
    pub revision: String,
    pub rounds: u32,
    pub duration: u64,
    pub elapsed: Duration,
    pub steal_seconds: f64,
    pub notes: Vec<String>,
}

fn header(info: &RunInfo) -> String {
    let m = &info.machine;
    let elapsed = info.elapsed.as_secs();
    format!(
        "# {}\n\n\
         - command: `{}`\n\
         - date: {}; machine: {} CPUs ({}), kernel {}\n\
         - router-agent: {}\n\
         - {} round(s) per contender, contenders interleaved (A B C, A B C, ...), each started \
         fresh for its run; {} s per wrk run after a discarded 1 s warm-up; medians shown\n\
         - total time: {}m{:02}s\n",
        info.title,
        info.command,
        m.date,
        m.cpus,
        m.cpu_model,
        m.kernel,
        info.revision,
        info.rounds,
        info.duration,
        elapsed / 60,
        elapsed % 60
    )
}

fn cell(value: Option<f64>, format: impl Fn(f64) -> String) -> String {
    value.map_or_else(|| "–".into(), format)
}

fn latency(seconds: f64) -> String {
    if seconds < 1e-3 {
        format!("{:.0} µs", seconds * 1e6)
    } else if seconds < 1.0 {
        format!("{:.2} ms", seconds * 1e3)
    } else {
        format!("{seconds:.2} s")
    }
}

fn percent(r: f64) -> String {
    format!("{:.0} %", r * 100.0)
}

fn times(r: f64) -> String {
    format!("{r:.2}×")
}

/// The main table: one row per scenario and contender.
pub fn markdown(info: &RunInfo, rows: &[Row]) -> String {
    let mut out = header(info);
    out.push_str(
        "\n| scenario | contender | req/s (`-small`: messages/s) | MiB/s | p50 | p99 | CPU µs/req (tunnel: s/GiB) | \
         peak RSS MiB | errors | spread | router/haproxy | router/nginx | router/direct |\n\
         |---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n",
    );
    for row in rows {
        let _ = writeln!(out, "{}", table_line(rows, row));
    }
    out.push_str(
        "\nRatios compare requests/s (MiB/s for `1m` and `tunnel`) of a router row with the \
         same scenario's haproxy, nginx and direct rows. \"spread\" is (max - min) / median of \
         that number over the rounds: differences smaller than it are noise. \"errors\" sums \
         non-2xx/3xx responses and socket errors (tunnel: connections that failed or came back \
         short) over the measured runs. `ws-small` and `tcp-small`: 8 connections each echo \
         one 64-byte message at a time (a WebSocket binary frame through a `ws://` route, raw \
         bytes through a `tcp://` route); p50/p99 are per round trip, CPU is per message.\n",
    );
    let routers: Vec<&Row> = rows
        .iter()
        .filter(|r| r.is_router && r.counters.is_some())
        .collect();
    if !routers.is_empty() {
        out.push_str(
            "\nRouter data path during the measured run (median MiB per run, from `/api/routes`):\n\n\
             | scenario | contender | copied | spliced | kernel |\n|---|---|--:|--:|--:|\n",
        );
        for row in routers {
            if let Some(c) = row.counters {
                let _ = writeln!(
                    out,
                    "| {} | {} | {:.1} | {:.1} | {:.1} |",
                    row.scenario,
                    row.contender,
                    c.copied / MIB,
                    c.spliced / MIB,
                    c.kernel / MIB
                );
            }
        }
    }
    tcp_route_table(&mut out, rows);
    notes(&mut out, info, rows);
    out
}

/// The `tcp-*` scenarios side by side: each contender against direct, `HAProxy` and the
/// router's userspace tunnel, with the proxy's own CPU.
fn tcp_route_table(out: &mut String, rows: &[Row]) {
    let tcp: Vec<&Row> = rows
        .iter()
        .filter(|r| r.scenario.starts_with("tcp-") && r.unavailable.is_none())
        .collect();
    if tcp.is_empty() {
        return;
    }
    out.push_str(
        "
tcp routes (`tcp-stream`: MiB/s, both directions; `tcp-connect`: connections/s, one \
         short exchange each), the proxy's own CPU in cores over the measured run (the \
         kernel's work on its behalf is in the machine-wide column above), and the connects \
         the kernel balanced:\n\n\
         | scenario | contender | throughput | vs direct | vs haproxy | vs router-splice | \
         proxy CPU (cores) | kernel connects |\n|---|---|--:|--:|--:|--:|--:|--:|\n",
    );
    for row in tcp {
        let versus = |name: &str| {
            if row.contender == name {
                return String::new();
            }
            let other = find(rows, &row.scenario, name).and_then(Row::headline);
            cell(ratio(row.headline(), other), times)
        };
        let throughput = if row.tunnel {
            cell(row.bytes_per_sec, |b| format!("{:.0} MiB/s", b / MIB))
        } else {
            cell(row.requests_per_sec, |r| format!("{r:.0}/s"))
        };
        let _ = writeln!(
            out,
            "| {} | {} | {throughput} | {} | {} | {} | {} | {} |",
            row.scenario,
            row.contender,
            versus("direct"),
            versus("haproxy"),
            versus("router-splice"),
            cell(row.proxy_cpu, |c| format!("{c:.3}")),
            cell(row.kernel_connects, |n| format!("{n:.0}")),
        );
    }
}

fn table_line(rows: &[Row], row: &Row) -> String {
    if row.unavailable.is_some() {
        return format!(
            "| {} | {} | n/a | n/a | | | | | | | | | |",
            row.scenario, row.contender
        );
    }
    if row.runs == 0 {
        return format!(
            "| {} | {} | failed | | | | | | | | | | |",
            row.scenario, row.contender
        );
    }
    let ratio_to = |name: &str| {
        if !row.is_router {
            return String::new();
        }
        let other = find(rows, &row.scenario, name).and_then(Row::headline);
        cell(ratio(row.headline(), other), times)
    };
    let cpu = if row.tunnel {
        cell(row.cpu_per_unit, |s| format!("{s:.2} s/GiB"))
    } else {
        cell(row.cpu_per_unit, |s| format!("{:.1}", s * 1e6))
    };
    format!(
        "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
        row.scenario,
        row.contender,
        cell(row.requests_per_sec, |r| format!("{r:.0}")),
        cell(row.bytes_per_sec, |b| format!("{:.1}", b / MIB)),
        cell(row.p50, latency),
        cell(row.p99, latency),
        cpu,
        cell(row.peak_rss, |b| format!("{:.1}", b / MIB)),
        row.errors,
        cell(row.spread, percent),
        ratio_to("haproxy"),
        ratio_to("nginx"),
        ratio_to("direct"),
    )
}

fn notes(out: &mut String, info: &RunInfo, rows: &[Row]) {
    out.push_str("\nNotes and caveats:\n\n");
    for note in &info.notes {
        let _ = writeln!(out, "- {note}");
    }
    let _ = writeln!(
        out,
        "- Machine-wide CPU includes steal-free busy time only (user, nice, system, irq, \
         softirq); the hypervisor stole {:.1} s of CPU during the measured runs.",
        info.steal_seconds
    );
    for row in rows {
        if let Some(reason) = &row.unavailable {
            let _ = writeln!(out, "- {} / {}: n/a: {reason}", row.scenario, row.contender);
        }
        for problem in &row.problems {
            // One list item per problem: a quoted log tail becomes one line.
            let problem = problem.split_whitespace().collect::<Vec<_>>().join(" ");
            let _ = writeln!(out, "- {} / {}: {problem}", row.scenario, row.contender);
        }
    }
}

/// The splice sweep: router copy vs splice per body size, with splice/copy ratios.
pub fn sweep_markdown(info: &RunInfo, rows: &[Row]) -> String {
    let mut out = header(info);
    out.push_str(
        "\n| body | copy req/s | splice req/s | splice/copy req/s | copy MiB/s | splice MiB/s | \
         copy CPU µs/req | splice CPU µs/req | splice/copy CPU | copy p99 | splice p99 | \
         errors copy/splice | spread copy/splice | spliced share |\n\
         |---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n",
    );
    let mut scenarios: Vec<&str> = rows.iter().map(|r| r.scenario.as_str()).collect();
    scenarios.dedup();
    for scenario in scenarios {
        let copy = find(rows, scenario, "router-copy");
        let splice = find(rows, scenario, "router-splice");
        let get = |row: Option<&Row>, f: fn(&Row) -> Option<f64>| row.and_then(f);
        let share = splice.and_then(|r| r.counters).and_then(|c| {
            let total = c.copied + c.spliced + c.kernel;
            (total > 0.0).then(|| format!("{:.0} %", 100.0 * c.spliced / total))
        });
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {}/{} | {}/{} | {} |",
            scenario.trim_start_matches("sweep-"),
            cell(get(copy, |r| r.requests_per_sec), |r| format!("{r:.0}")),
            cell(get(splice, |r| r.requests_per_sec), |r| format!("{r:.0}")),
            cell(
                ratio(
                    get(splice, |r| r.requests_per_sec),
                    get(copy, |r| r.requests_per_sec)
                ),
                times
            ),
            cell(get(copy, |r| r.bytes_per_sec), |b| format!(
                "{:.1}",
                b / MIB
            )),
            cell(get(splice, |r| r.bytes_per_sec), |b| format!(
                "{:.1}",
                b / MIB
            )),
            cell(get(copy, |r| r.cpu_per_unit), |s| format!("{:.1}", s * 1e6)),
            cell(get(splice, |r| r.cpu_per_unit), |s| format!(
                "{:.1}",
                s * 1e6
            )),
            cell(
                ratio(
                    get(splice, |r| r.cpu_per_unit),
                    get(copy, |r| r.cpu_per_unit)
                ),
                times
            ),
            cell(get(copy, |r| r.p99), latency),
            cell(get(splice, |r| r.p99), latency),
            copy.map_or(0, |r| r.errors),
            splice.map_or(0, |r| r.errors),
            cell(get(copy, |r| r.spread), percent),
            cell(get(splice, |r| r.spread), percent),
            share.unwrap_or_else(|| "–".into()),
        );
    }
    out.push_str(
        "\nsplice/copy above 1× for req/s (below 1× for CPU) means splice wins at that size. \
         \"spliced share\" is the part of the router's body bytes that `--datapath splice` \
         moved with splice(2) during its measured runs; \"spread\" is (max - min) / median of \
         req/s over the rounds (differences smaller than it are noise).\n",
    );
    notes(&mut out, info, rows);
    out
}

/// The access-log cost: router auto with the access log off and on, per HTTP scenario.
pub fn access_log_markdown(info: &RunInfo, rows: &[Row]) -> String {
    let mut out = header(info);
    out.push_str(
        "\n| scenario | off req/s | on req/s | on/off req/s | off CPU µs/req | on CPU µs/req | \
         off p99 | on p99 | spread off/on |\n|---|--:|--:|--:|--:|--:|--:|--:|--:|\n",
    );
    let mut scenarios: Vec<&str> = rows.iter().map(|r| r.scenario.as_str()).collect();
    scenarios.dedup();
    for scenario in scenarios {
        let off = find(rows, scenario, "router-auto");
        let on = find(rows, scenario, "router-accesslog");
        let get = |row: Option<&Row>, f: fn(&Row) -> Option<f64>| row.and_then(f);
        let _ = writeln!(
            out,
            "| {scenario} | {} | {} | {} | {} | {} | {} | {} | {}/{} |",
            cell(get(off, |r| r.requests_per_sec), |r| format!("{r:.0}")),
            cell(get(on, |r| r.requests_per_sec), |r| format!("{r:.0}")),
            cell(
                ratio(
                    get(on, |r| r.requests_per_sec),
                    get(off, |r| r.requests_per_sec)
                ),
                times
            ),
            cell(get(off, |r| r.cpu_per_unit), |s| format!("{:.1}", s * 1e6)),
            cell(get(on, |r| r.cpu_per_unit), |s| format!("{:.1}", s * 1e6)),
            cell(get(off, |r| r.p99), latency),
            cell(get(on, |r| r.p99), latency),
            cell(get(off, |r| r.spread), percent),
            cell(get(on, |r| r.spread), percent),
        );
    }
    out.push_str(
        "\non/off below 1× for req/s means the access log (written to a file) costs that much \
         throughput; \"spread\" is (max - min) / median of req/s over the rounds (differences \
         smaller than it are noise).\n",
    );
    notes(&mut out, info, rows);
    out
}

/// The pipe sweep: router splice by pipe size, each row against the default 1 MiB pipe.
pub fn pipe_sweep_markdown(info: &RunInfo, rows: &[Row]) -> String {
    const DEFAULT: &str = "router-splice-pipe-1m";
    let mut out = header(info);
    out.push_str(
        "\n| scenario | pipe | req/s | MiB/s | vs 1m pipe | p99 | CPU µs/req (tunnel: s/GiB) | \
         CPU vs 1m pipe | peak RSS MiB | errors | spread | spliced share |\n\
         |---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n",
    );
    for row in rows {
        let default = find(rows, &row.scenario, DEFAULT);
        let cpu = |r: &Row| {
            r.cpu_per_unit.map(|c| {
                if r.tunnel {
                    format!("{c:.2} s/GiB")
                } else {
                    format!("{:.1}", c * 1e6)
                }
            })
        };
        let share = row.counters.and_then(|c| {
            let total = c.copied + c.spliced + c.kernel;
            (total > 0.0).then(|| format!("{:.0} %", 100.0 * c.spliced / total))
        });
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            row.scenario.trim_start_matches("sweep-"),
            row.contender.trim_start_matches("router-splice-pipe-"),
            cell(row.requests_per_sec, |r| format!("{r:.0}")),
            cell(row.bytes_per_sec, |b| format!("{:.1}", b / MIB)),
            cell(
                ratio(row.headline(), default.and_then(Row::headline)),
                times
            ),
            cell(row.p99, latency),
            cpu(row).unwrap_or_else(|| "–".into()),
            cell(
                ratio(row.cpu_per_unit, default.and_then(|d| d.cpu_per_unit)),
                times
            ),
            cell(row.peak_rss, |b| format!("{:.1}", b / MIB)),
            row.errors,
            cell(row.spread, percent),
            share.unwrap_or_else(|| "–".into()),
        );
    }
    out.push_str(
        "\n\"vs 1m pipe\" compares requests/s (MiB/s for 1 MiB bodies and the tunnel) with the \
         agent's default pipe of 1 MiB; above 1× is faster. CPU below 1× is cheaper. Pipes over \
         /proc/sys/fs/pipe-max-size are granted because the bench runs the agent as root.\n",
    );
    notes(&mut out, info, rows);
    out
}

const COLORS: &[(&str, &str)] = &[
    ("direct", "#9e9e9e"),
    ("haproxy", "#1f77b4"),
    ("nginx", "#2ca02c"),
    ("router-copy", "#ff7f0e"),
    ("router-splice", "#d62728"),
    ("router-auto", "#9467bd"),
    ("router-sockmap", "#8c564b"),
    ("router-socket-lb", "#e377c2"),
];

fn color(name: &str) -> &'static str {
    COLORS
        .iter()
        .find(|(n, _)| *n == name)
        .map_or("#17becf", |(_, c)| c)
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A scenario and its bars: (contender, throughput relative to `HAProxy`).
type Group<'a> = (&'a str, Vec<(&'a str, Option<f64>)>);

/// A grouped bar chart of each scenario's throughput relative to `HAProxy` (= 1.0).
pub fn svg(title: &str, rows: &[Row]) -> String {
    let mut scenarios: Vec<&str> = rows.iter().map(|r| r.scenario.as_str()).collect();
    scenarios.dedup();
    let mut contenders: Vec<&str> = Vec::new();
    for row in rows {
        if !contenders.contains(&row.contender.as_str()) {
            contenders.push(&row.contender);
        }
    }
    let groups: Vec<Group<'_>> = scenarios
        .iter()
        .map(|&s| {
            let base = find(rows, s, "haproxy").and_then(Row::headline);
            let bars = rows
                .iter()
                .filter(|r| r.scenario == s)
                .map(|r| (r.contender.as_str(), ratio(r.headline(), base)))
                .collect();
            (s, bars)
        })
        .collect();
    let top = groups
        .iter()
        .flat_map(|(_, bars)| bars.iter().filter_map(|(_, r)| *r))
        .fold(1.0_f64, f64::max);
    let top = (top * 1.15 * 2.0).ceil() / 2.0;
    let step = if top <= 2.0 {
        0.25
    } else if top <= 5.0 {
        0.5
    } else {
        (top / 8.0).ceil()
    };

    let bar_w = 22.0;
    let group_gap = 36.0;
    let group_w = |bars: usize| bar_w * bars as f64 + group_gap;
    let (left, right, plot_h) = (70.0, 20.0, 300.0);
    let plot_w = groups.iter().map(|(_, b)| group_w(b.len())).sum::<f64>();
    let width = (left + plot_w + right).max(640.0);
    // Legend entries, wrapped to the chart's width: (x, y, name).
    let mut legend = Vec::new();
    let (mut x, mut line_y) = (left, 40.0);
    for name in &contenders {
        let entry_w = 16.0 + 7.5 * name.len() as f64 + 18.0;
        if x + entry_w > width - right && x > left {
            x = left;
            line_y += 20.0;
        }
        legend.push((x, line_y, *name));
        x += entry_w;
    }
    let plot_top = line_y + 40.0;
    let height = plot_top + plot_h + 60.0;
    let y = |v: f64| plot_top + plot_h * (1.0 - v / top);

    let mut out = String::new();
    let _ = writeln!(
        out,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width:.0}\" height=\"{height:.0}\" \
         viewBox=\"0 0 {width:.0} {height:.0}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{:.0}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\" font-weight=\"bold\">{}</text>",
        width / 2.0,
        escape(title)
    );
    for (x, line_y, name) in legend {
        let _ = writeln!(
            out,
            "<rect x=\"{x:.0}\" y=\"{line_y:.0}\" width=\"12\" height=\"12\" fill=\"{}\"/>\
             <text x=\"{:.0}\" y=\"{:.0}\">{}</text>",
            color(name),
            x + 16.0,
            line_y + 11.0,
            escape(name)
        );
    }
    // Grid and axis.
    let mut v = 0.0;
    while v <= top + 1e-9 {
        let _ = writeln!(
            out,
            "<line x1=\"{left}\" x2=\"{:.0}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#e0e0e0\"/>\
             <text x=\"{:.0}\" y=\"{:.1}\" text-anchor=\"end\">{v:.2}</text>",
            width - right,
            y(v),
            y(v),
            left - 6.0,
            y(v) + 4.0
        );
        v += step;
    }
    let _ = writeln!(
        out,
        "<line x1=\"{left}\" x2=\"{:.0}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#1f77b4\" \
         stroke-dasharray=\"6 4\"/>\n\
         <text transform=\"translate(18 {:.0}) rotate(-90)\" text-anchor=\"middle\">relative to HAProxy = 1.0</text>",
        width - right,
        y(1.0),
        y(1.0),
        plot_top + plot_h / 2.0
    );
    let mut gx = left + group_gap / 2.0;
    for (scenario, bars) in &groups {
        for (i, (name, value)) in bars.iter().enumerate() {
            let bx = gx + bar_w * i as f64;
            match value {
                Some(r) => {
                    let _ = writeln!(
                        out,
                        "<rect x=\"{bx:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\">\
                         <title>{} {}: {r:.2}</title></rect>\
                         <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"9\">{r:.2}</text>",
                        y(*r),
                        bar_w - 3.0,
                        plot_h + plot_top - y(*r),
                        color(name),
                        escape(scenario),
                        escape(name),
                        bx + (bar_w - 3.0) / 2.0,
                        y(*r) - 3.0
                    );
                }
                None => {
                    let _ = writeln!(
                        out,
                        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"9\">n/a</text>",
                        bx + (bar_w - 3.0) / 2.0,
                        plot_top + plot_h - 3.0
                    );
                }
            }
        }
        let unit = if rows
            .iter()
            .any(|r| r.scenario == *scenario && (r.by_bytes || r.tunnel))
        {
            "MiB/s"
        } else {
            "req/s"
        };
        let cx = gx + bar_w * bars.len() as f64 / 2.0;
        let _ = writeln!(
            out,
            "<text x=\"{cx:.1}\" y=\"{:.0}\" text-anchor=\"middle\" font-weight=\"bold\">{}</text>\
             <text x=\"{cx:.1}\" y=\"{:.0}\" text-anchor=\"middle\" font-size=\"10\" fill=\"#555\">({unit})</text>",
            plot_top + plot_h + 20.0,
            escape(scenario),
            plot_top + plot_h + 34.0
        );
        gx += group_w(bars.len());
    }
    let _ = writeln!(
        out,
        "<line x1=\"{left}\" x2=\"{:.0}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"black\"/>\n</svg>",
        width - right,
        plot_top + plot_h,
        plot_top + plot_h
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(scenario: &str, contender: &str, rps: Option<f64>) -> Sample {
        Sample {
            scenario: scenario.into(),
            contender: contender.into(),
            is_router: contender.starts_with("router"),
            by_bytes: false,
            outcome: rps.map_or_else(
                || Err("boom".into()),
                |r| {
                    Ok(Measure {
                        requests_per_sec: Some(r),
                        bytes_per_sec: r * 100.0,
                        p50: Some(0.001),
                        p99: Some(0.002),
                        cpu_per_unit: 10.0 / r,
                        errors: 1,
                        ..Measure::default()
                    })
                },
            ),
            disturbed: None,
        }
    }

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&mut []), None);
        assert_eq!(ratio(Some(3.0), Some(2.0)), Some(1.5));
        assert_eq!(ratio(Some(3.0), Some(0.0)), None);
        assert_eq!(ratio(None, Some(2.0)), None);
        assert_eq!(spread(&[90.0, 100.0, 110.0]), Some(0.2));
        assert_eq!(spread(&[100.0]), None);
    }

    #[test]
    fn rows_take_medians_of_interleaved_rounds_and_ratios_compare_routers() {
        // Interleaved: A B A B A B, one router run failed.
        let samples = vec![
            sample("s", "haproxy", Some(100.0)),
            sample("s", "router-copy", Some(150.0)),
            sample("s", "haproxy", Some(300.0)),
            sample("s", "router-copy", None),
            sample("s", "haproxy", Some(200.0)),
            sample("s", "router-copy", Some(250.0)),
        ];
        let rows = aggregate(&samples);
        assert_eq!(rows.len(), 2);
        let (haproxy, router) = (&rows[0], &rows[1]);
        assert_eq!(haproxy.requests_per_sec, Some(200.0));
        assert_eq!(haproxy.runs, 3);
        assert_eq!(haproxy.errors, 3);
        assert_eq!(router.requests_per_sec, Some(200.0));
        assert_eq!(router.runs, 2);
        assert!(router.problems[0].starts_with("1 of 3 runs failed"));
        let line = table_line(&rows, router);
        assert!(line.contains("| 2 | 50 % | 1.00× | – | – |"), "{line}");
        assert!(table_line(&rows, haproxy).ends_with("| 3 | 100 % |  |  |  |"));
        let chart = svg("t", &rows);
        assert!(chart.starts_with("<svg") && chart.trim_end().ends_with("</svg>"));
        assert!(chart.contains(">1.00</text>"));
    }

    #[test]
    fn tcp_routes_get_their_own_table() {
        let mut samples = vec![
            sample("tcp-connect", "direct", Some(1000.0)),
            sample("tcp-connect", "haproxy", Some(400.0)),
            sample("tcp-connect", "router-splice", Some(500.0)),
            sample("tcp-connect", "router-socket-lb", Some(980.0)),
        ];
        if let Ok(m) = &mut samples[3].outcome {
            m.proxy_cpu = Some(0.001);
            m.kernel_connects = Some(4900);
        }
        let rows = aggregate(&samples);
        let mut out = String::new();
        tcp_route_table(&mut out, &rows);
        assert!(
            out.contains(
                "| tcp-connect | router-socket-lb | 980/s | 0.98× | 2.45× | 1.96× | 0.001 | 4900 |"
            ),
            "{out}"
        );
        assert!(
            out.contains("| tcp-connect | direct | 1000/s |  | 2.50× | 2.00× | – | – |"),
            "{out}"
        );
    }
}
