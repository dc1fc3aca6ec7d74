//! The per-forward routing context.
//!
//! Mixed-batch inference sends each batch row through a different adapter.
//! The names travel to every [`LinearSlot`](crate::LinearSlot) through a
//! scoped thread-local, so a model's forward signature stays the one its
//! author wrote. Burn dispatches operations from the calling thread, so the
//! context is visible wherever the forward pass runs.

use std::cell::RefCell;
use std::rc::Rc;

thread_local! {
    static ROW_ADAPTERS: RefCell<Option<Rc<[String]>>> = const { RefCell::new(None) };
}

/// Restores the previous context when dropped, also on panic.
struct Restore(Option<Rc<[String]>>);

impl Drop for Restore {
    fn drop(&mut self) {
        let prev = self.0.take();
        ROW_ADAPTERS.with(|r| *r.borrow_mut() = prev);
    }
}

/// Runs `f` with one adapter name per batch row ([`crate::BASE_ROW`] for the
/// base model). Contexts nest; the innermost wins.
///
/// This is the low-level mechanism: use `peft_lora::LoraModel::forward_mixed`
/// (or the equivalent of another method crate), which validates the names
/// first.
pub fn with_row_adapters<R>(names: &[String], f: impl FnOnce() -> R) -> R {
    let new: Rc<[String]> = names.to_vec().into();
    let prev = ROW_ADAPTERS.with(|r| r.borrow_mut().replace(new));
    let _restore = Restore(prev);
    f()
}

/// The per-row adapter names of the innermost enclosing
/// [`with_row_adapters`], if any.
pub fn row_adapters() -> Option<Rc<[String]>> {
    ROW_ADAPTERS.with(|r| r.borrow().clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nests_and_restores() {
        assert!(row_adapters().is_none());
        let outer = vec!["a".to_string()];
        let inner = vec!["b".to_string(), "c".to_string()];
        with_row_adapters(&outer, || {
            assert_eq!(&*row_adapters().unwrap(), &outer[..]);
            with_row_adapters(&inner, || assert_eq!(row_adapters().unwrap().len(), 2));
            assert_eq!(&*row_adapters().unwrap(), &outer[..]);
        });
        assert!(row_adapters().is_none());
        let r = std::panic::catch_unwind(|| with_row_adapters(&outer, || panic!("x")));
        assert!(r.is_err());
        assert!(row_adapters().is_none());
    }
}
