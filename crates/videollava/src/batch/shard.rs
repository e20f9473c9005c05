//! `--shard I/N`: which rows one of N workers runs.
//!
//! Row `id` belongs to shard `fnv1a64(utf8(id)) mod N`, where `fnv1a64` is the 64-bit FNV-1a
//! hash (offset basis 0xcbf29ce484222325, prime 0x100000001b3) of the id's UTF-8 bytes. It
//! depends on nothing but the id, so any tool can reproduce it, the shards of one manifest are
//! disjoint and together hold every row, and a row keeps its shard when rows are added.

use std::str::FromStr;

use crate::error::{Error, Result};

/// Shard `index` of `count` (0 <= index < count).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: u64,
    pub count: u64,
}

/// 64-bit FNV-1a of `bytes`.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

impl Shard {
    /// Every row: shard 0 of 1.
    pub const ALL: Shard = Shard { index: 0, count: 1 };

    /// Whether the row `id` belongs to this shard.
    pub fn contains(&self, id: &str) -> bool {
        fnv1a64(id.as_bytes()) % self.count == self.index
    }
}

impl FromStr for Shard {
    type Err = Error;
    /// `I/N`, e.g. `0/3`.
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::Input(format!("shard `{s}`: expected I/N with 0 <= I < N, e.g. 0/3"));
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let index: u64 = i.trim().parse().map_err(|_| bad())?;
        let count: u64 = n.trim().parse().map_err(|_| bad())?;
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a64_reference_values() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(fnv1a64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x85944171f73967e8);
    }

    #[test]
    fn shards_partition_the_ids() {
        let ids: Vec<String> = (0..300).map(|i| format!("row-{i}")).collect();
        let shards: Vec<Shard> = (0..3).map(|i| format!("{i}/3").parse().unwrap()).collect();
        for id in &ids {
            assert_eq!(shards.iter().filter(|s| s.contains(id)).count(), 1, "{id}");
        }
        for s in &shards {
            let n = ids.iter().filter(|id| s.contains(id)).count();
            assert!((60..=140).contains(&n), "shard {s} holds {n} of 300");
        }
        assert!(Shard::ALL.contains("anything"));
    }

    #[test]
    fn bad_shards_are_refused() {
        for s in ["3/3", "1/0", "a/3", "1", "-1/3", "1/3/4"] {
            assert!(s.parse::<Shard>().is_err(), "{s}");
        }
        assert_eq!("2/5".parse::<Shard>().unwrap(), Shard { index: 2, count: 5 });
    }
}
