//! Active health checks: HTTP, TCP and exec probes on their period, and the recovery check that
//! brings back a backend without a probe after a passive failure.
//!
//! Every check opens a fresh connection: a reused one would hide a backend that stopped
//! accepting. Results go to the registry tagged with the generation of the task, so results of a
//! task that was replaced (container restarted, new address) are ignored.
use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use bollard::exec::{CreateExecOptions, StartExecResults};
use futures_util::StreamExt as _;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    sync::mpsc,
    task::JoinHandle,
};

use crate::{
    discovery::DockerHandle,
    labels::{ProbeKind, ProbeSpec},
    registry::Message,
};

/// How often a backend without a probe is re-checked after a passive failure.
const RECOVERY_PERIOD: Duration =
    Duration::from_secs(crate::labels::probe_defaults::PERIOD_SECONDS);

/// A background task that ends when its owner drops it.
#[derive(Debug)]
pub struct TaskGuard(JoinHandle<()>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One check's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeOutcome {
    Passed(String),
    Failed(String),
    /// The agent could not run the check (out of file descriptors, Docker unreachable for an
    /// exec probe): it says nothing about the backend and is not counted.
    NotRun(String),
}

/// What a probe task checks, and the tag its results carry.
#[derive(Debug)]
pub struct ProbeTarget {
    pub container_id: String,
    /// Results of a replaced task (container restarted, new address) are ignored by this tag.
    pub generation: u64,
    pub ip: IpAddr,
}

/// Runs `spec` against the container until dropped; the first check runs after `first_delay`
/// (the initial delay left, counted from the container's start).
pub fn spawn_probe(
    target: ProbeTarget,
    spec: ProbeSpec,
    first_delay: Duration,
    docker: DockerHandle,
    registry: mpsc::UnboundedSender<Message>,
) -> TaskGuard {
    TaskGuard(tokio::spawn(async move {
        tokio::time::sleep(first_delay).await;
        loop {
            let outcome = check(&spec, &target, &docker).await;
            let message = Message::ProbeResult {
                id: target.container_id.clone(),
                generation: target.generation,
                outcome,
            };
            if registry.send(message).is_err() {
                return;
            }
            tokio::time::sleep(spec.period).await;
        }
    }))
}

/// After a passive failure on a backend without a probe: waits `hold`, then TCP-checks the
/// port every recovery period and reports once it accepts again.
pub fn spawn_recovery(
    container_id: String,
    generation: u64,
    addr: SocketAddr,
    hold: Duration,
    registry: mpsc::UnboundedSender<Message>,
) -> TaskGuard {
    let period = RECOVERY_PERIOD;
    TaskGuard(tokio::spawn(async move {
        tokio::time::sleep(hold).await;
        loop {
            tokio::time::sleep(period).await;
            if let Ok(Ok(_)) = tokio::time::timeout(period, TcpStream::connect(addr)).await {
                let _ = registry.send(Message::Recovered {
                    id: container_id,
                    generation,
                });
                return;
            }
        }
    }))
}

/// One check within the probe's timeout.
async fn check(spec: &ProbeSpec, target: &ProbeTarget, docker: &DockerHandle) -> ProbeOutcome {
    let ip = target.ip;
    let result = match &spec.kind {
        ProbeKind::Exec { command } => {
            return exec_check(&target.container_id, command, spec.timeout, docker).await;
        }
        ProbeKind::Http { port, path } => {
            tokio::time::timeout(spec.timeout, http_check(SocketAddr::new(ip, *port), path)).await
        }
        ProbeKind::Tcp { port } => {
            tokio::time::timeout(spec.timeout, tcp_check(SocketAddr::new(ip, *port))).await
        }
    };
    match result {
        Ok(Ok(success)) => ProbeOutcome::Passed(success),
        Ok(Err(CheckError::Backend(why))) => ProbeOutcome::Failed(why),
        Ok(Err(CheckError::Agent(why))) => ProbeOutcome::NotRun(why),
        Err(_) => ProbeOutcome::Failed(format!("no answer within {:?}", spec.timeout)),
    }
}

/// Healthy when a connection is accepted.
async fn tcp_check(addr: SocketAddr) -> Result<String, CheckError> {
    TcpStream::connect(addr)
        .await
        .map(|_| "connected".to_owned())
        .map_err(|e| CheckError::io(&format!("connect to {addr}"), &e))
}

/// Why a network check failed: the backend's fault, or the agent's own (no descriptor left).
enum CheckError {
    Backend(String),
    Agent(String),
}

impl CheckError {
    fn io(what: &str, e: &std::io::Error) -> Self {
        if crate::proxy::is_fd_exhaustion(e) {
            Self::Agent(format!("{what}: {e} (the agent is out of descriptors)"))
        } else {
            Self::Backend(format!("{what}: {e}"))
        }
    }
}

/// GET `path`; healthy on 2xx and 3xx.
async fn http_check(addr: SocketAddr, path: &str) -> Result<String, CheckError> {
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|e| CheckError::io(&format!("connect to {addr}"), &e))?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: router-agent-probe\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| CheckError::Backend(format!("send to {addr}: {e}")))?;
    let mut buf = [0u8; 1024];
    let mut len = 0;
    loop {
        if let Some(line_end) = buf[..len].iter().position(|&b| b == b'\n') {
            return match status_code(&buf[..line_end]) {
                Some(code) if (200..400).contains(&code) => Ok(format!("HTTP {code}")),
                Some(code) => Err(CheckError::Backend(format!(
                    "HTTP {code} from {addr}{path}"
                ))),
                None => Err(CheckError::Backend(format!(
                    "invalid HTTP status line from {addr}"
                ))),
            };
        }
        let n = stream
            .read(&mut buf[len..])
            .await
            .map_err(|e| CheckError::Backend(format!("read from {addr}: {e}")))?;
        // A full buffer reads 0 too: a status line longer than 1 KiB is not HTTP.
        if n == 0 {
            return Err(CheckError::Backend(format!(
                "no HTTP status line from {addr}"
            )));
        }
        len += n;
    }
}

/// The code of an `HTTP/1.x NNN reason` status line.
fn status_code(line: &[u8]) -> Option<u16> {
    let rest = line.strip_prefix(b"HTTP/1.")?;
    let code = rest.get(2..5)?;
    if rest.get(1) != Some(&b' ') || !code.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(code).ok()?.parse().ok()
}

/// `sh -c <command>` in the container; healthy on exit code 0. A command still running at the
/// timeout is killed (Docker has no call to stop an exec, so the agent kills its process tree,
/// which it sees through the host's PID namespace).
async fn exec_check(
    container_id: &str,
    command: &str,
    timeout: Duration,
    docker: &DockerHandle,
) -> ProbeOutcome {
    let Some(docker) = docker.load_full() else {
        return ProbeOutcome::NotRun("the Docker engine is not connected".into());
    };
    let exec = match docker
        .create_exec(
            container_id,
            CreateExecOptions {
                cmd: Some(vec!["sh", "-c", command]),
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                ..Default::default()
            },
        )
        .await
    {
        Ok(exec) => exec,
        Err(e) => return ProbeOutcome::NotRun(format!("exec create: {e}")),
    };
    let run = async {
        if let StartExecResults::Attached { mut output, .. } = docker
            .start_exec(&exec.id, None)
            .await
            .map_err(|e| format!("exec start: {e}"))?
        {
            // Drain the output so the command runs to completion.
            while output.next().await.is_some() {}
        }
        Ok::<_, String>(())
    };
    if tokio::time::timeout(timeout, run).await.is_err() {
        let killed = match docker.inspect_exec(&exec.id).await.ok().and_then(|i| i.pid) {
            Some(pid) if pid > 0 => kill_process_tree(pid as i32),
            _ => 0,
        };
        return ProbeOutcome::Failed(format!(
            "`{command}` did not finish within {timeout:?} (killed {killed} process(es))"
        ));
    }
    match docker.inspect_exec(&exec.id).await {
        Ok(inspected) => match inspected.exit_code {
            Some(0) => ProbeOutcome::Passed("exit 0".into()),
            Some(code) => ProbeOutcome::Failed(format!("`{command}` exited with {code}")),
            None => ProbeOutcome::Failed(format!("`{command}` did not finish")),
        },
        Err(e) => ProbeOutcome::NotRun(format!("exec inspect: {e}")),
    }
}

/// Sends SIGKILL to `pid` and every descendant (found through `/proc/*/stat`); returns how
/// many processes it signalled. Children first would race with them forking; the whole set is
/// collected first and killed at once instead.
fn kill_process_tree(pid: i32) -> usize {
    let mut parents: Vec<(i32, i32)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(child) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok())
            else {
                continue;
            };
            if let Some(parent) = std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|stat| parent_pid(&stat))
            {
                parents.push((child, parent));
            }
        }
    }
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(
            parents
                .iter()
                .filter(|(_, p)| *p == parent)
                .map(|(c, _)| *c),
        );
        i += 1;
    }
    tree.iter()
        // SAFETY: kill(2) with a pid and a signal number; failure (ESRCH) is harmless.
        .filter(|&&p| unsafe { libc::kill(p, libc::SIGKILL) } == 0)
        .count()
}

/// The parent PID field of a `/proc/PID/stat` line (after the parenthesised command name,
/// which may itself contain spaces and parentheses).
fn parent_pid(stat: &str) -> Option<i32> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parent_pid_field() {
        assert_eq!(parent_pid("123 (sh) S 45 123 123 0"), Some(45));
        assert_eq!(parent_pid("7 (a) b) (c) R 1 7 7"), Some(1));
        assert_eq!(parent_pid("garbage"), None);
    }

    #[test]
    fn status_lines() {
        assert_eq!(status_code(b"HTTP/1.1 200 OK\r"), Some(200));
        assert_eq!(status_code(b"HTTP/1.0 302 Found"), Some(302));
        assert_eq!(status_code(b"HTTP/1.1 503"), Some(503));
        assert_eq!(status_code(b"HTTP/2 200"), None);
        assert_eq!(status_code(b"HTTP/1.1 20"), None);
        assert_eq!(status_code(b"SSH-2.0-OpenSSH"), None);
    }
}
