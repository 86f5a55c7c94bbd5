//! A bounded map whose entries each belong to an owner, and which, when
//! full, evicts the least recently used entry of whichever owner holds the
//! most (max-min fair shares; among the largest, the one adding).
//!
//! A plain LRU lets one owner that adds entries fast push every other
//! owner's out: here it pushes out its own once it holds the largest share,
//! so an owner holding no more than `capacity / owners` keeps all it holds,
//! whatever the others do. With one owner it is a plain LRU.
//!
//! Hand-written because `lru` (which it is built on, one LRU per owner) and
//! the other cache crates evict by recency or frequency over the whole map,
//! never by owner.

use std::collections::{BTreeSet, HashMap};
use std::hash::Hash;
use std::sync::Arc;

/// A value that knows whose it is.
pub(crate) trait Owned {
    /// Who owns a value.
    type Owner: Ord + Hash + Clone;
    /// This value's owner.
    fn owner(&self) -> &Self::Owner;
}

/// The map. Every key is in `entries` and in its owner's `order`; `shares`
/// holds each owner with an entry once, beside its count.
pub(crate) struct FairLru<V: Owned> {
    entries: HashMap<Arc<str>, V>,
    /// Each owner's keys, least recently used first.
    order: HashMap<V::Owner, lru::LruCache<Arc<str>, ()>>,
    /// (entries held, owner): the last is the largest holder.
    shares: BTreeSet<(usize, V::Owner)>,
    capacity: usize,
}

impl<V: Owned> FairLru<V> {
    /// An empty map holding at most `capacity` entries (at least one).
    pub(crate) fn new(capacity: usize) -> Self {
        FairLru {
            entries: HashMap::new(),
            order: HashMap::new(),
            shares: BTreeSet::new(),
            capacity: capacity.max(1),
        }
    }

    /// How many entries it holds.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// The value at `key`, marked as just used.
    pub(crate) fn get_mut(&mut self, key: &str) -> Option<&mut V> {
        let value = self.entries.get_mut(key)?;
        if let Some(order) = self.order.get_mut(value.owner()) {
            order.promote(key);
        }
        Some(value)
    }

    /// The value at `key`, its use unchanged.
    pub(crate) fn peek_mut(&mut self, key: &str) -> Option<&mut V> {
        self.entries.get_mut(key)
    }

    /// Take the value at `key` out.
    pub(crate) fn pop(&mut self, key: &str) -> Option<V> {
        let (key, value) = self.entries.remove_entry(key)?;
        self.forget(value.owner(), &key);
        Some(value)
    }

    /// Put `value` at `key` (replacing what was there), evicting first if
    /// the map is full.
    pub(crate) fn put(&mut self, key: &str, value: V) {
        self.pop(key);
        let owner = value.owner().clone();
        if self.entries.len() >= self.capacity {
            self.evict(&owner);
        }
        let key: Arc<str> = Arc::from(key);
        let order = self
            .order
            .entry(owner.clone())
            .or_insert_with(lru::LruCache::unbounded);
        order.put(key.clone(), ());
        let held = order.len();
        if held > 1 {
            self.shares.remove(&(held - 1, owner.clone()));
        }
        self.shares.insert((held, owner));
        self.entries.insert(key, value);
    }

    /// Drop the least recently used entry of the largest holder, or of
    /// `putter` when it holds as many (so that owners holding even shares
    /// keep them).
    fn evict(&mut self, putter: &V::Owner) {
        let Some((most, largest)) = self.shares.last() else {
            return;
        };
        let owner = match self.order.get(putter) {
            Some(order) if order.len() >= *most => putter.clone(),
            _ => largest.clone(),
        };
        let Some((key, ())) = self.order.get_mut(&owner).and_then(lru::LruCache::pop_lru) else {
            return;
        };
        self.entries.remove(&key);
        self.reshare(owner);
    }

    /// Drop `key` from `owner`'s order.
    fn forget(&mut self, owner: &V::Owner, key: &str) {
        if let Some(order) = self.order.get_mut(owner)
            && order.pop(key).is_some()
        {
            self.reshare(owner.clone());
        }
    }

    /// `owner` holds one entry fewer than `shares` says: say so (and drop
    /// an owner left with none).
    fn reshare(&mut self, owner: V::Owner) {
        let held = self.order.get(&owner).map_or(0, lru::LruCache::len);
        self.shares.remove(&(held + 1, owner.clone()));
        if held == 0 {
            self.order.remove(&owner);
        } else {
            self.shares.insert((held, owner));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct Of(&'static str);

    impl Owned for Of {
        type Owner = &'static str;
        fn owner(&self) -> &&'static str {
            &self.0
        }
    }

    /// Every invariant the map relies on.
    fn check(map: &FairLru<Of>) {
        assert!(map.entries.len() <= map.capacity);
        let ordered: usize = map.order.values().map(lru::LruCache::len).sum();
        assert_eq!(ordered, map.entries.len());
        assert_eq!(map.shares.len(), map.order.len());
        for (held, owner) in &map.shares {
            let order = &map.order[owner];
            assert_eq!(order.len(), *held);
            assert!(*held > 0);
            for (key, ()) in order.iter() {
                assert_eq!(map.entries[key].0, *owner);
            }
        }
    }

    #[test]
    fn one_owner_is_a_plain_lru() {
        let mut map = FairLru::new(3);
        for key in ["a", "b", "c"] {
            map.put(key, Of("x"));
        }
        assert!(map.get_mut("a").is_some());
        map.put("d", Of("x"));
        check(&map);
        assert!(map.peek_mut("b").is_none(), "the least recently used goes");
        for key in ["a", "c", "d"] {
            assert!(map.peek_mut(key).is_some(), "{key}");
        }
    }

    #[test]
    fn an_owner_adding_fast_pushes_out_only_its_own() {
        let mut map = FairLru::new(10);
        for key in ["q1", "q2", "q3"] {
            map.put(key, Of("quiet"));
        }
        let keys: Vec<String> = (0..1000).map(|n| format!("f{n}")).collect();
        for key in &keys {
            map.put(key, Of("flood"));
            check(&map);
        }
        assert_eq!(map.len(), 10);
        for key in ["q1", "q2", "q3"] {
            assert_eq!(map.peek_mut(key), Some(&mut Of("quiet")), "{key}");
        }
        // The flood keeps its seven most recent.
        for key in &keys[993..] {
            assert!(map.peek_mut(key).is_some(), "{key}");
        }
    }

    #[test]
    fn shares_even_out_between_owners_adding_at_once() {
        let mut map = FairLru::new(9);
        for n in 0..9 {
            map.put(&format!("a{n}"), Of("a"));
        }
        for n in 0..100 {
            map.put(&format!("b{n}"), Of("b"));
            map.put(&format!("c{n}"), Of("c"));
            check(&map);
        }
        for owner in ["a", "b", "c"] {
            assert_eq!(map.order[owner].len(), 3, "{owner}");
        }
    }

    #[test]
    fn replacing_or_popping_an_entry_moves_it_between_owners() {
        let mut map = FairLru::new(4);
        map.put("k", Of("a"));
        map.put("k", Of("b"));
        check(&map);
        assert!(!map.order.contains_key("a"));
        assert_eq!(map.pop("k"), Some(Of("b")));
        assert_eq!(map.pop("k"), None);
        check(&map);
        assert!(map.order.is_empty() && map.shares.is_empty());
    }

    proptest::proptest! {
        /// Whatever is put, read and popped, the invariants hold, and no
        /// owner holding no more than an even share loses an entry to
        /// another's puts.
        #[test]
        fn the_map_stays_whole(ops in proptest::collection::vec((0u8..3, 0u8..3, 0u8..12), 0..300)) {
            const OWNERS: [&str; 3] = ["a", "b", "c"];
            let mut map = FairLru::new(6);
            for (op, owner, key) in ops {
                let key = format!("{}{key}", OWNERS[usize::from(owner)]);
                match op {
                    0 => {
                        let mine = |map: &FairLru<Of>| {
                            map.order.iter().map(|(o, order)| (*o, order.len())).collect::<HashMap<_, _>>()
                        };
                        let before = mine(&map);
                        map.put(&key, Of(OWNERS[usize::from(owner)]));
                        let after = mine(&map);
                        for (other, held) in before {
                            if other != OWNERS[usize::from(owner)] && held <= 2 {
                                proptest::prop_assert_eq!(after.get(other), Some(&held));
                            }
                        }
                    }
                    1 => {
                        map.get_mut(&key);
                    }
                    _ => {
                        map.pop(&key);
                    }
                }
                check(&map);
            }
        }
    }
}
