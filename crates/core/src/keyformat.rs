//! The keyward key format: `<prefix>_<random>_<checksum>`.
//!
//! The random part is base62 from the caller's CSPRNG bytes; the checksum is the CRC32 (IEEE)
//! of `<prefix>_<random>`, as six base62 digits. The checksum lets the filter reject mistyped
//! or garbage keys before any lookup, and lets secret scanners recognise leaked keys.

/// The base62 alphabet, in ASCII order.
pub const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
/// Length of the random part: 32 base62 digits carry log2(62^32) ≈ 190.5 bits.
pub const RANDOM_LEN: usize = 32;
/// Length of the checksum: 62^6 > 2^32, so every CRC32 fits.
pub const CHECKSUM_LEN: usize = 6;

/// The checksum of `body` (the key without its last `_` and checksum), as six base62 digits.
pub fn checksum(body: &str) -> String {
    checksum_digits(body).iter().map(|&b| char::from(b)).collect()
}

fn checksum_digits(body: &str) -> [u8; CHECKSUM_LEN] {
    let mut n = crc32(body.as_bytes());
    let mut out = [b'0'; CHECKSUM_LEN];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(n % 62) as usize];
        n /= 62;
    }
    out
}

/// CRC32 (IEEE, reflected, as zlib's), a byte at a time. Keys are far shorter than the 64
/// bytes where a wider table (crc32fast's 16 KiB slice-by-16) starts to pay, and this table is
/// 1 KiB of the filter's module.
fn crc32(bytes: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut bit = 0;
            while bit < 8 {
                c = if c & 1 == 1 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
                bit += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    !bytes.iter().fold(!0u32, |crc, &b| TABLE[usize::from((crc as u8) ^ b)] ^ (crc >> 8))
}

/// Builds a key from a prefix and a source of uniformly random bytes (the caller's CSPRNG).
///
/// Bytes are mapped to base62 by rejection sampling, so every digit is uniform. Returns `None`
/// if the source runs dry before [`RANDOM_LEN`] digits are drawn.
pub fn generate(prefix: &str, random_bytes: impl IntoIterator<Item = u8>) -> Option<String> {
    let mut random = String::with_capacity(RANDOM_LEN);
    let mut bytes = random_bytes.into_iter();
    while random.len() < RANDOM_LEN {
        let b = bytes.next()?;
        // 248 = 4 * 62: reject the top 8 values so that `b % 62` is unbiased.
        if b < 248 {
            random.push(char::from(BASE62[usize::from(b % 62)]));
        }
    }
    let body = format!("{prefix}_{random}");
    let sum = checksum(&body);
    Some(format!("{body}_{sum}"))
}

/// Whether a prefix is acceptable: 1..=32 chars of `[A-Za-z0-9_]`, not starting or ending in `_`.
pub fn valid_prefix(prefix: &str) -> bool {
    (1..=32).contains(&prefix.len())
        && prefix.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !prefix.starts_with('_')
        && !prefix.ends_with('_')
}

/// Outcome of checking a presented credential against the keyward format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FormatCheck {
    /// The credential does not start with a keyward prefix: an imported key, not checked.
    Foreign,
    /// A keyward-format key whose checksum matches.
    Valid,
    /// It starts with a keyward prefix but is not `<prefix>_<random>_<checksum>` with a
    /// matching checksum.
    BadChecksum,
}

/// Checks `key` if it starts with one of `prefixes` followed by `_`.
pub fn check(prefixes: &[String], key: &str) -> FormatCheck {
    let Some(prefix) = prefixes
        .iter()
        .filter(|p| key.len() > p.len() && key.starts_with(p.as_str()) && key.as_bytes()[p.len()] == b'_')
        .max_by_key(|p| p.len())
    else {
        return FormatCheck::Foreign;
    };
    let rest = &key[prefix.len() + 1..];
    let Some((random, sum)) = rest.rsplit_once('_') else {
        return FormatCheck::BadChecksum;
    };
    // The random part is not inspected: a shorter configured prefix (`kw`) sees the rest of a
    // longer one (`live_…`) in it. The checksum covers everything before it either way.
    if random.is_empty()
        || sum.len() != CHECKSUM_LEN
        || checksum_digits(&key[..key.len() - CHECKSUM_LEN - 1]) != sum.as_bytes()
    {
        return FormatCheck::BadChecksum;
    }
    FormatCheck::Valid
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefixes() -> Vec<String> {
        vec!["kw".into(), "kw_live".into()]
    }

    #[test]
    fn generated_keys_have_the_documented_shape() {
        let key = generate("kw_live", (0u8..=255).cycle()).unwrap();
        let parts: Vec<&str> = key.rsplitn(2, '_').collect();
        assert_eq!(parts[0].len(), CHECKSUM_LEN);
        assert!(key.starts_with("kw_live_"));
        assert_eq!(key.len(), "kw_live_".len() + RANDOM_LEN + 1 + CHECKSUM_LEN);
        assert_eq!(check(&prefixes(), &key), FormatCheck::Valid);
    }

    #[test]
    fn random_part_rejects_biased_bytes() {
        // 248..=255 are skipped; 0 maps to '0', 61 to 'z'.
        let key = generate("p", [255u8, 250, 0, 61].into_iter().cycle()).unwrap();
        assert!(key.starts_with("p_0z0z0z"), "{key}");
        assert_eq!(generate("p", [1u8, 2, 3]), None);
    }

    #[test]
    fn checksum_is_six_base62_digits_of_crc32() {
        // CRC32("") = 0, CRC32("a") = 0xe8b7be43 = 3904355907.
        assert_eq!(checksum(""), "000000");
        let mut n = 3_904_355_907u64;
        let mut want = Vec::new();
        for _ in 0..6 {
            want.push(BASE62[(n % 62) as usize]);
            n /= 62;
        }
        want.reverse();
        assert_eq!(checksum("a").as_bytes(), want.as_slice());
    }

    #[test]
    fn crc32_is_the_ieee_crc() {
        // The check values of CRC-32/ISO-HDLC (zlib's crc32).
        for (input, want) in [("", 0), ("a", 0xe8b7_be43), ("123456789", 0xcbf4_3926)] {
            assert_eq!(crc32(input.as_bytes()), want, "{input}");
        }
    }

    #[test]
    fn check_classifies_keys() {
        let good = generate("kw_live", (7u8..=200).cycle()).unwrap();
        let mut typo = good.clone().into_bytes();
        typo[10] = if typo[10] == b'a' { b'b' } else { b'a' };
        let typo = String::from_utf8(typo).unwrap();
        let check_case = |key: &str, want: FormatCheck| assert_eq!(check(&prefixes(), key), want, "{key}");
        check_case(&good, FormatCheck::Valid);
        check_case(&typo, FormatCheck::BadChecksum);
        check_case("kw_live_nochecksum", FormatCheck::BadChecksum);
        check_case("kw_live__abcdef", FormatCheck::BadChecksum);
        check_case("kw_", FormatCheck::BadChecksum);
        check_case("kw", FormatCheck::Foreign);
        check_case("kwx_abc_def", FormatCheck::Foreign);
        check_case("legacy-kong-key-123", FormatCheck::Foreign);
        check_case("sk_live_abc_000000", FormatCheck::Foreign);
    }

    #[test]
    fn prefixes_are_validated() {
        for (p, ok) in [("kw", true), ("kw_live", true), ("", false), ("_kw", false), ("kw_", false), ("k-w", false)] {
            assert_eq!(valid_prefix(p), ok, "{p}");
        }
    }
}
