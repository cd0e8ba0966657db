//! Response heads: validate what a backend answered and write the head the client receives
//! (hop-by-hop headers dropped, framing written from the router's own reading).
use std::mem::MaybeUninit;

use super::{
    BodyFraming, MAX_HEADERS, check_transfer_codings, has_bare_lf, is_framing, is_hop_by_hop,
    list_tokens, parse_content_length, write_content_length, write_transfer_codings,
};
use crate::http::request::STICKY_COOKIE;

/// Largest response head accepted from a backend.
pub const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// The backend's head cannot be relayed safely: the client gets 502.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InvalidResponse(pub &'static str);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    pub body: BodyFraming,
    /// The backend connection may carry another request after this response.
    pub backend_keep_alive: bool,
    /// The client connection ends after this response.
    pub close_client: bool,
    pub head_len: usize,
}

impl ResponseHead {
    /// 1xx other than 101: the final response follows.
    pub fn is_interim(&self) -> bool {
        (100..200).contains(&self.status) && self.status != 101
    }
}

/// How the client side wants the head written.
#[derive(Clone, Copy, Debug)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "each bool is an independent fact of the request being answered (method, \
              keep-alive, version, upgrade), not states of one machine"
)]
pub struct ClientSide<'a> {
    pub request_was_head: bool,
    /// The client asked for keep-alive (and the router is not shutting down).
    pub keep_alive: bool,
    pub http10: bool,
    /// Container id to pin with `Set-Cookie: CONTAINERID=...`.
    pub set_sticky: Option<&'a str>,
    /// The forwarded request asked to upgrade to WebSocket (the only upgrade the router passes
    /// on). Only then is a `101 Switching Protocols` naming `websocket` a valid answer; any other
    /// 101 is an invalid response (502), never a tunnel.
    pub websocket_upgrade: bool,
}

/// Parses a backend's response head; `Ok(None)` means read more.
pub fn parse(
    buf: &[u8],
    client: &ClientSide<'_>,
    out: &mut Vec<u8>,
) -> Result<Option<ResponseHead>, InvalidResponse> {
    // Uninitialised, as for requests: httparse writes only the headers it finds.
    let mut headers = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut []);
    let head_len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut res,
        buf,
        &mut headers,
    ) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_RESPONSE_HEAD => {
            return Err(InvalidResponse("response head too large"));
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(InvalidResponse("malformed response head")),
    };
    if has_bare_lf(&buf[..head_len]) {
        return Err(InvalidResponse("bare LF in response head"));
    }
    let status = res.code.expect("complete response has a status");
    let backend_http10 = res.version == Some(0);

    let mut content_length = None;
    let mut transfer_encoding = false;
    let mut connection_close = false;
    let mut connection_keep_alive = false;
    let mut upgrade_websocket = false;
    let mut upgrade_other = false;
    for header in res.headers.iter() {
        if header.name.eq_ignore_ascii_case("content-length") {
            let n = parse_content_length(header.value)
                .ok_or(InvalidResponse("invalid Content-Length"))?;
            if content_length.is_some_and(|m| m != n) {
                return Err(InvalidResponse("conflicting Content-Length"));
            }
            content_length = Some(n);
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            transfer_encoding = true;
        } else if header.name.eq_ignore_ascii_case("connection") {
            for token in list_tokens(header.value) {
                connection_close |= token.eq_ignore_ascii_case(b"close");
                connection_keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if header.name.eq_ignore_ascii_case("upgrade") {
            for token in list_tokens(header.value) {
                let websocket = token.eq_ignore_ascii_case(b"websocket");
                upgrade_websocket |= websocket;
                upgrade_other |= !websocket;
            }
        }
    }
    // RFC 9110 section 15.2.2: a server switches only to a protocol the client asked for, and
    // names it in Upgrade. A 101 the client did not ask for would turn the connection into a
    // tunnel past the router's routing and checks.
    if status == 101 {
        if !client.websocket_upgrade {
            return Err(InvalidResponse(
                "101 to a request that asked for no upgrade",
            ));
        }
        if !upgrade_websocket || upgrade_other {
            return Err(InvalidResponse(
                "101 switching to another protocol than the websocket asked for",
            ));
        }
    }
    if transfer_encoding && content_length.is_some() {
        return Err(InvalidResponse("both Content-Length and Transfer-Encoding"));
    }
    let codings = transfer_encoding.then(|| {
        check_transfer_codings(
            res.headers
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case("transfer-encoding"))
                .map(|h| h.value),
        )
    });
    let body = if client.request_was_head || status == 204 || status == 304 || status < 200 {
        BodyFraming::None
    } else if let Some(codings) = codings {
        let chunked = codings
            .map_err(|_| InvalidResponse("invalid Transfer-Encoding"))?
            .chunked;
        if chunked {
            BodyFraming::Chunked
        } else {
            BodyFraming::UntilClose
        }
    } else {
        match content_length {
            Some(0) => BodyFraming::None,
            Some(n) => BodyFraming::Length(n),
            None => BodyFraming::UntilClose,
        }
    };
    let backend_keep_alive = body != BodyFraming::UntilClose
        && if backend_http10 {
            connection_keep_alive && !connection_close
        } else {
            !connection_close
        };
    let close_client = status != 101 && (!client.keep_alive || body == BodyFraming::UntilClose);

    // What the client is told about the body: the router's reading, in one canonical field.
    // 1xx and 204 have no body and carry no framing (RFC 9110 section 8.6, RFC 9112 section
    // 6.1); for HEAD and 304 the fields describe the representation and go on, normalised (a
    // Transfer-Encoding the router could not read is dropped there; with a body it is a 502).
    let framing = match codings {
        _ if status < 200 || status == 204 => Framing::Omitted,
        Some(Ok(_)) => Framing::Codings,
        Some(Err(_)) => Framing::Omitted,
        None => content_length.map_or(Framing::Omitted, Framing::Length),
    };

    let head = ResponseHead {
        status,
        body,
        backend_keep_alive,
        close_client,
        head_len,
    };
    write_client_head(buf, &res, &head, framing, client, out);
    Ok(Some(head))
}

/// The framing field the client gets.
#[derive(Clone, Copy, Debug)]
enum Framing {
    Omitted,
    Length(u64),
    /// The backend's (validated) `Transfer-Encoding` codings, in one field.
    Codings,
}

fn write_client_head(
    buf: &[u8],
    res: &httparse::Response<'_, '_>,
    head: &ResponseHead,
    framing: Framing,
    client: &ClientSide<'_>,
    out: &mut Vec<u8>,
) {
    out.clear();
    // HTTP/1.0 has no 1xx responses: "a server MUST NOT send a 1xx response to an HTTP/1.0
    // client" (RFC 9110 section 15.2). Interim responses to one are swallowed.
    if head.is_interim() && client.http10 {
        return;
    }
    // The status line as the backend wrote it. httparse skips empty lines before it (a stray
    // CRLF after the previous response on a kept-alive connection); so do we.
    let start = buf
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(0);
    let line_end = start + buf[start..].iter().position(|&b| b == b'\n').unwrap_or(0) + 1;
    out.extend_from_slice(&buf[start..line_end]);
    let connection_options: Vec<&[u8]> = res
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        .flat_map(|h| list_tokens(h.value))
        .collect();
    for header in res.headers.iter() {
        if is_framing(header.name) {
            continue;
        }
        let keep_upgrade = head.status == 101 && header.name.eq_ignore_ascii_case("upgrade");
        if !keep_upgrade
            && (is_hop_by_hop(header.name)
                || connection_options
                    .iter()
                    .any(|o| o.eq_ignore_ascii_case(header.name.as_bytes())))
        {
            continue;
        }
        out.extend_from_slice(header.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(header.value);
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        Framing::Omitted => {}
        Framing::Length(n) => write_content_length(out, n),
        Framing::Codings => write_transfer_codings(
            out,
            res.headers
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case("transfer-encoding"))
                .map(|h| h.value),
        ),
    }
    if let Some(id) = client.set_sticky
        && !head.is_interim()
    {
        out.extend_from_slice(b"Set-Cookie: ");
        out.extend_from_slice(STICKY_COOKIE.as_bytes());
        out.push(b'=');
        out.extend_from_slice(id.as_bytes());
        out.extend_from_slice(b"; path=/\r\n");
    }
    if head.status == 101 {
        out.extend_from_slice(b"Connection: Upgrade\r\n");
    } else if head.is_interim() {
        // The connection's fate is told with the final response.
    } else if head.close_client {
        out.extend_from_slice(b"Connection: close\r\n");
    } else if client.http10 {
        out.extend_from_slice(b"Connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT: ClientSide<'static> = ClientSide {
        request_was_head: false,
        keep_alive: true,
        http10: false,
        set_sticky: None,
        websocket_upgrade: false,
    };

    fn parse_with(
        raw: &[u8],
        client: &ClientSide<'_>,
    ) -> (Result<Option<ResponseHead>, InvalidResponse>, String) {
        let mut out = Vec::new();
        let result = parse(raw, client, &mut out);
        (result, String::from_utf8_lossy(&out).into_owned())
    }

    #[test]
    fn framing() {
        let cases: &[(&[u8], BodyFraming, bool)] = &[
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
                BodyFraming::Length(5),
                true,
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                BodyFraming::Chunked,
                true,
            ),
            (b"HTTP/1.1 200 OK\r\n\r\n", BodyFraming::UntilClose, false),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
                BodyFraming::UntilClose,
                false,
            ),
            (b"HTTP/1.1 204 No Content\r\n\r\n", BodyFraming::None, true),
            (
                b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
                BodyFraming::None,
                true,
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\n",
                BodyFraming::Length(5),
                false,
            ),
            (
                b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\n",
                BodyFraming::Length(5),
                false,
            ),
            (
                b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\n",
                BodyFraming::Length(5),
                true,
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
                BodyFraming::Length(5),
                true,
            ),
        ];
        for (raw, body, keep_alive) in cases {
            let head = parse_with(raw, &CLIENT).0.unwrap().unwrap();
            assert_eq!(
                (head.body, head.backend_keep_alive),
                (*body, *keep_alive),
                "{:?}",
                String::from_utf8_lossy(raw)
            );
            assert_eq!(head.close_client, *body == BodyFraming::UntilClose);
        }
    }

    #[test]
    fn head_request_has_no_body() {
        let client = ClientSide {
            request_was_head: true,
            ..CLIENT
        };
        let head = parse_with(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n", &client)
            .0
            .unwrap()
            .unwrap();
        assert_eq!(head.body, BodyFraming::None);
    }

    #[test]
    fn invalid_responses_are_refused() {
        let cases: &[&[u8]] = &[
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n",
            b"HTTP/1.1 200 OK\nContent-Length: 5\n\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"HTTX/1.1 200 OK\r\n\r\n",
            b"garbage\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
        ];
        for raw in cases {
            assert!(
                parse_with(raw, &CLIENT).0.is_err(),
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    #[test]
    fn client_head_rewrite() {
        let raw = b"HTTP/1.1 200 OK\r\nServer: nginx\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nContent-Length: 2\r\n\r\nok";
        let client = ClientSide {
            set_sticky: Some("abc"),
            ..CLIENT
        };
        let (result, out) = parse_with(raw, &client);
        assert_eq!(result.unwrap().unwrap().head_len, raw.len() - 2);
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 2\r\nSet-Cookie: CONTAINERID=abc; path=/\r\n\r\n"
        );
        let client = ClientSide {
            keep_alive: false,
            ..CLIENT
        };
        let (_, out) = parse_with(raw, &client);
        assert!(
            out.ends_with("Content-Length: 2\r\nConnection: close\r\n\r\n"),
            "{out}"
        );
        let client = ClientSide {
            http10: true,
            ..CLIENT
        };
        let (_, out) = parse_with(raw, &client);
        assert!(out.ends_with("Connection: keep-alive\r\n\r\n"), "{out}");
    }

    /// Found by the `response_head` fuzz target: the empty line used to be copied as the
    /// status line.
    #[test]
    fn leading_empty_lines_are_skipped() {
        let raw = b"\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        let (result, out) = parse_with(raw, &CLIENT);
        assert_eq!(result.unwrap().unwrap().head_len, raw.len() - 2);
        assert_eq!(out, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n");
    }

    #[test]
    fn switching_protocols_and_interim() {
        let raw = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
        let upgrading = ClientSide {
            websocket_upgrade: true,
            ..CLIENT
        };
        let (result, out) = parse_with(raw, &upgrading);
        let head = result.unwrap().unwrap();
        assert_eq!(
            (head.status, head.body, head.close_client),
            (101, BodyFraming::None, false)
        );
        assert!(
            out.contains("Upgrade: websocket\r\n") && out.contains("Connection: Upgrade\r\n"),
            "{out}"
        );

        let client = ClientSide {
            set_sticky: Some("abc"),
            ..CLIENT
        };
        let closing = ClientSide {
            keep_alive: false,
            ..client
        };
        let (result, out) = parse_with(b"HTTP/1.1 100 Continue\r\n\r\n", &closing);
        assert!(result.unwrap().unwrap().is_interim());
        assert_eq!(
            out, "HTTP/1.1 100 Continue\r\n\r\n",
            "no cookie, no Connection on 1xx"
        );
    }

    /// A 101 is a tunnel only when the request asked for that upgrade (issue 9, finding 6).
    #[test]
    fn switching_protocols_only_when_asked() {
        // (101 head, the request asked for websocket, accepted)
        let cases: &[(&[u8], bool, bool)] = &[
            (
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
                true,
                true,
            ),
            (
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: WebSocket\r\nConnection: upgrade\r\n\r\n",
                true,
                true,
            ),
            // Not asked for: never a tunnel.
            (
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
                false,
                false,
            ),
            (
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
                false,
                false,
            ),
            // Asked for websocket, switched to something else, or to nothing named.
            (
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
                true,
                false,
            ),
            (
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket, h2c\r\n\r\n",
                true,
                false,
            ),
            (
                b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n\r\n",
                true,
                false,
            ),
            (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: \r\n\r\n", true, false),
        ];
        for (raw, asked, accepted) in cases {
            let client = ClientSide {
                websocket_upgrade: *asked,
                ..CLIENT
            };
            let result = parse_with(raw, &client).0;
            assert_eq!(
                result.is_ok(),
                *accepted,
                "{:?} (asked: {asked}): {result:?}",
                String::from_utf8_lossy(raw)
            );
        }
        // An upgrade that was asked for and declined is an ordinary response.
        let client = ClientSide {
            websocket_upgrade: true,
            ..CLIENT
        };
        let head = parse_with(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", &client)
            .0
            .unwrap()
            .unwrap();
        assert_eq!(head.status, 200);
    }

    /// The framing fields the client gets: one, canonical, from the router's reading.
    #[test]
    fn framing_is_relayed_as_understood() {
        let head_request = ClientSide {
            request_was_head: true,
            ..CLIENT
        };
        let cases: &[(&[u8], &ClientSide<'_>, &[&str])] = &[
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: ,chunked\r\n\r\n",
                &CLIENT,
                &["Transfer-Encoding: chunked"],
            ),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: GZIP\r\nTransfer-Encoding: Chunked\r\n\r\n",
                &CLIENT,
                &["Transfer-Encoding: gzip, chunked"],
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
                &CLIENT,
                &["Transfer-Encoding: gzip"],
            ),
            // Identical repeats are accepted, and sent on once.
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\ncontent-length: 005\r\n\r\n",
                &CLIENT,
                &["Content-Length: 5"],
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
                &CLIENT,
                &["Content-Length: 0"],
            ),
            (b"HTTP/1.1 200 OK\r\n\r\n", &CLIENT, &[]),
            // HEAD and 304: the fields describe the representation; they go on, normalised.
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\nContent-Length: 100000\r\n\r\n",
                &head_request,
                &["Content-Length: 100000"],
            ),
            (
                b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
                &CLIENT,
                &["Content-Length: 10"],
            ),
            // HEAD: a coding the router cannot read is not passed on.
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: foo, ,\r\n\r\n",
                &head_request,
                &[],
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: ,\r\n\r\n",
                &head_request,
                &[],
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: ,Chunked\r\n\r\n",
                &head_request,
                &["Transfer-Encoding: chunked"],
            ),
            // No body, no framing: 204 and 1xx.
            (
                b"HTTP/1.1 204 No Content\r\nContent-Length: 10\r\n\r\n",
                &CLIENT,
                &[],
            ),
            (
                b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n",
                &CLIENT,
                &[],
            ),
            (
                b"HTTP/1.1 103 Early Hints\r\nContent-Length: 10\r\nLink: </a>\r\n\r\n",
                &CLIENT,
                &[],
            ),
            // Connection options do not drop framing.
            (
                b"HTTP/1.1 200 OK\r\nConnection: Content-Length\r\nContent-Length: 5\r\n\r\n",
                &CLIENT,
                &["Content-Length: 5"],
            ),
        ];
        for (raw, client, expected) in cases {
            let (result, out) = parse_with(raw, client);
            result.unwrap().unwrap();
            let lines: Vec<&str> = out
                .split("\r\n")
                .filter(|l| is_framing(l.split(':').next().unwrap_or_default()))
                .collect();
            assert_eq!(
                lines,
                *expected,
                "{:?} -> {out:?}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    /// RFC 9110 section 15.2: no 1xx to an HTTP/1.0 client.
    #[test]
    fn no_interim_responses_to_http10_clients() {
        let client = ClientSide {
            http10: true,
            ..CLIENT
        };
        for raw in [
            &b"HTTP/1.1 100 Continue\r\n\r\n"[..],
            b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n",
        ] {
            let (result, out) = parse_with(raw, &client);
            assert!(result.unwrap().unwrap().is_interim());
            assert_eq!(out, "", "{:?}", String::from_utf8_lossy(raw));
        }
    }
}
