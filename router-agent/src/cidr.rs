//! Address ranges: which clients count as internal (may reach `*.local` domains).
use std::{fmt, net::IpAddr, str::FromStr};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        match (self.network, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => mask_eq(
                u128::from(net.to_bits()),
                u128::from(ip.to_bits()),
                32,
                self.prefix,
            ),
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                mask_eq(net.to_bits(), ip.to_bits(), 128, self.prefix)
            }
            _ => false,
        }
    }

    /// The range of this one address (`/32` or `/128`).
    pub fn host(ip: IpAddr) -> Self {
        let network = canonical(ip);
        let prefix = if network.is_ipv4() { 32 } else { 128 };
        Self { network, prefix }
    }

    pub fn loopback() -> [Self; 2] {
        [
            "127.0.0.0/8".parse().expect("valid"),
            "::1/128".parse().expect("valid"),
        ]
    }
}

/// IPv4-mapped IPv6 addresses (from dual-stack sockets) compare as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

fn mask_eq(a: u128, b: u128, width: u8, prefix: u8) -> bool {
    if prefix == 0 {
        return true;
    }
    let shift = u32::from(width - prefix);
    (a >> shift) == (b >> shift)
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s, None),
        };
        let network: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not a CIDR such as 198.18.0.0/16"))?;
        let width = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => width,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= width)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0 to {width}"))?,
        };
        Ok(Self { network, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl serde::Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn membership() {
        let cases = [
            ("198.18.0.0/16", "198.18.3.4", true),
            ("198.18.0.0/16", "198.19.0.1", false),
            ("198.18.0.0/15", "198.19.0.1", true),
            ("127.0.0.0/8", "127.0.0.1", true),
            ("127.0.0.0/8", "::ffff:127.0.0.1", true),
            ("0.0.0.0/0", "8.8.8.8", true),
            ("198.18.0.5", "198.18.0.5", true),
            ("198.18.0.5", "198.18.0.6", false),
            ("::1/128", "::1", true),
            ("::1/128", "127.0.0.1", false),
            ("fd00::/8", "fd12::1", true),
        ];
        for (cidr, ip, expected) in cases {
            let cidr: Cidr = cidr.parse().unwrap();
            assert_eq!(cidr.contains(ip.parse().unwrap()), expected, "{cidr} {ip}");
        }
    }

    #[test]
    fn bad_cidrs() {
        for bad in [
            "",
            "198.18.0.0/33",
            "198.18/16",
            "x/8",
            "::/129",
            "1.2.3.4/-1",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }
}
