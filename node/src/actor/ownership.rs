//! Rendezvous (highest random weight) hashing: the owner of a key is the member with the
//! highest `hash(member, key)`. Deterministic across nodes and processes (a fixed 64-bit
//! mix over [`crate::hash::fnv1a`], never `std`'s randomly keyed hasher).

/// The owner of `key` among `members` (node ids), or `None` when there are none.
pub fn owner(key: &[u8], members: impl IntoIterator<Item = u64>) -> Option<u64> {
    let k = crate::hash::fnv1a(key);
    members.into_iter().max_by_key(|m| (weight(*m, k), *m))
}

/// The owner of `key` and, after it, the member that takes the key over if the owner is
/// lost (the next highest score): at most two, best first.
pub fn owner_and_backup(key: &[u8], members: impl IntoIterator<Item = u64>) -> Vec<u64> {
    let k = crate::hash::fnv1a(key);
    let mut ranked: Vec<(u64, u64)> = members.into_iter().map(|m| (weight(m, k), m)).collect();
    ranked.sort_unstable_by(|a, b| b.cmp(a));
    ranked.into_iter().take(2).map(|(_, m)| m).collect()
}

/// The member's score for a key: a 64-bit finalizer (SplitMix64's) over the pair, so
/// nearby ids and keys still spread.
fn weight(member: u64, key_hash: u64) -> u64 {
    let mut z = key_hash ^ member.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn keys(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("quota/per-key/tgk_{i:08x}"))
            .collect()
    }

    #[test]
    fn the_owner_is_the_same_whatever_the_order_of_the_members() {
        for k in keys(200) {
            assert_eq!(
                owner(k.as_bytes(), [1, 2, 3]),
                owner(k.as_bytes(), [3, 1, 2])
            );
        }
        assert_eq!(owner(b"x", []), None);
        assert_eq!(owner(b"x", [7]), Some(7));
        // The backup is who owns the key once the owner is gone.
        for k in keys(200) {
            let both = owner_and_backup(k.as_bytes(), [1, 2, 3]);
            assert_eq!(both[0], owner(k.as_bytes(), [1, 2, 3]).unwrap());
            let rest = [1, 2, 3].into_iter().filter(|m| *m != both[0]);
            assert_eq!(Some(both[1]), owner(k.as_bytes(), rest));
        }
    }

    #[test]
    fn keys_spread_evenly_and_only_a_leaving_members_keys_move() {
        let ks = keys(30_000);
        let before: Vec<u64> = ks
            .iter()
            .map(|k| owner(k.as_bytes(), [1, 2, 3]).unwrap())
            .collect();
        let mut count: HashMap<u64, usize> = HashMap::new();
        for o in &before {
            *count.entry(*o).or_default() += 1;
        }
        for id in [1, 2, 3] {
            let share = count[&id] as f64 / ks.len() as f64;
            assert!((0.30..0.37).contains(&share), "node {id}: {share}");
        }
        // Node 2 leaves: its keys spread over 1 and 3; nobody else's key moves.
        let mut moved_to: HashMap<u64, usize> = HashMap::new();
        for (k, was) in ks.iter().zip(&before) {
            let now = owner(k.as_bytes(), [1, 3]).unwrap();
            if *was == 2 {
                *moved_to.entry(now).or_default() += 1;
            } else {
                assert_eq!(now, *was, "{k} moved though its owner stayed");
            }
        }
        let (a, b) = (moved_to[&1] as f64, moved_to[&3] as f64);
        assert!((a / (a + b) - 0.5).abs() < 0.03, "{moved_to:?}");
        // Node 4 joins: it takes about a quarter, and only from the others.
        let mut taken = 0;
        for (k, was) in ks.iter().zip(&before) {
            let now = owner(k.as_bytes(), [1, 2, 3, 4]).unwrap();
            if now != *was {
                assert_eq!(now, 4);
                taken += 1;
            }
        }
        let share = taken as f64 / ks.len() as f64;
        assert!((0.22..0.28).contains(&share), "{share}");
    }
}
