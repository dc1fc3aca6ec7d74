//! The forward pass of a [`LinearSlot`]: the active entries' effects
//! composed, and mixed batches (one adapter per row).

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use crate::routing;
use crate::BASE_ROW;

use super::adapter::{BasePass, SlotAdapter};
use super::LinearSlot;

/// The product of the `Some` vectors, `None` when there is none (PEFT
/// multiplies every active (IA)³ vector of a layer together).
fn product<B: Backend>(scales: impl Iterator<Item = Option<Tensor<B, 1>>>) -> Option<Tensor<B, 1>> {
    scales.flatten().reduce(|acc, s| acc * s)
}

impl<B: Backend> LinearSlot<B> {
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
        crate::fused::linear(x, w, self.base_bias().as_ref())
    }

    /// The frozen bias `[d_out]`, if the layer has one.
    fn base_bias(&self) -> Option<Tensor<B, 1>> {
        self.base.bias.as_ref().map(|b| b.val())
    }

    fn add_bias(y: Tensor<B, 2>, bias: &Option<Tensor<B, 1>>) -> Tensor<B, 2> {
        match bias {
            Some(b) => y + b.clone().unsqueeze_dim(0),
            None => y,
        }
    }

    /// `x: [n, d_in]` where the first dimension is `rows` batch rows of equal length.
    fn forward_2d(&self, x: Tensor<B, 2>, rows: usize) -> Tensor<B, 2> {
        if self.state.disabled || self.entries.is_empty() {
            return self.base_biased(x, &self.base_weight());
        }
        if let Some(names) = routing::row_adapters() {
            return self.forward_mixed(x, rows, &names);
        }
        let active: Vec<&dyn SlotAdapter<B>> = self
            .state
            .active
            .iter()
            .filter_map(|n| self.entry_named(n))
            .map(|e| e.adapter())
            .filter(|e| !e.merged())
            .collect();
        if active.is_empty() {
            return self.base_biased(x, &self.base_weight());
        }
        let scale_in = product(active.iter().map(|e| e.input_scale()));
        let scale_out = product(active.iter().map(|e| e.output_scale()));
        let scale_w = product(active.iter().map(|e| e.weight_scale()));
        // An active copy of the whole layer (`modules_to_save`) computes
        // in place of the frozen weight and bias.
        let (w, bias) = active
            .iter()
            .find_map(|e| e.replacement())
            .unwrap_or_else(|| (self.base_weight(), self.base_bias()));
        // An input scale changes what the base weight sees; additive entries
        // read the unscaled `x`.
        let x_in = match &scale_in {
            Some(l) => x.clone() * l.clone().unsqueeze_dim(0),
            None => x.clone(),
        };
        // So does an input transform (OFT's rotation), in activation order
        // (in reverse where an entry asks for it: BOFT).
        let mut transforms: Vec<_> = active.iter().filter(|e| e.transforms_input()).collect();
        if transforms.iter().any(|e| e.input_transform_reversed()) {
            transforms.reverse();
        }
        let x_in = transforms
            .into_iter()
            .fold(x_in, |x, e| e.transform_input(x));
        // Additive entries alone add to `x·W + b`, computed in one kernel;
        // an output or weight scale, or an entry reading `x·W` (DoRA), needs
        // it apart.
        if scale_out.is_none() && scale_w.is_none() && !active.iter().any(|e| e.needs_base_term()) {
            let mut y = crate::fused::linear(x_in, &w, bias.as_ref());
            let pass = BasePass {
                weight: w,
                base_term: None,
            };
            for e in &active {
                y = e.add_to_output(y, &x, &pass);
            }
            return y;
        }
        let base = x_in.matmul(w.clone());
        let base = match scale_w {
            Some(s) => base * s.unsqueeze_dim(0),
            None => base,
        };
        let base = match &scale_out {
            Some(l) => Self::add_bias(base, &bias) * l.clone().unsqueeze_dim(0),
            None => base,
        };
        let pass = BasePass {
            weight: w,
            base_term: Some(base.clone()),
        };
        let mut y = base;
        for e in &active {
            y = e.add_to_output(y, &x, &pass);
        }
        if scale_out.is_some() {
            y
        } else {
            Self::add_bias(y, &bias)
        }
    }

    /// What each row's adapter gives through `pick`, once per distinct
    /// adapter: `(values, index)`, row `i` taking `values[index[i] - 1]`, or
    /// nothing (index 0) for [`BASE_ROW`], an adapter this slot does not
    /// carry, or one for which `pick` gives `None`.
    fn per_row<T>(
        &self,
        names: &[String],
        pick: impl Fn(&dyn SlotAdapter<B>) -> Option<T>,
    ) -> (Vec<T>, Vec<i64>) {
        let mut values = Vec::new();
        let mut seen: Vec<(&str, usize)> = Vec::new();
        let mut index = Vec::with_capacity(names.len());
        for name in names {
            let slot = match seen.iter().find(|(n, _)| *n == name.as_str()) {
                Some(&(_, s)) => s,
                None => {
                    let value = self
                        .entry_named(name)
                        .filter(|_| name != BASE_ROW)
                        .and_then(|e| pick(e.adapter()));
                    let s = match value {
                        Some(v) => {
                            values.push(v);
                            values.len()
                        }
                        None => 0,
                    };
                    seen.push((name, s));
                    s
                }
            };
            index.push(slot as i64);
        }
        (values, index)
    }

    /// Per-row vectors for a mixed batch, `[rows, 1, width]`: row `i` gets
    /// `pick(names[i]'s entry)`, ones where that is `None`; `None` when no
    /// row has one.
    fn row_vectors(
        &self,
        names: &[String],
        width: usize,
        device: &B::Device,
        pick: impl Fn(&dyn SlotAdapter<B>) -> Option<Tensor<B, 1>>,
    ) -> Option<Tensor<B, 3>> {
        let (values, index) = self.per_row(names, pick);
        if values.is_empty() {
            return None;
        }
        let mut table = vec![Tensor::<B, 1>::ones([width], device)];
        table.extend(values);
        let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(index, [names.len()]), device);
        Some(
            Tensor::stack::<2>(table, 0)
                .select(0, idx)
                .unsqueeze_dim::<3>(1),
        )
    }

    /// Each row of `x` `[n, d_in]` (`rows` batch rows) through its
    /// adapter's input transform, unchanged where it has none: every
    /// distinct transform runs on the whole batch once and each row picks
    /// its own.
    fn transform_rows(&self, x: Tensor<B, 2>, rows: usize, names: &[String]) -> Tensor<B, 2> {
        let (used, index) = self.per_row(names, |e| {
            e.transforms_input().then(|| e.name().to_string())
        });
        if used.is_empty() {
            return x;
        }
        let [n, d_in] = x.dims();
        let width = n / rows * d_in;
        let mut table = vec![x.clone().reshape([rows, width])];
        for name in &used {
            if let Some(e) = self.entry_named(name) {
                table.push(
                    e.adapter()
                        .transform_input(x.clone())
                        .reshape([rows, width]),
                );
            }
        }
        pick_rows(table, &index).reshape([n, d_in])
    }

    /// The rows whose adapter carries a copy of the whole layer
    /// (`modules_to_save`) computed by that copy, `x·W' + b'` from the
    /// unscaled input `x` `[n, d_in]`; the others keep `y` `[n, d_out]`.
    /// A row's adapter has one entry per layer, so a copied row has no
    /// other effect here.
    fn replace_rows(
        &self,
        y: Tensor<B, 2>,
        x: Tensor<B, 2>,
        rows: usize,
        names: &[String],
    ) -> Tensor<B, 2> {
        let (copies, index) = self.per_row(names, |e| e.replacement());
        if copies.is_empty() {
            return y;
        }
        let [n, d_out] = y.dims();
        let width = n / rows * d_out;
        let mut table = vec![y.reshape([rows, width])];
        for (w, b) in copies {
            table.push(crate::fused::linear(x.clone(), &w, b.as_ref()).reshape([rows, width]));
        }
        pick_rows(table, &index).reshape([n, d_out])
    }

    /// Mixed batch: row `i` uses adapter `names[i]` (or none for
    /// [`BASE_ROW`] or an adapter this slot does not carry). On Flex each
    /// row applies its own adapter's low-rank factors in one kernel
    /// ([`crate::fused::add_row_low_rank`]; a 16-row SmolLM2 decode step
    /// over 16 LoRA adapters spent 106 of 229 ms in the composition below).
    /// Elsewhere (and with DoRA's column factors) the low-rank
    /// factors of the `k` adapters the batch uses are set side by side,
    /// `A = [A₁ … A_k]` `[d_in, Σr]` and `B` likewise stacked `[Σr, d_out]`,
    /// and applied with two plain matmuls, each row keeping only its own
    /// adapter's columns of `x·A` (a 0/1 mask) before `·B`: two products
    /// whatever the number of adapters or rows, never one per row. (A
    /// gather of each row's factors into `[rows, d_in, r]` and two batched
    /// matmuls, the BGMV scheme of Punica / S-LoRA, ran as `rows` tiny
    /// products of a decode step: 3.7× one row's step time for 16 rows.)
    /// Input and output scales are gathered per row.
    fn forward_mixed(&self, x: Tensor<B, 2>, rows: usize, names: &[String]) -> Tensor<B, 2> {
        let y = self.forward_mixed_effects(x.clone(), rows, names);
        self.replace_rows(y, x, rows, names)
    }

    /// [`forward_mixed`](Self::forward_mixed) but for copies of the layer.
    fn forward_mixed_effects(
        &self,
        x: Tensor<B, 2>,
        rows: usize,
        names: &[String],
    ) -> Tensor<B, 2> {
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
        let scale_in = self.row_vectors(names, d_in, &device, |e| e.input_scale());
        let scale_out = self.row_vectors(names, d_out, &device, |e| e.output_scale());
        let w = self.base_weight();
        let x_in = match scale_in {
            Some(l) => (x.clone().reshape([rows, t, d_in]) * l).reshape([n, d_in]),
            None => x.clone(),
        };
        let base = self.transform_rows(x_in, rows, names).matmul(w.clone());
        let base = match self.row_vectors(names, d_out, &device, |e| e.weight_scale()) {
            Some(s) => (base.reshape([rows, t, d_out]) * s).reshape([n, d_out]),
            None => base,
        };
        // Each row is one adapter's: an output-scaled row has no low-rank
        // delta and a low-rank row a unit output vector, so `(y + b) ⊙ l`
        // is `(x·W + b) ⊙ l` for the first and `y + b` for the second (a
        // DoRA row's bias is not scaled by its factor, as without mixing).
        let bias = self.base_bias();
        let finish = |y: Tensor<B, 2>| match &scale_out {
            Some(l) => {
                (Self::add_bias(y, &bias).reshape([rows, t, d_out]) * l.clone()).reshape([n, d_out])
            }
            None => Self::add_bias(y, &bias),
        };
        // Distinct factors used in this batch; index 0 is the base (zero delta).
        let (used, index) = self.per_row(names, |e| e.low_rank_rows(&w));
        if used.is_empty() {
            return finish(base);
        }
        let any_factor = used.iter().any(|f| f.column_factor.is_some());
        if !any_factor {
            let pairs: Vec<_> = used.iter().map(|f| (&f.a, &f.b, f.scale as f32)).collect();
            let groups: Vec<usize> = index.iter().map(|&j| j as usize).collect();
            if let Some(y) = crate::fused::add_row_low_rank(&base, &x, &pairs, &groups) {
                return finish(y);
            }
        }
        // Columns `offsets[j]..offsets[j + 1]` of `x·A` are adapter j's.
        let mut offsets = vec![0];
        for f in &used {
            offsets.push(offsets.last().copied().unwrap_or(0) + f.a.dims()[1]);
        }
        let width = offsets[used.len()];
        // Each row keeps its own adapter's columns, times that adapter's scale.
        let scales: Vec<f32> = used.iter().map(|f| f.scale as f32).collect();
        let keep: Vec<f32> = index
            .iter()
            .flat_map(|&j| {
                let (own, s) = match j {
                    0 => (0..0, 0.0),
                    j => (
                        offsets[j as usize - 1]..offsets[j as usize],
                        scales[j as usize - 1],
                    ),
                };
                (0..width).map(move |c| if own.contains(&c) { s } else { 0.0 })
            })
            .collect();
        let keep = Tensor::<B, 3>::from_data(TensorData::new(keep, [rows, 1, width]), &device);
        let mut g_all = vec![Tensor::<B, 1>::ones([d_out], &device)];
        let (mut a_all, mut b_all) = (Vec::new(), Vec::new());
        for f in used {
            a_all.push(f.a);
            b_all.push(f.b);
            if any_factor {
                g_all.push(
                    f.column_factor
                        .unwrap_or_else(|| Tensor::ones([d_out], &device)),
                );
            }
        }
        let h = x.matmul(Tensor::cat(a_all, 1)).reshape([rows, t, width]) * keep;
        let delta = h
            .reshape([n, width])
            .matmul(Tensor::cat(b_all, 0))
            .reshape([rows, t, d_out]);
        let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(index, [rows]), &device);
        let base3 = base.reshape([rows, t, d_out]);
        let y = if any_factor {
            let g = Tensor::stack::<2>(g_all, 0)
                .select(0, idx)
                .unsqueeze_dim::<3>(1);
            g * (base3 + delta)
        } else {
            base3 + delta
        };
        finish(y.reshape([n, d_out]))
    }
}

/// Row `i` of `table[index[i]]`: `table` holds candidates `[rows, width]`
/// for every row, `index` one choice per row.
fn pick_rows<B: Backend>(table: Vec<Tensor<B, 2>>, index: &[i64]) -> Tensor<B, 2> {
    let [rows, width] = table[0].dims();
    let device = table[0].device();
    let candidates = table.len();
    let flat: Vec<i64> = index
        .iter()
        .enumerate()
        .map(|(row, &k)| k * rows as i64 + row as i64)
        .collect();
    let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(flat, [rows]), &device);
    Tensor::stack::<3>(table, 0)
        .reshape([candidates * rows, width])
        .select(0, idx)
}
