//! Request heads: parse and validate a client's request head, and write the head the backend
//! receives (hop-by-hop headers dropped, the `CONTAINERID` cookie removed, `X-Forwarded-*` set,
//! framing, `Upgrade` and `Expect` written from the router's own reading).
use std::{mem::MaybeUninit, ops::Range};

use super::{
    BodyFraming, HeadLimits, MAX_HEADERS, Reject, check_transfer_codings, has_bare_lf, is_framing,
    is_hop_by_hop, list_tokens, lists_token, parse_content_length, range_in, split_host_port,
    trim_ows, write_content_length,
};

pub const STICKY_COOKIE: &str = "CONTAINERID";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Options,
    Patch,
    Trace,
    Other,
}

impl Method {
    fn from_token(token: &str) -> Self {
        match token {
            "GET" => Self::Get,
            "HEAD" => Self::Head,
            "POST" => Self::Post,
            "PUT" => Self::Put,
            "DELETE" => Self::Delete,
            "OPTIONS" => Self::Options,
            "PATCH" => Self::Patch,
            "TRACE" => Self::Trace,
            _ => Self::Other,
        }
    }

    /// RFC 9110 section 9.2.2: repeating the request has the effect of sending it once, so a
    /// request whose backend vanished before answering may go to another backend.
    pub fn is_idempotent(self) -> bool {
        matches!(
            self,
            Self::Get | Self::Head | Self::Put | Self::Delete | Self::Options | Self::Trace
        )
    }
}

/// What the proxy needs to know about a parsed request. Ranges index the input buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "each bool is an independent fact of the request head (version, keep-alive, upgrade, \
              expect), not states of one machine"
)]
pub struct RequestHead {
    pub method: Method,
    pub http10: bool,
    /// The target used for routing: the path of an absolute-form target, else the target.
    pub path: Range<usize>,
    pub host: Range<usize>,
    pub body: BodyFraming,
    /// The client wants the connection kept after this exchange.
    pub keep_alive: bool,
    /// A WebSocket upgrade (GET, HTTP/1.1, `Connection: upgrade`, `Upgrade` listing
    /// `websocket`): the only upgrade the router passes on, as `Upgrade: websocket`. Every other
    /// upgrade (h2c, TLS, ...) is stripped and the request served as plain HTTP/1.1, so that no
    /// backend can switch a connection to a protocol the router does not route request by
    /// request (h2c smuggling).
    pub upgrade: bool,
    /// `Expect: 100-continue` on an HTTP/1.1 request: forwarded, and the backend's `100 Continue`
    /// relayed. (In HTTP/1.0 it is ignored and not forwarded, RFC 9110 section 10.1.1.)
    pub expect_continue: bool,
    /// The value of the `CONTAINERID` cookie.
    pub sticky_id: Option<Range<usize>>,
    /// Bytes of the head in the input buffer; the body starts here.
    pub head_len: usize,
    /// Where the `http` of the `X-Forwarded-Proto` the router wrote ends in the rewritten head
    /// (`None` without forwarded headers): a route behind a TLS terminator makes it `https`.
    pub forwarded_proto_end: Option<usize>,
}

impl RequestHead {
    /// Says `X-Forwarded-Proto: https` in the rewritten head `out` (from [`parse`]): the route's
    /// clients came through a TLS terminator in front of the router.
    pub fn forward_as_https(&self, out: &mut Vec<u8>) {
        if let Some(end) = self.forwarded_proto_end {
            out.insert(end, b's');
        }
    }
}

/// Per-connection facts the rewritten head carries.
#[derive(Clone, Copy, Debug)]
pub struct ForwardContext<'a> {
    /// The client's address as text (formatted once per connection, not per request).
    pub client_ip: &'a str,
    /// Add `X-Forwarded-For/Proto/Host`.
    pub forwarded_headers: bool,
}

/// Connection options naming further headers to drop (RFC 9110 section 7.6.1); more are refused.
const MAX_CONNECTION_OPTIONS: usize = 8;

/// Parses the request head at the start of `buf`. `Ok(None)`: incomplete, read more. On success
/// `out` holds the head for the backend.
pub fn parse(
    buf: &[u8],
    limits: &HeadLimits,
    ctx: &ForwardContext<'_>,
    out: &mut Vec<u8>,
) -> Result<Option<RequestHead>, Reject> {
    match buf.iter().position(|&b| b == b'\n') {
        None if buf.len() > limits.max_request_line => return Err(Reject::UriTooLong),
        None => return Ok(None),
        Some(line_end) if line_end > limits.max_request_line => return Err(Reject::UriTooLong),
        Some(_) => {}
    }
    // Uninitialised: httparse writes only the headers it finds (100 empty ones would be 3 KiB
    // of stores per request).
    let mut headers = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let head_len = match req.parse_with_uninit_headers(buf, &mut headers) {
        Ok(httparse::Status::Complete(n)) if n > limits.max_head => {
            return Err(Reject::HeadersTooLarge);
        }
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= limits.max_head => {
            return Err(Reject::HeadersTooLarge);
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Reject::HeadersTooLarge),
        Err(e) => return Err(Reject::BadRequest(httparse_reason(e))),
    };
    if has_bare_lf(&buf[..head_len]) {
        return Err(Reject::BadRequest("bare LF line end"));
    }
    let method_token = req.method.expect("complete request has a method");
    let target = req.path.expect("complete request has a target").as_bytes();
    let http10 = req.version == Some(0);
    let method = Method::from_token(method_token);
    if method_token == "CONNECT" {
        return Err(Reject::BadRequest(
            "CONNECT is not served by a reverse proxy",
        ));
    }

    let facts = HeaderFacts::collect(buf, req.headers)?;
    let host_value = facts
        .host
        .clone()
        .ok_or(Reject::BadRequest("missing Host"))?;
    let host = &buf[host_value.clone()];
    if !is_valid_host(host) {
        return Err(Reject::BadRequest("invalid Host"));
    }
    // An absolute-form authority must equal Host (below), so this checks its port too.
    split_host_port(host).map_err(Reject::BadRequest)?;
    let path = routing_path(target, host, method)?;
    let path = range_in(buf, path);

    let body = match (facts.transfer_encoding, facts.content_length) {
        (true, Some(_)) => {
            return Err(Reject::BadRequest(
                "both Content-Length and Transfer-Encoding",
            ));
        }
        (true, None) if http10 => {
            return Err(Reject::BadRequest(
                "Transfer-Encoding in an HTTP/1.0 request",
            ));
        }
        (true, None) => {
            let codings = check_transfer_codings(
                req.headers
                    .iter()
                    .filter(|h| h.name.eq_ignore_ascii_case("transfer-encoding"))
                    .map(|h| h.value),
            )?;
            // A request body must be delimited (RFC 9112 section 6.3): without a final chunked
            // its length is unknowable.
            if !codings.chunked {
                return Err(Reject::BadRequest("request transfer coding is not chunked"));
            }
            // The backend gets exactly `Transfer-Encoding: chunked`; dropping a `gzip` before
            // it would change the body's meaning, so such a request is not served (RFC 9112
            // section 6.1: 501 for a coding the server does not implement).
            if codings.others {
                return Err(Reject::UnsupportedTransferCoding);
            }
            BodyFraming::Chunked
        }
        (false, Some(0) | None) => BodyFraming::None,
        (false, Some(n)) => BodyFraming::Length(n),
    };
    let keep_alive = if http10 {
        facts.connection_keep_alive && !facts.connection_close
    } else {
        !facts.connection_close
    };
    // RFC 9110 section 10.1.1: 417 for an expectation the router cannot meet (only
    // 100-continue is defined); the request never reaches a backend.
    if facts.expect_other {
        return Err(Reject::ExpectationFailed);
    }
    // RFC 6455 section 4.1: the opening handshake is a GET of HTTP/1.1 or later; an Upgrade in
    // HTTP/1.0 is ignored (RFC 9110 section 7.8).
    let upgrade =
        method == Method::Get && !http10 && facts.connection_upgrade && facts.upgrade_websocket;

    let mut head = RequestHead {
        method,
        http10,
        path,
        host: host_value,
        body,
        keep_alive,
        upgrade,
        expect_continue: facts.expect_continue && !http10,
        sticky_id: facts.sticky_id.clone(),
        head_len,
        forwarded_proto_end: None,
    };
    head.forwarded_proto_end = write_forwarded_head(buf, &req, &head, &facts, ctx, out);
    Ok(Some(head))
}

/// What the header section says, gathered in one pass.
#[derive(Default)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "one flag per header or Connection token seen; they combine freely, so no enum or \
              state machine fits"
)]
struct HeaderFacts {
    host: Option<Range<usize>>,
    content_length: Option<u64>,
    transfer_encoding: bool,
    connection_close: bool,
    connection_keep_alive: bool,
    connection_upgrade: bool,
    /// An `Upgrade` field lists `websocket`.
    upgrade_websocket: bool,
    expect_continue: bool,
    /// An `Expect` member other than `100-continue`.
    expect_other: bool,
    sticky_id: Option<Range<usize>>,
    /// Header names listed in Connection (to drop when forwarding).
    connection_options: Vec<Range<usize>>,
}

impl HeaderFacts {
    fn collect(buf: &[u8], headers: &[httparse::Header<'_>]) -> Result<Self, Reject> {
        let mut facts = Self::default();
        for header in headers {
            if header
                .value
                .iter()
                .any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f)
            {
                return Err(Reject::BadRequest("control character in a header value"));
            }
            let name = header.name;
            if name.eq_ignore_ascii_case("host") {
                if facts.host.is_some() {
                    return Err(Reject::BadRequest("duplicate Host"));
                }
                facts.host = Some(range_in(buf, trim_ows(header.value)));
            } else if name.eq_ignore_ascii_case("content-length") {
                if facts.content_length.is_some() {
                    return Err(Reject::BadRequest("duplicate Content-Length"));
                }
                facts.content_length = Some(
                    parse_content_length(header.value)
                        .ok_or(Reject::BadRequest("invalid Content-Length"))?,
                );
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                facts.transfer_encoding = true;
            } else if name.eq_ignore_ascii_case("connection") {
                for token in list_tokens(header.value) {
                    if token.eq_ignore_ascii_case(b"close") {
                        facts.connection_close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        facts.connection_keep_alive = true;
                    } else if token.eq_ignore_ascii_case(b"upgrade") {
                        facts.connection_upgrade = true;
                    } else if facts.connection_options.len() < MAX_CONNECTION_OPTIONS {
                        facts.connection_options.push(range_in(buf, token));
                    } else {
                        return Err(Reject::BadRequest("too many Connection options"));
                    }
                }
            } else if name.eq_ignore_ascii_case("upgrade") {
                facts.upgrade_websocket |= lists_token(header.value, "websocket");
            } else if name.eq_ignore_ascii_case("expect") {
                for token in list_tokens(header.value) {
                    if token.eq_ignore_ascii_case(b"100-continue") {
                        facts.expect_continue = true;
                    } else {
                        facts.expect_other = true;
                    }
                }
            } else if name.eq_ignore_ascii_case("cookie") && facts.sticky_id.is_none() {
                facts.sticky_id = sticky_cookie(header.value).map(|v| range_in(buf, v));
            }
        }
        Ok(facts)
    }

    fn names_option(&self, buf: &[u8], name: &str) -> bool {
        self.connection_options
            .iter()
            .any(|r| buf[r.clone()].eq_ignore_ascii_case(name.as_bytes()))
    }
}

/// The value of the `CONTAINERID` pair in a Cookie header.
fn sticky_cookie(value: &[u8]) -> Option<&[u8]> {
    value.split(|&b| b == b';').map(trim_ows).find_map(|pair| {
        let (name, v) = split_pair(pair)?;
        (name == STICKY_COOKIE.as_bytes()).then_some(v)
    })
}

fn split_pair(pair: &[u8]) -> Option<(&[u8], &[u8])> {
    let eq = pair.iter().position(|&b| b == b'=')?;
    Some((trim_ows(&pair[..eq]), trim_ows(&pair[eq + 1..])))
}

/// reg-name / IPv4 / `[IPv6]`, with an optional port: no spaces, slashes or other delimiters
/// that could make two parsers see different hosts.
fn is_valid_host(host: &[u8]) -> bool {
    !host.is_empty()
        && host
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"-._~:[]".contains(&b))
}

/// The path used for routing. An absolute-form target must name the same authority as Host
/// (RFC 9112 section 3.2.2), else two hops would route it differently.
fn routing_path<'a>(target: &'a [u8], host: &[u8], method: Method) -> Result<&'a [u8], Reject> {
    if target.first() == Some(&b'/') {
        return Ok(target);
    }
    // Asterisk-form belongs to OPTIONS alone (RFC 9112 section 3.2.4).
    if target == b"*" {
        return if method == Method::Options {
            Ok(target)
        } else {
            Err(Reject::BadRequest(
                "asterisk-form target on a method other than OPTIONS",
            ))
        };
    }
    let rest = strip_prefix_ignore_case(target, b"http://").ok_or(Reject::BadRequest(
        "request target is neither origin- nor absolute-form",
    ))?;
    let authority_end = rest
        .iter()
        .position(|&b| b == b'/' || b == b'?')
        .unwrap_or(rest.len());
    if !rest[..authority_end].eq_ignore_ascii_case(host) {
        return Err(Reject::BadRequest(
            "absolute-form authority differs from Host",
        ));
    }
    // May be empty (`http://host`): routing and forwarding read that as `/`.
    Ok(&rest[authority_end..])
}

fn strip_prefix_ignore_case<'a>(s: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    (s.len() >= prefix.len() && s[..prefix.len()].eq_ignore_ascii_case(prefix))
        .then(|| &s[prefix.len()..])
}

/// Writes the head the backend gets into `out`; returns where the `X-Forwarded-Proto` value
/// ends, if the router wrote one.
fn write_forwarded_head(
    buf: &[u8],
    req: &httparse::Request<'_, '_>,
    head: &RequestHead,
    facts: &HeaderFacts,
    ctx: &ForwardContext<'_>,
    out: &mut Vec<u8>,
) -> Option<usize> {
    out.clear();
    let path = &buf[head.path.clone()];
    out.extend_from_slice(req.method.unwrap_or("GET").as_bytes());
    out.push(b' ');
    // Absolute-form is sent on as origin-form: the backend is an origin server.
    if path != b"*" && path.first() != Some(&b'/') {
        out.push(b'/');
    }
    out.extend_from_slice(path);
    out.extend_from_slice(if head.http10 {
        b" HTTP/1.0\r\n"
    } else {
        b" HTTP/1.1\r\n"
    });
    let mut forwarded_for: Option<&[u8]> = None;
    for header in req.headers.iter() {
        let name = header.name;
        // Framing, `Upgrade` and `Expect` are written below from what the router understood.
        // Connection options never drop Host or framing: `Connection: Content-Length` must not
        // make the backend frame the body otherwise than the router did.
        if is_framing(name) || name.eq_ignore_ascii_case("expect") {
            continue;
        }
        let drop = is_hop_by_hop(name)
            || (!name.eq_ignore_ascii_case("host") && facts.names_option(buf, name))
            || (ctx.forwarded_headers
                && (name.eq_ignore_ascii_case("x-forwarded-proto")
                    || name.eq_ignore_ascii_case("x-forwarded-host")));
        if drop {
            continue;
        }
        if ctx.forwarded_headers && name.eq_ignore_ascii_case("x-forwarded-for") {
            forwarded_for = Some(header.value);
            continue;
        }
        if name.eq_ignore_ascii_case("cookie") {
            write_cookie_without_sticky(header.value, out);
            continue;
        }
        write_header(out, name.as_bytes(), header.value);
    }
    match (head.body, facts.content_length) {
        (BodyFraming::Chunked, _) => out.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
        (_, Some(n)) => write_content_length(out, n),
        (_, None) => {}
    }
    if head.expect_continue {
        out.extend_from_slice(b"Expect: 100-continue\r\n");
    }
    if head.upgrade {
        out.extend_from_slice(b"Upgrade: websocket\r\nConnection: Upgrade\r\n");
    }
    if ctx.forwarded_headers {
        out.extend_from_slice(b"X-Forwarded-For: ");
        if let Some(previous) = forwarded_for {
            out.extend_from_slice(previous);
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(ctx.client_ip.as_bytes());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(b"X-Forwarded-Proto: http");
        let proto_end = out.len();
        out.extend_from_slice(b"\r\n");
        write_header(out, b"X-Forwarded-Host", &buf[head.host.clone()]);
        out.extend_from_slice(b"\r\n");
        return Some(proto_end);
    }
    out.extend_from_slice(b"\r\n");
    None
}

fn write_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// The router's cookie is the router's: the backend gets the other cookies only.
fn write_cookie_without_sticky(value: &[u8], out: &mut Vec<u8>) {
    let mut first = true;
    for pair in value
        .split(|&b| b == b';')
        .map(trim_ows)
        .filter(|p| !p.is_empty())
    {
        if split_pair(pair).is_some_and(|(name, _)| name == STICKY_COOKIE.as_bytes()) {
            continue;
        }
        out.extend_from_slice(if first { b"Cookie: " } else { b"; " });
        out.extend_from_slice(pair);
        first = false;
    }
    if !first {
        out.extend_from_slice(b"\r\n");
    }
}

fn httparse_reason(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => "invalid header value",
        httparse::Error::NewLine => "invalid line end",
        httparse::Error::Status => "invalid status",
        httparse::Error::Token => "invalid method or token",
        httparse::Error::TooManyHeaders => "too many headers",
        httparse::Error::Version => "invalid HTTP version",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CTX: ForwardContext<'static> = ForwardContext {
        client_ip: "198.18.0.7",
        forwarded_headers: true,
    };

    fn parse_all(raw: &[u8]) -> (Result<Option<RequestHead>, Reject>, String) {
        let mut out = Vec::new();
        let result = parse(raw, &HeadLimits::default(), &CTX, &mut out);
        (result, String::from_utf8_lossy(&out).into_owned())
    }

    fn ok(raw: &[u8]) -> (RequestHead, String) {
        let (result, out) = parse_all(raw);
        let head = result
            .unwrap_or_else(|e| panic!("{:?}: {e:?}", String::from_utf8_lossy(raw)))
            .expect("complete");
        (head, out)
    }

    #[test]
    fn simple_get() {
        let raw = b"GET /a?b=1 HTTP/1.1\r\nHost: Web.local:8080\r\nAccept: */*\r\n\r\nNEXT";
        let (head, out) = ok(raw);
        assert_eq!(head.method, Method::Get);
        assert_eq!(&raw[head.host.clone()], b"Web.local:8080");
        assert_eq!(&raw[head.path.clone()], b"/a?b=1");
        assert_eq!(head.body, BodyFraming::None);
        assert!(head.keep_alive);
        assert_eq!(head.head_len, raw.len() - 4);
        assert_eq!(
            out,
            "GET /a?b=1 HTTP/1.1\r\nHost: Web.local:8080\r\nAccept: */*\r\n\
             X-Forwarded-For: 198.18.0.7\r\nX-Forwarded-Proto: http\r\n\
             X-Forwarded-Host: Web.local:8080\r\n\r\n"
        );
    }

    #[test]
    fn incomplete_heads_ask_for_more() {
        for raw in [
            &b"GET / HT"[..],
            b"GET / HTTP/1.1\r\nHost: a",
            b"GET / HTTP/1.1\r\nHost: a\r\n\r",
        ] {
            assert_eq!(parse_all(raw).0, Ok(None), "{raw:?}");
        }
    }

    #[test]
    fn framing_and_connection() {
        let cases: &[(&[u8], BodyFraming, bool)] = &[
            (
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n",
                BodyFraming::Length(5),
                true,
            ),
            (
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
                BodyFraming::None,
                true,
            ),
            (
                b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
                BodyFraming::Chunked,
                true,
            ),
            (
                b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
                BodyFraming::None,
                false,
            ),
            (
                b"GET / HTTP/1.0\r\nHost: a\r\n\r\n",
                BodyFraming::None,
                false,
            ),
            (
                b"GET / HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n",
                BodyFraming::None,
                true,
            ),
        ];
        for (raw, body, keep_alive) in cases {
            let (head, _) = ok(raw);
            assert_eq!(
                (head.body, head.keep_alive),
                (*body, *keep_alive),
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    #[test]
    fn sticky_cookie_is_read_and_removed() {
        let raw = b"GET / HTTP/1.1\r\nHost: a\r\nCookie: x=1; CONTAINERID=abc123; y=2\r\n\r\n";
        let (head, out) = ok(raw);
        assert_eq!(&raw[head.sticky_id.clone().unwrap()], b"abc123");
        assert!(out.contains("Cookie: x=1; y=2\r\n"), "{out}");
        assert!(!out.contains("CONTAINERID"), "{out}");

        let raw = b"GET / HTTP/1.1\r\nHost: a\r\nCookie: CONTAINERID=abc\r\n\r\n";
        let (_, out) = ok(raw);
        assert!(!out.contains("Cookie"), "{out}");
    }

    #[test]
    fn hop_by_hop_headers_are_dropped() {
        let raw = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-Secret\r\n\
                    Keep-Alive: 5\r\nX-Secret: 1\r\nTE: trailers\r\nProxy-Connection: x\r\n\
                    X-Forwarded-For: 1.2.3.4\r\nX-Forwarded-Proto: https\r\nX-Other: y\r\n\r\n";
        let (_, out) = ok(raw);
        for gone in [
            "Connection",
            "Keep-Alive",
            "X-Secret",
            "TE:",
            "Proxy-Connection",
            "https",
        ] {
            assert!(!out.contains(gone), "{gone} forwarded: {out}");
        }
        assert!(out.contains("X-Other: y\r\n"));
        assert!(
            out.contains("X-Forwarded-For: 1.2.3.4, 198.18.0.7\r\n"),
            "{out}"
        );
    }

    /// The framing lines of a forwarded head, in order.
    fn framing_lines(out: &str) -> Vec<&str> {
        out.split("\r\n")
            .filter(|line| {
                let name = line.split(':').next().unwrap_or_default();
                is_framing(name)
            })
            .collect()
    }

    /// The framing headers the backend gets are the router's reading, written once and
    /// canonically, whatever the client wrote (issue 9, finding 7).
    #[test]
    fn framing_is_forwarded_as_understood() {
        let cases: &[(&[u8], &[&str])] = &[
            (
                b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
                &["Transfer-Encoding: chunked"],
            ),
            // An empty list element (RFC 9110 section 5.6.1): the router reads chunked, so the
            // backend must not get a value it could read otherwise.
            (
                b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: ,chunked\r\n\r\n",
                &["Transfer-Encoding: chunked"],
            ),
            (
                b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: CHUNKED , \r\n\r\n",
                &["Transfer-Encoding: chunked"],
            ),
            (
                b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: \r\nTransfer-Encoding: chunked\r\n\r\n",
                &["Transfer-Encoding: chunked"],
            ),
            (
                b"POST / HTTP/1.1\r\nHost: a\r\ntransfer-encoding: chunked\r\n\r\n",
                &["Transfer-Encoding: chunked"],
            ),
            (
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n",
                &["Content-Length: 5"],
            ),
            (
                b"POST / HTTP/1.1\r\nHost: a\r\ncontent-length:  005 \r\n\r\n",
                &["Content-Length: 5"],
            ),
            (
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
                &["Content-Length: 0"],
            ),
            (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", &[]),
            // Connection options name hop-by-hop fields; framing is not theirs to drop.
            (
                b"POST / HTTP/1.1\r\nHost: a\r\nConnection: Transfer-Encoding\r\nTransfer-Encoding: chunked\r\n\r\n",
                &["Transfer-Encoding: chunked"],
            ),
            (
                b"POST / HTTP/1.1\r\nHost: a\r\nConnection: content-length\r\nContent-Length: 5\r\n\r\n",
                &["Content-Length: 5"],
            ),
        ];
        for (raw, expected) in cases {
            let (_, out) = ok(raw);
            assert_eq!(
                framing_lines(&out),
                *expected,
                "{:?} -> {out:?}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    #[test]
    fn host_is_not_a_connection_option() {
        let (_, out) =
            ok(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Host, X-Gone\r\nX-Gone: 1\r\n\r\n");
        assert!(out.contains("\r\nHost: a\r\n"), "{out}");
        assert!(!out.contains("X-Gone"), "{out}");
    }

    /// Upgrade requests: whether the router passes a WebSocket upgrade on, and what of the
    /// upgrade the backend sees (issue 9, finding 8: h2c smuggling).
    #[test]
    fn only_websocket_upgrades_are_passed_on() {
        const WS: &str = "Upgrade: websocket\r\nConnection: Upgrade\r\n";
        // (request, passed on as a WebSocket upgrade)
        let cases: &[(&[u8], bool)] = &[
            (
                b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
                true,
            ),
            (
                b"GET /ws HTTP/1.1\r\nHost: a\r\nconnection: keep-alive, upgrade\r\nupgrade: WebSocket\r\n\r\n",
                true,
            ),
            // Several protocols offered: only websocket is kept.
            (
                b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: h2c, websocket\r\n\r\n",
                true,
            ),
            (
                b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: h2c\r\nUpgrade: websocket\r\n\r\n",
                true,
            ),
            // h2c (RFC 7540 section 3.2): stripped with its HTTP2-Settings, served as HTTP/1.1.
            (
                b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n",
                false,
            ),
            (
                b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n",
                false,
            ),
            (
                b"OPTIONS * HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: TLS/1.2\r\n\r\n",
                false,
            ),
            (
                b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: foo/2\r\n\r\n",
                false,
            ),
            // A WebSocket handshake is a GET (RFC 6455 section 4.1).
            (
                b"POST /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nContent-Length: 0\r\n\r\n",
                false,
            ),
            // Upgrade is HTTP/1.1 (RFC 9110 section 7.8: ignored in HTTP/1.0).
            (
                b"GET /ws HTTP/1.0\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
                false,
            ),
            // Upgrade without the Connection token, and the token without Upgrade.
            (
                b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n",
                false,
            ),
            (
                b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\n\r\n",
                false,
            ),
        ];
        for (raw, websocket) in cases {
            let (head, out) = ok(raw);
            let shown = String::from_utf8_lossy(raw);
            assert_eq!(head.upgrade, *websocket, "{shown:?}");
            let lower = out.to_ascii_lowercase();
            if *websocket {
                assert_eq!(out.matches(WS).count(), 1, "{shown:?} -> {out:?}");
                assert_eq!(lower.matches("upgrade:").count(), 1, "{shown:?} -> {out:?}");
            } else {
                for gone in ["upgrade", "http2-settings", "connection"] {
                    assert!(!lower.contains(gone), "{gone}: {shown:?} -> {out:?}");
                }
            }
        }
    }

    /// `Expect` (RFC 9110 section 10.1.1): 100-continue is passed on in HTTP/1.1, ignored in
    /// HTTP/1.0; any other expectation is 417.
    #[test]
    fn expectations() {
        // (request, Ok(forwarded with `Expect: 100-continue`) or the status)
        let cases: &[(&[u8], Result<bool, u16>)] = &[
            (
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
                Ok(true),
            ),
            (
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-Continue\r\n\r\n",
                Ok(true),
            ),
            (
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\nExpect: 100-continue\r\n\r\n",
                Ok(true),
            ),
            (
                b"POST / HTTP/1.0\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
                Ok(false),
            ),
            // An empty list holds no expectation.
            (
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: \r\n\r\n",
                Ok(false),
            ),
            (
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: something-else\r\n\r\n",
                Err(417),
            ),
            (
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue, x\r\n\r\n",
                Err(417),
            ),
            (
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue=1\r\n\r\n",
                Err(417),
            ),
            (
                b"GET / HTTP/1.0\r\nHost: a\r\nExpect: foo\r\n\r\n",
                Err(417),
            ),
        ];
        for (raw, expected) in cases {
            let (result, out) = parse_all(raw);
            let got = match result {
                Ok(Some(head)) => {
                    let forwarded = out.to_ascii_lowercase().matches("expect:").count();
                    assert_eq!(
                        forwarded,
                        usize::from(head.expect_continue),
                        "{:?} -> {out:?}",
                        String::from_utf8_lossy(raw)
                    );
                    Ok(head.expect_continue)
                }
                Ok(None) => panic!("incomplete: {:?}", String::from_utf8_lossy(raw)),
                Err(reject) => Err(reject.status()),
            };
            assert_eq!(got, *expected, "{:?}", String::from_utf8_lossy(raw));
        }
        assert_eq!(
            parse_all(b"GET / HTTP/1.1\r\nHost: a\r\nExpect: x\r\n\r\n").0,
            Err(Reject::ExpectationFailed)
        );
    }

    #[test]
    fn asterisk_form_only_for_options() {
        let raw = b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n";
        let (head, out) = ok(raw);
        assert_eq!(&raw[head.path.clone()], b"*");
        assert!(out.starts_with("OPTIONS * HTTP/1.1\r\n"), "{out}");
    }

    #[test]
    fn absolute_form() {
        let raw = b"GET http://a.local/x?y HTTP/1.1\r\nHost: a.local\r\n\r\n";
        let (head, out) = ok(raw);
        assert_eq!(&raw[head.path.clone()], b"/x?y");
        assert_eq!(&raw[head.host.clone()], b"a.local");
        assert!(out.starts_with("GET /x?y HTTP/1.1\r\n"), "{out}");
        let raw = b"GET http://a.local HTTP/1.1\r\nHost: a.local\r\n\r\n";
        let (_, out) = ok(raw);
        assert!(out.starts_with("GET / HTTP/1.1\r\n"), "{out}");
        let raw = b"GET HTTP://A.local?q HTTP/1.1\r\nHost: a.local\r\n\r\n";
        let (_, out) = ok(raw);
        assert!(out.starts_with("GET /?q HTTP/1.1\r\n"), "{out}");
    }

    /// Every row: the bytes, the status the router must answer.
    #[test]
    fn rejected_requests() {
        let long_target = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(9000));
        let long_header = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n",
            "a".repeat(70000)
        );
        let many_headers = format!(
            "GET / HTTP/1.1\r\nHost: a\r\n{}\r\n",
            "X: y\r\n".repeat(101)
        );
        let cases: Vec<(&[u8], u16)> = vec![
            (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x5\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: \r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: foo\r\n\r\n", 501),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
            (b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", 400),
            // Ports that name no TCP port (issue 9, finding 7).
            (b"GET / HTTP/1.1\r\nHost: a:99999\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: a:65536\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: a:\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: a:8o\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: a:80:80\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: [::1]x\r\n\r\n", 400),
            (b"GET http://a:99999/ HTTP/1.1\r\nHost: a:99999\r\n\r\n", 400),
            (b"GET http://a:/ HTTP/1.1\r\nHost: a:\r\n\r\n", 400),
            (b"GET http://a:99999/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: a\r\nExpect: something-else\r\n\r\n", 417),
            (b"GET http://b/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            (b"GET / HTTP/1.1\nHost: a\n\n", 400),
            (b"GET / HTTP/1.1\r\nHost: a\nX: y\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x7fb\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: a\r\nX y: z\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: a\r\n: z\r\n\r\n", 400),
            (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 400),
            (b"G@T / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            (b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            (b"GET foo HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            (b"GET * HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            (b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", 400),
            (long_target.as_bytes(), 414),
            (long_header.as_bytes(), 431),
            (many_headers.as_bytes(), 431),
        ];
        for (raw, status) in cases {
            let (result, _) = parse_all(raw);
            let got = result.map_err(Reject::status);
            assert_eq!(
                got.err(),
                Some(status),
                "{:?}",
                String::from_utf8_lossy(&raw[..raw.len().min(120)])
            );
        }
    }

    #[test]
    fn partial_head_over_the_limit_is_431() {
        let raw = format!("GET / HTTP/1.1\r\nHost: a\r\nX: {}", "a".repeat(70000));
        assert_eq!(parse_all(raw.as_bytes()).0, Err(Reject::HeadersTooLarge));
        let raw = "GET /".to_owned() + &"a".repeat(9000);
        assert_eq!(parse_all(raw.as_bytes()).0, Err(Reject::UriTooLong));
    }

    #[test]
    fn a_route_behind_tls_forwards_proto_https() {
        let mut out = Vec::new();
        let buf = b"GET / HTTP/1.1\r\nHost: web.local\r\nX-Forwarded-Proto: ftp\r\n\r\n";
        let ctx = ForwardContext {
            client_ip: "198.18.0.7",
            forwarded_headers: true,
        };
        let head = parse(buf, &HeadLimits::default(), &ctx, &mut out)
            .expect("valid")
            .expect("complete");
        head.forward_as_https(&mut out);
        let text = String::from_utf8(out).expect("utf-8");
        assert!(
            text.contains("\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: web.local\r\n\r\n"),
            "{text}"
        );
        assert!(!text.contains("ftp"), "{text}");
    }
}
