//! The command-line tools the tests drive directly: curl as a real HTTP client, sha256sum for
//! digests of large files.
use std::{path::Path, process::Command};

/// Runs `curl -s -S --fail <args..>` and returns its stdout, trimmed; panics with curl's stderr
/// on failure.
pub fn curl(args: &[&str]) -> String {
    let out = Command::new("curl")
        .args(["-s", "-S", "--fail"])
        .args(args)
        .output()
        .expect("curl runs");
    assert!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The hex SHA-256 digest of the file at `path`, from `sha256sum`.
pub fn sha256_of(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("digest")
        .to_owned()
}
