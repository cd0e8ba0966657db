//! TLS the agent terminates (`--listen-tls`, `--tls-cert-dir`): certificates made with the
//! `openssl` CLI at test time, real `curl` and `openssl s_client` as clients, a real backend
//! container behind an `https://` label.
use std::{
    io::{Read as _, Write as _},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use tests::{
    agent::{Agent, free_port},
    client,
    docker::Container,
    unique, wait_for,
    ws::{OP_BINARY, client_frame},
};

/// A fresh directory for one test's certificates.
fn cert_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/test-certs")
        .join(unique("certs"));
    std::fs::create_dir_all(&dir).expect("cert dir");
    dir
}

/// A self-signed certificate for `domain` (also its own CA for `curl --cacert`), with `org` in
/// its subject so that two generations can be told apart; written to `<stem>.crt` and
/// `<stem>.key` in `dir`.
fn make_cert(dir: &Path, stem: &str, domain: &str, org: &str) {
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
        .arg("-keyout")
        .arg(dir.join(format!("{stem}.key")))
        .arg("-out")
        .arg(dir.join(format!("{stem}.crt")))
        .args(["-subj", &format!("/O={org}/CN={domain}")])
        .args(["-addext", &format!("subjectAltName=DNS:{domain}")])
        .output()
        .expect("openssl runs (cargo xtask setup installs it)");
    assert!(
        out.status.success(),
        "openssl req: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `curl` to `https://<domain>:<port><path>` through the agent's TLS listener on loopback,
/// trusting only `ca`; `-i` puts the response head first.
fn curl_tls(domain: &str, port: u16, ca: &Path, path: &str) -> Output {
    Command::new("curl")
        .args(["-s", "-S", "-i", "--max-time", "10"])
        .args(["--resolve", &format!("{domain}:{port}:127.0.0.1")])
        .arg("--cacert")
        .arg(ca)
        .arg(format!("https://{domain}:{port}{path}"))
        .output()
        .expect("curl runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn start_agent(dir: &Path) -> (Agent, u16) {
    let tls_port = free_port();
    let agent = Agent::start(&[
        "--listen-tls",
        &format!("127.0.0.1:{tls_port}"),
        "--tls-cert-dir",
        dir.to_str().expect("utf-8 path"),
    ]);
    (agent, tls_port)
}

/// An `https://` route with a certificate in the directory is served by the agent's own TLS,
/// and by the plain listener behind an external terminator as before; the backend is told
/// `https` either way. A name without a certificate fails the handshake; WebSocket works over
/// the agent's TLS.
#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn https_route_is_served_by_the_agents_tls_and_behind_a_terminator() {
    let domain = format!("{}.local", unique("secure"));
    let dir = cert_dir();
    make_cert(&dir, &domain, &domain, "first");
    let (agent, tls_port) = start_agent(&dir);
    let web = Container::backend(
        &unique("secure"),
        &[&format!("aliyun.routing.port_80=https://{domain}")],
    );
    agent.wait_up(&domain, &[&web.id], Duration::from_secs(15));
    let ca = dir.join(format!("{domain}.crt"));

    // Through the agent's TLS.
    let out = curl_tls(&domain, tls_port, &ca, "/headers");
    let response = text(&out.stdout);
    assert!(out.status.success(), "curl: {}", text(&out.stderr));
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let lower = response.to_ascii_lowercase();
    assert!(
        lower.contains(&format!("x-backend: {}", web.short_id())),
        "{response}"
    );
    assert!(
        lower.contains("\r\nx-forwarded-proto: https\r\n"),
        "{response}"
    );
    // The client's address survives the TLS layer (X-Forwarded-For, internal-domain checks).
    assert!(
        lower.contains("\r\nx-forwarded-for: 127.0.0.1\r\n"),
        "{response}"
    );

    // The same route on the plain listener, as a TLS terminator in front would reach it.
    let plain = client::get(agent.http_addr(), &domain, "/headers", &[]).expect("request");
    assert_eq!(plain.status, 200);
    assert_eq!(plain.backend(), Some(web.short_id()));
    let seen = text(&plain.body).to_ascii_lowercase();
    assert!(seen.contains("\r\nx-forwarded-proto: https\r\n"), "{seen}");

    let route = agent.route(&domain, "/").expect("routed");
    assert_eq!(route["tls"], "agent", "{route}");

    // A name with no certificate: the handshake fails (curl exit 35, an alert from rustls), and
    // nothing reached the backend.
    let unknown = format!("{}.local", unique("unknown"));
    let out = Command::new("curl")
        .args(["-s", "-S", "-k", "--max-time", "10"])
        .args(["--resolve", &format!("{unknown}:{tls_port}:127.0.0.1")])
        .arg(format!("https://{unknown}:{tls_port}/"))
        .output()
        .expect("curl runs");
    assert_eq!(out.status.code(), Some(35), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("alert"), "{}", text(&out.stderr));

    // WebSocket over the agent's TLS (wss): openssl s_client carries the upgrade and frames.
    let mut s_client = Command::new("openssl")
        .args(["s_client", "-quiet", "-verify_return_error"])
        .args(["-connect", &format!("127.0.0.1:{tls_port}")])
        .args(["-servername", &domain])
        .arg("-CAfile")
        .arg(&ca)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl s_client runs");
    let mut to_server = s_client.stdin.take().expect("stdin");
    let mut from_server = s_client.stdout.take().expect("stdout");
    let upgrade = format!(
        "GET /ws HTTP/1.1\r\nHost: {domain}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    to_server.write_all(upgrade.as_bytes()).expect("upgrade");
    to_server
        .write_all(&client_frame(true, OP_BINARY, b"over tls"))
        .expect("frame");
    to_server.flush().expect("flush");
    // The 101 head, then the echoed frame: unmasked, FIN + binary, 8 bytes of payload.
    let mut received = Vec::new();
    let mut chunk = [0u8; 4096];
    let expected_frame = [&[0x82u8, 8][..], b"over tls"].concat();
    let reader = std::thread::spawn(move || {
        while !received
            .windows(expected_frame.len())
            .any(|w| w == expected_frame.as_slice())
        {
            match from_server.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&chunk[..n]),
            }
        }
        received
    });
    wait_for(
        "the WebSocket echo over TLS",
        Duration::from_secs(15),
        || reader.is_finished(),
    );
    let received = reader.join().expect("reader");
    let _ = s_client.kill();
    let _ = s_client.wait();
    let shown = text(&received);
    assert!(shown.starts_with("HTTP/1.1 101"), "{shown}");
    assert!(
        received.ends_with(&[&[0x82u8, 8][..], b"over tls"].concat()),
        "no echo frame: {shown:?}"
    );
}

/// A certificate replaced on disk is served without a restart; a bad file is reported, naming
/// the file, and the previous certificate stays in use.
#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn tls_certificate_changes_are_picked_up_and_a_bad_file_keeps_the_old_one() {
    let domain = format!("{}.local", unique("rotate"));
    let dir = cert_dir();
    make_cert(&dir, &domain, &domain, "first");
    let spare = cert_dir();
    make_cert(&spare, "second", &domain, "second");
    let first_ca = spare.join("first.crt");
    std::fs::copy(dir.join(format!("{domain}.crt")), &first_ca).expect("copy");
    let second_ca = spare.join("second.crt");
    let (agent, tls_port) = start_agent(&dir);
    let web = Container::backend(
        &unique("rotate"),
        &[&format!("aliyun.routing.port_80=https://{domain}")],
    );
    agent.wait_up(&domain, &[&web.id], Duration::from_secs(15));

    let served_with = |ca: &Path| curl_tls(&domain, tls_port, ca, "/").status.success();
    assert!(served_with(&first_ca), "the first certificate is served");
    assert!(!served_with(&second_ca), "the second is not in use yet");

    // Replaced as certbot and careful operators do: written aside, then renamed into place.
    for ext in ["key", "crt"] {
        let aside = dir.join(format!(".{domain}.{ext}.new"));
        std::fs::copy(spare.join(format!("second.{ext}")), &aside).expect("copy");
        std::fs::rename(&aside, dir.join(format!("{domain}.{ext}"))).expect("rename");
    }
    wait_for(
        "the agent to serve the replaced certificate",
        Duration::from_secs(10),
        || served_with(&second_ca),
    );
    assert!(!served_with(&first_ca), "the first certificate is gone");
    assert!(
        agent.log().matches("TLS certificate loaded").count() >= 2,
        "{}",
        agent.log()
    );

    // A broken key: reported with the file's name, and the second certificate stays in use.
    let key = dir.join(format!("{domain}.key"));
    std::fs::write(&key, "not a key\n").expect("write");
    let key_name = key.display().to_string();
    wait_for(
        "the agent to report the bad key file",
        Duration::from_secs(10),
        || {
            agent.log().lines().any(|l| {
                l.contains("TLS certificate not loaded")
                    && l.contains(&key_name)
                    && l.contains("no PEM private key")
                    && l.contains("the previous certificate stays in use")
            })
        },
    );
    assert!(
        served_with(&second_ca),
        "the previous certificate still serves"
    );

    // A certificate for another name is loaded, with a warning that says which names it has.
    make_cert(&spare, "wrong", "elsewhere.local", "wrong");
    for ext in ["key", "crt"] {
        let aside = dir.join(format!(".{domain}.{ext}.new"));
        std::fs::copy(spare.join(format!("wrong.{ext}")), &aside).expect("copy");
        std::fs::rename(&aside, dir.join(format!("{domain}.{ext}"))).expect("rename");
    }
    wait_for(
        "the agent to warn about a certificate for another name",
        Duration::from_secs(10),
        || {
            agent.log().lines().any(|l| {
                l.contains(&format!("TLS certificate for {domain} is not valid for it"))
                    && l.contains("its DNS names: elsewhere.local")
            })
        },
    );
}
