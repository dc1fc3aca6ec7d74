//! `AdapterHost`: every wrapper (slot methods, prefix, prompt, bottleneck
//! adapters) and the CLI's `Adapted` over them answer the same questions
//! about their named adapters the same way, on the tiny GPT-2 of the
//! fixtures: names, activation (refusals leave it unchanged), deletion, and
//! a save → delete → load → save round trip whose files are byte-identical.

use std::path::Path;

use burn::tensor::backend::Backend;
use peft_adapter::{AdapterModel, BnConfig, Ia3Model};
use peft_cli::tasks::Adapted;
use peft_core::prompt_learning::{PromptLearningConfig, PromptTuningInit};
use peft_core::{backend_tests, AdapterHost, Ia3Config, LoraConfig, PeftError, SlotModel};
use peft_lora::Lora;
use peft_models::fixtures::{temp_dir, tiny_gpt2};
use peft_prefix::PrefixTuningModel;
use peft_prompt::PromptTuningModel;

/// Every file of `a` and `b`, byte for byte.
fn same_files(a: &Path, b: &Path) {
    let mut names: Vec<_> = std::fs::read_dir(a)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert!(!names.is_empty(), "{}: nothing saved", a.display());
    for name in names {
        let (x, y) = (
            std::fs::read(a.join(&name)).unwrap(),
            std::fs::read(b.join(&name)).unwrap(),
        );
        assert!(x == y, "{name:?} differs after a round trip");
    }
}

/// `host` carries adapters `a` and `b`; `several`: whether more than one
/// may be active at once.
fn hosts_named_adapters(host: &mut dyn AdapterHost, several: bool, what: &str) {
    let names = |h: &dyn AdapterHost| h.adapter_names();
    assert_eq!(names(host), ["a", "b"], "{what}");

    host.activate(&["b"]).unwrap();
    assert_eq!(host.active_adapters(), ["b"], "{what}");
    let unknown = host.activate(&["nope"]).unwrap_err();
    assert!(
        matches!(&unknown, PeftError::UnknownAdapter { name, available }
            if name == "nope" && available.len() == 2),
        "{what}: {unknown}"
    );
    assert_eq!(
        host.active_adapters(),
        ["b"],
        "{what}: a refusal changes nothing"
    );

    let both = host.activate(&["a", "b"]);
    if several {
        both.unwrap();
        assert_eq!(host.active_adapters(), ["a", "b"], "{what}");
    } else {
        assert!(matches!(both, Err(PeftError::Config(_))), "{what}");
        assert_eq!(host.active_adapters(), ["b"], "{what}");
    }
    host.activate(&[]).unwrap();
    assert!(host.active_adapters().is_empty(), "{what}");

    // Save, delete, load back, save again: the same files.
    let (first, second) = (temp_dir("host-first"), temp_dir("host-second"));
    std::fs::create_dir_all(&first).unwrap();
    std::fs::create_dir_all(&second).unwrap();
    host.activate(&["b"]).unwrap();
    host.save_adapter("b", &first).unwrap();
    host.delete_adapter("b").unwrap();
    assert_eq!(names(host), ["a"], "{what}");
    assert!(host.active_adapters().is_empty(), "{what}: b was active");
    assert!(host.delete_adapter("b").is_err(), "{what}: b is gone");
    host.load_adapter(&first, "b").unwrap();
    assert_eq!(names(host), ["a", "b"], "{what}");
    assert!(
        host.active_adapters().is_empty(),
        "{what}: loading leaves the activation"
    );
    host.save_adapter("b", &second).unwrap();
    same_files(&first, &second);
    for dir in [first, second] {
        std::fs::remove_dir_all(dir).unwrap();
    }
}

fn every_wrapper_hosts_adapters_alike<B: Backend>(d: &B::Device) {
    let gpt2 = || tiny_gpt2::<B>(d);

    let lora = LoraConfig::new(2, 4.0, &["c_attn"]);
    let mut slots = SlotModel::<B, _, Lora>::wrap(gpt2());
    slots.add_adapter("a", lora.clone()).unwrap();
    slots.add_adapter("b", lora.clone()).unwrap();
    hosts_named_adapters(&mut slots, true, "LoRA");

    let mut ia3 = Ia3Model::wrap(gpt2());
    ia3.add_adapter("a", Ia3Config::default()).unwrap();
    ia3.add_adapter("b", Ia3Config::default()).unwrap();
    hosts_named_adapters(&mut ia3, true, "(IA)³");

    let mut prefix = PrefixTuningModel::wrap(gpt2());
    let config = PromptLearningConfig::prefix_tuning(3);
    prefix.add_adapter("a", config.clone()).unwrap();
    prefix.add_adapter("b", config).unwrap();
    hosts_named_adapters(&mut prefix, false, "prefix");

    let mut prompt = PromptTuningModel::wrap(gpt2());
    let config = PromptLearningConfig::prompt_tuning(3, PromptTuningInit::Random);
    prompt.add_adapter("a", config.clone()).unwrap();
    prompt.add_adapter("b", config).unwrap();
    hosts_named_adapters(&mut prompt, false, "prompt");

    let mut bottleneck = AdapterModel::wrap(gpt2());
    let config = BnConfig::by_name("seq_bn").unwrap();
    bottleneck.add_adapter("a", config.clone()).unwrap();
    bottleneck.add_adapter("b", config).unwrap();
    hosts_named_adapters(&mut bottleneck, true, "bottleneck");

    // The CLI's enum answers through the wrapper it holds.
    let mut adapted = Adapted::Slots(SlotModel::wrap(gpt2()));
    let Adapted::Slots(s) = &mut adapted else {
        unreachable!()
    };
    s.add_adapter("a", peft_core::slot_method::OneOf::First(lora.clone()))
        .unwrap();
    s.add_adapter("b", peft_core::slot_method::OneOf::First(lora))
        .unwrap();
    hosts_named_adapters(adapted.host_mut(), true, "Adapted");
}

backend_tests!(every_wrapper_hosts_adapters_alike);
