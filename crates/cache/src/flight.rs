//! Single flight: concurrent identical requests share one upstream call.
//!
//! The first request for a key leads a [`Flight`]; later ones follow it. The
//! leader appends the frames of its answer to the flight's buffer as they
//! pass to its own client; followers read the buffer from the start and wait
//! for more (their wakers are woken on every append), so they receive the
//! leader's chunks live, none lost.
//!
//! A leader that fails before its response head (an error, a non-`200`, its
//! client gone) fails the flight with a retry: each follower starts over, and
//! the first to find no flight leads the next one. A flight that fails after
//! the head hands its followers the same bytes the leader's client got, then
//! the error.
//!
//! The upstream's body is the flight's [`Source`], read by whichever reader
//! needs its next frame first: the leader's client as long as it keeps up,
//! a follower's when the leader's falls behind or leaves. So a client that
//! reads slowly, or not at all, holds back no other: a frame a follower
//! reads from the upstream waits in the leader's queue, of at most
//! `max_entry_bytes`; past that the followers wait for the leader (the
//! bound on what one slow client makes the proxy hold). Readers that wait
//! for the upstream are all woken when it has more ([`FanOut`]), so that
//! the one whose client reads goes on even when the one that polled it
//! last is stuck behind its client.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::task::{Context, Poll, Wake, Waker};

use bytes::Bytes;
use foldhash::fast::RandomState;
use http::HeaderValue;

use crate::CacheKey;
use crate::body::Source;

const SHARDS: usize = 16;

type Map = HashMap<CacheKey, Arc<Flight>, RandomState>;
type Shard = Mutex<Map>;

/// The flights in progress, by key.
#[derive(Debug)]
pub(crate) struct Flights {
    shards: Box<[Shard]>,
}

/// What [`Flights::join`] made of a request.
pub(crate) enum Joined {
    /// No flight for the key: this request leads a new one.
    Lead(Leader),
    /// A flight is in progress: this request follows it.
    Follow(Follower),
}

/// How a flight's answer starts.
#[derive(Clone, Debug)]
pub(crate) struct Head {
    pub content_type: Option<HeaderValue>,
    /// For an answer from the store, when it was stored; `None` for a live
    /// answer (age 0).
    pub stored_at_ms: Option<u64>,
    /// A chat stream without the usage chunk because the upstream refused
    /// `stream_options`: not for a request that asks for the chunk.
    pub usage_refused: bool,
}

#[derive(Debug)]
pub(crate) struct Flight {
    key: CacheKey,
    state: Mutex<State>,
    /// Followers that still wait or read; changed under the map's lock.
    followers: AtomicUsize,
    /// The upstream's body while it is read (see the module docs). Locked
    /// before `state` or the map's shard, never after.
    source: Mutex<Option<Source>>,
    /// The waker the source is polled with while the flight has followers:
    /// it wakes every waiting reader ([`FanOut`]).
    fan_out: OnceLock<Waker>,
}

/// Wakes every reader waiting on a flight: the source's waker while the
/// flight has followers. (Weak: the source it is given to lives in the
/// flight.)
struct FanOut(Weak<Flight>);

impl Wake for FanOut {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if let Some(flight) = self.0.upgrade() {
            flight.wake_all();
        }
    }
}

#[derive(Debug, Default)]
struct State {
    head: Option<Head>,
    frames: Vec<Bytes>,
    /// Frames are no longer kept, and why.
    dropped_frames: Option<Dropped>,
    end: Option<End>,
    wakers: Vec<Waker>,
    /// The leader's client's body, waiting for the upstream: woken by the
    /// source's waker while the flight has followers ([`FanOut`]) and when a
    /// follower reads a frame for it, but not by the leader's own frames.
    leader: Option<Waker>,
    /// What `frames` count against the proxy's body budget, handed over by
    /// the tee when it ends: the frames live as long as the flight (its
    /// followers read them), and so does their count.
    held: Option<llm_proxy_core::BudgetHold>,
}

/// Why a flight's frames were dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dropped {
    /// Too large to store, and nobody follows or the followers' share
    /// passed its cap.
    TooLarge,
    /// The proxy's budget for the answers it holds is spent.
    BudgetFull,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum End {
    Complete,
    Failed,
}

/// Why a follower did not get an answer from the flight it followed.
#[derive(Debug)]
pub(crate) struct Retry;

impl Flights {
    pub fn new() -> Self {
        Flights {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        }
    }

    fn shard(&self, key: &CacheKey) -> MutexGuard<'_, Map> {
        let index = (key.shard_hash() % SHARDS as u64) as usize;
        self.shards[index]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Follow the flight for `key`, or lead a new one.
    pub fn join(self: &Arc<Self>, key: CacheKey) -> Joined {
        let mut map = self.shard(&key);
        if let Some(flight) = map.get(&key) {
            flight.followers.fetch_add(1, Ordering::SeqCst);
            return Joined::Follow(Follower {
                flight: flight.clone(),
            });
        }
        let flight = Arc::new(Flight::new(key));
        map.insert(key, flight.clone());
        Joined::Lead(Leader {
            flight,
            flights: Some(self.clone()),
            finished: false,
        })
    }

    fn remove(&self, flight: &Arc<Flight>) {
        let mut map = self.shard(&flight.key);
        if map.get(&flight.key).is_some_and(|f| Arc::ptr_eq(f, flight)) {
            map.remove(&flight.key);
        }
    }

    /// Whether `flight` has followers; if not, it is removed from the map in
    /// the same step, so that none can join it afterwards.
    fn retire_unless_followed(&self, flight: &Arc<Flight>) -> bool {
        let mut map = self.shard(&flight.key);
        if flight.followers.load(Ordering::SeqCst) > 0 {
            return true;
        }
        if map.get(&flight.key).is_some_and(|f| Arc::ptr_eq(f, flight)) {
            map.remove(&flight.key);
        }
        false
    }
}

impl Flight {
    fn new(key: CacheKey) -> Self {
        Flight {
            key,
            state: Mutex::default(),
            followers: AtomicUsize::new(0),
            source: Mutex::default(),
            fan_out: OnceLock::new(),
        }
    }

    /// The upstream's body, while it is read.
    pub(crate) fn source(&self) -> MutexGuard<'_, Option<Source>> {
        self.source
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether requests follow this flight.
    pub(crate) fn followed(&self) -> bool {
        self.followers.load(Ordering::SeqCst) > 0
    }

    /// Wake the leader's client's body with `cx` when the upstream has
    /// more for it, or a follower read some.
    pub(crate) fn leader_waits(&self, cx: &Context<'_>) {
        let mut state = self.state();
        if !state
            .leader
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            state.leader = Some(cx.waker().clone());
        }
    }

    /// Wake the leader's client's body, if it waits.
    pub(crate) fn wake_leader(&self) {
        let leader = self.state().leader.take();
        if let Some(leader) = leader {
            leader.wake();
        }
    }

    /// Wake every waiting reader, the leader's body among them.
    pub(crate) fn wake_all(&self) {
        let (wakers, leader) = {
            let mut state = self.state();
            (std::mem::take(&mut state.wakers), state.leader.take())
        };
        wakers.into_iter().chain(leader).for_each(Waker::wake);
    }

    /// The waker to poll the source with while the flight has followers.
    pub(crate) fn fan_out(self: &Arc<Self>) -> &Waker {
        self.fan_out
            .get_or_init(|| Waker::from(Arc::new(FanOut(Arc::downgrade(self)))))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Change the state, then wake every waiting follower (outside the lock).
    fn update(&self, change: impl FnOnce(&mut State)) {
        let wakers = {
            let mut state = self.state();
            change(&mut state);
            std::mem::take(&mut state.wakers)
        };
        wakers.into_iter().for_each(Waker::wake);
    }

    fn wait(state: &mut State, cx: &Context<'_>) {
        if !state.wakers.iter().any(|w| w.will_wake(cx.waker())) {
            state.wakers.push(cx.waker().clone());
        }
    }
}

/// The leading request's hold on its flight. Dropped before it finished
/// (the request's future or body went away): the flight fails and its
/// followers retry. Dropped after it finished, it retires the flight if
/// nothing did (the store task that holds it panicked, say): a flight
/// outlives its leader only in its followers' hands, never in the map.
#[derive(Debug)]
pub(crate) struct Leader {
    flight: Arc<Flight>,
    /// `None` for a flight nobody can join (a `no-cache` request, a
    /// follower that stopped waiting, or an answer too large to share
    /// further), or once it left the map.
    flights: Option<Arc<Flights>>,
    finished: bool,
}

impl Leader {
    /// A flight of its own, that no other request follows.
    pub fn detached(key: CacheKey) -> Self {
        Leader {
            flight: Arc::new(Flight::new(key)),
            flights: None,
            finished: false,
        }
    }

    /// The flight this leads.
    pub(crate) fn flight(&self) -> &Arc<Flight> {
        &self.flight
    }

    /// The answer came from the store: hand it to the followers (if any;
    /// `answer` is only called then) and end the flight.
    pub fn serve(mut self, answer: impl FnOnce() -> (Head, Vec<Bytes>)) {
        self.finished = true;
        if self.retire_unless_followed() {
            self.retire();
            let (head, frames) = answer();
            self.flight.update(|state| {
                state.head = Some(head);
                state.frames = frames;
                state.end = Some(End::Complete);
            });
        }
    }

    /// The response head arrived: followers may answer their clients now.
    pub fn start(&self, head: Head) {
        self.flight.update(|state| state.head = Some(head));
    }

    /// A frame of the answer, for the followers and the store.
    pub fn push(&self, frame: &Bytes) {
        self.flight.update(|state| {
            if state.dropped_frames.is_none() {
                state.frames.push(frame.clone());
            }
        });
    }

    /// The answer has grown too large to store, to `kept` bytes so far.
    /// No request joins it from now on (it would read it from its first
    /// frame, however long it runs). Its frames are kept only while those
    /// who joined read them, and at most `cap` bytes of them: past that,
    /// they are dropped and those followers fail (their clients get a
    /// broken stream, as after a leader's failure), so an answer that never
    /// ends cannot grow the buffer without bound. `true` once the frames
    /// are dropped.
    pub fn too_large(&mut self, kept: usize, cap: usize, why: Dropped) -> bool {
        self.retire();
        if kept <= cap && self.flight.followers.load(Ordering::SeqCst) > 0 {
            return false;
        }
        self.flight.update(|state| {
            // (The first reason stands: followers read it after.)
            state.dropped_frames.get_or_insert(why);
            state.frames = Vec::new();
        });
        true
    }

    /// What the frames kept so far count against the body budget: held as
    /// long as the flight, whose followers may read its frames long after
    /// the answer ended.
    pub fn keep_held(&self, held: Option<llm_proxy_core::BudgetHold>) {
        if held.is_some() {
            self.flight.state().held = held;
        }
    }

    /// The frames so far, unless they were dropped.
    pub fn frames(&self) -> Option<Vec<Bytes>> {
        let state = self.flight.state();
        state.dropped_frames.is_none().then(|| state.frames.clone())
    }

    /// The answer ended cleanly: the frames, unless they were dropped.
    pub fn complete(&mut self) -> Option<Vec<Bytes>> {
        self.finished = true;
        let mut frames = None;
        self.flight.update(|state| {
            state.end = Some(End::Complete);
            if state.dropped_frames.is_none() {
                frames = Some(state.frames.clone());
            }
        });
        frames
    }

    /// The answer failed, or will not be finished.
    pub fn fail(&mut self) {
        self.finished = true;
        self.retire();
        self.flight.update(|state| state.end = Some(End::Failed));
    }

    /// Whether followers read this flight (if not, it is retired at once).
    pub fn retire_unless_followed(&mut self) -> bool {
        let Some(flights) = &self.flights else {
            // Out of the map (too large to share further): nobody can join,
            // and those who joined before still count, unless their frames
            // are gone (past the cap: they fail on their next read, and the
            // upstream must not be read on for them).
            return self.flight.followers.load(Ordering::SeqCst) > 0
                && self.flight.state().dropped_frames.is_none();
        };
        let followed = flights.retire_unless_followed(&self.flight);
        if !followed {
            // Out of the map already: nothing for `retire` or the drop to do.
            self.flights = None;
        }
        followed
    }

    /// No new follower may join from now on. Once is enough: later calls
    /// (and the drop) do not look the flight up again.
    pub fn retire(&mut self) {
        if let Some(flights) = self.flights.take() {
            flights.remove(&self.flight);
        }
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        if self.finished {
            self.retire();
        } else {
            self.fail();
        }
    }
}

/// A request following a flight; counted among its followers while it lives.
#[derive(Debug)]
pub(crate) struct Follower {
    flight: Arc<Flight>,
}

impl Drop for Follower {
    fn drop(&mut self) {
        if self.flight.followers.fetch_sub(1, Ordering::SeqCst) == 1 {
            // The last follower: if the leader's client left too, nobody
            // reads the upstream any more.
            crate::body::unread(&self.flight);
        }
    }
}

impl Follower {
    /// Wait for the response head; `Retry` when the flight failed before it.
    pub fn poll_head(&self, cx: &mut Context<'_>) -> Poll<Result<Head, Retry>> {
        let mut state = self.flight.state();
        if let Some(head) = &state.head {
            return Poll::Ready(Ok(head.clone()));
        }
        if state.end.is_some() {
            return Poll::Ready(Err(Retry));
        }
        Flight::wait(&mut state, cx);
        Poll::Pending
    }

    /// The whole answer, into `frames` (those there already are its
    /// first), read as [`Follower::poll_frame`] reads them; `Retry` when
    /// the flight failed before its end (or dropped its frames, or its
    /// leader judged the answer none to share): a JSON answer is only any
    /// use whole, so its followers answer their clients once it is.
    pub fn poll_whole(
        &self,
        frames: &mut Vec<Bytes>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), Retry>> {
        loop {
            match std::task::ready!(self.poll_frame(frames.len(), cx)) {
                Some(Ok(frame)) => frames.push(frame),
                None => return Poll::Ready(Ok(())),
                Some(Err(_)) => return Poll::Ready(Err(Retry)),
            }
        }
    }

    /// Whether the flight dropped its frames (the answer grew past what is
    /// kept for followers): a follower that fails then lost part of the
    /// answer, the leader's own end (an error event) among it.
    pub fn frames_dropped(&self) -> Option<Dropped> {
        self.flight.state().dropped_frames
    }

    /// The frame at `index`, or the end, or `Pending` (the waker is kept).
    /// When the frame has not come yet, this follower reads it from the
    /// upstream itself ([`crate::body::pull`]), unless another reader does.
    pub fn poll_frame(
        &self,
        index: usize,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, End>>> {
        loop {
            {
                let mut state = self.flight.state();
                if let Some(frame) = state.frames.get(index) {
                    return Poll::Ready(Some(Ok(frame.clone())));
                }
                match state.end {
                    Some(End::Complete) if state.dropped_frames.is_none() => {
                        return Poll::Ready(None);
                    }
                    Some(_) => return Poll::Ready(Some(Err(End::Failed))),
                    None if state.dropped_frames.is_some() => {
                        return Poll::Ready(Some(Err(End::Failed)));
                    }
                    // Woken when the flight changes, whoever changes it.
                    None => Flight::wait(&mut state, cx),
                }
            }
            if !crate::body::pull(&self.flight) {
                return Poll::Pending;
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test should panic on unexpected input
mod tests {
    use super::*;
    use std::future::poll_fn;

    fn key() -> CacheKey {
        CacheKey::from_bytes([3; 32])
    }

    /// The first request for `key()` leads, the second follows.
    fn lead_and_follow(flights: &Arc<Flights>) -> (Leader, Follower) {
        let Joined::Lead(leader) = flights.join(key()) else {
            panic!("first leads")
        };
        let Joined::Follow(follower) = flights.join(key()) else {
            panic!("second follows")
        };
        (leader, follower)
    }

    fn live() -> Head {
        Head {
            content_type: None,
            stored_at_ms: None,
            usage_refused: false,
        }
    }

    #[tokio::test]
    async fn an_answer_too_large_to_store_takes_no_new_followers_and_keeps_frames_only_so_far() {
        let flights = Arc::new(Flights::new());
        let (mut leader, follower) = lead_and_follow(&flights);
        leader.start(live());
        leader.push(&Bytes::from_static(b"a"));
        // Too large to store, under the cap: the follower keeps reading.
        assert!(!leader.too_large(100, 200, Dropped::TooLarge));
        leader.push(&Bytes::from_static(b"b"));
        let second = poll_fn(|cx| follower.poll_frame(1, cx)).await;
        assert_eq!(second.unwrap().unwrap(), "b");
        // A request arriving now leads its own flight: it would read this
        // one from its first frame, however long it runs.
        let Joined::Lead(other) = flights.join(key()) else {
            panic!("no new follower")
        };
        drop(other);
        // Still followed (a leader whose client left reads on for it).
        assert!(leader.retire_unless_followed());
        // Past the cap the frames go, and the follower fails, also one
        // that was waiting for the next frame.
        let waiting = tokio::spawn(async move { poll_fn(|cx| follower.poll_frame(2, cx)).await });
        tokio::task::yield_now().await;
        assert!(leader.too_large(300, 200, Dropped::TooLarge));
        assert!(matches!(waiting.await.unwrap(), Some(Err(End::Failed))));
        assert!(!leader.retire_unless_followed(), "its follower is gone");
    }

    #[test]
    fn followers_past_the_cap_are_no_reason_to_read_on() {
        let flights = Arc::new(Flights::new());
        let (mut leader, follower) = lead_and_follow(&flights);
        leader.start(live());
        assert!(!leader.too_large(100, 200, Dropped::TooLarge));
        assert!(leader.retire_unless_followed(), "under the cap: read on");
        assert!(leader.too_large(300, 200, Dropped::TooLarge));
        // The follower has not read its failure yet, but its frames are
        // gone: a leader whose client left stops reading the upstream.
        assert!(!leader.retire_unless_followed());
        drop(follower);
    }

    #[tokio::test]
    async fn followers_read_live_frames_then_the_end() {
        let flights = Arc::new(Flights::new());
        let (mut leader, follower) = lead_and_follow(&flights);
        leader.start(live());
        poll_fn(|cx| follower.poll_head(cx)).await.unwrap();
        leader.push(&Bytes::from_static(b"a"));
        let first = poll_fn(|cx| follower.poll_frame(0, cx)).await;
        assert_eq!(first.unwrap().unwrap(), "a");
        let waiting = tokio::spawn(async move {
            let next = poll_fn(|cx| follower.poll_frame(1, cx)).await;
            let end = poll_fn(|cx| follower.poll_frame(2, cx)).await;
            (next.unwrap().unwrap(), end.is_none())
        });
        tokio::task::yield_now().await;
        leader.push(&Bytes::from_static(b"b"));
        assert_eq!(leader.complete().unwrap().len(), 2);
        assert_eq!(waiting.await.unwrap(), (Bytes::from_static(b"b"), true));
    }

    #[tokio::test]
    async fn a_dropped_leader_makes_followers_retry_and_leaves_the_map() {
        let flights = Arc::new(Flights::new());
        let Joined::Lead(leader) = flights.join(key()) else {
            panic!()
        };
        let Joined::Follow(follower) = flights.join(key()) else {
            panic!()
        };
        drop(leader);
        assert!(poll_fn(|cx| follower.poll_head(cx)).await.is_err());
        assert!(matches!(flights.join(key()), Joined::Lead(_)));
    }

    #[tokio::test]
    async fn a_completed_leader_that_dies_before_retiring_leaves_the_map() {
        let flights = Arc::new(Flights::new());
        let (mut leader, follower) = lead_and_follow(&flights);
        leader.start(live());
        leader.push(&Bytes::from_static(b"a"));
        assert!(leader.complete().is_some());
        // The store task that owns the leader panics before `retire`.
        let store = tokio::spawn(async move {
            let _leader = leader;
            panic!("the store failed");
        });
        assert!(store.await.is_err());
        // The next request leads a flight of its own, rather than follow
        // the dead one for ever …
        assert!(matches!(flights.join(key()), Joined::Lead(_)));
        // … while the follower still reads the whole answer.
        poll_fn(|cx| follower.poll_head(cx)).await.unwrap();
        let frame = poll_fn(|cx| follower.poll_frame(0, cx)).await;
        assert_eq!(frame.unwrap().unwrap(), "a");
        assert!(poll_fn(|cx| follower.poll_frame(1, cx)).await.is_none());
    }

    #[test]
    fn unfollowed_flights_retire_and_drop_their_frames() {
        let flights = Arc::new(Flights::new());
        let (mut leader, follower) = lead_and_follow(&flights);
        assert!(!leader.too_large(10, 100, Dropped::TooLarge));
        drop(follower);
        leader.push(&Bytes::from_static(b"a"));
        assert!(leader.too_large(11, 100, Dropped::TooLarge));
        // Retired: the next request leads a flight of its own.
        assert!(matches!(flights.join(key()), Joined::Lead(_)));
        assert_eq!(leader.complete(), None);
    }
}
