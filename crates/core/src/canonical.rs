//! Canonical JSON: one byte string per JSON value, for cache keys.
//!
//! Object keys are sorted by their UTF-8 bytes, there is no whitespace,
//! strings are escaped as `serde_json` escapes them and numbers are printed
//! as `serde_json` prints them. Two requests that differ only in key order or
//! formatting therefore canonicalise to the same bytes.
//!
//! Numbers are only as exact as `serde_json` parses them: an integer beyond
//! 64 bits becomes the nearest `f64`, so `18446744073709551616` and
//! `18446744073709551617` canonicalise alike, while an upstream that reads
//! integers exactly (Python's `json`) tells them apart. A value for which
//! [`holds_inexact_integer`] is true must not be keyed on its canonical form.
//!
//! ```
//! use llm_proxy_core::canonical::to_canonical;
//!
//! let value = serde_json::json!({"b": 1, "a": [true, null]});
//! assert_eq!(to_canonical(&value), br#"{"a":[true,null],"b":1}"#);
//! ```

use serde::Serialize;
use serde::de::DeserializeSeed;
use serde_json::{Map, Value};

/// The canonical bytes of `value`.
pub fn to_canonical(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    write_canonical(value, &mut out);
    out
}

/// Appends the canonical bytes of `value` to `out`.
pub fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(number) => write_json(number, out),
        Value::String(string) => write_str(string, out),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        Value::Object(map) => write_object(map.iter(), &[], out),
    }
}

/// Whether `value` holds a number that `serde_json` parsed from an integer
/// too large for 64 bits (it keeps those as the nearest `f64`, losing
/// digits): its canonical form then stands for several JSON texts an
/// upstream may read differently.
///
/// Every integer from `i64::MIN` to `u64::MAX` parses exactly, so this is
/// any `f64` of magnitude 2^63 or more. A float written that large
/// (`1e19`) cannot be told apart from such an integer and counts too.
///
/// ```
/// use llm_proxy_core::canonical::holds_inexact_integer;
///
/// let parse = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap();
/// assert!(holds_inexact_integer(&parse(r#"{"seed": 18446744073709551616}"#)));
/// assert!(!holds_inexact_integer(&parse(r#"{"seed": 18446744073709551615}"#)));
/// assert!(!holds_inexact_integer(&parse(r#"[-9223372036854775808, 0.5, 1e18]"#)));
/// ```
pub fn holds_inexact_integer(value: &Value) -> bool {
    match value {
        Value::Number(number) => number.as_f64().is_some_and(|float| {
            // 2^63: below it, any integer a body can hold fits an i64 or u64.
            number.is_f64() && float.abs() >= 9_223_372_036_854_775_808.0
        }),
        Value::Array(items) => items.iter().any(holds_inexact_integer),
        Value::Object(map) => map.values().any(holds_inexact_integer),
        Value::Null | Value::Bool(_) | Value::String(_) => false,
    }
}

/// Appends the canonical bytes of the object `map` without the keys in
/// `skip` to `out`. Only top-level keys are skipped: this is for cache keys
/// that must ignore fields like `user` or `stream_options`.
pub fn write_canonical_map_without(map: &Map<String, Value>, skip: &[&str], out: &mut Vec<u8>) {
    write_object(map.iter(), skip, out);
}

/// What [`write_canonical_object_from_slice`] learned of the body on its
/// way through.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SliceFacts {
    /// The body holds a number for which [`holds_inexact_integer`] is
    /// true: its canonical form stands for several JSON texts.
    pub inexact_integer: bool,
}

/// Appends the canonical bytes of the JSON object in `bytes` to `out`, in
/// one pass over them, without building its [`Value`]: the same bytes as
/// [`write_canonical_map_without`] writes for the parsed object, for less
/// than parsing it costs (no map, no string, no number kept).
///
/// `keep` sees each top-level field, its key and its value's canonical
/// bytes, before the object is written out: `false` leaves the field out.
/// Nested fields are all kept.
///
/// An error for what is not one JSON object, and for an object (at any
/// depth) that repeats a key, which a parsed object keeps once (the last):
/// the caller may parse the body instead, or refuse it as
/// [`parse_object`](crate::parse_object) does.
///
/// ```
/// use llm_proxy_core::canonical::write_canonical_object_from_slice;
///
/// let mut out = Vec::new();
/// let body = br#"{ "user": "u", "b": {"z": 1, "y": [2, 1e3]}, "a": "\u00e9" }"#;
/// write_canonical_object_from_slice(body, &mut out, |key, _| key != "user").unwrap();
/// assert_eq!(out, r#"{"a":"é","b":{"y":[2,1000.0],"z":1}}"#.as_bytes());
/// ```
pub fn write_canonical_object_from_slice(
    bytes: &[u8],
    out: &mut Vec<u8>,
    keep: impl FnMut(&str, &[u8]) -> bool,
) -> Result<SliceFacts, serde_json::Error> {
    // Checked whole at once (with SIMD): the reader then takes each string
    // as it is, where one over bytes checks each on its own.
    let Some(text) = crate::utf8(bytes) else {
        // (serde_json's error, which says where.)
        return serde_json::from_slice::<serde::de::IgnoredAny>(bytes)
            .and_then(|_| Err(serde::de::Error::custom("the body is not valid UTF-8")));
    };
    let mut de = serde_json::Deserializer::from_str(text);
    let mut writer = SliceWriter {
        out,
        inexact_integer: false,
    };
    TopObject {
        writer: &mut writer,
        keep,
    }
    .deserialize(&mut de)?;
    de.end()?;
    Ok(SliceFacts {
        inexact_integer: writer.inexact_integer,
    })
}

/// One field of an object as [`SliceWriter`] wrote it: its key, where
/// `"key":value` starts in the output, where the value starts, where it
/// ends.
struct Written<'de> {
    key: std::borrow::Cow<'de, str>,
    start: usize,
    value: usize,
    end: usize,
}

/// Fields of one object written so far: most objects have few.
type Fields<'de> = smallvec::SmallVec<[Written<'de>; 8]>;

/// Writes each value it is handed as canonical bytes.
struct SliceWriter<'o> {
    out: &'o mut Vec<u8>,
    inexact_integer: bool,
}

impl SliceWriter<'_> {
    /// Writes the fields of the map `map` reads as `"key":value`, comma
    /// separated, in the body's order, and says where each went.
    fn fields<'de, A: serde::de::MapAccess<'de>>(
        &mut self,
        mut map: A,
    ) -> Result<Fields<'de>, A::Error> {
        let mut fields = Fields::new();
        while let Some(key) = map.next_key_seed(BorrowedKey)? {
            if !fields.is_empty() {
                self.out.push(b',');
            }
            let start = self.out.len();
            match &key {
                std::borrow::Cow::Borrowed(key) => write_unescaped(key, self.out),
                std::borrow::Cow::Owned(key) => write_str(key, self.out),
            }
            self.out.push(b':');
            let value = self.out.len();
            map.next_value_seed(&mut *self)?;
            fields.push(Written {
                key,
                start,
                value,
                end: self.out.len(),
            });
        }
        Ok(fields)
    }

    /// Rewrites the fields written from `open` (just past the object's
    /// `{`) in key order, without those `keep` refuses, and closes the
    /// object. A repeated key is an error.
    fn close<E: serde::de::Error>(
        &mut self,
        open: usize,
        mut fields: Fields<'_>,
        mut keep: impl FnMut(&Written<'_>, &[u8]) -> bool,
        filtered: bool,
    ) -> Result<(), E> {
        if !filtered && fields.windows(2).all(|pair| pair[0].key < pair[1].key) {
            // Written in order already (and so without a repeated key).
            self.out.push(b'}');
            return Ok(());
        }
        fields.sort_unstable_by(|a, b| a.key.cmp(&b.key));
        if let Some(pair) = fields.windows(2).find(|pair| pair[0].key == pair[1].key) {
            return Err(E::custom(format_args!(
                "the key `{}` appears twice in one object",
                pair[0].key
            )));
        }
        let region = smallvec::SmallVec::<[u8; 1024]>::from_slice(&self.out[open..]);
        self.out.truncate(open);
        let mut first = true;
        for field in &fields {
            let written = &region[field.start - open..field.end - open];
            if !keep(field, &written[field.value - field.start..]) {
                continue;
            }
            if !first {
                self.out.push(b',');
            }
            first = false;
            self.out.extend_from_slice(written);
        }
        self.out.push(b'}');
        Ok(())
    }
}

impl<'de> DeserializeSeed<'de> for &mut SliceWriter<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, de: D) -> Result<(), D::Error> {
        de.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for &mut SliceWriter<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        self.out.extend_from_slice(b"null");
        Ok(())
    }

    fn visit_bool<E>(self, v: bool) -> Result<(), E> {
        self.out
            .extend_from_slice(if v { b"true" } else { b"false" });
        Ok(())
    }

    fn visit_u64<E>(self, v: u64) -> Result<(), E> {
        // As serde_json writes integers.
        self.out
            .extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
        Ok(())
    }

    fn visit_i64<E>(self, v: i64) -> Result<(), E> {
        self.out
            .extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
        Ok(())
    }

    fn visit_f64<E>(self, v: f64) -> Result<(), E> {
        // As `holds_inexact_integer` reads a parsed number.
        self.inexact_integer |= v.abs() >= 9_223_372_036_854_775_808.0;
        // A parsed number is finite: written as a `Number` holding it is.
        write_json(&v, self.out);
        Ok(())
    }

    fn visit_str<E>(self, v: &str) -> Result<(), E> {
        write_str(v, self.out);
        Ok(())
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<(), E> {
        write_unescaped(v, self.out);
        Ok(())
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.out.push(b'[');
        let mut first = true;
        loop {
            let at = self.out.len();
            if !first {
                self.out.push(b',');
            }
            if seq.next_element_seed(&mut *self)?.is_none() {
                self.out.truncate(at);
                break;
            }
            first = false;
        }
        self.out.push(b']');
        Ok(())
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        self.out.push(b'{');
        let open = self.out.len();
        let fields = self.fields(map)?;
        self.close(open, fields, |_, _| true, false)
    }
}

/// The top-level object: its fields go through `keep`.
struct TopObject<'w, 'o, F> {
    writer: &'w mut SliceWriter<'o>,
    keep: F,
}

impl<'de, F: FnMut(&str, &[u8]) -> bool> DeserializeSeed<'de> for TopObject<'_, '_, F> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, de: D) -> Result<(), D::Error> {
        de.deserialize_map(self)
    }
}

impl<'de, F: FnMut(&str, &[u8]) -> bool> serde::de::Visitor<'de> for TopObject<'_, '_, F> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        let TopObject { writer, mut keep } = self;
        writer.out.push(b'{');
        let open = writer.out.len();
        let fields = writer.fields(map)?;
        writer.close(open, fields, |field, value| keep(&field.key, value), true)
    }
}

/// A key, borrowed from the body when it has no escape in it.
struct BorrowedKey;

impl<'de> DeserializeSeed<'de> for BorrowedKey {
    type Value = std::borrow::Cow<'de, str>;

    fn deserialize<D: serde::Deserializer<'de>>(self, de: D) -> Result<Self::Value, D::Error> {
        de.deserialize_str(self)
    }
}

impl<'de> serde::de::Visitor<'de> for BorrowedKey {
    type Value = std::borrow::Cow<'de, str>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a string")
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(std::borrow::Cow::Borrowed(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(std::borrow::Cow::Owned(v.to_owned()))
    }
}

/// Writes an object's entries sorted by key. The workspace builds
/// `serde_json` with `preserve_order` (a body's keys reach the upstream in
/// the client's order), so a map holds them as the body had them: sorted
/// now and then (check before paying for a sort), and sorted on the stack
/// when they are few (a chat message's `role` and `content`).
fn write_object<'a, I>(entries: I, skip: &[&str], out: &mut Vec<u8>)
where
    I: Iterator<Item = (&'a String, &'a Value)> + Clone,
{
    if entries.clone().map(|(key, _)| key).is_sorted() {
        write_entries(entries, skip, out);
    } else {
        let mut sorted: smallvec::SmallVec<[_; 8]> = entries.collect();
        sorted.sort_unstable_by_key(|(key, _)| *key);
        write_entries(sorted.into_iter(), skip, out);
    }
}

fn write_entries<'a>(
    entries: impl Iterator<Item = (&'a String, &'a Value)>,
    skip: &[&str],
    out: &mut Vec<u8>,
) {
    out.push(b'{');
    let mut first = true;
    for (key, value) in entries.filter(|(key, _)| !skip.contains(&key.as_str())) {
        if !first {
            out.push(b',');
        }
        first = false;
        write_str(key, out);
        out.push(b':');
        write_canonical(value, out);
    }
    out.push(b'}');
}

/// Writes a string exactly as `serde_json` does. It escapes only `"`, `\\`
/// and control characters (below U+0020); a string without them (most of a
/// prompt's text) is copied in one go instead of byte by byte.
fn write_str(string: &str, out: &mut Vec<u8>) {
    if needs_escape(string.as_bytes()) {
        write_json(string, out);
    } else {
        out.reserve(string.len() + 2);
        out.push(b'"');
        out.extend_from_slice(string.as_bytes());
        out.push(b'"');
    }
}

/// Writes a string borrowed from a JSON text as it stood there: between
/// its quotes, a string without an escape in the text has no `"`, no `\\`
/// and no control character (the parser refuses one raw), so serde_json
/// escapes nothing in it.
fn write_unescaped(string: &str, out: &mut Vec<u8>) {
    debug_assert!(!needs_escape(string.as_bytes()));
    out.reserve(string.len() + 2);
    out.push(b'"');
    out.extend_from_slice(string.as_bytes());
    out.push(b'"');
}

/// Whether `bytes` hold a byte that `serde_json` escapes in a string. Read
/// in blocks without an early exit inside each, so that the compiler can
/// vectorise the check.
fn needs_escape(bytes: &[u8]) -> bool {
    let escaped = |byte: u8| byte < 0x20 || byte == b'"' || byte == b'\\';
    let mut blocks = bytes.chunks_exact(32);
    blocks.any(|block| block.iter().fold(false, |any, &byte| any | escaped(byte)))
        || blocks.remainder().iter().any(|&byte| escaped(byte))
}

/// Writes a string or number exactly as `serde_json` does.
fn write_json<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) {
    serde_json::to_writer(out, value)
        .expect("a string or number always serialises, and writing to a Vec cannot fail");
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test should panic on unexpected input
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn canonical_str(value: &Value) -> String {
        String::from_utf8(to_canonical(value)).unwrap()
    }

    #[test]
    fn sorts_keys_and_drops_whitespace() {
        let value: Value = serde_json::from_str(
            "{ \"b\" : 1.5, \"a\" : [ true, null, \"x\\n\\u00e9\" ], \"\u{e9}\": {}, \"B\": -3 }",
        )
        .unwrap();
        assert_eq!(
            canonical_str(&value),
            "{\"B\":-3,\"a\":[true,null,\"x\\n\u{e9}\"],\"b\":1.5,\"\u{e9}\":{}}"
        );
    }

    #[test]
    fn sorts_unsorted_entries() {
        let value = json!({"c": {"z": 0, "y": 1}, "b": [2], "a": 1});
        let Value::Object(map) = &value else {
            unreachable!()
        };
        assert_eq!(map.keys().next().unwrap(), "c", "the map keeps the order");
        let mut out = Vec::new();
        write_object(map.iter(), &["b"], &mut out);
        assert_eq!(out, br#"{"a":1,"c":{"y":1,"z":0}}"#);
        // Past the entries sorted on the stack.
        let many: Map<String, Value> = (0..20)
            .rev()
            .map(|i| (format!("k{i:02}"), json!(i)))
            .collect();
        let mut out = Vec::new();
        write_object(many.iter(), &[], &mut out);
        let want: Vec<String> = (0..20).map(|i| format!(r#""k{i:02}":{i}"#)).collect();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!("{{{}}}", want.join(","))
        );
    }

    #[test]
    fn map_without_skips_top_level_keys_only() {
        let value = json!({"model": "m", "user": "u", "stream_options": {"include_usage": true},
            "messages": [{"user": "kept"}]});
        let Value::Object(map) = &value else {
            unreachable!()
        };
        let mut out = Vec::new();
        write_canonical_map_without(map, &["user", "stream_options"], &mut out);
        assert_eq!(out, br#"{"messages":[{"user":"kept"}],"model":"m"}"#);

        out.clear();
        write_canonical_map_without(
            map,
            &["model", "user", "stream_options", "messages"],
            &mut out,
        );
        assert_eq!(out, b"{}");
    }

    proptest! {
        /// Strings with one byte that may need escaping (every byte below
        /// 0x80) anywhere among plain text, around the check's block size,
        /// come out as serde_json writes them.
        #[test]
        fn strings_are_written_as_serde_json_writes_them(
            before in "[a-z \u{e9}\u{1F600}]{0,70}",
            byte in 0u8..0x80,
            after in "[a-z \u{e9}]{0,40}",
        ) {
            let string = format!("{before}{}{after}", char::from(byte));
            let mut out = Vec::new();
            write_str(&string, &mut out);
            prop_assert_eq!(out, serde_json::to_vec(&string).unwrap());
        }
    }

    #[test]
    fn numbers_print_as_serde_json_prints_them() {
        let value: Value = serde_json::from_str(
            "[1, -0, 1.0, 1e3, 18446744073709551615, -9223372036854775808, 0.1]",
        )
        .unwrap();
        assert_eq!(
            canonical_str(&value),
            serde_json::to_string(&value).unwrap()
        );
    }

    #[test]
    fn integers_beyond_64_bits_are_inexact() {
        let parse = |s: &str| serde_json::from_str::<Value>(s).unwrap();
        for inexact in [
            "18446744073709551616",
            "18446744073709551617",
            "-9223372036854775809",
            "-99999999999999999999999",
            "1e19",
        ] {
            let nested = parse(&format!(r#"{{"a": [1, {{"seed": {inexact}}}]}}"#));
            assert!(holds_inexact_integer(&nested), "{inexact}");
        }
        // Two of them that an exact reader tells apart share a canonical form:
        // why the cache must not key on it.
        assert_eq!(
            to_canonical(&parse("18446744073709551616")),
            to_canonical(&parse("18446744073709551617"))
        );
        for exact in [
            "18446744073709551615",
            "-9223372036854775808",
            "9223372036854775807",
            "1.5",
            "-0.0",
            "9.2e18",
            r#"{"a": ["18446744073709551616", null, true]}"#,
        ] {
            assert!(!holds_inexact_integer(&parse(exact)), "{exact}");
        }
    }

    /// Serialises `value` with whitespace and every object's keys in reverse
    /// order, so that parsing it back must undo both.
    fn write_scrambled(value: &Value, out: &mut String) {
        match value {
            Value::Array(items) => {
                out.push_str("[ ");
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(" ,\n");
                    }
                    write_scrambled(item, out);
                }
                out.push_str(" ]");
            }
            Value::Object(map) => {
                out.push_str("{\n");
                for (i, (key, item)) in map.iter().rev().enumerate() {
                    if i > 0 {
                        out.push_str(",\t");
                    }
                    out.push_str(&serde_json::to_string(key).unwrap());
                    out.push_str(" : ");
                    write_scrambled(item, out);
                }
                out.push_str("\r\n}");
            }
            other => out.push_str(&serde_json::to_string(other).unwrap()),
        }
    }

    pub(crate) fn value_strategy() -> impl Strategy<Value = Value> {
        // Binary fractions with few digits: serde_json parses those exactly
        // even without its `float_roundtrip` feature.
        let float = (-1_000_000i32..1_000_000, 0i32..10)
            .prop_map(|(mantissa, shift)| json!(f64::from(mantissa) / f64::from(1 << shift)));
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            float,
            ".{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 64, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::vec((".{0,8}", inner), 0..6)
                    .prop_map(|entries| Value::Object(entries.into_iter().collect())),
            ]
        })
    }

    /// The canonical bytes of `body` written from its bytes, and what the
    /// pass learned.
    fn from_slice(body: &str, skip: &[&str]) -> Result<(String, SliceFacts), serde_json::Error> {
        let mut out = b"prefix".to_vec();
        let facts = write_canonical_object_from_slice(body.as_bytes(), &mut out, |key, _| {
            !skip.contains(&key)
        })?;
        assert_eq!(&out[..6], b"prefix", "appended");
        Ok((String::from_utf8(out[6..].to_vec()).unwrap(), facts))
    }

    #[test]
    fn from_slice_writes_what_the_parsed_object_writes() {
        let body = r#" { "z" : [ 1 , -2 , 0.5 , 1e3 , -0 , true , false , null , "a\"\n\u00e9" ] ,
            "a\u0062" : { "y" : { }, "x" : [ ] , "\u0000" : "" }, "b": {"only": 1},
            "m": 18446744073709551615, "user": {"dropped": [1]}, "": 0 } "#;
        let parsed: Value = serde_json::from_str(body).unwrap();
        let mut want = Vec::new();
        write_canonical_map_without(parsed.as_object().unwrap(), &["user"], &mut want);
        let (got, facts) = from_slice(body, &["user"]).unwrap();
        assert_eq!(got, String::from_utf8(want).unwrap());
        assert!(!facts.inexact_integer);
        // Everything left out, or nothing there.
        assert_eq!(
            from_slice(body, &["z", "ab", "b", "m", "user", ""])
                .unwrap()
                .0,
            "{}"
        );
        assert_eq!(from_slice("{}", &[]).unwrap().0, "{}");
    }

    #[test]
    fn from_slice_shows_keep_each_top_level_value() {
        let mut seen = Vec::new();
        let body = br#"{"stream": false, "o": {"b": 1, "a": [ 2 ]}, "n": null}"#;
        let mut out = Vec::new();
        write_canonical_object_from_slice(body, &mut out, |key, value| {
            seen.push(format!("{key}={}", String::from_utf8_lossy(value)));
            !(key == "stream" && value == b"false")
        })
        .unwrap();
        seen.sort();
        assert_eq!(seen, ["n=null", r#"o={"a":[2],"b":1}"#, "stream=false"]);
        assert_eq!(out, br#"{"n":null,"o":{"a":[2],"b":1}}"#);
    }

    #[test]
    fn from_slice_finds_inexact_integers_at_any_depth() {
        for body in [
            r#"{"seed": 18446744073709551616}"#,
            r#"{"a": [1, {"b": [-9223372036854775809]}]}"#,
            r#"{"user": 1e19}"#,
        ] {
            let (_, facts) = from_slice(body, &["user"]).unwrap();
            assert!(facts.inexact_integer, "{body}");
        }
        let (_, facts) =
            from_slice(r#"{"a": [18446744073709551615, "1e19", 9.2e18]}"#, &[]).unwrap();
        assert!(!facts.inexact_integer);
    }

    #[test]
    fn from_slice_refuses_what_is_not_one_object_with_unique_keys() {
        for body in [
            "[]",
            "1",
            "",
            "{",
            r#"{"a": 1} {"b": 2}"#,
            r#"{"a": 1,}"#,
            r#"{"a": 1, "a": 2}"#,
            r#"{"b": {"x": 1, "y": 2, "x": 3}}"#,
            r#"{"b": [{"k": 1, "\u006b": 2}]}"#,
            "{\"a\": \"\u{1}\"}",
        ] {
            assert!(from_slice(body, &[]).is_err(), "{body}");
        }
        // Not UTF-8: refused whole, before a byte is written.
        let mut out = Vec::new();
        let error = write_canonical_object_from_slice(b"{\"a\": \"\xff\"}", &mut out, |_, _| true)
            .unwrap_err();
        assert!(out.is_empty(), "{error}");
        let error = from_slice(r#"{"b": 1, "a": {"x": 1, "x": 2}}"#, &[]).unwrap_err();
        assert!(error.to_string().contains("`x` appears twice"), "{error}");
    }

    proptest! {
        /// Written from a scrambled text of any object (keys reversed,
        /// whitespace), the bytes are those of the parsed object, without
        /// the top-level keys left out; and the inexact integers are found.
        #[test]
        fn from_slice_agrees_with_the_parsed_object(
            fields in proptest::collection::vec((".{0,3}", value_strategy()), 0..8),
            skipped in proptest::collection::vec(".{0,3}", 0..3),
        ) {
            let map: Map<String, Value> = fields.into_iter().collect();
            let value = Value::Object(map.clone());
            let mut scrambled = String::new();
            write_scrambled(&value, &mut scrambled);
            let skip: Vec<&str> = skipped.iter().map(String::as_str).collect();
            let mut want = Vec::new();
            write_canonical_map_without(&map, &skip, &mut want);
            let (got, facts) = from_slice(&scrambled, &skip).unwrap();
            prop_assert_eq!(got.as_bytes(), &want[..]);
            prop_assert_eq!(facts.inexact_integer, holds_inexact_integer(&value));
        }
    }

    proptest! {
        #[test]
        fn parses_back_to_an_equal_value(value in value_strategy()) {
            let canonical = to_canonical(&value);
            let parsed: Value = serde_json::from_slice(&canonical).unwrap();
            prop_assert_eq!(parsed, value);
        }

        #[test]
        fn ignores_key_order_and_whitespace(value in value_strategy()) {
            let canonical = to_canonical(&value);
            let pretty: Value = serde_json::from_str(&serde_json::to_string_pretty(&value).unwrap()).unwrap();
            prop_assert_eq!(to_canonical(&pretty), canonical.clone());
            let mut scrambled = String::new();
            write_scrambled(&value, &mut scrambled);
            let reparsed: Value = serde_json::from_str(&scrambled).unwrap();
            prop_assert_eq!(to_canonical(&reparsed), canonical);
        }

        #[test]
        fn integers_within_64_bits_are_exact(i in any::<i64>(), u in any::<u64>()) {
            let text = format!("[{i}, {u}]");
            prop_assert!(!holds_inexact_integer(&serde_json::from_str(&text).unwrap()));
        }

        #[test]
        fn is_idempotent(value in value_strategy()) {
            let once = to_canonical(&value);
            let twice = to_canonical(&serde_json::from_slice(&once).unwrap());
            prop_assert_eq!(twice, once);
        }
    }
}
