//! [`AdapterHost`]: what every wrapper does with its named adapters,
//! whatever the method and wherever its adapters live (in the model's
//! slots, as virtual tokens before it, at its residual joins). A training
//! loop, a command or a server that manages adapters holds this interface;
//! what differs per method (merging, fusions, mixed batches) stays on the
//! wrappers themselves.

use std::path::Path;

use crate::count::ParamCount;
use crate::error::Result;

/// A model carrying named adapters of some method.
pub trait AdapterHost {
    /// Every adapter's name, in the order added.
    fn adapter_names(&self) -> Vec<String>;

    /// The adapters the next forward pass applies, in activation order
    /// (empty: the plain model).
    fn active_adapters(&self) -> Vec<String>;

    /// Makes `names` the active adapters, in that order (none: the plain
    /// model). A method that runs one adapter at a time refuses more, and
    /// an unknown name is an error listing the names there are; either way
    /// the activation is unchanged.
    fn activate(&mut self, names: &[&str]) -> Result<()>;

    /// Removes adapter `name` (and deactivates it).
    fn delete_adapter(&mut self, name: &str) -> Result<()>;

    /// Reads the adapter folder `dir` (its method's format) as adapter
    /// `name`, leaving the activation as it was.
    fn load_adapter(&mut self, dir: &Path, name: &str) -> Result<()>;

    /// Writes adapter `name` into `dir` in its method's format (what
    /// [`load_adapter`](Self::load_adapter) reads, and PEFT or AdapterHub).
    fn save_adapter(&self, name: &str, dir: &Path) -> Result<()>;

    /// Trainable and total parameters.
    fn param_count(&self) -> ParamCount;
}
