//! `http::request::parse` on arbitrary bytes: no panic whatever the input, and on success a
//! head that lies inside the input and a rewritten head that parses again as a complete request.
#![no_main]

use libfuzzer_sys::fuzz_target;

mod prefix;
use router_agent::http::{
    HeadLimits,
    request::{self, ForwardContext, RequestHead},
};

const CTX: ForwardContext<'static> = ForwardContext {
    client_ip: "198.18.0.7",
    forwarded_headers: true,
};

/// The rewritten head adds at most four headers (Connection, X-Forwarded-*) to the 100 accepted.
const REPARSE_HEADERS: usize = 128;

fuzz_target!(|data: &[u8]| {
    let limits = HeadLimits::default();
    let mut out = Vec::new();
    let full = request::parse(data, &limits, &CTX, &mut out);
    if let Ok(Some(head)) = &full {
        check_head(data, head, &out);
    }

    let half = &data[..data.len() / 2];
    let mut half_out = Vec::new();
    if let Ok(Some(half_head)) = request::parse(half, &limits, &CTX, &mut half_out) {
        check_head(half, &half_head, &half_out);
        prefix::check_prefix(&full, &out, &half_head, &half_out, |h| h.head_len);
    }
});

fn check_head(input: &[u8], head: &RequestHead, out: &[u8]) {
    assert!(
        head.head_len <= input.len(),
        "head_len {} > input {}",
        head.head_len,
        input.len()
    );
    for (what, range) in [("host", Some(&head.host)), ("path", Some(&head.path))]
        .into_iter()
        .chain([("sticky_id", head.sticky_id.as_ref())])
    {
        if let Some(range) = range {
            assert!(
                range.start <= range.end && range.end <= head.head_len,
                "{what} {range:?} outside the head (0..{})",
                head.head_len
            );
        }
    }
    assert!(out.ends_with(b"\r\n\r\n"), "rewritten head: {out:?}");
    let mut headers = [httparse::EMPTY_HEADER; REPARSE_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(out) {
        Ok(httparse::Status::Complete(n)) => assert_eq!(
            n,
            out.len(),
            "rewritten head ends early: {:?}",
            String::from_utf8_lossy(out)
        ),
        other => panic!(
            "rewritten head {:?} does not parse: {other:?}",
            String::from_utf8_lossy(out)
        ),
    }
}
