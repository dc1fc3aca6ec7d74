//! The resident adapters of an engine: at most `max` at once, the least
//! recently used leaving first; one asked for again is loaded again from
//! its folder.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;
use std::sync::atomic::Ordering;

use super::error::ApiError;
use super::metrics::Metrics;

/// Named models, at most `max` of them.
pub struct Resident<T> {
    models: HashMap<String, (Rc<T>, u64)>,
    clock: u64,
    max: usize,
    /// Whether this set is the one `peft_adapters_resident` reports (a
    /// decoder's classifiers are a second set beside its adapters).
    gauged: bool,
}

impl<T> Resident<T> {
    /// Room for `max` models (at least one).
    pub fn new(max: usize) -> Self {
        Resident {
            models: HashMap::new(),
            clock: 0,
            max: max.max(1),
            gauged: true,
        }
    }

    /// Room for `max` models, not reported as the resident adapters
    /// (loads and evictions still count).
    pub fn ungauged(max: usize) -> Self {
        Resident {
            gauged: false,
            ..Self::new(max)
        }
    }

    fn gauge(&self, metrics: &Metrics) {
        if self.gauged {
            metrics.set_resident(self.models.len());
        }
    }

    /// Model `name`, loaded by `load` if it is not resident. A sequence
    /// holding an evicted model keeps it until it ends.
    pub fn get_or_load(
        &mut self,
        name: &str,
        metrics: &Metrics,
        load: impl FnOnce() -> peft_core::Result<T>,
    ) -> Result<Rc<T>, ApiError> {
        self.clock += 1;
        if let Some((model, used)) = self.models.get_mut(name) {
            *used = self.clock;
            return Ok(model.clone());
        }
        let loaded = catch_unwind(AssertUnwindSafe(load))
            .map_err(|_| ApiError::internal(format!("loading adapter `{name}` panicked")))?
            .map_err(|e| ApiError::bad_adapter(name, &e.to_string()))?;
        while self.models.len() >= self.max {
            let oldest = self
                .models
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(n, _)| n.clone())
                .expect("non-empty");
            self.models.remove(&oldest);
            metrics.evictions.fetch_add(1, Ordering::Relaxed);
        }
        let model = Rc::new(loaded);
        self.models
            .insert(name.to_string(), (model.clone(), self.clock));
        metrics.loads.fetch_add(1, Ordering::Relaxed);
        self.gauge(metrics);
        Ok(model)
    }

    /// Drops model `name` (running sequences keep their copy).
    pub fn remove(&mut self, name: &str, metrics: &Metrics) {
        self.models.remove(name);
        self.gauge(metrics);
    }
}
