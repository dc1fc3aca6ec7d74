//! `LinearSlot` against a host reference in f64, on every backend: the
//! forward pass of each adapter kind and their combinations (LoRA, two
//! LoRAs, DoRA, (IA)³ on either side, (IA)³ with LoRA), disabling, merging
//! and unmerging each kind, mixed batches, which entries train, and the
//! typed refusals. Small random operands, all non-zero, so that an entry
//! dropped, added twice, or scaled wrongly changes the output.

use burn::module::Param;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use peft_core::compare::{check_close_slices, Tolerance};
use peft_core::rng::SplitMix64;
use peft_core::slot::column_norm;
use peft_core::{autodiff_backend_tests, backend_tests, routing};
use peft_core::{Ia3Entry, Ia3Meta, LinearSlot, LoraEntry, LoraMeta, PeftError, BASE_ROW};

const D_IN: usize = 5;
const D_OUT: usize = 4;
const ROWS: usize = 3;
/// f32 kernels against an f64 reference.
const TOL: Tolerance = Tolerance::new(1e-5, 1e-6);

/// A row-major host matrix in f64.
#[derive(Clone, Debug)]
struct M {
    r: usize,
    c: usize,
    v: Vec<f64>,
}

impl M {
    fn random(r: usize, c: usize, rng: &mut SplitMix64, lo: f64, hi: f64) -> Self {
        let v = (0..r * c)
            .map(|_| lo + (hi - lo) * rng.next_f64())
            .collect();
        M { r, c, v }
    }
    fn at(&self, i: usize, j: usize) -> f64 {
        self.v[i * self.c + j]
    }
    fn mm(&self, o: &M) -> M {
        assert_eq!(self.c, o.r);
        let mut v = vec![0.0; self.r * o.c];
        for i in 0..self.r {
            for j in 0..o.c {
                v[i * o.c + j] = (0..self.c).map(|k| self.at(i, k) * o.at(k, j)).sum();
            }
        }
        M {
            r: self.r,
            c: o.c,
            v,
        }
    }
    fn map2(&self, o: &M, f: impl Fn(f64, f64) -> f64) -> M {
        assert_eq!((self.r, self.c), (o.r, o.c));
        let v = self.v.iter().zip(&o.v).map(|(a, b)| f(*a, *b)).collect();
        M { v, ..*self }
    }
    fn add(&self, o: &M) -> M {
        self.map2(o, |a, b| a + b)
    }
    fn scale(&self, s: f64) -> M {
        M {
            v: self.v.iter().map(|x| x * s).collect(),
            ..*self
        }
    }
    /// Multiplies column j by `l[j]` (`cols`) or row i by `l[i]`.
    fn scale_by(&self, l: &[f64], cols: bool) -> M {
        let mut out = self.clone();
        for i in 0..self.r {
            for j in 0..self.c {
                out.v[i * self.c + j] *= if cols { l[j] } else { l[i] };
            }
        }
        out
    }
    /// Adds `b` to every row.
    fn plus_row(&self, b: &[f64]) -> M {
        self.map2(&M::rows_of(b, self.r), |x, y| x + y)
    }
    fn rows_of(b: &[f64], r: usize) -> M {
        M {
            r,
            c: b.len(),
            v: (0..r).flat_map(|_| b.iter().copied()).collect(),
        }
    }
    fn col_norms(&self) -> Vec<f64> {
        (0..self.c)
            .map(|j| {
                (0..self.r)
                    .map(|i| self.at(i, j).powi(2))
                    .sum::<f64>()
                    .sqrt()
            })
            .collect()
    }
    fn row(&self, i: usize) -> M {
        M {
            r: 1,
            c: self.c,
            v: self.v[i * self.c..(i + 1) * self.c].to_vec(),
        }
    }
    fn tensor<B: Backend>(&self, device: &B::Device) -> Tensor<B, 2> {
        let v: Vec<f32> = self.v.iter().map(|&x| x as f32).collect();
        Tensor::from_data(TensorData::new(v, [self.r, self.c]), device)
    }
}

fn vec_tensor<B: Backend>(v: &[f64], device: &B::Device) -> Tensor<B, 1> {
    let f: Vec<f32> = v.iter().map(|&x| x as f32).collect();
    Tensor::from_data(TensorData::new(f, [v.len()]), device)
}

fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
}

#[track_caller]
fn assert_near(what: &str, actual: Vec<f32>, expected: &M) {
    let want: Vec<f32> = expected.v.iter().map(|&x| x as f32).collect();
    if let Err(m) = check_close_slices(what, &actual, &want, TOL) {
        panic!("{m}");
    }
}

/// A LoRA entry of a [`Case`]: name, `A`, `B`, scaling, DoRA magnitude.
type LoraCase = (&'static str, M, M, f64, Option<Vec<f64>>);

/// The operands: base `W [d_in, d_out]`, bias, an input, two LoRA
/// entries of different ranks and scalings, a DoRA entry and (IA)³ vectors
/// for both sides.
struct Case {
    w: M,
    bias: Vec<f64>,
    x: M,
    lora: Vec<LoraCase>,
    /// (name, l, feedforward)
    ia3: Vec<(&'static str, Vec<f64>, bool)>,
}

fn case() -> Case {
    let mut rng = SplitMix64(7);
    let mut draw = |r, c| M::random(r, c, &mut rng, -1.0, 1.0);
    let w = draw(D_IN, D_OUT);
    let bias = draw(1, D_OUT).v;
    let x = draw(ROWS, D_IN);
    let (a1, b1) = (draw(D_IN, 2), draw(2, D_OUT));
    let (a2, b2) = (draw(D_IN, 3), draw(3, D_OUT));
    let (a3, b3) = (draw(D_IN, 2), draw(2, D_OUT));
    let mut rng = SplitMix64(11);
    let mut positive = |n| M::random(1, n, &mut rng, 0.5, 1.5).v;
    let magnitude = positive(D_OUT);
    let l_in = positive(D_IN);
    let l_out = positive(D_OUT);
    let l_out2 = positive(D_OUT);
    Case {
        w,
        bias,
        x,
        lora: vec![
            ("one", a1, b1, 1.5, None),
            ("two", a2, b2, 0.25, None),
            ("dora", a3, b3, 2.0, Some(magnitude)),
        ],
        ia3: vec![
            ("in", l_in, true),
            ("out", l_out, false),
            ("out2", l_out2, false),
        ],
    }
}

impl Case {
    fn slot<B: Backend>(&self, device: &B::Device) -> LinearSlot<B> {
        let mut slot =
            LinearSlot::from_weights(self.w.tensor(device), Some(vec_tensor(&self.bias, device)));
        for (name, a, b, scaling, m) in &self.lora {
            let entry = LoraEntry {
                a: Param::from_tensor(a.tensor(device)),
                b: Param::from_tensor(b.tensor(device)),
                magnitude: m
                    .as_ref()
                    .map(|m| Param::from_tensor(vec_tensor(m, device))),
                meta: LoraMeta {
                    name: name.to_string(),
                    rank: a.c,
                    alpha: scaling * a.c as f64,
                    scaling: *scaling,
                    dropout: 0.0,
                    merged: false,
                    dora_merge_norm: None,
                    base_split: None,
                },
            };
            slot.add(entry, "layer").unwrap();
        }
        for (name, l, feedforward) in &self.ia3 {
            slot.add(ia3_entry(name, l, *feedforward, device), "layer")
                .unwrap();
        }
        slot
    }

    fn is_ia3(&self, name: &str) -> bool {
        self.ia3.iter().any(|e| e.0 == name)
    }

    /// The product of the active (IA)³ vectors of one side, as PEFT.
    fn ia3_product(&self, active: &[&str], feedforward: bool) -> Option<Vec<f64>> {
        self.ia3
            .iter()
            .filter(|e| e.2 == feedforward && active.contains(&e.0))
            .map(|e| e.1.clone())
            .reduce(|p, l| p.iter().zip(&l).map(|(a, b)| a * b).collect())
    }

    fn lora(&self, name: &str) -> &LoraCase {
        self.lora.iter().find(|e| e.0 == name).unwrap()
    }

    fn ia3(&self, name: &str) -> &[f64] {
        &self.ia3.iter().find(|e| e.0 == name).unwrap().1
    }

    fn delta(&self, name: &str) -> M {
        let (_, a, b, s, _) = self.lora(name);
        a.mm(b).scale(*s)
    }

    /// `x·W + b`.
    fn base(&self, x: &M) -> M {
        x.mm(&self.w).plus_row(&self.bias)
    }

    /// The reference output of `x` with `active` (names), as PEFT computes it.
    fn expected(&self, x: &M, active: &[&str]) -> M {
        let l_in = self.ia3_product(active, true);
        let l_out = self.ia3_product(active, false);
        let x_in = match &l_in {
            Some(l) => x.scale_by(l, true),
            None => x.clone(),
        };
        let mut y = x_in.mm(&self.w);
        if let Some(l) = &l_out {
            y = y.plus_row(&self.bias).scale_by(l, true);
        }
        for name in active.iter().filter(|n| !self.is_ia3(n)) {
            let (_, a, b, s, m) = self.lora(name);
            let lora = x.mm(a).mm(b).scale(*s);
            y = match m {
                None => y.add(&lora),
                Some(m) => {
                    let g = dora_factor(m, &self.w.add(&self.delta(name)));
                    y.scale_by(&g, true).add(&lora.scale_by(&g, true))
                }
            };
        }
        if l_out.is_some() {
            y
        } else {
            y.plus_row(&self.bias)
        }
    }
}

/// DoRA's factor `m / ‖W'‖` per column of the combined weight `W'`.
fn dora_factor(magnitude: &[f64], combined: &M) -> Vec<f64> {
    let norms = combined.col_norms();
    magnitude.iter().zip(&norms).map(|(m, n)| m / n).collect()
}

fn ia3_entry<B: Backend>(
    name: &str,
    l: &[f64],
    feedforward: bool,
    device: &B::Device,
) -> Ia3Entry<B> {
    Ia3Entry {
        scale: Param::from_tensor(vec_tensor(l, device)),
        meta: Ia3Meta {
            name: name.to_string(),
            feedforward,
            merged: false,
        },
    }
}

fn names(n: &[&str]) -> Vec<String> {
    n.iter().map(|s| s.to_string()).collect()
}

fn forward<B: Backend>(slot: &LinearSlot<B>, x: &M, device: &B::Device) -> Vec<f32> {
    host(slot.forward(x.tensor::<B>(device)))
}

fn every_combination_of_entries_computes_the_reference<B: Backend>(device: &B::Device) {
    let c = case();
    let mut slot = c.slot::<B>(device);
    assert_near(
        "no active adapter",
        forward(&slot, &c.x, device),
        &c.base(&c.x),
    );
    for active in [
        &["one"][..],
        &["two"],
        &["one", "two"],
        &["dora"],
        &["in"],
        &["out"],
        &["in", "one"],
        &["out", "one"],
        &["in", "out", "two"],
        &["out", "out2", "one"],
    ] {
        slot.set_active(&names(active));
        assert_eq!(slot.state.active, names(active));
        let want = c.expected(&c.x, active);
        assert_near(&format!("{active:?}"), forward(&slot, &c.x, device), &want);
        // The same through a rank-3 input `[1, rows, d_in]`.
        let x3 = c.x.tensor::<B>(device).unsqueeze_dim::<3>(0);
        let y3 = slot.forward(x3);
        assert_eq!(y3.dims(), [1, ROWS, D_OUT]);
        assert_near(&format!("{active:?}, rank 3"), host(y3), &want);
    }
    slot.set_active(&names(&["one", "missing"]));
    assert_eq!(
        slot.state.active,
        names(&["one"]),
        "names not attached are dropped"
    );
    slot.state.disabled = true;
    assert_near("disabled", forward(&slot, &c.x, device), &c.base(&c.x));
}

fn merging_each_kind_keeps_the_output_and_unmerging_restores_the_base<B: Backend>(
    device: &B::Device,
) {
    let c = case();
    let w0 = c.w.clone();
    for name in ["one", "dora", "in", "out"] {
        let mut slot = c.slot::<B>(device);
        slot.set_active(&names(&[name]));
        let want = c.expected(&c.x, &[name]);
        assert!(!slot.unmerge(name), "{name}: unmerge before merge");
        assert!(slot.merge(name).unwrap(), "{name}: merge");
        assert!(slot.any_merged());
        assert!(!slot.merge(name).unwrap(), "{name}: merged twice");
        let merged_w = match name {
            "in" => w0.scale_by(c.ia3("in"), false),
            "out" => w0.scale_by(c.ia3("out"), true),
            "dora" => {
                let combined = w0.add(&c.delta("dora"));
                let g = dora_factor(c.lora("dora").4.as_ref().unwrap(), &combined);
                combined.scale_by(&g, true)
            }
            _ => w0.add(&c.delta(name)),
        };
        assert_near(
            &format!("{name}: merged weight"),
            host(slot.base_weight()),
            &merged_w,
        );
        let bias = host(slot.base.bias.as_ref().unwrap().val());
        let bias0 = M {
            r: 1,
            c: D_OUT,
            v: c.bias.clone(),
        };
        let want_bias = match name {
            "out" => bias0.scale_by(c.ia3("out"), true),
            _ => bias0,
        };
        assert_near(&format!("{name}: merged bias"), bias, &want_bias);
        assert_near(
            &format!("{name}: merged output"),
            forward(&slot, &c.x, device),
            &want,
        );
        assert!(slot.unmerge(name), "{name}: unmerge");
        assert!(!slot.any_merged());
        assert!(!slot.unmerge(name), "{name}: unmerged twice");
        assert_near(
            &format!("{name}: unmerged weight"),
            host(slot.base_weight()),
            &w0,
        );
        assert_near(
            &format!("{name}: unmerged output"),
            forward(&slot, &c.x, device),
            &want,
        );
    }
    let mut slot = c.slot::<B>(device);
    assert!(!slot.merge("missing").unwrap() && !slot.unmerge("missing"));
    // Removing a merged entry takes it out of the weight first.
    slot.set_active(&names(&["one", "two"]));
    assert!(slot.merge("one").unwrap());
    assert!(slot.remove("one").is_some());
    assert_eq!(slot.state.active, names(&["two"]));
    assert_near("weight after removal", host(slot.base_weight()), &w0);
    assert!(slot.merge("in").unwrap());
    assert!(slot.remove("in").is_some());
    assert_near("weight after (IA)³ removal", host(slot.base_weight()), &w0);
    assert!(slot.remove("one").is_none() && slot.remove("in").is_none());
    assert!(!slot.has_adapter("one") && slot.has_adapter("two") && slot.has_adapter("out"));
}

/// (IA)³ and DoRA merges scale the weight, so they do not commute with a
/// LoRA merge: unmerging one that was merged before others takes the later
/// ones out first and puts them back, as PEFT's per-layer merge list does.
fn merges_that_do_not_commute_unmerge_in_reverse_order<B: Backend>(device: &B::Device) {
    let c = case();
    let w0 = c.w.clone();
    let bias0 = M {
        r: 1,
        c: D_OUT,
        v: c.bias.clone(),
    };
    let bias = |slot: &LinearSlot<B>| host(slot.base.bias.as_ref().unwrap().val());
    let mut slot = c.slot::<B>(device);
    slot.set_active(&names(&["out", "one"]));
    assert!(slot.merge("out").unwrap() && slot.merge("one").unwrap());
    assert_eq!(slot.state.merged, names(&["out", "one"]));
    let merged_w = w0.scale_by(c.ia3("out"), true).add(&c.delta("one"));
    assert_near("merged weight", host(slot.base_weight()), &merged_w);
    let want = c.expected(&c.x, &["out", "one"]);
    assert_near("merged output", forward(&slot, &c.x, device), &want);
    // The older merge out first: "one" stays merged, on the plain weight.
    assert!(slot.unmerge("out"));
    assert_eq!(slot.state.merged, names(&["one"]));
    assert_near(
        "out unmerged",
        host(slot.base_weight()),
        &w0.add(&c.delta("one")),
    );
    assert_near("out unmerged: bias", bias(&slot), &bias0);
    slot.set_active(&names(&["one"]));
    let want_one = c.expected(&c.x, &["one"]);
    assert_near(
        "out unmerged: output",
        forward(&slot, &c.x, device),
        &want_one,
    );
    assert!(slot.unmerge("one"));
    assert_near("all unmerged", host(slot.base_weight()), &w0);

    // Every kind merged, then unmerged in the order of addition.
    let mut slot = c.slot::<B>(device);
    let all = names(&["in", "dora", "out2", "two"]);
    for n in &all {
        assert!(slot.merge(n).unwrap(), "{n}");
    }
    slot.unmerge_newest_first(&all);
    assert!(!slot.any_merged() && slot.state.merged.is_empty());
    assert_near("all unmerged, newest first", host(slot.base_weight()), &w0);
    assert_near("all unmerged: bias", bias(&slot), &bias0);
    for n in &all {
        assert!(slot.merge(n).unwrap(), "{n}");
    }
    for n in &all {
        assert!(slot.unmerge(n), "{n}");
    }
    assert_near("all unmerged, oldest first", host(slot.base_weight()), &w0);
    // Removing an entry merged before others keeps those merged.
    assert!(slot.merge("dora").unwrap() && slot.merge("out").unwrap());
    assert!(slot.remove("dora").is_some());
    assert_eq!(slot.state.merged, names(&["out"]));
    assert_near(
        "dora removed",
        host(slot.base_weight()),
        &w0.scale_by(c.ia3("out"), true),
    );
}

fn a_mixed_batch_gives_each_row_its_own_adapter<B: Backend>(device: &B::Device) {
    let c = case();
    let mut slot = c.slot::<B>(device);
    slot.set_active(&names(&["one"]));
    // Rows of two tokens each: every adapter kind, the base, repeats, two
    // (IA)³ adapters on one side; then LoRA alone (no DoRA, no (IA)³).
    check_mixed(
        &c,
        &slot,
        &[
            "two", BASE_ROW, "one", "dora", "in", "out", "two", "out2", "out", "in",
        ],
        device,
    );
    check_mixed(&c, &slot, &["one", BASE_ROW, "two", "one"], device);
    // The base row is the base model even beside an entry of that name.
    let mut entry = slot.entry::<LoraEntry<_>>("one").unwrap().clone();
    entry.meta.name = BASE_ROW.into();
    slot.add(entry, "layer").unwrap();
    check_mixed(&c, &slot, &[BASE_ROW, "two"], device);
}

/// Runs `slot` on a mixed batch with one adapter per row of `rows`.
fn check_mixed<B: Backend>(c: &Case, slot: &LinearSlot<B>, rows: &[&str], device: &B::Device) {
    let mut rng = SplitMix64(3);
    let x = M::random(rows.len() * 2, D_IN, &mut rng, -1.0, 1.0);
    // Batch rows are the first dimension: `[rows, 2, d_in]`.
    let x3 = x.tensor::<B>(device).reshape([rows.len(), 2, D_IN]);
    let got = routing::with_row_adapters(&names(rows), || host(slot.forward(x3)));
    for (i, name) in rows.iter().enumerate() {
        let xi = M {
            r: 2,
            c: D_IN,
            v: [x.row(2 * i).v, x.row(2 * i + 1).v].concat(),
        };
        let active: &[&str] = if *name == BASE_ROW { &[] } else { &[name] };
        let want = c.expected(&xi, active);
        let row = got[2 * i * D_OUT..(2 * i + 2) * D_OUT].to_vec();
        assert_near(&format!("{rows:?}: row {i} ({name})"), row, &want);
    }
}

/// PEFT unmerges (IA)³ by dividing by `l + 1e-8`: an element of `l` near
/// zero does not come back exactly, and ours comes back as PEFT's.
fn unmerging_ia3_divides_by_l_plus_peft_epsilon<B: Backend>(device: &B::Device) {
    let c = case();
    let l = [1e-6, 1.0, 0.5, 2.0];
    let mut slot = LinearSlot::<B>::from_weights(c.w.tensor(device), None);
    slot.add(ia3_entry("tiny", &l, false, device), "layer")
        .unwrap();
    assert!(slot.merge("tiny").unwrap() && slot.unmerge("tiny"));
    let back: Vec<f64> = l.iter().map(|x| x / (x + 1e-8)).collect();
    assert_near(
        "unmerged weight",
        host(slot.base_weight()),
        &c.w.scale_by(&back, true),
    );
}

/// Under autodiff: a plain backend tracks no gradient requirement.
fn the_active_entries_train_and_are_counted<B: AutodiffBackend>(device: &B::Device) {
    let c = case();
    let mut slot = c.slot::<B>(device);
    slot.set_active(&names(&["two", "dora", "out"]));
    for e in slot.entries_of::<LoraEntry<_>>() {
        let train = e.meta.name != "one";
        assert_eq!(e.a.is_require_grad(), train, "{}", e.meta.name);
        assert_eq!(e.b.is_require_grad(), train, "{}", e.meta.name);
    }
    for e in slot.entries_of::<Ia3Entry<_>>() {
        assert_eq!(e.scale.is_require_grad(), e.meta.name == "out");
    }
    assert!(!slot.base.weight.is_require_grad());
    // two: 5·3 + 3·4; dora: 5·2 + 2·4 + 4; out: 4.
    assert_eq!(slot.trainable_params(), 27 + 22 + 4);
    assert!(slot.merge("two").unwrap());
    assert_eq!(
        slot.trainable_params(),
        22 + 4,
        "a merged entry does not train"
    );
    assert_eq!(
        slot.entry::<LoraEntry<_>>("one").unwrap().num_params(),
        5 * 2 + 2 * 4
    );
}

fn entries_that_do_not_fit_are_typed_errors<B: Backend>(device: &B::Device) {
    let c = case();
    let mut slot = c.slot::<B>(device);
    let entry = |name: &str, a: [usize; 2], b: [usize; 2], m: Option<usize>| LoraEntry::<B> {
        a: Param::from_tensor(Tensor::ones(a, device)),
        b: Param::from_tensor(Tensor::ones(b, device)),
        magnitude: m.map(|n| Param::from_tensor(Tensor::ones([n], device))),
        meta: LoraMeta {
            name: name.into(),
            rank: 2,
            alpha: 2.0,
            scaling: 1.0,
            dropout: 0.0,
            merged: false,
            dora_merge_norm: None,
            base_split: None,
        },
    };
    let shape_error = |r: peft_core::Result<()>, want: &str| match r {
        Err(PeftError::Shape { name, .. }) => assert_eq!(name, want),
        other => panic!("{want}: {other:?}"),
    };
    shape_error(
        slot.add(entry("x", [D_IN + 1, 2], [2, D_OUT], None), "p"),
        "p.lora_A",
    );
    shape_error(
        slot.add(entry("x", [D_IN, 2], [2, D_OUT + 1], None), "p"),
        "p.lora_B",
    );
    shape_error(
        slot.add(entry("x", [D_IN, 2], [2, D_OUT], Some(D_OUT + 1)), "p"),
        "p.lora_magnitude_vector",
    );
    assert!(matches!(
        slot.add(entry("one", [D_IN, 2], [2, D_OUT], None), "p"),
        Err(PeftError::DuplicateAdapter(n)) if n == "one"
    ));
    let ia3 = |name: &str, n: usize, feedforward: bool| Ia3Entry::<B> {
        scale: Param::from_tensor(Tensor::ones([n], device)),
        meta: Ia3Meta {
            name: name.into(),
            feedforward,
            merged: false,
        },
    };
    shape_error(slot.add(ia3("y", D_OUT, true), "p"), "p.ia3_l");
    shape_error(slot.add(ia3("y", D_IN, false), "p"), "p.ia3_l");
    assert!(matches!(
        slot.add(ia3("two", D_IN, true), "p"),
        Err(PeftError::DuplicateAdapter(_))
    ));
    assert_eq!(
        (
            slot.entries_of::<LoraEntry<_>>().count(),
            slot.entries_of::<Ia3Entry<_>>().count()
        ),
        (3, 3),
        "nothing was added"
    );
    assert_eq!((slot.d_input(), slot.d_output()), (D_IN, D_OUT));
    assert!(slot.merge("one").unwrap());
    assert!(matches!(slot.quantize_nf4("p"), Err(PeftError::State(_))));
}

fn column_norms_are_per_output_feature<B: Backend>(device: &B::Device) {
    let c = case();
    assert_near(
        "column_norm",
        host(column_norm(c.w.tensor::<B>(device))),
        &M {
            r: 1,
            c: D_OUT,
            v: c.w.col_norms(),
        },
    );
}

/// The slot's output with its current active entries against the
/// reference for `active`.
#[track_caller]
fn check_active<B: Backend>(
    c: &Case,
    slot: &LinearSlot<B>,
    active: &[&str],
    what: &str,
    device: &B::Device,
) {
    assert_near(what, forward(slot, &c.x, device), &c.expected(&c.x, active));
}

/// A slot holding one kind of entry only (the slots above hold both):
/// each entry still applies.
fn a_slot_with_one_kind_of_entry_applies_it<B: Backend>(device: &B::Device) {
    let c = case();
    let full = c.slot::<B>(device);
    for name in ["one", "out"] {
        let mut slot =
            LinearSlot::<B>::from_weights(c.w.tensor(device), Some(vec_tensor(&c.bias, device)));
        match (
            full.entry::<LoraEntry<_>>(name),
            full.entry::<Ia3Entry<_>>(name),
        ) {
            (Some(lora), _) => slot.add(lora.clone(), "layer").unwrap(),
            (_, Some(ia3)) => slot.add(ia3.clone(), "layer").unwrap(),
            _ => unreachable!("{name} is attached"),
        }
        slot.set_active(&names(&[name]));
        check_active(&c, &slot, &[name], &format!("{name} alone"), device);
    }
}

/// Removing an entry drops its name alone from the active list.
fn removing_an_entry_keeps_the_others_active<B: Backend>(device: &B::Device) {
    let c = case();
    let mut slot = c.slot::<B>(device);
    slot.set_active(&names(&["in", "one", "out"]));
    assert!(slot.remove("in").is_some());
    assert_eq!(slot.state.active, names(&["one", "out"]));
    check_active(&c, &slot, &["one", "out"], "after removing in", device);
    assert!(slot.remove("one").is_some());
    assert_eq!(slot.state.active, names(&["out"]));
    assert!(slot.remove("one").is_none(), "removed twice");
    check_active(&c, &slot, &["out"], "after removing one", device);
    // Removing is by name, whatever the kind: the (IA)³ entry goes too.
    assert!(slot.remove("out").is_some());
    assert!(slot.state.active.is_empty() && !slot.has_adapter("out"));
}

/// The accessors for editing reach the named entry of their kind only.
fn entries_are_edited_through_their_names<B: Backend>(device: &B::Device) {
    let c = case();
    let mut slot = c.slot::<B>(device);
    assert!(
        slot.entry_mut::<LoraEntry<_>>("in").is_none()
            && slot.entry_mut::<Ia3Entry<_>>("one").is_none()
    );
    assert!(slot.entry_mut::<LoraEntry<_>>("missing").is_none());
    let one = slot.entry_mut::<LoraEntry<_>>("one").expect("LoRA one");
    assert_eq!(one.meta.name, "one");
    one.b = Param::from_tensor(Tensor::zeros([2, D_OUT], device));
    let input = slot.entry_mut::<Ia3Entry<_>>("in").expect("(IA)3 in");
    assert_eq!(input.meta.name, "in");
    input.scale = Param::from_tensor(Tensor::ones([D_IN], device));
    // Both edited entries are now the identity; "two" is untouched.
    slot.set_active(&names(&["one", "in", "two"]));
    check_active(&c, &slot, &["two"], "edited", device);
}

/// A base weight kept in NF4 computes with its dequantization, and each
/// step between the dense and the quantized base keeps the shapes.
fn a_quantized_base_computes_with_its_dequantized_weight<B: Backend>(device: &B::Device) {
    let mut c = case();
    // PyTorch's `[out, in]` layout, as the quantized matrix stores it.
    let w_out_in: Vec<f32> = (0..D_OUT * D_IN)
        .map(|o| c.w.at(o % D_IN, o / D_IN) as f32)
        .collect();
    let q = std::sync::Arc::new(
        peft_core::quant::QuantizedMatrix::nf4(&w_out_in, D_OUT, D_IN).unwrap(),
    );
    let deq = q.dequantize();
    let dense = c.w.clone();
    c.w = M {
        r: D_IN,
        c: D_OUT,
        v: (0..D_IN * D_OUT)
            .map(|o| deq[(o % D_OUT) * D_IN + o / D_OUT] as f64)
            .collect(),
    };
    assert!(
        c.w.v.iter().zip(&dense.v).any(|(a, b)| a != b),
        "NF4 rounds the weight"
    );
    let short_bias = Some(vec_tensor::<B>(&c.bias[..D_OUT - 1], device));
    match LinearSlot::<B>::from_quantized(q.clone(), short_bias, device) {
        Err(PeftError::Shape { name, .. }) => assert_eq!(name, "bias"),
        other => panic!(
            "a bias of {} for {D_OUT} outputs: {:?}",
            D_OUT - 1,
            other.map(|_| ())
        ),
    }
    let mut slot =
        LinearSlot::<B>::from_quantized(q.clone(), Some(vec_tensor(&c.bias, device)), device)
            .unwrap();
    assert!(slot.is_quantized());
    assert_eq!(
        (slot.d_input(), slot.d_output(), slot.quantized_params()),
        (D_IN, D_OUT, D_IN * D_OUT)
    );
    assert_near("dequantized weight", host(slot.base_weight()), &c.w);
    let full = c.slot::<B>(device);
    slot.add(full.entry::<LoraEntry<_>>("one").unwrap().clone(), "layer")
        .unwrap();
    slot.set_active(&names(&["one"]));
    assert_near(
        "quantized base + LoRA",
        forward(&slot, &c.x, device),
        &c.expected(&c.x, &["one"]),
    );
    slot.dequantize_base();
    assert!(!slot.is_quantized());
    assert_eq!(slot.quantized_params(), 0);
    assert_near("dense again", host(slot.base.weight.val()), &c.w);
    let wrong = std::sync::Arc::new(
        peft_core::quant::QuantizedMatrix::nf4(&w_out_in, D_IN, D_OUT).unwrap(),
    );
    match slot.set_quantized_base(wrong) {
        Err(PeftError::Shape { name, .. }) => assert_eq!(name, "quantized base weight"),
        other => panic!("a transposed quantized weight: {other:?}"),
    }
    assert!(!slot.is_quantized(), "a refused weight is not kept");
    slot.set_quantized_base(q).unwrap();
    assert!(slot.is_quantized());
    assert_near(
        "quantized again",
        forward(&slot, &c.x, device),
        &c.expected(&c.x, &["one"]),
    );
}

/// With dropout under autodiff, DoRA's base term reads the dropped-out
/// input, as PEFT's: with every input dropped, only `x·W + b` is left
/// (reusing the undropped `x·W` there would scale it by DoRA's factor).
fn dora_with_dropout_recomputes_its_base_term<B: AutodiffBackend>(device: &B::Device) {
    let c = case();
    let mut slot = c.slot::<B>(device);
    slot.entry_mut::<LoraEntry<_>>("dora").unwrap().meta.dropout = 1.0 - 1e-7;
    slot.set_active(&names(&["dora"]));
    B::seed(device, 3);
    assert_near("all dropped", forward(&slot, &c.x, device), &c.base(&c.x));
    // Without dropout the base term is the layer's own `x·W`, which an
    // input-side (IA)³ vector scales first: not `x·W` recomputed.
    slot.entry_mut::<LoraEntry<_>>("dora").unwrap().meta.dropout = 0.0;
    slot.set_active(&names(&["in", "dora"]));
    assert_near(
        "no dropout, (IA)3 in",
        forward(&slot, &c.x, device),
        &c.expected(&c.x, &["in", "dora"]),
    );
    let undropped = c.expected(&c.x, &["dora"]);
    assert!(
        check_close_slices(
            "a real check",
            &host(c.base(&c.x).tensor::<B>(device)),
            &undropped.v.iter().map(|&v| v as f32).collect::<Vec<_>>(),
            TOL
        )
        .is_err(),
        "DoRA must change this output when nothing is dropped"
    );
}

/// Invariant 4 (activation-side LoRA): the forward pass computes
/// `s·(x·A)·B` and never forms `ΔW = A·B`. With `A`'s two rows `±1e30` and
/// `x = [1, 1]`, `x·A` is exactly 0, so the adapter adds 0; `ΔW` overflows
/// to `±inf`, and `x·ΔW` is `inf − inf = NaN`. So a forward pass that
/// formed `ΔW` (one adapter, or in a mixed batch) answers NaN, as the
/// merged weight (which does hold `ΔW`) shows.
fn lora_runs_on_the_activation_never_forming_the_delta<B: Backend>(device: &B::Device) {
    let t2 = |v: Vec<f32>, shape: [usize; 2]| {
        Tensor::<B, 2>::from_data(TensorData::new(v, shape), device)
    };
    let mut slot = LinearSlot::from_weights(t2(vec![0.5, -0.25], [2, 1]), None);
    for name in ["huge", "other"] {
        let entry = LoraEntry::<B> {
            a: Param::from_tensor(t2(vec![1e30, -1e30], [2, 1])),
            b: Param::from_tensor(t2(vec![1e30], [1, 1])),
            magnitude: None,
            meta: LoraMeta {
                name: name.into(),
                rank: 1,
                alpha: 2.0,
                scaling: 2.0,
                dropout: 0.0,
                merged: false,
                dora_merge_norm: None,
                base_split: None,
            },
        };
        slot.add(entry, "layer").unwrap();
    }
    slot.set_active(&names(&["huge"]));
    let x = || Tensor::<B, 3>::from_data(TensorData::new(vec![1f32; 4], [2, 1, 2]), device);
    // The base alone: 0.5 − 0.25.
    let base = vec![0.25f32, 0.25];
    assert_eq!(host(slot.forward(x())), base, "one active adapter");
    for rows in [["huge", BASE_ROW], ["huge", "other"]] {
        let got = routing::with_row_adapters(&names(&rows), || host(slot.forward(x())));
        assert_eq!(got, base, "mixed batch {rows:?}");
    }
    slot.merge("huge").unwrap();
    let merged = host(slot.forward(x()));
    assert!(
        merged.iter().all(|v| v.is_nan()),
        "the merged weight holds ΔW, so this case does tell: {merged:?}"
    );
}

backend_tests!(
    a_slot_with_one_kind_of_entry_applies_it,
    lora_runs_on_the_activation_never_forming_the_delta,
    removing_an_entry_keeps_the_others_active,
    entries_are_edited_through_their_names,
    a_quantized_base_computes_with_its_dequantized_weight
);
autodiff_backend_tests!(dora_with_dropout_recomputes_its_base_term);

backend_tests!(
    every_combination_of_entries_computes_the_reference,
    merging_each_kind_keeps_the_output_and_unmerging_restores_the_base,
    merges_that_do_not_commute_unmerge_in_reverse_order,
    a_mixed_batch_gives_each_row_its_own_adapter,
    unmerging_ia3_divides_by_l_plus_peft_epsilon,
    entries_that_do_not_fit_are_typed_errors,
    column_norms_are_per_output_feature
);
autodiff_backend_tests!(the_active_entries_train_and_are_counted);
