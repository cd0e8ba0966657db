//! `http::chunked::ChunkedScanner` fed in pieces: it never claims more than it was given, stops
//! taking bytes once done, and reaches the same outcome as when fed the whole body at once.
//!
//! Input: a control byte (bits 0-1: how many piece-size bytes follow, minus one; bit 2: move
//! chunk data with `skip_data` as the proxy does, instead of scanning it), the piece sizes (0 is
//! an empty piece), then the body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use router_agent::http::chunked::{ChunkError, ChunkedScanner};

/// Whether the scanner found the end, and how many bytes belong to the body.
type Outcome = Result<(bool, usize), ChunkError>;

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    let count = usize::from(control & 3) + 1;
    if rest.len() < count {
        return;
    }
    let (sizes, body) = rest.split_at(count);
    let sizes: Vec<usize> = if sizes.iter().all(|&s| s == 0) {
        vec![1]
    } else {
        sizes.iter().map(|&s| usize::from(s)).collect()
    };
    let use_skip = control & 4 != 0;

    let whole = whole(body);
    let pieces = in_pieces(body, &sizes, use_skip);
    assert_eq!(
        whole, pieces,
        "whole input and pieces of {sizes:?} (skip_data: {use_skip}) disagree"
    );
});

fn whole(body: &[u8]) -> Outcome {
    let mut scanner = ChunkedScanner::default();
    let n = scanner.advance(body)?;
    assert!(n <= body.len(), "consumed {n} of {}", body.len());
    assert!(
        scanner.is_done() || n == body.len(),
        "stopped at {n} of {} without being done",
        body.len()
    );
    Ok((scanner.is_done(), n))
}

fn in_pieces(body: &[u8], sizes: &[usize], use_skip: bool) -> Outcome {
    let mut scanner = ChunkedScanner::default();
    let mut total = 0;
    let mut offset = 0;
    let mut sizes = sizes.iter().cycle();
    while offset < body.len() {
        let len = (*sizes.next().expect("cycle is endless")).min(body.len() - offset);
        let piece = &body[offset..offset + len];
        offset += len;

        if scanner.is_done() {
            assert_eq!(scanner.advance(piece), Ok(0), "took bytes after the end");
            assert!(scanner.is_done());
            continue;
        }
        let mut consumed = 0;
        let remaining = scanner.data_remaining();
        if use_skip && remaining > 0 {
            consumed = piece
                .len()
                .min(usize::try_from(remaining).unwrap_or(usize::MAX));
            scanner.skip_data(consumed as u64);
        }
        let n = scanner.advance(&piece[consumed..])?;
        consumed += n;
        assert!(
            consumed <= piece.len(),
            "consumed {consumed} of a piece of {}",
            piece.len()
        );
        assert!(
            scanner.is_done() || consumed == piece.len(),
            "stopped at {consumed} of a piece of {} without being done",
            piece.len()
        );
        total += consumed;
    }
    if scanner.is_done() {
        assert_eq!(
            scanner.advance(b"0\r\n\r\n"),
            Ok(0),
            "took bytes after the end"
        );
    }
    Ok((scanner.is_done(), total))
}
