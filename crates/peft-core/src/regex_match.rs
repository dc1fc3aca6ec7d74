//! PEFT's regex semantics for module paths: Python's `re.fullmatch`. Shared
//! by the configs (`feedforward_modules`) and target matching, so that
//! neither imports the other for it.

use regex::Regex;

use crate::error::{PeftError, Result};

/// Whether `pattern` matches the whole of `text`; a pattern that does not
/// compile is a [`PeftError::Regex`] naming it.
pub(crate) fn full_match(pattern: &str, text: &str) -> Result<bool> {
    let re = Regex::new(&format!("^(?:{pattern})$")).map_err(|e| PeftError::Regex {
        pattern: pattern.to_string(),
        message: e.to_string(),
    })?;
    Ok(re.is_match(text))
}
