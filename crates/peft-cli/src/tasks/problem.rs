//! What a sequence classifier's outputs mean, as transformers'
//! `problem_type` says: one class per text (softmax cross-entropy,
//! accuracy), any subset of labels per text (per-label sigmoid binary
//! cross-entropy, micro-F1), or real values (mean squared error). The data's
//! labels become [`Targets`] here, and each problem has its loss and metric.

use std::collections::BTreeSet;
use std::path::Path;

use burn::tensor::activation::{sigmoid, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use peft_core::loss::cross_entropy;
use peft_core::{PeftError, Result};

use crate::data::{self, Example};
use crate::train::Metric;

/// transformers' `config.problem_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemType {
    /// `single_label_classification`: one class per text.
    SingleLabel,
    /// `multi_label_classification`: any subset of the labels per text.
    MultiLabel,
    /// `regression`: one real value per output.
    Regression,
}

/// The names transformers gives the problem types, in [`ProblemType`] order.
pub const PROBLEM_TYPES: [&str; 3] = [
    "single_label_classification",
    "multi_label_classification",
    "regression",
];

impl ProblemType {
    /// transformers' name.
    pub fn name(self) -> &'static str {
        match self {
            ProblemType::SingleLabel => PROBLEM_TYPES[0],
            ProblemType::MultiLabel => PROBLEM_TYPES[1],
            ProblemType::Regression => PROBLEM_TYPES[2],
        }
    }

    /// The problem named `name` (transformers' names); another name is an
    /// error listing them.
    pub fn parse(name: &str) -> Result<Self> {
        [
            ProblemType::SingleLabel,
            ProblemType::MultiLabel,
            ProblemType::Regression,
        ]
        .into_iter()
        .find(|p| p.name() == name)
        .ok_or_else(|| {
            PeftError::Config(format!(
                "unknown problem_type `{name}` (known: {})",
                PROBLEM_TYPES.join(", ")
            ))
        })
    }

    /// The problem of a run: `given` (the flag), else the model's
    /// `config.json` `problem_type` (a transformers task checkpoint's), else
    /// inferred from the data: list labels are multi-label, anything else
    /// one class per text. Regression is never guessed from numbers, which
    /// may as well be class ids; but labels that are numbers, some of them
    /// fractional, are refused unless a problem type is given (as classes
    /// they would train nonsense without a word).
    pub fn of_run(given: Option<&str>, model: &Path, examples: &[Example]) -> Result<Self> {
        if let Some(name) = given {
            return Self::parse(name);
        }
        if let Some(name) = model_problem_type(model)? {
            return Self::parse(&name);
        }
        let inferred = Self::inferred(examples);
        let values: Option<Vec<f64>> = examples.iter().map(|e| e.label.parse().ok()).collect();
        match values.and_then(|v| v.into_iter().find(|x| x.fract() != 0.0)) {
            Some(x) if inferred == ProblemType::SingleLabel => Err(PeftError::Config(format!(
                "the labels are numbers, some fractional (e.g. {x}): pass --problem-type \
                 regression to fit them, or --problem-type single_label_classification to \
                 take each distinct value as a class"
            ))),
            _ => Ok(inferred),
        }
    }

    /// The problem of a saved adapter whose head has `outputs` rows: its
    /// run's `task.json`, else transformers' inference from the head (one
    /// output is a regression), else `otherwise` (classes where nothing
    /// else tells; what the data's labels say when there are data).
    /// `dir: None` is a base model's own head.
    pub fn of_adapter(dir: Option<&Path>, outputs: usize, otherwise: Self) -> Result<Self> {
        match dir.map(read_problem_type).transpose()?.flatten() {
            Some(saved) => Ok(saved),
            None if outputs == 1 => Ok(ProblemType::Regression),
            None => Ok(otherwise),
        }
    }

    /// What a served prediction reports of `logits: [n, outputs]`: class
    /// probabilities (softmax), each label's probability (sigmoid), or the
    /// values themselves.
    pub fn activate<B: Backend>(self, logits: Tensor<B, 2>) -> Tensor<B, 2> {
        match self {
            ProblemType::SingleLabel => softmax(logits, 1),
            ProblemType::MultiLabel => sigmoid(logits),
            ProblemType::Regression => logits,
        }
    }

    /// List labels mean multi-label; scalars, one class per text.
    pub fn inferred(examples: &[Example]) -> Self {
        match examples.iter().any(|e| e.labels.is_some()) {
            true => ProblemType::MultiLabel,
            false => ProblemType::SingleLabel,
        }
    }

    /// The outputs' names (the head's rows) and each example's targets
    /// ([`ProblemType::outputs`], [`ProblemType::targets_for`]).
    pub fn targets(
        self,
        examples: &[Example],
        label_column: &str,
        origin: &Path,
    ) -> Result<(Vec<String>, Targets)> {
        let names = self.outputs(examples, label_column);
        let targets = self.targets_for(examples, &names, origin)?;
        Ok((names, targets))
    }

    /// The outputs' names (the head's rows): classes and labels are the
    /// data's in sorted order; a regression's outputs are named after the
    /// label column (`score`, or `score[i]` for a list of values).
    pub fn outputs(self, examples: &[Example], label_column: &str) -> Vec<String> {
        match self {
            ProblemType::SingleLabel => data::label_set(examples),
            ProblemType::MultiLabel => {
                let all: BTreeSet<&str> = examples
                    .iter()
                    .flat_map(|e| e.label_list())
                    .map(String::as_str)
                    .collect();
                all.into_iter().map(str::to_string).collect()
            }
            ProblemType::Regression => match examples.first().and_then(|e| e.labels.as_ref()) {
                None => vec![label_column.to_string()],
                Some(values) => (0..values.len())
                    .map(|i| format!("{label_column}[{i}]"))
                    .collect(),
            },
        }
    }

    /// Each example's targets against known outputs `names` (a saved
    /// run's): a label no output names, a value that is not a number, or
    /// a list of values of another length is an error naming the example.
    pub fn targets_for(
        self,
        examples: &[Example],
        names: &[String],
        origin: &Path,
    ) -> Result<Targets> {
        let bad = |i: usize, why: String| PeftError::Checkpoint {
            path: origin.to_path_buf(),
            message: format!("example {}: {why}", i + 1),
        };
        match self {
            ProblemType::SingleLabel => {
                if let Some(i) = examples.iter().position(|e| e.labels.is_some()) {
                    return Err(bad(
                        i,
                        "a list of labels, but the problem is single_label_classification \
                         (--problem-type multi_label_classification takes lists)"
                            .into(),
                    ));
                }
                Ok(Targets::Classes(data::label_ids(examples, names, origin)?))
            }
            ProblemType::MultiLabel => {
                let mut values = vec![0.0f32; examples.len() * names.len()];
                for (i, e) in examples.iter().enumerate() {
                    for l in e.label_list() {
                        let j = names.iter().position(|n| n == l).ok_or_else(|| {
                            bad(i, format!("unknown label `{l}` (known: {names:?})"))
                        })?;
                        values[i * names.len() + j] = 1.0;
                    }
                }
                Ok(Targets::Values {
                    width: names.len(),
                    values,
                })
            }
            ProblemType::Regression => {
                let mut values = Vec::with_capacity(examples.len() * names.len());
                for (i, e) in examples.iter().enumerate() {
                    let row = e.label_list();
                    if row.len() != names.len() {
                        return Err(bad(
                            i,
                            format!(
                                "{} values, the outputs are {} ({names:?})",
                                row.len(),
                                names.len()
                            ),
                        ));
                    }
                    for v in row {
                        let x = v.parse::<f32>().ok().filter(|x| x.is_finite());
                        values.push(x.ok_or_else(|| {
                            bad(i, format!("`{v}` is not a finite number (regression)"))
                        })?);
                    }
                }
                Ok(Targets::Values {
                    width: names.len(),
                    values,
                })
            }
        }
    }

    /// The problem's loss of `logits: [n, outputs]` against `targets`, a
    /// scalar, as transformers computes it: cross-entropy, the mean binary
    /// cross-entropy of every (text, label) logit, or the mean squared error
    /// of every output.
    pub fn loss<B: Backend>(self, logits: Tensor<B, 2>, targets: BatchTargets<B>) -> Tensor<B, 1> {
        match targets {
            BatchTargets::Classes(c) => cross_entropy(logits, c),
            BatchTargets::Values(y) => match self {
                ProblemType::Regression => mse(logits, y),
                _ => binary_cross_entropy_with_logits(logits, y),
            },
        }
    }
}

/// Counts behind a problem's metric, accumulated batch by batch
/// ([`Score::add`]) and read once ([`Score::metric`]).
#[derive(Debug, Default)]
pub struct Score {
    texts: usize,
    outputs: usize,
    hits: usize,
    true_pos: usize,
    false_pos: usize,
    false_neg: usize,
    squared: f64,
}

impl Score {
    /// Scores `logits` (`[n, outputs]` row-major) of examples `idx`.
    pub fn add(&mut self, problem: ProblemType, logits: &[f32], targets: &Targets, idx: &[usize]) {
        let width = (logits.len() / idx.len().max(1)).max(1);
        for (row, &i) in logits.chunks(width).zip(idx) {
            match (problem, targets) {
                (_, Targets::Classes(c)) => {
                    let best = row
                        .iter()
                        .enumerate()
                        .max_by(|a, b| a.1.total_cmp(b.1))
                        .map(|(j, _)| j);
                    self.hits += usize::from(best == Some(c[i]));
                }
                (ProblemType::Regression, Targets::Values { values, .. }) => {
                    let want = &values[i * width..(i + 1) * width];
                    self.squared += row
                        .iter()
                        .zip(want)
                        .map(|(p, y)| f64::from(p - y).powi(2))
                        .sum::<f64>();
                }
                (_, Targets::Values { values, .. }) => {
                    let want = &values[i * width..(i + 1) * width];
                    for (p, y) in row.iter().zip(want) {
                        // A label is predicted when its probability passes
                        // one half: a positive logit.
                        match (*p > 0.0, *y > 0.5) {
                            (true, true) => self.true_pos += 1,
                            (true, false) => self.false_pos += 1,
                            (false, true) => self.false_neg += 1,
                            (false, false) => {}
                        }
                    }
                }
            }
            self.outputs += width;
            self.texts += 1;
        }
    }

    /// The problem's metric: accuracy, micro-F1 over (text, label) pairs,
    /// or the mean squared error of every output (lower is better).
    pub fn metric(&self, problem: ProblemType) -> Metric {
        match problem {
            ProblemType::SingleLabel => Metric {
                name: "accuracy",
                value: self.hits as f64 / self.texts.max(1) as f64,
                higher_is_better: true,
            },
            ProblemType::MultiLabel => Metric {
                name: "micro_f1",
                // F1 = 2TP / (2TP + FP + FN); no label predicted and none
                // true is a perfect 1.
                value: match 2 * self.true_pos + self.false_pos + self.false_neg {
                    0 => 1.0,
                    d => (2 * self.true_pos) as f64 / d as f64,
                },
                higher_is_better: true,
            },
            ProblemType::Regression => Metric {
                name: "mse",
                value: self.squared / self.outputs.max(1) as f64,
                higher_is_better: false,
            },
        }
    }
}

/// Every example's targets.
#[derive(Debug, Clone, PartialEq)]
pub enum Targets {
    /// Class indices (single-label).
    Classes(Vec<usize>),
    /// `[n, width]` row-major: 0/1 per label (multi-label) or values
    /// (regression).
    Values {
        /// Outputs per example.
        width: usize,
        /// The targets, example after example.
        values: Vec<f32>,
    },
}

impl Targets {
    /// The targets of examples `idx`, in that order.
    pub fn select(&self, idx: &[usize]) -> Targets {
        match self {
            Targets::Classes(c) => Targets::Classes(idx.iter().map(|&i| c[i]).collect()),
            Targets::Values { width, values } => Targets::Values {
                width: *width,
                values: idx
                    .iter()
                    .flat_map(|&i| values[i * width..(i + 1) * width].iter().copied())
                    .collect(),
            },
        }
    }

    /// The targets of examples `idx` as a tensor.
    pub fn batch<B: Backend>(&self, idx: &[usize], device: &B::Device) -> BatchTargets<B> {
        match self {
            Targets::Classes(c) => {
                let v: Vec<i64> = idx.iter().map(|&i| c[i] as i64).collect();
                BatchTargets::Classes(Tensor::from_data(TensorData::new(v, [idx.len()]), device))
            }
            Targets::Values { width, values } => {
                let v: Vec<f32> = idx
                    .iter()
                    .flat_map(|&i| values[i * width..(i + 1) * width].iter().copied())
                    .collect();
                BatchTargets::Values(Tensor::from_data(
                    TensorData::new(v, [idx.len(), *width]),
                    device,
                ))
            }
        }
    }
}

/// One batch's targets: class indices `[b]`, or values `[b, outputs]`.
pub enum BatchTargets<B: Backend> {
    /// Class indices `[b]`.
    Classes(Tensor<B, 1, Int>),
    /// 0/1 labels or values `[b, outputs]`.
    Values(Tensor<B, 2>),
}

/// Mean squared error over every element (PyTorch's `MSELoss`).
pub fn mse<B: Backend>(logits: Tensor<B, 2>, targets: Tensor<B, 2>) -> Tensor<B, 1> {
    (logits - targets).powi_scalar(2).mean()
}

/// Mean binary cross-entropy of logits `x` against 0/1 targets `y`
/// (PyTorch's `BCEWithLogitsLoss`), in its overflow-free form
/// `max(x, 0) − x·y + log(1 + exp(−|x|))`.
pub fn binary_cross_entropy_with_logits<B: Backend>(
    x: Tensor<B, 2>,
    y: Tensor<B, 2>,
) -> Tensor<B, 1> {
    let softplus_neg_abs = x.clone().abs().neg().exp().log1p();
    (x.clone().clamp_min(0.0) - x * y + softplus_neg_abs).mean()
}

/// The `problem_type` of the model folder's `config.json`, if it names one.
fn model_problem_type(model: &Path) -> Result<Option<String>> {
    let v = read_json(&model.join("config.json"))?;
    Ok(v.and_then(|v| v.get("problem_type")?.as_str().map(str::to_string)))
}

/// The JSON document at `path`, `None` when there is no such file.
pub fn read_json(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|source| PeftError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|source| PeftError::Json {
            path: path.to_path_buf(),
            source,
        })
}

/// The file in a run folder (and each checkpoint) naming its problem type:
/// transformers keeps `problem_type` in the task model's `config.json`,
/// which an adapter folder does not carry.
const PROBLEM_FILE: &str = "task.json";

/// Writes `task.json` (`{"problem_type": …}`) into `dir`, atomically.
pub fn write_problem_type(dir: &Path, problem: ProblemType) -> Result<()> {
    let text = serde_json::json!({ "problem_type": problem.name() }).to_string();
    peft_core::io::write_atomic(&dir.join(PROBLEM_FILE), text.as_bytes())
}

/// The problem type a run folder names in its `task.json`, if it has one
/// (runs from before problem types, and PEFT's adapters, do not).
pub fn read_problem_type(dir: &Path) -> Result<Option<ProblemType>> {
    let path = dir.join(PROBLEM_FILE);
    let Some(v) = read_json(&path)? else {
        return Ok(None);
    };
    match v.get("problem_type").and_then(|p| p.as_str()) {
        Some(name) => ProblemType::parse(name).map(Some),
        None => Err(PeftError::Checkpoint {
            path,
            message: "no string `problem_type`".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(label: &str, labels: Option<&[&str]>) -> Example {
        Example {
            text: "t".into(),
            label: label.into(),
            labels: labels.map(|l| l.iter().map(|s| s.to_string()).collect()),
        }
    }

    /// Each metric on predictions worked out by hand, fed in two batches
    /// whose examples come out of order (the `idx` of each batch).
    #[test]
    fn metrics_match_hand_counts() {
        let origin = Path::new("data.jsonl");
        let score = |problem: ProblemType, targets: &Targets, rows: [&[f32]; 2]| {
            let mut s = Score::default();
            s.add(problem, rows[1], targets, &[1]);
            s.add(problem, rows[0], targets, &[0]);
            s.metric(problem)
        };
        let single = ProblemType::SingleLabel
            .targets_for(
                &[example("b", None), example("b", None)],
                &["a".into(), "b".into()],
                origin,
            )
            .unwrap();
        let m = score(
            ProblemType::SingleLabel,
            &single,
            [&[0.1, 0.9], &[2.0, 1.0]],
        );
        assert_eq!(
            (m.name, m.value, m.higher_is_better),
            ("accuracy", 0.5, true)
        );

        // Predicted (positive logit): {x, z}, {z}; true: {x}, {y, z}.
        // TP 2, FP 1, FN 1: F1 = 4 / 6.
        let multi = [example("", Some(&["x"])), example("", Some(&["z", "y"]))];
        let (names, targets) = ProblemType::MultiLabel
            .targets(&multi, "label", origin)
            .unwrap();
        assert_eq!(names, ["x", "y", "z"]);
        let m = score(
            ProblemType::MultiLabel,
            &targets,
            [&[1.0, -1.0, 2.0], &[-1.0, -1.0, 0.5]],
        );
        assert_eq!(m.name, "micro_f1");
        assert!((m.value - 4.0 / 6.0).abs() < 1e-12, "{}", m.value);

        // Squared errors 1 + 0 + 1 + 1 over 4 outputs.
        let values = [
            example("", Some(&["0", "2"])),
            example("", Some(&["1", "1"])),
        ];
        let (names, targets) = ProblemType::Regression
            .targets(&values, "score", origin)
            .unwrap();
        assert_eq!(names, ["score[0]", "score[1]"]);
        let m = score(
            ProblemType::Regression,
            &targets,
            [&[1.0, 2.0], &[0.0, 0.0]],
        );
        assert_eq!((m.name, m.value, m.higher_is_better), ("mse", 0.75, false));
        let (names, _) = ProblemType::Regression
            .targets(&[example("-1.5", None)], "score", origin)
            .unwrap();
        assert_eq!(names, ["score"]);
    }

    #[test]
    fn problem_types_parse_and_infer_as_transformers_names_them() {
        for p in [
            ProblemType::SingleLabel,
            ProblemType::MultiLabel,
            ProblemType::Regression,
        ] {
            assert_eq!(ProblemType::parse(p.name()).unwrap(), p);
        }
        let err = ProblemType::parse("multilabel").unwrap_err().to_string();
        assert!(err.contains("regression"), "{err}");
        let scalar = [example("1", None)];
        assert_eq!(ProblemType::inferred(&scalar), ProblemType::SingleLabel);
        let lists = [example("1", None), example("", Some(&["a"]))];
        assert_eq!(ProblemType::inferred(&lists), ProblemType::MultiLabel);
    }
}
