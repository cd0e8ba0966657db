//! TLS the agent terminates itself (`--listen-tls`): certificates and keys from a directory
//! (`--tls-cert-dir`), picked by the client's SNI name, reloaded when the files change.
//!
//! Naming, per domain (PEM files):
//! - `<domain>.crt` (the certificate chain, leaf first) and `<domain>.key` (its private key);
//! - or certbot's layout: `<domain>/fullchain.pem` and `<domain>/privkey.pem`, so that
//!   `/etc/letsencrypt/live` can be the directory itself;
//! - `_wildcard.<suffix>` in place of `<domain>` serves `*.<suffix>` (one label, as in X.509).
//!
//! The directory is read again every [`RELOAD_PERIOD`]; a pair whose bytes changed is parsed
//! anew. A pair that does not load (unreadable, not PEM, key not matching the certificate) is
//! logged with the file and the reason, and the domain keeps its previous certificate.
use std::{
    collections::HashMap,
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use rustls::{
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tracing::{debug, info, warn};

/// How often the certificate directory is read again.
pub const RELOAD_PERIOD: Duration = Duration::from_secs(1);

/// The certificates in force, by domain (`*.suffix` for wildcards): swapped whole on reload,
/// read without a lock by every handshake.
pub struct CertStore {
    certs: ArcSwap<HashMap<String, Arc<CertifiedKey>>>,
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let certs = self.certs.load();
        f.debug_set().entries(certs.keys()).finish()
    }
}

impl CertStore {
    /// The certificate for a name: its own, else the wildcard of its parent domain.
    pub fn lookup(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let certs = self.certs.load();
        certs
            .get(&name)
            .or_else(|| {
                let (_, parent) = name.split_once('.')?;
                certs.get(&format!("*.{parent}"))
            })
            .cloned()
    }

    /// Whether the agent terminates TLS for this domain (it holds a certificate for it).
    pub fn terminates(&self, domain: &str) -> bool {
        self.lookup(domain).is_some()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // No SNI, or a name without a certificate: no certificate, so rustls ends the handshake
        // with an alert (there is no default certificate to hand out for unknown names).
        let Some(name) = hello.server_name() else {
            debug!("TLS client sent no server name (SNI): no certificate");
            return None;
        };
        let found = self.lookup(name);
        if found.is_none() {
            debug!(name, "no certificate for this TLS server name");
        }
        found
    }
}

/// The TLS server configuration for the agent's listeners: HTTP/1.1 only, certificates from
/// `store`.
pub fn acceptor(store: Arc<CertStore>) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_cert_resolver(store);
    // The router speaks HTTP/1.1: a client offering h2 and http/1.1 picks http/1.1.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

#[expect(
    deprecated,
    reason = "ring builds with the C compiler alone; aws-lc-rs (post-quantum key exchange) \
              needs cmake and a much longer build here"
)]
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificate and key files of one domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PairFiles {
    /// The domain served (`*.suffix` for a wildcard).
    pub domain: String,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// What a directory entry names, from its name alone: `Some(domain)` for `<domain>.crt` (a
/// file) or `<domain>` (a certbot directory). Names that are not DNS names are not ours.
fn domain_of(stem: &str) -> Option<String> {
    let domain = match stem.strip_prefix("_wildcard.") {
        Some(suffix) => format!("*.{suffix}"),
        None => stem.to_owned(),
    };
    let name = domain.strip_prefix("*.").unwrap_or(&domain);
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    valid.then(|| domain.to_ascii_lowercase())
}

/// The pairs in `dir` by the naming above, and the files that are half a pair (a certificate
/// without its key, or the other way round).
pub fn pairs_in(dir: &Path) -> std::io::Result<(Vec<PairFiles>, Vec<PathBuf>)> {
    let mut pairs = Vec::new();
    let mut halves = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        // Followed through symbolic links: certbot's `live/<domain>` files are links.
        if path.is_dir() {
            let Some(domain) = domain_of(name) else {
                continue;
            };
            let (cert, key) = (path.join("fullchain.pem"), path.join("privkey.pem"));
            match (cert.is_file(), key.is_file()) {
                (true, true) => pairs.push(PairFiles { domain, cert, key }),
                (true, false) => halves.push(cert),
                (false, true) => halves.push(key),
                (false, false) => {}
            }
            continue;
        }
        let (stem, is_cert) = if let Some(stem) = name.strip_suffix(".crt") {
            (stem, true)
        } else if let Some(stem) = name.strip_suffix(".key") {
            (stem, false)
        } else {
            continue;
        };
        let Some(domain) = domain_of(stem) else {
            continue;
        };
        let other = dir.join(format!("{stem}.{}", if is_cert { "key" } else { "crt" }));
        match (is_cert, other.is_file()) {
            (true, true) => pairs.push(PairFiles {
                domain,
                cert: path,
                key: other,
            }),
            (_, false) => halves.push(path),
            // The `.crt` side lists the pair.
            (false, true) => {}
        }
    }
    pairs.sort_by(|a, b| a.domain.cmp(&b.domain));
    halves.sort();
    Ok((pairs, halves))
}

/// Parses a certificate chain and its key; the error names the file at fault and why.
pub fn load_pair(
    files: &PairFiles,
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<CertifiedKey, String> {
    let (cert, key) = (files.cert.display(), files.key.display());
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{cert}: not a PEM certificate chain ({e})"))?;
    if chain.is_empty() {
        return Err(format!(
            "{cert}: no certificate in it (expected PEM `-----BEGIN CERTIFICATE-----` blocks, \
             the leaf first)"
        ));
    }
    let private_key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| {
        format!(
            "{key}: no PEM private key in it ({e}; expected PKCS#8, PKCS#1 RSA or SEC1 EC \
             `-----BEGIN ... PRIVATE KEY-----`)"
        )
    })?;
    let signing = provider()
        .key_provider
        .load_private_key(private_key)
        .map_err(|e| format!("{key}: unusable private key ({e})"))?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(certified)
        }
        Err(rustls::Error::InconsistentKeys(_)) => Err(format!(
            "{key} is not the private key of the certificate in {cert}"
        )),
        Err(e) => Err(format!("{cert}: invalid certificate ({e})")),
    }
}

/// Why the leaf certificate does not cover `domain` (`*.suffix`: any name under it), if it
/// does not.
fn not_valid_for(certified: &CertifiedKey, domain: &str) -> Option<String> {
    let leaf = certified.cert.first()?;
    let Ok(parsed) = webpki::EndEntityCert::try_from(leaf) else {
        return Some("cannot be parsed".into());
    };
    // A wildcard file must cover every name one label under its suffix: try one of them.
    let probe = match domain.strip_prefix("*.") {
        Some(suffix) => format!("wildcard-check.{suffix}"),
        None => domain.to_owned(),
    };
    let name = rustls::pki_types::ServerName::try_from(probe.as_str()).ok()?;
    if parsed.verify_is_valid_for_subject_name(&name).is_ok() {
        return None;
    }
    let names: Vec<&str> = parsed.valid_dns_names().collect();
    Some(format!(
        "is not valid for it (its DNS names: {})",
        if names.is_empty() {
            "none".to_owned()
        } else {
            names.join(", ")
        }
    ))
}

/// The bytes last read for a pair (its files are parsed again only when they change).
#[derive(PartialEq, Eq)]
struct Seen {
    files: PairFiles,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
}

/// Follows the certificate directory and keeps the [`CertStore`] in step with it.
pub struct CertDir {
    dir: PathBuf,
    store: Arc<CertStore>,
    /// What was read last per domain, loaded or not.
    seen: HashMap<String, Seen>,
    /// The certificates in force (what the store holds).
    good: HashMap<String, Arc<CertifiedKey>>,
    /// Problems already logged, so that a bad file is reported once per change, not each poll.
    reported: Vec<String>,
}

impl CertDir {
    /// Reads the directory once: it must exist and be readable (a pair that does not load is
    /// only logged, as on every reload).
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        std::fs::read_dir(dir).with_context(|| {
            format!(
                "--tls-cert-dir {}: cannot read the directory (it holds <domain>.crt and \
                 <domain>.key files)",
                dir.display()
            )
        })?;
        let mut certs = Self {
            dir: dir.to_owned(),
            store: Arc::new(CertStore {
                certs: ArcSwap::default(),
            }),
            seen: HashMap::new(),
            good: HashMap::new(),
            reported: Vec::new(),
        };
        certs.reload();
        if certs.good.is_empty() {
            warn!(
                dir = %dir.display(),
                "no certificate loaded yet: TLS handshakes fail until <domain>.crt and \
                 <domain>.key files are added"
            );
        }
        Ok(certs)
    }

    pub fn store(&self) -> Arc<CertStore> {
        self.store.clone()
    }

    /// Reads the directory again every [`RELOAD_PERIOD`], for ever.
    pub async fn follow(mut self) {
        let mut ticks = tokio::time::interval(RELOAD_PERIOD);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            // A handful of small files: read in place, off the async threads.
            self = match tokio::task::spawn_blocking(move || {
                self.reload();
                self
            })
            .await
            {
                Ok(certs) => certs,
                Err(e) => {
                    warn!("reloading TLS certificates stopped: {e}");
                    return;
                }
            };
        }
    }

    /// One pass over the directory; swaps the store when a certificate came, changed or went.
    fn reload(&mut self) {
        let mut problems = Vec::new();
        let (pairs, halves) = match pairs_in(&self.dir) {
            Ok(found) => found,
            Err(e) => {
                self.report(vec![format!(
                    "{}: cannot read the certificate directory ({e}); keeping the certificates \
                     loaded before",
                    self.dir.display()
                )]);
                return;
            }
        };
        for half in halves {
            problems.push(format!(
                "{}: half a pair (a certificate needs <domain>.crt and <domain>.key, or \
                 fullchain.pem and privkey.pem in <domain>/): ignored",
                half.display()
            ));
        }
        let mut changed = false;
        for files in &pairs {
            let read = std::fs::read(&files.cert)
                .map_err(|e| format!("{}: cannot read it ({e})", files.cert.display()))
                .and_then(|cert| {
                    std::fs::read(&files.key)
                        .map(|key| (cert, key))
                        .map_err(|e| format!("{}: cannot read it ({e})", files.key.display()))
                });
            let (cert_pem, key_pem) = match read {
                Ok(bytes) => bytes,
                Err(why) => {
                    problems.push(self.keeping(&files.domain, &why));
                    continue;
                }
            };
            let seen = Seen {
                files: files.clone(),
                cert_pem,
                key_pem,
            };
            if self.seen.get(&files.domain) == Some(&seen) {
                if let Some(why) = self
                    .reported
                    .iter()
                    .find(|r| r.starts_with(&format!("{}: ", files.domain)))
                {
                    // Still bad, and already reported as such.
                    problems.push(why.clone());
                }
                continue;
            }
            match load_pair(files, &seen.cert_pem, &seen.key_pem) {
                Ok(certified) => {
                    if let Some(why) = not_valid_for(&certified, &files.domain) {
                        // Loaded anyway: a certificate naming its host only in the subject's
                        // CN still satisfies some clients.
                        warn!(
                            cert = %files.cert.display(),
                            "TLS certificate for {} {why}: clients that check names refuse it",
                            files.domain
                        );
                    }
                    info!(
                        domain = %files.domain,
                        cert = %files.cert.display(),
                        key = %files.key.display(),
                        chain = certified.cert.len(),
                        "TLS certificate loaded"
                    );
                    self.good.insert(files.domain.clone(), Arc::new(certified));
                    changed = true;
                }
                Err(why) => problems.push(self.keeping(&files.domain, &why)),
            }
            self.seen.insert(files.domain.clone(), seen);
        }
        let gone: Vec<String> = self
            .good
            .keys()
            .filter(|domain| !pairs.iter().any(|p| &p.domain == *domain))
            .cloned()
            .collect();
        for domain in gone {
            info!(%domain, "TLS certificate files removed: no longer terminating TLS for it");
            self.good.remove(&domain);
            self.seen.remove(&domain);
            changed = true;
        }
        self.seen
            .retain(|domain, _| pairs.iter().any(|p| &p.domain == domain));
        if changed {
            self.store.certs.store(Arc::new(self.good.clone()));
        }
        self.report(problems);
    }

    /// A problem with a domain's files, saying what stays in force.
    fn keeping(&self, domain: &str, why: &str) -> String {
        if self.good.contains_key(domain) {
            format!("{domain}: {why}; the previous certificate stays in use")
        } else {
            format!("{domain}: {why}; no certificate for it until this is fixed")
        }
    }

    /// Logs the problems not logged at the previous pass.
    fn report(&mut self, problems: Vec<String>) {
        for problem in &problems {
            if !self.reported.contains(problem) {
                warn!("TLS certificate not loaded: {problem}");
            }
        }
        self.reported = problems;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_domains() {
        for (stem, domain) in [
            ("secure.local", Some("secure.local")),
            ("Shop.Example.com", Some("shop.example.com")),
            ("_wildcard.example.local", Some("*.example.local")),
            ("localhost", Some("localhost")),
            ("", None),
            ("bad..name", None),
            ("has space", None),
            ("_wildcard.", None),
        ] {
            assert_eq!(domain_of(stem).as_deref(), domain, "{stem:?}");
        }
    }

    #[test]
    fn pairs_and_halves_in_a_directory() {
        let dir = std::env::temp_dir().join(format!("router-tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("certbot.example.com")).unwrap();
        for file in [
            "a.local.crt",
            "a.local.key",
            "_wildcard.b.local.crt",
            "_wildcard.b.local.key",
            "lonely.local.crt",
            "README",
            "certbot.example.com/fullchain.pem",
            "certbot.example.com/privkey.pem",
        ] {
            std::fs::write(dir.join(file), "x").unwrap();
        }
        let (pairs, halves) = pairs_in(&dir).unwrap();
        let domains: Vec<&str> = pairs.iter().map(|p| p.domain.as_str()).collect();
        assert_eq!(domains, ["*.b.local", "a.local", "certbot.example.com"]);
        assert_eq!(pairs[2].key, dir.join("certbot.example.com/privkey.pem"));
        assert_eq!(halves, [dir.join("lonely.local.crt")]);

        let err = load_pair(&pairs[1], b"x", b"x").unwrap_err();
        assert!(err.contains("a.local.crt: no certificate in it"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
