//! A PiSSA / OLoRA adapter as a plain LoRA of the original weights: PEFT's
//! `save_pretrained(dir, path_initial_model_for_weight_conversion=…)`.
//!
//! A base-splitting init trains `W_res + s·B·A` where `W = W_res + s·B₀·A₀`,
//! so the update to the original weight is `s·(B·A − B₀·A₀) = s·[B, −B₀]·[A;
//! A₀]`: a LoRA of rank `2r` with the same scaling (alpha doubled, or
//! multiplied by √2 with rsLoRA), which loads on the untouched base like any
//! other adapter. As PEFT's `subtract_mutated_init`; where PEFT keeps only
//! `lora_A` / `lora_B`, the adapter's `modules_to_save` copies (a trained
//! classifier) are kept too, since the converted adapter is useless without
//! them. DoRA is refused: its magnitude belongs to `W_res + s·B·A`, and a
//! rescaled update has no rank-`2r` LoRA form.

use std::collections::HashMap;
use std::path::Path;

use burn::tensor::backend::Backend;
use peft_core::config::InitLoraWeights;
use peft_core::io::{read_safetensors, write_adapter_files, HostTensor, KEY_PREFIX, WEIGHTS_FILE};
use peft_core::slot_method::{AdapterConfig, OneOf};
use peft_core::{LoraConfig, LoraEntry, PeftError, PeftModel, Result, SlotMethod, SlotModel};

/// Where the factors `A₀`, `B₀` the init started from come from.
#[derive(Debug, Clone, Copy)]
pub enum InitialFactors<'a> {
    /// The entries' own record of their init (kept in memory since the
    /// adapter was created or loaded).
    Recorded,
    /// An adapter folder saved right after the init (PEFT's
    /// `path_initial_model_for_weight_conversion`).
    Folder(&'a Path),
}

/// Converting a base-splitting adapter into a plain LoRA.
pub trait ConvertToLora {
    /// The config and tensors of adapter `name` as a plain LoRA of the
    /// original weights (PEFT's keys and layouts).
    fn as_plain_lora(
        &self,
        name: &str,
        initial: InitialFactors<'_>,
    ) -> Result<(LoraConfig, Vec<(String, HostTensor)>)>;

    /// Writes [`as_plain_lora`](Self::as_plain_lora) into `dir` as PEFT's
    /// two files (atomically, weights first).
    fn save_as_lora(&self, name: &str, dir: &Path, initial: InitialFactors<'_>) -> Result<()> {
        let (config, tensors) = self.as_plain_lora(name, initial)?;
        write_adapter_files(dir, &tensors, &config.saved_json())
    }
}

/// A slot method's config seen as LoRA's, where it is one: what lets a
/// model mixing LoRA with other slot methods convert its LoRA adapters.
pub trait AsLoraConfig {
    /// The config, if it is a LoRA one.
    fn as_lora(&self) -> Option<&LoraConfig>;

    /// Whether the config is LoRA's with an init that splits the base
    /// weights (PiSSA, OLoRA): loading it rewrites the base.
    fn splits_base(&self) -> bool {
        self.as_lora()
            .is_some_and(|c| matches!(c.base_splitting_init(), Ok(Some(_))))
    }
}

/// Why adapter `name` (config `config`) has no plain-LoRA form, if it has
/// none: DoRA, or rsLoRA with rank / alpha patterns (as PEFT refuses).
fn no_plain_form(config: &LoraConfig, name: &str) -> Result<()> {
    if config.use_dora {
        return Err(PeftError::Config(format!(
            "adapter `{name}` is DoRA: its magnitude rescales W_res + s·B·A, which no plain LoRA of the original weight expresses"
        )));
    }
    if config.use_rslora && !(config.rank_pattern.is_empty() && config.alpha_pattern.is_empty()) {
        return Err(PeftError::Config(format!(
            "adapter `{name}`: converting to a plain LoRA is not supported with use_rslora together with rank_pattern / alpha_pattern (as in PEFT)"
        )));
    }
    Ok(())
}

impl AsLoraConfig for LoraConfig {
    fn as_lora(&self) -> Option<&LoraConfig> {
        Some(self)
    }
}

impl<C> AsLoraConfig for OneOf<LoraConfig, C> {
    fn as_lora(&self) -> Option<&LoraConfig> {
        match self {
            OneOf::First(c) => Some(c),
            OneOf::Second(_) => None,
        }
    }
}

/// Whether adapter `name` of `model` started from a base-splitting init
/// (PiSSA, OLoRA) and has a plain-LoRA form: the adapters [`ConvertToLora`]
/// converts (not DoRA, not rsLoRA with rank or alpha patterns).
pub fn converts_to_lora<B, M, K>(model: &SlotModel<B, M, K>, name: &str) -> bool
where
    B: Backend,
    M: PeftModel<B>,
    K: SlotMethod,
    K::Config: AsLoraConfig,
{
    model.config(name).ok().is_some_and(|c| {
        c.splits_base() && c.as_lora().is_some_and(|l| no_plain_form(l, name).is_ok())
    })
}

impl<B, M, K> ConvertToLora for SlotModel<B, M, K>
where
    B: Backend,
    M: PeftModel<B>,
    K: SlotMethod,
    K::Config: AsLoraConfig,
{
    fn as_plain_lora(
        &self,
        name: &str,
        initial: InitialFactors<'_>,
    ) -> Result<(LoraConfig, Vec<(String, HostTensor)>)> {
        let config = self
            .config(name)?
            .as_lora()
            .ok_or_else(|| {
                PeftError::Config(format!(
                    "adapter `{name}` is not a LoRA adapter: only LoRA converts to a plain LoRA"
                ))
            })?
            .clone();
        no_plain_form(&config, name)?;
        let mut initial = match initial {
            InitialFactors::Folder(dir) => read_safetensors(&dir.join(WEIGHTS_FILE))?,
            InitialFactors::Recorded => recorded(self, name)?,
        };
        let mut tensors = self.adapter_tensors(name)?;
        for (key, t) in tensors.iter_mut() {
            let (rows_side, sign) = if key.ends_with(".lora_A.weight") {
                (true, 1.0)
            } else if key.ends_with(".lora_B.weight") {
                (false, -1.0)
            } else {
                continue;
            };
            let t0 = initial
                .remove(key.as_str())
                .ok_or_else(|| PeftError::Config(format!("the initial adapter has no `{key}`")))?;
            *t = if rows_side {
                concat_rows(key, t, &t0)?
            } else {
                concat_columns(key, t, &t0, sign)?
            };
        }
        let mut converted = config;
        converted.init_lora_weights = InitLoraWeights::Bool(true);
        converted.r *= 2;
        converted.lora_alpha *= if converted.use_rslora {
            std::f64::consts::SQRT_2
        } else {
            2.0
        };
        for r in converted.rank_pattern.values_mut() {
            *r *= 2;
        }
        for a in converted.alpha_pattern.values_mut() {
            *a *= 2.0;
        }
        Ok((converted, tensors))
    }
}

/// The factors each entry of adapter `name` recorded at its base-splitting
/// init, under PEFT's keys and layouts (`[r, in]`, `[out, r]`).
fn recorded<B, M, K>(model: &SlotModel<B, M, K>, name: &str) -> Result<HashMap<String, HostTensor>>
where
    B: Backend,
    M: PeftModel<B>,
    K: SlotMethod,
{
    let mut out = HashMap::new();
    let mut missing = Vec::new();
    model.model.visit_linears(&mut |path, slot| {
        let Some(entry) = slot.entry::<LoraEntry<B>>(name) else {
            return;
        };
        let Some(split) = &entry.meta.base_split else {
            missing.push(path.to_string());
            return;
        };
        let r = entry.meta.rank;
        let (d_in, d_out) = (slot.d_input(), slot.d_output());
        let key = format!("{KEY_PREFIX}{path}");
        let a0 = HostTensor {
            shape: vec![d_in, r],
            data: split.a0.clone(),
        };
        let b0 = HostTensor {
            shape: vec![r, d_out],
            data: split.b0.clone(),
        };
        out.insert(format!("{key}.lora_A.weight"), a0.transposed());
        out.insert(format!("{key}.lora_B.weight"), b0.transposed());
    });
    if !missing.is_empty() {
        return Err(PeftError::Config(format!(
            "adapter `{name}` did not start from a PiSSA / OLoRA split at {} (init_lora_weights is not a base-splitting one there): nothing to convert against",
            missing.join(", ")
        )));
    }
    Ok(out)
}

fn shape_error(key: &str, expected: Vec<usize>, found: &[usize]) -> PeftError {
    PeftError::Shape {
        name: format!("initial {key}"),
        expected,
        found: found.to_vec(),
    }
}

/// `[a; a0]`: `a` `[r, in]` over `a0` `[r0, in]`.
fn concat_rows(key: &str, a: &HostTensor, a0: &HostTensor) -> Result<HostTensor> {
    if a0.shape.len() != 2 || a0.shape[1] != a.shape[1] {
        return Err(shape_error(key, vec![a.shape[0], a.shape[1]], &a0.shape));
    }
    let mut data = a.data.clone();
    data.extend_from_slice(&a0.data);
    Ok(HostTensor {
        shape: vec![a.shape[0] + a0.shape[0], a.shape[1]],
        data,
    })
}

/// `[b, sign·b0]`: `b` `[out, r]` beside `b0` `[out, r0]`.
fn concat_columns(key: &str, b: &HostTensor, b0: &HostTensor, sign: f32) -> Result<HostTensor> {
    if b0.shape.len() != 2 || b0.shape[0] != b.shape[0] {
        return Err(shape_error(key, vec![b.shape[0], b.shape[1]], &b0.shape));
    }
    let (out, r, r0) = (b.shape[0], b.shape[1], b0.shape[1]);
    let mut data = Vec::with_capacity(out * (r + r0));
    for i in 0..out {
        data.extend_from_slice(&b.data[i * r..(i + 1) * r]);
        data.extend(b0.data[i * r0..(i + 1) * r0].iter().map(|v| sign * v));
    }
    Ok(HostTensor {
        shape: vec![out, r + r0],
        data,
    })
}
