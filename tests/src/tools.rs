//! The command-line tools the tests drive directly (curl as a real HTTP client), and digests of
//! large files.
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

/// The hex SHA-256 digest of the file at `path` (as `sha256sum` prints it).
pub fn sha256_of(path: &Path) -> String {
    use sha2::{Digest as _, Sha256};
    let mut file =
        std::fs::File::open(path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    hasher.finalize().iter().fold(String::new(), |mut hex, b| {
        use std::fmt::Write as _;
        write!(hex, "{b:02x}").expect("writing to a String cannot fail");
        hex
    })
}
