//! [`RankAllocator`]: PEFT 0.21's AdaLoRA budget schedule, called once per
//! optimizer step as PEFT's `update_and_allocate`.
//!
//! Each step, every factor element's sensitivity `|p·∇p|` (the stepped
//! parameter times the step's gradient) feeds two moving averages, the
//! sensitivity (`beta1`) and its uncertainty (`beta2`); an element's score
//! is their product. A layer's triplet `i` scores `E`'s element `i` plus the
//! mean of `A`'s column `i` and of `B`'s row `i`. Between `tinit` and
//! `total_step − tfinal` the budget falls cubically from the total `init_r`
//! of every layer to `target_r` per layer; every `deltaT` steps the triplets
//! scoring at or below the budget's threshold (the `k`-th smallest score,
//! `k = init − budget`) get `E = 0`, and the adapter's `rank_pattern`
//! records which remain. At `total_step − tfinal` the pattern is final; after
//! it, each step masks by it again (the optimizer moves masked values).
//!
//! ```text
//! let grads = GradientsParams::from_grads(loss.backward(), &model);
//! allocator.observe(&model.model, &grads);
//! model = optim.step(lr, model, grads);
//! allocator.update_and_allocate(&mut model, step)?;
//! ```

use std::collections::BTreeMap;

use burn::module::Param;
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use peft_core::slot::AdaLoraEntry;
use peft_core::slot_method::AdapterConfig;
use peft_core::{PeftError, PeftModel, Result, SlotMethod, SlotModel};

use crate::adalora::{AdaLoraConfig, RankPattern};

/// One factor's running scores, in Burn's layout.
#[derive(Debug, Clone, Default)]
struct Averages {
    /// Moving average of the sensitivity.
    ipt: Vec<f32>,
    /// Moving average of the uncertainty.
    unc: Vec<f32>,
}

impl Averages {
    /// PEFT's `update_ipt` for one tensor: `ipt = |p·g|`, then both EMAs.
    fn update(&mut self, p: &[f32], g: &[f32], beta1: f32, beta2: f32) {
        if self.ipt.len() != p.len() {
            self.ipt = vec![0.0; p.len()];
            self.unc = vec![0.0; p.len()];
        }
        for i in 0..p.len() {
            let ipt = (p[i] * g[i]).abs();
            self.ipt[i] = beta1 * self.ipt[i] + (1.0 - beta1) * ipt;
            self.unc[i] = beta2 * self.unc[i] + (1.0 - beta2) * (ipt - self.ipt[i]).abs();
        }
    }

    fn score(&self, i: usize) -> f32 {
        self.ipt[i] * self.unc[i]
    }
}

/// One layer's factors' scores: `A` `[d_in, r]`, `E` `[1, r]`, `B` `[r, d_out]`.
#[derive(Debug, Clone, Default)]
struct LayerScores {
    a: Averages,
    e: Averages,
    b: Averages,
    d_in: usize,
    rank: usize,
}

/// A layer's factors, values or gradients, on the host (Burn's layout).
#[derive(Debug, Clone)]
struct Factors {
    a: Vec<f32>,
    e: Vec<f32>,
    b: Vec<f32>,
    d_in: usize,
    rank: usize,
}

fn host<B: Backend>(t: Tensor<B, 2>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec().expect("f32 data")
}

/// PEFT's `RankAllocator` for one trainable AdaLoRA adapter.
#[derive(Debug, Clone)]
pub struct RankAllocator {
    adapter: String,
    config: AdaLoraConfig,
    /// The total rank at the start (`init_bgt`).
    init_budget: usize,
    /// `target_r` per layer (`target_bgt`).
    target_budget: usize,
    scores: BTreeMap<String, LayerScores>,
    /// The last observed step's gradients, by layer path.
    gradients: BTreeMap<String, Factors>,
}

impl RankAllocator {
    /// The allocator of AdaLoRA adapter `adapter` of `model`, per its config.
    pub fn new<B: Backend, M: PeftModel<B>, K: SlotMethod>(
        model: &SlotModel<B, M, K>,
        adapter: &str,
    ) -> Result<Self> {
        let config = adalora_config(model, adapter)?.clone();
        if config.total_step.is_none() {
            return Err(PeftError::Config(format!(
                "AdaLoRA adapter `{adapter}`: `total_step` is needed to train (the budget schedule spans the run); supply a value > 0"
            )));
        }
        let mut init_budget = 0;
        let mut layers = 0;
        model.model.visit_linears(&mut |_, slot| {
            if let Some(e) = slot.entry::<AdaLoraEntry<B>>(adapter) {
                init_budget += e.rank();
                layers += 1;
            }
        });
        Ok(RankAllocator {
            adapter: adapter.to_string(),
            target_budget: config.target_r * layers,
            config,
            init_budget,
            scores: BTreeMap::new(),
            gradients: BTreeMap::new(),
        })
    }

    /// Records the step's gradients of the adapter's factors (call before
    /// the optimizer consumes them).
    pub fn observe<B: AutodiffBackend, M: PeftModel<B>>(
        &mut self,
        model: &M,
        grads: &GradientsParams,
    ) {
        self.gradients.clear();
        let name = &self.adapter;
        let gradients = &mut self.gradients;
        model.visit_linears(&mut |path, slot| {
            let Some(e) = slot.entry::<AdaLoraEntry<B>>(name) else {
                return;
            };
            let [d_in, rank] = e.a.dims();
            let d_out = e.b.dims()[1];
            let grad = |p: &Param<Tensor<B, 2>>, shape: [usize; 2]| {
                grads
                    .get::<B::InnerBackend, 2>(p.id)
                    .map(host)
                    .unwrap_or_else(|| vec![0.0; shape[0] * shape[1]])
            };
            gradients.insert(
                path.to_string(),
                Factors {
                    a: grad(&e.a, [d_in, rank]),
                    e: grad(&e.e, [1, rank]),
                    b: grad(&e.b, [rank, d_out]),
                    d_in,
                    rank,
                },
            );
        });
    }

    /// PEFT's `budget_schedule`: the budget at `step` and whether to mask.
    pub fn budget(&self, step: usize) -> (usize, bool) {
        let c = &self.config;
        let total = c.total_step.unwrap_or(0);
        if step <= c.tinit {
            (self.init_budget, false)
        } else if step + c.tfinal > total {
            (self.target_budget, true)
        } else {
            let coeff = 1.0 - (step - c.tinit) as f64 / (total - c.tfinal - c.tinit) as f64;
            let spread = (self.init_budget - self.target_budget) as f64;
            let budget = (spread * coeff.powi(3) + self.target_budget as f64) as usize;
            (budget, step.is_multiple_of(c.delta_t))
        }
    }

    /// PEFT's `AdaLoraModel.update_and_allocate(step)` on the stepped
    /// model (after [`observe`](Self::observe) of this step's gradients):
    /// scores, masks and the adapter's `rank_pattern`.
    pub fn update_and_allocate<B: Backend, M: PeftModel<B>, K: SlotMethod>(
        &mut self,
        model: &mut SlotModel<B, M, K>,
        step: usize,
    ) -> Result<()> {
        let total = self.config.total_step.unwrap_or(0);
        let end = total.saturating_sub(self.config.tfinal);
        if step > end {
            let pattern = adalora_config(model, &self.adapter)?.rank_pattern.clone();
            if let Some(pattern) = pattern {
                self.mask(&mut model.model, &pattern);
            }
            return Ok(());
        }
        if step < end {
            self.update_scores(&model.model);
        }
        let (budget, mask) = self.budget(step);
        if mask || step == end {
            let pattern = self.pattern_for(budget);
            self.mask(&mut model.model, &pattern);
            adalora_config_mut(model, &self.adapter)?.rank_pattern = Some(pattern);
        }
        if step == end {
            self.scores.clear();
        }
        Ok(())
    }

    /// PEFT's `update_ipt`: each factor's EMAs from the stepped values and
    /// the observed gradients.
    fn update_scores<B: Backend, M: PeftModel<B>>(&mut self, model: &M) {
        let (b1, b2) = (self.config.beta1 as f32, self.config.beta2 as f32);
        let name = &self.adapter;
        let (scores, gradients) = (&mut self.scores, &self.gradients);
        model.visit_linears(&mut |path, slot| {
            let (Some(e), Some(g)) = (slot.entry::<AdaLoraEntry<B>>(name), gradients.get(path))
            else {
                return;
            };
            let s = scores.entry(path.to_string()).or_default();
            (s.d_in, s.rank) = (g.d_in, g.rank);
            s.a.update(&host(e.a.val()), &g.a, b1, b2);
            s.e.update(&host(e.e.val()), &g.e, b1, b2);
            s.b.update(&host(e.b.val()), &g.b, b1, b2);
        });
    }

    /// Each layer's triplet scores (`E`'s plus the means of `A`'s column
    /// and `B`'s row), by path.
    fn triplet_scores(&self) -> BTreeMap<&str, Vec<f32>> {
        let mut out = BTreeMap::new();
        for (path, s) in &self.scores {
            let (d_in, r) = (s.d_in, s.rank);
            let d_out = s.b.ipt.len().checked_div(r).unwrap_or(0);
            let triplets = (0..r)
                .map(|i| {
                    let a = (0..d_in).map(|j| s.a.score(j * r + i)).sum::<f32>() / d_in as f32;
                    let b =
                        (0..d_out).map(|j| s.b.score(i * d_out + j)).sum::<f32>() / d_out as f32;
                    s.e.score(i) + (a + b)
                })
                .collect();
            out.insert(path.as_str(), triplets);
        }
        out
    }

    /// PEFT's `mask_to_budget`: the pattern keeping every triplet scoring
    /// above the `k`-th smallest score, `k = init − budget` (none masked
    /// when `k` is 0).
    fn pattern_for(&self, budget: usize) -> RankPattern {
        let triplets = self.triplet_scores();
        let k = self.init_budget.saturating_sub(budget);
        let threshold = if k == 0 {
            f32::NEG_INFINITY
        } else {
            let mut all: Vec<f32> = triplets.values().flatten().copied().collect();
            all.sort_by(f32::total_cmp);
            all[(k - 1).min(all.len().saturating_sub(1))]
        };
        triplets
            .into_iter()
            .map(|(path, t)| {
                (
                    format!("{path}.lora_E"),
                    t.iter().map(|s| *s > threshold).collect(),
                )
            })
            .collect()
    }

    /// Sets `E` to zero where `pattern` drops a triplet (the parameter keeps
    /// its identity, so the optimizer's state stays attached).
    fn mask<B: Backend, M: PeftModel<B>>(&self, model: &mut M, pattern: &RankPattern) {
        let name = &self.adapter;
        model.visit_linears_mut(&mut |path, slot| {
            let Some(keep) = pattern.get(&format!("{path}.lora_E")) else {
                return;
            };
            let Some(e) = slot.entry_mut::<AdaLoraEntry<B>>(name) else {
                return;
            };
            if keep.len() != e.rank() {
                return;
            }
            let device = e.e.device();
            let mask: Vec<f32> = keep.iter().map(|k| if *k { 1.0 } else { 0.0 }).collect();
            let mask = Tensor::<B, 2>::from_data(TensorData::new(mask, [1, keep.len()]), &device);
            e.e = e.e.clone().map(|t| {
                let train = t.is_require_grad();
                (t * mask).detach().set_require_grad(train)
            });
        });
    }
}

fn missing(adapter: &str) -> PeftError {
    PeftError::Config(format!("adapter `{adapter}` is not an AdaLoRA adapter"))
}

/// The AdaLoRA config of adapter `adapter`.
pub fn adalora_config<'m, B: Backend, M: PeftModel<B>, K: SlotMethod>(
    model: &'m SlotModel<B, M, K>,
    adapter: &str,
) -> Result<&'m AdaLoraConfig> {
    model
        .config(adapter)?
        .inner()
        .downcast_ref::<AdaLoraConfig>()
        .ok_or_else(|| missing(adapter))
}

fn adalora_config_mut<'m, B: Backend, M: PeftModel<B>, K: SlotMethod>(
    model: &'m mut SlotModel<B, M, K>,
    adapter: &str,
) -> Result<&'m mut AdaLoraConfig> {
    model
        .config_mut(adapter)?
        .inner_mut()
        .downcast_mut::<AdaLoraConfig>()
        .ok_or_else(|| missing(adapter))
}
