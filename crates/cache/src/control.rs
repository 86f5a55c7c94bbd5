//! The request's `cache-control` directives the cache honours (and
//! `pragma: no-cache` in a request without `cache-control`).

use std::time::Duration;

use http::HeaderMap;

/// What a request's `cache-control` header asks of the cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheControl {
    /// `no-cache`: do not answer from the cache, but store the answer.
    pub no_cache: bool,
    /// `no-store`: neither answer from the cache nor store the answer.
    pub no_store: bool,
    /// `max-age=N`: accept only entries at most N seconds old.
    pub max_age: Option<Duration>,
    /// `only-if-cached`: answer from a stored entry or with a 504, never
    /// from the upstream.
    pub only_if_cached: bool,
}

impl CacheControl {
    /// The directives of every `cache-control` header of a request.
    /// Directive names are case-insensitive; unknown directives and malformed
    /// values are ignored (a malformed `max-age` does not restrict). A
    /// request without `cache-control` that has `pragma: no-cache` is
    /// `no-cache` (RFC 9111 §5.4: HTTP/1.0 clients and proxies send it).
    ///
    /// ```
    /// use llm_proxy_cache::CacheControl;
    ///
    /// let mut headers = http::HeaderMap::new();
    /// headers.insert("cache-control", "No-Cache, max-age=\"30\"".parse().unwrap());
    /// let cc = CacheControl::from_headers(&headers);
    /// assert!(cc.no_cache && !cc.no_store);
    /// assert_eq!(cc.max_age, Some(std::time::Duration::from_secs(30)));
    /// ```
    pub fn from_headers(headers: &HeaderMap) -> CacheControl {
        let mut control = CacheControl::default();
        if !headers.contains_key(http::header::CACHE_CONTROL) {
            control.no_cache = directives(headers, http::header::PRAGMA)
                .any(|directive| directive.trim().eq_ignore_ascii_case("no-cache"));
            return control;
        }
        for directive in directives(headers, http::header::CACHE_CONTROL) {
            let (name, value) = match directive.split_once('=') {
                Some((name, value)) => (name.trim(), Some(value.trim().trim_matches('"'))),
                None => (directive.trim(), None),
            };
            if name.eq_ignore_ascii_case("no-cache") {
                control.no_cache = true;
            } else if name.eq_ignore_ascii_case("no-store") {
                control.no_store = true;
            } else if name.eq_ignore_ascii_case("only-if-cached") {
                control.only_if_cached = true;
            } else if name.eq_ignore_ascii_case("max-age")
                && let Some(secs) = value.and_then(|v| v.parse::<u64>().ok())
            {
                // Several max-age directives: the strictest wins.
                let age = Duration::from_secs(secs);
                control.max_age = Some(control.max_age.map_or(age, |old| old.min(age)));
            }
        }
        control
    }
}

/// The comma-separated directives of every `name` header.
fn directives(headers: &HeaderMap, name: http::HeaderName) -> impl Iterator<Item = &str> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test should panic on unexpected input
mod tests {
    use super::*;

    fn parse(values: &[&str]) -> CacheControl {
        parse_with(
            &values
                .iter()
                .map(|v| ("cache-control", *v))
                .collect::<Vec<_>>(),
        )
    }

    fn parse_with(pairs: &[(&'static str, &str)]) -> CacheControl {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(*name, value.parse().unwrap());
        }
        CacheControl::from_headers(&headers)
    }

    #[test]
    fn directives() {
        assert_eq!(parse(&[]), CacheControl::default());
        assert!(parse(&["no-cache"]).no_cache);
        assert!(parse(&["private, NO-STORE"]).no_store);
        let both = parse(&["no-store", "no-cache"]);
        assert!(both.no_store && both.no_cache);
        assert_eq!(parse(&["max-age=0"]).max_age, Some(Duration::ZERO));
        assert_eq!(
            parse(&["max-age=60, max-age = 5"]).max_age,
            Some(Duration::from_secs(5))
        );
        let only = parse(&["Only-If-Cached, max-age=5"]);
        assert!(only.only_if_cached && !only.no_cache);
        assert_eq!(only.max_age, Some(Duration::from_secs(5)));
        assert!(!parse(&["no-cache"]).only_if_cached);
    }

    #[test]
    fn pragma_no_cache_counts_only_without_cache_control() {
        let no_cache = CacheControl {
            no_cache: true,
            ..CacheControl::default()
        };
        assert_eq!(parse_with(&[("pragma", "no-cache")]), no_cache);
        assert_eq!(parse_with(&[("pragma", "x-ext, No-Cache ")]), no_cache);
        assert_eq!(
            parse_with(&[("pragma", "x-ext"), ("pragma", "no-cache")]),
            no_cache
        );
        assert_eq!(
            parse_with(&[("pragma", "no-cache=1")]),
            CacheControl::default()
        );
        assert_eq!(parse_with(&[("pragma", "x-ext")]), CacheControl::default());
        // Cache-Control, when there is one, is what the client meant.
        assert_eq!(
            parse_with(&[("pragma", "no-cache"), ("cache-control", "max-age=5")]),
            CacheControl {
                max_age: Some(Duration::from_secs(5)),
                ..CacheControl::default()
            }
        );
    }

    #[test]
    fn malformed_values_are_ignored() {
        assert_eq!(parse(&["max-age=-1"]).max_age, None);
        assert_eq!(parse(&["max-age"]).max_age, None);
        assert_eq!(parse(&["max-age=1.5"]).max_age, None);
        assert_eq!(parse(&["no-cache-please"]), CacheControl::default());
        assert_eq!(parse(&[",,,"]), CacheControl::default());
    }
}
