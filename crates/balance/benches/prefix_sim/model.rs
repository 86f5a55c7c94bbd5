//! The simulation's prompts, conversations, random numbers and report.

use llm_proxy_balance::{PrefixConfig, PromptPrefix};

use super::{Arrival, BLOCK};

/// A run of tokens with one identity (a system prompt, a question, an answer).
#[derive(Clone, Copy, Debug)]
pub struct Segment {
    pub id: u64,
    pub tokens: u32,
}

/// A prompt: messages in order, each a role and a segment.
#[derive(Clone, Debug)]
pub struct Prompt(Vec<(&'static str, Segment)>);

fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    x ^= x >> 33;
    x = x.wrapping_mul(0xC4CE_B9FE_1A85_EC53);
    x ^ (x >> 33)
}

impl Prompt {
    pub fn new(messages: Vec<(&'static str, Segment)>) -> Self {
        Prompt(messages)
    }

    /// Append the answer to the conversation (as the assistant's turn).
    pub fn push(&mut self, answer: Segment) {
        self.0.push(("assistant", answer));
    }

    pub fn tokens(&self) -> u32 {
        self.0.iter().map(|(_, s)| s.tokens).sum()
    }

    /// Chained hashes of the full 16-token blocks, as a server's prefix cache
    /// keys them: a block is its last token (segment, offset) chained onto
    /// every block before it.
    pub fn blocks(&self) -> Vec<u64> {
        let n = self.tokens() / BLOCK;
        let mut out = Vec::with_capacity(n as usize);
        let (mut chain, mut seg, mut seg_start) = (0x5EED_u64, 0usize, 0u32);
        for i in 0..n {
            let last = (i + 1) * BLOCK - 1;
            while seg_start + self.0[seg].1.tokens <= last {
                seg_start += self.0[seg].1.tokens;
                seg += 1;
            }
            let token = mix(self.0[seg].1.id) ^ u64::from(last - seg_start);
            chain = mix(chain.rotate_left(17) ^ mix(token));
            out.push(chain);
        }
        out
    }

    /// The balancer's routing key, from the prompt rendered as text (a token
    /// is a 4-byte word, as real tokenisers average).
    pub fn key(&self, cfg: &PrefixConfig) -> Option<u64> {
        let mut p = PromptPrefix::new(cfg);
        let mut text = String::new();
        for &(role, seg) in &self.0 {
            if p.is_full() {
                break;
            }
            text.clear();
            let words = seg.tokens.min(1024);
            for k in 0..words {
                let w = mix(seg.id ^ u64::from(k).wrapping_mul(0x9E37_79B9));
                for shift in [0, 5, 10] {
                    text.push(char::from(b'a' + ((w >> shift) % 26) as u8));
                }
                text.push(' ');
            }
            p.push_message(role, &text);
        }
        p.key()
    }
}

/// xorshift64*.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `lo..hi`.
    pub fn range(&mut self, lo: u32, hi: u32) -> u32 {
        lo + (self.next() % u64::from(hi - lo)) as u32
    }

    /// Exponential with this mean.
    pub fn exp(&mut self, mean: f64) -> f64 {
        let u = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        -mean * (1.0 - u).ln()
    }
}

/// One multi-turn conversation of the `chat` workload.
pub struct Conversation {
    id: usize,
    prompt: Prompt,
    turns: usize,
    /// A user turn's tokens: from, to (exclusive).
    user_tokens: (u32, u32),
}

impl Conversation {
    fn turn(&mut self, rng: &mut Rng) -> (Prompt, u32) {
        let user = Segment {
            id: rng.next(),
            tokens: rng.range(self.user_tokens.0, self.user_tokens.1),
        };
        self.prompt.0.push(("user", user));
        (self.prompt.clone(), rng.range(20, 132))
    }

    pub fn start(
        id: usize,
        system: Segment,
        turns: usize,
        user_tokens: (u32, u32),
        rng: &mut Rng,
    ) -> (Self, Arrival) {
        let mut c = Conversation {
            id,
            prompt: Prompt::new(vec![("system", system)]),
            turns,
            user_tokens,
        };
        let (prompt, output) = c.turn(rng);
        let first = Arrival {
            prompt,
            output,
            conversation: Some((id, 0)),
        };
        (c, first)
    }

    /// The next turn after `answer` to turn `turn`, if any turns are left.
    pub fn next_turn(&mut self, turn: usize, answer: Segment, rng: &mut Rng) -> Option<Arrival> {
        if turn + 1 >= self.turns {
            return None;
        }
        self.prompt.push(answer);
        let (prompt, output) = self.turn(rng);
        Some(Arrival {
            prompt,
            output,
            conversation: Some((self.id, turn + 1)),
        })
    }
}

/// Everything measured in one run.
#[derive(Default, Clone)]
pub struct Report {
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub oracle_tokens: u64,
    pub ttft: Vec<f64>,
    pub max_sum: f64,
    pub mean_sum: f64,
    pub samples: u64,
    pub leftover: u32,
    pub decide_ns: u128,
    pub decisions: u64,
}

impl Report {
    fn hit_rate(&self) -> f64 {
        self.cached_tokens as f64 / self.prompt_tokens.max(1) as f64
    }
    fn oracle(&self) -> f64 {
        self.oracle_tokens as f64 / self.prompt_tokens.max(1) as f64
    }
    fn ttft_mean(&self) -> f64 {
        self.ttft.iter().sum::<f64>() / self.ttft.len().max(1) as f64
    }
    fn ttft_p90(&self) -> f64 {
        let mut t = self.ttft.clone();
        t.sort_by(f64::total_cmp);
        t.get(t.len() * 9 / 10).copied().unwrap_or(0.0)
    }
    fn imbalance(&self) -> f64 {
        self.max_sum / self.mean_sum.max(f64::MIN_POSITIVE)
    }
    fn ns_per_decision(&self) -> f64 {
        self.decide_ns as f64 / self.decisions.max(1) as f64
    }
}

/// "median (min–max)" of `f` over the seeds.
fn spread(reports: &[Report], f: impl Fn(&Report) -> f64, digits: usize) -> String {
    let mut v: Vec<f64> = reports.iter().map(f).collect();
    v.sort_by(f64::total_cmp);
    let (lo, mid, hi) = (v[0], v[v.len() / 2], v[v.len() - 1]);
    format!("{mid:.digits$} ({lo:.digits$}–{hi:.digits$})")
}

/// One markdown table row.
pub fn row(workload: &str, strategy: &str, reports: &[Report]) -> String {
    let leftover = reports.iter().map(|r| r.leftover).max().unwrap_or(0);
    format!(
        "| {workload} | {strategy} | {} | {} | {} | {} | {} | {leftover} | {} |",
        spread(reports, |r| 100.0 * r.hit_rate(), 1) + " %",
        spread(reports, |r| 100.0 * r.oracle(), 1) + " %",
        spread(reports, Report::ttft_mean, 2),
        spread(reports, Report::ttft_p90, 2),
        spread(reports, Report::imbalance, 2),
        spread(reports, Report::ns_per_decision, 0),
    )
}
