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

/// A background task that ends when its owner drops it.
#[derive(Debug)]
pub struct TaskGuard(JoinHandle<()>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs `spec` against the container until dropped.
pub fn spawn_probe(
    container_id: String,
    generation: u64,
    ip: IpAddr,
    spec: ProbeSpec,
    docker: DockerHandle,
    registry: mpsc::UnboundedSender<Message>,
) -> TaskGuard {
    TaskGuard(tokio::spawn(async move {
        tokio::time::sleep(spec.initial_delay).await;
        loop {
            let outcome = match tokio::time::timeout(
                spec.timeout,
                check(&spec.kind, &container_id, ip, &docker),
            )
            .await
            {
                Ok(outcome) => outcome,
                Err(_) => Err(format!("no answer within {}s", spec.timeout.as_secs())),
            };
            let message = Message::ProbeResult {
                id: container_id.clone(),
                generation,
                outcome,
            };
            if registry.send(message).is_err() {
                return;
            }
            tokio::time::sleep(spec.period).await;
        }
    }))
}

/// After a connection failure on a backend without a probe: TCP-checks the port every `period`
/// and reports once it accepts again.
pub fn spawn_recovery(
    container_id: String,
    generation: u64,
    addr: SocketAddr,
    period: Duration,
    registry: mpsc::UnboundedSender<Message>,
) -> TaskGuard {
    TaskGuard(tokio::spawn(async move {
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

/// One check. `Ok` carries a short description of the success, `Err` of the failure.
async fn check(
    kind: &ProbeKind,
    container_id: &str,
    ip: IpAddr,
    docker: &DockerHandle,
) -> Result<String, String> {
    match kind {
        ProbeKind::Http { port, path } => http_check(SocketAddr::new(ip, *port), path).await,
        ProbeKind::Tcp { port } => TcpStream::connect(SocketAddr::new(ip, *port))
            .await
            .map(|_| "connected".to_owned())
            .map_err(|e| format!("connect to {ip}:{port}: {e}")),
        ProbeKind::Exec { command } => exec_check(container_id, command, docker).await,
    }
}

/// GET `path`; healthy on 2xx and 3xx.
async fn http_check(addr: SocketAddr, path: &str) -> Result<String, String> {
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect to {addr}: {e}"))?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: router-agent-probe\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("send to {addr}: {e}"))?;
    let mut buf = [0u8; 1024];
    let mut len = 0;
    loop {
        if let Some(line_end) = buf[..len].iter().position(|&b| b == b'\n') {
            return match status_code(&buf[..line_end]) {
                Some(code) if (200..400).contains(&code) => Ok(format!("HTTP {code}")),
                Some(code) => Err(format!("HTTP {code} from {addr}{path}")),
                None => Err(format!("invalid HTTP status line from {addr}")),
            };
        }
        let n = stream
            .read(&mut buf[len..])
            .await
            .map_err(|e| format!("read from {addr}: {e}"))?;
        // A full buffer reads 0 too: a status line longer than 1 KiB is not HTTP.
        if n == 0 {
            return Err(format!("no HTTP status line from {addr}"));
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

/// `sh -c <command>` in the container; healthy on exit code 0.
async fn exec_check(
    container_id: &str,
    command: &str,
    docker: &DockerHandle,
) -> Result<String, String> {
    let docker = docker
        .load_full()
        .ok_or("the Docker engine is not connected")?;
    let exec = docker
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
        .map_err(|e| format!("exec create: {e}"))?;
    if let StartExecResults::Attached { mut output, .. } =
        docker
            .start_exec(&exec.id, None)
            .await
            .map_err(|e| format!("exec start: {e}"))?
    {
        // Drain the output so the command runs to completion.
        while output.next().await.is_some() {}
    }
    let inspected = docker
        .inspect_exec(&exec.id)
        .await
        .map_err(|e| format!("exec inspect: {e}"))?;
    match inspected.exit_code {
        Some(0) => Ok("exit 0".into()),
        Some(code) => Err(format!("`{command}` exited with {code}")),
        None => Err(format!("`{command}` did not finish")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
