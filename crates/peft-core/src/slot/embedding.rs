//! [`EmbeddingSlot`]: the adaptable token-embedding table, as
//! [`NormSlot`](super::NormSlot) is the adaptable norm layer.
//!
//! PEFT changes an embedding in two ways besides LoRA's own embedding
//! layers, and both live here, per adapter:
//! - `modules_to_save` naming the embedding (`ModulesToSaveWrapper`): a
//!   trainable full copy of the table, used in place of it
//!   ([`EmbeddingCopyKind::Saved`]);
//! - trainable tokens (`TrainableTokensLayer`: LoRA's
//!   `trainable_token_indices`, or `TrainableTokensConfig`): new values for
//!   a few listed rows, the rest of the table frozen and not saved
//!   ([`EmbeddingCopyKind::Tokens`]).
//!
//! A model whose output head is the embedding matrix (tied, as GPT-2 and
//! SmolLM2) asks the slot for the head's matrix too
//! ([`EmbeddingSlot::tied_head`]): retrained tokens always reach it, as
//! PEFT ties their adapter to the head; a full copy reaches it only with
//! `ensure_weight_tying` (PEFT leaves the head on the base table otherwise,
//! and says so in a warning).

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::module::embedding;
use burn::tensor::{Bool, Distribution, IndexingUpdateOp, Int, Tensor, TensorData};

use std::collections::HashMap;
use std::path::Path;

use super::copies::{activate, AdapterCopy};
use crate::error::{PeftError, Result};
use crate::io::{take_tensor, HostTensor, KEY_PREFIX};
use crate::routing;

/// What an adapter's copy of an embedding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmbeddingCopyKind {
    /// PEFT's `modules_to_save`: the whole table, saved under
    /// `<path>.weight`; `unload` leaves the active adapter's copy in place.
    Saved {
        /// What a tied output head computes with.
        head: TiedHead,
    },
    /// Trainable tokens: new values of the listed rows, saved under
    /// `<path>.<key>` (values, not deltas, whatever PEFT's name says);
    /// `unload` gives the base rows back.
    Tokens {
        /// [`TOKENS_BESIDE_KEY`] beside another method (LoRA's
        /// `trainable_token_indices`), [`TOKENS_KEY`] for the trainable
        /// tokens method itself.
        key: &'static str,
    },
}

/// The key suffix of tokens retrained beside another method (PEFT wraps
/// the embedding, the tokens are its `token_adapter`).
pub const TOKENS_BESIDE_KEY: &str = "token_adapter.trainable_tokens_delta";

/// The key suffix of the trainable tokens method's own rows.
pub const TOKENS_KEY: &str = "trainable_tokens_delta";

/// What the output head of a model whose head is its token table does
/// with an adapter's full copy of that table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TiedHead {
    /// The model's head is not this table (untied, or no head).
    Untied,
    /// The head uses the copy too (`ensure_weight_tying`); the file holds
    /// the copy under the head's key as well.
    Follows,
    /// The head keeps the base table, also once the copy is merged.
    KeepsBase,
}

impl EmbeddingCopyKind {
    /// Whether the copy is the whole table.
    pub fn is_full(self) -> bool {
        matches!(self, EmbeddingCopyKind::Saved { .. })
    }
}

/// One adapter's trainable part of an embedding table.
#[derive(Module, Debug)]
pub struct EmbeddingCopy<B: Backend> {
    /// `Saved`: the table `[vocab, d]`; `Tokens`: the listed rows' values
    /// `[n, d]`, row `i` for token `indices[i]`.
    pub weight: Param<Tensor<B, 2>>,
    /// `Tokens`: the retrained token ids, distinct, in PEFT's order; empty
    /// for `Saved`.
    #[module(skip)]
    pub indices: Vec<usize>,
    /// The adapter's name.
    #[module(skip)]
    pub name: String,
    /// What the copy is.
    #[module(skip)]
    pub kind: EmbeddingCopyKind,
}

impl<B: Backend> AdapterCopy for EmbeddingCopy<B> {
    fn adapter(&self) -> &str {
        &self.name
    }

    fn with_training(self, train: bool) -> Self {
        EmbeddingCopy {
            weight: self.weight.set_require_grad(train),
            ..self
        }
    }
}

impl<B: Backend> EmbeddingCopy<B> {
    /// Whether a tied output head uses this copy.
    fn reaches_head(&self) -> bool {
        match self.kind {
            EmbeddingCopyKind::Saved { head } => head == TiedHead::Follows,
            EmbeddingCopyKind::Tokens { .. } => true,
        }
    }

    fn index(&self, device: &B::Device) -> Tensor<B, 1, Int> {
        index(&self.indices, device)
    }
}

/// `ids` as an index tensor.
fn index<B: Backend>(ids: &[usize], device: &B::Device) -> Tensor<B, 1, Int> {
    let ids: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    let n = ids.len();
    Tensor::from_data(TensorData::new(ids, [n]), device)
}

/// Scatters add (into zeros, where that is exact): every backend's
/// autodiff supports it.
const ADD: IndexingUpdateOp = IndexingUpdateOp::Add;

/// `table` `[vocab, d]` with rows `rows` replaced by `values` `[n, d]`
/// bit for bit (PEFT's `index_copy`: the values are selected, not added to
/// the old rows), differentiable in both.
fn replace_rows<B: Backend>(
    table: Tensor<B, 2>,
    rows: &[usize],
    values: Tensor<B, 2>,
) -> Tensor<B, 2> {
    let [vocab, d] = table.dims();
    let device = table.device();
    let scattered =
        Tensor::zeros([vocab, d], &device).select_assign(0, index(rows, &device), values, ADD);
    let mut chosen = vec![false; vocab];
    for &r in rows {
        chosen[r] = true;
    }
    let mask = Tensor::<B, 1, Bool>::from_data(TensorData::new(chosen, [vocab]), &device)
        .reshape([vocab, 1])
        .expand([vocab, d]);
    table.mask_where(mask, scattered)
}

/// Slot-level state of an [`EmbeddingSlot`] that is not a parameter.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EmbeddingSlotState {
    /// The active adapters that have a copy here.
    pub active: Vec<String>,
    /// With `true`, the forward pass uses the base table.
    pub disabled: bool,
    /// The adapters whose copies are swapped into the base, in merge order.
    pub merged: Vec<String>,
}

/// An adaptable token-embedding table: the frozen base plus named copies.
#[derive(Module, Debug)]
pub struct EmbeddingSlot<B: Backend> {
    /// The base table `[vocab, d]` (Burn's `Embedding` layout, which is
    /// also PyTorch's). Frozen.
    pub weight: Param<Tensor<B, 2>>,
    /// The adapters' copies, in the order added; names unique.
    pub copies: Vec<EmbeddingCopy<B>>,
    /// While (and after unloading, for good) a full copy that does not
    /// reach the head is merged, the base table the tied head keeps using
    /// `[vocab, d]`. Frozen.
    pub head_base: Option<Param<Tensor<B, 2>>>,
    /// Activation, disabling and merge state.
    #[module(skip)]
    pub state: EmbeddingSlotState,
}

impl<B: Backend> EmbeddingSlot<B> {
    /// A slot over the table `weight` `[vocab, d]`, frozen, with no copy.
    pub fn new(weight: Tensor<B, 2>) -> Self {
        EmbeddingSlot {
            weight: Param::from_tensor(weight).set_require_grad(false),
            copies: Vec::new(),
            head_base: None,
            state: EmbeddingSlotState::default(),
        }
    }

    /// Rows of the table (the vocabulary).
    pub fn vocab(&self) -> usize {
        self.weight.dims()[0]
    }

    /// Width of a row.
    pub fn width(&self) -> usize {
        self.weight.dims()[1]
    }

    /// Adapter `name`'s copy, if it has one here.
    pub fn copy(&self, name: &str) -> Option<&EmbeddingCopy<B>> {
        self.copies.iter().find(|c| c.name == name)
    }

    /// Adds adapter `name`'s full copy of the table (PEFT's
    /// `modules_to_save`; `head`: what a tied output head does with it),
    /// frozen until activated.
    pub fn add_saved(&mut self, name: &str, head: TiedHead) -> Result<()> {
        let weight = self.weight.val().detach();
        self.push(name, weight, Vec::new(), EmbeddingCopyKind::Saved { head })
    }

    /// Adds adapter `name`'s trainable `tokens` (module `path`, saved under
    /// `key`), started at their base rows as PEFT's `init_weights=True`
    /// does (standard normal values with `random`), frozen until
    /// activated. Ids past the vocabulary, repeated ids and an empty list
    /// are refused naming the layer.
    pub fn add_tokens(
        &mut self,
        name: &str,
        path: &str,
        tokens: &[usize],
        key: &'static str,
        random: bool,
    ) -> Result<()> {
        let vocab = self.vocab();
        if tokens.is_empty() {
            return Err(PeftError::Config(format!(
                "{path}: trainable tokens need at least one token index"
            )));
        }
        if let Some(bad) = tokens.iter().find(|&&t| t >= vocab) {
            return Err(PeftError::Config(format!(
                "{path}: trainable token index {bad} is past the vocabulary ({vocab} rows)"
            )));
        }
        let mut seen = tokens.to_vec();
        seen.sort_unstable();
        if let Some(w) = seen.windows(2).find(|w| w[0] == w[1]) {
            return Err(PeftError::Config(format!(
                "{path}: trainable token index {} is listed twice",
                w[0]
            )));
        }
        let device = self.weight.device();
        let rows = match random {
            false => self.weight.val().select(0, index(tokens, &device)).detach(),
            true => Tensor::random(
                [tokens.len(), self.width()],
                Distribution::Normal(0.0, 1.0),
                &device,
            ),
        };
        self.push(
            name,
            rows,
            tokens.to_vec(),
            EmbeddingCopyKind::Tokens { key },
        )
    }

    fn push(
        &mut self,
        name: &str,
        weight: Tensor<B, 2>,
        indices: Vec<usize>,
        kind: EmbeddingCopyKind,
    ) -> Result<()> {
        if self.copy(name).is_some() {
            return Err(PeftError::DuplicateAdapter(name.to_string()));
        }
        self.copies.push(
            EmbeddingCopy {
                weight: Param::from_tensor(weight),
                indices,
                name: name.to_string(),
                kind,
            }
            .with_training(false),
        );
        Ok(())
    }

    /// Removes adapter `name`'s copy (unmerging first if it is merged).
    /// Returns whether there was one.
    pub fn remove(&mut self, name: &str) -> bool {
        if self.state.merged.iter().any(|n| n == name) {
            self.unmerge();
        }
        let before = self.copies.len();
        self.copies.retain(|c| c.name != name);
        self.state.active.retain(|n| n != name);
        before != self.copies.len()
    }

    /// Removes every copy and resets the state (a merged copy stays in the
    /// base; the tied head keeps the table it used).
    pub fn clear(&mut self) {
        self.copies.clear();
        self.state = EmbeddingSlotState::default();
    }

    /// Refuses activating (or merging) `names` together where PEFT does:
    /// two full copies of one table, a full copy beside retrained tokens,
    /// or two adapters retraining one token (PEFT: "only disjunct token
    /// indices are currently supported").
    pub fn check_together(&self, names: &[String], path: &str) -> Result<()> {
        let here: Vec<&EmbeddingCopy<B>> = names.iter().filter_map(|n| self.copy(n)).collect();
        let saved: Vec<&str> = here
            .iter()
            .filter(|c| c.kind.is_full())
            .map(|c| c.name.as_str())
            .collect();
        if !saved.is_empty() && here.len() > 1 {
            let all: Vec<&str> = here.iter().map(|c| c.name.as_str()).collect();
            return Err(PeftError::Config(format!(
                "{path}: adapters {all:?} each change this embedding and {saved:?} keep a full \
                 copy of it (modules_to_save); only one of them can be active at a time, as in \
                 PEFT"
            )));
        }
        let mut taken: HashMap<usize, &str> = HashMap::new();
        for c in &here {
            for t in &c.indices {
                if let Some(other) = taken.insert(*t, &c.name) {
                    return Err(PeftError::Config(format!(
                        "{path}: token {t} is retrained by adapters `{other}` and `{}`; only \
                         disjoint token indices can be active together, as in PEFT",
                        c.name
                    )));
                }
            }
        }
        Ok(())
    }

    /// Makes `names` (those with a copy here) the active adapters: their
    /// copies train, the others are frozen.
    pub fn set_active(&mut self, names: &[String]) {
        self.state.active = activate(&mut self.copies, names);
    }

    /// Whether a copy is swapped into the base.
    pub fn any_merged(&self) -> bool {
        !self.state.merged.is_empty()
    }

    /// Swaps adapter `name`'s copy into the base: a full copy replaces the
    /// table (one merged at a time, as PEFT swaps its module in), tokens
    /// their rows (PEFT's `index_copy`); the copy keeps what it replaced,
    /// for [`unmerge`](Self::unmerge). Returns `false` when `name` has no
    /// copy here or is merged already.
    pub fn merge(&mut self, name: &str) -> bool {
        let Some(copy) = self.copy(name) else {
            return false;
        };
        if self.state.merged.iter().any(|n| n == name) {
            return false;
        }
        let full = copy.kind.is_full();
        let full_merged = self
            .state
            .merged
            .iter()
            .any(|n| self.copy(n).is_some_and(|c| c.kind.is_full()));
        if full || full_merged {
            self.unmerge();
        }
        let copy = self.copy(name).expect("checked above");
        let keeps_base = copy.kind
            == EmbeddingCopyKind::Saved {
                head: TiedHead::KeepsBase,
            };
        if keeps_base && self.head_base.is_none() {
            let base = self.weight.val().detach();
            self.head_base = Some(Param::from_tensor(base).set_require_grad(false));
        }
        self.swap(name);
        self.state.merged.push(name.to_string());
        true
    }

    /// Swaps every merged copy back out, newest first. Returns whether one
    /// was merged.
    pub fn unmerge(&mut self) -> bool {
        let merged = std::mem::take(&mut self.state.merged);
        for name in merged.iter().rev() {
            self.swap(name);
        }
        self.head_base = None;
        !merged.is_empty()
    }

    /// Exchanges the base table (or the copy's rows of it) with `name`'s
    /// copy, keeping each side's trainability.
    fn swap(&mut self, name: &str) {
        let device = self.weight.device();
        let base = self.weight.val().detach();
        let Some(copy) = self.copies.iter_mut().find(|c| c.name == name) else {
            return;
        };
        let mine = copy.weight.val().detach();
        let (base_new, copy_new) = match copy.kind {
            EmbeddingCopyKind::Tokens { .. } => {
                let old = base.clone().select(0, copy.index(&device));
                (replace_rows(base, &copy.indices, mine), old)
            }
            EmbeddingCopyKind::Saved { .. } => (mine, base),
        };
        copy.weight = copy.weight.clone().map(|_| copy_new);
        self.weight = self.weight.clone().map(|_| base_new);
    }

    /// Parameters of copies that train: active and not merged.
    pub fn trainable_params(&self) -> usize {
        self.copies
            .iter()
            .filter(|c| self.state.active.contains(&c.name))
            .filter(|c| !self.state.merged.contains(&c.name))
            .map(Module::num_params)
            .sum()
    }

    /// Whether the forward pass reads the base table only.
    fn plain(&self) -> bool {
        self.state.disabled || self.any_merged() || self.copies.is_empty()
    }

    /// The table adapters `names` make of the base (their copies applied
    /// in order; for the head only those that reach it).
    fn table(&self, names: &[String], for_head: bool) -> Tensor<B, 2> {
        let mut table = self.weight.val();
        for copy in names.iter().filter_map(|n| self.copy(n)) {
            if for_head && !copy.reaches_head() {
                continue;
            }
            table = match copy.kind {
                EmbeddingCopyKind::Saved { .. } => copy.weight.val(),
                EmbeddingCopyKind::Tokens { .. } => {
                    replace_rows(table, &copy.indices, copy.weight.val())
                }
            };
        }
        table
    }

    /// The table the tied output head uses outside a mixed batch.
    fn head_table(&self) -> Tensor<B, 2> {
        if let Some(base) = &self.head_base {
            return base.val();
        }
        if self.plain() {
            return self.weight.val();
        }
        self.table(&self.state.active, true)
    }

    /// The rows of a mixed batch grouped by the adapter whose copy they
    /// use (`None`: the base table); `None` outside a mixed batch or when
    /// no row's adapter has a copy here.
    fn row_groups(&self) -> Option<Vec<(Option<String>, Vec<i64>)>> {
        if self.plain() {
            return None;
        }
        let rows = routing::row_adapters()?;
        let mut groups: Vec<(Option<String>, Vec<i64>)> = Vec::new();
        for (i, r) in rows.iter().enumerate() {
            let key = self.copy(r).map(|c| c.name.clone());
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, members)) => members.push(i as i64),
                None => groups.push((key, vec![i as i64])),
            }
        }
        groups.iter().any(|(k, _)| k.is_some()).then_some(groups)
    }

    /// Runs `f` on each group of rows with its adapter's table and puts
    /// the results back in row order.
    fn per_group(
        &self,
        rows: usize,
        groups: Vec<(Option<String>, Vec<i64>)>,
        for_head: bool,
        f: impl Fn(Tensor<B, 1, Int>, Tensor<B, 2>) -> Tensor<B, 3>,
    ) -> Tensor<B, 3> {
        let device = self.weight.device();
        let mut out: Option<Tensor<B, 3>> = None;
        for (name, members) in groups {
            let n = members.len();
            let index = Tensor::<B, 1, Int>::from_data(TensorData::new(members, [n]), &device);
            let names: Vec<String> = name.into_iter().collect();
            let part = f(index.clone(), self.table(&names, for_head));
            let whole = out.unwrap_or_else(|| {
                let [_, t, d] = part.dims();
                Tensor::zeros([rows, t, d], &device)
            });
            out = Some(whole.select_assign(0, index, part, ADD));
        }
        out.expect("a mixed batch has rows")
    }

    /// Embeddings `[b, t, d]` of `ids` `[b, t]`: the base table's rows, or
    /// the active adapters' (in a mixed batch each row's adapter's).
    pub fn forward(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        if self.plain() {
            return embedding(self.weight.val(), ids);
        }
        if let Some(groups) = self.row_groups() {
            let rows = ids.dims()[0];
            return self.per_group(rows, groups, false, |index, table| {
                embedding(table, ids.clone().select(0, index))
            });
        }
        embedding(self.table(&self.state.active, false), ids)
    }

    /// The tied output head of hidden states `h` `[b, t, d]`: `head(h,
    /// table)` with the table the head uses (the base's, or the active
    /// adapters' where their copies reach the head; per row in a mixed
    /// batch).
    pub fn tied_head(
        &self,
        h: Tensor<B, 3>,
        head: impl Fn(Tensor<B, 3>, Tensor<B, 2>) -> Tensor<B, 3>,
    ) -> Tensor<B, 3> {
        if let Some(groups) = self.row_groups() {
            let rows = h.dims()[0];
            return self.per_group(rows, groups, true, |index, table| {
                head(h.clone().select(0, index), table)
            });
        }
        head(h, self.head_table())
    }
}

/// PEFT's file layout: a full copy under `<path>.weight` (and under
/// `<head>.weight` when it ties the head), tokens under
/// `<path>.token_adapter.trainable_tokens_delta`; no adapter name in the
/// key.
impl<B: Backend> EmbeddingSlot<B> {
    /// Appends adapter `name`'s copy of this table (module `path`; `head`:
    /// the tied output head's path, if the model has one), if it has a
    /// copy here. A merged copy's values are read from the base.
    pub fn write_copy(
        &self,
        path: &str,
        head: Option<&str>,
        name: &str,
        out: &mut Vec<(String, HostTensor)>,
    ) {
        let Some(copy) = self.copy(name) else {
            return;
        };
        let merged = self.state.merged.iter().any(|n| n == name);
        let values = match (merged, copy.kind) {
            (false, _) => copy.weight.val(),
            (true, EmbeddingCopyKind::Saved { .. }) => self.weight.val(),
            (true, EmbeddingCopyKind::Tokens { .. }) => self
                .weight
                .val()
                .select(0, copy.index(&self.weight.device())),
        };
        let values = HostTensor::from_tensor(values);
        if let (
            EmbeddingCopyKind::Saved {
                head: TiedHead::Follows,
            },
            Some(head),
        ) = (copy.kind, head)
        {
            out.push((format!("{KEY_PREFIX}{head}.weight"), values.clone()));
        }
        out.push((key(path, copy.kind), values));
    }

    /// Moves adapter `name`'s copy of this table (module `path`; `head` as
    /// for [`write_copy`](Self::write_copy)), if it has one, out of
    /// `tensors` (read from `file`), checking its shape. A copy that ties
    /// the head takes the head's tensor too where the file has it (PEFT
    /// writes it for a first adapter only), refusing one that differs.
    pub fn read_copy(
        &mut self,
        path: &str,
        head: Option<&str>,
        name: &str,
        tensors: &mut HashMap<String, HostTensor>,
        file: &Path,
    ) -> Result<()> {
        let Some(copy) = self.copy(name) else {
            return Ok(());
        };
        let (kind, device) = (copy.kind, self.weight.device());
        let shape = match kind {
            EmbeddingCopyKind::Saved { .. } => [self.vocab(), self.width()],
            EmbeddingCopyKind::Tokens { .. } => [copy.indices.len(), self.width()],
        };
        let k = key(path, kind);
        let values = take_tensor(tensors, &k, file)?;
        let weight = values.to_tensor::<B, 2>(shape, &k, &device)?;
        let head_key = head.map(|h| format!("{KEY_PREFIX}{h}.weight"));
        let tied = match (kind, head_key) {
            (
                EmbeddingCopyKind::Saved {
                    head: TiedHead::Follows,
                },
                Some(k),
            ) => tensors.remove(&k).map(|t| (k, t)),
            _ => None,
        };
        if let Some((head_key, tied)) = tied {
            if tied.shape != values.shape || tied.data != values.data {
                return Err(PeftError::Config(format!(
                    "{}: `{head_key}` differs from `{k}`, but ensure_weight_tying ties them",
                    file.display()
                )));
            }
        }
        let train = self.state.active.iter().any(|n| n == name);
        let copy = self
            .copies
            .iter_mut()
            .find(|c| c.name == name)
            .expect("checked above");
        copy.weight = Param::from_tensor(weight).set_require_grad(train);
        Ok(())
    }
}

/// The key of a copy of the table at `path` in PEFT's file.
fn key(path: &str, kind: EmbeddingCopyKind) -> String {
    match kind {
        EmbeddingCopyKind::Saved { .. } => format!("{KEY_PREFIX}{path}.weight"),
        EmbeddingCopyKind::Tokens { key } => format!("{KEY_PREFIX}{path}.{key}"),
    }
}
