//! HTTP/1.1 message heads: parsing, RFC 9112 validation on top of httparse, and the rewrite a
//! proxy owes the next hop. Pure code over byte buffers; the proxy does the I/O.
//!
//! httparse alone accepts things a proxy must not pass on (Content-Length with
//! Transfer-Encoding, duplicate Content-Length or Host, `+5` lengths, bare LF line ends), each a
//! request-smuggling vector; the checks here close them.
pub mod chunked;
pub mod request;
pub mod response;

use std::ops::Range;

/// Headers per message; more is answered with 431.
pub const MAX_HEADERS: usize = 100;

/// How a message body is delimited on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyFraming {
    None,
    Length(u64),
    Chunked,
    /// Response only: the body runs until the backend closes.
    UntilClose,
}

/// Why the router refuses a request; each maps to one status of DESIGN.md.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reject {
    /// 400, with a short reason for logs and metrics.
    BadRequest(&'static str),
    /// 414
    UriTooLong,
    /// 431
    HeadersTooLarge,
    /// 501
    UnknownTransferCoding,
    /// 408
    HeadTimeout,
}

impl Reject {
    pub fn status(self) -> u16 {
        match self {
            Self::BadRequest(_) => 400,
            Self::UriTooLong => 414,
            Self::HeadersTooLarge => 431,
            Self::UnknownTransferCoding => 501,
            Self::HeadTimeout => 408,
        }
    }

    /// A stable label for metrics and logs.
    pub fn reason(self) -> &'static str {
        match self {
            Self::BadRequest(reason) => reason,
            Self::UriTooLong => "request line too long",
            Self::HeadersTooLarge => "header section too large",
            Self::UnknownTransferCoding => "unknown transfer coding",
            Self::HeadTimeout => "request head timeout",
        }
    }
}

/// Limits on a request head, from the configuration.
#[derive(Clone, Copy, Debug)]
pub struct HeadLimits {
    pub max_request_line: usize,
    pub max_head: usize,
}

impl Default for HeadLimits {
    fn default() -> Self {
        Self {
            max_request_line: 8 * 1024,
            max_head: 64 * 1024,
        }
    }
}

/// The position of `part` (a sub-slice handed out by httparse) inside `buf`.
fn range_in(buf: &[u8], part: &[u8]) -> Range<usize> {
    let start = part.as_ptr() as usize - buf.as_ptr() as usize;
    debug_assert!(start + part.len() <= buf.len());
    start..start + part.len()
}

/// Bare LF as a line end is not HTTP/1.1 (RFC 9112 section 2.2): senders and recipients that
/// disagree about it disagree about where headers end.
fn has_bare_lf(head: &[u8]) -> bool {
    // memchr jumps from line end to line end (SIMD) instead of testing every byte.
    memchr::memchr_iter(b'\n', head).any(|i| i == 0 || head[i - 1] != b'\r')
}

/// `Content-Length`: 1*DIGIT, nothing else (no sign, no list, no hex, no spaces inside).
fn parse_content_length(value: &[u8]) -> Option<u64> {
    let value = trim_ows(value);
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

fn trim_ows(mut value: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = value {
        value = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = value {
        value = rest;
    }
    value
}

/// Iterates the comma-separated tokens of a list header, trimmed, skipping empty elements.
fn list_tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(trim_ows)
        .filter(|t| !t.is_empty())
}

/// Whether a Connection header value lists `token` (case-insensitive).
fn lists_token(value: &[u8], token: &str) -> bool {
    list_tokens(value).any(|t| t.eq_ignore_ascii_case(token.as_bytes()))
}

/// Header names that belong to one hop only (RFC 9110 section 7.6.1); never forwarded as-is.
/// Transfer-Encoding is hop-by-hop too, but the router relays chunked bodies unchanged, so the
/// header travels with them.
fn is_hop_by_hop(name: &str) -> bool {
    [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "upgrade",
    ]
    .iter()
    .any(|h| name.eq_ignore_ascii_case(h))
}

/// Transfer codings: returns whether the message is chunked, or why it is refused.
/// `chunked` must be the final coding and appear once; codings we do not know get 501.
fn check_transfer_codings<'a>(values: impl Iterator<Item = &'a [u8]>) -> Result<bool, Reject> {
    const KNOWN: &[&str] = &[
        "chunked",
        "gzip",
        "x-gzip",
        "deflate",
        "compress",
        "x-compress",
    ];
    let mut chunked_seen = false;
    let mut last_is_chunked = false;
    let mut any = false;
    for value in values {
        for token in list_tokens(value) {
            any = true;
            // Transfer-coding parameters (`;q=`) are not allowed on chunked and rare elsewhere.
            let name = token;
            if !KNOWN
                .iter()
                .any(|k| name.eq_ignore_ascii_case(k.as_bytes()))
            {
                return Err(Reject::UnknownTransferCoding);
            }
            let is_chunked = name.eq_ignore_ascii_case(b"chunked");
            if is_chunked && chunked_seen {
                return Err(Reject::BadRequest("chunked applied twice"));
            }
            chunked_seen |= is_chunked;
            last_is_chunked = is_chunked;
        }
    }
    if !any {
        return Err(Reject::BadRequest("empty Transfer-Encoding"));
    }
    if chunked_seen && !last_is_chunked {
        return Err(Reject::BadRequest(
            "chunked is not the final transfer coding",
        ));
    }
    Ok(last_is_chunked)
}

/// The router's own answers (errors), written in full with `Connection: close` where DESIGN.md
/// says the connection ends after it.
pub fn error_response(status: u16, close: bool) -> Vec<u8> {
    let reason = status_reason(status);
    let body = format!("{status} {reason}\n");
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{}Server: router-agent\r\n\r\n{body}",
        body.len(),
        if close { "Connection: close\r\n" } else { "" },
    )
    .into_bytes()
}

/// 503 with `Retry-After`: the backends or the agent are busy, not broken.
pub fn retry_later_response(retry_after_seconds: u32) -> Vec<u8> {
    let body = "503 Service Unavailable: busy, retry later\n";
    format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nRetry-After: {retry_after_seconds}\r\nConnection: close\r\nServer: router-agent\r\n\r\n{body}",
        body.len(),
    )
    .into_bytes()
}

pub fn status_reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        408 => "Request Timeout",
        414 => "URI Too Long",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_length_values() {
        let cases: &[(&[u8], Option<u64>)] = &[
            (b"0", Some(0)),
            (b"5", Some(5)),
            (b" 42 ", Some(42)),
            (b"18446744073709551615", None),
            (b"9999999999999999999", Some(9_999_999_999_999_999_999)),
            (b"+5", None),
            (b"-1", None),
            (b"0x5", None),
            (b"", None),
            (b"5, 5", None),
            (b"5 5", None),
            (b"1e3", None),
        ];
        for (value, expected) in cases {
            assert_eq!(
                parse_content_length(value),
                *expected,
                "{:?}",
                String::from_utf8_lossy(value)
            );
        }
    }

    /// Transfer-Encoding field values and the verdict on them.
    type CodingCase<'a> = (&'a [&'a [u8]], Result<bool, Reject>);

    #[test]
    fn transfer_codings() {
        let cases: &[CodingCase<'_>] = &[
            (&[b"chunked"], Ok(true)),
            (&[b"Chunked"], Ok(true)),
            (&[b"gzip, chunked"], Ok(true)),
            (&[b"gzip", b"chunked"], Ok(true)),
            (&[b"gzip"], Ok(false)),
            (
                &[b"chunked, gzip"],
                Err(Reject::BadRequest(
                    "chunked is not the final transfer coding",
                )),
            ),
            (
                &[b"chunked, chunked"],
                Err(Reject::BadRequest("chunked applied twice")),
            ),
            (
                &[b"chunked", b"chunked"],
                Err(Reject::BadRequest("chunked applied twice")),
            ),
            (&[b"identity"], Err(Reject::UnknownTransferCoding)),
            (&[b"foo, chunked"], Err(Reject::UnknownTransferCoding)),
            (&[b"chunked;q=1"], Err(Reject::UnknownTransferCoding)),
            (&[b""], Err(Reject::BadRequest("empty Transfer-Encoding"))),
        ];
        for (values, expected) in cases {
            assert_eq!(
                check_transfer_codings(values.iter().copied()),
                *expected,
                "{values:?}"
            );
        }
    }

    #[test]
    fn bare_lf() {
        assert!(!has_bare_lf(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert!(has_bare_lf(b"GET / HTTP/1.1\nHost: a\r\n\r\n"));
        assert!(has_bare_lf(b"\n"));
    }
}
