//! Single-pass checks over JSON text that serde does not make: payload nesting and number
//! range, lone UTF-16 surrogate escapes.

use serde_json::value::RawValue;

/// What is wrong with a (syntactically valid) payload, if anything.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum PayloadProblem {
    TooDeep,
    NumberOutOfRange,
}

/// A number written without an exponent and with at most this many characters is below
/// 10^300, so it is a finite `f64` without being parsed.
const PLAIN_NUMBER_FITS: usize = 300;

/// Checks a payload in one pass over its text: arrays and objects nest at most `max_depth`
/// deep, and every number fits an `f64`. JSON allows any number, but many parsers
/// (serde_json among them) refuse one that overflows, and a delivery must stay readable by
/// every client. Strings are skipped from quote to quote with `memchr` (their bytes are
/// most of a typical payload).
pub(super) fn check_payload(json: &str, max_depth: usize) -> Result<(), PayloadProblem> {
    let bytes = json.as_bytes();
    let mut depth = 0usize;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                i += 1;
                // To the closing quote; an escape's next byte is never one.
                loop {
                    let rest = bytes.get(i..).unwrap_or_default();
                    match memchr::memchr2(b'"', b'\\', rest) {
                        None => return Ok(()),
                        Some(at) if rest[at] == b'\\' => i += at + 2,
                        Some(at) => {
                            i += at + 1;
                            break;
                        }
                    }
                }
                continue;
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > max_depth {
                    return Err(PayloadProblem::TooDeep);
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i < bytes.len()
                    && matches!(bytes[i], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')
                {
                    i += 1;
                }
                if !fits_f64(&json[start..i]) {
                    return Err(PayloadProblem::NumberOutOfRange);
                }
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

/// Why a payload a client could not have sent (too deep, a number out of range, a lone
/// surrogate escape) may not be delivered, if it may not: for a payload that did not come
/// through [`parse`](super::parse), such as one a `message` hook put in the client's place.
pub(crate) fn payload_problem(json: &str, max_depth: usize) -> Option<&'static str> {
    match check_payload(json, max_depth) {
        Err(PayloadProblem::TooDeep) => Some("the payload nests too deep"),
        Err(PayloadProblem::NumberOutOfRange) => {
            Some("the payload has a number too large for a 64-bit float")
        }
        Ok(()) if has_lone_surrogate(json) => Some("the payload has a lone UTF-16 surrogate"),
        Ok(()) => None,
    }
}

/// Whether JSON text has a `\\uXXXX` escape of a UTF-16 surrogate that is not part of a
/// high-low pair. Backslashes appear only inside strings in valid JSON, and `\\\\` is
/// skipped as one escape, so every escape is seen exactly once.
pub(super) fn has_lone_surrogate(json: &str) -> bool {
    let bytes = json.as_bytes();
    let hex4 = |at: usize| -> Option<u16> {
        let digits = bytes.get(at..at + 4)?;
        u16::from_str_radix(std::str::from_utf8(digits).ok()?, 16).ok()
    };
    let mut i = 0;
    while let Some(offset) = bytes.get(i..).and_then(|rest| memchr::memchr(b'\\', rest)) {
        i += offset;
        if bytes.get(i + 1) != Some(&b'u') {
            i += 2;
            continue;
        }
        match hex4(i + 2) {
            Some(0xD800..=0xDBFF) => {
                let low = (bytes.get(i + 6..i + 8) == Some(b"\\u"))
                    .then(|| hex4(i + 8))
                    .flatten();
                if !matches!(low, Some(0xDC00..=0xDFFF)) {
                    return true;
                }
                i += 12;
            }
            Some(0xDC00..=0xDFFF) => return true,
            _ => i += 6,
        }
    }
    false
}

/// Whether a JSON number's value is a finite `f64`. Only a number with an exponent or of
/// more than [`PLAIN_NUMBER_FITS`] characters is parsed.
pub(super) fn fits_f64(number: &str) -> bool {
    let plain = number.len() <= PLAIN_NUMBER_FITS && !number.bytes().any(|b| b | 0x20 == b'e');
    plain || number.parse::<f64>().is_ok_and(f64::is_finite)
}

pub(super) fn is_string_or_number(raw: &RawValue) -> bool {
    matches!(
        raw.get().as_bytes().first(),
        Some(b'"' | b'-' | b'0'..=b'9')
    )
}

pub(super) fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// The byte-by-byte check that `check_payload` replaced, kept as its oracle.
    fn byte_by_byte(json: &str, max_depth: usize) -> Result<(), PayloadProblem> {
        let bytes = json.as_bytes();
        let (mut depth, mut in_string, mut escaped, mut i) = (0usize, false, false, 0);
        while i < bytes.len() {
            let b = bytes[i];
            if in_string {
                match (escaped, b) {
                    (true, _) => escaped = false,
                    (false, b'\\') => escaped = true,
                    (false, b'"') => in_string = false,
                    _ => {}
                }
                i += 1;
                continue;
            }
            match b {
                b'"' => in_string = true,
                b'[' | b'{' => {
                    depth += 1;
                    if depth > max_depth {
                        return Err(PayloadProblem::TooDeep);
                    }
                }
                b']' | b'}' => depth = depth.saturating_sub(1),
                b'-' | b'0'..=b'9' => {
                    let start = i;
                    while i < bytes.len()
                        && matches!(bytes[i], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')
                    {
                        i += 1;
                    }
                    if !json[start..i].parse::<f64>().is_ok_and(f64::is_finite) {
                        return Err(PayloadProblem::NumberOutOfRange);
                    }
                    continue;
                }
                _ => {}
            }
            i += 1;
        }
        Ok(())
    }

    /// JSON strings made of the pieces that matter to a scanner: quotes and backslashes
    /// escaped, brackets and digits inside, non-ASCII text.
    fn string() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just("a"),
            Just("[{"),
            Just("]}"),
            Just("12e999"),
            Just("\\\""),
            Just("\\\\"),
            Just("\\u005c"),
            Just("\\ud83d\\ude00"),
            Just("é€"),
        ];
        prop::collection::vec(piece, 0..6).prop_map(|pieces| format!("\"{}\"", pieces.concat()))
    }

    /// JSON numbers, up to well past the lengths where a plain number may overflow.
    fn number() -> impl Strategy<Value = String> {
        (
            "-?",
            "[1-9][0-9]{0,320}|0",
            "(\\.[0-9]{1,4})?",
            "([eE][-+]?[0-9]{1,3})?",
        )
            .prop_map(|(sign, int, fraction, exponent)| format!("{sign}{int}{fraction}{exponent}"))
    }

    fn json() -> impl Strategy<Value = String> {
        let leaf = prop_oneof![
            string(),
            number(),
            Just("true".to_owned()),
            Just("null".to_owned())
        ];
        leaf.prop_recursive(8, 64, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4)
                    .prop_map(|v| format!("[{}]", v.join(","))),
                prop::collection::vec((string(), inner), 0..4).prop_map(|members| {
                    let members: Vec<String> =
                        members.iter().map(|(k, v)| format!("{k}:{v}")).collect();
                    format!("{{{}}}", members.join(","))
                }),
            ]
        })
    }

    proptest! {
        #[test]
        fn check_payload_agrees_with_the_byte_by_byte_check(text in json(), depth in 1usize..8) {
            prop_assert_eq!(check_payload(&text, depth), byte_by_byte(&text, depth), "{}", text);
        }

        #[test]
        fn fits_f64_agrees_with_parsing(text in number()) {
            prop_assert_eq!(fits_f64(&text), text.parse::<f64>().is_ok_and(f64::is_finite), "{}", text);
        }
    }
}
