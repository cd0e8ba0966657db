//! Finding the end of a chunked body (RFC 9112 section 7.1) while relaying it unchanged.
//!
//! The proxy does not decode chunks: it forwards the bytes as they are and only needs to know
//! where the message ends, and to refuse framing that another parser could read differently
//! (bare LF, sizes that overflow, junk after the size). Every line it reads is bounded: a chunk
//! size line by [`MAX_CHUNK_LINE_BYTES`], the trailer section by the head limit
//! (`max_head_bytes`), so a peer cannot make a line (and a recipient's buffer) grow without end.
use std::fmt;

use super::DEFAULT_MAX_HEAD;

/// Longest chunk size line (size, extensions, CRLF). Sizes take at most 16 hex digits, and no
/// chunk extension is defined that needs more than a few bytes (RFC 9112 section 7.1.1 lets a
/// recipient ignore them, and a server should bound them); 4 KiB is generous for any real use
/// and short enough that a peer cannot stream an endless line through the router, or make a
/// backend that buffers the line hold it all (nginx's whole limit for such lines is 4 KiB too).
pub const MAX_CHUNK_LINE_BYTES: usize = 4 * 1024;
/// 16 hex digits fill a u64; more cannot be a real size.
const MAX_SIZE_DIGITS: u32 = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkError(pub &'static str);

impl fmt::Display for ChunkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bad chunked framing: {}", self.0)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Size {
        digits: u32,
        value: u64,
    },
    /// Whitespace after the size (BWS), before `;` or CR.
    SizeSpace {
        value: u64,
    },
    /// A chunk extension, up to CR.
    Extension {
        value: u64,
    },
    SizeLf {
        value: u64,
    },
    Data {
        remaining: u64,
    },
    DataCr,
    DataLf,
    /// At the start of a trailer line, or of the final empty line.
    TrailerStart,
    TrailerLine,
    TrailerLf,
    EndLf,
    Done,
}

#[derive(Clone, Debug)]
pub struct ChunkedScanner {
    state: State,
    /// Bytes of the current chunk size line so far.
    line_bytes: usize,
    /// Bytes of the trailer section so far (fields, line ends, the final CRLF).
    trailer_bytes: usize,
    max_trailer_bytes: usize,
}

/// With the default head limit as the trailer bound.
impl Default for ChunkedScanner {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_HEAD)
    }
}

impl ChunkedScanner {
    /// A scanner for one body whose trailer section may take up to `max_trailer_bytes` (the
    /// head limit: trailers are header fields that come late, RFC 9112 section 7.1.2).
    pub fn new(max_trailer_bytes: usize) -> Self {
        Self {
            state: State::Size {
                digits: 0,
                value: 0,
            },
            line_bytes: 0,
            trailer_bytes: 0,
            max_trailer_bytes,
        }
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Bytes of chunk data still expected in the current chunk (0 outside data), so the proxy
    /// can move large chunks without looking at them.
    pub fn data_remaining(&self) -> u64 {
        match self.state {
            State::Data { remaining } => remaining,
            _ => 0,
        }
    }

    /// Tells the scanner that `n` bytes of chunk data passed without being scanned.
    pub fn skip_data(&mut self, n: u64) {
        if let State::Data { remaining } = &mut self.state {
            debug_assert!(n <= *remaining);
            *remaining -= n;
            if *remaining == 0 {
                self.state = State::DataCr;
            }
        }
    }

    /// Scans `input`, returning how many bytes belong to the body; fewer than `input.len()`
    /// only when the body ended inside `input` (the rest is the next message).
    pub fn advance(&mut self, input: &[u8]) -> Result<usize, ChunkError> {
        let mut i = 0;
        while i < input.len() && self.state != State::Done {
            if let State::Data { remaining } = self.state {
                let take = remaining.min((input.len() - i) as u64);
                i += take as usize;
                self.skip_data(take);
                continue;
            }
            self.state = self.step(input[i])?;
            i += 1;
        }
        Ok(i)
    }

    fn step(&mut self, b: u8) -> Result<State, ChunkError> {
        match self.state {
            State::Size { .. }
            | State::SizeSpace { .. }
            | State::Extension { .. }
            | State::SizeLf { .. } => {
                self.line_bytes += 1;
                if self.line_bytes > MAX_CHUNK_LINE_BYTES {
                    return Err(ChunkError("chunk size line too long"));
                }
            }
            State::TrailerStart | State::TrailerLine | State::TrailerLf | State::EndLf => {
                self.trailer_bytes += 1;
                if self.trailer_bytes > self.max_trailer_bytes {
                    return Err(ChunkError("trailer section too large"));
                }
            }
            State::Data { .. } | State::DataCr | State::DataLf | State::Done => {}
        }
        Ok(match self.state {
            State::Size { digits, value } => match hex_value(b) {
                Some(_) if digits == MAX_SIZE_DIGITS => {
                    return Err(ChunkError("chunk size too large"));
                }
                Some(v) => State::Size {
                    digits: digits + 1,
                    value: (value << 4) | u64::from(v),
                },
                None if digits == 0 => return Err(ChunkError("chunk size is not hex")),
                None => self.after_size(b, value)?,
            },
            State::SizeSpace { value } | State::Extension { value } => self.after_size(b, value)?,
            State::SizeLf { value } => match b {
                b'\n' if value == 0 => State::TrailerStart,
                b'\n' => State::Data { remaining: value },
                _ => return Err(ChunkError("CR without LF after chunk size")),
            },
            State::Data { .. } => unreachable!("data is skipped in advance"),
            State::DataCr => match b {
                b'\r' => State::DataLf,
                _ => return Err(ChunkError("chunk data longer than its size")),
            },
            State::DataLf => match b {
                b'\n' => {
                    self.line_bytes = 0;
                    State::Size {
                        digits: 0,
                        value: 0,
                    }
                }
                _ => return Err(ChunkError("CR without LF after chunk data")),
            },
            State::TrailerStart => match b {
                b'\r' => State::EndLf,
                b'\n' => return Err(ChunkError("bare LF in trailers")),
                _ => State::TrailerLine,
            },
            State::TrailerLine => match b {
                b'\r' => State::TrailerLf,
                b'\n' => return Err(ChunkError("bare LF in trailers")),
                _ => State::TrailerLine,
            },
            State::TrailerLf => match b {
                b'\n' => State::TrailerStart,
                _ => return Err(ChunkError("CR without LF in trailers")),
            },
            State::EndLf => match b {
                b'\n' => State::Done,
                _ => return Err(ChunkError("CR without LF at the end")),
            },
            State::Done => State::Done,
        })
    }

    /// After the size digits: optional whitespace and `;extension`, then CRLF.
    fn after_size(&self, b: u8, value: u64) -> Result<State, ChunkError> {
        let in_extension = matches!(self.state, State::Extension { .. });
        match b {
            b'\r' => Ok(State::SizeLf { value }),
            b'\n' => Err(ChunkError("bare LF after chunk size")),
            b';' => Ok(State::Extension { value }),
            b' ' | b'\t' if !in_extension => Ok(State::SizeSpace { value }),
            b' ' | b'\t' | 0x21..=0x7e | 0x80..=0xff if in_extension => {
                Ok(State::Extension { value })
            }
            _ => Err(ChunkError("junk after chunk size")),
        }
    }
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in pieces of `step` bytes; returns the body length or the error.
    fn scan(input: &[u8], step: usize) -> Result<Option<usize>, ChunkError> {
        let mut scanner = ChunkedScanner::default();
        let mut total = 0;
        for piece in input.chunks(step) {
            total += scanner.advance(piece)?;
            if scanner.is_done() {
                return Ok(Some(total));
            }
        }
        Ok(None)
    }

    #[test]
    fn well_formed_bodies_end_where_they_should() {
        let cases: &[&[u8]] = &[
            b"0\r\n\r\n",
            b"5\r\nhello\r\n0\r\n\r\n",
            b"5;ext=1\r\nhello\r\n0\r\n\r\n",
            b"5 ;ext\r\nhello\r\n0\r\n\r\n",
            b"A\r\n0123456789\r\n0\r\n\r\n",
            b"a\r\n0123456789\r\n00\r\n\r\n",
            b"3\r\nabc\r\n0\r\nX-Sum: 1\r\nX-B: 2\r\n\r\n",
            b"0000000000000003\r\nabc\r\n0\r\n\r\n",
        ];
        for body in cases {
            let mut with_next = body.to_vec();
            with_next.extend_from_slice(b"GET /next HTTP/1.1\r\n");
            for step in [1, 2, 3, 7, 1000] {
                assert_eq!(
                    scan(&with_next, step),
                    Ok(Some(body.len())),
                    "{:?} step {step}",
                    String::from_utf8_lossy(body)
                );
            }
        }
    }

    #[test]
    fn incomplete_bodies_wait() {
        for body in [
            &b"5\r\nhel"[..],
            b"5\r\nhello\r\n",
            b"0\r\n",
            b"0\r\nX: y\r\n",
        ] {
            assert_eq!(
                scan(body, 1),
                Ok(None),
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn malformed_framing_is_refused() {
        let cases: &[&[u8]] = &[
            b"\r\n",
            b"x\r\n",
            b"-1\r\n",
            b"+5\r\nhello\r\n0\r\n\r\n",
            b"0x5\r\nhello\r\n0\r\n\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhello\n0\r\n\r\n",
            b"5\r\nhelloX\r\n0\r\n\r\n",
            b"5\rhello",
            b"11111111111111111\r\n",
            b"0\r\n\n",
            b"0\r\nX: y\n\r\n",
            b"5 x\r\nhello\r\n",
        ];
        for body in cases {
            assert!(
                scan(body, 1).is_err(),
                "{:?} accepted",
                String::from_utf8_lossy(body)
            );
            assert!(
                scan(body, 1000).is_err(),
                "{:?} accepted",
                String::from_utf8_lossy(body)
            );
        }
    }

    /// Line bounds (issue 9, finding 8): (body, trailer limit, outcome). Every row is fed in
    /// one piece and byte by byte.
    #[test]
    fn every_line_is_bounded() {
        let line_of = |len: usize| format!("5;{}\r\n", "e".repeat(len - 4));
        let trailers_of = |len: usize| format!("X: {}\r\n\r\n", "t".repeat(len - 7));
        let cases: Vec<(String, usize, Result<(), ChunkError>)> = vec![
            // A size line of exactly the limit (CRLF included) passes; one byte more does not.
            (
                format!("{}hello\r\n0\r\n\r\n", line_of(MAX_CHUNK_LINE_BYTES)),
                DEFAULT_MAX_HEAD,
                Ok(()),
            ),
            (
                format!("{}hello\r\n0\r\n\r\n", line_of(MAX_CHUNK_LINE_BYTES + 1)),
                DEFAULT_MAX_HEAD,
                Err(ChunkError("chunk size line too long")),
            ),
            // The 100 KB extension of the issue.
            (
                format!("5;{}\r\nhello\r\n0\r\n\r\n", "a".repeat(100_000)),
                DEFAULT_MAX_HEAD,
                Err(ChunkError("chunk size line too long")),
            ),
            // Whitespace after the size counts too, and so does the last-chunk line.
            (
                format!("5{}\r\nhello\r\n0\r\n\r\n", " ".repeat(5000)),
                DEFAULT_MAX_HEAD,
                Err(ChunkError("chunk size line too long")),
            ),
            (
                format!("0;{}\r\n\r\n", "e".repeat(5000)),
                DEFAULT_MAX_HEAD,
                Err(ChunkError("chunk size line too long")),
            ),
            // The count starts again at each line: many lines just under the limit pass.
            (
                format!(
                    "{}0\r\n\r\n",
                    format!("{}hello\r\n", line_of(MAX_CHUNK_LINE_BYTES)).repeat(20)
                ),
                DEFAULT_MAX_HEAD,
                Ok(()),
            ),
            // The trailer section (fields, line ends, final CRLF) up to the limit, then over.
            (format!("0\r\n{}", trailers_of(1024)), 1024, Ok(())),
            (
                format!("0\r\n{}", trailers_of(1025)),
                1024,
                Err(ChunkError("trailer section too large")),
            ),
            (
                format!("0\r\n{}", "X: y\r\n".repeat(300) + "\r\n"),
                1024,
                Err(ChunkError("trailer section too large")),
            ),
            (
                format!("0\r\n{}", trailers_of(70_000)),
                DEFAULT_MAX_HEAD,
                Err(ChunkError("trailer section too large")),
            ),
            (
                format!("0\r\n{}", trailers_of(60_000)),
                DEFAULT_MAX_HEAD,
                Ok(()),
            ),
        ];
        for (body, max_trailer, expected) in &cases {
            for step in [1, body.len()] {
                let mut scanner = ChunkedScanner::new(*max_trailer);
                let mut result = Ok(());
                for piece in body.as_bytes().chunks(step) {
                    if let Err(e) = scanner.advance(piece) {
                        result = Err(e);
                        break;
                    }
                }
                if result.is_ok() {
                    assert!(scanner.is_done(), "{} bytes: not done", body.len());
                }
                assert_eq!(
                    result,
                    *expected,
                    "{} bytes, step {step}: {:?}...",
                    body.len(),
                    &body[..body.len().min(40)]
                );
            }
        }
    }

    #[test]
    fn skipping_data() {
        let mut scanner = ChunkedScanner::default();
        assert_eq!(scanner.advance(b"100000\r\n"), Ok(8));
        assert_eq!(scanner.data_remaining(), 0x10_0000);
        scanner.skip_data(0x10_0000);
        assert_eq!(scanner.advance(b"\r\n0\r\n\r\n"), Ok(7));
        assert!(scanner.is_done());
    }
}
