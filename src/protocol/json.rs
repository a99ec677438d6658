//! Writing JSON text by hand: every frame is strings, already-valid raw JSON and fixed
//! keys, so building it directly cannot fail (a serializer's `Result` would only hide a
//! path that cannot be taken).

use serde_json::value::RawValue;

/// Appends `s` as a JSON string, escaped as `serde_json` escapes it.
pub(crate) fn push_string(out: &mut String, s: &str) {
    out.push('"');
    let mut start = 0;
    for (i, b) in s.bytes().enumerate() {
        let escape = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0x00..=0x1f => "",
            _ => continue,
        };
        out.push_str(&s[start..i]);
        if escape.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.push_str("\\u00");
            out.push(HEX[(b >> 4) as usize] as char);
            out.push(HEX[(b & 0xf) as usize] as char);
        } else {
            out.push_str(escape);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

/// Appends `"key":` to an object being written (with a comma unless it is the first).
pub(crate) fn push_key(out: &mut String, key: &str) {
    if !out.ends_with('{') {
        out.push(',');
    }
    out.push('"');
    out.push_str(key);
    out.push_str("\":");
}

/// Appends `"key":"value"`.
pub(crate) fn push_str_field(out: &mut String, key: &str, value: &str) {
    push_key(out, key);
    push_string(out, value);
}

/// Appends `"key":<raw JSON>`.
pub(crate) fn push_raw_field(out: &mut String, key: &str, value: &RawValue) {
    push_key(out, key);
    out.push_str(value.get());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_escaped_exactly_as_serde_json_does() {
        let mut all = String::new();
        for c in (0u32..0x80).filter_map(char::from_u32) {
            all.push(c);
        }
        all.push_str("é😀\u{2028}");
        let mut out = String::new();
        push_string(&mut out, &all);
        assert_eq!(out, serde_json::to_string(&all).unwrap());
    }
}
