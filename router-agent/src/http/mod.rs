//! HTTP/1.1 message heads: parsing, RFC 9112 validation on top of httparse, and the rewrite a
//! proxy owes the next hop. Pure code over byte buffers; the proxy does the I/O.
//!
//! httparse alone accepts things a proxy must not pass on (Content-Length with
//! Transfer-Encoding, duplicate Content-Length or Host, `+5` lengths, bare LF line ends), each a
//! request-smuggling vector; the checks here close them. What the router understood is what the
//! next hop gets: the framing headers it forwards are written by the router from its own reading
//! (one `Transfer-Encoding` or one `Content-Length`, canonical), never copied as received, so
//! that no recipient can frame the body differently.
pub mod chunked;
pub mod request;
pub mod response;

use std::ops::Range;

/// Headers per message; more is answered with 431.
pub const MAX_HEADERS: usize = 100;

/// Default bound on a request head (`max_head_bytes`), and on a chunked trailer section.
pub const DEFAULT_MAX_HEAD: usize = 64 * 1024;

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
    /// 501: a request coded with more than `chunked` (the router does not decode, and forwards
    /// only what it understood: exactly `Transfer-Encoding: chunked`).
    UnsupportedTransferCoding,
    /// 408
    HeadTimeout,
    /// 417: an `Expect` other than `100-continue` (RFC 9110 section 10.1.1).
    ExpectationFailed,
}

impl Reject {
    pub fn status(self) -> u16 {
        match self {
            Self::BadRequest(_) => 400,
            Self::UriTooLong => 414,
            Self::HeadersTooLarge => 431,
            Self::UnknownTransferCoding | Self::UnsupportedTransferCoding => 501,
            Self::HeadTimeout => 408,
            Self::ExpectationFailed => 417,
        }
    }

    /// A stable label for metrics and logs.
    pub fn reason(self) -> &'static str {
        match self {
            Self::BadRequest(reason) => reason,
            Self::UriTooLong => "request line too long",
            Self::HeadersTooLarge => "header section too large",
            Self::UnknownTransferCoding => "unknown transfer coding",
            Self::UnsupportedTransferCoding => "request transfer coding other than chunked",
            Self::HeadTimeout => "request head timeout",
            Self::ExpectationFailed => "unsupported expectation",
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
            max_head: DEFAULT_MAX_HEAD,
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
/// `Upgrade` is written anew when the router passes a WebSocket upgrade on; `HTTP2-Settings`
/// belongs to the h2c upgrade (RFC 7540 section 3.2.1), which the router never passes on.
/// Transfer-Encoding is hop-by-hop too; the router writes it itself (see [`is_framing`]).
fn is_hop_by_hop(name: &str) -> bool {
    [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "upgrade",
        "http2-settings",
    ]
    .iter()
    .any(|h| name.eq_ignore_ascii_case(h))
}

/// `Content-Length` and `Transfer-Encoding`: never copied from one hop to the next, but written
/// by the router from what it read, whatever `Connection` lists.
fn is_framing(name: &str) -> bool {
    name.eq_ignore_ascii_case("content-length") || name.eq_ignore_ascii_case("transfer-encoding")
}

/// What a message's `Transfer-Encoding` fields say, once validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct TransferCodings {
    /// `chunked` is the final coding.
    chunked: bool,
    /// A coding other than `chunked` is applied too (`gzip, chunked`).
    others: bool,
}

/// Transfer codings: what they are, or why they are refused. `chunked` must be the final coding
/// and appear once; codings we do not know get 501. Empty list elements (`, chunked`) are
/// allowed (RFC 9110 section 5.6.1) and skipped: only the router's reading is forwarded.
fn check_transfer_codings<'a>(
    values: impl Iterator<Item = &'a [u8]>,
) -> Result<TransferCodings, Reject> {
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
    let mut others = false;
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
            others |= !is_chunked;
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
    Ok(TransferCodings {
        chunked: last_is_chunked,
        others,
    })
}

/// Writes one canonical `Transfer-Encoding` field for these (validated) values: the codings in
/// order, lower case, without empty elements, in one field.
fn write_transfer_codings<'a>(out: &mut Vec<u8>, values: impl Iterator<Item = &'a [u8]>) {
    out.extend_from_slice(b"Transfer-Encoding: ");
    let mut first = true;
    for token in values.flat_map(list_tokens) {
        if !first {
            out.extend_from_slice(b", ");
        }
        out.extend(token.iter().map(u8::to_ascii_lowercase));
        first = false;
    }
    out.extend_from_slice(b"\r\n");
}

/// Writes `Content-Length: <n>` in plain decimal.
fn write_content_length(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(b"Content-Length: ");
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut rest = n;
    loop {
        i -= 1;
        // `rest % 10` is below 10.
        digits[i] = b'0' + u8::try_from(rest % 10).unwrap_or(0);
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
    out.extend_from_slice(b"\r\n");
}

/// Splits a Host field value (or an absolute-form target's authority) into host and port:
/// `uri-host [ ":" port ]` (RFC 9110 section 7.2), the host a reg-name, an IPv4 address or a
/// bracketed IPv6 literal. Once the colon is there, the port must be digits naming at most 65535:
/// an empty or out-of-range port names no TCP port, and a backend that read it otherwise (as no
/// port, or modulo 65536) would see another authority than the router routed by. The routing
/// table (`table::normalize_host`) reads hosts with this function too, so the two agree.
pub fn split_host_port(value: &[u8]) -> Result<(&[u8], Option<u16>), &'static str> {
    let (host, port) = if value.first() == Some(&b'[') {
        let close = value
            .iter()
            .position(|&b| b == b']')
            .ok_or("unclosed IPv6 literal in Host")?;
        let (host, rest) = value.split_at(close + 1);
        match rest {
            [] => (host, None),
            [b':', port @ ..] => (host, Some(port)),
            _ => return Err("junk after the IPv6 literal in Host"),
        }
    } else {
        match value.iter().rposition(|&b| b == b':') {
            Some(i) => (&value[..i], Some(&value[i + 1..])),
            None => (value, None),
        }
    };
    let bare = host.first() != Some(&b'[');
    if host.is_empty() || (bare && host.iter().any(|b| b":[]".contains(b))) {
        return Err("invalid Host");
    }
    let Some(port) = port else {
        return Ok((host, None));
    };
    if port.is_empty() {
        return Err("empty port in Host");
    }
    if !port.iter().all(u8::is_ascii_digit) {
        return Err("non-numeric port in Host");
    }
    let value = port.iter().fold(0u32, |n, d| {
        n.saturating_mul(10).saturating_add(u32::from(d - b'0'))
    });
    let port = u16::try_from(value).map_err(|_| "port above 65535 in Host")?;
    Ok((host, Some(port)))
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
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        414 => "URI Too Long",
        417 => "Expectation Failed",
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
    type CodingCase<'a> = (&'a [&'a [u8]], Result<TransferCodings, Reject>);

    const CHUNKED: TransferCodings = TransferCodings {
        chunked: true,
        others: false,
    };
    const CODED_CHUNKED: TransferCodings = TransferCodings {
        chunked: true,
        others: true,
    };
    const CODED: TransferCodings = TransferCodings {
        chunked: false,
        others: true,
    };

    #[test]
    fn transfer_codings() {
        let cases: &[CodingCase<'_>] = &[
            (&[b"chunked"], Ok(CHUNKED)),
            (&[b"Chunked"], Ok(CHUNKED)),
            // Empty list elements are allowed (RFC 9110 section 5.6.1) and mean nothing.
            (&[b",chunked"], Ok(CHUNKED)),
            (&[b" , chunked ,"], Ok(CHUNKED)),
            (&[b"", b"chunked"], Ok(CHUNKED)),
            (&[b"gzip, chunked"], Ok(CODED_CHUNKED)),
            (&[b"gzip", b"chunked"], Ok(CODED_CHUNKED)),
            (&[b"gzip"], Ok(CODED)),
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
            (
                &[b" , "],
                Err(Reject::BadRequest("empty Transfer-Encoding")),
            ),
        ];
        for (values, expected) in cases {
            assert_eq!(
                check_transfer_codings(values.iter().copied()),
                *expected,
                "{values:?}"
            );
        }
    }

    /// Valid Transfer-Encoding values and the one field the next hop gets.
    #[test]
    fn canonical_transfer_encoding() {
        let cases: &[(&[&[u8]], &str)] = &[
            (&[b"chunked"], "Transfer-Encoding: chunked\r\n"),
            (&[b",chunked"], "Transfer-Encoding: chunked\r\n"),
            (&[b"CHUNKED , "], "Transfer-Encoding: chunked\r\n"),
            (
                &[b"GZip", b"", b"chunked"],
                "Transfer-Encoding: gzip, chunked\r\n",
            ),
            (&[b"gzip,,chunked"], "Transfer-Encoding: gzip, chunked\r\n"),
        ];
        for (values, expected) in cases {
            let mut out = Vec::new();
            write_transfer_codings(&mut out, values.iter().copied());
            assert_eq!(String::from_utf8_lossy(&out), *expected, "{values:?}");
        }
    }

    #[test]
    fn canonical_content_length() {
        for (n, expected) in [
            (0, "Content-Length: 0\r\n"),
            (5, "Content-Length: 5\r\n"),
            (1_000_000, "Content-Length: 1000000\r\n"),
            (u64::MAX, "Content-Length: 18446744073709551615\r\n"),
        ] {
            let mut out = Vec::new();
            write_content_length(&mut out, n);
            assert_eq!(String::from_utf8_lossy(&out), expected);
        }
    }

    /// Host values: host and port, or why the value is refused (the reason goes into the
    /// rejection metric).
    type HostCase<'a> = (&'a str, Result<(&'a str, Option<u16>), &'a str>);

    #[test]
    fn host_and_port() {
        let cases: &[HostCase<'_>] = &[
            ("web.local", Ok(("web.local", None))),
            ("web.local:80", Ok(("web.local", Some(80)))),
            ("web.local:0080", Ok(("web.local", Some(80)))),
            ("web.local:65535", Ok(("web.local", Some(65535)))),
            ("198.18.0.2:8080", Ok(("198.18.0.2", Some(8080)))),
            ("[::1]", Ok(("[::1]", None))),
            ("[::1]:80", Ok(("[::1]", Some(80)))),
            ("web.local:", Err("empty port in Host")),
            ("web.local:65536", Err("port above 65535 in Host")),
            ("web.local:99999", Err("port above 65535 in Host")),
            (
                "web.local:99999999999999999999999",
                Err("port above 65535 in Host"),
            ),
            ("web.local:8o", Err("non-numeric port in Host")),
            ("web.local:-1", Err("non-numeric port in Host")),
            ("web.local:+80", Err("non-numeric port in Host")),
            ("web.local:80:80", Err("invalid Host")),
            ("::1", Err("invalid Host")),
            (":80", Err("invalid Host")),
            ("", Err("invalid Host")),
            ("[::1", Err("unclosed IPv6 literal in Host")),
            ("[::1]80", Err("junk after the IPv6 literal in Host")),
            ("[::1]:", Err("empty port in Host")),
            ("[::1]:70000", Err("port above 65535 in Host")),
            ("a]b", Err("invalid Host")),
        ];
        for (value, expected) in cases {
            let got = split_host_port(value.as_bytes())
                .map(|(host, port)| (std::str::from_utf8(host).unwrap(), port));
            assert_eq!(got, *expected, "{value:?}");
        }
    }

    #[test]
    fn bare_lf() {
        assert!(!has_bare_lf(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert!(has_bare_lf(b"GET / HTTP/1.1\nHost: a\r\n\r\n"));
        assert!(has_bare_lf(b"\n"));
    }
}
