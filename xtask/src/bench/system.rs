//! What the benchmark reads from the machine: busy CPU time (/proc/stat), a process tree's peak
//! memory (/proc/<pid>/status), free loopback ports, and the facts printed with the results.
use std::{
    fs,
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// `getconf CLK_TCK` on Linux: /proc/stat counts in these units.
const TICKS_PER_SEC: f64 = 100.0;

/// Machine-wide CPU time so far, in seconds, from the aggregate `cpu` line of /proc/stat.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuTimes {
    /// user + nice + system + irq + softirq: work done by this machine for anyone, including
    /// softirq and kernel workers (where splice and sockmap forwarding run).
    pub busy: f64,
    /// Time the hypervisor gave to other guests while this one wanted to run.
    pub steal: f64,
}

impl CpuTimes {
    pub fn now() -> anyhow::Result<Self> {
        let stat = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        parse_cpu_line(&stat)
    }

    pub fn since(self, earlier: Self) -> Self {
        Self {
            busy: self.busy - earlier.busy,
            steal: self.steal - earlier.steal,
        }
    }
}

fn parse_cpu_line(stat: &str) -> anyhow::Result<CpuTimes> {
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("/proc/stat has no aggregate `cpu` line")?;
    let fields: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .context("unreadable /proc/stat cpu line")?;
    // user nice system idle iowait irq softirq steal guest guest_nice; guest time is already
    // part of user and nice.
    let field = |i: usize| fields.get(i).copied().unwrap_or(0.0);
    Ok(CpuTimes {
        busy: (field(0) + field(1) + field(2) + field(5) + field(6)) / TICKS_PER_SEC,
        steal: field(7) / TICKS_PER_SEC,
    })
}

/// CPU seconds (user + system) that `pid` and its child processes have used so far; `None`
/// when the process is gone.
pub fn cpu_seconds_tree(pid: u32) -> Option<f64> {
    let own = cpu_seconds(pid)?;
    Some(
        own + children(pid)
            .into_iter()
            .filter_map(cpu_seconds)
            .sum::<f64>(),
    )
}

fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After `(comm)`: state is field 3 of the line, utime 14 and stime 15.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i)?.parse::<f64>().ok();
    Some((ticks(11)? + ticks(12)?) / TICKS_PER_SEC)
}

/// Peak resident memory (`VmHWM`) of `pid` plus that of its child processes (nginx workers), in
/// bytes; `None` when the process is gone.
pub fn peak_rss_tree(pid: u32) -> Option<u64> {
    let own = vm_hwm(pid)?;
    Some(own + children(pid).into_iter().filter_map(vm_hwm).sum::<u64>())
}

fn vm_hwm(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// The pids whose parent is `pid`.
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&child| {
            fs::read_to_string(format!("/proc/{child}/stat")).is_ok_and(|stat| {
                // pid (comm) state ppid ...; comm may hold spaces, so read after the last `)`.
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                    .and_then(|ppid| ppid.parse::<u32>().ok())
                    == Some(pid)
            })
        })
        .collect()
}

/// A port on 127.0.0.1 that nothing listens on right now.
pub fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// True when nothing listens on 127.0.0.1:`port` (we can bind it).
/// Whether no socket listens on 127.0.0.1:`port` itself. Listeners on 0.0.0.0 do not count:
/// other agents on this machine (tests, a cluster) discover the bench's containers too and open
/// their route ports on the wildcard address, but a listener bound to 127.0.0.1 wins the
/// kernel's lookup for connections to 127.0.0.1 over wildcard ones.
pub fn port_is_free(port: u16) -> bool {
    let wanted = format!("0100007F:{port:04X}");
    let listening = std::fs::read_to_string("/proc/net/tcp")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .any(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // sl, local_address, rem_address, st (0A: LISTEN)
            fields.get(1) == Some(&wanted.as_str()) && fields.get(3) == Some(&"0A")
        });
    !listening
}

/// Waits until `addr` accepts connections.
pub fn wait_listening(addr: SocketAddr, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// This process's hard limit on open files (children cannot go above it without
/// `CAP_SYS_RESOURCE`).
pub fn open_files_hard_limit() -> Option<u64> {
    fs::read_to_string("/proc/self/limits")
        .ok()?
        .lines()
        .find(|l| l.starts_with("Max open files"))?
        .split_whitespace()
        .nth(4)?
        .parse()
        .ok()
}

/// Sends `signal` to one process by its id.
pub fn signal(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Stops a child we started: `signal`, up to `grace` to exit, then SIGKILL for it and for the
/// children it had (so no nginx worker outlives its master).
pub fn stop(child: &mut Child, stop_signal: &str, grace: Duration) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    let pid = child.id();
    let kids = children(pid);
    signal(pid, stop_signal);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if !matches!(child.try_wait(), Ok(Some(_))) {
        let _ = child.kill();
        let _ = child.wait();
    }
    for kid in kids {
        if fs::metadata(format!("/proc/{kid}")).is_ok() {
            signal(kid, "KILL");
        }
    }
}

/// The pids of router-agent processes this benchmark did not start (they discover the bench's
/// containers too, and take CPU).
pub fn other_agents(own_agent: &Path) -> Vec<u32> {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "router-agent")
                && fs::read_link(format!("/proc/{pid}/exe")).map_or(true, |exe| exe != own_agent)
        })
        .collect()
}

/// How busy the machine is with other work, over one second: the fraction of all CPUs.
pub fn background_busy() -> anyhow::Result<f64> {
    let before = CpuTimes::now()?;
    let wall = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let busy = CpuTimes::now()?.since(before).busy;
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    Ok(busy / (wall.elapsed().as_secs_f64() * cpus as f64))
}

/// Facts about this machine, printed with the results.
pub struct Machine {
    pub cpus: usize,
    pub kernel: String,
    pub cpu_model: String,
    pub date: String,
}

impl Machine {
    pub fn read() -> Self {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        Self {
            cpus: std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
            kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
                .map_or_else(|_| "unknown".into(), |s| s.trim().to_owned()),
            cpu_model: cpuinfo
                .lines()
                .find_map(|l| l.strip_prefix("model name"))
                .and_then(|l| l.split_once(':'))
                .map_or_else(|| "unknown".into(), |(_, m)| m.trim().to_owned()),
            date: crate::cmd::output("date", &["-u", "+%Y-%m-%d %H:%M:%S UTC"])
                .unwrap_or_else(|_| "unknown".into()),
        }
    }
}

/// Checks the benchmark's network rule: containers must sit in 198.18.0.0/15.
pub fn check_container_ip(ip: Ipv4Addr) -> anyhow::Result<()> {
    let [a, b, ..] = ip.octets();
    if a != 198 || !(b == 18 || b == 19) {
        bail!(
            "container address {ip} is outside 198.18.0.0/15; the benchmark only sends traffic \
             there. Let `cargo xtask setup` start dockerd with its benchmarking address pool."
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_busy_time_without_idle_iowait_or_steal() {
        let stat = "cpu  100 10 50 9000 40 5 20 7 3 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n";
        let times = parse_cpu_line(stat).unwrap();
        assert!((times.busy - 1.85).abs() < 1e-9);
        assert!((times.steal - 0.07).abs() < 1e-9);
    }
}
