//! Which shard (thread-per-core runtime) the current thread serves.
//!
//! A sharded server runs one single-threaded tokio runtime per core, each on
//! its own thread. A connection's socket is registered with the reactor of
//! the runtime that opened it (and hyper-util's client, used for `https://`,
//! also spawns the connection's task there), so a pooled connection taken
//! from another thread would have every wake-up cross threads (a futex and a
//! context switch). So [`Upstream`](crate::Upstream) keeps one connection
//! pool per shard and picks it by the index set here: a request, its
//! upstream connection and its response stay on one thread.
//!
//! A thread that never called [`set_current`] (tests, a multi-threaded
//! runtime, background tasks) uses the upstream's shared pool.

use std::cell::Cell;

thread_local! {
    static SHARD: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Mark the calling thread as serving shard `index` (or no shard: `None`).
/// Call it once at the start of each shard's thread, before its runtime runs.
pub fn set_current(index: Option<usize>) {
    SHARD.with(|s| s.set(index));
}

/// The shard the calling thread serves, if any.
pub fn current() -> Option<usize> {
    SHARD.with(Cell::get)
}
