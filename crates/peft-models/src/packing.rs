//! Padding removal for encoder layers: the token-wise work of a padded
//! batch (linears, layer norms, GELU) done on its real tokens only.
//!
//! A batch of sentences padded to its longest one is mostly padding when the
//! lengths vary: in the main job's recipe (Rotten Tomatoes, batches of 32)
//! real tokens are 52 % of the padded positions. Everything in an encoder
//! layer except attention acts on each position alone, so it is run on the
//! real tokens packed into one `[1, n, d]` sequence, and only attention's
//! operands are spread back to the padded `[b, t, d]` layout (the idea of
//! FlashAttention's variable-length batches and of PyTorch's nested
//! tensors).
//!
//! Exactness: a real token's output is the one the padded pass gives. Its
//! attention never reads a padded position (the padding mask gives padded
//! keys a weight of `exp(-1e30) = 0`), so what attention's operands hold
//! there does not matter; they hold a copy of packed token 0, which keeps
//! them finite. Padded queries' outputs are dropped when packing again, so
//! they neither reach the result nor send back a gradient.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

/// Where the real tokens of a padded `[b, t]` batch are.
#[derive(Debug, Clone)]
pub struct Packing<B: Backend> {
    /// Flat position `row·t + column` of each real token, in batch order: `[n]`.
    real: Tensor<B, 1, Int>,
    /// For each flat padded position, its row among the packed tokens;
    /// padding points at packed row 0: `[b·t]`.
    spread: Tensor<B, 1, Int>,
    /// As `spread`, with padding pointing at row `n` (an appended zero row): `[b·t]`.
    spread_zeroed: Tensor<B, 1, Int>,
    /// Batch rows.
    b: usize,
    /// Padded length.
    t: usize,
    /// Real tokens.
    n: usize,
    /// Each batch row's real tokens when they are its first positions
    /// (right padding, as BERT tokenizers pad): what lets attention skip the
    /// padding too ([`crate::attention::attend_real`]). `None` for any other
    /// layout (left padding, holes).
    lengths: Option<Vec<usize>>,
}

impl<B: Backend> Packing<B> {
    /// The packing of `attention_mask: [b, t]` (1 = token, 0 = padding);
    /// `None` when there is no padding to remove (or no token at all).
    pub fn of(attention_mask: &Tensor<B, 2>) -> Option<Self> {
        let [b, t] = attention_mask.dims();
        let device = attention_mask.device();
        let flags: Vec<bool> = attention_mask
            .to_data()
            .iter::<f32>()
            .map(|v| v > 0.5)
            .collect();
        let real: Vec<i64> = (0..b * t).filter(|&p| flags[p]).map(|p| p as i64).collect();
        let n = real.len();
        if n == 0 || n == b * t {
            return None;
        }
        let lengths: Vec<usize> = flags
            .chunks_exact(t)
            .map(|row| row.iter().filter(|&&f| f).count())
            .collect();
        let right_padded = flags
            .chunks_exact(t)
            .zip(&lengths)
            .all(|(row, &len)| row[..len].iter().all(|&f| f));
        let mut spread = vec![0i64; b * t];
        let mut spread_zeroed = vec![n as i64; b * t];
        for (row, &p) in real.iter().enumerate() {
            spread[p as usize] = row as i64;
            spread_zeroed[p as usize] = row as i64;
        }
        let index = |v: Vec<i64>| {
            let len = v.len();
            Tensor::<B, 1, Int>::from_data(TensorData::new(v, [len]), &device)
        };
        Some(Self {
            real: index(real),
            spread: index(spread),
            spread_zeroed: index(spread_zeroed),
            b,
            t,
            n,
            lengths: right_padded.then_some(lengths),
        })
    }

    /// Each batch row's number of real tokens when they come first in the
    /// row (right padding); `None` otherwise.
    pub fn lengths(&self) -> Option<&[usize]> {
        self.lengths.as_deref()
    }

    /// The number of real tokens.
    pub fn tokens(&self) -> usize {
        self.n
    }

    /// `[b, t, d]` → the real tokens `[1, n, d]`.
    pub fn pack(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let d = x.dims()[2];
        x.reshape([self.b * self.t, d])
            .select(0, self.real.clone())
            .reshape([1, self.n, d])
    }

    /// The real tokens `[1, n, d]` → `[b, t, d]` for attention, padded
    /// positions holding a copy of token 0 (read by no real token).
    pub fn spread(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let d = x.dims()[2];
        x.reshape([self.n, d])
            .select(0, self.spread.clone())
            .reshape([self.b, self.t, d])
    }

    /// The real tokens `[1, n, d]` → `[b, t, d]` with zeros at padded
    /// positions: a model's output.
    pub fn unpack(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let d = x.dims()[2];
        let zero = Tensor::zeros([1, d], &x.device());
        Tensor::cat(vec![x.reshape([self.n, d]), zero], 0)
            .select(0, self.spread_zeroed.clone())
            .reshape([self.b, self.t, d])
    }
}
