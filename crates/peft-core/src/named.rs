//! A set of named adapters with at most one active, for the methods whose
//! adapters live beside the model rather than in its slots (prefix tuning,
//! prompt tuning, P-tuning).

use indexmap::IndexMap;

use crate::error::{PeftError, Result};

/// Named adapters of one kind, in insertion order, at most one active, and
/// a switch that runs the plain model without forgetting which is active.
#[derive(Debug, Clone)]
pub struct NamedAdapters<T> {
    entries: IndexMap<String, T>,
    active: Option<String>,
    disabled: bool,
}

impl<T> Default for NamedAdapters<T> {
    fn default() -> Self {
        NamedAdapters {
            entries: IndexMap::new(),
            active: None,
            disabled: false,
        }
    }
}

impl<T> NamedAdapters<T> {
    /// Adds `value` as `name`; an existing name is an error.
    pub fn insert(&mut self, name: &str, value: T) -> Result<()> {
        if self.entries.contains_key(name) {
            return Err(PeftError::DuplicateAdapter(name.to_string()));
        }
        self.entries.insert(name.to_string(), value);
        Ok(())
    }

    /// The adapter `name`.
    pub fn get(&self, name: &str) -> Result<&T> {
        self.entries.get(name).ok_or_else(|| self.unknown(name))
    }

    /// Where adapter `name` stands in insertion order: the index of its
    /// value in a list kept beside this set (a wrapper's Burn modules).
    pub fn index_of(&self, name: &str) -> Result<usize> {
        self.entries
            .get_index_of(name)
            .ok_or_else(|| self.unknown(name))
    }

    /// The adapter `name`, mutably.
    pub fn get_mut(&mut self, name: &str) -> Result<&mut T> {
        if !self.entries.contains_key(name) {
            return Err(self.unknown(name));
        }
        Ok(self.entries.get_mut(name).expect("checked above"))
    }

    /// Removes adapter `name` (deactivating it if it was active).
    pub fn remove(&mut self, name: &str) -> Result<T> {
        let value = self
            .entries
            .shift_remove(name)
            .ok_or_else(|| self.unknown(name))?;
        if self.active.as_deref() == Some(name) {
            self.active = None;
        }
        Ok(value)
    }

    /// Makes `name` the active adapter.
    pub fn set_active(&mut self, name: &str) -> Result<()> {
        self.get(name)?;
        self.active = Some(name.to_string());
        Ok(())
    }

    /// The active adapter, if any.
    pub fn active(&self) -> Option<(&str, &T)> {
        let name = self.active.as_deref()?;
        self.entries.get(name).map(|v| (name, v))
    }

    /// The adapter a forward pass uses: the active one unless disabled.
    pub fn running(&self) -> Option<(&str, &T)> {
        if self.disabled {
            None
        } else {
            self.active()
        }
    }

    /// Runs the plain model (no adapter) until [`enable`](Self::enable).
    pub fn disable(&mut self) {
        self.disabled = true;
    }

    /// Undoes [`disable`](Self::disable).
    pub fn enable(&mut self) {
        self.disabled = false;
    }

    /// Adapter names, in insertion order.
    pub fn names(&self) -> Vec<String> {
        self.entries.keys().cloned().collect()
    }

    /// `(name, adapter)` pairs, in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &T)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    fn unknown(&self, name: &str) -> PeftError {
        PeftError::UnknownAdapter {
            name: name.to_string(),
            available: self.names(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_activation_and_errors() {
        let mut a = NamedAdapters::default();
        a.insert("x", 1).unwrap();
        a.insert("y", 2).unwrap();
        assert!(matches!(
            a.insert("x", 3),
            Err(PeftError::DuplicateAdapter(_))
        ));
        assert!(a.active().is_none());
        a.set_active("y").unwrap();
        assert_eq!(a.active(), Some(("y", &2)));
        let err = a.set_active("z").unwrap_err().to_string();
        assert!(err.contains("`z`") && err.contains("\"x\""), "{err}");
        *a.get_mut("x").unwrap() = 5;
        assert_eq!(a.remove("y").unwrap(), 2);
        assert!(a.active().is_none(), "removing the active one deactivates");
        assert_eq!(a.names(), vec!["x"]);
        assert_eq!(*a.get("x").unwrap(), 5);
        a.set_active("x").unwrap();
        a.disable();
        assert!(a.running().is_none(), "disabled runs nothing");
        a.enable();
        assert_eq!(a.running(), Some(("x", &5)));
        a.insert("z", 7).unwrap();
        assert_eq!(
            a.index_of("z").unwrap(),
            1,
            "insertion order after a removal"
        );
        assert!(a.index_of("y").is_err());
    }
}
