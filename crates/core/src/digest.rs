//! SHA-256 digests of credentials: the only form in which a key is ever stored or compared.

use sha2::{Digest as _, Sha256};
use std::fmt;

/// The SHA-256 of a presented credential. Displayed as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

/// A digest hashes as its first eight bytes: they are already uniform, so the hasher of a
/// map keyed by digests has nothing to mix (`rustc_hash`'s Fx, one multiply, where SipHash cost
/// about 250 instructions a lookup). A client chooses which digest is looked up, never which are
/// stored, and a key ground to share a stored digest's first bytes gains nothing but a miss.
impl std::hash::Hash for Digest {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let mut first = [0u8; 8];
        first.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_le_bytes(first));
    }
}

impl Digest {
    /// Hashes a presented credential.
    pub fn of(credential: &[u8]) -> Self {
        Digest(Sha256::digest(credential).into())
    }

    /// Parses 64 hex digits (either case).
    pub fn from_hex(s: &str) -> Option<Self> {
        // By hand: `hex::decode_to_slice` took about 1,000 instructions a digest, and the feed
        // parses one for every record.
        let nibble = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        };
        let hex = s.as_bytes();
        if hex.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
            *byte = nibble(pair[0])? << 4 | nibble(pair[1])?;
        }
        Some(Digest(out))
    }

    pub fn to_hex(&self) -> String {
        let mut out = String::with_capacity(64);
        self.write_hex(&mut out);
        out
    }

    /// Appends the 64 lowercase hex digits to `out` (`hex::encode` goes a char at a time, which
    /// a feed page of thousands of records felt).
    pub fn write_hex(&self, out: &mut String) {
        let mut buf = [0u8; 64];
        if hex::encode_to_slice(self.0, &mut buf).is_ok() {
            out.push_str(std::str::from_utf8(&buf).unwrap_or_default());
        }
    }

    /// The first 12 hex digits: enough to correlate log lines, useless to an attacker.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..6])
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.to_hex())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_is_sha256_hex() {
        assert_eq!(
            Digest::of(b"abc").to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(Digest::of(b"abc").short(), "ba7816bf8f01");
    }

    #[test]
    fn hex_round_trips_and_rejects_garbage() {
        let d = Digest::of(b"key");
        assert_eq!(Digest::from_hex(&d.to_hex()), Some(d));
        assert_eq!(Digest::from_hex(&d.to_hex().to_uppercase()), Some(d));
        assert_eq!(Digest::from_hex("abc"), None);
        assert_eq!(Digest::from_hex(&"g".repeat(64)), None);
        for bad in ["é".repeat(32), format!("{}0", d.to_hex()), d.to_hex()[1..].to_string(), format!("{} ", &d.to_hex()[1..])] {
            assert_eq!(Digest::from_hex(&bad), None, "{bad:?}");
        }
        for b in 0..=255u8 {
            let d = Digest([b; 32]);
            assert_eq!(Digest::from_hex(&d.to_hex()), Some(d));
        }
    }
}
