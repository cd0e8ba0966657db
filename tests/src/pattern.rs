//! Deterministic pseudo-random bytes for integrity checks: the sender and the checker generate
//! the same stream from a seed, so 50 MiB need not be kept in memory or on disk. The stream is
//! the same however it is cut into buffers.
use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, TcpStream},
    thread,
};

pub struct Pattern {
    state: u64,
    word: [u8; 8],
    /// Bytes of `word` already handed out.
    used: usize,
}

impl Pattern {
    pub fn new(seed: u64) -> Self {
        Self {
            state: seed | 1,
            word: [0; 8],
            used: 8,
        }
    }

    /// Fills `buf` with the next bytes of the stream.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for byte in buf {
            if self.used == 8 {
                self.next_word();
            }
            *byte = self.word[self.used];
            self.used += 1;
        }
    }

    fn next_word(&mut self) {
        // xorshift64*: fast, and no run of the stream repeats within our sizes.
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.word = self.state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
        self.used = 0;
    }

    /// Checks that `got` is the next part of the stream.
    pub fn matches(&mut self, got: &[u8]) -> bool {
        let mut expected = vec![0u8; got.len()];
        self.fill(&mut expected);
        expected == got
    }
}

/// How far the stream of `seed` must be searched for misplaced bytes, either way.
const SHIFT_SEARCH: u64 = 8 * 1024 * 1024;
/// Bytes compared to place a run of received bytes in the stream.
const PROBE: usize = 256;

/// Explains a piece of a received stream that does not match: the stream offset of the first
/// wrong byte, and where in the stream the bytes found there really come from (a negative
/// shift means bytes delivered again, a positive one bytes skipped).
pub fn describe_mismatch(seed: u64, offset: u64, got: &[u8]) -> String {
    let mut expected = vec![0u8; got.len()];
    let mut pattern = Pattern::new(seed);
    skip(&mut pattern, offset);
    pattern.fill(&mut expected);
    let Some(first) = expected.iter().zip(got).position(|(e, g)| e != g) else {
        return format!(
            "no difference in the {} bytes at offset {offset}",
            got.len()
        );
    };
    let wrong_at = offset + first as u64;
    let probe = &got[first..got.len().min(first + PROBE)];
    let start = wrong_at.saturating_sub(SHIFT_SEARCH);
    let mut window = vec![0u8; (2 * SHIFT_SEARCH) as usize + probe.len()];
    let mut pattern = Pattern::new(seed);
    skip(&mut pattern, start);
    pattern.fill(&mut window);
    let found = window
        .windows(probe.len())
        .position(|w| w == probe)
        .map(|at| (start + at as u64).cast_signed() - wrong_at.cast_signed());
    match found {
        Some(shift) => format!(
            "first wrong byte at stream offset {wrong_at}; the bytes there are the stream's \
             from offset {} (shift {shift:+} bytes: {})",
            wrong_at.cast_signed() + shift,
            if shift < 0 {
                "delivered again"
            } else {
                "skipped"
            }
        ),
        None => format!(
            "first wrong byte at stream offset {wrong_at}; the {} bytes there appear nowhere \
             within {SHIFT_SEARCH} bytes of it",
            probe.len()
        ),
    }
}

fn skip(pattern: &mut Pattern, mut bytes: u64) {
    let mut sink = vec![0u8; 64 * 1024];
    while bytes > 0 {
        let n = bytes.min(sink.len() as u64) as usize;
        pattern.fill(&mut sink[..n]);
        bytes -= n as u64;
    }
}

/// Sends `size` bytes of `Pattern::new(seed)` on `stream` from another thread, in 64 KiB
/// blocks, then half-closes; runs `before_reading`; then reads until EOF, checking that what
/// comes back is the same stream. Returns how many bytes came back before EOF; panics, naming
/// `label` and the offset, at the first piece that differs. The read timeout is the caller's.
pub fn echo_round_trip(
    label: &str,
    mut stream: TcpStream,
    seed: u64,
    size: u64,
    before_reading: impl FnOnce(),
) -> u64 {
    let mut writer = stream.try_clone().expect("clone");
    let sender = thread::spawn(move || {
        let mut pattern = Pattern::new(seed);
        let mut block = vec![0u8; 64 * 1024];
        let mut left = size;
        while left > 0 {
            let block = &mut block[..left.min(64 * 1024) as usize];
            pattern.fill(block);
            writer.write_all(block).expect("send");
            left -= block.len() as u64;
        }
        writer.shutdown(Shutdown::Write).expect("half-close");
    });
    before_reading();
    let mut pattern = Pattern::new(seed);
    let mut received = 0u64;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = stream.read(&mut buf).expect("read echo");
        if n == 0 {
            break;
        }
        assert!(
            pattern.matches(&buf[..n]),
            "{label}: echoed bytes differ in the {n} bytes read at offset {received}: {}",
            describe_mismatch(seed, received, &buf[..n])
        );
        received += n as u64;
    }
    sender.join().expect("sender");
    received
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_run_is_described_as_delivered_again() {
        let mut stream = vec![0u8; 300_000];
        Pattern::new(9).fill(&mut stream);
        // Bytes 100_000..200_000 arrive, then 150_000.. again.
        let mut got = stream[100_000..200_000].to_vec();
        got.extend_from_slice(&stream[150_000..160_000]);
        let text = describe_mismatch(9, 100_000, &got);
        assert!(
            text.contains("offset 200000") && text.contains("shift -50000"),
            "{text}"
        );
        let skipped = describe_mismatch(
            9,
            0,
            &stream[..1000]
                .iter()
                .chain(&stream[5000..6000])
                .copied()
                .collect::<Vec<_>>(),
        );
        assert!(skipped.contains("shift +4000 bytes: skipped"), "{skipped}");
    }

    #[test]
    fn the_stream_does_not_depend_on_how_it_is_cut() {
        let mut whole = vec![0u8; 1000];
        Pattern::new(5).fill(&mut whole);
        let mut pieces = Pattern::new(5);
        let mut offset = 0;
        for size in [3, 8, 1, 13, 975] {
            assert!(
                pieces.matches(&whole[offset..offset + size]),
                "piece at {offset}"
            );
            offset += size;
        }
    }
}
