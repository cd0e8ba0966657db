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
            "{label}: echoed bytes differ at offset {received}"
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
