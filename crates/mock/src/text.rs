//! Deterministic content: hashes of the prompt choose the words and vectors,
//! so the same request always gets the same answer and different prompts
//! (almost always) differ.

/// The words completions are made of; one word is one token.
const WORDS: [&str; 32] = [
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet",
    "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango",
    "uniform", "victor", "whiskey", "xray", "yankee", "zulu", "amber", "cobalt", "ember", "indigo",
    "jade", "onyx",
];

/// Feeds bytes into a 64-bit FNV-1a hash; stable across builds and platforms.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Hasher(u64);

impl Hasher {
    pub(crate) fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }

    pub(crate) fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 ^= u64::from(*byte);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // A separator, so ("ab", "c") and ("a", "bc") hash differently.
        self.0 ^= 0xff;
        self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
    }

    pub(crate) fn finish(self) -> u64 {
        mix(self.0)
    }
}

/// splitmix64's finaliser: spreads every input bit over the output.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The `index`th word of the completion seeded by `seed`.
pub(crate) fn word(seed: u64, index: usize) -> &'static str {
    let h = mix(seed ^ mix(index as u64));
    WORDS[(h % WORDS.len() as u64) as usize]
}

/// The `index`th token as streamed: words after the first carry their space.
pub(crate) fn token(seed: u64, index: usize) -> String {
    if index == 0 {
        word(seed, 0).to_owned()
    } else {
        format!(" {}", word(seed, index))
    }
}

/// The whole completion of `tokens` words seeded by `seed`.
pub(crate) fn completion(seed: u64, tokens: usize) -> String {
    (0..tokens).map(|i| token(seed, i)).collect()
}

/// A deterministic unit-length embedding of `input` with `dims` dimensions.
pub(crate) fn embedding(input: &[u8], dims: usize) -> Vec<f64> {
    let mut hasher = Hasher::new();
    hasher.write(input);
    let seed = hasher.finish();
    let raw: Vec<f64> = (0..dims)
        .map(|i| {
            let h = mix(seed ^ mix(i as u64));
            // The top 53 bits give a uniform float in [0, 1); map to [-1, 1).
            (h >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        })
        .collect();
    let norm = raw.iter().map(|x| x * x).sum::<f64>().sqrt();
    if norm == 0.0 {
        return raw;
    }
    raw.into_iter().map(|x| x / norm).collect()
}

/// A value derived from `seed` for `purpose` (an id, say), independent of
/// the words `seed` chooses.
pub(crate) fn derive(seed: u64, purpose: &[u8]) -> u64 {
    let mut hasher = Hasher::new();
    hasher.write(&seed.to_le_bytes());
    hasher.write(purpose);
    hasher.finish()
}

/// The arguments of every tool call the mock makes.
pub(crate) const TOOL_ARGUMENTS: &str = r#"{"city":"Paris"}"#;

/// How many pieces (tokens) [`TOOL_ARGUMENTS`] is streamed in.
pub(crate) const TOOL_ARGUMENT_TOKENS: usize = TOOL_ARGUMENTS.len().div_ceil(TOOL_PIECE_LEN);

const TOOL_PIECE_LEN: usize = 4;

/// Piece `index` of [`TOOL_ARGUMENTS`] as streamed: the pieces spell it.
pub(crate) fn tool_argument_piece(index: usize) -> &'static str {
    let start = (index * TOOL_PIECE_LEN).min(TOOL_ARGUMENTS.len());
    let end = (start + TOOL_PIECE_LEN).min(TOOL_ARGUMENTS.len());
    &TOOL_ARGUMENTS[start..end]
}

/// Whether a user's message asks for a tool call: it mentions the weather.
pub(crate) fn mentions_weather(text: &str) -> bool {
    text.to_ascii_lowercase().contains("weather")
}

/// A rough token count for `len` bytes of text: OpenAI's ~4 bytes a token.
pub(crate) fn estimate_tokens(len: usize) -> u64 {
    len.div_ceil(4) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_words_and_different_seeds_differ() {
        assert_eq!(completion(7, 8), completion(7, 8));
        assert_ne!(completion(7, 8), completion(8, 8));
        assert_eq!(completion(7, 3).split(' ').count(), 3);
        assert_eq!(completion(7, 0), "");
    }

    #[test]
    fn tool_argument_pieces_spell_the_arguments() {
        let pieces: String = (0..TOOL_ARGUMENT_TOKENS).map(tool_argument_piece).collect();
        assert_eq!(pieces, TOOL_ARGUMENTS);
        assert!((0..TOOL_ARGUMENT_TOKENS).all(|i| !tool_argument_piece(i).is_empty()));
        assert!(mentions_weather("What's the Weather like?"));
        assert!(!mentions_weather("hello"));
    }

    #[test]
    fn hasher_separates_fields() {
        let mut a = Hasher::new();
        a.write(b"ab");
        a.write(b"c");
        let mut b = Hasher::new();
        b.write(b"a");
        b.write(b"bc");
        assert_ne!(a.finish(), b.finish());
    }

    #[test]
    fn embeddings_are_deterministic_unit_vectors() {
        let v = embedding(b"hello", 8);
        assert_eq!(v, embedding(b"hello", 8));
        assert_ne!(v, embedding(b"world", 8));
        let norm: f64 = v.iter().map(|x| x * x).sum();
        assert!((norm - 1.0).abs() < 1e-9);
    }
}
