//! PEFT's target-module rules, exactly as `check_target_module_exists`
//! applies them.
//!
//! - `target_modules` as a string: a regular expression that must match the
//!   whole module path (`re.fullmatch`); `all-linear`: every linear but the
//!   model's output layers.
//! - as a list: a module is a target when its path equals an entry, or ends
//!   with `.` + entry and `layers_to_transform` (with `layers_pattern`), when
//!   set, holds the first layer index found in the path.
//! - `exclude_modules` wins over everything (same string/list rules).
//! - `rank_pattern` / `alpha_pattern` keys match a path when
//!   `^(.*\.)?(KEY)$` matches it; the first such key wins.

use regex::Regex;

use crate::config::{LayerIndices, LayersPattern, LoraConfig, TargetModules};
use crate::error::{PeftError, Result};
use crate::regex_match::full_match;

fn list_match(names: &[String], path: &str) -> bool {
    names
        .iter()
        .any(|n| path == n || path.ends_with(&format!(".{n}")))
}

/// Whether `path` is excluded by `exclude_modules`.
pub fn is_excluded(exclude: Option<&TargetModules>, path: &str) -> Result<bool> {
    match exclude {
        None => Ok(false),
        Some(TargetModules::Pattern(p)) => full_match(p, path),
        Some(TargetModules::List(names)) => Ok(list_match(names, path)),
    }
}

/// The layer index PEFT reads from a module path: the number after
/// `<layers_pattern>.` (or after any `<name>.` when no pattern is given).
fn layer_index(path: &str, pattern: Option<&LayersPattern>) -> Result<Option<usize>> {
    // An empty pattern (`""` or `[]`) means any layer list, as in PEFT.
    let patterns: Vec<String> = match pattern {
        None => vec![],
        Some(LayersPattern::One(p)) if p.is_empty() => vec![],
        Some(LayersPattern::One(p)) => vec![p.clone()],
        Some(LayersPattern::Many(ps)) => ps.clone(),
    };
    // Lazy `.*?`: the first numbered segment is the layer index, not a
    // nested one such as an expert's (`layers.1.experts.0`), as in PEFT.
    let regexes: Vec<String> = if patterns.is_empty() {
        vec![r"^.*?\.[^.]*\.(\d+)\.".to_string()]
    } else {
        patterns
            .iter()
            .map(|p| format!(r"^(?:.*?\.)?{p}\.(\d+)\."))
            .collect()
    };
    for r in regexes {
        let re = Regex::new(&r).map_err(|e| PeftError::Regex {
            pattern: r.clone(),
            message: e.to_string(),
        })?;
        if let Some(c) = re.captures(path) {
            return Ok(c[1].parse().ok());
        }
    }
    Ok(None)
}

/// Whether the module at `path` is a target of `config`. `output_layers` are
/// the model's output heads, which `all-linear` leaves out.
pub fn is_target(config: &LoraConfig, path: &str, output_layers: &[String]) -> Result<bool> {
    targets_match(
        config.target_modules.as_ref(),
        config.exclude_modules.as_ref(),
        config.layers_to_transform.as_ref(),
        config.layers_pattern.as_ref(),
        path,
        output_layers,
    )
}

/// The rule of [`is_target`], on the individual config fields, for method
/// configs other than LoRA.
pub fn targets_match(
    targets: Option<&TargetModules>,
    exclude: Option<&TargetModules>,
    layers_to_transform: Option<&LayerIndices>,
    layers_pattern: Option<&LayersPattern>,
    path: &str,
    output_layers: &[String],
) -> Result<bool> {
    if is_excluded(exclude, path)? {
        return Ok(false);
    }
    let Some(targets) = targets else {
        return Err(PeftError::Config(
            "`target_modules` is not set and no default is known for this model".into(),
        ));
    };
    if targets.is_all_linear() {
        return Ok(!output_layers.iter().any(|o| o == path));
    }
    match targets {
        TargetModules::Pattern(p) => full_match(p, path),
        // A path listed whole is a target whatever its layer (PEFT checks
        // `key in target_modules` before the layer restriction).
        TargetModules::List(names) if names.iter().any(|n| n == path) => Ok(true),
        TargetModules::List(names) => {
            if !list_match(names, path) {
                return Ok(false);
            }
            let indices: Option<Vec<usize>> = match layers_to_transform {
                None => None,
                Some(LayerIndices::One(i)) => Some(vec![*i]),
                Some(LayerIndices::Many(v)) if v.is_empty() => None,
                Some(LayerIndices::Many(v)) => Some(v.clone()),
            };
            match indices {
                None => Ok(true),
                Some(indices) => {
                    Ok(layer_index(path, layers_pattern)?.is_some_and(|i| indices.contains(&i)))
                }
            }
        }
    }
}

/// PEFT's `get_pattern_key`: the first key of a rank/alpha pattern whose
/// regex `^(.*\.)?(KEY)$` matches `path`.
pub fn pattern_key<'a>(
    keys: impl IntoIterator<Item = &'a String>,
    path: &str,
) -> Result<Option<&'a String>> {
    for key in keys {
        let r = format!(r"^(.*\.)?({key})$");
        let re = Regex::new(&r).map_err(|e| PeftError::Regex {
            pattern: key.clone(),
            message: e.to_string(),
        })?;
        if re.is_match(path) {
            return Ok(Some(key));
        }
    }
    Ok(None)
}

/// The value of `pattern` (a `rank_pattern` / `alpha_pattern`) for the
/// module at `path`, or `default` when no key matches it.
pub fn pattern_value<T: Copy>(
    pattern: &indexmap::IndexMap<String, T>,
    path: &str,
    default: T,
) -> Result<T> {
    Ok(match pattern_key(pattern.keys(), path)? {
        Some(k) => pattern[k],
        None => default,
    })
}

/// Rank and alpha for the module at `path`, after `rank_pattern` / `alpha_pattern`.
pub fn rank_and_alpha(config: &LoraConfig, path: &str) -> Result<(usize, f64)> {
    Ok((
        pattern_value(&config.rank_pattern, path, config.r)?,
        pattern_value(&config.alpha_pattern, path, config.lora_alpha)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(json: &str) -> LoraConfig {
        LoraConfig::from_json_str(json, std::path::Path::new("t")).unwrap()
    }

    const Q0: &str = "model.layers.0.self_attn.q_proj";
    const Q1: &str = "model.layers.1.self_attn.q_proj";
    const V1: &str = "model.layers.1.self_attn.v_proj";

    #[test]
    fn list_matches_exact_names_and_suffixes_only() {
        let c = cfg(r#"{"target_modules":["q_proj","self_attn.v_proj"]}"#);
        assert!(is_target(&c, Q0, &[]).unwrap());
        assert!(is_target(&c, V1, &[]).unwrap());
        assert!(!is_target(&c, "model.layers.0.self_attn.xq_proj", &[]).unwrap());
        assert!(is_target(&c, "q_proj", &[]).unwrap());
    }

    #[test]
    fn string_is_a_full_regex_match() {
        let c = cfg(r#"{"target_modules":".*\\.1\\..*(q|v)_proj"}"#);
        assert!(!is_target(&c, Q0, &[]).unwrap());
        assert!(is_target(&c, Q1, &[]).unwrap());
        assert!(is_target(&c, V1, &[]).unwrap());
        let c = cfg(r#"{"target_modules":"q_proj"}"#);
        assert!(
            !is_target(&c, Q0, &[]).unwrap(),
            "a regex must match the whole path"
        );
    }

    #[test]
    fn layers_to_transform_and_pattern() {
        let c = cfg(r#"{"target_modules":["q_proj"],"layers_to_transform":[1]}"#);
        assert!(!is_target(&c, Q0, &[]).unwrap());
        assert!(is_target(&c, Q1, &[]).unwrap());
        let c = cfg(
            r#"{"target_modules":["q_proj"],"layers_to_transform":0,"layers_pattern":"layers"}"#,
        );
        assert!(is_target(&c, Q0, &[]).unwrap());
        assert!(!is_target(&c, Q1, &[]).unwrap());
        let c =
            cfg(r#"{"target_modules":["q_proj"],"layers_to_transform":0,"layers_pattern":"h"}"#);
        assert!(!is_target(&c, Q0, &[]).unwrap());
    }

    #[test]
    fn exclude_and_all_linear() {
        let c = cfg(r#"{"target_modules":"all-linear","exclude_modules":["v_proj"]}"#);
        let out = vec!["lm_head".to_string()];
        assert!(is_target(&c, Q0, &out).unwrap());
        assert!(!is_target(&c, V1, &out).unwrap());
        assert!(!is_target(&c, "lm_head", &out).unwrap());
        let c = cfg(r#"{"target_modules":["q_proj"],"exclude_modules":".*\\.0\\..*"}"#);
        assert!(!is_target(&c, Q0, &out).unwrap());
        assert!(is_target(&c, Q1, &out).unwrap());
    }

    #[test]
    fn rank_and_alpha_patterns() {
        let c = cfg(
            r#"{"r":8,"lora_alpha":16,"target_modules":["q_proj","v_proj"],
                "rank_pattern":{"layers.1.self_attn.q_proj":2,"v_proj":4},"alpha_pattern":{"q_proj":3}}"#,
        );
        assert_eq!(rank_and_alpha(&c, Q0).unwrap(), (8, 3.0));
        assert_eq!(rank_and_alpha(&c, Q1).unwrap(), (2, 3.0));
        assert_eq!(rank_and_alpha(&c, V1).unwrap(), (4, 16.0));
    }

    #[test]
    fn bad_regex_is_a_typed_error() {
        let c = cfg(r#"{"target_modules":"(unclosed"}"#);
        assert!(matches!(
            is_target(&c, Q0, &[]),
            Err(PeftError::Regex { .. })
        ));
    }
}
