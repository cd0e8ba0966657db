//! The admin API's token: where it comes from, and which requests must carry it.
//!
//! Rules: writes (anything but GET) always need `Authorization: Bearer <token>`; reads need it
//! too when the admin API is bound to an address other than loopback. Without
//! `--admin-token-file`, the agent generates a token once into `<state-dir>/admin.token`
//! (mode 0600) and reuses it at every start, so `router-agent ctl` on the same host finds it.
use std::{
    io::{Read as _, Write as _},
    net::SocketAddr,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use tracing::{info, warn};

/// The generated token's file name inside the state directory.
pub const TOKEN_FILE: &str = "admin.token";

/// The token in force, and the file it came from (for the messages that tell what to do).
pub struct AdminToken {
    /// `None`: no token could be stored; the admin API then serves reads on loopback only and
    /// refuses every write.
    pub token: Option<String>,
    pub path: PathBuf,
}

impl AdminToken {
    /// Reads `token_file`, or the state directory's token (generated when missing). An admin
    /// API bound beyond loopback does not start without a token.
    pub fn load(
        admin: SocketAddr,
        token_file: Option<&Path>,
        state_dir: &Path,
    ) -> anyhow::Result<Self> {
        if let Some(path) = token_file {
            let token = read_token(path)?;
            info!(file = %path.display(), "admin API token from --admin-token-file");
            return Ok(Self {
                token: Some(token),
                path: path.to_owned(),
            });
        }
        let path = state_dir.join(TOKEN_FILE);
        match read_or_generate(state_dir, &path) {
            Ok(token) => {
                info!(file = %path.display(), "admin API token (writes need it; `router-agent ctl` reads it)");
                Ok(Self {
                    token: Some(token),
                    path,
                })
            }
            Err(e) if admin.ip().is_loopback() => {
                warn!(
                    "no admin API token ({e:#}): the admin API serves reads only; give \
                     --admin-token-file or a writable --state-dir to allow `router-agent ctl` \
                     changes"
                );
                Ok(Self { token: None, path })
            }
            Err(e) => Err(e).with_context(|| {
                format!(
                    "the admin API on {admin} is not on loopback and needs a token; give \
                     --admin-token-file or a writable --state-dir"
                )
            }),
        }
    }

    /// Whether a request may proceed; `Err` is the message of a 401.
    pub fn check(
        &self,
        loopback_only: bool,
        write: bool,
        authorization: Option<&[u8]>,
    ) -> Result<(), String> {
        if loopback_only && !write {
            return Ok(());
        }
        let Some(token) = &self.token else {
            return Err(format!(
                "this agent has no admin token (it could not store one at {}): writes are \
                 refused; restart it with --admin-token-file FILE or a writable --state-dir",
                self.path.display()
            ));
        };
        let given = authorization
            .and_then(|v| v.strip_prefix(b"Bearer "))
            .map(<[u8]>::trim_ascii);
        match given {
            Some(given) if constant_time_eq(given, token.as_bytes()) => Ok(()),
            Some(_) => Err(format!(
                "wrong token: send `Authorization: Bearer <token>` with the token in {} \
                 (`router-agent ctl --token-file {}` reads it)",
                self.path.display(),
                self.path.display()
            )),
            None => Err(format!(
                "{} need `Authorization: Bearer <token>`; the token is in {} (`router-agent ctl` \
                 reads it; `--token-file` if elsewhere)",
                if write {
                    "changes"
                } else {
                    "requests to an admin API bound beyond loopback"
                },
                self.path.display()
            )),
        }
    }
}

fn read_token(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the admin token file {}", path.display()))?;
    let token = text.trim();
    if token.len() < 16 || token.chars().any(char::is_whitespace) {
        bail!(
            "the admin token in {} must be one word of at least 16 characters (e.g. `openssl \
             rand -hex 32`)",
            path.display()
        );
    }
    Ok(token.to_owned())
}

/// Reuses the stored token, or creates the directory (0700) and a new token file (0600,
/// created exclusively: two agents starting at once end up with the same token).
fn read_or_generate(dir: &Path, path: &Path) -> anyhow::Result<String> {
    if path.exists() {
        return read_token(path);
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating the state directory {}", dir.display()))?;
    let token = random_hex(32)?;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(mut file) => {
            file.write_all(format!("{token}\n").as_bytes())
                .and_then(|()| file.sync_all())
                .with_context(|| format!("writing {}", path.display()))?;
            Ok(token)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => read_token(path),
        Err(e) => Err(e).with_context(|| format!("creating {}", path.display())),
    }
}

fn random_hex(bytes: usize) -> anyhow::Result<String> {
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .context("reading /dev/urandom for the admin token")?;
    Ok(buf
        .iter()
        .fold(String::with_capacity(bytes * 2), |mut s, b| {
            use std::fmt::Write as _;
            let _ = write!(s, "{b:02x}");
            s
        }))
}

/// Compares without an early exit, so the time taken says nothing about the token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> AdminToken {
        AdminToken {
            token: Some("0123456789abcdef0123".into()),
            path: "/x/admin.token".into(),
        }
    }

    #[test]
    fn rules() {
        let t = token();
        let good = Some(&b"Bearer 0123456789abcdef0123"[..]);
        let bad = Some(&b"Bearer 0123456789abcdef0124"[..]);
        // Loopback reads: free. Writes: always the token.
        assert!(t.check(true, false, None).is_ok());
        assert!(t.check(true, true, None).is_err());
        assert!(t.check(true, true, bad).is_err());
        assert!(t.check(true, true, good).is_ok());
        // Beyond loopback: every request.
        assert!(t.check(false, false, None).is_err());
        assert!(t.check(false, false, good).is_ok());
        let none = AdminToken {
            token: None,
            path: "/x".into(),
        };
        assert!(none.check(true, false, None).is_ok());
        assert!(none.check(true, true, good).is_err());
    }

    #[test]
    fn generated_once_then_reused() {
        let dir = std::env::temp_dir().join(format!("admin-token-{}", std::process::id()));
        let admin: SocketAddr = "127.0.0.1:9090".parse().unwrap();
        let first = AdminToken::load(admin, None, &dir).unwrap().token.unwrap();
        let second = AdminToken::load(admin, None, &dir).unwrap().token.unwrap();
        assert_eq!(first, second);
        assert_eq!(first.len(), 64);
        let mode = std::fs::metadata(dir.join(TOKEN_FILE)).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
            0o600
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
