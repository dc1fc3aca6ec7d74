//! `peft generate`: text from a decoder with an adapter folder or none.

use std::path::Path;

use burn::tensor::backend::Backend;
use peft_core::generate::{CausalLm, Sampler};
use peft_core::{PeftError, Result};
use peft_models::gpt2::Gpt2;
use peft_models::llama::Llama;

use crate::tasks::{self, Arch, CausalModel};

/// `peft generate`: greedy (or sampled) text from a Llama / GPT-2 model,
/// with a LoRA / (IA)³ adapter folder or none.
pub fn generate<B: Backend>(
    model: &Path,
    adapter: Option<&Path>,
    prompt: &str,
    max_new: usize,
    sampler: &mut Sampler,
    device: &B::Device,
) -> Result<String> {
    let tok = tasks::tokenizer_of(model)?;
    let ids = tok.encode(prompt)?;
    let out = match tasks::arch_of(model)? {
        Arch::Llama => {
            generate_with::<B, Llama<B>>(model, adapter, &ids, max_new, sampler, device)?
        }
        Arch::Gpt2 => generate_with::<B, Gpt2<B>>(model, adapter, &ids, max_new, sampler, device)?,
        Arch::Bert => return Err(PeftError::Config("BERT does not generate text".into())),
    };
    tok.decode(&out)
}

fn generate_with<B: Backend, M: CausalModel<B> + CausalLm<B>>(
    model: &Path,
    adapter: Option<&Path>,
    ids: &[u32],
    max_new: usize,
    sampler: &mut Sampler,
    device: &B::Device,
) -> Result<Vec<u32>> {
    let base = M::load_from(model, device)?;
    tasks::load_adapted(base, adapter)?.generate(ids, max_new, sampler, None)
}
