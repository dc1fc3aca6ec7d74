//! Bottleneck adapters as AdapterHub (`adapters` 1.3) defines them, and its
//! compositions.
//!
//! An adapter is `up(act(down(x))) · scaling` plus a residual, placed at a
//! model's residual joins ([`InsertionPoint`]) through
//! [`ModelInput::hook`](peft_core::ModelInput::hook): the model calls our [`ResidualHook`] where it would
//! compute `norm(hidden + residual)`. Which inputs, residuals and norms an
//! adapter sees follows AdapterHub's `pre_forward` / `forward` /
//! `post_forward` exactly (`original_ln_before`, `residual_before_ln`,
//! `original_ln_after`, parallel adapters), and so do the compositions
//! ([`Setup`]): `Stack`, `Parallel`, `BatchSplit`, `Average`, `Fuse`.

use burn::module::{Module, Param};
use burn::nn::{Dropout, Linear};
use burn::tensor::activation::{gelu, leaky_relu, relu, sigmoid, silu, softmax, tanh};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor, TensorData};
use peft_core::model::{residual_join, InsertionPoint, JoinNorm, ResidualHook};
use peft_core::rng::SplitMix64;
use peft_core::{PeftError, Result};

pub use crate::config::Activation;
use crate::config::{BnConfig, FusionConfig, ResidualBeforeLn, Scaling};

impl Activation {
    pub(crate) fn apply<B: Backend, const D: usize>(self, x: Tensor<B, D>) -> Tensor<B, D> {
        match self {
            Self::Relu => relu(x),
            Self::Silu => silu(x),
            Self::Gelu => gelu(x),
            Self::GeluNew => {
                let inner = (x.clone() + x.clone().powf_scalar(3.0) * 0.044715)
                    * (2.0 / std::f64::consts::PI).sqrt();
                x * (tanh(inner) + 1.0) * 0.5
            }
            Self::Tanh => tanh(x),
            Self::Sigmoid => sigmoid(x),
            Self::LeakyRelu => leaky_relu(x, 0.01),
        }
    }
}

/// How an adapter wires itself into a residual join (from its [`BnConfig`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Wiring {
    /// The non-linearity.
    pub activation: Activation,
    /// The fixed scaling factor (1 when learned).
    pub scaling: f64,
    /// A parallel adapter.
    pub parallel: bool,
    /// The model's add + norm before the adapter.
    pub original_ln_before: bool,
    /// The model's add + norm after the adapter.
    pub original_ln_after: bool,
    /// Where the adapter's residual is taken.
    pub residual_before_ln: ResidualBeforeLn,
    /// Dropout on the adapter output (training only).
    pub dropout: f64,
}

/// One bottleneck: `up(act(down(x))) · scaling`.
#[derive(Module, Debug)]
pub struct Bottleneck<B: Backend> {
    /// Down-projection: weight `[d, m]`, bias `[m]`.
    pub down: Linear<B>,
    /// Up-projection: weight `[m, d]`, bias `[d]`.
    pub up: Linear<B>,
    /// Learned scaling, `[1]` (`"learned"`) or `[d]` (`"channel"`).
    pub learned_scaling: Option<Param<Tensor<B, 1>>>,
    /// Activation, scaling and wiring.
    #[module(skip)]
    pub wiring: Wiring,
}

/// `x: [b, t, d_in]` through `linear`, as one 2-D matmul (faster than 3-D in Burn).
fn linear3<B: Backend>(linear: &Linear<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
    let [b, t, d] = x.dims();
    let y = linear.forward(x.reshape([b * t, d]));
    let out = y.dims()[1];
    y.reshape([b, t, out])
}

/// `N(0, std)` truncated at `±bound` (PyTorch's `trunc_normal_`), drawn on
/// the host from a seeded stream.
fn truncated_normal(shape: [usize; 2], std: f64, bound: f64, seed: u64) -> TensorData {
    let mut rng = SplitMix64(seed);
    let n = shape[0] * shape[1];
    let mut values = Vec::with_capacity(n);
    while values.len() < n {
        // Box–Muller.
        let (u1, u2) = (rng.next_f64().max(1e-300), rng.next_f64());
        let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * std;
        if z.abs() <= bound {
            values.push(z as f32);
        }
    }
    TensorData::new(values, shape)
}

/// U(±bound) from `seed`.
fn seeded_uniform(shape: [usize; 2], bound: f64, seed: u64) -> TensorData {
    let mut rng = SplitMix64(seed);
    let values = (0..shape[0] * shape[1])
        .map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32)
        .collect();
    TensorData::new(values, shape)
}

impl<B: Backend> Bottleneck<B> {
    /// A freshly initialised bottleneck `d → m → d` per `config`.
    pub fn init(
        config: &BnConfig,
        d: usize,
        m: usize,
        seed: u64,
        device: &B::Device,
    ) -> Result<Self> {
        config.validate()?;
        let linear = |o, w: Tensor<B, 2>| Linear {
            weight: Param::from_tensor(w),
            bias: Some(Param::from_tensor(Tensor::zeros([o], device))),
        };
        // With `init_weights_seed` every draw comes from `seed` (host-side);
        // without it `bert` and `mam_adapter` draw from the backend's RNG.
        let seeded = config.init_weights_seed.is_some();
        let normal = |shape: [usize; 2], salt: u64| -> Tensor<B, 2> {
            if seeded {
                Tensor::from_data(
                    truncated_normal(shape, 0.02, f64::INFINITY, seed ^ salt),
                    device,
                )
            } else {
                Tensor::random(shape, Distribution::Normal(0.0, 0.02), device)
            }
        };
        let (down_w, up_w) = match config.init_weights.as_str() {
            "mam_adapter" => {
                // PyTorch's kaiming_uniform_(a=√5) on `[m, d]`: U(±1/√d).
                let bound = 1.0 / (d as f64).sqrt();
                let down = if seeded {
                    Tensor::from_data(seeded_uniform([d, m], bound, seed), device)
                } else {
                    Tensor::random([d, m], Distribution::Uniform(-bound, bound), device)
                };
                (down, Tensor::zeros([m, d], device))
            }
            "houlsby" => (
                Tensor::from_data(truncated_normal([d, m], 1e-2, 2e-2, seed), device),
                Tensor::from_data(truncated_normal([m, d], 1e-2, 2e-2, seed ^ 0x9e37), device),
            ),
            _ => (normal([d, m], 0), normal([m, d], 0x9e37)),
        };
        let (scaling, learned_scaling) = match &config.scaling {
            Scaling::Fixed(s) => (*s, None),
            Scaling::Learned(kind) => {
                let n = if kind == "channel" { d } else { 1 };
                (1.0, Some(Param::from_tensor(Tensor::ones([n], device))))
            }
        };
        Ok(Bottleneck {
            down: linear(m, down_w),
            up: linear(d, up_w),
            learned_scaling,
            wiring: Wiring {
                activation: Activation::parse(&config.non_linearity)?,
                scaling,
                parallel: config.is_parallel,
                original_ln_before: config.original_ln_before,
                original_ln_after: config.original_ln_after,
                residual_before_ln: config.residual_before_ln.clone(),
                dropout: config.dropout,
            },
        })
    }

    /// Bottleneck width `m`.
    pub fn width(&self) -> usize {
        self.down.weight.shape().dims::<2>()[1]
    }

    /// AdapterHub's `pre_forward`: `(hidden, query, residual)` for the
    /// adapter, from the sub-block output `hidden` and the join's residual
    /// input `input`. `query` is for fusion (`Some(query_before_ln)`).
    fn pre_forward(
        &self,
        hidden: Tensor<B, 3>,
        input: Tensor<B, 3>,
        norm: JoinNorm<'_, B>,
        fusion_query_before_ln: Option<bool>,
    ) -> (Tensor<B, 3>, Option<Tensor<B, 3>>, Tensor<B, 3>) {
        let w = &self.wiring;
        if w.parallel {
            let query = fusion_query_before_ln.map(|_| input.clone());
            return (input.clone(), query, input);
        }
        let mut residual = None;
        let mut query = None;
        if w.residual_before_ln == ResidualBeforeLn::Flag(true) {
            residual = Some(hidden.clone());
        }
        if fusion_query_before_ln == Some(true) {
            query = Some(hidden.clone());
        }
        let mut h = hidden;
        if w.original_ln_before {
            h = h + input;
            if matches!(w.residual_before_ln, ResidualBeforeLn::Named(_)) {
                residual = Some(h.clone()); // "post_add"
            }
            if let Some(n) = norm {
                h = n(h);
            }
        }
        if w.residual_before_ln == ResidualBeforeLn::Flag(false) {
            residual = Some(h.clone());
        }
        if fusion_query_before_ln == Some(false) {
            query = Some(h.clone());
        }
        let residual = residual.unwrap_or_else(|| h.clone());
        (h, query, residual)
    }

    /// AdapterHub's `forward`: `(output, up)`; `up` is the scaled
    /// up-projection (fusion attends over it).
    fn forward(&self, x: Tensor<B, 3>, residual: Tensor<B, 3>) -> (Tensor<B, 3>, Tensor<B, 3>) {
        let down = self.wiring.activation.apply(linear3(&self.down, x));
        let mut up = linear3(&self.up, down);
        up = match &self.learned_scaling {
            Some(s) => up * s.val().unsqueeze::<3>(),
            None => up * self.wiring.scaling,
        };
        let out = Dropout {
            prob: self.wiring.dropout,
        }
        .forward(up.clone());
        if self.wiring.parallel {
            (out, up)
        } else {
            (out + residual, up)
        }
    }

    /// AdapterHub's `post_forward`.
    fn post_forward(
        &self,
        hidden: Tensor<B, 3>,
        input_hidden: Tensor<B, 3>,
        input: Tensor<B, 3>,
        norm: JoinNorm<'_, B>,
    ) -> Tensor<B, 3> {
        let hidden = match self.wiring.parallel {
            true => hidden + input_hidden,
            false => hidden,
        };
        match self.wiring.original_ln_after {
            true => residual_join(hidden, input, norm),
            false => hidden,
        }
    }
}

/// One named adapter across the model: a bottleneck per layer and point
/// (or none: `leave_out`, or a point its config does not use).
#[derive(Module, Debug)]
pub struct BottleneckAdapter<B: Backend> {
    /// Per layer, after attention.
    pub attention: Vec<Option<Bottleneck<B>>>,
    /// Per layer, after the feed-forward block.
    pub output: Vec<Option<Bottleneck<B>>>,
}

impl<B: Backend> BottleneckAdapter<B> {
    /// The bottleneck at `point` of `layer`.
    pub fn at(&self, point: InsertionPoint, layer: usize) -> Option<&Bottleneck<B>> {
        let sites = match point {
            InsertionPoint::AfterAttention => &self.attention,
            InsertionPoint::AfterFeedForward => &self.output,
        };
        sites.get(layer).and_then(Option::as_ref)
    }

    /// Mutable access to the site at `point` of `layer`.
    pub fn site_mut(
        &mut self,
        point: InsertionPoint,
        layer: usize,
    ) -> Option<&mut Option<Bottleneck<B>>> {
        match point {
            InsertionPoint::AfterAttention => self.attention.get_mut(layer),
            InsertionPoint::AfterFeedForward => self.output.get_mut(layer),
        }
    }
}

/// AdapterHub's `BertFusion`: attention of the join's query over the
/// adapters' up-projections.
#[derive(Module, Debug)]
pub struct FusionLayer<B: Backend> {
    /// Query projection `[d, d]` (with bias).
    pub query: Option<Linear<B>>,
    /// Key projection `[d, d]` (with bias).
    pub key: Option<Linear<B>>,
    /// Value projection `[d, d]` (no bias).
    pub value: Option<Linear<B>>,
    /// Apply the value projection before the attention sum.
    #[module(skip)]
    pub value_before_softmax: bool,
}

impl<B: Backend> FusionLayer<B> {
    /// A fusion layer of width `d` per `config` (AdapterHub's init: N(0, 0.02)
    /// weights, zero biases; an identity value with `value_initialized`).
    pub fn init(config: &FusionConfig, d: usize, device: &B::Device) -> Self {
        let lin = |bias: bool| Linear {
            weight: Param::from_tensor(Tensor::random(
                [d, d],
                Distribution::Normal(0.0, 0.02),
                device,
            )),
            bias: bias.then(|| Param::from_tensor(Tensor::zeros([d], device))),
        };
        let value = config.value.then(|| {
            let mut v = lin(false);
            if config.value_identity_init() {
                let eye = Tensor::<B, 2>::eye(d, device);
                let w = eye.clone() + (eye.neg() + 1.0) * 1e-6;
                v.weight = Param::from_tensor(w);
            }
            v
        });
        FusionLayer {
            query: config.query.then(|| lin(true)),
            key: config.key.then(|| lin(true)),
            value,
            value_before_softmax: config.value_before_softmax,
        }
    }

    /// `query: [b, t, d]`, `ups: [b, t, n, d]`, `residual: [b, t, d]`.
    fn forward(
        &self,
        query: Tensor<B, 3>,
        ups: Tensor<B, 4>,
        residual: Tensor<B, 3>,
    ) -> Tensor<B, 3> {
        let [b, t, n, d] = ups.dims();
        let q = match &self.query {
            Some(l) => linear3(l, query),
            None => query,
        };
        let flat = |x: Tensor<B, 4>| x.reshape([b * t, n, d]);
        let unflat = |x: Tensor<B, 3>| x.reshape([b, t, n, d]);
        let k = match &self.key {
            Some(l) => unflat(linear3(l, flat(ups.clone()))),
            None => ups.clone(),
        };
        let v = match (&self.value, self.value_before_softmax) {
            (Some(l), true) => unflat(linear3(l, flat(ups))),
            _ => ups,
        };
        // scores [b, t, 1, n] = q [b, t, 1, d] · kᵀ [b, t, d, n]
        let scores = q.unsqueeze_dim::<4>(2).matmul(k.swap_dims(2, 3));
        let probs = softmax(scores, 3);
        let context = probs.matmul(v).reshape([b, t, d]);
        let context = match (&self.value, self.value_before_softmax) {
            (Some(l), false) => linear3(l, context),
            _ => context,
        };
        context + residual
    }
}

/// A fusion of several adapters at every layer and point where all of them
/// may sit.
#[derive(Module, Debug)]
pub struct Fusion<B: Backend> {
    /// Per layer, after attention.
    pub attention: Vec<Option<FusionLayer<B>>>,
    /// Per layer, after the feed-forward block.
    pub output: Vec<Option<FusionLayer<B>>>,
}

impl<B: Backend> Fusion<B> {
    /// The fusion layer at `point` of `layer`.
    pub fn at(&self, point: InsertionPoint, layer: usize) -> Option<&FusionLayer<B>> {
        let sites = match point {
            InsertionPoint::AfterAttention => &self.attention,
            InsertionPoint::AfterFeedForward => &self.output,
        };
        sites.get(layer).and_then(Option::as_ref)
    }
}

/// An active-adapter setup: AdapterHub's composition blocks.
#[derive(Debug, Clone, PartialEq)]
pub enum Setup {
    /// One adapter (at the top level, AdapterHub treats it as `Stack(name)`).
    Single(String),
    /// Adapters in sequence, each on the previous one's output.
    Stack(Vec<Setup>),
    /// The same input through each child (several tasks in one pass): the
    /// batch is replicated once per child; output rows `i·b..(i+1)·b` are
    /// child `i`'s.
    Parallel(Vec<Setup>),
    /// Consecutive rows of the batch through different children.
    BatchSplit(Vec<Setup>, Vec<usize>),
    /// The children's outputs combined as AdapterHub does:
    /// `mean_i(w_i · h_i)` with the weights normalised to sum 1.
    Average(Vec<Setup>, Vec<f64>),
    /// Adapter fusion over the children (a fusion layer must exist for them).
    Fuse(Vec<Setup>),
}

impl Setup {
    /// `Single(name)`.
    pub fn single(name: &str) -> Self {
        Setup::Single(name.to_string())
    }

    /// `Stack` of adapter names.
    pub fn stack(names: &[&str]) -> Self {
        Setup::Stack(names.iter().map(|n| Self::single(n)).collect())
    }

    /// `Parallel` of adapter names.
    pub fn parallel(names: &[&str]) -> Self {
        Setup::Parallel(names.iter().map(|n| Self::single(n)).collect())
    }

    /// `BatchSplit` of adapter names with their row counts.
    pub fn batch_split(names: &[&str], sizes: &[usize]) -> Self {
        Setup::BatchSplit(
            names.iter().map(|n| Self::single(n)).collect(),
            sizes.to_vec(),
        )
    }

    /// `Average` of adapter names; `weights` are normalised to sum 1
    /// (AdapterHub's default), equal weights when `None`.
    pub fn average(names: &[&str], weights: Option<&[f64]>) -> Self {
        let n = names.len() as f64;
        let w = match weights {
            Some(w) => {
                let sum: f64 = w.iter().sum();
                w.iter().map(|x| x / sum).collect()
            }
            None => vec![1.0 / n; names.len()],
        };
        Setup::Average(names.iter().map(|n| Self::single(n)).collect(), w)
    }

    /// `Fuse` of adapter names.
    pub fn fuse(names: &[&str]) -> Self {
        Setup::Fuse(names.iter().map(|n| Self::single(n)).collect())
    }

    /// Every adapter name in the setup.
    pub fn leaves(&self) -> Vec<&str> {
        match self {
            Setup::Single(n) => vec![n.as_str()],
            Setup::Stack(c)
            | Setup::Parallel(c)
            | Setup::BatchSplit(c, _)
            | Setup::Average(c, _)
            | Setup::Fuse(c) => c.iter().flat_map(Setup::leaves).collect(),
        }
    }

    fn first(&self) -> &str {
        self.leaves()[0]
    }

    fn last(&self) -> &str {
        self.leaves().last().expect("setups are non-empty")
    }

    /// The fusion's name, as AdapterHub's `Fuse.name`: children's last adapters joined by `,`.
    pub fn fusion_name(children: &[Setup]) -> String {
        children
            .iter()
            .map(|c| c.last())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The channel count of the (single) `Parallel` block, if any.
    pub(crate) fn parallel_channels(&self) -> Result<Option<usize>> {
        let mut found = Vec::new();
        self.collect_parallel(&mut found);
        match found.as_slice() {
            [] => Ok(None),
            [n] => Ok(Some(*n)),
            _ => Err(PeftError::Config(
                "only one Parallel block per setup is supported".into(),
            )),
        }
    }

    fn collect_parallel(&self, out: &mut Vec<usize>) {
        match self {
            Setup::Single(_) => {}
            Setup::Parallel(c) => {
                out.push(c.len());
                c.iter().for_each(|s| s.collect_parallel(out));
            }
            Setup::Stack(c) | Setup::BatchSplit(c, _) | Setup::Average(c, _) | Setup::Fuse(c) => {
                c.iter().for_each(|s| s.collect_parallel(out))
            }
        }
    }

    /// Checks the row arithmetic of `BatchSplit` / `Parallel` for a batch
    /// of `rows` (after replication) and that blocks are non-empty.
    pub(crate) fn check_rows(&self, rows: usize) -> Result<()> {
        match self {
            Setup::Single(_) => Ok(()),
            Setup::Stack(c) | Setup::Average(c, _) | Setup::Fuse(c) if c.is_empty() => {
                Err(PeftError::Config("an empty composition block".into()))
            }
            Setup::Stack(c) | Setup::Fuse(c) => c.iter().try_for_each(|s| s.check_rows(rows)),
            Setup::Average(c, w) => {
                if w.len() != c.len() {
                    return Err(PeftError::Config(format!(
                        "Average: {} weights for {} adapters",
                        w.len(),
                        c.len()
                    )));
                }
                c.iter().try_for_each(|s| s.check_rows(rows))
            }
            Setup::Parallel(c) => {
                if c.is_empty() || !rows.is_multiple_of(c.len()) {
                    return Err(PeftError::Config("Parallel: empty block".into()));
                }
                c.iter().try_for_each(|s| s.check_rows(rows / c.len()))
            }
            Setup::BatchSplit(c, sizes) => {
                if sizes.len() != c.len() || sizes.iter().sum::<usize>() != rows {
                    return Err(PeftError::Shape {
                        name: "BatchSplit batch_sizes".into(),
                        expected: vec![rows],
                        found: sizes.clone(),
                    });
                }
                c.iter().zip(sizes).try_for_each(|(s, n)| s.check_rows(*n))
            }
        }
    }
}

/// AdapterHub's `BottleneckState`.
struct State<B: Backend> {
    hidden: Tensor<B, 3>,
    input: Tensor<B, 3>,
    adapter_residual: Tensor<B, 3>,
    up: Option<Tensor<B, 3>>,
    last: Option<String>,
}

impl<B: Backend> Clone for State<B> {
    fn clone(&self) -> Self {
        State {
            hidden: self.hidden.clone(),
            input: self.input.clone(),
            adapter_residual: self.adapter_residual.clone(),
            up: self.up.clone(),
            last: self.last.clone(),
        }
    }
}

fn rows<B: Backend>(t: &Tensor<B, 3>, from: usize, to: usize) -> Tensor<B, 3> {
    let [_, s, d] = t.dims();
    t.clone().slice([from..to, 0..s, 0..d])
}

impl<B: Backend> State<B> {
    fn slice(&self, from: usize, to: usize) -> Self {
        State {
            hidden: rows(&self.hidden, from, to),
            input: rows(&self.input, from, to),
            adapter_residual: rows(&self.adapter_residual, from, to),
            up: self.up.as_ref().map(|u| rows(u, from, to)),
            last: self.last.clone(),
        }
    }

    fn concat(states: Vec<Self>) -> Self {
        let last = states.last().and_then(|s| s.last.clone());
        let cat =
            |f: &dyn Fn(&Self) -> Tensor<B, 3>| Tensor::cat(states.iter().map(f).collect(), 0);
        let up = match states.iter().all(|s| s.up.is_some()) {
            true => Some(cat(&|s| s.up.clone().expect("checked"))),
            false => None,
        };
        State {
            hidden: cat(&|s| s.hidden.clone()),
            input: cat(&|s| s.input.clone()),
            adapter_residual: cat(&|s| s.adapter_residual.clone()),
            up,
            last,
        }
    }
}

/// What a [`Composer`] needs: the adapters and fusions by name.
pub(crate) trait Lookup<B: Backend> {
    fn adapter(&self, name: &str) -> Option<&BottleneckAdapter<B>>;
    fn fusion(&self, name: &str) -> Option<(&Fusion<B>, &FusionConfig)>;
}

/// The residual hook that runs a [`Setup`] at every join.
pub(crate) struct Composer<'a, B: Backend, L: Lookup<B>> {
    pub(crate) lookup: &'a L,
    pub(crate) setup: &'a Setup,
    pub(crate) _b: std::marker::PhantomData<B>,
}

impl<B: Backend, L: Lookup<B>> Composer<'_, B, L> {
    fn module(&self, name: &str, point: InsertionPoint, layer: usize) -> Option<&Bottleneck<B>> {
        self.lookup.adapter(name).and_then(|a| a.at(point, layer))
    }

    fn single(&self, name: &str, s: State<B>, at: (InsertionPoint, usize)) -> State<B> {
        let m = self
            .module(name, at.0, at.1)
            .expect("present (checked by the caller)");
        let (hidden, up) = m.forward(s.hidden, s.adapter_residual.clone());
        State {
            hidden,
            up: Some(up),
            last: Some(name.to_string()),
            ..s
        }
    }

    fn pre_block(
        &self,
        setup: &Setup,
        s: State<B>,
        at: (InsertionPoint, usize),
        norm: JoinNorm<'_, B>,
    ) -> State<B> {
        let Some(first) = self.module(setup.first(), at.0, at.1) else {
            return s;
        };
        let (hidden, _, residual) = first.pre_forward(s.hidden, s.input.clone(), norm, None);
        State {
            hidden,
            adapter_residual: residual,
            ..s
        }
    }

    fn compose(
        &self,
        setup: &Setup,
        s: State<B>,
        at: (InsertionPoint, usize),
        norm: JoinNorm<'_, B>,
    ) -> State<B> {
        match setup {
            Setup::Single(name) => match self.module(name, at.0, at.1) {
                Some(_) => self.single(name, s, at),
                None => s,
            },
            Setup::Stack(children) => children.iter().fold(s, |s, child| match child {
                Setup::Single(name) if self.module(name, at.0, at.1).is_some() => {
                    let s = self.pre_block(child, s, at, norm);
                    self.single(name, s, at)
                }
                Setup::Single(_) => s,
                block => self.compose(block, s, at, norm),
            }),
            Setup::Parallel(children) => {
                let per = s.hidden.dims()[0] / children.len();
                let s = self.pre_block(setup, s, at, norm);
                let parts = children
                    .iter()
                    .enumerate()
                    .map(|(i, c)| self.compose(c, s.slice(i * per, (i + 1) * per), at, norm))
                    .collect();
                State::concat(parts)
            }
            Setup::BatchSplit(children, sizes) => {
                let s = self.pre_block(setup, s, at, norm);
                let mut start = 0;
                let parts = children
                    .iter()
                    .zip(sizes)
                    .map(|(c, n)| {
                        let part = self.compose(c, s.slice(start, start + n), at, norm);
                        start += n;
                        part
                    })
                    .collect();
                State::concat(parts)
            }
            Setup::Average(children, weights) => {
                let s = self.pre_block(setup, s, at, norm);
                let outs: Vec<State<B>> = children
                    .iter()
                    .filter(
                        |c| !matches!(c, Setup::Single(n) if self.module(n, at.0, at.1).is_none()),
                    )
                    .map(|c| self.compose(c, s.clone(), at, norm))
                    .collect();
                if outs.is_empty() {
                    return s;
                }
                // AdapterHub: torch.mean(stack(h_i) * w_i, dim=0).
                let n = outs.len() as f64;
                let hidden = outs
                    .iter()
                    .zip(weights)
                    .map(|(o, w)| o.hidden.clone() * *w)
                    .reduce(|a, b| a + b)
                    .expect("non-empty")
                    / n;
                State {
                    hidden,
                    input: outs[0].input.clone(),
                    adapter_residual: outs[0].adapter_residual.clone(),
                    up: outs[0].up.clone(),
                    last: outs.last().and_then(|o| o.last.clone()),
                }
            }
            Setup::Fuse(children) => self.fuse(children, s, at, norm),
        }
    }

    fn fuse(
        &self,
        children: &[Setup],
        s: State<B>,
        at: (InsertionPoint, usize),
        norm: JoinNorm<'_, B>,
    ) -> State<B> {
        let name = Setup::fusion_name(children);
        let Some((fusion, config)) = self.lookup.fusion(&name) else {
            return s;
        };
        let last = children.last().expect("non-empty").last().to_string();
        let Some(last_module) = self.module(&last, at.0, at.1) else {
            return s;
        };
        let (hidden, query, residual) = last_module.pre_forward(
            s.hidden,
            s.input.clone(),
            norm,
            Some(config.query_before_ln),
        );
        let s = State {
            hidden,
            adapter_residual: residual,
            ..s
        };
        let ups: Vec<Tensor<B, 3>> = children
            .iter()
            .filter(|c| !matches!(c, Setup::Single(n) if self.module(n, at.0, at.1).is_none()))
            .filter_map(|c| match c {
                Setup::Single(n) => self.single(n, s.clone(), at).up,
                block => self.compose(block, s.clone(), at, norm).up,
            })
            .collect();
        let Some(layer) = fusion.at(at.0, at.1) else {
            return s;
        };
        if ups.is_empty() {
            return s;
        }
        let ups = Tensor::stack::<4>(ups, 2);
        let query = query.expect("pre_forward returns a query for fusion");
        let hidden = layer.forward(query, ups, s.adapter_residual.clone());
        State {
            hidden,
            last: Some(last),
            ..s
        }
    }
}

impl<B: Backend, L: Lookup<B>> ResidualHook<B> for Composer<'_, B, L> {
    fn join(
        &self,
        point: InsertionPoint,
        layer: usize,
        hidden: Tensor<B, 3>,
        residual: Tensor<B, 3>,
        norm: JoinNorm<'_, B>,
    ) -> Tensor<B, 3> {
        // AdapterHub's get_active_setup: nothing to do where none of the
        // setup's adapters sits.
        if self
            .setup
            .leaves()
            .iter()
            .all(|n| self.module(n, point, layer).is_none())
        {
            return residual_join(hidden, residual, norm);
        }
        let state = State {
            hidden: hidden.clone(),
            input: residual.clone(),
            adapter_residual: residual,
            up: None,
            last: None,
        };
        let at = (point, layer);
        let out = match self.setup {
            // AdapterHub runs a lone adapter as `Stack(name)`: its own
            // pre_forward, then the adapter (present here: checked above).
            Setup::Single(name) => {
                let state = self.pre_block(self.setup, state, at, norm);
                self.single(name, state, at)
            }
            setup => self.compose(setup, state, at, norm),
        };
        match out
            .last
            .as_deref()
            .and_then(|l| self.module(l, point, layer))
        {
            Some(last) => last.post_forward(out.hidden, hidden, out.input, norm),
            None => residual_join(out.hidden, out.input, norm),
        }
    }
}
