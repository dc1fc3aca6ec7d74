//! `peft train`'s method: the `--method` value, the method flags, and the
//! config they build over `--config`'s file. Each flag is honoured by the
//! methods it configures and refused, by name, by the others. The slot
//! methods' values and flags come from [`SlotConfig`] (each method says
//! which settings it takes), so a slot method added to
//! [`SlotKinds`](peft_cli::tasks::SlotKinds) appears here by itself.

use std::path::PathBuf;

use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::Args;
use peft_adapter::BnConfig;
use peft_cli::tasks::{Method, SlotConfig};
use peft_core::config::TargetModules;
use peft_core::prompt_learning::{PromptLearningConfig, PromptLearningType, PromptTuningInit};
use peft_core::settings::Setting;
use peft_core::slot_method::AdapterConfig;
use peft_core::PeftError;
use serde_json::Value;

/// A `--method` value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MethodArg {
    /// A slot method, by its name (`lora`, `dora`, `ia3`, `vera`, ...).
    Slot(&'static str),
    /// An AdapterHub bottleneck adapter.
    Adapter,
    /// Prefix tuning.
    Prefix,
    /// Prompt tuning.
    Prompt,
}

impl MethodArg {
    /// Every `--method` value: the slot methods', then the others.
    pub fn names() -> Vec<&'static str> {
        [SlotConfig::cli_names(), vec!["adapter", "prefix", "prompt"]].concat()
    }

    fn from_name(name: String) -> MethodArg {
        match name.as_str() {
            "adapter" => MethodArg::Adapter,
            "prefix" => MethodArg::Prefix,
            "prompt" => MethodArg::Prompt,
            slot => MethodArg::Slot(
                SlotConfig::cli_names()
                    .into_iter()
                    .find(|n| *n == slot)
                    .expect("clap accepts only listed names"),
            ),
        }
    }

    /// clap's parser: one of [`names`](Self::names).
    pub fn parser() -> impl TypedValueParser<Value = MethodArg> {
        PossibleValuesParser::new(Self::names()).map(MethodArg::from_name)
    }

    fn name(self) -> &'static str {
        match self {
            MethodArg::Slot(name) => name,
            MethodArg::Adapter => "adapter",
            MethodArg::Prefix => "prefix",
            MethodArg::Prompt => "prompt",
        }
    }
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
/// others.
#[derive(Args, Default)]
#[command(next_help_heading = "Method flags")]
pub struct MethodFlags {
    /// Rank (LoRA, LoHa, LoKr, VeRA); OFT's and BOFT's number of blocks per layer (its
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
    /// Token ids whose embedding rows train (comma-separated): the
    /// trainable tokens method's `token_indices`, LoRA's
    /// `trainable_token_indices`.
    #[arg(long)]
    pub tokens: Option<String>,
}

impl MethodFlags {
    /// The slot-method flags given, as settings (flag name, JSON value).
    fn slot_settings(&self) -> Vec<Setting<'static>> {
        let targets = |t: &str| serde_json::to_value(names(t)).expect("serialises");
        let mut out = Vec::new();
        if let Some(r) = self.r {
            out.push(("r", Value::from(r)));
        }
        if let Some(a) = self.alpha {
            out.push(("alpha", Value::from(a)));
        }
        if let Some(t) = self.targets.as_deref() {
            out.push(("targets", targets(t)));
        }
        if let Some(d) = self.lora_dropout {
            out.push(("lora-dropout", Value::from(d)));
        }
        if let Some(f) = self.feedforward.as_deref() {
            out.push(("feedforward", targets(f)));
        }
        if let Some(t) = self.tokens.as_deref() {
            out.push(("tokens", token_ids(t)));
        }
        out
    }

    /// Refuses a flag given for a method it does not configure (naming the
    /// flag and what the method takes): a flag is honoured or refused,
    /// never dropped. A slot method's own settings are checked by its
    /// config ([`AdapterConfig::from_cli`]).
    fn check_apply_to(&self, method: MethodArg) -> peft_core::Result<()> {
        if let Some(list) = self.tokens.as_deref() {
            if let Some(bad) = list
                .split(',')
                .map(str::trim)
                .find(|s| s.parse::<u64>().is_err())
            {
                return Err(PeftError::Config(format!(
                    "--tokens: `{bad}` is not a token id (give ids separated by commas)"
                )));
            }
        }
        let slot = self.slot_settings().into_iter().map(|(flag, _)| flag);
        let others = [
            ("adapter-preset", self.adapter_preset.is_some()),
            ("reduction", self.reduction.is_some()),
            ("virtual-tokens", self.virtual_tokens.is_some()),
            ("prompt-init", self.prompt_init.is_some()),
        ]
        .into_iter()
        .filter_map(|(flag, set)| set.then_some(flag));
        let (mut given, takes): (Vec<&str>, &[&str]) = match method {
            MethodArg::Slot(_) => (others.collect(), &[]),
            MethodArg::Adapter => (
                slot.chain(others).collect(),
                &["adapter-preset", "reduction"],
            ),
            MethodArg::Prefix => (slot.chain(others).collect(), &["virtual-tokens"]),
            MethodArg::Prompt => (
                slot.chain(others).collect(),
                &["virtual-tokens", "prompt-init"],
            ),
        };
        given.retain(|flag| !takes.contains(flag));
        match given.first() {
            Some(flag) if takes.is_empty() => Err(PeftError::Config(format!(
                "--{flag} does not apply to --method {}",
                method.name()
            ))),
            Some(flag) => Err(PeftError::Config(format!(
                "--{flag} does not apply to --method {} (it takes --{})",
                method.name(),
                takes.join(", --")
            ))),
            None => Ok(()),
        }
    }
}

/// `--tokens 5,7` as the JSON list `[5, 7]` (its entries checked by
/// `check_apply_to`).
fn token_ids(list: &str) -> Value {
    list.split(',')
        .filter_map(|s| s.trim().parse::<u64>().ok())
        .map(Value::from)
        .collect()
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
        MethodArg::Slot(name) => {
            let settings = flags.slot_settings();
            let config = SlotConfig::from_cli(name, text.as_deref(), &origin, &settings)
                .expect("a listed slot method's name");
            Method::Slot(config?)
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

    /// Every slot method of `SlotKinds` is a `--method` value, its flags
    /// land on its own keys over its defaults or a file, and OFT's and
    /// BOFT's `--r` replaces the block size.
    #[test]
    fn slot_methods_come_from_their_configs() {
        let names = MethodArg::names();
        for want in [
            "lora",
            "dora",
            "pissa",
            "olora",
            "ia3",
            "loha",
            "lokr",
            "oft",
            "boft",
            "vera",
            "ln_tuning",
            "trainable_tokens",
            "adapter",
            "prompt",
        ] {
            assert!(names.contains(&want), "{want} missing from {names:?}");
        }
        let saved = |method: &'static str, flags: MethodFlags, file: Option<&PathBuf>| -> Value {
            let Method::Slot(c) = method_from(MethodArg::Slot(method), file, &flags).unwrap()
            else {
                panic!("{method} is not a slot method")
            };
            serde_json::from_str(&c.saved_json()).unwrap()
        };
        let flags = MethodFlags {
            r: Some(16),
            targets: Some("query,value".into()),
            ..none()
        };
        let vera = saved("vera", flags, None);
        assert_eq!(vera["peft_type"], "VERA");
        assert_eq!(vera["r"], 16);
        assert_eq!(
            vera["target_modules"],
            serde_json::json!(["query", "value"])
        );
        assert_eq!(vera["projection_prng_key"], 0, "PEFT's default");
        let tokens = || MethodFlags {
            tokens: Some("5, 7".into()),
            ..none()
        };
        let trainable = saved("trainable_tokens", tokens(), None);
        assert_eq!(trainable["peft_type"], "TRAINABLE_TOKENS");
        assert_eq!(trainable["token_indices"], serde_json::json!([5, 7]));
        let lora = saved("lora", tokens(), None);
        assert_eq!(lora["trainable_token_indices"], serde_json::json!([5, 7]));
        let bad = MethodFlags {
            tokens: Some("5,x".into()),
            ..none()
        };
        let err = method_from(MethodArg::Slot("lora"), None, &bad).unwrap_err();
        assert!(err.to_string().contains("--tokens: `x`"), "{err}");
        let err = method_from(MethodArg::Slot("ia3"), None, &tokens()).unwrap_err();
        assert!(err.to_string().contains("--tokens"), "{err}");
        let oft = saved(
            "oft",
            MethodFlags {
                r: Some(4),
                ..none()
            },
            None,
        );
        assert_eq!(
            (oft["r"].as_u64(), oft["oft_block_size"].as_u64()),
            (Some(4), Some(0))
        );
        let boft = saved(
            "boft",
            MethodFlags {
                r: Some(4),
                ..none()
            },
            None,
        );
        assert_eq!(
            (
                boft["peft_type"].as_str(),
                boft["boft_block_num"].as_u64(),
                boft["boft_block_size"].as_u64()
            ),
            (Some("BOFT"), Some(4), Some(0))
        );
        let dora = saved(
            "dora",
            MethodFlags {
                alpha: Some(3.0),
                ..none()
            },
            None,
        );
        assert_eq!(
            (dora["use_dora"].as_bool(), dora["lora_alpha"].as_f64()),
            (Some(true), Some(3.0))
        );
        for init in ["pissa", "olora"] {
            let split = saved(init, none(), None);
            assert_eq!(
                (
                    split["peft_type"].as_str(),
                    split["init_lora_weights"].as_str()
                ),
                (Some("LORA"), Some(init))
            );
        }
        // A file's values stand where no flag overrides them.
        let ia3 = fixture("ia3");
        let flags = MethodFlags {
            feedforward: Some("mlp.c_proj".into()),
            ..none()
        };
        let got = saved("ia3", flags, Some(&ia3));
        let file: Value = serde_json::from_str(&std::fs::read_to_string(&ia3).unwrap()).unwrap();
        assert_eq!(got["target_modules"], file["target_modules"]);
        assert_eq!(
            got["feedforward_modules"],
            serde_json::json!(["mlp.c_proj"])
        );
    }

    #[test]
    fn flags_that_do_not_apply_are_refused_by_name() {
        let cases: [(MethodArg, MethodFlags, &str); 4] = [
            (
                MethodArg::Slot("ia3"),
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
                MethodArg::Slot("lora"),
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
