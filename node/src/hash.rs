//! FNV-1a 64: a fixed, fast, non-cryptographic hash for what must come out the same in
//! every process (object digests for plans, sticky version picks, actor ownership). Never
//! a security boundary; keyed hashes of secrets use HMAC (`state::access`).

/// FNV-1a 64 of `bytes`.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The same, as 16 hex digits.
pub fn fnv1a_hex(bytes: &[u8]) -> String {
    format!("{:016x}", fnv1a(bytes))
}
