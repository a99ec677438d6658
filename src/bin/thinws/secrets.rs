//! Secrets for the standalone server (the token secret, the API key): from a flag, an
//! environment variable or a file, and never empty.

/// A secret given by `flag` or read from `file` (without a trailing newline); refused when
/// empty: an empty secret would let anyone in while the log says otherwise.
pub fn secret_of(
    flag: &str,
    value: Option<&str>,
    file: Option<&std::path::Path>,
) -> Result<Option<String>, String> {
    let secret = match (value, file) {
        (Some(value), _) => value.to_owned(),
        (None, Some(path)) => std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {flag}-file {}: {e}", path.display()))?
            .trim_end_matches(['\r', '\n'])
            .to_owned(),
        (None, None) => return Ok(None),
    };
    if secret.is_empty() {
        return Err(format!(
            "{flag} is empty: refusing to start with an empty secret"
        ));
    }
    Ok(Some(secret))
}
