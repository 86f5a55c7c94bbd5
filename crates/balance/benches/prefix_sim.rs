//! Prefix-routing simulation: the real `Picker` (and `PromptPrefix` keys)
//! against simulated LLM servers on a virtual clock. No GPU, seconds to run.
//!
//! Each of 8 servers keeps a prefix (KV) cache: an LRU of 16-token blocks,
//! 300k tokens, keyed by chained block hashes. Prefill runs one request at a
//! time at 20k uncached tokens/s; decoding is batched, one token per 30 ms
//! step for every running request. TTFT = queueing + prefill + one step.
//!
//! Workloads (from shared/notes/prefix-routing.md):
//! - `system`: 120 groups sharing a 6,000-token system prompt each (720k
//!   tokens, more than one server's cache), unique 1,200-token questions,
//!   100-token answers, Poisson arrivals ramping 3 → 60 QPS over 120 s;
//! - `chat`: 800 conversations × 16 turns behind one of 4 short system
//!   prompts (500 tokens); each turn adds ~830 user tokens and ~76 answer
//!   tokens; conversations start over 600 s, 5 s mean think time;
//! - `short`: the same with short turns, as in a chat app: 50-token system
//!   prompts, user turns of 10 to 60 tokens, so that a conversation stays
//!   below the routing key's 2 KiB for many turns.
//!
//! Run: `cargo bench -p llm-proxy-balance --bench prefix_sim`

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::time::Instant;

use llm_proxy_balance::{Load, Picker, PickerMember, PrefixConfig, Strategy};

#[path = "prefix_sim/model.rs"]
mod sim_model;
use sim_model::{Prompt, Report, Rng, Segment};

const SERVERS: usize = 8;
const BLOCK: u32 = 16;
const CACHE_TOKENS: u32 = 300_000;
const PREFILL_TOK_PER_S: f64 = 20_000.0;
const STEP_S: f64 = 0.030;
const SEEDS: [u64; 3] = [1, 2, 3];

/// One server's prefix cache: an LRU of block hashes.
struct Cache {
    stamp: HashMap<u64, u64>,
    order: VecDeque<(u64, u64)>,
    clock: u64,
    capacity: usize,
}

impl Cache {
    fn new() -> Self {
        Cache {
            stamp: HashMap::new(),
            order: VecDeque::new(),
            clock: 0,
            capacity: (CACHE_TOKENS / BLOCK) as usize,
        }
    }

    /// Leading blocks already cached.
    fn matched(&self, blocks: &[u64]) -> usize {
        blocks
            .iter()
            .take_while(|b| self.stamp.contains_key(b))
            .count()
    }

    fn touch(&mut self, blocks: &[u64]) {
        for &b in blocks {
            self.clock += 1;
            self.stamp.insert(b, self.clock);
            self.order.push_back((self.clock, b));
        }
        while self.stamp.len() > self.capacity {
            let Some((at, b)) = self.order.pop_front() else {
                break;
            };
            if self.stamp.get(&b) == Some(&at) {
                self.stamp.remove(&b);
            }
        }
        if self.order.len() > 4 * self.capacity {
            let stamp = &self.stamp;
            self.order.retain(|(at, b)| stamp.get(b) == Some(at));
        }
    }
}

struct Server {
    cache: Cache,
    prefill_free_at: f64,
    in_flight: u32,
}

/// A request waiting to arrive.
struct Arrival {
    prompt: Prompt,
    output: u32,
    /// The conversation it belongs to and its turn (chat workload).
    conversation: Option<(usize, usize)>,
}

enum Event {
    Arrive(Arrival),
    Done {
        server: usize,
        conversation: Option<(usize, usize)>,
        answer: Segment,
    },
}

struct Sim<'a> {
    now: f64,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: HashMap<u64, Event>,
    next_id: u64,
    servers: Vec<Server>,
    picker: Picker,
    prefix: &'a PrefixConfig,
    oracle: HashSet<u64>,
    report: Report,
    rng: Rng,
    chats: Vec<sim_model::Conversation>,
}

impl<'a> Sim<'a> {
    fn new(strategy: &Strategy, prefix: &'a PrefixConfig, seed: u64) -> Self {
        let names: Vec<String> = (0..SERVERS).map(|i| format!("server-{i}")).collect();
        let members: Vec<PickerMember<'_>> = names
            .iter()
            .map(|n| PickerMember { name: n, weight: 1 })
            .collect();
        Sim {
            now: 0.0,
            queue: BinaryHeap::new(),
            events: HashMap::new(),
            next_id: 0,
            servers: (0..SERVERS)
                .map(|_| Server {
                    cache: Cache::new(),
                    prefill_free_at: 0.0,
                    in_flight: 0,
                })
                .collect(),
            picker: Picker::new(strategy, &members),
            prefix,
            oracle: HashSet::new(),
            report: Report::default(),
            rng: Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1),
            chats: Vec::new(),
        }
    }

    fn at(&mut self, time: f64, event: Event) {
        let id = self.next_id;
        self.next_id += 1;
        self.events.insert(id, event);
        self.queue.push(Reverse(((time * 1e6) as u64, id)));
    }

    fn run(mut self) -> Report {
        while let Some(Reverse((micros, id))) = self.queue.pop() {
            self.now = micros as f64 / 1e6;
            match self.events.remove(&id) {
                Some(Event::Arrive(a)) => self.dispatch(a),
                Some(Event::Done {
                    server,
                    conversation,
                    answer,
                }) => self.done(server, conversation, answer),
                None => {}
            }
        }
        self.report.leftover = self.servers.iter().map(|s| s.in_flight).sum();
        self.report
    }

    fn choose(&mut self, prompt: &Prompt) -> usize {
        let key = prompt.key(self.prefix);
        let loads: Vec<Load> = self
            .servers
            .iter()
            .map(|s| Load {
                available: true,
                in_flight: s.in_flight,
                cost: f64::from(s.in_flight),
            })
            .collect();
        let random = self.rng.next();
        let start = Instant::now();
        let chosen = self.picker.pick(&loads[..], key, random);
        self.report.decide_ns += start.elapsed().as_nanos();
        self.report.decisions += 1;
        chosen.unwrap_or(0)
    }

    fn dispatch(&mut self, a: Arrival) {
        let s = self.choose(&a.prompt);
        let blocks = a.prompt.blocks();
        let oracle = blocks
            .iter()
            .take_while(|b| self.oracle.contains(b))
            .count();
        self.oracle.extend(blocks.iter().copied());
        let server = &mut self.servers[s];
        let cached = (server.cache.matched(&blocks) as u32 * BLOCK).min(a.prompt.tokens());
        let uncached = a.prompt.tokens() - cached;
        let start = server.prefill_free_at.max(self.now);
        server.prefill_free_at = start + f64::from(uncached) / PREFILL_TOK_PER_S;
        server.in_flight += 1;
        let first_token = server.prefill_free_at + STEP_S;
        let done = first_token + f64::from(a.output.saturating_sub(1)) * STEP_S;
        let answer = Segment {
            id: self.rng.next(),
            tokens: a.output,
        };
        let mut full = a.prompt.clone();
        full.push(answer);
        self.servers[s].cache.touch(&full.blocks());

        let r = &mut self.report;
        r.prompt_tokens += u64::from(a.prompt.tokens());
        r.cached_tokens += u64::from(cached);
        r.oracle_tokens += (oracle as u64 * u64::from(BLOCK)).min(u64::from(a.prompt.tokens()));
        r.ttft.push(first_token - self.now);
        let loads: Vec<u32> = self.servers.iter().map(|s| s.in_flight).collect();
        r.max_sum += f64::from(*loads.iter().max().unwrap_or(&0));
        r.mean_sum += f64::from(loads.iter().sum::<u32>()) / SERVERS as f64;
        r.samples += 1;
        self.at(
            done,
            Event::Done {
                server: s,
                conversation: a.conversation,
                answer,
            },
        );
    }

    fn done(&mut self, server: usize, conversation: Option<(usize, usize)>, answer: Segment) {
        self.servers[server].in_flight -= 1;
        let Some((c, turn)) = conversation else {
            return;
        };
        let think = self.rng.exp(5.0);
        if let Some(next) = self.chats[c].next_turn(turn, answer, &mut self.rng) {
            self.at(self.now + think, Event::Arrive(next));
        }
    }
}

fn system_workload(sim: &mut Sim<'_>) {
    let groups: Vec<Segment> = (0..120)
        .map(|g| Segment {
            id: 1_000 + g,
            tokens: 6_000,
        })
        .collect();
    let (mut t, duration) = (0.0, 120.0);
    while t < duration {
        let qps = 3.0 + 57.0 * t / duration;
        t += sim.rng.exp(1.0 / qps);
        let g = (sim.rng.next() % groups.len() as u64) as usize;
        let question = Segment {
            id: sim.rng.next(),
            tokens: 1_200,
        };
        let prompt = Prompt::new(vec![("system", groups[g]), ("user", question)]);
        sim.at(
            t,
            Event::Arrive(Arrival {
                prompt,
                output: 100,
                conversation: None,
            }),
        );
    }
}

fn chat_workload(sim: &mut Sim<'_>, system_tokens: u32, user_tokens: (u32, u32)) {
    for c in 0..800 {
        let start = sim.rng.next() as f64 / u64::MAX as f64 * 600.0;
        let system = Segment {
            id: 10 + sim.rng.next() % 4,
            tokens: system_tokens,
        };
        let (conversation, first) =
            sim_model::Conversation::start(c, system, 16, user_tokens, &mut sim.rng);
        sim.chats.push(conversation);
        sim.at(start, Event::Arrive(first));
    }
}

fn run(workload: &str, strategy: &Strategy, prefix: &PrefixConfig, seed: u64) -> Report {
    let mut sim = Sim::new(strategy, prefix, seed);
    match workload {
        "system" => system_workload(&mut sim),
        "short" => chat_workload(&mut sim, 50, (10, 60)),
        _ => chat_workload(&mut sim, 500, (200, 1460)),
    }
    sim.run()
}

fn main() {
    let prefix = PrefixConfig::default();
    let strategies = [
        Strategy::RoundRobin,
        Strategy::LeastRequests,
        Strategy::PrefixAffinity(prefix.clone()),
    ];
    let started = Instant::now();
    println!(
        "| workload | strategy | prefix hit rate | oracle | TTFT mean (s) | TTFT p90 (s) | max/mean in-flight | leftover | ns/decision |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for workload in ["system", "chat", "short"] {
        for strategy in &strategies {
            let reports: Vec<Report> = SEEDS
                .iter()
                .map(|&seed| run(workload, strategy, &prefix, seed))
                .collect();
            println!("{}", sim_model::row(workload, strategy.as_str(), &reports));
        }
    }
    println!();
    println!(
        "{} seeds per row: median (min–max). Simulated in {:.1} s.",
        SEEDS.len(),
        started.elapsed().as_secs_f64()
    );
}
