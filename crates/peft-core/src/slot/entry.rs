//! [`SlotEntry`], the one enum over the per-layer kinds (the registry at
//! the bottom of this file), and typed access to a kind ([`EntryKind`]).

// A slot holds a handful of entries: boxing the larger kinds would save a
// few hundred bytes per entry and cost an indirection on every forward pass.
#![allow(clippy::large_enum_variant)]

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use super::adalora::AdaLoraEntry;
use super::adapter::SlotAdapter;
use super::boft::BoftEntry;
use super::ia3::Ia3Entry;
use super::loha::LohaEntry;
use super::lokr::LokrEntry;
use super::lora::LoraEntry;
use super::module_copy::ModuleCopyEntry;
use super::oft::OftEntry;
use super::vera::VeraEntry;

/// A concrete kind listed in [`SlotEntry`]: typed access from the enum.
pub trait EntryKind<B: Backend>: SlotAdapter<B> + Into<SlotEntry<B>> + Sized {
    /// The entry as this kind, if it is one.
    fn of(entry: &SlotEntry<B>) -> Option<&Self>;

    /// The entry as this kind, mutably, if it is one.
    fn of_mut(entry: &mut SlotEntry<B>) -> Option<&mut Self>;
}

/// Sets `require_grad` on every parameter of a module (kind-agnostic
/// freezing: an entry's parameters are whatever its struct holds).
pub(super) struct RequireGrad(pub bool);

impl<B: Backend> ModuleMapper<B> for RequireGrad {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        param.set_require_grad(self.0)
    }
}

impl<B: Backend> SlotEntry<B> {
    /// The entry with its parameters set to train (`true`) or frozen.
    pub(super) fn with_training(self, train: bool) -> Self {
        self.map(&mut RequireGrad(train))
    }

    /// Number of parameters the entry holds.
    pub fn num_params(&self) -> usize {
        Module::num_params(self)
    }
}

/// Declares [`SlotEntry`] over the listed kinds, with the dispatch to
/// [`SlotAdapter`] and the [`EntryKind`] conversions.
macro_rules! slot_entries {
    ($($(#[$doc:meta])* $variant:ident($kind:ident)),+ $(,)?) => {
        /// One adapter entry of any kind on a [`LinearSlot`](super::LinearSlot).
        #[derive(Module, Debug)]
        pub enum SlotEntry<B: Backend> {
            $($(#[$doc])* $variant($kind<B>),)+
        }

        impl<B: Backend> SlotEntry<B> {
            /// The entry's behaviour, whatever its kind.
            pub fn adapter(&self) -> &dyn SlotAdapter<B> {
                match self {
                    $(SlotEntry::$variant(e) => e,)+
                }
            }

            /// The entry's behaviour, mutably.
            pub fn adapter_mut(&mut self) -> &mut dyn SlotAdapter<B> {
                match self {
                    $(SlotEntry::$variant(e) => e,)+
                }
            }
        }

        $(
            impl<B: Backend> From<$kind<B>> for SlotEntry<B> {
                fn from(entry: $kind<B>) -> Self {
                    SlotEntry::$variant(entry)
                }
            }

            impl<B: Backend> EntryKind<B> for $kind<B> {
                fn of(entry: &SlotEntry<B>) -> Option<&Self> {
                    #[allow(irrefutable_let_patterns, unreachable_patterns)]
                    match entry {
                        SlotEntry::$variant(e) => Some(e),
                        _ => None,
                    }
                }

                fn of_mut(entry: &mut SlotEntry<B>) -> Option<&mut Self> {
                    #[allow(irrefutable_let_patterns, unreachable_patterns)]
                    match entry {
                        SlotEntry::$variant(e) => Some(e),
                        _ => None,
                    }
                }
            }
        )+
    };
}

// The registry: one line per per-layer kind.
slot_entries! {
    /// LoRA, rsLoRA and DoRA ([`LoraEntry`]).
    Lora(LoraEntry),
    /// (IA)³ ([`Ia3Entry`]).
    Ia3(Ia3Entry),
    /// LoHa ([`LohaEntry`]).
    Loha(LohaEntry),
    /// LoKr ([`LokrEntry`]).
    Lokr(LokrEntry),
    /// OFT ([`OftEntry`]).
    Oft(OftEntry),
    /// AdaLoRA ([`AdaLoraEntry`]).
    AdaLora(AdaLoraEntry),
    /// BOFT ([`BoftEntry`]).
    Boft(BoftEntry),
    /// VeRA ([`VeraEntry`]).
    Vera(VeraEntry),
    /// A full copy of the layer (PEFT's `modules_to_save`, [`ModuleCopyEntry`]).
    ModuleCopy(ModuleCopyEntry),
}
