//! Local container images, built from host binaries: there is no registry to pull from.
//!
//! Each image is a `FROM scratch` root filesystem holding the binaries, the shared libraries
//! `ldd` names for them, busybox for a shell, and tini as PID 1 (so `docker stop` delivers
//! SIGTERM to the server instead of waiting out the grace period). An image carries a fingerprint
//! of its contents as a label and is rebuilt only when the contents change.
use std::{
    collections::hash_map::DefaultHasher,
    fmt::Write as _,
    fs,
    hash::{Hash as _, Hasher as _},
    os::unix::fs::{PermissionsExt as _, symlink},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use crate::{build, cmd};

/// The seed's `restserver`: nginx serving a static page on port 80.
pub const NGINX: &str = "router-local/nginx";
/// The seed's `restclient`: curl and a shell.
pub const CURL: &str = "router-local/curl";
/// The end-to-end tests' backend (`tests/src/bin/test-backend.rs`) on port 80, with their raw
/// TCP client (`tests/src/bin/test-client.rs`) for client containers.
pub const BACKEND: &str = "router-local/backend";
/// The agent as users deploy it (`deploy/compose.yml`, `deploy/stack.yml`).
pub const AGENT: &str = "router-agent:latest";

const BUSYBOX_APPLETS: &[&str] = &[
    "sh", "cat", "echo", "ls", "sleep", "test", "touch", "rm", "mkdir", "wget", "nc", "hostname",
    "true", "false", "kill", "ps", "timeout", "printf", "head",
];

/// `name` pinned to the contents this checkout built (`name:<fingerprint>`, from the tag file
/// `setup` writes), so that another checkout rebuilding `name:latest` on the shared engine
/// cannot swap it; `name` itself when there is no tag file.
pub fn pinned(name: &str) -> String {
    let repository = name.split(':').next().unwrap_or(name);
    let tag_file = cmd::workspace_root().join("target/images").join(format!(
        "{}.tag",
        repository.rsplit('/').next().unwrap_or(repository)
    ));
    fs::read_to_string(tag_file)
        .map(|tag| tag.trim().to_owned())
        .ok()
        .filter(|tag| !tag.is_empty())
        .unwrap_or_else(|| name.to_owned())
}

pub fn ensure_built() -> anyhow::Result<()> {
    build_nginx()?;
    build_curl()?;
    let backend = build::test_backend()?;
    build_backend(&backend)
}

fn build_nginx() -> anyhow::Result<()> {
    let mut fs = Rootfs::new("nginx")?;
    fs.add_binary(Path::new("/usr/sbin/nginx"))?;
    // nginx resolves the worker user with getpwnam(), which dlopens this.
    fs.add_host_file(Path::new("/usr/lib/x86_64-linux-gnu/libnss_files.so.2"))?;
    fs.add_users()?;
    fs.add_file("etc/nginx/nginx.conf", NGINX_CONF)?;
    fs.add_file(
        "usr/share/nginx/html/index.html",
        "<!DOCTYPE html>\n<html><body><h1>Welcome to nginx!</h1></body></html>\n",
    )?;
    // Fixed-size bodies for `cargo xtask bench` (the name is the size).
    for (name, len) in BENCH_BODIES {
        fs.add_file(&format!("usr/share/nginx/html/{name}"), &bench_body(*len))?;
    }
    fs.add_dir("var/log/nginx")?;
    fs.add_dir("var/lib/nginx")?;
    fs.import(
        NGINX,
        &["/usr/bin/tini-static", "--"],
        &[
            "/usr/sbin/nginx",
            "-e",
            "stderr",
            "-c",
            "/etc/nginx/nginx.conf",
        ],
    )
}

/// The benchmark's response bodies in the nginx image: file name and exact size in bytes.
pub const BENCH_BODIES: &[(&str, usize)] = &[
    ("100b", 100),
    ("4k", 4 * 1024),
    ("16k", 16 * 1024),
    ("64k", 64 * 1024),
    ("256k", 256 * 1024),
    ("1m", 1024 * 1024),
];

/// `len` bytes of printable text: lines of a repeating alphabet, ending with a newline.
fn bench_body(len: usize) -> String {
    const LINE: &[u8; 64] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-\n";
    let mut body: String = LINE
        .iter()
        .cycle()
        .take(len)
        .map(|&b| char::from(b))
        .collect();
    if len > 0 {
        body.pop();
        body.push('\n');
    }
    body
}

const NGINX_CONF: &str = "daemon off;
worker_processes 1;
error_log stderr notice;
pid /tmp/nginx.pid;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path /tmp/client_body;
    proxy_temp_path /tmp/proxy;
    fastcgi_temp_path /tmp/fastcgi;
    uwsgi_temp_path /tmp/uwsgi;
    scgi_temp_path /tmp/scgi;
    server {
        listen 80;
        # Names the replica that answered (the short container id), so the demo and the tests
        # can check the router's CONTAINERID cookie against it.
        add_header X-Hostname $hostname always;
        location / { root /usr/share/nginx/html; }
    }
}
";

fn build_curl() -> anyhow::Result<()> {
    let mut fs = Rootfs::new("curl")?;
    fs.add_binary(Path::new("/usr/bin/curl"))?;
    // Name lookups (extra_hosts lands in /etc/hosts) go through NSS's files module.
    fs.add_host_file(Path::new("/usr/lib/x86_64-linux-gnu/libnss_files.so.2"))?;
    fs.add_file("etc/nsswitch.conf", "hosts: files dns\n")?;
    fs.add_users()?;
    fs.import(
        CURL,
        &["/usr/bin/tini-static", "--"],
        &["curl", "--version"],
    )
}

fn build_backend(binary: &Path) -> anyhow::Result<()> {
    let mut fs = Rootfs::new("backend")?;
    fs.add_binary_at(binary, "usr/local/bin/test-backend")?;
    // Built by the same `cargo build`, next to the backend.
    fs.add_binary_at(
        &binary.with_file_name("test-client"),
        "usr/local/bin/test-client",
    )?;
    fs.add_users()?;
    fs.import(
        BACKEND,
        &["/usr/bin/tini-static", "--"],
        &["/usr/local/bin/test-backend"],
    )
}

/// `cargo xtask image`: the release agent binary and its libraries; tini as PID 1 passes
/// SIGTERM on, and busybox gives `docker exec` a shell to look around with.
pub fn ensure_agent(binary: &Path) -> anyhow::Result<()> {
    let mut fs = Rootfs::new("agent")?;
    fs.add_binary_at(binary, "usr/local/bin/router-agent")?;
    // The release profile keeps line tables (for profiles): most of the binary's 50 MiB, and
    // the image travels to every cluster node by `docker save | docker load`.
    fs.strip_debug("usr/local/bin/router-agent")?;
    fs.add_users()?;
    fs.import(
        AGENT,
        &["/usr/bin/tini-static", "--", "/usr/local/bin/router-agent"],
        &[],
    )
}

/// A root filesystem being assembled under `target/images/<name>`.
struct Rootfs {
    dir: PathBuf,
    hasher: DefaultHasher,
}

impl Rootfs {
    fn new(name: &str) -> anyhow::Result<Self> {
        let dir = cmd::workspace_root().join("target/images").join(name);
        if dir.exists() {
            fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
        }
        fs::create_dir_all(&dir)?;
        let mut rootfs = Self {
            dir,
            hasher: DefaultHasher::new(),
        };
        rootfs.add_busybox()?;
        rootfs.add_host_file(Path::new("/usr/bin/tini-static"))?;
        rootfs.add_dir("tmp")?;
        fs::set_permissions(rootfs.dir.join("tmp"), fs::Permissions::from_mode(0o1777))?;
        Ok(rootfs)
    }

    fn add_busybox(&mut self) -> anyhow::Result<()> {
        self.add_host_file(Path::new("/bin/busybox"))?;
        for applet in BUSYBOX_APPLETS {
            let link = self.dir.join("bin").join(applet);
            symlink("busybox", &link).with_context(|| format!("linking {}", link.display()))?;
        }
        "busybox applets".hash(&mut self.hasher);
        BUSYBOX_APPLETS.hash(&mut self.hasher);
        Ok(())
    }

    /// Copies a host binary to the same path, with every shared library `ldd` lists.
    fn add_binary(&mut self, binary: &Path) -> anyhow::Result<()> {
        let dest = binary.strip_prefix("/").unwrap_or(binary).to_path_buf();
        self.add_binary_at(binary, dest.to_str().context("non-UTF-8 path")?)
    }

    fn add_binary_at(&mut self, binary: &Path, dest: &str) -> anyhow::Result<()> {
        self.copy(binary, dest)?;
        for lib in shared_libraries(binary)? {
            self.add_host_file(&lib)?;
        }
        Ok(())
    }

    fn add_host_file(&mut self, path: &Path) -> anyhow::Result<()> {
        let dest = path.strip_prefix("/").unwrap_or(path);
        self.copy(path, dest.to_str().context("non-UTF-8 path")?)
    }

    fn copy(&mut self, from: &Path, dest: &str) -> anyhow::Result<()> {
        let bytes = fs::read(from).with_context(|| format!("reading {}", from.display()))?;
        self.write(dest, &bytes)?;
        fs::set_permissions(self.dir.join(dest), fs::Permissions::from_mode(0o755))?;
        Ok(())
    }

    /// Removes debug sections from a copied binary (the fingerprint still covers the original).
    fn strip_debug(&self, dest: &str) -> anyhow::Result<()> {
        let path = self.dir.join(dest);
        cmd::run(
            "strip",
            &["--strip-debug", path.to_str().context("non-UTF-8 path")?],
        )
        .context("stripping the binary for its image failed; is binutils installed?")
    }

    fn add_file(&mut self, dest: &str, contents: &str) -> anyhow::Result<()> {
        self.write(dest, contents.as_bytes())
    }

    fn add_users(&mut self) -> anyhow::Result<()> {
        self.add_file(
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        )?;
        self.add_file("etc/group", "root:x:0:\nnogroup:x:65534:\n")
    }

    fn add_dir(&mut self, dest: &str) -> anyhow::Result<()> {
        dest.hash(&mut self.hasher);
        fs::create_dir_all(self.dir.join(dest))?;
        Ok(())
    }

    fn write(&mut self, dest: &str, bytes: &[u8]) -> anyhow::Result<()> {
        dest.hash(&mut self.hasher);
        bytes.hash(&mut self.hasher);
        let path = self.dir.join(dest);
        fs::create_dir_all(path.parent().expect("rootfs paths have a parent"))?;
        fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))
    }

    /// Imports the tree as `name:latest` unless an image with the same fingerprint exists.
    /// Imports the image as `name` (`latest`) and as `name:<fingerprint>`, the tag that names
    /// these exact contents (several checkouts on one engine each test with their own), unless
    /// `name` already has these contents.
    fn import(self, name: &str, entrypoint: &[&str], command: &[&str]) -> anyhow::Result<()> {
        let mut hasher = self.hasher;
        entrypoint.hash(&mut hasher);
        command.hash(&mut hasher);
        let fingerprint = format!("{:016x}", hasher.finish());
        let repository = name.split(':').next().unwrap_or(name);
        let pinned = format!("{repository}:{fingerprint}");
        let tag_file = cmd::workspace_root().join("target/images").join(format!(
            "{}.tag",
            repository.rsplit('/').next().unwrap_or(repository)
        ));
        fs::write(&tag_file, &pinned).with_context(|| format!("writing {}", tag_file.display()))?;
        if cmd::succeeds(cmd::docker(), &["image", "inspect", &pinned]) {
            // Built before (maybe by another checkout): point `latest` at it again.
            return cmd::run(cmd::docker(), &["tag", &pinned, name]);
        }
        let existing = cmd::output(
            cmd::docker(),
            &[
                "image",
                "inspect",
                "-f",
                "{{index .Config.Labels \"router.fingerprint\"}}",
                name,
            ],
        )
        .unwrap_or_default();
        if existing == fingerprint {
            return cmd::run(cmd::docker(), &["tag", name, &pinned]);
        }
        println!("setup: building image {name}");
        let tar = Command::new("tar")
            .args([
                "-C",
                self.dir.to_str().context("non-UTF-8 path")?,
                "-c",
                ".",
            ])
            .stdout(Stdio::piped())
            .spawn()
            .context("could not start tar")?;
        let status = Command::new(cmd::docker())
            .args([
                "import",
                "-c",
                &format!("ENTRYPOINT {}", json_array(entrypoint)),
                "-c",
                &format!("CMD {}", json_array(command)),
                "-c",
                &format!("LABEL router.fingerprint={fingerprint}"),
                "-",
                name,
            ])
            .stdin(tar.stdout.context("tar has no stdout")?)
            .stdout(Stdio::null())
            .status()
            .context("could not start docker import")?;
        if !status.success() {
            bail!("docker import of {name} failed ({status})");
        }
        cmd::run(cmd::docker(), &["tag", name, &pinned])
    }
}

fn json_array(items: &[&str]) -> String {
    let mut out = String::from("[");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{item:?}");
    }
    out.push(']');
    out
}

/// The absolute library paths `ldd` prints for a binary (including the dynamic loader).
fn shared_libraries(binary: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let listing = cmd::output("ldd", &[binary.to_str().context("non-UTF-8 path")?])?;
    Ok(listing
        .lines()
        .filter_map(|line| {
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}
