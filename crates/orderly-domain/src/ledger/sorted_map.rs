//! A map kept as one sorted vector: what an open line holds per location and
//! per partition. Such maps have one or two entries; a `BTreeMap` spends a
//! whole node (about 450 bytes for a location's parts) on the first one, a
//! vector sized to its entries spends a few dozen. With 100,000 regular
//! orders open at the end of a 1,000,000-order sale that was about 50 MB.
//! It stores and reads as the same JSON object a `BTreeMap` does.

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde::ser::{Serialize, Serializer};
use std::fmt;
use std::marker::PhantomData;

/// A map with the `BTreeMap` calls the ledger makes, in key order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SortedMap<K, V>(Vec<(K, V)>);

impl<K, V> Default for SortedMap<K, V> {
    fn default() -> Self {
        SortedMap(Vec::new())
    }
}

impl<K: Ord, V> SortedMap<K, V> {
    pub(crate) fn new() -> Self {
        SortedMap::default()
    }

    fn find(&self, key: &K) -> Result<usize, usize> {
        self.0.binary_search_by(|(k, _)| k.cmp(key))
    }

    pub(crate) fn get(&self, key: &K) -> Option<&V> {
        self.find(key).ok().map(|i| &self.0[i].1)
    }

    pub(crate) fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        self.find(key).ok().map(|i| &mut self.0[i].1)
    }

    /// The value under `key`, inserted as `V::default()` if absent.
    pub(crate) fn entry_or_default(&mut self, key: K) -> &mut V
    where
        V: Default,
    {
        let i = match self.find(&key) {
            Ok(i) => i,
            Err(i) => {
                // Grow one entry at a time: these maps stay small.
                self.0.reserve_exact(1);
                self.0.insert(i, (key, V::default()));
                i
            }
        };
        &mut self.0[i].1
    }

    pub(crate) fn remove(&mut self, key: &K) -> Option<V> {
        self.find(key).ok().map(|i| self.0.remove(i).1)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    pub(crate) fn values(&self) -> impl Iterator<Item = &V> {
        self.0.iter().map(|(_, v)| v)
    }
}

impl<'a, K: Ord, V> IntoIterator for &'a SortedMap<K, V> {
    type Item = (&'a K, &'a V);
    type IntoIter = std::iter::Map<std::slice::Iter<'a, (K, V)>, fn(&'a (K, V)) -> (&'a K, &'a V)>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(k, v)| (k, v))
    }
}

impl<K: Serialize, V: Serialize> Serialize for SortedMap<K, V> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().map(|(k, v)| (k, v)))
    }
}

impl<'de, K: Deserialize<'de> + Ord, V: Deserialize<'de>> Deserialize<'de> for SortedMap<K, V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MapVisitor<K, V>(PhantomData<(K, V)>);

        impl<'de, K: Deserialize<'de> + Ord, V: Deserialize<'de>> Visitor<'de> for MapVisitor<K, V> {
            type Value = SortedMap<K, V>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Self::Value, A::Error> {
                let mut entries: Vec<(K, V)> = Vec::with_capacity(access.size_hint().unwrap_or(0).min(16));
                while let Some((k, v)) = access.next_entry()? {
                    entries.push((k, v));
                }
                // As a BTreeMap reads it: in key order, the last of a repeated key wins.
                entries.reverse();
                entries.sort_by(|a, b| a.0.cmp(&b.0));
                entries.dedup_by(|later, kept| later.0 == kept.0);
                entries.shrink_to_fit();
                Ok(SortedMap(entries))
            }
        }

        deserializer.deserialize_map(MapVisitor(PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn behaves_and_reads_and_writes_like_a_btreemap() {
        let mut m: SortedMap<u32, u64> = SortedMap::new();
        let mut b: BTreeMap<u32, u64> = BTreeMap::new();
        for (k, v) in [(3, 1), (1, 4), (3, 5), (0, 9), (7, 2), (1, 6)] {
            *m.entry_or_default(k) += v;
            *b.entry(k).or_default() += v;
        }
        assert_eq!(m.iter().map(|(k, v)| (*k, *v)).collect::<Vec<_>>(), b.clone().into_iter().collect::<Vec<_>>());
        assert_eq!(serde_json::to_string(&m).expect("json"), serde_json::to_string(&b).expect("json"));
        assert_eq!(m.get(&3), Some(&6));
        assert_eq!(m.remove(&3), Some(6));
        assert_eq!(m.get(&3), None);
        *m.get_mut(&7).expect("present") = 8;
        assert_eq!(m.values().sum::<u64>(), 9 + (4 + 6) + 8);
        b.remove(&3);
        b.insert(7, 8);
        let json = serde_json::to_string(&b).expect("json");
        assert_eq!(serde_json::from_str::<SortedMap<u32, u64>>(&json).expect("reads"), m);
        // Keys out of order and repeated read as a BTreeMap reads them.
        let messy = r#"{"5":1,"2":7,"5":3}"#;
        let read: SortedMap<u32, u64> = serde_json::from_str(messy).expect("reads");
        let want: BTreeMap<u32, u64> = serde_json::from_str(messy).expect("reads");
        assert_eq!(read.iter().map(|(k, v)| (*k, *v)).collect::<Vec<_>>(), want.into_iter().collect::<Vec<_>>());
        assert!(!read.is_empty());
    }

    #[test]
    fn one_entry_costs_one_entry() {
        let mut m: SortedMap<u32, u64> = SortedMap::new();
        *m.entry_or_default(4) += 1;
        assert_eq!(m.0.capacity(), 1);
    }
}
