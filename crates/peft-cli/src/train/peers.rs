//! Data parallelism: this process's replicas as peers of Burn's collective,
//! and, in a multi-machine job, the other nodes' through the orchestrator.

use burn::module::AutodiffModule;
use burn::module::ParamId;
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Tensor;
use peft_core::model::device_of;
use peft_core::{PeftError, Result};
use serde_json::json;

use super::config::Cluster;
use super::grads::{differentiate, BatchLoss, FreshLeaves};

/// The data-parallel workers of a run: this process's peers of Burn's
/// collective (one per device), registered for the run's lifetime and, in a
/// multi-machine job, joined to the other nodes' through the orchestrator.
pub(super) struct Peers<B: AutodiffBackend> {
    /// Replica `i`'s device (one per replica in this process).
    devices: Vec<B::Device>,
    /// Index of this process's first shard among all the job's shards.
    first: usize,
    /// Shards of each micro-batch over the whole job.
    total: usize,
    _b: std::marker::PhantomData<B>,
}

impl<B: AutodiffBackend> Peers<B> {
    /// `None` for one device on one machine; otherwise `devices` registered
    /// peers, peer `i` on [`replica_device`]`(device, i)`.
    pub(super) fn register(
        devices: usize,
        cluster: Option<&Cluster>,
        device: &B::Device,
    ) -> Result<Option<Self>> {
        use burn::collective::{register, reset_collective, AllReduceStrategy, CollectiveConfig};
        if devices <= 1 && cluster.is_none() {
            return Ok(None);
        }
        // A run that failed earlier in this process may have left peers.
        reset_collective::<B::InnerBackend>();
        let mut config = CollectiveConfig::default().with_num_devices(devices);
        let (first, total) = match cluster {
            None => (0, devices),
            Some(c) => {
                let address = |a: &str| {
                    a.parse::<burn_communication::Address>()
                        .map_err(|e| PeftError::Config(format!("address {a}: {e}")))
                };
                // A tree, not Burn's default ring, across nodes: a ring
                // cuts every tensor into one slice per node and refuses
                // tensors smaller than that (a bias of a small head).
                config = config
                    .with_num_nodes(c.nodes as u32)
                    .with_global_address(address(&c.orchestrator)?)
                    .with_node_address(address(&c.address)?)
                    .with_data_service_port(c.data_port()?)
                    .with_global_all_reduce_strategy(AllReduceStrategy::Tree(2));
                (c.rank * devices, c.nodes * devices)
            }
        };
        let placed: Vec<B::Device> = (0..devices).map(|i| replica_device(device, i)).collect();
        // Registration is a barrier: every peer registers at once (and, in
        // a multi-machine job, every node).
        std::thread::scope(|s| {
            let joins: Vec<_> = placed
                .iter()
                .enumerate()
                .map(|(i, device)| {
                    let (device, config) = (device.clone(), config.clone());
                    s.spawn(move || register::<B::InnerBackend>(i.into(), device, config))
                })
                .collect();
            joins
                .into_iter()
                .map(|j| j.join().expect("a registering thread panicked"))
                .collect::<std::result::Result<Vec<()>, _>>()
        })
        .map_err(|e| PeftError::State(format!("data-parallel peers do not register: {e:?}")))?;
        Ok(Some(Peers {
            devices: placed,
            first,
            total,
            _b: std::marker::PhantomData,
        }))
    }

    /// One micro-batch cut into the job's `total` contiguous shards, this
    /// process's run each on its own replica of `model` in its own thread;
    /// every shard's gradient is weighted by its share of the micro-batch
    /// (times `weight`), and an all-reduce sums the gradients, the loss and
    /// the token count over every shard of the job. A shard past the end of
    /// a short last batch contributes zeros (the all-reduce needs every
    /// peer). Returns the weighted mean loss, the tokens, the summed
    /// gradients, and each local shard's rows and mean loss.
    pub(super) fn step<M, L>(
        &self,
        model: &M,
        batch: &[usize],
        weight: f64,
        loss: &L,
    ) -> Result<(f64, usize, GradientsParams, Vec<Shard>)>
    where
        M: AutodiffModule<B> + Clone,
        L: Fn(&M, &[usize]) -> Result<(BatchLoss<B>, usize)> + Sync,
    {
        use burn::collective::{PeerId, ReduceOperation};
        let size = batch.len().div_ceil(self.total);
        let shard = |k: usize| {
            let from = (k * size).min(batch.len());
            &batch[from..(from + size).min(batch.len())]
        };
        // Phase 1: every local shard's loss and gradients (an error here
        // leaves no local peer waiting in an all-reduce).
        let parts: Vec<Result<(f64, usize, GradientsParams, Shard)>> = std::thread::scope(|s| {
            let joins: Vec<_> = (0..self.devices.len())
                .map(|i| {
                    let rows = shard(self.first + i);
                    let mut replica = model.clone().map(&mut FreshLeaves);
                    if self.devices[i] != self.devices[0] {
                        replica = replica.fork(&self.devices[i]);
                    }
                    let share = rows.len() as f64 / batch.len() as f64;
                    s.spawn(move || {
                        // An empty shard still differentiates (one row,
                        // weight 0) so that its peer has every gradient.
                        let run = if rows.is_empty() { &batch[..1] } else { rows };
                        let (value, n, grads) =
                            differentiate(&replica, loss(&replica, run)?, weight * share);
                        let n = if rows.is_empty() { 0 } else { n };
                        let seen = Shard {
                            rows: rows.len(),
                            loss: value,
                        };
                        Ok((value * share, n, grads, seen))
                    })
                })
                .collect();
            joins
                .into_iter()
                .map(|j| j.join().expect("a data-parallel worker panicked"))
                .collect()
        });
        let parts = parts.into_iter().collect::<Result<Vec<_>>>()?;
        let shards: Vec<Shard> = parts.iter().map(|p| p.3).collect();
        let device = device_of(model);
        // Phase 2: the all-reduce, every peer at once: gradients, then the
        // loss and token count (so every node logs, and stops on, the
        // job's loss).
        let reduced: Vec<_> = std::thread::scope(|s| {
            let joins: Vec<_> = parts
                .into_iter()
                .enumerate()
                .map(|(i, (value, n, grads, _))| {
                    let (device, model) = (device.clone(), model.clone());
                    s.spawn(move || {
                        let grads = all_reduce_grads(&model, grads, PeerId::from(i))?;
                        let stats = Tensor::<B::InnerBackend, 1>::from_floats(
                            [value as f32, n as f32],
                            &device,
                        );
                        let stats = burn::collective::all_reduce::<B::InnerBackend>(
                            PeerId::from(i),
                            stats.into_primitive().tensor(),
                            ReduceOperation::Sum,
                        )?;
                        let stats: Vec<f32> = Tensor::<B::InnerBackend, 1>::from_primitive(
                            burn::tensor::TensorPrimitive::Float(stats),
                        )
                        .into_data()
                        .convert::<f32>()
                        .to_vec()
                        .unwrap_or_default();
                        Ok::<_, burn::collective::CollectiveError>((stats, grads))
                    })
                })
                .collect();
            joins
                .into_iter()
                .map(|j| j.join().expect("an all-reduce thread panicked"))
                .collect()
        });
        let mut reduced = reduced
            .into_iter()
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| PeftError::State(format!("the gradient all-reduce failed: {e:?}")))?;
        // Every peer now holds the same sums.
        let (stats, grads) = reduced.swap_remove(0);
        Ok((stats[0] as f64, stats[1].round() as usize, grads, shards))
    }
}

/// What one data-parallel replica computed for one micro-batch.
#[derive(Debug, Clone, Copy)]
pub(super) struct Shard {
    /// Rows of the micro-batch it ran (0: past the end of a short batch).
    rows: usize,
    /// Its mean loss over those rows (meaningless when `rows` is 0).
    loss: f64,
}

/// Each local replica's rows and loss since the last log line: what
/// `metrics.jsonl` shows of data parallelism (so a run can be seen to have
/// split its batches).
#[derive(Default)]
pub(super) struct ReplicaTally {
    rows: Vec<usize>,
    loss_sum: Vec<f64>,
}

impl ReplicaTally {
    pub(super) fn add(&mut self, shards: &[Shard]) {
        self.rows.resize(shards.len(), 0);
        self.loss_sum.resize(shards.len(), 0.0);
        for (i, s) in shards.iter().enumerate() {
            self.rows[i] += s.rows;
            self.loss_sum[i] += s.loss * s.rows as f64;
        }
    }

    /// `[{rows, loss}]` per replica (the row-weighted mean loss), and a
    /// fresh tally.
    pub(super) fn take(&mut self) -> serde_json::Value {
        let out = self
            .rows
            .iter()
            .zip(&self.loss_sum)
            .map(|(&rows, &sum)| json!({"rows": rows, "loss": sum / rows.max(1) as f64}))
            .collect();
        *self = Self::default();
        serde_json::Value::Array(out)
    }
}

/// The device of data-parallel replica `i`: device `i` of the main device's
/// kind (GPU `i` on CUDA or WGPU when the main device is GPU 0); on a CPU
/// backend, whose devices are all one, the main device itself.
pub fn replica_device<D: burn::tensor::backend::DeviceOps>(main: &D, i: usize) -> D {
    let id = main.to_id();
    D::from_id(burn::tensor::backend::DeviceId {
        type_id: id.type_id,
        index_id: id.index_id + i as u16,
    })
}

/// Sums every gradient over all peers of the collective, parameter by
/// parameter in the model's visiting order, which is the same in every
/// process. (Burn's `GradientsParams::all_reduce` goes in `ParamId` order,
/// and ids are drawn anew in each process: two nodes would pair different
/// parameters.)
fn all_reduce_grads<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    grads: GradientsParams,
    peer: burn::collective::PeerId,
) -> std::result::Result<GradientsParams, burn::collective::CollectiveError> {
    struct Reduce {
        grads: GradientsParams,
        peer: burn::collective::PeerId,
        done: std::collections::HashSet<ParamId>,
        error: Option<burn::collective::CollectiveError>,
    }
    impl<B: AutodiffBackend> burn::module::ModuleVisitor<B> for Reduce {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<B, D>>) {
            // A shared parameter is visited once per use, reduced once.
            if self.error.is_some() || !self.done.insert(param.id) {
                return;
            }
            let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) else {
                return;
            };
            match burn::collective::all_reduce::<B::InnerBackend>(
                self.peer,
                g.into_primitive().tensor(),
                burn::collective::ReduceOperation::Sum,
            ) {
                Ok(sum) => self.grads.register(
                    param.id,
                    Tensor::<B::InnerBackend, D>::from_primitive(
                        burn::tensor::TensorPrimitive::Float(sum),
                    ),
                ),
                Err(e) => self.error = Some(e),
            }
        }
    }
    let mut reduce = Reduce {
        grads,
        peer,
        done: Default::default(),
        error: None,
    };
    model.visit(&mut reduce);
    match reduce.error {
        Some(e) => Err(e),
        None => Ok(reduce.grads),
    }
}

impl<B: AutodiffBackend> Drop for Peers<B> {
    fn drop(&mut self) {
        for i in 0..self.devices.len() {
            // Closes the node's link to the orchestrator after the last peer.
            let _ = burn::collective::finish_collective::<B::InnerBackend>(i.into());
        }
        burn::collective::reset_collective::<B::InnerBackend>();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_of_a_cpu_backend_share_its_device() {
        let cpu = burn::backend::ndarray::NdArrayDevice::Cpu;
        assert_eq!(replica_device(&cpu, 0), cpu);
        assert_eq!(replica_device(&cpu, 3), cpu);
    }
}
