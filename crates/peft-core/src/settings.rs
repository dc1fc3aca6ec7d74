//! The settings a command line gives a slot method (`peft train --r 8
//! --targets q_proj,v_proj`), applied the same way for every method: each
//! method lists which settings it takes and the `adapter_config.json` key
//! each sets (`AdapterConfig::from_cli`, `slot/method.rs`);
//! a setting it does not list is refused by name, never dropped.

use std::path::Path;

use serde_json::Value;

use crate::config::parse_json;
use crate::error::{PeftError, Result};

/// A setting as the command line names it (its flag without the dashes:
/// `r`, `alpha`, `targets`, `lora-dropout`, `feedforward`) with its JSON
/// value.
pub type Setting<'a> = (&'a str, Value);

/// A method's config as JSON: `text` (a `--config` file read from
/// `origin`) or `defaults`, with each setting written under the key `table`
/// gives it (`(setting, key)` pairs); a setting the table lacks is
/// refused, naming it, `method`, and what the method takes.
pub fn config_json(
    method: &str,
    text: Option<&str>,
    origin: &Path,
    defaults: Value,
    table: &[(&str, &str)],
    settings: &[Setting<'_>],
) -> Result<Value> {
    let mut config = match text {
        Some(t) => parse_json(t, origin)?,
        None => defaults,
    };
    for (setting, value) in settings {
        let Some((_, key)) = table.iter().find(|(s, _)| s == setting) else {
            let takes: Vec<String> = table.iter().map(|(s, _)| format!("--{s}")).collect();
            return Err(PeftError::Config(format!(
                "--{setting} does not apply to --method {method} (it takes {})",
                if takes.is_empty() {
                    "none".into()
                } else {
                    takes.join(", ")
                }
            )));
        };
        config[*key] = value.clone();
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn settings_land_on_their_keys_and_others_are_refused_by_name() {
        let table = [("r", "r"), ("alpha", "lora_alpha")];
        let here = Path::new("");
        let alpha = [("alpha", json!(4.0))];
        let got = config_json("lora", None, here, json!({"r": 8}), &table, &alpha).unwrap();
        assert_eq!(got, json!({"r": 8, "lora_alpha": 4.0}));
        let from_file = config_json(
            "lora",
            Some(r#"{"r": 2}"#),
            here,
            json!({"r": 8}),
            &table,
            &alpha,
        );
        assert_eq!(from_file.unwrap(), json!({"r": 2, "lora_alpha": 4.0}));
        let other = [("feedforward", json!("x"))];
        let err = config_json("vera", None, here, json!({}), &table, &other).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid config: --feedforward does not apply to --method vera (it takes --r, --alpha)"
        );
    }
}
