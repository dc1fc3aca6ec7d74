//! The key/value cache: the seam through which prefix tuning and generation
//! reach a model's attention layers.

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

/// One layer's cached keys and values, `[b, kv_heads, s, head_dim]`, keys
/// after RoPE. Prefix tuning puts its virtual keys/values here first.
#[derive(Debug, Clone, Default)]
pub struct LayerCache<B: Backend> {
    /// Keys.
    pub k: Option<Tensor<B, 4>>,
    /// Values.
    pub v: Option<Tensor<B, 4>>,
}

impl<B: Backend> LayerCache<B> {
    /// Appends `k, v` and returns the whole cached keys and values.
    pub fn append(&mut self, k: Tensor<B, 4>, v: Tensor<B, 4>) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let k = match self.k.take() {
            Some(old) => Tensor::cat(vec![old, k], 2),
            None => k,
        };
        let v = match self.v.take() {
            Some(old) => Tensor::cat(vec![old, v], 2),
            None => v,
        };
        self.k = Some(k.clone());
        self.v = Some(v.clone());
        (k, v)
    }

    /// [`append`](Self::append) when an attention layer runs with a cache,
    /// `k, v` unchanged when it runs without one.
    pub fn append_to(
        cache: Option<&mut Self>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        match cache {
            Some(c) => c.append(k, v),
            None => (k, v),
        }
    }
}

/// The key/value cache of a whole model, one [`LayerCache`] per layer.
#[derive(Debug, Clone, Default)]
pub struct KvCache<B: Backend> {
    /// Per-layer caches.
    pub layers: Vec<LayerCache<B>>,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache.
    pub fn new() -> Self {
        KvCache { layers: Vec::new() }
    }
    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.k.as_ref())
            .map(|k| k.dims()[2])
            .unwrap_or(0)
    }
    /// Makes this a cache for `layers` layers, starting empty if it was
    /// shaped for another number of layers.
    pub fn ensure_layers(&mut self, layers: usize) {
        if self.layers.len() != layers {
            self.layers = (0..layers).map(|_| LayerCache::default()).collect();
        }
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    // What a server needs to keep sequences of different lengths in one
    // cache: each row left-padded to the longest, with
    // `ModelInput::left_padding` telling the model how much.

    /// Batch rows in the cache (0 when empty).
    pub fn rows(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.k.as_ref())
            .map(|k| k.dims()[0])
            .unwrap_or(0)
    }

    /// Every key and value tensor through `f`.
    fn map(&self, f: impl Fn(Tensor<B, 4>) -> Tensor<B, 4>) -> Self {
        KvCache {
            layers: self
                .layers
                .iter()
                .map(|l| LayerCache {
                    k: l.k.clone().map(&f),
                    v: l.v.clone().map(&f),
                })
                .collect(),
        }
    }

    /// The cache with `n` positions of zeros before every row's positions.
    pub fn pad_left(&self, n: usize) -> Self {
        if n == 0 {
            return self.clone();
        }
        self.map(|x| {
            let [b, h, _, d] = x.dims();
            Tensor::cat(vec![Tensor::zeros([b, h, n, d], &x.device()), x], 2)
        })
    }

    /// The first `n` positions of every row dropped.
    pub fn drop_front(&self, n: usize) -> Self {
        self.map(|x| {
            let s = x.dims()[2];
            x.narrow(2, n, s - n)
        })
    }

    /// Rows `rows` kept, in that order.
    pub fn select_rows(&self, rows: &[usize]) -> Self {
        let index: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
        self.map(|x| {
            let idx = Tensor::from_data(TensorData::new(index.clone(), [rows.len()]), &x.device());
            x.select(0, idx)
        })
    }

    /// Caches of the same length and layer count as one batch, rows in
    /// order. Panics on caches that do not fit together (a caller's bug:
    /// pad them to one length first).
    pub fn cat_rows(caches: Vec<Self>) -> Self {
        let layers = caches.first().map_or(0, |c| c.layers.len());
        assert!(
            caches.iter().all(|c| c.layers.len() == layers),
            "caches of different layer counts"
        );
        let cat = |pick: &dyn Fn(&LayerCache<B>) -> Option<Tensor<B, 4>>, i: usize| {
            let parts: Option<Vec<_>> = caches.iter().map(|c| pick(&c.layers[i])).collect();
            parts.map(|p| Tensor::cat(p, 0))
        };
        KvCache {
            layers: (0..layers)
                .map(|i| LayerCache {
                    k: cat(&|l| l.k.clone(), i),
                    v: cat(&|l| l.v.clone(), i),
                })
                .collect(),
        }
    }
}
