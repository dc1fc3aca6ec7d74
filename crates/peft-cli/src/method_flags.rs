//! `peft train`'s method: the `--method` value, the method flags, and the
//! config they build over `--config`'s file. Each flag is honoured by the
//! methods it configures and refused, by name, by the others.

use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};
use peft_adapter::BnConfig;
use peft_cli::tasks::Method;
use peft_core::config::TargetModules;
use peft_core::prompt_learning::{PromptLearningConfig, PromptLearningType, PromptTuningInit};
use peft_core::{Ia3Config, LoraConfig, PeftError};
use peft_lycoris::{LohaConfig, LokrConfig, MethodConfig};
use peft_oft::OftConfig;

#[derive(Clone, Copy, ValueEnum)]
pub enum MethodArg {
    Lora,
    Dora,
    Ia3,
    Loha,
    Lokr,
    Oft,
    Adapter,
    Prefix,
    Prompt,
}

pub fn names(list: &str) -> TargetModules {
    if list.contains(['*', '(', '|', '\\', '$', '^']) {
        TargetModules::Pattern(list.to_string())
    } else {
        TargetModules::List(list.split(',').map(|s| s.trim().to_string()).collect())
    }
}

/// The method flags of `peft train`, as given (`None`: not on the command
/// line): each is honoured by the methods it configures and refused by the
/// others ([`MethodFlags::check_apply_to`]).
#[derive(Args, Default)]
#[command(next_help_heading = "Method flags")]
pub struct MethodFlags {
    /// LoRA / LoHa / LoKr rank; OFT's number of blocks per layer (its
    /// block size then follows from each layer's inputs).
    #[arg(long)]
    pub r: Option<usize>,
    /// LoRA / LoHa / LoKr alpha.
    #[arg(long)]
    pub alpha: Option<f64>,
    /// Target modules (comma-separated names, or one regex).
    #[arg(long)]
    pub targets: Option<String>,
    /// (IA)³ feed-forward modules (comma-separated).
    #[arg(long)]
    pub feedforward: Option<String>,
    /// LoRA dropout.
    #[arg(long)]
    pub lora_dropout: Option<f64>,
    /// Bottleneck preset: seq_bn (default), double_seq_bn, par_bn.
    #[arg(long)]
    pub adapter_preset: Option<String>,
    /// Bottleneck reduction factor.
    #[arg(long)]
    pub reduction: Option<f64>,
    /// Virtual tokens of a prefix or soft prompt (default 20).
    #[arg(long)]
    pub virtual_tokens: Option<usize>,
    /// Soft-prompt initialisation: random (PEFT's default) or sample-vocab.
    #[arg(long)]
    pub prompt_init: Option<String>,
}

impl MethodFlags {
    /// Refuses a flag given for a method it does not configure (naming the
    /// flag and what the method takes): a flag is honoured or refused,
    /// never dropped.
    fn check_apply_to(&self, method: MethodArg) -> peft_core::Result<()> {
        let given = [
            ("r", self.r.is_some()),
            ("alpha", self.alpha.is_some()),
            ("targets", self.targets.is_some()),
            ("feedforward", self.feedforward.is_some()),
            ("lora-dropout", self.lora_dropout.is_some()),
            ("adapter-preset", self.adapter_preset.is_some()),
            ("reduction", self.reduction.is_some()),
            ("virtual-tokens", self.virtual_tokens.is_some()),
            ("prompt-init", self.prompt_init.is_some()),
        ];
        let (name, takes): (&str, &[&str]) = match method {
            MethodArg::Lora => ("lora", &["r", "alpha", "targets", "lora-dropout"]),
            MethodArg::Dora => ("dora", &["r", "alpha", "targets", "lora-dropout"]),
            MethodArg::Ia3 => ("ia3", &["targets", "feedforward"]),
            MethodArg::Loha => ("loha", &["r", "alpha", "targets"]),
            MethodArg::Lokr => ("lokr", &["r", "alpha", "targets"]),
            MethodArg::Oft => ("oft", &["r", "targets"]),
            MethodArg::Adapter => ("adapter", &["adapter-preset", "reduction"]),
            MethodArg::Prefix => ("prefix", &["virtual-tokens"]),
            MethodArg::Prompt => ("prompt", &["virtual-tokens", "prompt-init"]),
        };
        match given.iter().find(|(f, set)| *set && !takes.contains(f)) {
            Some((flag, _)) => Err(PeftError::Config(format!(
                "--{flag} does not apply to --method {name} (it takes --{})",
                takes.join(", --")
            ))),
            None => Ok(()),
        }
    }
}

fn prompt_init_of(name: &str) -> peft_core::Result<PromptTuningInit> {
    match name {
        "random" => Ok(PromptTuningInit::Random),
        "sample-vocab" => Ok(PromptTuningInit::SampleVocab),
        other => Err(PeftError::Config(format!(
            "--prompt-init `{other}` is not one of random, sample-vocab"
        ))),
    }
}

/// A LyCORIS config from `--config`'s text (or the defaults) with `--r`,
/// `--alpha` and `--targets` over it; `fields` points at those three.
fn lycoris_from<C: MethodConfig + Default>(
    text: &Option<String>,
    origin: &Path,
    flags: &MethodFlags,
    fields: impl FnOnce(&mut C) -> (&mut usize, &mut f64, &mut Option<TargetModules>),
) -> peft_core::Result<C> {
    let mut c = match text {
        Some(t) => C::from_json_str(t, origin)?,
        None => C::default(),
    };
    let (r, alpha, targets) = fields(&mut c);
    if let Some(v) = flags.r {
        *r = v;
    }
    if let Some(v) = flags.alpha {
        *alpha = v;
    }
    if let Some(t) = flags.targets.as_deref() {
        *targets = Some(names(t));
    }
    c.validate()?;
    Ok(c)
}

/// The method of `peft train`: `--config`'s file (if any), then the flags
/// over it.
pub fn method_from(
    method: MethodArg,
    config: Option<&PathBuf>,
    flags: &MethodFlags,
) -> peft_core::Result<Method> {
    flags.check_apply_to(method)?;
    let text = config
        .map(|p| {
            std::fs::read_to_string(p).map_err(|source| PeftError::Io {
                path: p.clone(),
                source,
            })
        })
        .transpose()?;
    let origin = config.cloned().unwrap_or_default();
    Ok(match method {
        MethodArg::Lora | MethodArg::Dora => {
            let mut c = match &text {
                Some(t) => LoraConfig::from_json_str(t, &origin)?,
                None => LoraConfig::new(8, 16.0, &["query", "value", "q_proj", "v_proj", "c_attn"]),
            };
            if let Some(r) = flags.r {
                c.r = r;
            }
            if let Some(a) = flags.alpha {
                c.lora_alpha = a;
            }
            if let Some(t) = flags.targets.as_deref() {
                c.target_modules = Some(names(t));
            }
            if let Some(d) = flags.lora_dropout {
                c.lora_dropout = d;
            }
            c.use_dora |= matches!(method, MethodArg::Dora);
            c.validate()?;
            Method::slot(c)
        }
        MethodArg::Ia3 => {
            let mut c = match &text {
                Some(t) => Ia3Config::from_json_str(t, &origin)?,
                None => Ia3Config::default(),
            };
            if let Some(t) = flags.targets.as_deref() {
                c.target_modules = Some(names(t));
            }
            if let Some(f) = flags.feedforward.as_deref() {
                c.feedforward_modules = Some(names(f));
            }
            Method::slot(c)
        }
        MethodArg::Loha => Method::slot(lycoris_from(
            &text,
            &origin,
            flags,
            |c: &mut LohaConfig| (&mut c.r, &mut c.alpha, &mut c.target_modules),
        )?),
        MethodArg::Lokr => Method::slot(lycoris_from(
            &text,
            &origin,
            flags,
            |c: &mut LokrConfig| (&mut c.r, &mut c.alpha, &mut c.target_modules),
        )?),
        MethodArg::Oft => {
            let mut c = match &text {
                Some(t) => OftConfig::from_json_str(t, &origin)?,
                None => OftConfig::default(),
            };
            if let Some(r) = flags.r {
                (c.r, c.oft_block_size) = (r, 0);
            }
            if let Some(t) = flags.targets.as_deref() {
                c.target_modules = Some(names(t));
            }
            c.validate()?;
            Method::slot(c)
        }
        MethodArg::Prefix | MethodArg::Prompt => {
            let mut c = match (config, method) {
                (Some(p), MethodArg::Prefix) => {
                    PromptLearningConfig::from_file(p, &[PromptLearningType::PrefixTuning])?
                }
                (Some(p), _) => PromptLearningConfig::from_file(
                    p,
                    &[
                        PromptLearningType::PromptTuning,
                        PromptLearningType::PTuning,
                    ],
                )?,
                (None, MethodArg::Prefix) => PromptLearningConfig::prefix_tuning(20),
                (None, _) => PromptLearningConfig::prompt_tuning(20, PromptTuningInit::Random),
            };
            if let Some(n) = flags.virtual_tokens {
                c.num_virtual_tokens = n;
            }
            if let Some(init) = flags.prompt_init.as_deref() {
                if c.peft_type != PromptLearningType::PromptTuning {
                    return Err(PeftError::Config(format!(
                        "--prompt-init applies to prompt tuning; {} is {:?}",
                        origin.display(),
                        c.peft_type
                    )));
                }
                c.prompt_tuning_init = Some(prompt_init_of(init)?);
            }
            c.validate()?;
            match method {
                MethodArg::Prefix => Method::Prefix(c),
                _ => Method::Prompt(c),
            }
        }
        MethodArg::Adapter => {
            let mut c =
                match (&text, flags.adapter_preset.as_deref()) {
                    (Some(_), Some(_)) => return Err(PeftError::Config(
                        "--adapter-preset and --config both give the adapter's config: pass one"
                            .into(),
                    )),
                    (Some(t), None) => {
                        let v: serde_json::Value =
                            serde_json::from_str(t).map_err(|source| PeftError::Json {
                                path: origin.clone(),
                                source,
                            })?;
                        let inner = v.get("config").cloned().unwrap_or(v);
                        serde_json::from_value(inner).map_err(|source| PeftError::Json {
                            path: origin.clone(),
                            source,
                        })?
                    }
                    (None, preset) => BnConfig::by_name(preset.unwrap_or("seq_bn"))?,
                };
            if let Some(f) = flags.reduction {
                c = c.with_reduction_factor(f);
            }
            c.validate()?;
            Method::Adapter(c)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(case: &str) -> PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures/gpt2")
            .join(case)
            .join("adapter_config.json")
    }

    fn none() -> MethodFlags {
        MethodFlags::default()
    }

    #[test]
    fn flags_override_a_prompt_learning_config() {
        let flags = MethodFlags {
            virtual_tokens: Some(7),
            ..none()
        };
        let Method::Prefix(c) =
            method_from(MethodArg::Prefix, Some(&fixture("prefix")), &flags).unwrap()
        else {
            panic!("not a prefix")
        };
        assert_eq!(c.num_virtual_tokens, 7, "the file says 3");
        let flags = MethodFlags {
            virtual_tokens: Some(5),
            prompt_init: Some("sample-vocab".into()),
            ..none()
        };
        let Method::Prompt(c) =
            method_from(MethodArg::Prompt, Some(&fixture("prompt_random")), &flags).unwrap()
        else {
            panic!("not a prompt")
        };
        assert_eq!(c.num_virtual_tokens, 5, "the file says 4");
        assert_eq!(c.prompt_tuning_init, Some(PromptTuningInit::SampleVocab));
        // Without flags the file's values stand.
        let Method::Prefix(c) =
            method_from(MethodArg::Prefix, Some(&fixture("prefix")), &none()).unwrap()
        else {
            panic!("not a prefix")
        };
        assert_eq!(c.num_virtual_tokens, 3);
    }

    #[test]
    fn flags_that_do_not_apply_are_refused_by_name() {
        let cases: [(MethodArg, MethodFlags, &str); 4] = [
            (
                MethodArg::Ia3,
                MethodFlags {
                    r: Some(4),
                    ..none()
                },
                "--r does not apply",
            ),
            (
                MethodArg::Prefix,
                MethodFlags {
                    prompt_init: Some("random".into()),
                    ..none()
                },
                "--prompt-init does not apply",
            ),
            (
                MethodArg::Lora,
                MethodFlags {
                    virtual_tokens: Some(3),
                    ..none()
                },
                "--virtual-tokens does not apply",
            ),
            (
                MethodArg::Adapter,
                MethodFlags {
                    targets: Some("query".into()),
                    ..none()
                },
                "--targets does not apply",
            ),
        ];
        for (method, flags, needle) in cases {
            let err = method_from(method, None, &flags).unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        }
        let flags = MethodFlags {
            prompt_init: Some("random".into()),
            ..none()
        };
        let err = method_from(MethodArg::Prompt, Some(&fixture("ptuning_lstm")), &flags)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--prompt-init applies to prompt tuning"),
            "{err}"
        );
    }
}
