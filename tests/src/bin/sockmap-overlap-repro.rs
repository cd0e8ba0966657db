//! Minimal reproducer, for the kernel's bpf list, of sockmap delivering bytes twice: no router,
//! two TCP connections on loopback in a private network namespace, one five-instruction
//! `sk_skb` stream verdict program.
//!
//! ```text
//! A --tcp--> B   B is in a sockmap whose stream verdict redirects (egress) to C
//! C --tcp--> D   so what reaches B leaves through C and is read at D
//! ```
//!
//! A sends "0123456789"; D reads it. Then a segment from A's address and port arrives at B
//! with sequence number 5 bytes before B's `rcv_nxt`, carrying "56789ABCDE": a retransmission
//! cut differently from the first transmission, as a sender makes after loss. TCP queues it
//! whole (`tcp_data_queue`: "Partial packet, `seq < rcv_next < end_seq`") and the next reader is
//! meant to skip the 5 repeated bytes: `tcp_recvmsg` does (from `copied_seq`), so B read
//! directly gives "0123456789ABCDE". `tcp_read_skb` hands the whole skb to the verdict program,
//! so D reads "0123456789" then "56789ABCDE": 5 bytes twice.
//!
//! Run as root: `cargo run --release -p tests --bin sockmap-overlap-repro`. Prints both
//! streams; exits 1 when the bytes arrive twice, 0 when not.
//!
//! `-- --loss PERCENT [--mib N]` shows the same without a hand-made segment: A streams N MiB
//! (default 256) of a pseudo-random pattern to B, with that share of the packets on `lo`
//! dropped at random (iptables `statistic`), so that TCP itself retransmits; D checks the
//! pattern and names the first byte that is wrong.
use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    process::{Command, ExitCode},
    time::{Duration, Instant},
};

use tests::{
    inject::{Sniffer, endpoints, flush_ack, send_segment},
    pattern::{Pattern, describe_mismatch},
};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_MAP_TYPE_SOCKMAP: u32 = 15;
const BPF_PROG_TYPE_SK_SKB: u32 = 14;
const BPF_SK_SKB_STREAM_VERDICT: u32 = 5;
const BPF_FUNC_SK_REDIRECT_MAP: i32 = 52;
/// Seed of the pattern the lossy mode streams.
const SEED: u64 = 7;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .map(|v| {
                v.parse::<f64>()
                    .unwrap_or_else(|_| panic!("{flag} takes a number"))
            })
    };
    if let Some(loss) = value("--loss") {
        enter_private_netns(true);
        return lossy(loss, value("--mib").unwrap_or(256.0) as u64);
    }
    enter_private_netns(false);
    let plain = run(false);
    let redirected = run(true);
    println!("A sent \"0123456789\", then a segment 5 bytes back carrying \"56789ABCDE\"");
    println!("  B read directly (tcp_recvmsg):       {plain:?}");
    println!("  via sockmap verdict redirect to C-D: {redirected:?}");
    if redirected == plain {
        println!("not reproduced: both streams are the same");
        ExitCode::SUCCESS
    } else {
        println!(
            "REPRODUCED: the redirected stream repeats bytes TCP had already delivered \
             (tcp_read_skb passes the whole overlapping skb to the verdict program)"
        );
        ExitCode::FAILURE
    }
}

/// Its own network namespace, so nothing else on the machine sends on this `lo`; without TCP
/// timestamps unless `timestamps` (the hand-made segment then needs no timestamp option).
fn enter_private_netns(timestamps: bool) {
    // SAFETY: unshare(2) of this (single-threaded) process's network namespace.
    assert_eq!(
        unsafe { libc::unshare(libc::CLONE_NEWNET) },
        0,
        "unshare(CLONE_NEWNET) failed (run as root): {}",
        std::io::Error::last_os_error()
    );
    let status = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .expect("ip (iproute2) runs");
    assert!(status.success(), "ip link set lo up failed");
    if !timestamps {
        std::fs::write("/proc/sys/net/ipv4/tcp_timestamps", "0").expect("tcp_timestamps");
    }
}

/// A stream through the redirect on a lossy `lo`: TCP's own retransmissions.
#[expect(
    clippy::many_single_char_names,
    reason = "A, B, C and D are the sockets of the diagram at the top"
)]
fn lossy(percent: f64, mib: u64) -> ExitCode {
    let probability = format!("{}", percent / 100.0);
    let status = Command::new("iptables")
        .args([
            "-A",
            "INPUT",
            "-p",
            "tcp",
            "-m",
            "statistic",
            "--mode",
            "random",
        ])
        .args(["--probability", &probability, "-j", "DROP"])
        .status()
        .expect("iptables runs");
    assert!(status.success(), "iptables -m statistic failed");
    let (a, b) = connected_pair();
    let (c, d) = connected_pair();
    let map = sockmap();
    let program = verdict_program(map.as_raw_fd());
    attach(map.as_raw_fd(), program.as_raw_fd());
    map_insert(map.as_raw_fd(), 0, c.as_raw_fd());
    map_insert(map.as_raw_fd(), 1, b.as_raw_fd());
    let total = mib * 1024 * 1024;
    let sender = std::thread::spawn(move || {
        let mut a = a;
        let mut pattern = Pattern::new(SEED);
        let mut block = vec![0u8; 64 * 1024];
        let mut left = total;
        while left > 0 {
            let n = left.min(block.len() as u64) as usize;
            pattern.fill(&mut block[..n]);
            if a.write_all(&block[..n]).is_err() {
                break;
            }
            left -= n as u64;
        }
        a
    });
    let mut d = d;
    d.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut pattern = Pattern::new(SEED);
    let mut buf = vec![0u8; 256 * 1024];
    let mut received = 0u64;
    let mut verdict = None;
    while received < total {
        let n = match d.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                verdict = Some(format!("reading D failed after {received} bytes: {e}"));
                break;
            }
        };
        if !pattern.matches(&buf[..n]) {
            verdict = Some(describe_mismatch(SEED, received, &buf[..n]));
            break;
        }
        received += n as u64;
    }
    let _a = sender.join();
    drop((b, c));
    println!(
        "A streamed {mib} MiB to B through a lo dropping {percent} % of TCP packets at random; \
         B's verdict redirects to C, D checks the bytes"
    );
    println!("  TCP on this lo: {}", tcp_counters());
    match verdict {
        None if received == total => {
            println!("  D got all {total} bytes, in order: not reproduced");
            ExitCode::SUCCESS
        }
        None => {
            println!("  D got {received} of {total} bytes, then nothing for 20 s");
            ExitCode::FAILURE
        }
        Some(problem) => {
            println!("  REPRODUCED: {problem}");
            ExitCode::FAILURE
        }
    }
}

/// Retransmission counters of this namespace (`/proc/net/netstat`, `/proc/net/snmp`).
fn tcp_counters() -> String {
    let wanted = [
        "RetransSegs",
        "TCPDSACKOldSent",
        "TCPDSACKOfoSent",
        "TCPOFOQueue",
        "TCPLossProbes",
    ];
    let mut found = Vec::new();
    for file in ["/proc/net/snmp", "/proc/net/netstat"] {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        for pair in lines.chunks(2) {
            let [names, values] = pair else { continue };
            for (name, value) in names.split_whitespace().zip(values.split_whitespace()) {
                if wanted.contains(&name) {
                    found.push(format!("{name} {value}"));
                }
            }
        }
    }
    found.join(", ")
}

/// One round: returns every byte that reached the reading end (B itself, or D behind the
/// redirect).
fn run(redirect: bool) -> String {
    let (a, b) = connected_pair();
    let (c, d) = connected_pair();
    // The map and program are dropped (closed) with the round.
    let _bpf = redirect.then(|| {
        let map = sockmap();
        let program = verdict_program(map.as_raw_fd());
        attach(map.as_raw_fd(), program.as_raw_fd());
        // C first: B's bytes must always find their destination.
        map_insert(map.as_raw_fd(), 0, c.as_raw_fd());
        map_insert(map.as_raw_fd(), 1, b.as_raw_fd());
        (map, program)
    });
    let sniffer = Sniffer::open().expect("packet socket on lo");
    let (a_addr, b_addr) = endpoints(&a);
    (&a).write_all(b"0123456789").expect("A sends");
    let reader = if redirect { &d } else { &b };
    let mut got = read_exactly(reader, 10);
    flush_ack(&a).expect("TCP_QUICKACK");
    let last = sniffer
        .latest(a_addr, b_addr)
        .expect("A's segment was captured");
    send_segment(
        a_addr,
        b_addr,
        last.next_seq.wrapping_sub(5),
        &last,
        b"56789ABCDE",
    )
    .expect("raw send");
    got.extend(read_available(reader, Duration::from_millis(500)));
    drop(c);
    String::from_utf8_lossy(&got).into_owned()
}

fn connected_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
    let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
    let (server, _) = listener.accept().expect("accept");
    (client, server)
}

fn read_exactly(mut reader: &TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    reader.read_exact(&mut buf).expect("read");
    buf
}

/// What arrives within `quiet` of the last byte (the stream stays open, so there is no EOF
/// to wait for).
fn read_available(mut reader: &TcpStream, quiet: Duration) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    let mut deadline = Instant::now() + quiet;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        reader
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .expect("timeout");
        match reader.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                deadline = Instant::now() + quiet;
            }
        }
    }
    got
}

fn bpf(cmd: libc::c_long, attr: &mut [u64]) -> i64 {
    // SAFETY: bpf(2) with an attribute buffer we own, of its size; each command reads only
    // the fields set below and requires the rest to be zero.
    unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr),
        )
    }
}

fn owned(fd: i64, what: &str) -> OwnedFd {
    assert!(
        fd >= 0,
        "{what} failed: {} (run as root)",
        std::io::Error::last_os_error()
    );
    // SAFETY: the kernel just returned this descriptor to us alone.
    unsafe { OwnedFd::from_raw_fd(fd as RawFd) }
}

fn sockmap() -> OwnedFd {
    // union bpf_attr for BPF_MAP_CREATE: map_type, key_size, value_size, max_entries.
    let mut attr = [0u64; 8];
    attr[0] = u64::from(BPF_MAP_TYPE_SOCKMAP) | (4 << 32);
    attr[1] = 4 | (2 << 32);
    owned(bpf(BPF_MAP_CREATE, &mut attr), "creating the sockmap")
}

/// `return bpf_sk_redirect_map(skb, map, 0, 0);` -- every byte out of the socket at key 0.
fn verdict_program(map: RawFd) -> OwnedFd {
    let insn = |code: u8, regs: u8, off: i16, imm: i32| -> u64 {
        u64::from(code)
            | (u64::from(regs) << 8)
            | (u64::from(off as u16) << 16)
            | (u64::from(imm as u32) << 32)
    };
    let program = [
        insn(0x18, 2 | (1 << 4), 0, map), // r2 = map (ld_imm64, BPF_PSEUDO_MAP_FD)
        insn(0, 0, 0, 0),                 //      (second half of ld_imm64)
        insn(0xb7, 3, 0, 0),              // r3 = 0 (key)
        insn(0xb7, 4, 0, 0),              // r4 = 0 (flags: egress)
        insn(0x85, 0, 0, BPF_FUNC_SK_REDIRECT_MAP),
        insn(0x95, 0, 0, 0), // exit
    ];
    let license = c"GPL";
    let mut log = vec![0u8; 4096];
    // union bpf_attr for BPF_PROG_LOAD: prog_type, insn_cnt, insns, license, log_level,
    // log_size, log_buf.
    let mut attr = [0u64; 16];
    attr[0] = u64::from(BPF_PROG_TYPE_SK_SKB) | ((program.len() as u64) << 32);
    attr[1] = program.as_ptr() as u64;
    attr[2] = license.as_ptr() as u64;
    attr[3] = 1 | ((log.len() as u64) << 32);
    attr[4] = log.as_mut_ptr() as u64;
    let fd = bpf(BPF_PROG_LOAD, &mut attr);
    assert!(
        fd >= 0,
        "loading the verdict program failed: {}\n{}",
        std::io::Error::last_os_error(),
        String::from_utf8_lossy(&log).trim_end_matches('\0')
    );
    owned(fd, "loading the verdict program")
}

fn attach(map: RawFd, program: RawFd) {
    // union bpf_attr for BPF_PROG_ATTACH: target_fd, attach_bpf_fd, attach_type.
    let mut attr = [0u64; 4];
    attr[0] = map as u64 | ((program as u64) << 32);
    attr[1] = u64::from(BPF_SK_SKB_STREAM_VERDICT);
    assert_eq!(
        bpf(BPF_PROG_ATTACH, &mut attr),
        0,
        "attaching the verdict failed: {}",
        std::io::Error::last_os_error()
    );
}

fn map_insert(map: RawFd, key: u32, socket: RawFd) {
    let value = socket as u32;
    // union bpf_attr for BPF_MAP_UPDATE_ELEM: map_fd, key, value, flags.
    let mut attr = [0u64; 4];
    attr[0] = map as u64;
    attr[1] = (&raw const key) as u64;
    attr[2] = (&raw const value) as u64;
    assert_eq!(
        bpf(BPF_MAP_UPDATE_ELEM, &mut attr),
        0,
        "inserting a socket into the sockmap failed: {}",
        std::io::Error::last_os_error()
    );
}
