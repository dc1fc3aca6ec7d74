//! [`LinearSlot`]: the adaptable linear layer.
//!
//! A model holds a `LinearSlot` wherever it would hold a `burn::nn::Linear`
//! that PEFT may adapt. The slot owns the frozen base layer and the named
//! LoRA entries attached to it, and computes
//!
//! ```text
//! y = x·W + b + Σ_active  s·(dropout(x)·A)·B          (LoRA, rsLoRA)
//! y = x·W + b + (g−1)·(x·W) + g·s·(dropout(x)·A)·B    (DoRA, g = m / ‖W + s·A·B‖)
//! ```
//!
//! on the activation side: `ΔW = A·B` is never formed in the forward pass
//! (only DoRA's detached column norm needs it). Merged entries are skipped:
//! with every active adapter merged, or none attached, the slot runs exactly
//! the base computation.
//!
//! Layout: Burn's `[d_in, d_out]` everywhere; `A: [d_in, r]`, `B: [r, d_out]`.
//! PEFT's `[out, in]` exists only in `io` and the method crates' file code.

use std::sync::Arc;

use burn::module::{Module, Param};
use burn::nn::{Dropout, Linear, LinearConfig};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use crate::error::{PeftError, Result};
use crate::quant::QuantizedMatrix;
use crate::routing;
use crate::BASE_ROW;

/// Everything about a LoRA entry that is not a parameter.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraMeta {
    /// The adapter's name (`default` unless given).
    pub name: String,
    /// Rank `r`.
    pub rank: usize,
    /// `lora_alpha` for this module (after `alpha_pattern`).
    pub alpha: f64,
    /// The factor applied to `x·A·B`: `α/r`, or `α/√r` with rsLoRA.
    pub scaling: f64,
    /// Dropout probability on the input of `A` (training only).
    pub dropout: f64,
    /// Whether `ΔW` is currently folded into the base weight.
    pub merged: bool,
    /// DoRA only: the column norms `‖W + ΔW‖` used at merge time, kept so that
    /// unmerge divides by exactly the same numbers.
    pub dora_merge_norm: Option<Vec<f32>>,
}

/// One named LoRA adapter on one linear layer.
#[derive(Module, Debug)]
pub struct LoraEntry<B: Backend> {
    /// Down-projection `A`, shape `[d_in, r]`.
    pub a: Param<Tensor<B, 2>>,
    /// Up-projection `B`, shape `[r, d_out]`.
    pub b: Param<Tensor<B, 2>>,
    /// DoRA magnitude `m`, shape `[d_out]`; `None` for plain LoRA.
    pub magnitude: Option<Param<Tensor<B, 1>>>,
    /// Name, rank, scaling and merge state.
    #[module(skip)]
    pub meta: LoraMeta,
}

impl<B: Backend> LoraEntry<B> {
    /// `s·A·B`, shape `[d_in, d_out]` (merging and DoRA's norm only).
    pub fn delta_weight(&self) -> Tensor<B, 2> {
        self.a.val().matmul(self.b.val()) * self.meta.scaling
    }

    /// Number of parameters in this entry.
    pub fn num_params(&self) -> usize {
        Module::num_params(self)
    }

    /// DoRA's per-column factor `g = m / ‖W + s·A·B‖`, shape `[d_out]`,
    /// detached from the graph through the norm as PEFT does.
    fn dora_factor(&self, weight: Tensor<B, 2>, magnitude: Tensor<B, 1>) -> Tensor<B, 1> {
        let norm = column_norm(weight + self.delta_weight().detach()).detach();
        magnitude / norm
    }
}

/// The L2 norm of each column of `[d_in, d_out]`: `[d_out]`.
pub fn column_norm<B: Backend>(w: Tensor<B, 2>) -> Tensor<B, 1> {
    w.powf_scalar(2.0).sum_dim(0).sqrt().squeeze_dim(0)
}

/// Everything about an (IA)³ entry that is not a parameter.
#[derive(Debug, Clone, PartialEq)]
pub struct Ia3Meta {
    /// The adapter's name.
    pub name: String,
    /// Feed-forward layers scale their *input* (`[d_in]` vector); the others
    /// scale their output, bias included (`[d_out]` vector), as in PEFT.
    pub feedforward: bool,
    /// Whether the vector is currently folded into the base weight.
    pub merged: bool,
}

/// One named (IA)³ adapter on one linear layer: a learned scaling vector.
#[derive(Module, Debug)]
pub struct Ia3Entry<B: Backend> {
    /// The vector `l`: shape `[d_in]` for feed-forward layers, else `[d_out]`.
    pub scale: Param<Tensor<B, 1>>,
    /// Name, placement and merge state.
    #[module(skip)]
    pub meta: Ia3Meta,
}

/// PEFT divides by `l + 1e-8` to unmerge (IA)³: the same guard, so that our
/// unmerged weights equal PEFT's.
const IA3_UNMERGE_EPS: f64 = 1e-8;

/// Slot-level state that is not a parameter.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SlotState {
    /// Names of the active adapters, in the order their deltas are added.
    pub active: Vec<String>,
    /// With `true`, the forward pass is the base layer alone (unmerged
    /// adapters are bypassed).
    pub disabled: bool,
    /// Names of the merged adapters, in the order they were merged: DoRA's
    /// and (IA)³'s merges scale the weight, so they do not commute with the
    /// others, and unmerging must go back in reverse order (PEFT keeps the
    /// same list per layer, `merged_adapters`).
    pub merged: Vec<String>,
}

/// Configuration of a [`LinearSlot`].
#[derive(Debug, Clone)]
pub struct LinearSlotConfig {
    /// Input features.
    pub d_input: usize,
    /// Output features.
    pub d_output: usize,
    /// Whether the base layer has a bias.
    pub bias: bool,
}

impl LinearSlotConfig {
    /// A config for a `d_input → d_output` layer with bias.
    pub fn new(d_input: usize, d_output: usize) -> Self {
        LinearSlotConfig {
            d_input,
            d_output,
            bias: true,
        }
    }

    /// Sets whether the base layer has a bias.
    pub fn with_bias(mut self, bias: bool) -> Self {
        self.bias = bias;
        self
    }

    /// A slot with a randomly initialised, frozen base layer and no adapter.
    pub fn init<B: Backend>(&self, device: &B::Device) -> LinearSlot<B> {
        LinearSlot::from_linear(
            LinearConfig::new(self.d_input, self.d_output)
                .with_bias(self.bias)
                .init(device),
        )
    }
}

/// An adaptable linear layer: a frozen base `Linear` plus named LoRA entries.
#[derive(Module, Debug)]
pub struct LinearSlot<B: Backend> {
    /// The base layer: weight `[d_in, d_out]`, bias `[d_out]`. Frozen.
    /// With a [`quantized`](Self::quantized) base, `weight` is an empty
    /// `[0, 0]` tensor that only carries the device; read the weight with
    /// [`base_weight`](Self::base_weight).
    pub base: Linear<B>,
    /// The frozen base weight kept quantized (QLoRA), `[out, in]` as PyTorch
    /// stores it; dequantized in every forward pass, never held in `f32`
    /// between passes. Shared, not copied, by clones of the model.
    #[module(skip)]
    pub quantized: Option<Arc<QuantizedMatrix>>,
    /// Attached LoRA adapters, in the order they were added.
    pub lora: Vec<LoraEntry<B>>,
    /// Attached (IA)³ adapters, in the order they were added.
    pub ia3: Vec<Ia3Entry<B>>,
    /// Active adapters and the disable switch.
    #[module(skip)]
    pub state: SlotState,
}

fn frozen<B: Backend, const D: usize>(p: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
    p.set_require_grad(false)
}

impl<B: Backend> LinearSlot<B> {
    /// Wraps a base layer, freezing it.
    pub fn from_linear(linear: Linear<B>) -> Self {
        LinearSlot {
            base: Linear {
                weight: frozen(linear.weight),
                bias: linear.bias.map(frozen),
            },
            quantized: None,
            lora: Vec::new(),
            ia3: Vec::new(),
            state: SlotState::default(),
        }
    }

    /// A slot whose frozen base weight stays quantized: `weight` is
    /// `[out = d_output, in = d_input]`, `bias` is `[d_output]`.
    pub fn from_quantized(
        weight: Arc<QuantizedMatrix>,
        bias: Option<Tensor<B, 1>>,
        device: &B::Device,
    ) -> Result<Self> {
        if let Some(b) = &bias {
            let found = b.dims()[0];
            if found != weight.rows {
                return Err(PeftError::Shape {
                    name: "bias".into(),
                    expected: vec![weight.rows],
                    found: vec![found],
                });
            }
        }
        let empty = Tensor::<B, 2>::from_data(TensorData::new(Vec::<f32>::new(), [0, 0]), device);
        let mut slot = Self::from_weights(empty, bias);
        slot.quantized = Some(weight);
        Ok(slot)
    }

    /// The device of the base layer.
    pub fn device(&self) -> B::Device {
        self.base.weight.device()
    }

    /// Whether the base weight is kept quantized.
    pub fn is_quantized(&self) -> bool {
        self.quantized.is_some()
    }

    /// The base weight `[d_in, d_out]`, dequantized to `f32` when kept
    /// quantized (a fresh tensor each call, not tracked by autodiff).
    pub fn base_weight(&self) -> Tensor<B, 2> {
        match &self.quantized {
            None => self.base.weight.val(),
            Some(q) => Tensor::<B, 2>::from_data(
                TensorData::new(q.dequantize(), [q.rows, q.cols]),
                &self.device(),
            )
            .transpose(),
        }
    }

    /// Replaces a quantized base weight by its `f32` dequantization (a
    /// no-op for a dense base). Merging does this first: a merged weight is
    /// `f32`, never re-quantized.
    pub fn dequantize_base(&mut self) {
        if self.quantized.is_some() {
            let w = self.base_weight();
            self.quantized = None;
            self.set_base_weight(w);
        }
    }

    /// Replaces the dense base weight by its NF4 quantization (QLoRA's
    /// 4-bit NormalFloat with double-quantized scales). A no-op if already
    /// quantized; refused while an adapter is merged into the weight, since
    /// unmerging would then subtract from a rounded weight.
    pub fn quantize_nf4(&mut self, path: &str) -> Result<()> {
        if self.is_quantized() {
            return Ok(());
        }
        if self.any_merged() {
            return Err(PeftError::State(format!(
                "{path}: unmerge its adapters before quantizing the base weight"
            )));
        }
        let (d_in, d_out) = (self.d_input(), self.d_output());
        let values = self
            .base
            .weight
            .val()
            .transpose()
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .map_err(|e| PeftError::State(format!("{path}: weight not readable: {e:?}")))?;
        let q = QuantizedMatrix::nf4(&values, d_out, d_in)
            .map_err(|e| PeftError::Config(format!("{path}: {e}")))?;
        self.set_quantized_base(Arc::new(q))
    }

    /// Replaces the base weight by `weight`, kept quantized (`[out, in]`,
    /// the shape of the current base). Adapters stay as they are.
    pub fn set_quantized_base(&mut self, weight: Arc<QuantizedMatrix>) -> Result<()> {
        let (d_in, d_out) = (self.d_input(), self.d_output());
        if (weight.rows, weight.cols) != (d_out, d_in) {
            return Err(PeftError::Shape {
                name: "quantized base weight".into(),
                expected: vec![d_out, d_in],
                found: vec![weight.rows, weight.cols],
            });
        }
        let device = self.device();
        let empty = Tensor::<B, 2>::from_data(TensorData::new(Vec::<f32>::new(), [0, 0]), &device);
        self.set_base_weight(empty);
        self.quantized = Some(weight);
        Ok(())
    }

    /// Values of the base weight held quantized (0 for a dense base): they
    /// count as parameters although no tensor holds them.
    pub fn quantized_params(&self) -> usize {
        self.quantized.as_ref().map_or(0, |q| q.len())
    }

    /// Builds a slot from a base weight `[d_in, d_out]` and bias `[d_out]`.
    pub fn from_weights(weight: Tensor<B, 2>, bias: Option<Tensor<B, 1>>) -> Self {
        Self::from_linear(Linear {
            weight: Param::from_tensor(weight),
            bias: bias.map(Param::from_tensor),
        })
    }

    /// Input features.
    pub fn d_input(&self) -> usize {
        match &self.quantized {
            Some(q) => q.cols,
            None => self.base.weight.shape().dims::<2>()[0],
        }
    }

    /// Output features.
    pub fn d_output(&self) -> usize {
        match &self.quantized {
            Some(q) => q.rows,
            None => self.base.weight.shape().dims::<2>()[1],
        }
    }

    /// The LoRA entry named `name`, if attached here.
    pub fn lora_entry(&self, name: &str) -> Option<&LoraEntry<B>> {
        self.lora.iter().find(|e| e.meta.name == name)
    }

    /// Mutable access to the LoRA entry named `name`.
    pub fn lora_entry_mut(&mut self, name: &str) -> Option<&mut LoraEntry<B>> {
        self.lora.iter_mut().find(|e| e.meta.name == name)
    }

    /// Attaches a LoRA entry. Its shapes must fit the base layer.
    pub fn add_lora(&mut self, entry: LoraEntry<B>, path: &str) -> Result<()> {
        if self.has_adapter(&entry.meta.name) {
            return Err(PeftError::DuplicateAdapter(entry.meta.name.clone()));
        }
        let [d_in, d_out] = [self.d_input(), self.d_output()];
        let r = entry.meta.rank;
        let a = entry.a.shape().dims::<2>();
        let b = entry.b.shape().dims::<2>();
        if a != [d_in, r] {
            return Err(PeftError::Shape {
                name: format!("{path}.lora_A"),
                expected: vec![d_in, r],
                found: a.to_vec(),
            });
        }
        if b != [r, d_out] {
            return Err(PeftError::Shape {
                name: format!("{path}.lora_B"),
                expected: vec![r, d_out],
                found: b.to_vec(),
            });
        }
        if let Some(m) = &entry.magnitude {
            let m = m.shape().dims::<1>();
            if m != [d_out] {
                return Err(PeftError::Shape {
                    name: format!("{path}.lora_magnitude_vector"),
                    expected: vec![d_out],
                    found: m.to_vec(),
                });
            }
        }
        self.lora.push(entry);
        Ok(())
    }

    /// Removes the LoRA entry `name` (unmerging it first if merged).
    pub fn remove_lora(&mut self, name: &str) -> Option<LoraEntry<B>> {
        if self.lora_entry(name).is_some_and(|e| e.meta.merged) {
            self.unmerge(name);
        }
        let pos = self.lora.iter().position(|e| e.meta.name == name)?;
        self.state.active.retain(|n| n != name);
        Some(self.lora.remove(pos))
    }

    /// The forward pass, for inputs `[..., d_in]`.
    ///
    /// Inputs of rank > 2 are flattened to `[n, d_in]`: Burn's matmul on 2-D
    /// data is markedly faster than on 3-D (≈1.5× measured on CPU).
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dims = x.dims();
        let d_in = dims[D - 1];
        let rows = if D >= 2 { dims[0] } else { 1 };
        let n = dims[..D - 1].iter().product::<usize>();
        let y = self.forward_2d(x.reshape([n, d_in]), rows);
        let mut out = dims;
        out[D - 1] = self.d_output();
        y.reshape(out)
    }

    /// The frozen layer alone, `x·W + b`: one kernel on Flex
    /// ([`crate::fused::linear`]).
    fn base_biased(&self, x: Tensor<B, 2>, w: &Tensor<B, 2>) -> Tensor<B, 2> {
        crate::fused::linear(x, w, self.base.bias.as_ref().map(|b| b.val()).as_ref())
    }

    /// `x·W` with `W` already at hand (dequantized once per pass).
    fn times(x: Tensor<B, 2>, w: &Tensor<B, 2>) -> Tensor<B, 2> {
        x.matmul(w.clone())
    }

    fn add_bias(&self, y: Tensor<B, 2>) -> Tensor<B, 2> {
        match &self.base.bias {
            Some(b) => y + b.val().unsqueeze_dim(0),
            None => y,
        }
    }

    /// The product of the active, unmerged (IA)³ vectors named in `names`:
    /// `(input scale [d_in], output scale [d_out])`, `None` where no entry
    /// applies. PEFT multiplies every active vector of a layer together.
    fn ia3_scales<'a>(
        &self,
        names: impl IntoIterator<Item = &'a String>,
    ) -> (Option<Tensor<B, 1>>, Option<Tensor<B, 1>>) {
        let (mut input, mut output): (Option<Tensor<B, 1>>, Option<Tensor<B, 1>>) = (None, None);
        for e in names.into_iter().filter_map(|n| self.ia3_entry(n)) {
            if e.meta.merged {
                continue;
            }
            let target = if e.meta.feedforward {
                &mut input
            } else {
                &mut output
            };
            *target = Some(match target.take() {
                Some(s) => s * e.scale.val(),
                None => e.scale.val(),
            });
        }
        (input, output)
    }

    /// `(x·A · scaling)·B` on the (dropped-out) input. The scale multiplies
    /// the rank-r intermediate `[n, r]`, not the `[n, d_out]` product: one
    /// pass over the activation fewer.
    fn lora_product(entry: &LoraEntry<B>, xd: Tensor<B, 2>) -> Tensor<B, 2> {
        (xd.matmul(entry.a.val()) * entry.meta.scaling).matmul(entry.b.val())
    }

    /// A plain LoRA entry's delta on `x`, dropout included.
    fn lora_delta(entry: &LoraEntry<B>, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let dropout = Dropout {
            prob: entry.meta.dropout,
        };
        Self::lora_product(entry, dropout.forward(x))
    }

    /// `x: [n, d_in]` where the first dimension is `rows` batch rows of equal length.
    fn forward_2d(&self, x: Tensor<B, 2>, rows: usize) -> Tensor<B, 2> {
        let unmerged_active = || {
            self.state
                .active
                .iter()
                .filter_map(|n| self.lora_entry(n))
                .filter(|e| !e.meta.merged)
        };
        if self.state.disabled || (self.lora.is_empty() && self.ia3.is_empty()) {
            return self.base_biased(x, &self.base_weight());
        }
        if let Some(names) = routing::row_adapters() {
            return self.forward_mixed(x, rows, &names);
        }
        let (ia3_in, ia3_out) = self.ia3_scales(&self.state.active);
        if unmerged_active().next().is_none() && ia3_in.is_none() && ia3_out.is_none() {
            return self.base_biased(x, &self.base_weight());
        }
        let w = self.base_weight();
        // (IA)³ on the input side scales what the base weight sees; LoRA
        // reads the unscaled `x`.
        let x_in = match &ia3_in {
            Some(l) => x.clone() * l.clone().unsqueeze_dim(0),
            None => x.clone(),
        };
        // Plain LoRA adds its deltas to `x·W + b`, computed in one kernel;
        // DoRA and an output-side (IA)³ vector need `x·W` without the bias.
        if ia3_out.is_none() && unmerged_active().all(|e| e.magnitude.is_none()) {
            let mut y = self.base_biased(x_in, &w);
            for entry in unmerged_active() {
                y = y + Self::lora_delta(entry, x.clone());
            }
            return y;
        }
        // (IA)³: `(x ⊙ l_in)·W + b`, or `(x·W + b) ⊙ l_out`.
        let base = Self::times(x_in, &w);
        let base = match &ia3_out {
            Some(l) => self.add_bias(base) * l.clone().unsqueeze_dim(0),
            None => base,
        };
        let mut y = base.clone();
        for entry in unmerged_active() {
            let dropout = Dropout {
                prob: entry.meta.dropout,
            };
            let xd = dropout.forward(x.clone());
            let lora = Self::lora_product(entry, xd.clone());
            match &entry.magnitude {
                None => y = y + lora,
                Some(m) => {
                    let g = entry.dora_factor(w.clone(), m.val()).unsqueeze_dim(0);
                    // PEFT: with dropout active, DoRA's base term is recomputed
                    // on the dropped-out input.
                    let base_term = if entry.meta.dropout > 0.0 && B::ad_enabled(&xd.device()) {
                        Self::times(xd, &w)
                    } else {
                        base.clone()
                    };
                    y = y + (g.clone() - 1.0) * base_term + g * lora;
                }
            }
        }
        if ia3_out.is_some() {
            y
        } else {
            self.add_bias(y)
        }
    }

    /// Per-row (IA)³ vectors for a mixed batch: `(input [rows, 1, d_in],
    /// output [rows, 1, d_out])`, ones for rows whose adapter has no (IA)³
    /// entry here; `None` when no row has one.
    fn ia3_rows(
        &self,
        names: &[String],
        device: &B::Device,
    ) -> (Option<Tensor<B, 3>>, Option<Tensor<B, 3>>) {
        let rows = names.len();
        let gather = |feedforward: bool, width: usize| {
            let mut table = vec![Tensor::<B, 1>::ones([width], device)];
            let mut index = Vec::with_capacity(rows);
            let mut seen: Vec<&str> = Vec::new();
            for name in names {
                let entry = self
                    .ia3_entry(name)
                    .filter(|e| e.meta.feedforward == feedforward && name != BASE_ROW);
                let slot = match entry {
                    None => 0,
                    Some(e) => match seen.iter().position(|s| *s == name.as_str()) {
                        Some(p) => p + 1,
                        None => {
                            seen.push(name);
                            table.push(e.scale.val());
                            seen.len()
                        }
                    },
                };
                index.push(slot as i64);
            }
            if seen.is_empty() {
                return None;
            }
            let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(index, [rows]), device);
            Some(
                Tensor::stack::<2>(table, 0)
                    .select(0, idx)
                    .unsqueeze_dim::<3>(1),
            )
        };
        (gather(true, self.d_input()), gather(false, self.d_output()))
    }

    /// Mixed batch: row `i` uses adapter `names[i]` (or none for
    /// [`BASE_ROW`] or an adapter this slot does not carry). The per-row
    /// factors are gathered into `[rows, d_in, r_max]` / `[rows, r_max, d_out]`
    /// and applied with two batched matmuls, whatever the number of adapters
    /// (the BGMV scheme of Punica / S-LoRA), never one matmul per row; (IA)³
    /// vectors are gathered per row the same way.
    fn forward_mixed(&self, x: Tensor<B, 2>, rows: usize, names: &[String]) -> Tensor<B, 2> {
        let device = x.device();
        let [n, d_in] = x.dims();
        let d_out = self.d_output();
        assert_eq!(
            names.len(),
            rows,
            "mixed batch: {} adapter names for {rows} rows (validated by the caller)",
            names.len()
        );
        let t = n / rows;
        let (ia3_in, ia3_out) = self.ia3_rows(names, &device);
        let w = self.base_weight();
        let base = match ia3_in {
            Some(l) => Self::times(
                (x.clone().reshape([rows, t, d_in]) * l).reshape([n, d_in]),
                &w,
            ),
            None => Self::times(x.clone(), &w),
        };
        // Each row is one adapter's: an output-side (IA)³ row has no LoRA
        // delta and a LoRA/DoRA row a unit output vector, so `(y + b) ⊙ l`
        // is `(x·W + b) ⊙ l` for the first and `y + b` for the second (a
        // DoRA row's bias is not scaled by its factor, as without mixing).
        let finish = |y: Tensor<B, 2>| match &ia3_out {
            Some(l) => (self.add_bias(y).reshape([rows, t, d_out]) * l.clone()).reshape([n, d_out]),
            None => self.add_bias(y),
        };
        // Distinct adapters used in this batch; index 0 is the base (zero delta).
        let mut used: Vec<&LoraEntry<B>> = Vec::new();
        let mut index = Vec::with_capacity(rows);
        for name in names {
            let slot = match self.lora_entry(name) {
                Some(e) if name != BASE_ROW => match used.iter().position(|u| u.meta.name == *name)
                {
                    Some(p) => p + 1,
                    None => {
                        used.push(e);
                        used.len()
                    }
                },
                _ => 0,
            };
            index.push(slot as i64);
        }
        if used.is_empty() {
            return finish(base);
        }
        let r_max = used.iter().map(|e| e.meta.rank).max().unwrap_or(1);
        let mut a_all = vec![Tensor::<B, 2>::zeros([d_in, r_max], &device)];
        let mut b_all = vec![Tensor::<B, 2>::zeros([r_max, d_out], &device)];
        let mut g_all = vec![Tensor::<B, 1>::ones([d_out], &device)];
        let any_dora = used.iter().any(|e| e.magnitude.is_some());
        for e in &used {
            let r = e.meta.rank;
            let (mut a, mut b) = (e.a.val(), e.b.val() * e.meta.scaling);
            if r < r_max {
                a = Tensor::cat(vec![a, Tensor::zeros([d_in, r_max - r], &device)], 1);
                b = Tensor::cat(vec![b, Tensor::zeros([r_max - r, d_out], &device)], 0);
            }
            a_all.push(a);
            b_all.push(b);
            if any_dora {
                g_all.push(match &e.magnitude {
                    Some(m) => e.dora_factor(w.clone(), m.val()),
                    None => Tensor::ones([d_out], &device),
                });
            }
        }
        let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(index, [rows]), &device);
        let a_rows = Tensor::stack::<3>(a_all, 0).select(0, idx.clone());
        let b_rows = Tensor::stack::<3>(b_all, 0).select(0, idx.clone());
        let x3 = x.reshape([rows, t, d_in]);
        let lora = x3.matmul(a_rows).matmul(b_rows); // [rows, t, d_out]
        let base3 = base.reshape([rows, t, d_out]);
        let y = if any_dora {
            let g = Tensor::stack::<2>(g_all, 0)
                .select(0, idx)
                .unsqueeze_dim::<3>(1);
            g * (base3 + lora)
        } else {
            base3 + lora
        };
        finish(y.reshape([n, d_out]))
    }

    /// The (IA)³ entry named `name`, if attached here.
    pub fn ia3_entry(&self, name: &str) -> Option<&Ia3Entry<B>> {
        self.ia3.iter().find(|e| e.meta.name == name)
    }

    /// Mutable access to the (IA)³ entry named `name`.
    pub fn ia3_entry_mut(&mut self, name: &str) -> Option<&mut Ia3Entry<B>> {
        self.ia3.iter_mut().find(|e| e.meta.name == name)
    }

    /// Whether any entry of any kind is merged into the base weight.
    pub fn any_merged(&self) -> bool {
        self.lora.iter().any(|e| e.meta.merged) || self.ia3.iter().any(|e| e.meta.merged)
    }

    /// Whether an adapter entry of any kind named `name` is attached here.
    pub fn has_adapter(&self, name: &str) -> bool {
        self.lora_entry(name).is_some() || self.ia3_entry(name).is_some()
    }

    /// Attaches an (IA)³ entry. Its vector must fit the base layer.
    pub fn add_ia3(&mut self, entry: Ia3Entry<B>, path: &str) -> Result<()> {
        if self.has_adapter(&entry.meta.name) {
            return Err(PeftError::DuplicateAdapter(entry.meta.name.clone()));
        }
        let want = if entry.meta.feedforward {
            self.d_input()
        } else {
            self.d_output()
        };
        let found = entry.scale.shape().dims::<1>()[0];
        if found != want {
            return Err(PeftError::Shape {
                name: format!("{path}.ia3_l"),
                expected: vec![want],
                found: vec![found],
            });
        }
        self.ia3.push(entry);
        Ok(())
    }

    /// Removes the (IA)³ entry `name` (unmerging it first if merged).
    pub fn remove_ia3(&mut self, name: &str) -> Option<Ia3Entry<B>> {
        if self.ia3_entry(name).is_some_and(|e| e.meta.merged) {
            self.unmerge(name);
        }
        let pos = self.ia3.iter().position(|e| e.meta.name == name)?;
        self.state.active.retain(|n| n != name);
        Some(self.ia3.remove(pos))
    }

    /// Folds (IA)³ entry `name` into the base weight (and, for output
    /// scaling, the bias), as PEFT's `IA3Layer.merge`.
    fn merge_ia3(&mut self, name: &str) -> bool {
        let Some(entry) = self.ia3.iter_mut().find(|e| e.meta.name == name) else {
            return false;
        };
        if entry.meta.merged {
            return false;
        }
        entry.meta.merged = true;
        let (l, feedforward) = (entry.scale.val().detach(), entry.meta.feedforward);
        self.dequantize_base();
        self.scale_base(l, feedforward);
        true
    }

    /// Divides (IA)³ entry `name` back out (by `l + 1e-8`, as PEFT).
    fn unmerge_ia3(&mut self, name: &str) -> bool {
        let Some(entry) = self.ia3.iter_mut().find(|e| e.meta.name == name) else {
            return false;
        };
        if !entry.meta.merged {
            return false;
        }
        entry.meta.merged = false;
        let (l, feedforward) = (entry.scale.val().detach(), entry.meta.feedforward);
        self.scale_base((l + IA3_UNMERGE_EPS).recip(), feedforward);
        true
    }

    /// Multiplies the base weight's rows (`feedforward`: input features) or
    /// columns and bias (output features) by `l`.
    fn scale_base(&mut self, l: Tensor<B, 1>, feedforward: bool) {
        let w = self.base_weight();
        if feedforward {
            self.set_base_weight(w * l.unsqueeze_dim(1));
        } else {
            self.set_base_weight(w * l.clone().unsqueeze_dim(0));
            if let Some(b) = self.base.bias.take() {
                let scaled = (b.val() * l).detach();
                self.base.bias = Some(b.map(|_| scaled).set_require_grad(false));
            }
        }
    }

    /// Folds adapter `name` (of any kind) into the base weight. Returns
    /// `false` if it is not attached here or already merged.
    pub fn merge(&mut self, name: &str) -> bool {
        let merged = self.merge_entry(name);
        if merged {
            self.state.merged.push(name.to_string());
        }
        merged
    }

    /// Removes adapter `name` (of any kind) from the base weight, taking out
    /// first, newest first, whatever was merged after it, and merging that
    /// back afterwards. Returns `false` if it is not attached here or not
    /// merged.
    pub fn unmerge(&mut self, name: &str) -> bool {
        let Some(pos) = self.state.merged.iter().position(|n| n == name) else {
            // Merged outside this slot's bookkeeping (or not at all).
            return self.unmerge_entry(name);
        };
        let later = self.state.merged.split_off(pos + 1);
        for n in later.iter().rev() {
            self.unmerge_entry(n);
        }
        self.state.merged.pop();
        let unmerged = self.unmerge_entry(name);
        for n in later {
            self.merge(&n);
        }
        unmerged
    }

    /// Unmerges the merged adapters among `names`, newest merge first.
    pub fn unmerge_newest_first(&mut self, names: &[String]) {
        let order: Vec<String> = self.state.merged.iter().rev().cloned().collect();
        for n in order.iter().chain(names).filter(|n| names.contains(n)) {
            self.unmerge(n);
        }
    }

    fn merge_entry(&mut self, name: &str) -> bool {
        if self.ia3_entry(name).is_some() {
            return self.merge_ia3(name);
        }
        if self.lora_entry(name).is_none_or(|e| e.meta.merged) {
            return false;
        }
        self.dequantize_base();
        let weight = self.base_weight();
        let Some(entry) = self.lora.iter_mut().find(|e| e.meta.name == name) else {
            return false;
        };
        if entry.meta.merged {
            return false;
        }
        let delta = entry.delta_weight().detach();
        let new_weight = match &entry.magnitude {
            None => weight + delta,
            Some(m) => {
                let combined = weight + delta;
                let norm = column_norm(combined.clone()).detach();
                entry.meta.dora_merge_norm =
                    Some(norm.to_data().to_vec::<f32>().unwrap_or_default());
                let g = m.val().detach() / norm;
                combined * g.unsqueeze_dim(0)
            }
        };
        entry.meta.merged = true;
        self.set_base_weight(new_weight);
        true
    }

    fn unmerge_entry(&mut self, name: &str) -> bool {
        if self.ia3_entry(name).is_some() {
            return self.unmerge_ia3(name);
        }
        let weight = self.base_weight();
        let device = weight.device();
        let Some(entry) = self.lora.iter_mut().find(|e| e.meta.name == name) else {
            return false;
        };
        if !entry.meta.merged {
            return false;
        }
        let delta = entry.delta_weight().detach();
        let new_weight = match &entry.magnitude {
            None => weight - delta,
            Some(m) => {
                let norm = entry.meta.dora_merge_norm.take().unwrap_or_default();
                let d = norm.len();
                let norm = Tensor::<B, 1>::from_data(TensorData::new(norm, [d]), &device);
                let g = m.val().detach() / norm;
                weight / g.unsqueeze_dim(0) - delta
            }
        };
        entry.meta.merged = false;
        self.set_base_weight(new_weight);
        true
    }

    fn set_base_weight(&mut self, w: Tensor<B, 2>) {
        let w = w.detach();
        self.base.weight = self.base.weight.clone().map(|_| w).set_require_grad(false);
    }

    /// Makes `names` (those attached here) the active adapters, in that
    /// order. Active entries train; the others are frozen, as in PEFT.
    pub fn set_active(&mut self, names: &[String]) {
        let active: Vec<String> = names
            .iter()
            .filter(|n| self.has_adapter(n))
            .cloned()
            .collect();
        for e in &mut self.lora {
            let train = active.contains(&e.meta.name);
            e.a = e.a.clone().set_require_grad(train);
            e.b = e.b.clone().set_require_grad(train);
            e.magnitude = e.magnitude.take().map(|m| m.set_require_grad(train));
        }
        for e in &mut self.ia3 {
            let train = active.contains(&e.meta.name);
            e.scale = e.scale.clone().set_require_grad(train);
        }
        self.state.active = active;
    }

    /// Parameters of entries that train: active and not merged.
    pub fn trainable_params(&self) -> usize {
        let trains = |name: &String, merged: bool| !merged && self.state.active.contains(name);
        let lora: usize = self
            .lora
            .iter()
            .filter(|e| trains(&e.meta.name, e.meta.merged))
            .map(LoraEntry::num_params)
            .sum();
        let ia3: usize = self
            .ia3
            .iter()
            .filter(|e| trains(&e.meta.name, e.meta.merged))
            .map(|e| e.scale.num_params())
            .sum();
        lora + ia3
    }
}
