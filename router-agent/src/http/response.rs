//! Response heads: validate what a backend answered and write the head the client receives.
use std::mem::MaybeUninit;

use super::{
    BodyFraming, MAX_HEADERS, check_transfer_codings, has_bare_lf, is_hop_by_hop, list_tokens,
    parse_content_length,
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
pub struct ClientSide<'a> {
    pub request_was_head: bool,
    /// The client asked for keep-alive (and the router is not shutting down).
    pub keep_alive: bool,
    pub http10: bool,
    /// Container id to pin with `Set-Cookie: CONTAINERID=...`.
    pub set_sticky: Option<&'a str>,
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
        }
    }
    if transfer_encoding && content_length.is_some() {
        return Err(InvalidResponse("both Content-Length and Transfer-Encoding"));
    }
    let body = if client.request_was_head || status == 204 || status == 304 || status < 200 {
        BodyFraming::None
    } else if transfer_encoding {
        let chunked = check_transfer_codings(
            res.headers
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case("transfer-encoding"))
                .map(|h| h.value),
        )
        .map_err(|_| InvalidResponse("invalid Transfer-Encoding"))?;
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

    let head = ResponseHead {
        status,
        body,
        backend_keep_alive,
        close_client,
        head_len,
    };
    write_client_head(buf, &res, &head, client, out);
    Ok(Some(head))
}

fn write_client_head(
    buf: &[u8],
    res: &httparse::Response<'_, '_>,
    head: &ResponseHead,
    client: &ClientSide<'_>,
    out: &mut Vec<u8>,
) {
    out.clear();
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
        let (result, out) = parse_with(raw, &CLIENT);
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
}
