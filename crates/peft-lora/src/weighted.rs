//! `add_weighted_adapter`: a new adapter from a weighted combination of
//! existing ones, exactly as PEFT defines each combination.
//!
//! - `linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune`: the
//!   combination is applied to the `A` factors with weights
//!   `sign(w·s)·√|w·s|` and to the `B` factors with `√|w·s|` (all adapters
//!   must share one rank).
//! - `cat`: `A = [w₁s₁A₁ | w₂s₂A₂ | …]`, `B = [B₁; B₂; …]` — exact, rank Σrᵢ.
//! - `svd` and `*_svd`: the combination of the full updates `ΔWᵢ = sᵢAᵢBᵢ`,
//!   truncated to rank `svd_rank` (default: the largest rank) by SVD.
//!
//! The new adapter has `lora_alpha = r`, so its scaling is 1 (or `√r` with
//! rsLoRA, as PEFT's config copy implies). `dare_*` draw their masks from a
//! seeded generator: reproducible here, but not the same draws as PyTorch's;
//! [`WeightedOptions::dare_masks`] takes masks drawn elsewhere (recorded
//! from PEFT, say) instead, and then the result is PEFT's.

use burn::module::Param;
use burn::tensor::backend::Backend;
use nalgebra::DMatrix;
use peft_core::config::TargetModules;
use peft_core::io::HostTensor;
use peft_core::rng::SplitMix64;
use peft_core::slot_method::Init;
use peft_core::{LinearSlot, LoraEntry, PeftError, PeftModel, Result};

use crate::LoraModel;

/// How adapters are combined (PEFT's `combination_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Combination {
    /// Weighted sum of the factors.
    Linear,
    /// Concatenation of the factors (exact).
    Cat,
    /// Weighted sum of the updates, truncated SVD.
    Svd,
    /// TIES on the factors.
    Ties,
    /// TIES on the updates, truncated SVD.
    TiesSvd,
    /// DARE (random drop, rescale) then sum, on the factors.
    DareLinear,
    /// DARE then TIES sign election, on the factors.
    DareTies,
    /// DARE on the updates, truncated SVD.
    DareLinearSvd,
    /// DARE-TIES on the updates, truncated SVD.
    DareTiesSvd,
    /// Magnitude pruning then sum, on the factors.
    MagnitudePrune,
    /// Magnitude pruning on the updates, truncated SVD.
    MagnitudePruneSvd,
}

impl Combination {
    /// Parses PEFT's name (`"svd"`, `"dare_ties"`, …).
    pub fn parse(name: &str) -> Result<Self> {
        use Combination::*;
        Ok(match name {
            "linear" => Linear,
            "cat" => Cat,
            "svd" => Svd,
            "ties" => Ties,
            "ties_svd" => TiesSvd,
            "dare_linear" => DareLinear,
            "dare_ties" => DareTies,
            "dare_linear_svd" => DareLinearSvd,
            "dare_ties_svd" => DareTiesSvd,
            "magnitude_prune" => MagnitudePrune,
            "magnitude_prune_svd" => MagnitudePruneSvd,
            other => {
                return Err(PeftError::Config(format!(
                    "unknown combination_type `{other}`"
                )))
            }
        })
    }

    fn is_svd(self) -> bool {
        use Combination::*;
        matches!(
            self,
            Svd | TiesSvd | DareLinearSvd | DareTiesSvd | MagnitudePruneSvd
        )
    }

    fn needs_density(self) -> bool {
        !matches!(
            self,
            Combination::Linear | Combination::Cat | Combination::Svd
        )
    }
}

/// How TIES elects the sign of each entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MajoritySign {
    /// Sign of the sum of values.
    #[default]
    Total,
    /// Sign of the sum of signs.
    Frequency,
}

/// Options of [`LoraModel::add_weighted_adapter`].
#[derive(Debug, Clone, PartialEq)]
pub struct WeightedOptions {
    /// Fraction of entries kept by pruning combinations, in `[0, 1]`.
    pub density: Option<f64>,
    /// Rank of SVD combinations (default: the largest source rank).
    pub svd_rank: Option<usize>,
    /// TIES sign election.
    pub majority_sign: MajoritySign,
    /// Seed of DARE's random masks.
    pub seed: u64,
    /// DARE's keep masks (1 keep, 0 drop) given instead of drawn from
    /// `seed`, in the order PEFT draws them: target modules in model order;
    /// in each, every source adapter's `A` factor then every one's `B`
    /// factor (`dare_*_svd`: every adapter's full update `ΔW`). Each mask
    /// has the shape of the tensor it prunes in Burn's layout (`A [in, r]`,
    /// `B [r, out]`, `ΔW [in, out]`). Too few or too many masks, a shape
    /// that differs or a value other than 0 and 1 is a `Config` error.
    pub dare_masks: Option<Vec<HostTensor>>,
}

impl Default for WeightedOptions {
    fn default() -> Self {
        WeightedOptions {
            density: None,
            svd_rank: None,
            majority_sign: MajoritySign::Total,
            seed: 0,
            dare_masks: None,
        }
    }
}

/// PEFT's `magnitude_based_pruning`: keep the `⌊density·n⌋` largest |values|.
fn magnitude_prune(t: &[f32], density: f64) -> Vec<f32> {
    if density >= 1.0 {
        return t.to_vec();
    }
    let k = (density * t.len() as f64) as usize;
    let mut order: Vec<usize> = (0..t.len()).collect();
    order.sort_by(|&i, &j| t[j].abs().total_cmp(&t[i].abs()));
    let mut out = vec![0.0; t.len()];
    for &i in &order[..k] {
        out[i] = t[i];
    }
    out
}

/// Where DARE's keep masks come from.
enum Masks<'a> {
    /// Drawn here: keep with probability `density`.
    Drawn(SplitMix64),
    /// Given ([`WeightedOptions::dare_masks`]), consumed in order.
    Given(std::slice::Iter<'a, HostTensor>),
}

impl Masks<'_> {
    /// Whether each of `n` entries of a tensor of `shape` is kept.
    fn next(&mut self, shape: &[usize], density: f64) -> Result<Vec<bool>> {
        let n = shape.iter().product::<usize>();
        match self {
            Masks::Drawn(rng) => Ok((0..n).map(|_| rng.next_f64() < density).collect()),
            Masks::Given(masks) => {
                let refuse = |why: String| Err(PeftError::Config(format!("dare_masks: {why}")));
                let Some(m) = masks.next() else {
                    return refuse("fewer masks than the combination prunes tensors".into());
                };
                if m.shape != shape {
                    return refuse(format!(
                        "a mask of shape {:?} for a tensor of shape {shape:?}",
                        m.shape
                    ));
                }
                if let Some(v) = m.data.iter().find(|&&v| v != 0.0 && v != 1.0) {
                    return refuse(format!("a mask holds {v}; masks hold only 0 and 1"));
                }
                Ok(m.data.iter().map(|&v| v == 1.0).collect())
            }
        }
    }
}

/// PEFT's `random_pruning` with rescaling, on a tensor of `shape`.
fn random_prune(t: &[f32], shape: &[usize], density: f64, masks: &mut Masks) -> Result<Vec<f32>> {
    if density >= 1.0 {
        return Ok(t.to_vec());
    }
    let keep = masks.next(shape, density)?;
    Ok(t.iter()
        .zip(keep)
        .map(|(&v, keep)| {
            if keep {
                (v as f64 / density) as f32
            } else {
                0.0
            }
        })
        .collect())
}

fn weighted_sum(ts: &[Vec<f32>], w: &[f64]) -> Vec<f32> {
    let mut out = vec![0.0f32; ts[0].len()];
    for (t, &wi) in ts.iter().zip(w) {
        for (o, &v) in out.iter_mut().zip(t) {
            *o += (v as f64 * wi) as f32;
        }
    }
    out
}

/// TIES' sign election and disjoint mean of the weighted, elected values.
fn disjoint_merge(ts: &[Vec<f32>], w: &[f64], method: MajoritySign) -> Vec<f32> {
    let sign = |v: f32| {
        if v > 0.0 {
            1.0
        } else if v < 0.0 {
            -1.0
        } else {
            0.0
        }
    };
    (0..ts[0].len())
        .map(|j| {
            let mag: f32 = match method {
                MajoritySign::Total => ts.iter().map(|t| t[j]).sum(),
                MajoritySign::Frequency => ts.iter().map(|t| sign(t[j])).sum(),
            };
            let majority = if mag >= 0.0 { 1.0 } else { -1.0 };
            let (mut sum, mut count) = (0.0f32, 0.0f32);
            for (t, &wi) in ts.iter().zip(w) {
                if sign(t[j]) == majority {
                    sum += (t[j] as f64 * wi) as f32;
                    count += 1.0;
                }
            }
            sum / count.max(1.0)
        })
        .collect()
}

/// One of PEFT's merge functions on task tensors of one `shape`.
fn combine(
    kind: Combination,
    ts: &[Vec<f32>],
    shape: &[usize],
    w: &[f64],
    opts: &WeightedOptions,
    masks: &mut Masks,
) -> Result<Vec<f32>> {
    use Combination::*;
    let density = opts.density.unwrap_or(1.0);
    let dare = |masks: &mut Masks| -> Result<Vec<Vec<f32>>> {
        ts.iter()
            .map(|t| random_prune(t, shape, density, masks))
            .collect()
    };
    Ok(match kind {
        Linear | Svd | Cat => weighted_sum(ts, w),
        MagnitudePrune | MagnitudePruneSvd => {
            let p: Vec<_> = ts.iter().map(|t| magnitude_prune(t, density)).collect();
            weighted_sum(&p, w)
        }
        Ties | TiesSvd => {
            let p: Vec<_> = ts.iter().map(|t| magnitude_prune(t, density)).collect();
            disjoint_merge(&p, w, opts.majority_sign)
        }
        DareLinear | DareLinearSvd => weighted_sum(&dare(masks)?, w),
        DareTies | DareTiesSvd => disjoint_merge(&dare(masks)?, w, opts.majority_sign),
    })
}

/// `(A [in, r], B [r, out])` of rank ≤ `rank` whose product best approximates
/// `delta [in, out]` (PEFT's truncated SVD, done in f64).
fn truncated_svd(delta: &HostTensor, rank: usize) -> (HostTensor, HostTensor) {
    let (d_in, d_out) = (delta.shape[0], delta.shape[1]);
    let m = DMatrix::<f64>::from_row_slice(
        d_in,
        d_out,
        &delta.data.iter().map(|&v| v as f64).collect::<Vec<_>>(),
    );
    let svd = m.svd(true, true);
    let (u, s, vt) = (
        svd.u.expect("asked for U"),
        svd.singular_values,
        svd.v_t.expect("asked for Vᵀ"),
    );
    // nalgebra does not sort singular values; PEFT keeps the largest.
    let mut order: Vec<usize> = (0..s.len()).collect();
    order.sort_by(|&i, &j| s[j].total_cmp(&s[i]));
    let mut a = vec![0.0f32; d_in * rank];
    let mut b = vec![0.0f32; rank * d_out];
    for (k, &idx) in order.iter().take(rank).enumerate() {
        for i in 0..d_in {
            a[i * rank + k] = u[(i, idx)] as f32;
        }
        for j in 0..d_out {
            b[k * d_out + j] = (s[idx] * vt[(idx, j)]) as f32;
        }
    }
    (
        HostTensor {
            shape: vec![d_in, rank],
            data: a,
        },
        HostTensor {
            shape: vec![rank, d_out],
            data: b,
        },
    )
}

fn host_matmul(a: &HostTensor, b: &HostTensor, scale: f64) -> HostTensor {
    let (n, k, m) = (a.shape[0], a.shape[1], b.shape[1]);
    let mut out = vec![0.0f32; n * m];
    for i in 0..n {
        for p in 0..k {
            let av = a.data[i * k + p] as f64 * scale;
            for j in 0..m {
                out[i * m + j] += (av * b.data[p * m + j] as f64) as f32;
            }
        }
    }
    HostTensor {
        shape: vec![n, m],
        data: out,
    }
}

/// Concatenates 2-D host tensors along `dim`.
fn cat(ts: &[HostTensor], dim: usize) -> HostTensor {
    if dim == 0 {
        let cols = ts[0].shape[1];
        let data: Vec<f32> = ts.iter().flat_map(|t| t.data.iter().copied()).collect();
        HostTensor {
            shape: vec![data.len() / cols, cols],
            data,
        }
    } else {
        let rows = ts[0].shape[0];
        let cols: usize = ts.iter().map(|t| t.shape[1]).sum();
        let mut data = Vec::with_capacity(rows * cols);
        for i in 0..rows {
            for t in ts {
                let c = t.shape[1];
                data.extend_from_slice(&t.data[i * c..(i + 1) * c]);
            }
        }
        HostTensor {
            shape: vec![rows, cols],
            data,
        }
    }
}

/// Zero-pads `[rows, c]` to `[rows, cols]` (dim 1) or `[r, cols]` to `[rows, cols]` (dim 0).
fn pad(t: HostTensor, dim: usize, to: usize) -> HostTensor {
    let have = t.shape[dim];
    if have >= to {
        return t;
    }
    let zeros = if dim == 0 {
        HostTensor {
            shape: vec![to - have, t.shape[1]],
            data: vec![0.0; (to - have) * t.shape[1]],
        }
    } else {
        HostTensor {
            shape: vec![t.shape[0], to - have],
            data: vec![0.0; t.shape[0] * (to - have)],
        }
    };
    cat(&[t, zeros], dim)
}

struct Source {
    a: HostTensor,
    b: HostTensor,
    scaling: f64,
    weight: f64,
}

/// The new `(A, B)` of one module from its source entries.
fn combine_module(
    kind: Combination,
    sources: &[Source],
    new_rank: usize,
    opts: &WeightedOptions,
    masks: &mut Masks,
) -> Result<(HostTensor, HostTensor)> {
    if kind == Combination::Cat {
        let a: Vec<HostTensor> = sources
            .iter()
            .map(|s| HostTensor {
                shape: s.a.shape.clone(),
                data: s
                    .a
                    .data
                    .iter()
                    .map(|&v| (v as f64 * s.weight * s.scaling) as f32)
                    .collect(),
            })
            .collect();
        let b: Vec<HostTensor> = sources.iter().map(|s| s.b.clone()).collect();
        return Ok((pad(cat(&a, 1), 1, new_rank), pad(cat(&b, 0), 0, new_rank)));
    }
    if kind.is_svd() {
        let deltas: Vec<HostTensor> = sources
            .iter()
            .map(|s| host_matmul(&s.a, &s.b, s.scaling))
            .collect();
        let w: Vec<f64> = sources.iter().map(|s| s.weight).collect();
        let data: Vec<Vec<f32>> = deltas.iter().map(|d| d.data.clone()).collect();
        let shape = deltas[0].shape.clone();
        let combined = HostTensor {
            data: combine(kind, &data, &shape, &w, opts, masks)?,
            shape,
        };
        return Ok(truncated_svd(&combined, new_rank));
    }
    let ws: Vec<f64> = sources.iter().map(|s| s.weight * s.scaling).collect();
    let wa: Vec<f64> = ws
        .iter()
        .map(|w| w.abs().sqrt() * if *w >= 0.0 { 1.0 } else { -1.0 })
        .collect();
    let wb: Vec<f64> = ws.iter().map(|w| w.abs().sqrt()).collect();
    let a: Vec<Vec<f32>> = sources.iter().map(|s| s.a.data.clone()).collect();
    let b: Vec<Vec<f32>> = sources.iter().map(|s| s.b.data.clone()).collect();
    let (a_shape, b_shape) = (sources[0].a.shape.clone(), sources[0].b.shape.clone());
    Ok((
        HostTensor {
            data: combine(kind, &a, &a_shape, &wa, opts, masks)?,
            shape: a_shape,
        },
        HostTensor {
            data: combine(kind, &b, &b_shape, &wb, opts, masks)?,
            shape: b_shape,
        },
    ))
}

fn set_factors<B: Backend>(
    slot: &mut LinearSlot<B>,
    name: &str,
    a: HostTensor,
    b: HostTensor,
    scaling: f64,
) -> Result<()> {
    let device = slot.device();
    let (d_in, d_out) = (slot.d_input(), slot.d_output());
    let r = a.shape[1];
    let entry = slot
        .entry_mut::<LoraEntry<B>>(name)
        .expect("injected before combining");
    entry.a = Param::from_tensor(a.to_tensor([d_in, r], "lora_A", &device)?);
    entry.b = Param::from_tensor(b.to_tensor([r, d_out], "lora_B", &device)?);
    entry.meta.rank = r;
    entry.meta.scaling = scaling;
    Ok(())
}

/// PEFT's `add_weighted_adapter` on a [`LoraModel`].
pub trait AddWeightedAdapter {
    /// Adds adapter `name`, the weighted combination of `adapters` (PEFT's
    /// `add_weighted_adapter`). The new adapter is not activated.
    fn add_weighted_adapter(
        &mut self,
        adapters: &[&str],
        weights: &[f64],
        name: &str,
        combination: Combination,
        opts: &WeightedOptions,
    ) -> Result<()>;
}

impl<B: Backend, M: PeftModel<B>> AddWeightedAdapter for LoraModel<B, M> {
    fn add_weighted_adapter(
        &mut self,
        adapters: &[&str],
        weights: &[f64],
        name: &str,
        combination: Combination,
        opts: &WeightedOptions,
    ) -> Result<()> {
        if adapters.is_empty() || adapters.len() != weights.len() {
            return Err(PeftError::Config(format!(
                "add_weighted_adapter needs one weight per adapter ({} adapters, {} weights)",
                adapters.len(),
                weights.len()
            )));
        }
        let configs = adapters
            .iter()
            .map(|a| self.config(a).cloned())
            .collect::<Result<Vec<_>>>()?;
        let combination = if adapters.len() == 1 {
            Combination::Linear
        } else {
            combination
        };
        if combination.needs_density() {
            match opts.density {
                Some(d) if (0.0..=1.0).contains(&d) => {}
                other => {
                    return Err(PeftError::Config(format!(
                        "combination {combination:?} needs a density in [0, 1], got {other:?}"
                    )))
                }
            }
        }
        let ranks: Vec<usize> = configs
            .iter()
            .map(|c| {
                c.rank_pattern
                    .values()
                    .copied()
                    .chain([c.r])
                    .max()
                    .unwrap_or(c.r)
            })
            .collect();
        let new_rank = if combination == Combination::Cat {
            ranks.iter().sum()
        } else if combination.is_svd() {
            opts.svd_rank
                .unwrap_or_else(|| *ranks.iter().max().expect("non-empty"))
        } else {
            if ranks.iter().any(|&r| r != ranks[0]) {
                return Err(PeftError::Config(format!(
                    "combination {combination:?} needs adapters of one rank, got {ranks:?}"
                )));
            }
            ranks[0]
        };
        if new_rank == 0 {
            return Err(PeftError::Config("svd_rank must be positive".into()));
        }
        let targets = match configs[0].target_modules.clone() {
            Some(TargetModules::List(_)) => {
                let mut all: Vec<String> = Vec::new();
                for c in &configs {
                    match &c.target_modules {
                        Some(TargetModules::List(l)) => all.extend(l.iter().cloned()),
                        _ => return Err(PeftError::Config(
                            "all adapters must give target_modules of one type (list or string)"
                                .into(),
                        )),
                    }
                }
                all.sort();
                all.dedup();
                TargetModules::List(all)
            }
            Some(TargetModules::Pattern(_)) => {
                let mut parts = Vec::new();
                for c in &configs {
                    match &c.target_modules {
                        Some(TargetModules::Pattern(p)) if !TargetModules::Pattern(p.clone()).is_all_linear() => parts.push(format!("({p})")),
                        _ => return Err(PeftError::Config("all adapters must give target_modules of one type (list or string, not all-linear)".into())),
                    }
                }
                TargetModules::Pattern(parts.join("|"))
            }
            None => {
                return Err(PeftError::Config(
                    "source adapter has no target_modules".into(),
                ))
            }
        };
        let mut config = configs[0].clone();
        config.r = new_rank;
        config.lora_alpha = new_rank as f64;
        config.target_modules = Some(targets);
        config.rank_pattern.clear();
        config.alpha_pattern.clear();
        // The combination is a plain LoRA of the weights as they are now; a
        // source's base-splitting init (PiSSA, OLoRA) must not split them
        // again (PEFT's `add_weighted_adapter` copies the init and does).
        config.init_lora_weights = peft_core::config::InitLoraWeights::Bool(true);
        let scaling = config.scaling_for(new_rank, new_rank as f64);
        self.attach(name, config, Init::Placeholder)?;

        let mut masks = match &opts.dare_masks {
            Some(given) => Masks::Given(given.iter()),
            None => Masks::Drawn(SplitMix64(opts.seed)),
        };
        let mut result = Ok(());
        self.model.visit_linears_mut(&mut |_, slot| {
            if result.is_err() || slot.entry::<LoraEntry<B>>(name).is_none() {
                return;
            }
            let sources: Vec<Source> = adapters
                .iter()
                .zip(weights)
                .filter_map(|(a, &w)| {
                    slot.entry::<LoraEntry<B>>(a).map(|e| Source {
                        a: HostTensor::from_tensor(e.a.val()),
                        b: HostTensor::from_tensor(e.b.val()),
                        scaling: e.meta.scaling,
                        weight: w,
                    })
                })
                .collect();
            if sources.is_empty() {
                return; // PEFT leaves such modules at zero.
            }
            if !combination.is_svd()
                && combination != Combination::Cat
                && sources.iter().any(|s| s.a.shape != sources[0].a.shape)
            {
                result = Err(PeftError::Config(format!(
                    "combination {combination:?} needs equal ranks in every module"
                )));
                return;
            }
            result = combine_module(combination, &sources, new_rank, opts, &mut masks)
                .and_then(|(a, b)| set_factors(slot, name, a, b, scaling));
        });
        if let (Ok(()), Masks::Given(left)) = (&result, &masks) {
            if !left.as_slice().is_empty() {
                result = Err(PeftError::Config(format!(
                    "dare_masks: {} more masks than the combination prunes tensors",
                    left.as_slice().len()
                )));
            }
        }
        if result.is_err() {
            self.delete_adapter(name)?;
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_elects_signs_and_averages_agreeing_values() {
        let ts = vec![vec![1.0, -2.0, 0.5], vec![3.0, 1.0, -0.5]];
        // totals: 4 (+), -1 (−), 0 (+, ties go positive)
        let m = disjoint_merge(&ts, &[1.0, 1.0], MajoritySign::Total);
        assert_eq!(m, vec![2.0, -2.0, 0.5]);
        // sign counts: 2 (+), 0 (+: ties go positive), 0 (+)
        let m = disjoint_merge(&ts, &[1.0, 1.0], MajoritySign::Frequency);
        assert_eq!(m, vec![2.0, 1.0, 0.5]);
    }

    #[test]
    fn magnitude_prune_keeps_the_largest() {
        assert_eq!(
            magnitude_prune(&[0.1, -3.0, 2.0, 0.5], 0.5),
            vec![0.0, -3.0, 2.0, 0.0]
        );
        assert_eq!(magnitude_prune(&[1.0, 2.0], 1.0), vec![1.0, 2.0]);
    }

    #[test]
    fn truncated_svd_reconstructs_a_low_rank_matrix() {
        let a = HostTensor {
            shape: vec![3, 1],
            data: vec![1.0, 2.0, -1.0],
        };
        let b = HostTensor {
            shape: vec![1, 4],
            data: vec![0.5, -1.0, 2.0, 3.0],
        };
        let d = host_matmul(&a, &b, 2.0);
        let (a2, b2) = truncated_svd(&d, 2);
        let back = host_matmul(&a2, &b2, 1.0);
        for (x, y) in back.data.iter().zip(&d.data) {
            assert!((x - y).abs() < 1e-5, "{x} vs {y}");
        }
    }

    #[test]
    fn dare_is_reproducible_and_rescales() {
        let t = vec![1.0f32; 10_000];
        let shape = [100, 100];
        let draw = |seed| random_prune(&t, &shape, 0.3, &mut Masks::Drawn(SplitMix64(seed)));
        let (p1, p2) = (draw(7).unwrap(), draw(7).unwrap());
        assert_eq!(p1, p2);
        let kept = p1.iter().filter(|v| **v != 0.0).count() as f64 / 10_000.0;
        assert!((kept - 0.3).abs() < 0.03, "kept {kept}");
        let mean: f32 = p1.iter().sum::<f32>() / 10_000.0;
        assert!((mean - 1.0).abs() < 0.1, "mean {mean}");
    }

    #[test]
    fn given_dare_masks_are_replayed_and_checked() {
        let t = [2.0f32, -1.0, 4.0, 3.0];
        let mask = |data: Vec<f32>, shape: Vec<usize>| HostTensor { shape, data };
        let given = [mask(vec![1.0, 0.0, 0.0, 1.0], vec![2, 2])];
        let mut masks = Masks::Given(given.iter());
        let p = random_prune(&t, &[2, 2], 0.5, &mut masks).unwrap();
        assert_eq!(p, vec![4.0, 0.0, 0.0, 6.0]);
        let err = random_prune(&t, &[2, 2], 0.5, &mut masks).unwrap_err();
        assert!(err.to_string().contains("fewer masks"), "{err}");
        for (bad, why) in [
            (mask(vec![1.0; 4], vec![4, 1]), "shape"),
            (mask(vec![1.0, 0.5, 0.0, 1.0], vec![2, 2]), "only 0 and 1"),
        ] {
            let given = [bad];
            let err = random_prune(&t, &[2, 2], 0.5, &mut Masks::Given(given.iter())).unwrap_err();
            assert!(err.to_string().contains(why), "{err}");
        }
    }
}
