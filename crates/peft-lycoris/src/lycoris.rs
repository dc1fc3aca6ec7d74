//! What the LyCORIS methods share, as PEFT 0.21's `LycorisConfig` and
//! `LycorisTuner` define it: the rank fields every one of them has
//! ([`LycorisConfig`]: their checks, rank/alpha patterns; reading, default
//! targets and target rules are [`MethodConfig`]'s), and their factors in
//! PEFT's file ([`write_factors`], [`read_factors`]). A method file adds its
//! own fields and how its factors start.

use std::collections::HashMap;
use std::path::Path;

use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};
use indexmap::IndexMap;
use peft_core::io::{take_tensor, HostTensor};
use peft_core::method_config::MethodConfig;
use peft_core::slot::{DeltaEntry, DeltaFactors};
use peft_core::slot_model::KEY_PREFIX;
use peft_core::target::pattern_value;
use peft_core::{PeftError, Result};

/// The rank fields PEFT's `LycorisConfig` gives every LyCORIS method,
/// borrowed from a method's config.
#[derive(Debug, Clone, Copy)]
pub struct Shared<'a> {
    /// Rank `r`.
    pub r: usize,
    /// Scaling numerator: `ΔW` is scaled by `alpha / r`.
    pub alpha: f64,
    /// Probability of dropping an output row of `ΔW` in training.
    pub rank_dropout: f64,
    /// Probability of skipping a layer's delta in training.
    pub module_dropout: f64,
    /// Per-module rank overrides.
    pub rank_pattern: &'a IndexMap<String, usize>,
    /// Per-module alpha overrides.
    pub alpha_pattern: &'a IndexMap<String, f64>,
}

/// A LyCORIS method's config: the family's fields through
/// [`shared`](Self::shared), their checks and patterns provided.
pub trait LycorisConfig: MethodConfig {
    /// The family's fields.
    fn shared(&self) -> Shared<'_>;

    /// Checks of the family's fields, as PEFT's `update_layer` and
    /// `__post_init__` do (the method's [`MethodConfig::validate`] calls it).
    fn validate_shared(&self) -> Result<()> {
        let s = self.shared();
        let bad = |what: String| Err(PeftError::Config(format!("{}: {what}", Self::METHOD)));
        if s.r == 0 || s.rank_pattern.values().any(|&r| r == 0) {
            return bad(format!(
                "`r` should be a positive integer value but the value passed is 0 (r = {}, rank_pattern = {:?})",
                s.r, s.rank_pattern
            ));
        }
        if !s.alpha.is_finite() || s.alpha_pattern.values().any(|a| !a.is_finite()) {
            return bad("`alpha` and `alpha_pattern` must be finite".into());
        }
        for (field, p) in [
            ("rank_dropout", s.rank_dropout),
            ("module_dropout", s.module_dropout),
        ] {
            if !(0.0..1.0).contains(&p) {
                return bad(format!("`{field}` must be in [0, 1), got {p}"));
            }
        }
        let t = self.target_spec();
        if t.layers_pattern.is_some() && t.layers_to_transform.is_none() {
            return bad(
                "When `layers_pattern` is specified, `layers_to_transform` must also be specified."
                    .into(),
            );
        }
        Ok(())
    }

    /// Rank and alpha for the module at `path`, after the patterns.
    fn rank_and_alpha(&self, path: &str) -> Result<(usize, f64)> {
        let s = self.shared();
        Ok((
            pattern_value(s.rank_pattern, path, s.r)?,
            pattern_value(s.alpha_pattern, path, s.alpha)?,
        ))
    }
}

/// PyTorch's `kaiming_uniform_(a=√5)` on a weight whose fan-in is
/// `fan_in`: U(±1/√fan_in).
pub fn kaiming<B: Backend>(shape: [usize; 2], fan_in: usize, device: &B::Device) -> Tensor<B, 2> {
    let bound = 1.0 / (fan_in as f64).sqrt();
    Tensor::random(shape, Distribution::Uniform(-bound, bound), device)
}

/// Appends the entry's factors to `out` under PEFT's keys for module `path`,
/// in PEFT's `[out, in]` layout.
pub fn write_factors<B: Backend, F: DeltaFactors<B>>(
    entry: &DeltaEntry<B, F>,
    path: &str,
    out: &mut Vec<(String, HostTensor)>,
) {
    for (key, p) in entry.factors.factors() {
        out.push((
            format!("{KEY_PREFIX}{path}.{key}"),
            HostTensor::from_tensor(p.val()).transposed(),
        ));
    }
}

/// Moves the entry's factors for module `path` out of `tensors` (read from
/// `file`): each must have the shape of the placeholder it replaces, in
/// PEFT's layout.
pub fn read_factors<B: Backend, F: DeltaFactors<B>>(
    entry: &mut DeltaEntry<B, F>,
    path: &str,
    tensors: &mut HashMap<String, HostTensor>,
    file: &Path,
) -> Result<()> {
    for (key, param) in entry.factors.factors_mut() {
        let key = format!("{KEY_PREFIX}{path}.{key}");
        let [cols, rows] = param.shape().dims::<2>();
        let t = take_tensor(tensors, &key, file)?;
        if t.shape != [rows, cols] {
            return Err(PeftError::Shape {
                name: key,
                expected: vec![rows, cols],
                found: t.shape,
            });
        }
        let device = param.device();
        *param = Param::from_tensor(t.transposed().to_tensor([cols, rows], &key, &device)?);
    }
    Ok(())
}
