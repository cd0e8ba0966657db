//! The hasher of the maps every request looks up (routes by domain, pooled connections by
//! backend address). std's `SipHash` resists flooding by attacker-chosen keys, but these maps
//! hold keys from container labels and Docker, never from clients (a client's Host header only
//! looks up), and `SipHash` cost about 600 instructions per request in `cargo xtask profile`.
//! FNV-1a costs a few per byte.
use std::hash::{BuildHasherDefault, Hasher};

/// `HashMap` with [`Fnv1a`].
pub type FastHashMap<K, V> = std::collections::HashMap<K, V, BuildHasherDefault<Fnv1a>>;

/// 64-bit FNV-1a.
#[derive(Clone, Copy, Debug)]
pub struct Fnv1a(u64);

const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const PRIME: u64 = 0x0100_0000_01b3;

impl Default for Fnv1a {
    fn default() -> Self {
        Self(OFFSET_BASIS)
    }
}

impl Hasher for Fnv1a {
    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0 ^ u64::from(byte)).wrapping_mul(PRIME);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use std::hash::{BuildHasher as _, BuildHasherDefault};

    use super::*;

    #[test]
    fn matches_the_published_fnv1a_vectors() {
        // From the FNV reference test suite (64-bit FNV-1a).
        for (input, expected) in [
            (&b""[..], 0xcbf2_9ce4_8422_2325_u64),
            (b"a", 0xaf63_dc4c_8601_ec8c),
            (b"foobar", 0x8594_4171_f739_67e8),
        ] {
            let mut hasher = Fnv1a::default();
            hasher.write(input);
            assert_eq!(hasher.finish(), expected, "{input:?}");
        }
    }

    #[test]
    fn map_finds_what_it_holds() {
        let mut map: FastHashMap<String, u32> = FastHashMap::default();
        map.insert("restserver.local".into(), 1);
        map.insert("other.local".into(), 2);
        assert_eq!(map.get("restserver.local"), Some(&1));
        assert_eq!(map.get("other.local"), Some(&2));
        assert_eq!(map.get("missing.local"), None);
        let build = BuildHasherDefault::<Fnv1a>::default();
        assert_ne!(build.hash_one("a"), build.hash_one("b"));
    }
}
