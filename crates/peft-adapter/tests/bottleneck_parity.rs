//! Bottleneck-adapter parity with AdapterHub (`adapters` 1.3) on the
//! fixtures of `scripts/make_adapterhub_fixtures.py`: `seq_bn`,
//! `double_seq_bn` (learned scaling), `par_bn` (channel scaling), `leave_out`
//! on a tiny BERT; `Stack`, `Parallel`, `BatchSplit`, `Average` and `Fuse` of
//! two adapters; the same placements on GPT-2 and Llama. Adapters are loaded
//! from AdapterHub's own files; every logit matches within 1e-5 on every
//! backend, and the files we write hold AdapterHub's tensors.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};
use peft_adapter::{AdapterModel, Setup};
use peft_core::io::{read_safetensors, HostTensor};
use peft_core::{backend_tests, PeftModel};
use peft_models::bert::Bert;
use peft_models::fixtures::{assert_close, fixtures_dir, temp_dir, FixtureCase};
use peft_models::gpt2::Gpt2;
use peft_models::llama::Llama;
use serde_json::Value;

fn setup_from_json(v: &Value) -> Setup {
    if let Some(name) = v.as_str() {
        return Setup::single(name);
    }
    let children: Vec<Setup> = v["children"]
        .as_array()
        .unwrap()
        .iter()
        .map(setup_from_json)
        .collect();
    match v["type"].as_str().unwrap() {
        "Stack" => Setup::Stack(children),
        "Parallel" => Setup::Parallel(children),
        "Fuse" => Setup::Fuse(children),
        "BatchSplit" => Setup::BatchSplit(
            children,
            v["batch_sizes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n.as_u64().unwrap() as usize)
                .collect(),
        ),
        "Average" => Setup::Average(
            children,
            v["weights"]
                .as_array()
                .unwrap()
                .iter()
                .map(|w| w.as_f64().unwrap())
                .collect(),
        ),
        other => panic!("unknown setup {other}"),
    }
}

type Logits<B, M> = fn(&M, <M as PeftModel<B>>::Output) -> HostTensor;

fn check_case<B: Backend, M: PeftModel<B> + Clone>(
    arch: &str,
    case: &str,
    base: M,
    head: Logits<B, M>,
    device: &B::Device,
) {
    let c = FixtureCase::open(arch, case);
    let ids: Tensor<B, 2, Int> = c.ints("input_ids", device);
    let mask: Tensor<B, 2> = c.floats("attention_mask", device);
    let mut model = AdapterModel::wrap(base.clone());
    let run = |m: &AdapterModel<B, M>| {
        head(
            &m.model,
            m.forward(ids.clone(), Some(mask.clone())).unwrap(),
        )
    };
    assert_close("base", &run(&model), c.want("logits_base"));

    let names: Vec<String> = c.meta["adapters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    for name in &names {
        let loaded = model.load_adapter(&c.dir.join(name), None).unwrap();
        assert_eq!(&loaded, name);
    }
    if c.dir.join("fusion").exists() {
        model.load_fusion(&c.dir.join("fusion")).unwrap();
    }
    for (k, setup) in c.meta["setups"].as_array().unwrap().iter().enumerate() {
        let setup = setup_from_json(setup);
        model.set_active(setup.clone()).unwrap();
        assert_close(
            &format!("{setup:?}"),
            &run(&model),
            c.want(&format!("logits_{k}")),
        );
    }
    model.disable();
    assert_close("disabled", &run(&model), c.want("logits_base"));

    // Parameter counts as AdapterHub's train_adapter / train_adapter_fusion.
    let counts = &c.meta["trainable_params"];
    for name in &names {
        model.train_adapter(Setup::single(name)).unwrap();
        let want = counts[name.as_str()].as_u64().unwrap() as usize;
        assert_eq!(model.param_count().trainable, want, "{name}");
    }
    if let Some(fusion) = model.fusion_names().first().cloned() {
        let refs: Vec<&str> = fusion.split(',').collect();
        model.train_fusion(Setup::fuse(&refs)).unwrap();
        assert_eq!(
            model.param_count().trainable,
            counts["fusion"].as_u64().unwrap() as usize
        );
        assert_eq!(model.param_count().all, c.meta_usize("all_params"));
    }

    // Files we write hold AdapterHub's keys and values, and load back.
    let out = temp_dir(&format!("bn-{arch}-{case}"));
    for name in &names {
        model.save_adapter(name, &out.join(name)).unwrap();
        let theirs = read_safetensors(&c.dir.join(name).join("adapter.safetensors")).unwrap();
        let ours = read_safetensors(&out.join(name).join("adapter.safetensors")).unwrap();
        assert_eq!(
            theirs, ours,
            "{name}: saved tensors differ from AdapterHub's"
        );
    }
    if let Some(fusion) = model.fusion_names().first().cloned() {
        model.save_fusion(&fusion, &out.join("fusion")).unwrap();
        let file = "model_adapter_fusion.safetensors";
        let theirs = read_safetensors(&c.dir.join("fusion").join(file)).unwrap();
        let ours = read_safetensors(&out.join("fusion").join(file)).unwrap();
        assert_eq!(
            theirs, ours,
            "fusion: saved tensors differ from AdapterHub's"
        );
    }
    let mut again = AdapterModel::wrap(base);
    again.load_adapter(&out.join(&names[0]), None).unwrap();
    again.set_active(Setup::single(&names[0])).unwrap();
    model.set_active(Setup::single(&names[0])).unwrap();
    assert_eq!(
        run(&again).data,
        run(&model).data,
        "reloaded adapter differs"
    );
    std::fs::remove_dir_all(&out).unwrap();
}

fn bert<B: Backend>(d: &B::Device) -> Bert<B> {
    Bert::load(&fixtures_dir().join("bert"), d).unwrap()
}
fn gpt2<B: Backend>(d: &B::Device) -> Gpt2<B> {
    Gpt2::load(&fixtures_dir().join("gpt2"), d).unwrap()
}
fn llama<B: Backend>(d: &B::Device) -> Llama<B> {
    Llama::load(&fixtures_dir().join("llama"), d).unwrap()
}
fn cls<B: Backend>(m: &Bert<B>, h: Tensor<B, 3>) -> HostTensor {
    HostTensor::from_tensor(m.classify_hidden(h).unwrap())
}
fn lm<B: Backend>(_: &Gpt2<B>, logits: Tensor<B, 3>) -> HostTensor {
    HostTensor::from_tensor(logits)
}
fn lm_llama<B: Backend>(_: &Llama<B>, logits: Tensor<B, 3>) -> HostTensor {
    HostTensor::from_tensor(logits)
}

fn bert_seq_bn<B: Backend>(d: &B::Device) {
    check_case("bert", "bn_seq", bert::<B>(d), cls::<B>, d);
}
fn bert_double_seq_bn<B: Backend>(d: &B::Device) {
    check_case("bert", "bn_double", bert::<B>(d), cls::<B>, d);
}
fn bert_par_bn<B: Backend>(d: &B::Device) {
    check_case("bert", "bn_par", bert::<B>(d), cls::<B>, d);
}
fn bert_leave_out<B: Backend>(d: &B::Device) {
    check_case("bert", "bn_leave_out", bert::<B>(d), cls::<B>, d);
}
fn bert_compositions<B: Backend>(d: &B::Device) {
    check_case("bert", "bn_compose", bert::<B>(d), cls::<B>, d);
}
fn gpt2_seq_bn<B: Backend>(d: &B::Device) {
    check_case("gpt2", "bn_seq_gpt2", gpt2::<B>(d), lm::<B>, d);
}
fn gpt2_double_and_parallel<B: Backend>(d: &B::Device) {
    check_case("gpt2", "bn_double_gpt2", gpt2::<B>(d), lm::<B>, d);
}
fn llama_double_seq_bn<B: Backend>(d: &B::Device) {
    check_case("llama", "bn_double_llama", llama::<B>(d), lm_llama::<B>, d);
}
fn llama_par_bn<B: Backend>(d: &B::Device) {
    check_case("llama", "bn_par_llama", llama::<B>(d), lm_llama::<B>, d);
}

backend_tests!(
    bert_seq_bn,
    bert_double_seq_bn,
    bert_par_bn,
    bert_leave_out,
    bert_compositions,
    gpt2_seq_bn,
    gpt2_double_and_parallel,
    llama_double_seq_bn,
    llama_par_bn
);
