//! Single-pass checks over JSON text that serde does not make: payload nesting and number
//! range, lone UTF-16 surrogate escapes.

use serde_json::value::RawValue;

/// What is wrong with a (syntactically valid) payload, if anything.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum PayloadProblem {
    TooDeep,
    NumberOutOfRange,
}

/// Checks a payload in one pass over its text: arrays and objects nest at most `max_depth`
/// deep, and every number fits an `f64`. JSON allows any number, but many parsers
/// (serde_json among them) refuse one that overflows, and a delivery must stay readable by
/// every client.
pub(super) fn check_payload(json: &str, max_depth: usize) -> Result<(), PayloadProblem> {
    let bytes = json.as_bytes();
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
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
    while let Some(offset) = bytes
        .get(i..)
        .and_then(|rest| rest.iter().position(|&b| b == b'\\'))
    {
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

/// Whether a JSON number's value is a finite `f64`.
pub(super) fn fits_f64(number: &str) -> bool {
    number.parse::<f64>().is_ok_and(f64::is_finite)
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
