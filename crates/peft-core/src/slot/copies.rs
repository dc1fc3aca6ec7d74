//! What the norm and embedding slots do alike with their adapters' copies
//! of a layer's parameters ([`NormCopy`](super::NormCopy),
//! [`EmbeddingCopy`](super::EmbeddingCopy)).

/// One adapter's copy of a layer's parameters in a norm or embedding slot.
pub(crate) trait AdapterCopy: Sized {
    /// The adapter's name.
    fn adapter(&self) -> &str;

    /// The copy with its parameters set to train (`true`) or frozen.
    fn with_training(self, train: bool) -> Self;
}

/// Of `names`, those with a copy among `copies`, in order: their copies
/// are set to train, every other copy is frozen.
pub(crate) fn activate<C: AdapterCopy>(copies: &mut Vec<C>, names: &[String]) -> Vec<String> {
    let active: Vec<String> = names
        .iter()
        .filter(|n| copies.iter().any(|c| c.adapter() == n.as_str()))
        .cloned()
        .collect();
    *copies = std::mem::take(copies)
        .into_iter()
        .map(|c| {
            let train = active.iter().any(|a| a == c.adapter());
            c.with_training(train)
        })
        .collect();
    active
}
