//! Secrets out of what is shown: a URL as an error message or a log line
//! may print it.

use std::borrow::Cow;

/// `url` with its `user:password@` replaced by `***@`, and the value of any
/// query parameter whose name holds `pass`, `secret`, `token` or `key`
/// (redis-rs reads `?password=`) replaced by `***`.
///
/// Everything up to the last `@` counts as userinfo: a password with an
/// unescaped `/`, `?` or `#` (as generated ones have) is hidden too, at the
/// price of hiding a path that holds an `@`.
///
/// A string that is not quite a URL (a mistyped `https:/` or `redis//`,
/// which an error message then quotes) is hidden the same way: all before
/// its last `@` but a scheme's name.
pub fn url(url: &str) -> Cow<'_, str> {
    let kept = match url.find("://") {
        Some(i) => i + 3,
        None => url
            .find(':')
            .filter(|&i| {
                url[..i]
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
            })
            .map_or(0, |i| i + 1),
    };
    let rest = &url[kept..];
    let mut out: Cow<'_, str> = match rest.rfind('@') {
        Some(at) => format!("{}***{}", &url[..kept], &rest[at..]).into(),
        None => url.into(),
    };
    if let Some(q) = out.find('?') {
        let (head, query) = out.split_at(q + 1);
        let (query, fragment) = query.split_at(query.find('#').unwrap_or(query.len()));
        let mut changed = false;
        let params: Vec<String> = query
            .split('&')
            .map(|param| match param.split_once('=') {
                Some((name, value)) if secret_name(name) && !value.is_empty() => {
                    changed = true;
                    format!("{name}=***")
                }
                _ => param.to_owned(),
            })
            .collect();
        if changed {
            out = format!("{head}{}{fragment}", params.join("&")).into();
        }
    }
    out
}

fn secret_name(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    ["pass", "secret", "token", "key"]
        .iter()
        .any(|s| name.contains(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mistyped_url_hides_its_userinfo_too() {
        assert_eq!(
            url("https:/user:sk-SECRET@api.example.com/v1"),
            "https:***@api.example.com/v1"
        );
        assert_eq!(url("https//user:pw@host/v1"), "***@host/v1");
        assert_eq!(
            url("redis:/:S3cret@127.0.0.1:6379/0"),
            "redis:***@127.0.0.1:6379/0"
        );
        assert_eq!(url("redis//:pw@h?password=x"), "***@h?password=***");
        assert_eq!(url("api.example.com/v1"), "api.example.com/v1");
    }

    #[test]
    fn userinfo_and_secret_parameters_are_hidden() {
        assert_eq!(
            url("redis://user:s3cret@host:6379/0"),
            "redis://***@host:6379/0"
        );
        assert_eq!(url("redis://:se#cr/et@host:1"), "redis://***@host:1");
        assert_eq!(url("http://u:pa/ss@h/v1"), "http://***@h/v1");
        assert_eq!(
            url("redis://host/0?db=1&password=s3cret#f"),
            "redis://host/0?db=1&password=***#f"
        );
        assert_eq!(
            url("http://a:b@h/v1?api_key=k"),
            "http://***@h/v1?api_key=***"
        );
        assert_eq!(url("not a url"), "not a url");
    }
}
