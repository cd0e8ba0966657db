//! `http::response::parse` on arbitrary bytes, for the client sides chosen by the first byte: no
//! panic, and on success a head inside the input and a client head that parses again.
#![no_main]

use libfuzzer_sys::fuzz_target;

mod prefix;
use router_agent::http::response::{self, ClientSide, ResponseHead};

const STICKY_ID: &str = "4c99ce1b6e760edac88aac3c720c4382031bf9dde89d21e0358359e2933d5258";

/// The client head adds at most two headers (Set-Cookie, Connection) to the 100 accepted.
const REPARSE_HEADERS: usize = 128;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, raw)) = data.split_first() else {
        return;
    };
    let client = ClientSide {
        request_was_head: flags & 1 != 0,
        keep_alive: flags & 2 != 0,
        http10: flags & 4 != 0,
        set_sticky: (flags & 8 != 0).then_some(STICKY_ID),
        websocket_upgrade: flags & 16 != 0,
    };

    let mut out = Vec::new();
    let full = response::parse(raw, &client, &mut out);
    if let Ok(Some(head)) = &full {
        check_head(raw, head, &client, &out);
    }

    let half = &raw[..raw.len() / 2];
    let mut half_out = Vec::new();
    if let Ok(Some(half_head)) = response::parse(half, &client, &mut half_out) {
        check_head(half, &half_head, &client, &half_out);
        prefix::check_prefix(&full, &out, &half_head, &half_out, |h| h.head_len);
    }
});

fn check_head(input: &[u8], head: &ResponseHead, client: &ClientSide<'_>, out: &[u8]) {
    assert!(
        head.head_len <= input.len(),
        "head_len {} > input {}",
        head.head_len,
        input.len()
    );
    // Interim responses to an HTTP/1.0 client are swallowed: nothing to relay.
    if client.http10 && head.is_interim() {
        assert!(out.is_empty(), "1xx relayed to HTTP/1.0: {out:?}");
        return;
    }
    assert!(out.ends_with(b"\r\n\r\n"), "client head: {out:?}");
    let mut headers = [httparse::EMPTY_HEADER; REPARSE_HEADERS];
    let mut res = httparse::Response::new(&mut headers);
    match res.parse(out) {
        Ok(httparse::Status::Complete(n)) => {
            assert_eq!(
                n,
                out.len(),
                "client head ends early: {:?}",
                String::from_utf8_lossy(out)
            );
            assert_eq!(
                res.code,
                Some(head.status),
                "client head {:?} has another status",
                String::from_utf8_lossy(out)
            );
        }
        other => panic!(
            "client head {:?} does not parse: {other:?}",
            String::from_utf8_lossy(out)
        ),
    }
}
