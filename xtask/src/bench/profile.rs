//! `cargo xtask profile`: instructions per request, counted by valgrind's callgrind, for
//! router-agent and `HAProxy` under the same wrk load. Wall-clock numbers on this shared 2-core
//! VM move by 10 to 40 % between runs; instruction counts do not, so they show what a change to
//! the agent's own code costs or saves. Only userspace is counted: the kernel's share (syscalls,
//! TCP, splice) is invisible to valgrind and is what `cargo xtask bench` measures as CPU.
//!
//! Each proxy starts under `valgrind --tool=callgrind --instr-atstart=no`; instrumentation is
//! switched on (`callgrind_control -i on`) only once it routes, wrk runs, then the counts are
//! dumped (`callgrind_control -d`) and read with `callgrind_annotate`. The report goes to
//! `results/callgrind-<UTC time>.md`; the raw callgrind files stay in `results/tmp/` for
//! `callgrind_annotate` or `KCachegrind`.
use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::{
    backends::Backends,
    contenders::{self, Contender, Datapath, Protocol, Setup},
    wrk,
};
use crate::cmd;

/// Functions listed per profiled run, by self cost.
const TOP_FUNCTIONS: usize = 15;

/// The loads profiled: (scenario, file nginx serves).
const SCENARIOS: [(&str, &str); 2] = [("small-keepalive", "100b"), ("16k", "16k")];
const CONTENDERS: [Contender; 2] = [Contender::Router(Datapath::Auto), Contender::Haproxy];
/// wrk connections: enough to keep a proxy slowed ~50x by valgrind busy.
const CONNECTIONS: u32 = 8;

/// What one profiled run counted.
struct Profile {
    scenario: &'static str,
    contender: String,
    requests: u64,
    errors: u64,
    instructions: u64,
    /// (self instructions, function), most expensive first.
    functions: Vec<(u64, String)>,
    dump: PathBuf,
}

pub fn run(seconds: u64) -> anyhow::Result<()> {
    for tool in ["valgrind", "callgrind_control", "callgrind_annotate"] {
        // `callgrind_annotate --version` exits with 255: ask the shell whether it is there.
        if !cmd::succeeds("sh", &["-c", &format!("command -v {tool}")]) {
            bail!("`{tool}` is missing; `cargo xtask setup` installs valgrind");
        }
    }
    let started = Instant::now();
    let root = cmd::workspace_root();
    let results = root.join("results");
    let tmp = results.join("tmp");
    fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let agent = super::prepare_agent(&tmp)?;
    let nginx_stream = Err("not used".to_owned());
    let mut backends = Backends::new(&contenders::pid_file(&tmp))?;
    println!("profile: starting 2 nginx replicas for {}", backends.domain);
    backends.start_replicas()?;

    let mut profiles = Vec::new();
    for (scenario, file) in SCENARIOS {
        for contender in CONTENDERS {
            let name = contender.name();
            println!("profile: {scenario} {name} under callgrind for {seconds} s");
            let dump_prefix = tmp.join(format!("callgrind.{name}.{scenario}"));
            remove_dumps(&dump_prefix);
            let wrapper = [
                "valgrind".to_owned(),
                "--tool=callgrind".to_owned(),
                "--instr-atstart=no".to_owned(),
                format!("--callgrind-out-file={}.%p", dump_prefix.display()),
            ];
            let setup = Setup {
                backends: &backends,
                tmp: &tmp,
                agent: &agent,
                nginx_stream: &nginx_stream,
                wrapper: &wrapper,
                startup_timeout: Duration::from_mins(1),
                socket_lb_cgroup: None,
            };
            let profile = profile_one(contender, scenario, file, &setup, seconds, &dump_prefix)
                .with_context(|| format!("profiling {name} in {scenario}"))?;
            println!(
                "profile: {scenario} {name}: {} requests, {} instructions per request",
                profile.requests,
                per_request(profile.instructions, profile.requests)
            );
            profiles.push(profile);
        }
    }
    drop(backends);

    let stamp = cmd::output("date", &["-u", "+%Y%m%dT%H%M%SZ"])?;
    let markdown = report(&profiles, seconds, &super::revision(&root));
    let path = results.join(format!("callgrind-{stamp}.md"));
    fs::write(&path, &markdown).with_context(|| format!("writing {}", path.display()))?;
    println!("\n{markdown}\nprofile: wrote {}", path.display());
    let elapsed = started.elapsed().as_secs();
    println!("profile: took {}m{:02}s", elapsed / 60, elapsed % 60);
    Ok(())
}

fn profile_one(
    contender: Contender,
    scenario: &'static str,
    file: &str,
    setup: &Setup<'_>,
    seconds: u64,
    dump_prefix: &Path,
) -> anyhow::Result<Profile> {
    let mut running = contenders::start(contender, Protocol::Http, setup)?;
    let pid = running.pid().context("a proxy runs")?.to_string();
    let url = format!("http://{}/{file}", running.target);
    let mut load = wrk::Load {
        url: &url,
        host: &setup.backends.domain,
        connections: CONNECTIONS,
        duration: Duration::from_secs(2),
        close_each: false,
    };
    // Uninstrumented warm-up: pools, buffers and lazy initialisation are not per-request costs.
    wrk::run(&load).context("warm-up")?;
    callgrind_control(&["-i", "on", &pid])?;
    load.duration = Duration::from_secs(seconds);
    let result = wrk::run(&load)?;
    callgrind_control(&["-i", "off", &pid])?;
    callgrind_control(&["-d", &pid])?;
    running.check_alive()?;
    drop(running);
    if result.requests == 0 {
        bail!("wrk completed no request");
    }
    let dump = largest_dump(dump_prefix)?;
    let annotated = cmd::output(
        "callgrind_annotate",
        &[
            "--inclusive=no",
            "--auto=no",
            "--threshold=99",
            dump.to_str().context("dump path")?,
        ],
    )?;
    let (instructions, functions) = parse_annotate(&annotated)?;
    Ok(Profile {
        scenario,
        contender: contender.name(),
        requests: result.requests,
        errors: result.non_2xx + result.socket_errors,
        instructions,
        functions,
        dump,
    })
}

fn callgrind_control(args: &[&str]) -> anyhow::Result<()> {
    cmd::output("callgrind_control", args)
        .map(drop)
        .with_context(|| format!("callgrind_control {}", args.join(" ")))
}

/// Dump files of earlier runs with this prefix would be mistaken for this run's.
fn remove_dumps(prefix: &Path) {
    for path in dumps(prefix) {
        let _ = fs::remove_file(path);
    }
}

fn dumps(prefix: &Path) -> Vec<PathBuf> {
    let (Some(dir), Some(stem)) = (prefix.parent(), prefix.file_name()) else {
        return Vec::new();
    };
    let stem = stem.to_string_lossy().into_owned();
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with(&stem))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// The explicit dump holds the instrumented part; the dump callgrind writes at exit holds
/// nothing more (instrumentation was off). Pick the largest, the one with the counts.
fn largest_dump(prefix: &Path) -> anyhow::Result<PathBuf> {
    dumps(prefix)
        .into_iter()
        .max_by_key(|p| fs::metadata(p).map_or(0, |m| m.len()))
        .with_context(|| format!("callgrind wrote no {}.* file", prefix.display()))
}

/// Reads `callgrind_annotate` output: the program total and each function's self cost, most
/// expensive first. callgrind splits a function by the source file each instruction came from
/// (inlined code keeps its own file); the parts are summed under the function's name.
fn parse_annotate(text: &str) -> anyhow::Result<(u64, Vec<(u64, String)>)> {
    let mut total = None;
    let mut functions: Vec<(u64, String)> = Vec::new();
    for line in text.lines() {
        let Some((count, rest)) = counted_line(line) else {
            continue;
        };
        if rest == "PROGRAM TOTALS" {
            total = Some(count);
        } else if total.is_some() {
            let name = function_name(rest);
            match functions.iter_mut().find(|(_, f)| *f == name) {
                Some((sum, _)) => *sum += count,
                None => functions.push((count, name.to_owned())),
            }
        }
    }
    let total = total.context("no PROGRAM TOTALS line in callgrind_annotate's output")?;
    functions.sort_by_key(|(count, _)| std::cmp::Reverse(*count));
    Ok((total, functions))
}

/// `file:function [object]` → `function`. Paths have no colon; Rust names do (`::`), so the
/// first colon ends the file. callgrind names the object only on a function's first line.
fn function_name(entry: &str) -> &str {
    let function = entry
        .split_once(':')
        .map_or(entry, |(_, function)| function);
    match function.rsplit_once(" [") {
        Some((name, object)) if object.ends_with(']') => name,
        _ => function,
    }
}

/// `1,234,567 (12.34%)  file:function [object]` → (1234567, `file:function [object]`).
fn counted_line(line: &str) -> Option<(u64, &str)> {
    let line = line.trim_start();
    let (number, rest) = line.split_once(' ')?;
    let count: u64 = number.replace(',', "").parse().ok()?;
    let rest = rest.trim_start();
    let rest = match rest.strip_prefix('(') {
        Some(after) => after.split_once(')')?.1.trim_start(),
        None => rest,
    };
    Some((count, rest))
}

fn per_request(instructions: u64, requests: u64) -> String {
    if requests == 0 {
        return "–".into();
    }
    #[allow(clippy::cast_precision_loss)]
    let value = instructions as f64 / requests as f64;
    format!("{value:.0}")
}

fn report(profiles: &[Profile], seconds: u64, revision: &str) -> String {
    let mut out = format!(
        "# Userspace instructions per request (callgrind)\n\n\
         `cargo xtask profile --seconds {seconds}` at router-agent {revision}: each proxy runs \
         under `valgrind --tool=callgrind`, instrumented only while wrk ({CONNECTIONS} \
         keep-alive connections, `Host: <bench domain>`) runs for {seconds} s after an \
         uninstrumented warm-up. Counts are the proxy's userspace instructions (all threads); \
         kernel work is not counted.\n\n\
         | scenario | proxy | requests | errors | instructions | per request | router/haproxy |\n\
         |---|---|--:|--:|--:|--:|--:|\n"
    );
    for profile in profiles {
        let haproxy = profiles
            .iter()
            .find(|p| p.scenario == profile.scenario && p.contender == "haproxy");
        let ratio = match haproxy {
            Some(h) if profile.contender != "haproxy" && h.requests > 0 && profile.requests > 0 => {
                #[allow(clippy::cast_precision_loss)]
                let r = (profile.instructions as f64 / profile.requests as f64)
                    / (h.instructions as f64 / h.requests as f64);
                format!("{r:.2}×")
            }
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {ratio} |",
            profile.scenario,
            profile.contender,
            profile.requests,
            profile.errors,
            profile.instructions,
            per_request(profile.instructions, profile.requests),
        );
    }
    for profile in profiles {
        let _ = write!(
            out,
            "\n## {} / {}: top functions by self cost\n\n\
             Raw data: `{}`.\n\n\
             | instructions per request | share | function |\n|--:|--:|---|\n",
            profile.scenario,
            profile.contender,
            profile.dump.display()
        );
        for (count, function) in profile.functions.iter().take(TOP_FUNCTIONS) {
            #[allow(clippy::cast_precision_loss)]
            let share = 100.0 * *count as f64 / profile.instructions.max(1) as f64;
            let _ = writeln!(
                out,
                "| {} | {share:.1} % | `{}` |",
                per_request(*count, profile.requests),
                shorten(function)
            );
        }
    }
    out
}

/// Function names of Rust generics run to hundreds of characters; the head says enough.
fn shorten(function: &str) -> String {
    const MAX: usize = 120;
    let function = function.replace('|', "\\|").replace('`', "'");
    if function.chars().count() <= MAX {
        function
    } else {
        let head: String = function.chars().take(MAX).collect();
        format!("{head}…")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_totals_and_functions_of_callgrind_annotate() {
        let text = "\
--------------------------------------------------------------------------------
Ir
--------------------------------------------------------------------------------
8,421,237 (100.0%)  PROGRAM TOTALS

--------------------------------------------------------------------------------
Ir                 file:function
--------------------------------------------------------------------------------
1,234,567 (14.66%)  ./string/../sysdeps/x86_64/multiarch/memmove-vec-unaligned-erms.S:memcpy [/usr/lib/x86_64-linux-gnu/libc.so.6]
  987,654 (11.73%)  router-agent/src/http/request.rs:router_agent::http::request::parse [/tmp/router-agent]
  400,000  (4.75%)  /rustc/abc/library/core/src/slice/iter/macros.rs:router_agent::http::request::parse [/tmp/router-agent]
";
        let (total, functions) = parse_annotate(text).unwrap();
        assert_eq!(total, 8_421_237);
        assert_eq!(functions.len(), 2);
        assert_eq!(
            functions[0],
            (1_387_654, "router_agent::http::request::parse".to_owned()),
            "the inlined part is added to its function"
        );
        assert!(functions[1].1.starts_with("memcpy"));
        assert!(parse_annotate("no totals here").is_err());
    }

    #[test]
    fn per_request_divides_and_survives_zero() {
        assert_eq!(per_request(10_000, 4), "2500");
        assert_eq!(per_request(10_000, 0), "–");
    }
}
