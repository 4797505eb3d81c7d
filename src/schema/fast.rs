//! A quick proof that an event is valid, for the events that plainly are: one borrowed pass
//! over the text, no `serde_json::Value` built. It only ever answers "valid" when the compiled
//! schema would; anything it is unsure of (an escape where a format is checked, an integer
//! written as `1.0`, a URI outside the plain subset, a repeated key) goes to the full check.
//!
//! The rules mirror `mediawiki/recentchange` 1.0.0 and 1.0.1 (the same apart from `$id`) and the
//! legacy variant (no `$schema`, no `meta.stream` required). A test keeps the two checks in
//! agreement on the recorded events and on every mutation of them it makes.

use super::SchemaVersion;
use serde::Deserialize;
use serde_json::value::RawValue;

/// A property that is there, `null` included (a plain `Option` would take `null` for absent,
/// and `null` breaks a `"type": "string"`).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// The root's properties that the schemas constrain; every other one is allowed.
#[derive(Deserialize)]
struct Root<'a> {
    #[serde(rename = "$schema", borrow, default, deserialize_with = "present")]
    schema: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    meta: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    title: Option<&'a RawValue>,
    #[serde(rename = "type", borrow, default, deserialize_with = "present")]
    kind: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    bot: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    comment: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    id: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    length: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    log_action: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    log_action_comment: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    log_id: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    log_params: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    log_type: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    minor: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    namespace: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    parsedcomment: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    patrolled: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    revision: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    server_name: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    server_script_path: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    server_url: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    timestamp: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    user: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    wiki: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Meta<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    domain: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    dt: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    id: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    request_id: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    stream: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    uri: Option<&'a RawValue>,
    /// Not in the schemas: it marks the legacy format.
    #[serde(borrow, default, deserialize_with = "present")]
    schema_uri: Option<&'a RawValue>,
}

/// `length` and `revision`: two integer-or-null sides, anything else allowed.
#[derive(Deserialize)]
struct Sides<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    new: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    old: Option<&'a RawValue>,
}

/// What a JSON value's text starts with.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    String,
    Bool,
    Null,
    Object,
    Array,
    /// Digits only, maybe a minus sign: what the full check calls an integer too.
    Integer,
    /// Any other number: left to the full check.
    Number,
}

fn kind(raw: &RawValue) -> Kind {
    let text = raw.get();
    match text.as_bytes().first() {
        Some(b'"') => Kind::String,
        Some(b't' | b'f') => Kind::Bool,
        Some(b'n') => Kind::Null,
        Some(b'{') => Kind::Object,
        Some(b'[') => Kind::Array,
        _ if text
            .strip_prefix('-')
            .unwrap_or(text)
            .bytes()
            .all(|b| b.is_ascii_digit()) =>
        {
            Kind::Integer
        }
        _ => Kind::Number,
    }
}

/// A missing property, or one of `kinds`.
fn is(raw: Option<&RawValue>, kinds: &[Kind]) -> bool {
    raw.is_none_or(|raw| kinds.contains(&kind(raw)))
}

/// The largest integer the schemas allow for `namespace` and `timestamp` (2^53 - 1).
const SAFE_INTEGER: i64 = 9_007_199_254_740_991;

/// A missing property, or an integer within ±(2^53 - 1).
fn is_safe_integer(raw: Option<&RawValue>) -> bool {
    raw.is_none_or(|raw| {
        kind(raw) == Kind::Integer
            && raw
                .get()
                .parse::<i64>()
                .is_ok_and(|n| (-SAFE_INTEGER..=SAFE_INTEGER).contains(&n))
    })
}

/// The text of a string without escapes; `None` for anything else.
fn plain_string(raw: &RawValue) -> Option<&str> {
    let inner = raw.get().strip_prefix('"')?.strip_suffix('"')?;
    (!inner.contains('\\')).then_some(inner)
}

/// A missing property, or a string of at least one character.
fn is_nonempty_string(raw: Option<&RawValue>) -> bool {
    raw.is_none_or(|raw| kind(raw) == Kind::String && raw.get() != "\"\"")
}

/// `length` or `revision`: an object whose `new` and `old` are integers or null.
fn is_sides(raw: Option<&RawValue>) -> bool {
    let Some(raw) = raw else {
        return true;
    };
    if kind(raw) != Kind::Object {
        return false;
    }
    match serde_json::from_str::<Sides<'_>>(raw.get()) {
        Ok(sides) => [sides.new, sides.old]
            .into_iter()
            .all(|side| is(side, &[Kind::Integer, Kind::Null])),
        Err(_) => false,
    }
}

/// `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)`, every field in range: a date-time as RFC 3339
/// writes it, so surely one for the full check too.
fn is_date_time(text: &str) -> bool {
    let b = text.as_bytes();
    let digits = |from: usize, n: usize| -> Option<u32> {
        let part = b.get(from..from + n)?;
        part.iter()
            .all(u8::is_ascii_digit)
            .then(|| part.iter().fold(0, |v, d| v * 10 + u32::from(d - b'0')))
    };
    let (Some(year), Some(month), Some(day), Some(hour), Some(minute), Some(second)) = (
        digits(0, 4),
        digits(5, 2),
        digits(8, 2),
        digits(11, 2),
        digits(14, 2),
        digits(17, 2),
    ) else {
        return false;
    };
    if b.get(4) != Some(&b'-')
        || b.get(7) != Some(&b'-')
        || b.get(10) != Some(&b'T')
        || b.get(13) != Some(&b':')
        || b.get(16) != Some(&b':')
    {
        return false;
    }
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let days = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return false,
    };
    if day == 0 || day > days || hour > 23 || minute > 59 || second > 59 {
        return false;
    }
    let mut at = 19;
    if b.get(at) == Some(&b'.') {
        let fraction = b[at + 1..]
            .iter()
            .take_while(|d| d.is_ascii_digit())
            .count();
        if !(1..=9).contains(&fraction) {
            return false;
        }
        at += 1 + fraction;
    }
    match &b[at..] {
        b"Z" => true,
        [b'+' | b'-', ..] if b.len() == at + 6 => {
            matches!((digits(at + 1, 2), b.get(at + 3), digits(at + 4, 2)),
                (Some(h), Some(b':'), Some(m)) if h <= 23 && m <= 59)
        }
        _ => false,
    }
}

/// `http(s)://host[:port]` and then a path, query and fragment of the characters RFC 3986
/// allows there unencoded, with well-formed percent escapes: a URI reference by any reading.
fn is_plain_uri(text: &str) -> bool {
    let Some(rest) = text
        .strip_prefix("https://")
        .or_else(|| text.strip_prefix("http://"))
    else {
        return false;
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let (host, port) = match authority.split_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (authority, None),
    };
    let host_ok = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    if !host_ok || !port_ok {
        return false;
    }
    let (before, fragment) = match tail.split_once('#') {
        Some((before, fragment)) => (before, Some(fragment)),
        None => (tail, None),
    };
    let part_ok = |part: &str, extra: &[u8]| {
        let b = part.as_bytes();
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'%' => {
                    let hex = |j: usize| b.get(j).is_some_and(u8::is_ascii_hexdigit);
                    if !(hex(i + 1) && hex(i + 2)) {
                        return false;
                    }
                    i += 3;
                    continue;
                }
                c if c.is_ascii_alphanumeric()
                    || b"-._~!$&'()*+,;=:@/".contains(&c)
                    || extra.contains(&c) => {}
                _ => return false,
            }
            i += 1;
        }
        true
    };
    // A query may hold `?`; the fragment may hold `?` too, but never a second `#`.
    part_ok(before, b"?") && fragment.is_none_or(|f| part_ok(f, b"?"))
}

/// Nesting at which the text is left to the full check (which refuses beyond 128 levels).
const DEEP: usize = 100;

/// True when the text holds nothing that the borrowed reading lets through but a full parse
/// refuses: serde skips unconstrained values checking their syntax only, not a number's range
/// (`1e400`, 400 digits), an escaped surrogate's pairing (`"\ud800"`) or the nesting limit.
/// So any exponent, any run of 20 digits or more, any escaped surrogate and deep nesting send
/// the event to the full check. One pass over the bytes, strings skipped.
fn plain_text(data: &str) -> bool {
    let b = data.as_bytes();
    let (mut i, mut depth, mut digits) = (0, 0usize, 0usize);
    while i < b.len() {
        match b[i] {
            b'"' => {
                digits = 0;
                i += 1;
                // Most of an event is string content: jump to the next quote or escape.
                loop {
                    let Some(k) = b
                        .get(i..)
                        .and_then(|rest| memchr::memchr2(b'"', b'\\', rest))
                    else {
                        // Unterminated: not JSON, which serde says next.
                        i = b.len();
                        break;
                    };
                    i += k;
                    if b[i] == b'"' {
                        break;
                    }
                    if b.get(i + 1) == Some(&b'u')
                        && matches!(b.get(i + 2), Some(b'd' | b'D'))
                        && b.get(i + 3).is_some_and(|c| b"89abcdefABCDEF".contains(c))
                    {
                        return false;
                    }
                    i += 2;
                }
            }
            b'{' | b'[' => {
                digits = 0;
                depth += 1;
                if depth >= DEEP {
                    return false;
                }
            }
            b'}' | b']' => {
                digits = 0;
                depth = depth.saturating_sub(1);
            }
            b'0'..=b'9' => {
                digits += 1;
                if digits >= 20 {
                    return false;
                }
            }
            // Outside strings a letter `e` follows a digit only as a number's exponent
            // ("true" and "false" have it after a letter).
            b'e' | b'E' if i > 0 && (b[i - 1].is_ascii_digit() || b[i - 1] == b'.') => {
                return false;
            }
            _ => digits = 0,
        }
        i += 1;
    }
    true
}

/// The schema version `data` surely satisfies; `None` when the full check must decide.
pub fn valid(data: &str) -> Option<SchemaVersion> {
    // serde reads a struct from a JSON array as well: the object check comes first.
    if !data.starts_with('{') || !plain_text(data) {
        return None;
    }
    let root: Root<'_> = serde_json::from_str(data).ok()?;
    let meta_raw = root.meta?;
    if kind(meta_raw) != Kind::Object {
        return None;
    }
    let meta: Meta<'_> = serde_json::from_str(meta_raw.get()).ok()?;
    let version = match root.schema {
        Some(raw) => {
            let uri = plain_string(raw)?;
            let path = uri.split(['?', '#']).next().unwrap_or_default();
            match path.rsplit_once("/mediawiki/recentchange/") {
                Some((_, "1.0.0")) => SchemaVersion::V1_0_0,
                Some((_, "1.0.1")) => SchemaVersion::V1_0_1,
                _ => return None,
            }
        }
        None if meta.schema_uri.is_some_and(|raw| kind(raw) == Kind::String) => {
            SchemaVersion::Legacy
        }
        None => return None,
    };
    use Kind::{Array, Bool, Integer, Null, Object, String};
    let strings = [
        root.title,
        root.kind,
        root.comment,
        root.log_action,
        root.parsedcomment,
        root.server_name,
        root.server_script_path,
        root.server_url,
        root.user,
        root.wiki,
        meta.id,
        meta.request_id,
    ];
    let ok = strings.into_iter().all(|raw| is(raw, &[String]))
        && [root.bot, root.minor, root.patrolled]
            .into_iter()
            .all(|raw| is(raw, &[Bool]))
        && [root.id, root.log_id]
            .into_iter()
            .all(|raw| is(raw, &[Integer, Null]))
        && is(root.log_action_comment, &[String, Null])
        && is(root.log_type, &[String, Null])
        && is(root.log_params, &[Array, Object, String])
        && is_safe_integer(root.namespace)
        && is_safe_integer(root.timestamp)
        && is_sides(root.length)
        && is_sides(root.revision)
        && is_nonempty_string(meta.domain)
        && is_nonempty_string(meta.stream)
        && (version == SchemaVersion::Legacy || meta.stream.is_some());
    if !ok {
        return None;
    }
    let dt = plain_string(meta.dt?)?;
    if dt.len() > 128 || !is_date_time(dt) {
        return None;
    }
    if let Some(raw) = meta.uri {
        let uri = plain_string(raw)?;
        if uri.len() > 8192 || !is_plain_uri(uri) {
            return None;
        }
    }
    Some(version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn date_times_are_read_strictly() {
        for good in [
            "2026-06-20T15:49:48Z",
            "2026-06-20T15:49:48.123Z",
            "2024-02-29T00:00:00+02:00",
            "1970-01-01T00:00:00.000000001-11:30",
        ] {
            assert!(is_date_time(good), "{good}");
        }
        for bad in [
            "2026-06-20 15:49:48Z",
            "2026-06-20T15:49:48",
            "2025-02-29T00:00:00Z",
            "2026-13-01T00:00:00Z",
            "2026-06-20T24:00:00Z",
            "2026-06-20T15:49:60Z",
            "2026-06-20T15:49:48.Z",
            "2026-06-20T15:49:48z",
            "2026-06-20T15:49:48+0200",
            "2026-06-20T15:49:48Z ",
        ] {
            assert!(!is_date_time(bad), "{bad}");
        }
    }

    #[test]
    fn what_only_a_full_parse_refuses_is_left_to_it() {
        let base = r#"{"$schema":"/mediawiki/recentchange/1.0.0","meta":{"stream":"s","dt":"2024-01-01T00:00:00Z"}"#;
        assert_eq!(valid(&format!("{base}}}")), Some(SchemaVersion::V1_0_0));
        let deep = format!(r#","x":{}{}"#, "[".repeat(129), "]".repeat(129));
        let long = format!(r#","id":1{}"#, "0".repeat(400));
        for unsure in [
            r#","x":1e400"#,
            r#","x":1.5E3"#,
            long.as_str(),
            r#","comment":"\ud800""#,
            r#","comment":"\uD83D\uDE00""#,
            deep.as_str(),
        ] {
            assert_eq!(valid(&format!("{base}{unsure}}}")), None, "{unsure}");
        }
        // Letters and digits inside strings, and true/false, are no numbers.
        let fine = r#","comment":"1e400, \"123456789012345678901\"","bot":true,"minor":false,"namespace":12"#;
        assert_eq!(
            valid(&format!("{base}{fine}}}")),
            Some(SchemaVersion::V1_0_0)
        );
    }

    #[test]
    fn only_plain_uris_are_taken_as_surely_valid() {
        assert!(is_plain_uri(
            "https://commons.wikimedia.org/wiki/File:A_(page_1).jpg"
        ));
        assert!(is_plain_uri(
            "http://localhost:8080/w/index.php?a=b&c=%2F#top"
        ));
        for unsure in [
            "/wiki/Main_Page",
            "https://[::1]/",
            "https:///x",
            "https://a b/",
            "https://x.org/%G0",
            "https://x.org/a#b#c",
            "https://x.org/ü",
            "ftp://x.org/",
        ] {
            assert!(!is_plain_uri(unsure), "{unsure}");
        }
    }
}
