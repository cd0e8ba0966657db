//! Hand-made TCP segments on the loopback device: watch a connection's segments with a packet
//! socket, then send one of its own, as a retransmission that repeats some bytes already sent
//! and carries some new ones.
//!
//! TCP queues such a segment whole and lets the reader skip the repeated head; the sockmap
//! reader does not skip it (docs/kernel-findings.md). A sender retransmits this way only under
//! loss, rarely; injecting the segment makes the case happen on demand.
use std::{
    io,
    net::{SocketAddrV4, TcpStream},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
};

/// What the last segment of one direction of a connection said.
#[derive(Clone, Debug)]
pub struct Segment {
    /// Sequence number just past its data: the sender's next byte.
    pub next_seq: u32,
    pub ack: u32,
    pub window: u16,
    /// Its TCP options (the timestamps, when the connection uses them), to be repeated.
    pub options: Vec<u8>,
}

/// A packet socket on `lo` (`ETH_P_IP`, without link headers), read without blocking.
pub struct Sniffer {
    fd: OwnedFd,
}

const ETH_P_IP: u16 = 0x0800;

impl Sniffer {
    /// Needs `CAP_NET_RAW`. Open it before the segments to watch are sent.
    pub fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2); the descriptor is owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                i32::from(ETH_P_IP.to_be()),
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let name = c"lo";
        // SAFETY: if_nametoindex reads a NUL-terminated string.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid start.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = ETH_P_IP.to_be();
        addr.sll_ifindex = index as i32;
        // SAFETY: bind with a sockaddr_ll of its own size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        set_int(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF, 8 << 20)?;
        Ok(Self { fd })
    }

    /// Reads every packet captured so far and returns the last segment from `from` to `to`
    /// among them (`None` if none was captured).
    pub fn latest(&self, from: SocketAddrV4, to: SocketAddrV4) -> Option<Segment> {
        let mut buf = vec![0u8; 70_000];
        let mut last = None;
        loop {
            // SAFETY: recv into a buffer we own, of its length.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            let Ok(n) = usize::try_from(n) else {
                return last;
            };
            if let Some(segment) = parse(&buf[..n], from, to) {
                last = Some(segment);
            }
        }
    }
}

fn parse(packet: &[u8], from: SocketAddrV4, to: SocketAddrV4) -> Option<Segment> {
    let ip_header = usize::from(*packet.first()? & 0x0f) * 4;
    if packet.len() < ip_header + 20 || packet[9] != libc::IPPROTO_TCP as u8 {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([packet[2], packet[3]])).min(packet.len());
    let (src, dst) = (&packet[12..16], &packet[16..20]);
    let tcp = &packet[ip_header..total];
    let port = |at: usize| u16::from_be_bytes([tcp[at], tcp[at + 1]]);
    let word = |at: usize| u32::from_be_bytes([tcp[at], tcp[at + 1], tcp[at + 2], tcp[at + 3]]);
    if src != from.ip().octets() || dst != to.ip().octets() {
        return None;
    }
    if port(0) != from.port() || port(2) != to.port() {
        return None;
    }
    let header = usize::from(tcp[12] >> 4) * 4;
    let payload = tcp.len().checked_sub(header)?;
    let syn_fin = u32::from(tcp[13] & 0x03 != 0);
    Some(Segment {
        next_seq: word(4).wrapping_add(payload as u32).wrapping_add(syn_fin),
        ack: word(8),
        window: port(14),
        options: tcp[20..header].to_vec(),
    })
}

/// Sends one TCP segment from `from` to `to` (flags ACK and PSH) through a raw socket: the
/// kernel adds the IP header and delivers it on `lo` as if `from`'s socket had sent it.
pub fn send_segment(
    from: SocketAddrV4,
    to: SocketAddrV4,
    seq: u32,
    last: &Segment,
    payload: &[u8],
) -> io::Result<()> {
    let header_len = 20 + last.options.len();
    let mut tcp = Vec::with_capacity(header_len + payload.len());
    tcp.extend_from_slice(&from.port().to_be_bytes());
    tcp.extend_from_slice(&to.port().to_be_bytes());
    tcp.extend_from_slice(&seq.to_be_bytes());
    tcp.extend_from_slice(&last.ack.to_be_bytes());
    tcp.push(((header_len / 4) as u8) << 4);
    tcp.push(0x18); // PSH | ACK
    tcp.extend_from_slice(&last.window.to_be_bytes());
    tcp.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    tcp.extend_from_slice(&last.options);
    tcp.extend_from_slice(payload);
    let checksum = tcp_checksum(from, to, &tcp);
    tcp[16..18].copy_from_slice(&checksum.to_be_bytes());

    // SAFETY: plain socket(2); the descriptor is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_TCP,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let source = sockaddr(SocketAddrV4::new(*from.ip(), 0));
    // SAFETY: bind with a sockaddr_in of its own size: the kernel then uses `from`'s address
    // as the IP source.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const source).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let destination = sockaddr(SocketAddrV4::new(*to.ip(), 0));
    // SAFETY: sendto from a buffer we own, to a sockaddr_in of its own size.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            tcp.as_ptr().cast(),
            tcp.len(),
            0,
            (&raw const destination).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn sockaddr(addr: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr.ip().octets()),
        },
        sin_zero: [0; 8],
    }
}

fn tcp_checksum(from: SocketAddrV4, to: SocketAddrV4, tcp: &[u8]) -> u16 {
    let mut sum = 0u32;
    let mut add = |bytes: &[u8]| {
        for pair in bytes.chunks(2) {
            sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
        }
    };
    add(&from.ip().octets());
    add(&to.ip().octets());
    add(&[0, libc::IPPROTO_TCP as u8]);
    add(&(tcp.len() as u16).to_be_bytes());
    add(tcp);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Flushes an ACK the socket's kernel has scheduled but not sent yet (`TCP_QUICKACK`), so that
/// its last segment is the one the sniffer saw last.
pub fn flush_ack(stream: &TcpStream) -> io::Result<()> {
    set_int(stream.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_QUICKACK, 1)
}

fn set_int(fd: RawFd, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: setsockopt reads one int we own.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const value).cast(),
            std::mem::size_of::<i32>() as u32,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The local and peer IPv4 addresses of a connected stream.
pub fn endpoints(stream: &TcpStream) -> (SocketAddrV4, SocketAddrV4) {
    let v4 = |addr: std::net::SocketAddr| match addr {
        std::net::SocketAddr::V4(addr) => addr,
        std::net::SocketAddr::V6(addr) => panic!("IPv4 only here, got {addr}"),
    };
    (
        v4(stream.local_addr().expect("local address")),
        v4(stream.peer_addr().expect("peer address")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_segment_carrying_its_checksum_sums_to_zero() {
        // A SYN from 127.0.0.1:40000 to 127.0.0.1:80 (seq 1, window 65495). RFC 1071: the
        // one's complement sum over the pseudo-header and a segment that carries its checksum
        // is all ones, so the function (which complements) returns 0 for it.
        let from = SocketAddrV4::new([127, 0, 0, 1].into(), 40_000);
        let to = SocketAddrV4::new([127, 0, 0, 1].into(), 80);
        let mut tcp = vec![0u8; 20];
        tcp[0..2].copy_from_slice(&40_000u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&80u16.to_be_bytes());
        tcp[4..8].copy_from_slice(&1u32.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = 0x02;
        tcp[14..16].copy_from_slice(&65_495u16.to_be_bytes());
        let checksum = tcp_checksum(from, to, &tcp);
        tcp[16..18].copy_from_slice(&checksum.to_be_bytes());
        // Summing a segment that carries its own checksum gives 0 (all ones, complemented).
        assert_eq!(tcp_checksum(from, to, &tcp), 0);
    }
}
