//! [`NamedModules`]: the bookkeeping of the wrappers whose adapters live
//! beside the model rather than in its slots (prefix / prompt encoders,
//! bottleneck adapters and their fusions): Burn modules by name, each with
//! its config, in insertion order. One list of entries, so names, modules
//! and configs cannot drift apart.

use std::marker::PhantomData;

use burn::module::Module;
use burn::tensor::backend::Backend;

use crate::error::{PeftError, Result};

/// Named Burn modules `M`, each with a config `C`, in insertion order.
///
/// A Burn module itself: the modules are its children (an optimizer steps
/// them, records save them); names and configs ride along, kept by the
/// inference copy (`AutodiffModule::valid`).
#[derive(Module, Debug)]
pub struct NamedModules<B: Backend, M, C> {
    /// The modules, in insertion order.
    modules: Vec<M>,
    /// Each module's name and config (entry `i` is `modules[i]`'s).
    #[module(skip)]
    entries: Vec<(String, C)>,
    _backend: PhantomData<B>,
}

impl<B: Backend, M: Module<B>, C: Clone> NamedModules<B, M, C> {
    /// No module.
    pub fn new() -> Self {
        NamedModules {
            modules: Vec::new(),
            entries: Vec::new(),
            _backend: PhantomData,
        }
    }

    /// Adds `module` as `name` with `config`; an existing name is an error.
    pub fn insert(&mut self, name: &str, module: M, config: C) -> Result<()> {
        if self.index_of(name).is_some() {
            return Err(PeftError::DuplicateAdapter(name.to_string()));
        }
        self.modules.push(module);
        self.entries.push((name.to_string(), config));
        Ok(())
    }

    /// Where `name` stands in insertion order, if present.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.entries.iter().position(|(n, _)| n == name)
    }

    /// [`index_of`](Self::index_of), or an error listing the names there are.
    pub fn find(&self, name: &str) -> Result<usize> {
        self.index_of(name)
            .ok_or_else(|| PeftError::UnknownAdapter {
                name: name.to_string(),
                available: self.names(),
            })
    }

    /// The module and config of `name`.
    pub fn get(&self, name: &str) -> Result<(&M, &C)> {
        let i = self.find(name)?;
        Ok((&self.modules[i], &self.entries[i].1))
    }

    /// The module at `i` (insertion order).
    pub fn module(&self, i: usize) -> &M {
        &self.modules[i]
    }

    /// The module at `i`, mutably.
    pub fn module_mut(&mut self, i: usize) -> &mut M {
        &mut self.modules[i]
    }

    /// The config at `i`.
    pub fn config(&self, i: usize) -> &C {
        &self.entries[i].1
    }

    /// Replaces the module at `i` by `f(module)`: an optimizer step on one.
    pub fn map_module(&mut self, i: usize, f: impl FnOnce(M) -> M) {
        let module = self.modules[i].clone();
        self.modules[i] = f(module);
    }

    /// Replaces every module by `f(name, module)`.
    pub fn map_modules(&mut self, mut f: impl FnMut(&str, M) -> M) {
        let modules = std::mem::take(&mut self.modules);
        self.modules = modules
            .into_iter()
            .zip(&self.entries)
            .map(|(m, (name, _))| f(name, m))
            .collect();
    }

    /// Removes `name`, returning its module and config.
    pub fn remove(&mut self, name: &str) -> Result<(M, C)> {
        let i = self.find(name)?;
        let module = self.modules.remove(i);
        Ok((module, self.entries.remove(i).1))
    }

    /// The names, in insertion order.
    pub fn names(&self) -> Vec<String> {
        self.entries.iter().map(|(n, _)| n.clone()).collect()
    }

    /// `(name, module, config)`, in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &M, &C)> {
        self.entries
            .iter()
            .zip(&self.modules)
            .map(|((n, c), m)| (n.as_str(), m, c))
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        self.modules.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.modules.is_empty()
    }
}

impl<B: Backend, M: Module<B>, C: Clone> Default for NamedModules<B, M, C> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::{Linear, LinearConfig};

    type Cpu = burn::backend::NdArray;

    #[test]
    fn names_modules_and_configs_stay_together() {
        let device = Default::default();
        let linear = |d| LinearConfig::new(d, 1).init::<Cpu>(&device);
        let mut set: NamedModules<Cpu, Linear<Cpu>, u32> = NamedModules::new();
        set.insert("x", linear(2), 1).unwrap();
        set.insert("y", linear(3), 2).unwrap();
        assert!(matches!(
            set.insert("x", linear(4), 3),
            Err(PeftError::DuplicateAdapter(_))
        ));
        assert_eq!(set.len(), 2, "a refused insert adds nothing");
        let err = set.get("z").unwrap_err().to_string();
        assert!(err.contains("`z`") && err.contains("\"x\""), "{err}");
        let (removed, config) = set.remove("x").unwrap();
        assert_eq!((removed.weight.dims(), config), ([2, 1], 1));
        set.insert("z", linear(5), 3).unwrap();
        assert_eq!(set.names(), ["y", "z"]);
        assert_eq!(
            set.index_of("z"),
            Some(1),
            "insertion order after a removal"
        );
        let (m, c) = set.get("z").unwrap();
        assert_eq!((m.weight.dims(), *c), ([5, 1], 3));
        set.map_modules(|name, m| if name == "y" { linear(7) } else { m });
        assert_eq!(set.module(0).weight.dims(), [7, 1]);
        assert_eq!(set.module(1).weight.dims(), [5, 1]);
        assert_eq!(set.num_params(), 7 + 1 + 5 + 1, "the modules are children");
    }
}
