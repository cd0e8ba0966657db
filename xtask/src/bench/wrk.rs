//! Running Debian's `wrk` and reading its report.
//!
//! wrk prints rates with decimal-free binary units (`12.41MB` is 12.41 MiB) and latencies as
//! `us`, `ms`, `s` or `m`; everything here is converted to plain numbers (bytes, seconds).
use std::{process::Command, time::Duration};

use anyhow::{Context as _, bail};

/// One wrk run, as wrk reported it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WrkResult {
    pub requests: u64,
    pub requests_per_sec: f64,
    pub bytes_per_sec: f64,
    /// Latency percentiles, in seconds.
    pub p50: f64,
    pub p99: f64,
    /// Responses whose status was not 2xx or 3xx.
    pub non_2xx: u64,
    /// Connect, read, write errors and timeouts.
    pub socket_errors: u64,
}

/// What to ask wrk for.
pub struct Load<'a> {
    pub url: &'a str,
    pub host: &'a str,
    pub connections: u32,
    pub duration: Duration,
    pub close_each: bool,
}

pub fn run(load: &Load<'_>) -> anyhow::Result<WrkResult> {
    let mut cmd = Command::new("wrk");
    cmd.args(["-t2", &format!("-c{}", load.connections)])
        .arg(format!("-d{}s", load.duration.as_secs().max(1)))
        .args(["--latency", "-H", &format!("Host: {}", load.host)]);
    if load.close_each {
        cmd.args(["-H", "Connection: close"]);
    }
    let out = cmd
        .arg(load.url)
        .output()
        .context("could not start wrk; `cargo xtask setup` installs it")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "wrk against {} failed ({}): {}{}",
            load.url,
            out.status,
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    parse(&stdout).with_context(|| format!("reading wrk's report:\n{stdout}"))
}

/// Reads wrk's text report (run with `--latency`).
pub fn parse(text: &str) -> anyhow::Result<WrkResult> {
    let mut result = WrkResult::default();
    let (mut saw_rate, mut saw_p50, mut saw_p99) = (false, false, false);
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", rate] => {
                result.requests_per_sec = rate.parse().context("Requests/sec")?;
                saw_rate = true;
            }
            ["Transfer/sec:", rate] => result.bytes_per_sec = bytes(rate)?,
            ["50%", latency] => {
                result.p50 = seconds(latency)?;
                saw_p50 = true;
            }
            ["99%", latency] => {
                result.p99 = seconds(latency)?;
                saw_p99 = true;
            }
            [count, "requests", "in", ..] => {
                result.requests = count.parse().context("request count")?;
            }
            ["Non-2xx", "or", "3xx", "responses:", count] => {
                result.non_2xx = count.parse().context("Non-2xx count")?;
            }
            ["Socket", "errors:", rest @ ..] => {
                // connect 0, read 12, write 0, timeout 3
                for pair in rest.chunks(2) {
                    if let [_, count] = pair {
                        result.socket_errors += count
                            .trim_end_matches(',')
                            .parse::<u64>()
                            .context("socket errors")?;
                    }
                }
            }
            _ => {}
        }
    }
    if !(saw_rate && saw_p50 && saw_p99) {
        bail!("no Requests/sec or latency distribution (was wrk run with --latency?)");
    }
    Ok(result)
}

/// `12.41MB` → bytes (wrk's units are powers of 1024).
fn bytes(text: &str) -> anyhow::Result<f64> {
    let split = text
        .find(|c: char| c.is_ascii_alphabetic())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let scale = match unit {
        "" | "B" => 1.0,
        "KB" => 1024.0,
        "MB" => 1024.0 * 1024.0,
        "GB" => 1024.0 * 1024.0 * 1024.0,
        "TB" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => bail!("unknown size unit in `{text}`"),
    };
    Ok(number
        .parse::<f64>()
        .with_context(|| format!("size `{text}`"))?
        * scale)
}

/// `1.13ms` → seconds.
fn seconds(text: &str) -> anyhow::Result<f64> {
    let split = text
        .find(|c: char| c.is_ascii_alphabetic())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let scale = match unit {
        "us" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => bail!("unknown time unit in `{text}`"),
    };
    Ok(number
        .parse::<f64>()
        .with_context(|| format!("latency `{text}`"))?
        * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Captured from wrk 4.1.0 (Debian) against the bench nginx image, with errors added the
    /// way wrk prints them.
    const CAPTURED: &str = "Running 2s test @ http://198.18.0.2/100b
  2 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.44ms    1.02ms   8.45ms   82.36%
    Req/Sec    18.07k     2.53k   22.01k    60.00%
  Latency Distribution
     50%  873.00us
     75%    1.85ms
     90%    2.72ms
     99%    1.24s
  72167 requests in 2.02s, 25.05MB read
  Socket errors: connect 0, read 12, write 0, timeout 3
  Non-2xx or 3xx responses: 25
Requests/sec:  35755.28
Transfer/sec:     12.41MB
";

    #[test]
    fn parses_captured_output() {
        let r = parse(CAPTURED).unwrap();
        assert_eq!(r.requests, 72167);
        assert!((r.requests_per_sec - 35755.28).abs() < 1e-6);
        assert!((r.bytes_per_sec - 12.41 * 1024.0 * 1024.0).abs() < 1.0);
        assert!((r.p50 - 873e-6).abs() < 1e-12);
        assert!((r.p99 - 1.24).abs() < 1e-12);
        assert_eq!(r.non_2xx, 25);
        assert_eq!(r.socket_errors, 15);
    }

    #[test]
    fn refuses_output_without_latency_distribution() {
        assert!(parse("Requests/sec: 10\n").is_err());
        assert!(seconds("3parsec").is_err());
        assert!((bytes("1.50GB").unwrap() - 1.5 * 1024.0 * 1024.0 * 1024.0).abs() < 1.0);
    }
}
