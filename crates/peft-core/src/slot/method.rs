//! [`SlotMethod`]: what a method whose adapters live in the model's
//! [`LinearSlot`]s defines for itself (its config, how an entry starts, how
//! its tensors are named in PEFT's file; which layers a config targets is
//! the config's own [`AdapterConfig`], provided by [`MethodConfig`]);
//! [`SlotModel`](crate::SlotModel) does everything else, the same way for
//! every method. A pair of methods is a method too, whose configs are
//! [`OneOf`] the two: that is how one model holds LoRA and (IA)³ adapters.

use std::any::Any;
use std::collections::HashMap;
use std::fmt::Debug;
use std::marker::PhantomData;
use std::path::Path;

use burn::tensor::backend::Backend;

use super::LinearSlot;
use crate::config::{read_text, Ia3Config, LoraConfig, TokenIndices};
use crate::error::{PeftError, Result};
use crate::io::HostTensor;
pub use crate::method_config::TokenRows;
use crate::method_config::{MethodConfig, TaskFields};
use crate::settings::{self, Setting};
use crate::target::{is_target, targets_match};

/// How a new entry's parameters start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Init {
    /// As the config says (PEFT's initialisation for a new adapter).
    Fresh,
    /// Placeholder values (no random draw), to be overwritten from a file
    /// or by arithmetic on other adapters.
    Placeholder,
}

/// An `adapter_config.json` as a method reads and writes it.
pub trait AdapterConfig: Clone + Debug + Send + Sync + Sized + 'static {
    /// Whether a file whose `peft_type` is `peft_type` (`None`: the field is
    /// absent) holds this config.
    fn reads(peft_type: Option<&str>) -> bool;

    /// Reads and checks the file at `path`.
    fn read(path: &Path) -> Result<Self>;

    /// The JSON PEFT writes into a saved adapter folder.
    fn saved_json(&self) -> String;

    /// Checks the config and fills what PEFT fills for a model of type
    /// `model_type` before injecting (default targets).
    fn prepare(&mut self, model_type: Option<&str>) -> Result<()>;

    /// Whether the config adapts the linear layer at `path` (`output_layers`:
    /// the model's heads, which `all-linear` leaves out).
    fn targets(&self, path: &str, output_layers: &[String]) -> Result<bool>;

    /// The config's target rule, to name in an error when nothing matched.
    fn target_rule(&self) -> String;

    /// PEFT's `modules_to_save`: suffixes of the layers each adapter keeps
    /// a trainable full copy of (a classifier head), saved beside its
    /// tensors.
    fn modules_to_save(&self) -> &[String];

    /// Refuses this config beside `existing`, the config of an adapter
    /// already in the model, where PEFT refuses the pair (VeRA: different
    /// projection keys). Configs of different methods never conflict.
    fn check_beside(&self, _existing: &Self) -> Result<()> {
        Ok(())
    }

    /// `Some(key)` for a method that adapts norm layers instead of linear
    /// ones (LN tuning): its targets are the model's norm paths, each
    /// adapter keeps a trainable copy of each targeted norm
    /// ([`NormSlot`](super::NormSlot)), saved under `<path>.<key>.weight`.
    fn norm_copy_key(&self) -> Option<&'static str> {
        None
    }

    /// Rows of embedding tables this adapter retrains (trainable tokens:
    /// LoRA's `trainable_token_indices`), kept in the model's
    /// [`EmbeddingSlot`](super::EmbeddingSlot)s.
    fn trainable_tokens(&self) -> Option<&TokenIndices> {
        None
    }

    /// `Some` for a method that retrains rows of embedding tables instead
    /// of adapting linear layers (trainable tokens): its targets are the
    /// model's embedding paths, each targeted table gets these rows.
    fn token_rows(&self) -> Option<TokenRows<'_>> {
        None
    }

    /// Whether a copy of a tied input embedding (`modules_to_save`) is the
    /// output head's too (PEFT's `ensure_weight_tying`).
    fn ensure_weight_tying(&self) -> bool {
        false
    }

    /// The method's name as `peft train --method` and messages give it
    /// (`lora`, `dora`, `ia3`, `loha`, `lokr`, `oft`).
    fn method_name(&self) -> &'static str;

    /// The `peft_type`s this config reads, for messages.
    fn peft_types() -> Vec<&'static str>;

    /// The config itself (a pair's: the one it holds), for code that treats
    /// one method's configs apart (AdaLoRA's rank allocator records its
    /// rank pattern).
    fn inner(&self) -> &dyn Any;

    /// [`inner`](Self::inner), mutably.
    fn inner_mut(&mut self) -> &mut dyn Any;

    /// The fields that say which task the adapter is for and on which base.
    fn task_fields(&mut self) -> TaskFields<'_>;

    /// The `--method` values that make this config on the command line
    /// (LoRA: `lora`, `dora`).
    fn cli_names() -> Vec<&'static str>;

    /// `peft train --method name`'s config, or `None` when `name` is not one
    /// of [`cli_names`](Self::cli_names): `text` (a `--config` file read from
    /// `origin`) or the method's defaults, with `settings` over it, checked.
    /// A setting the method does not take is refused by name.
    fn from_cli(
        name: &str,
        text: Option<&str>,
        origin: &Path,
        settings: &[Setting<'_>],
    ) -> Option<Result<Self>>;

    /// Sets the config up as PEFT's `get_peft_model` does for sequence
    /// classification: `task_type: SEQ_CLS`, the model's `heads` added to
    /// `modules_to_save` (so the adapter trains and saves its own copy of
    /// the head), and the base model's name.
    fn for_seq_cls(&mut self, base: &str, heads: &[&str]) {
        let fields = self.task_fields();
        *fields.task_type = Some("SEQ_CLS".into());
        let keep = fields.modules_to_save.get_or_insert_with(Vec::new);
        for head in heads {
            if !keep.iter().any(|m| m == head) {
                keep.push(head.to_string());
            }
        }
        *fields.base_model_name_or_path = Some(base.to_string());
    }
}

impl AdapterConfig for LoraConfig {
    /// PEFT's LoRA files name their type; ours did not always, and LoRA is
    /// what a config without one means.
    fn reads(peft_type: Option<&str>) -> bool {
        matches!(peft_type, None | Some("LORA"))
    }

    fn read(path: &Path) -> Result<Self> {
        LoraConfig::from_file(path)
    }

    fn saved_json(&self) -> String {
        LoraConfig {
            inference_mode: true,
            ..self.clone()
        }
        .to_json_string()
    }

    fn prepare(&mut self, _model_type: Option<&str>) -> Result<()> {
        self.validate()
    }

    fn targets(&self, path: &str, output_layers: &[String]) -> Result<bool> {
        is_target(self, path, output_layers)
    }

    fn target_rule(&self) -> String {
        serde_json::to_string(&self.target_modules).unwrap_or_else(|_| "?".into())
    }

    fn modules_to_save(&self) -> &[String] {
        self.modules_to_save.as_deref().unwrap_or_default()
    }

    fn trainable_tokens(&self) -> Option<&TokenIndices> {
        self.trainable_token_indices.as_ref()
    }

    fn ensure_weight_tying(&self) -> bool {
        self.ensure_weight_tying
    }

    fn method_name(&self) -> &'static str {
        match (self.use_dora, self.base_splitting_init()) {
            (true, _) => "dora",
            (false, Ok(Some(crate::config::BaseSplittingInit::Pissa { .. }))) => "pissa",
            (false, Ok(Some(crate::config::BaseSplittingInit::Olora))) => "olora",
            (false, _) => "lora",
        }
    }

    fn peft_types() -> Vec<&'static str> {
        vec!["LORA"]
    }

    fn inner(&self) -> &dyn Any {
        self
    }

    fn inner_mut(&mut self) -> &mut dyn Any {
        self
    }

    fn cli_names() -> Vec<&'static str> {
        vec!["lora", "dora", "pissa", "olora"]
    }

    /// Without a file: rank 8, alpha 16 on the attention projections of
    /// every model here. `dora` sets `use_dora`; `pissa` and `olora` set
    /// `init_lora_weights` (a file's `"pissa_niter_<n>"` stays as it is).
    fn from_cli(
        name: &str,
        text: Option<&str>,
        origin: &Path,
        settings: &[Setting<'_>],
    ) -> Option<Result<Self>> {
        if !Self::cli_names().contains(&name) {
            return None;
        }
        let defaults = LoraConfig::new(8, 16.0, &["query", "value", "q_proj", "v_proj", "c_attn"]);
        let table = [
            ("r", "r"),
            ("alpha", "lora_alpha"),
            ("targets", "target_modules"),
            ("lora-dropout", "lora_dropout"),
            ("tokens", "trainable_token_indices"),
        ];
        let defaults = serde_json::to_value(defaults).expect("serialises");
        Some((|| {
            let mut value = settings::config_json(name, text, origin, defaults, &table, settings)?;
            match name {
                "dora" => value["use_dora"] = true.into(),
                "pissa" | "olora" => {
                    let given = value["init_lora_weights"].as_str().unwrap_or_default();
                    if !given.starts_with(name) {
                        value["init_lora_weights"] = name.into();
                    }
                }
                _ => {}
            }
            LoraConfig::from_json_str(&value.to_string(), origin)
        })())
    }

    fn task_fields(&mut self) -> TaskFields<'_> {
        TaskFields {
            task_type: &mut self.task_type,
            modules_to_save: &mut self.modules_to_save,
            base_model_name_or_path: &mut self.base_model_name_or_path,
        }
    }
}

impl AdapterConfig for Ia3Config {
    fn reads(peft_type: Option<&str>) -> bool {
        peft_type == Some("IA3")
    }

    fn read(path: &Path) -> Result<Self> {
        Ia3Config::from_file(path)
    }

    fn saved_json(&self) -> String {
        Ia3Config {
            inference_mode: true,
            ..self.clone()
        }
        .to_json_string()
    }

    /// Unset targets take PEFT's defaults for the model's type.
    fn prepare(&mut self, model_type: Option<&str>) -> Result<()> {
        self.fill_defaults(model_type)
    }

    fn targets(&self, path: &str, output_layers: &[String]) -> Result<bool> {
        targets_match(
            self.target_modules.as_ref(),
            self.exclude_modules.as_ref(),
            None,
            None,
            path,
            output_layers,
        )
    }

    fn target_rule(&self) -> String {
        serde_json::to_string(&self.target_modules).unwrap_or_else(|_| "?".into())
    }

    fn modules_to_save(&self) -> &[String] {
        self.modules_to_save.as_deref().unwrap_or_default()
    }

    fn method_name(&self) -> &'static str {
        "ia3"
    }

    fn peft_types() -> Vec<&'static str> {
        vec!["IA3"]
    }

    fn inner(&self) -> &dyn Any {
        self
    }

    fn inner_mut(&mut self) -> &mut dyn Any {
        self
    }

    fn cli_names() -> Vec<&'static str> {
        vec!["ia3"]
    }

    fn from_cli(
        name: &str,
        text: Option<&str>,
        origin: &Path,
        settings: &[Setting<'_>],
    ) -> Option<Result<Self>> {
        if name != "ia3" {
            return None;
        }
        let table = [
            ("targets", "target_modules"),
            ("feedforward", "feedforward_modules"),
        ];
        let defaults = serde_json::to_value(Ia3Config::default()).expect("serialises");
        Some((|| {
            let value = settings::config_json(name, text, origin, defaults, &table, settings)?;
            Ia3Config::from_json_str(&value.to_string(), origin)
        })())
    }

    fn task_fields(&mut self) -> TaskFields<'_> {
        TaskFields {
            task_type: &mut self.task_type,
            modules_to_save: &mut self.modules_to_save,
            base_model_name_or_path: &mut self.base_model_name_or_path,
        }
    }
}

/// Every [`MethodConfig`] is an `adapter_config.json` a method reads and
/// writes as PEFT does.
impl<C: MethodConfig + Debug + Send + Sync + 'static> AdapterConfig for C {
    fn reads(peft_type: Option<&str>) -> bool {
        peft_type == Some(C::PEFT_TYPE)
    }

    fn read(path: &Path) -> Result<Self> {
        C::from_file(path)
    }

    fn saved_json(&self) -> String {
        MethodConfig::saved_json(self)
    }

    fn prepare(&mut self, model_type: Option<&str>) -> Result<()> {
        MethodConfig::prepare(self, model_type)
    }

    fn check_beside(&self, existing: &Self) -> Result<()> {
        MethodConfig::check_beside(self, existing)
    }

    fn norm_copy_key(&self) -> Option<&'static str> {
        C::NORM_COPY_KEY
    }

    fn token_rows(&self) -> Option<TokenRows<'_>> {
        MethodConfig::token_rows(self)
    }

    fn targets(&self, path: &str, output_layers: &[String]) -> Result<bool> {
        MethodConfig::targets(self, path, output_layers)
    }

    fn target_rule(&self) -> String {
        MethodConfig::target_rule(self)
    }

    fn modules_to_save(&self) -> &[String] {
        MethodConfig::modules_to_save(self)
    }

    fn method_name(&self) -> &'static str {
        C::NAME
    }

    fn peft_types() -> Vec<&'static str> {
        vec![C::PEFT_TYPE]
    }

    fn inner(&self) -> &dyn Any {
        self
    }

    fn inner_mut(&mut self) -> &mut dyn Any {
        self
    }

    fn cli_names() -> Vec<&'static str> {
        vec![C::NAME]
    }

    /// Without a file: the method's defaults (`{"peft_type": ...}`), with
    /// the settings of [`MethodConfig::CLI_SETTINGS`].
    fn from_cli(
        name: &str,
        text: Option<&str>,
        origin: &Path,
        settings: &[Setting<'_>],
    ) -> Option<Result<Self>> {
        if name != C::NAME {
            return None;
        }
        Some((|| {
            let defaults = serde_json::json!({ "peft_type": C::PEFT_TYPE });
            let table = C::CLI_SETTINGS;
            let mut value = settings::config_json(name, text, origin, defaults, table, settings)?;
            let given: Vec<&str> = settings.iter().map(|s| s.0).collect();
            C::adjust_cli(&given, &mut value);
            C::from_json_str(&value.to_string(), origin)
        })())
    }

    fn task_fields(&mut self) -> TaskFields<'_> {
        MethodConfig::task_fields(self)
    }
}

/// What a method whose adapters live in [`LinearSlot`]s defines; everything
/// else is [`SlotModel`](crate::SlotModel)'s. Implemented by a marker type
/// (`peft_lora::Lora`, `peft_adapter::Ia3`), and by a pair of methods.
pub trait SlotMethod: Clone + Debug + Default + Send + Sync + 'static {
    /// The method's `adapter_config.json`.
    type Config: AdapterConfig;

    /// Attaches entry `name` to `slot` (module `path`), started per `init`.
    fn attach<B: Backend>(
        config: &Self::Config,
        slot: &mut LinearSlot<B>,
        path: &str,
        name: &str,
        init: Init,
    ) -> Result<()>;

    /// Appends entry `name` of `slot`, if it has one, to `out` under PEFT's
    /// keys (module `path`) and in PEFT's layout.
    fn write_tensors<B: Backend>(
        config: &Self::Config,
        slot: &LinearSlot<B>,
        path: &str,
        name: &str,
        out: &mut Vec<(String, HostTensor)>,
    );

    /// Moves the tensors of entry `name` of module `path` out of `tensors`
    /// (read from `file`) into `slot`, checking their shapes.
    fn read_tensors<B: Backend>(
        config: &Self::Config,
        slot: &mut LinearSlot<B>,
        path: &str,
        name: &str,
        tensors: &mut HashMap<String, HostTensor>,
        file: &Path,
    ) -> Result<()>;

    /// Drops every entry of this method from `slot`.
    fn clear<B: Backend>(slot: &mut LinearSlot<B>);

    /// Sets up what one adapter shares across its layers before any entry
    /// is attached, given the `(d_in, d_out)` of every layer it targets
    /// (VeRA's random projections, sized by the largest). Most methods
    /// share nothing.
    fn prepare_shared(_config: &mut Self::Config, _layers: &[(usize, usize)]) -> Result<()> {
        Ok(())
    }

    /// Appends the tensors the adapter shares across its layers (keys
    /// outside any module, e.g. `base_model.vera_A`).
    fn write_shared(_config: &Self::Config, _out: &mut Vec<(String, HostTensor)>) {}

    /// Moves the shared tensors out of `tensors` (read from `file`) into
    /// `config`, before the entries are filled.
    fn read_shared(
        _config: &mut Self::Config,
        _tensors: &mut HashMap<String, HostTensor>,
        _file: &Path,
    ) -> Result<()> {
        Ok(())
    }
}

/// Implements [`SlotMethod`] for `$method` (config `$config`), a method
/// whose adapters live outside the linear slots (LN tuning's copies of
/// norms, trainable tokens' rows of embedding tables): it has no entry to
/// attach, write, read or clear there, and attaching one directly is
/// refused with `$refusal` (a format string naming `{path}`).
macro_rules! slot_method_without_entries {
    ($method:ty, $config:ty, $refusal:literal) => {
        impl $crate::slot::method::SlotMethod for $method {
            type Config = $config;

            /// Never reached through [`SlotModel`](crate::SlotModel), which
            /// attaches this method's adapters to other slots; a direct
            /// call is refused.
            fn attach<B: ::burn::tensor::backend::Backend>(
                _config: &$config,
                _slot: &mut $crate::slot::LinearSlot<B>,
                path: &str,
                _name: &str,
                _init: $crate::slot::method::Init,
            ) -> $crate::error::Result<()> {
                Err($crate::error::PeftError::Config(format!(
                    $refusal,
                    path = path
                )))
            }

            fn write_tensors<B: ::burn::tensor::backend::Backend>(
                _config: &$config,
                _slot: &$crate::slot::LinearSlot<B>,
                _path: &str,
                _name: &str,
                _out: &mut Vec<(String, $crate::io::HostTensor)>,
            ) {
            }

            fn read_tensors<B: ::burn::tensor::backend::Backend>(
                _config: &$config,
                _slot: &mut $crate::slot::LinearSlot<B>,
                _path: &str,
                _name: &str,
                _tensors: &mut ::std::collections::HashMap<String, $crate::io::HostTensor>,
                _file: &::std::path::Path,
            ) -> $crate::error::Result<()> {
                Ok(())
            }

            fn clear<B: ::burn::tensor::backend::Backend>(_slot: &mut $crate::slot::LinearSlot<B>) {
            }
        }
    };
}
pub(crate) use slot_method_without_entries;

/// The config of an adapter in a model that mixes two slot methods.
#[derive(Debug, Clone)]
pub enum OneOf<C1, C2> {
    /// An adapter of the first method.
    First(C1),
    /// An adapter of the second method.
    Second(C2),
}

impl<C1: AdapterConfig, C2: AdapterConfig> AdapterConfig for OneOf<C1, C2> {
    fn reads(peft_type: Option<&str>) -> bool {
        C1::reads(peft_type) || C2::reads(peft_type)
    }

    /// The method the file's `peft_type` names (the first that reads a
    /// file without one).
    fn read(path: &Path) -> Result<Self> {
        let text = read_text(path)?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| PeftError::Json {
                path: path.to_path_buf(),
                source,
            })?;
        let peft_type = value.get("peft_type").and_then(|t| t.as_str());
        if C1::reads(peft_type) {
            C1::read(path).map(OneOf::First)
        } else if C2::reads(peft_type) {
            C2::read(path).map(OneOf::Second)
        } else {
            Err(PeftError::Config(format!(
                "{}: peft_type {} is none of this model's methods",
                path.display(),
                peft_type.map_or("missing".into(), |t| format!("`{t}`"))
            )))
        }
    }

    fn saved_json(&self) -> String {
        match self {
            OneOf::First(c) => c.saved_json(),
            OneOf::Second(c) => c.saved_json(),
        }
    }

    fn prepare(&mut self, model_type: Option<&str>) -> Result<()> {
        match self {
            OneOf::First(c) => c.prepare(model_type),
            OneOf::Second(c) => c.prepare(model_type),
        }
    }

    fn check_beside(&self, existing: &Self) -> Result<()> {
        match (self, existing) {
            (OneOf::First(c), OneOf::First(e)) => c.check_beside(e),
            (OneOf::Second(c), OneOf::Second(e)) => c.check_beside(e),
            _ => Ok(()),
        }
    }

    fn targets(&self, path: &str, output_layers: &[String]) -> Result<bool> {
        match self {
            OneOf::First(c) => c.targets(path, output_layers),
            OneOf::Second(c) => c.targets(path, output_layers),
        }
    }

    fn trainable_tokens(&self) -> Option<&TokenIndices> {
        match self {
            OneOf::First(c) => c.trainable_tokens(),
            OneOf::Second(c) => c.trainable_tokens(),
        }
    }

    fn token_rows(&self) -> Option<TokenRows<'_>> {
        match self {
            OneOf::First(c) => c.token_rows(),
            OneOf::Second(c) => c.token_rows(),
        }
    }

    fn ensure_weight_tying(&self) -> bool {
        match self {
            OneOf::First(c) => c.ensure_weight_tying(),
            OneOf::Second(c) => c.ensure_weight_tying(),
        }
    }

    fn norm_copy_key(&self) -> Option<&'static str> {
        match self {
            OneOf::First(c) => c.norm_copy_key(),
            OneOf::Second(c) => c.norm_copy_key(),
        }
    }

    fn target_rule(&self) -> String {
        match self {
            OneOf::First(c) => c.target_rule(),
            OneOf::Second(c) => c.target_rule(),
        }
    }

    fn modules_to_save(&self) -> &[String] {
        match self {
            OneOf::First(c) => c.modules_to_save(),
            OneOf::Second(c) => c.modules_to_save(),
        }
    }

    fn method_name(&self) -> &'static str {
        match self {
            OneOf::First(c) => c.method_name(),
            OneOf::Second(c) => c.method_name(),
        }
    }

    fn peft_types() -> Vec<&'static str> {
        [C1::peft_types(), C2::peft_types()].concat()
    }

    fn inner(&self) -> &dyn Any {
        match self {
            OneOf::First(c) => c.inner(),
            OneOf::Second(c) => c.inner(),
        }
    }

    fn inner_mut(&mut self) -> &mut dyn Any {
        match self {
            OneOf::First(c) => c.inner_mut(),
            OneOf::Second(c) => c.inner_mut(),
        }
    }

    fn cli_names() -> Vec<&'static str> {
        [C1::cli_names(), C2::cli_names()].concat()
    }

    fn from_cli(
        name: &str,
        text: Option<&str>,
        origin: &Path,
        settings: &[Setting<'_>],
    ) -> Option<Result<Self>> {
        match C1::from_cli(name, text, origin, settings) {
            Some(c) => Some(c.map(OneOf::First)),
            None => C2::from_cli(name, text, origin, settings).map(|c| c.map(OneOf::Second)),
        }
    }

    fn task_fields(&mut self) -> TaskFields<'_> {
        match self {
            OneOf::First(c) => c.task_fields(),
            OneOf::Second(c) => c.task_fields(),
        }
    }
}

/// Where [`Pick`] places a config: this level's first.
#[derive(Debug)]
pub struct Here;
/// Where [`Pick`] places a config: this level's second (the last level).
#[derive(Debug)]
pub struct Last;
/// Where [`Pick`] places a config: `I` within this level's second.
#[derive(Debug)]
pub struct There<I>(PhantomData<I>);

/// A config placed in a nested [`OneOf`] (`OneOf<A, OneOf<B, C>>`, the
/// configs of a set of methods) by its type: `OneOf::pick(config)`, the
/// position `I` inferred. So a list of methods is one type, and code that
/// names a method's config needs no match over the list.
pub trait Pick<C, I> {
    /// `config` as the set's config.
    fn pick(config: C) -> Self;
}

impl<C1, C2> Pick<C1, Here> for OneOf<C1, C2> {
    fn pick(config: C1) -> Self {
        OneOf::First(config)
    }
}

impl<C1, C2> Pick<C2, Last> for OneOf<C1, C2> {
    fn pick(config: C2) -> Self {
        OneOf::Second(config)
    }
}

impl<C1, C2: Pick<C, I>, C, I> Pick<C, There<I>> for OneOf<C1, C2> {
    fn pick(config: C) -> Self {
        OneOf::Second(C2::pick(config))
    }
}

/// Two slot methods in one model: each adapter is of one of them.
impl<K1: SlotMethod, K2: SlotMethod> SlotMethod for (K1, K2) {
    type Config = OneOf<K1::Config, K2::Config>;

    fn attach<B: Backend>(
        config: &Self::Config,
        slot: &mut LinearSlot<B>,
        path: &str,
        name: &str,
        init: Init,
    ) -> Result<()> {
        match config {
            OneOf::First(c) => K1::attach(c, slot, path, name, init),
            OneOf::Second(c) => K2::attach(c, slot, path, name, init),
        }
    }

    fn write_tensors<B: Backend>(
        config: &Self::Config,
        slot: &LinearSlot<B>,
        path: &str,
        name: &str,
        out: &mut Vec<(String, HostTensor)>,
    ) {
        match config {
            OneOf::First(c) => K1::write_tensors(c, slot, path, name, out),
            OneOf::Second(c) => K2::write_tensors(c, slot, path, name, out),
        }
    }

    fn read_tensors<B: Backend>(
        config: &Self::Config,
        slot: &mut LinearSlot<B>,
        path: &str,
        name: &str,
        tensors: &mut HashMap<String, HostTensor>,
        file: &Path,
    ) -> Result<()> {
        match config {
            OneOf::First(c) => K1::read_tensors(c, slot, path, name, tensors, file),
            OneOf::Second(c) => K2::read_tensors(c, slot, path, name, tensors, file),
        }
    }

    fn clear<B: Backend>(slot: &mut LinearSlot<B>) {
        K1::clear(slot);
        K2::clear(slot);
    }

    fn prepare_shared(config: &mut Self::Config, layers: &[(usize, usize)]) -> Result<()> {
        match config {
            OneOf::First(c) => K1::prepare_shared(c, layers),
            OneOf::Second(c) => K2::prepare_shared(c, layers),
        }
    }

    fn write_shared(config: &Self::Config, out: &mut Vec<(String, HostTensor)>) {
        match config {
            OneOf::First(c) => K1::write_shared(c, out),
            OneOf::Second(c) => K2::write_shared(c, out),
        }
    }

    fn read_shared(
        config: &mut Self::Config,
        tensors: &mut HashMap<String, HostTensor>,
        file: &Path,
    ) -> Result<()> {
        match config {
            OneOf::First(c) => K1::read_shared(c, tensors, file),
            OneOf::Second(c) => K2::read_shared(c, tensors, file),
        }
    }
}
