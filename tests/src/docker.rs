//! Containers on the real engine, through the docker CLI, removed when the test ends.
use std::{net::SocketAddr, process::Command};

/// Images built by `cargo xtask setup`.
pub const BACKEND_IMAGE_NAME: &str = "router-local/backend";

/// The test backend image built from this checkout: `cargo xtask setup` tags it with a
/// fingerprint of its contents and writes that tag to `target/images/backend.tag`, so that
/// checkouts sharing one engine each test their own backend. Falls back to the plain name.
pub fn backend_image() -> &'static str {
    static IMAGE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    IMAGE.get_or_init(|| {
        let tag =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/images/backend.tag");
        std::fs::read_to_string(tag)
            .map(|t| t.trim().to_owned())
            .ok()
            .filter(|t| !t.is_empty())
            .unwrap_or_else(|| BACKEND_IMAGE_NAME.to_owned())
    })
}
pub const NGINX_IMAGE: &str = "router-local/nginx";
pub const CURL_IMAGE: &str = "router-local/curl";

/// The docker client that matches the engine `cargo xtask setup` installs.
fn docker_bin() -> &'static str {
    if std::path::Path::new("/usr/bin/docker").exists() {
        "/usr/bin/docker"
    } else {
        "docker"
    }
}

/// Runs `docker args..` and returns stdout; panics with stderr on failure.
pub fn docker(args: &[&str]) -> String {
    let out = Command::new(docker_bin())
        .args(args)
        .output()
        .expect("docker CLI runs (did `cargo xtask setup` run?)");
    assert!(
        out.status.success(),
        "docker {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Like [`docker`] but returns whether it succeeded.
pub fn docker_ok(args: &[&str]) -> bool {
    Command::new(docker_bin())
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A container started by a test; force-removed on drop.
pub struct Container {
    pub id: String,
    pub name: String,
}

impl Container {
    /// `docker run -d --name <name> <args..>` (args include labels and the image).
    pub fn run(name: &str, args: &[&str]) -> Self {
        let mut all = vec!["run", "-d", "--name", name, "--label", "router-test=1"];
        all.extend_from_slice(args);
        let id = docker(&all);
        Self {
            id,
            name: name.to_owned(),
        }
    }

    /// A `router-local/backend` container with these labels (`key=value`), once its HTTP port
    /// accepts connections. (Without a probe label the router routes a container as soon as it
    /// runs, which can be a few milliseconds before the server inside listens.)
    pub fn backend(name: &str, labels: &[&str]) -> Self {
        Self::backend_with_env(name, labels, &[])
    }

    /// Like [`Container::backend`], with environment variables (`KEY=value`) for the test
    /// backend's switches (`BACKEND_FAIL`, `BACKEND_KEEPALIVE`, ...).
    pub fn backend_with_env(name: &str, labels: &[&str], env: &[&str]) -> Self {
        let mut rest = Vec::new();
        for var in env {
            rest.extend_from_slice(&["-e", var]);
        }
        rest.push(backend_image());
        let container = Self::run(name, &with_labels(labels, &rest));
        let addr = container.http_addr();
        crate::wait_for(
            "the backend to listen",
            std::time::Duration::from_secs(10),
            || {
                std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_millis(200))
                    .is_ok()
            },
        );
        container
    }

    pub fn short_id(&self) -> &str {
        &self.id[..12]
    }

    /// Its IPv4 address on the default bridge.
    pub fn ip(&self) -> String {
        docker(&[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            &self.id,
        ])
    }

    /// Its port 80 on the default bridge, where the test backend serves HTTP.
    pub fn http_addr(&self) -> SocketAddr {
        format!("{}:80", self.ip()).parse().expect("address")
    }

    /// A counter from the test backend's `/stats`, read directly from the container.
    pub fn stat(&self, name: &str) -> u64 {
        backend_stat(self.http_addr(), name)
    }
}

/// A counter from the `/stats` of the test backend serving HTTP at `addr` (the `/stats` request
/// itself included in `requests`).
pub fn backend_stat(addr: SocketAddr, name: &str) -> u64 {
    let stats = crate::client::get(addr, "backend", "/stats", &[])
        .expect("GET /stats straight from the backend");
    let body = String::from_utf8_lossy(&stats.body);
    body.lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{name}="))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or_else(|| panic!("no {name} in the /stats answer: {body:?}"))
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new(docker_bin())
            .args(["rm", "-f", &self.id])
            .output();
    }
}

/// `--label k=v` for each label, followed by `rest`.
pub fn with_labels<'a>(labels: &[&'a str], rest: &[&'a str]) -> Vec<&'a str> {
    let mut args = Vec::new();
    for label in labels {
        args.push("--label");
        args.push(*label);
    }
    args.extend_from_slice(rest);
    args
}
