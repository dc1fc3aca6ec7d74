//! The optimizer and its state in a `last/` checkpoint, keyed by each
//! parameter's position in visiting order (parameter ids differ between
//! processes), so that `--resume` continues with the same moments.

use std::collections::HashMap;
use std::path::Path;

use burn::module::{AutodiffModule, ParamId};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamW, Optimizer};
use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Tensor;
use peft_core::{PeftError, Result};

/// AdamW over the whole module (only parameters with gradients move).
pub(super) type Optim<M, B> = OptimizerAdaptor<AdamW, M, B>;

/// The optimizer's state: per parameter id.
pub(super) type OptimRecord<M, B> = <Optim<M, B> as Optimizer<M, B>>::Record;

/// The optimizer state's file in a `last/` checkpoint.
pub(super) const OPTIMIZER_FILE: &str = "optimizer.bin";

/// `optim` with the state saved in `dir` (a `last/` checkpoint) for
/// `model`'s parameters; a damaged state, or one for other parameters or
/// shapes, is an error naming the file.
pub(super) fn load_state<B: AutodiffBackend, M: AutodiffModule<B>>(
    optim: Optim<M, B>,
    model: &M,
    dir: &Path,
    device: &B::Device,
) -> Result<Optim<M, B>> {
    let recorder = BinBytesRecorder::<FullPrecisionSettings>::default();
    let path = dir.join(OPTIMIZER_FILE);
    let bytes = std::fs::read(&path).map_err(|source| PeftError::Io {
        path: path.clone(),
        source,
    })?;
    let damaged = |message: String| PeftError::Checkpoint {
        path: path.clone(),
        message,
    };
    // Burn's record conversion panics (rather than erring) on a tensor
    // whose rank or size disagrees with its shape (found by `cargo fuzz
    // run run_state`): a damaged file must be an error, not a crash.
    let loaded =
        peft_core::error::catch_panic(|| recorder.load::<OptimRecord<M, B>>(bytes, device), "");
    let saved: OptimRecord<M, B> = match loaded {
        Ok(Ok(saved)) => saved,
        Ok(Err(e)) => return Err(damaged(format!("optimizer state does not load: {e}"))),
        Err(why) => {
            return Err(damaged(format!(
                "optimizer state is damaged: {}",
                why.trim()
            )))
        }
    };
    // Saved under visiting positions; this process's ids differ.
    let ids = param_ids(model);
    let shapes = param_shapes(model);
    let mut record = Vec::new();
    for (position, value) in saved {
        let at = position.val() as usize;
        let id = ids.get(at).ok_or_else(|| {
            damaged("optimizer state for a parameter this model does not have".into())
        })?;
        // A moment of another shape would fail (panic) in the first
        // optimizer step; refuse it here, naming the parameter.
        if moment_shapes(&value).is_none_or(|m| m.iter().any(|d| *d != shapes[at])) {
            return Err(damaged(format!(
                "optimizer state of parameter {at} does not have its shape {:?}",
                shapes[at]
            )));
        }
        record.push((*id, value));
    }
    Ok(optim.load_record(record.into_iter().collect()))
}

/// An optimizer state (`optim.to_record()`, or several groups' joined) as
/// bytes for [`OPTIMIZER_FILE`], keyed by `model`'s visiting positions.
pub(super) fn record_bytes<B: AutodiffBackend, M: AutodiffModule<B>>(
    record: OptimRecord<M, B>,
    model: &M,
) -> Result<Vec<u8>> {
    let positions: HashMap<ParamId, usize> = param_ids(model)
        .into_iter()
        .enumerate()
        .map(|(p, id)| (id, p))
        .collect();
    let record: OptimRecord<M, B> = record
        .into_iter()
        .filter_map(|(id, v)| positions.get(&id).map(|&p| (ParamId::from(p as u64), v)))
        .collect();
    BinBytesRecorder::<FullPrecisionSettings>::default()
        .record(record, ())
        .map_err(|e| PeftError::State(format!("optimizer state: {e}")))
}

/// Float parameters of `module` in visiting order: the key that maps
/// optimizer state across processes (parameter ids are per process).
fn param_ids<B: burn::tensor::backend::Backend, M: burn::module::Module<B>>(
    module: &M,
) -> Vec<burn::module::ParamId> {
    struct Ids(Vec<burn::module::ParamId>);
    impl<B: burn::tensor::backend::Backend> burn::module::ModuleVisitor<B> for Ids {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<B, D>>) {
            self.0.push(param.id);
        }
    }
    let mut ids = Ids(Vec::new());
    module.visit(&mut ids);
    ids.0
}

/// The shapes of float parameters of `module`, in [`param_ids`]' order.
fn param_shapes<B: burn::tensor::backend::Backend, M: burn::module::Module<B>>(
    module: &M,
) -> Vec<Vec<usize>> {
    struct Shapes(Vec<Vec<usize>>);
    impl<B: burn::tensor::backend::Backend> burn::module::ModuleVisitor<B> for Shapes {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<B, D>>) {
            self.0.push(param.val().dims().to_vec());
        }
    }
    let mut shapes = Shapes(Vec::new());
    module.visit(&mut shapes);
    shapes.0
}

/// The shapes of a saved AdamW state's two moments; `None` for a rank no
/// parameter of ours has (above 4).
fn moment_shapes<B: AutodiffBackend>(
    record: &burn::optim::record::AdaptorRecord<AdamW, B>,
) -> Option<[Vec<usize>; 2]> {
    use burn::optim::record::{AdaptorRecord, AdaptorRecordV1};
    let AdaptorRecord::V1(v1) = record;
    macro_rules! moments {
        ($s:expr) => {
            Some([
                $s.momentum.moment_1.dims().to_vec(),
                $s.momentum.moment_2.dims().to_vec(),
            ])
        };
    }
    match v1 {
        AdaptorRecordV1::Rank1(s) => moments!(s),
        AdaptorRecordV1::Rank2(s) => moments!(s),
        AdaptorRecordV1::Rank3(s) => moments!(s),
        AdaptorRecordV1::Rank4(s) => moments!(s),
        _ => None,
    }
}
