//! The key/value cache: the seam through which prefix tuning and generation
//! reach a model's attention layers.

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

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
}
