//! A bounded map whose entries each belong to an owner, and which, when
//! full, evicts the least recently used entry of whichever owner holds the
//! most (max-min fair shares; among the largest, the one adding).
//!
//! A plain LRU lets one owner that adds entries fast push every other
//! owner's out: here it pushes out its own once it holds the largest share.
//! An owner holding no more than an even share — the capacity over the
//! owners holding entries, the one adding counted — keeps all it holds,
//! whatever the others do. With one owner it is a plain LRU.
//!
//! Hand-written because `lru` and the other cache crates evict by recency
//! or frequency over the whole map, never by owner. The entries live in one
//! slab of nodes, each owner's threaded through it as a list from least to
//! most recently used, beside an index from key to node: two allocations
//! per entry less than a map of per-owner LRUs, and no table that grows
//! with an owner's peak and stays.

use std::collections::{BTreeSet, HashMap};
use std::hash::Hash;
use std::sync::Arc;

/// A value that knows whose it is.
pub(crate) trait Owned {
    /// Who owns a value.
    type Owner: Ord + Hash + Clone;
    /// This value's owner (read when the value is put; the map keeps it).
    fn owner(&self) -> &Self::Owner;
}

/// No node.
const NIL: u32 = u32::MAX;

/// A slot of the slab: an entry, linked to its owner's neighbours (older
/// `prev`, newer `next`); a free slot's `next` is the next free one.
struct Node<V: Owned> {
    entry: Option<Entry<V>>,
    prev: u32,
    next: u32,
}

struct Entry<V: Owned> {
    key: Arc<str>,
    /// The owner whose list the node is on: the value's when put.
    owner: V::Owner,
    value: V,
}

/// One owner's entries, least recently used first.
#[derive(Clone, Copy)]
struct List {
    oldest: u32,
    newest: u32,
    len: usize,
}

/// The map.
pub(crate) struct FairLru<V: Owned> {
    /// Each key's node.
    index: HashMap<Arc<str>, u32>,
    nodes: Vec<Node<V>>,
    /// The first free slot.
    free: u32,
    lists: HashMap<V::Owner, List>,
    /// (entries held, owner) for each owner with a list: the last is the
    /// largest holder.
    shares: BTreeSet<(usize, V::Owner)>,
    capacity: usize,
}

impl<V: Owned> FairLru<V> {
    /// An empty map holding at most `capacity` entries (at least one, at
    /// most 2³² − 2).
    pub(crate) fn new(capacity: usize) -> Self {
        let capacity = capacity.clamp(1, NIL as usize - 1);
        FairLru {
            // Both grow with use (an idle proxy holds none of it): the
            // index a few times over the map's life, the slab up to the
            // capacity exactly.
            index: HashMap::new(),
            nodes: Vec::new(),
            free: NIL,
            lists: HashMap::new(),
            shares: BTreeSet::new(),
            capacity,
        }
    }

    /// How many entries it holds.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.index.len()
    }

    /// The value at `key`, marked as just used.
    pub(crate) fn get_mut(&mut self, key: &str) -> Option<&mut V> {
        let at = *self.index.get(key)?;
        let entry = self.nodes[at as usize].entry.as_ref()?;
        if let Some(list) = self.lists.get_mut(&entry.owner)
            && list.newest != at
        {
            detach(&mut self.nodes, list, at);
            attach(&mut self.nodes, list, at);
        }
        self.nodes[at as usize].entry.as_mut().map(|e| &mut e.value)
    }

    /// The value at `key`, its use unchanged.
    pub(crate) fn peek_mut(&mut self, key: &str) -> Option<&mut V> {
        let at = *self.index.get(key)?;
        self.nodes[at as usize].entry.as_mut().map(|e| &mut e.value)
    }

    /// Take the value at `key` out.
    pub(crate) fn pop(&mut self, key: &str) -> Option<V> {
        let at = self.index.remove(key)?;
        self.take(at).map(|(_, value)| value)
    }

    /// Put `value` at `key` (replacing what was there), evicting first if
    /// the map is full.
    pub(crate) fn put(&mut self, key: &str, value: V) {
        self.pop(key);
        let owner = value.owner().clone();
        let held = self.lists.get(&owner).map_or(0, |list| list.len);
        // Full: the adding owner gives up its own oldest when it holds as
        // many as the largest holder (its count is then unchanged), else
        // the largest holder does.
        let mut same_share = false;
        if self.index.len() >= self.capacity
            && let Some((most, largest)) = self.shares.last()
        {
            let loser = if held > 0 && held >= *most {
                same_share = true;
                owner.clone()
            } else {
                largest.clone()
            };
            if let Some(oldest) = self.lists.get(&loser).map(|list| list.oldest) {
                if let Some(entry) = self.nodes[oldest as usize].entry.as_ref() {
                    self.index.remove(&entry.key);
                }
                if same_share {
                    // Unlinked and freed without a change of share.
                    if let Some(list) = self.lists.get_mut(&loser) {
                        detach(&mut self.nodes, list, oldest);
                    }
                    self.release(oldest);
                } else {
                    self.take(oldest);
                }
            }
        }
        let key: Arc<str> = Arc::from(key);
        let at = self.slot(Entry {
            key: key.clone(),
            owner: owner.clone(),
            value,
        });
        let list = self.lists.entry(owner.clone()).or_insert(List {
            oldest: NIL,
            newest: NIL,
            len: 0,
        });
        attach(&mut self.nodes, list, at);
        let now = list.len;
        if !same_share {
            if now > 1 {
                self.shares.remove(&(now - 1, owner.clone()));
            }
            self.shares.insert((now, owner));
        }
        self.index.insert(key, at);
    }

    /// A slot for `entry`: a free one, or a new one.
    fn slot(&mut self, entry: Entry<V>) -> u32 {
        if self.free != NIL {
            let at = self.free;
            let node = &mut self.nodes[at as usize];
            self.free = node.next;
            node.entry = Some(entry);
            at
        } else {
            if self.nodes.len() == self.nodes.capacity() {
                // Doubling, but never past the capacity.
                let more = self
                    .nodes
                    .len()
                    .max(16)
                    .min(self.capacity - self.nodes.len());
                self.nodes.reserve_exact(more.max(1));
            }
            self.nodes.push(Node {
                entry: Some(entry),
                prev: NIL,
                next: NIL,
            });
            u32::try_from(self.nodes.len() - 1).expect("the capacity is below u32::MAX")
        }
    }

    /// Free slot `at` (already off its list).
    fn release(&mut self, at: u32) -> Option<Entry<V>> {
        let node = &mut self.nodes[at as usize];
        let entry = node.entry.take();
        node.prev = NIL;
        node.next = self.free;
        self.free = at;
        entry
    }

    /// Unlink slot `at` (already out of the index) from its owner's list,
    /// free it, and count the owner's share one less.
    fn take(&mut self, at: u32) -> Option<(V::Owner, V)> {
        let owner = self.nodes[at as usize].entry.as_ref()?.owner.clone();
        let left = match self.lists.get_mut(&owner) {
            Some(list) => {
                detach(&mut self.nodes, list, at);
                list.len
            }
            None => 0,
        };
        self.shares.remove(&(left + 1, owner.clone()));
        if left == 0 {
            self.lists.remove(&owner);
        } else {
            self.shares.insert((left, owner.clone()));
        }
        self.release(at).map(|entry| (owner, entry.value))
    }
}

/// Take node `at` off `list`.
fn detach<V: Owned>(nodes: &mut [Node<V>], list: &mut List, at: u32) {
    let (prev, next) = (nodes[at as usize].prev, nodes[at as usize].next);
    match prev {
        NIL => list.oldest = next,
        prev => nodes[prev as usize].next = next,
    }
    match next {
        NIL => list.newest = prev,
        next => nodes[next as usize].prev = prev,
    }
    list.len -= 1;
}

/// Put node `at` at the newest end of `list`.
fn attach<V: Owned>(nodes: &mut [Node<V>], list: &mut List, at: u32) {
    nodes[at as usize].prev = list.newest;
    nodes[at as usize].next = NIL;
    match list.newest {
        NIL => list.oldest = at,
        newest => nodes[newest as usize].next = at,
    }
    list.newest = at;
    list.len += 1;
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

    /// `owner`'s keys, least recently used first, walked both ways.
    fn keys_of(map: &FairLru<Of>, owner: &str) -> Vec<String> {
        let Some(list) = map.lists.get(owner) else {
            return Vec::new();
        };
        let mut keys = Vec::new();
        let (mut at, mut before) = (list.oldest, NIL);
        while at != NIL {
            let node = &map.nodes[at as usize];
            assert_eq!(node.prev, before, "linked both ways");
            keys.push(node.entry.as_ref().unwrap().key.to_string());
            (before, at) = (at, node.next);
        }
        assert_eq!(before, list.newest);
        keys
    }

    fn held_by(map: &FairLru<Of>, owner: &str) -> usize {
        map.lists.get(owner).map_or(0, |list| list.len)
    }

    /// Every invariant the map relies on.
    fn check(map: &FairLru<Of>) {
        assert!(map.index.len() <= map.capacity);
        let listed: usize = map.lists.values().map(|list| list.len).sum();
        assert_eq!(listed, map.index.len());
        assert_eq!(map.shares.len(), map.lists.len());
        for (held, owner) in &map.shares {
            let keys = keys_of(map, owner);
            assert_eq!(keys.len(), *held);
            assert!(*held > 0);
            for key in keys {
                let at = map.index[key.as_str()];
                let entry = map.nodes[at as usize].entry.as_ref().unwrap();
                assert_eq!(entry.owner, *owner);
                assert_eq!(entry.value.0, *owner);
            }
        }
        // Every slot is in use or free, once.
        let mut free = 0;
        let mut at = map.free;
        while at != NIL {
            assert!(map.nodes[at as usize].entry.is_none());
            free += 1;
            at = map.nodes[at as usize].next;
        }
        assert_eq!(free + map.index.len(), map.nodes.len());
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
            assert_eq!(held_by(&map, owner), 3, "{owner}");
        }
    }

    #[test]
    fn replacing_or_popping_an_entry_moves_it_between_owners() {
        let mut map = FairLru::new(4);
        map.put("k", Of("a"));
        map.put("k", Of("b"));
        check(&map);
        assert!(!map.lists.contains_key("a"));
        assert_eq!(map.pop("k"), Some(Of("b")));
        assert_eq!(map.pop("k"), None);
        check(&map);
        assert!(map.lists.is_empty() && map.shares.is_empty());
    }

    proptest::proptest! {
        /// Whatever the capacity and whatever is put, read and popped, the
        /// invariants hold, and no owner holding no more than an even share
        /// (of three owners) loses an entry to another's puts.
        #[test]
        fn the_map_stays_whole(
            capacity in 1usize..10,
            ops in proptest::collection::vec((0u8..3, 0u8..3, 0u8..12), 0..300),
        ) {
            const OWNERS: [&str; 3] = ["a", "b", "c"];
            let mut map = FairLru::new(capacity);
            for (op, owner, key) in ops {
                let key = format!("{}{key}", OWNERS[usize::from(owner)]);
                match op {
                    0 => {
                        let mine = |map: &FairLru<Of>| {
                            map.lists.iter().map(|(o, list)| (*o, list.len)).collect::<HashMap<_, _>>()
                        };
                        let before = mine(&map);
                        map.put(&key, Of(OWNERS[usize::from(owner)]));
                        let after = mine(&map);
                        for (other, held) in before {
                            if other != OWNERS[usize::from(owner)] && held * OWNERS.len() <= capacity {
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
