//! Backend selection and the one-body-every-device test harness.
//!
//! CPU: [`CpuBackend`] is the faster of `burn-ndarray` and `burn-flex` on a
//! LoRA training step on this project's reference machine (Flex, with the
//! patches in `vendor/burn-flex`; figures in `docs/ARCHITECTURE.md`); both
//! are always compiled. GPU backends come with the `wgpu` and `cuda`
//! features.
//!
//! Choosing at run time: a [`BackendChoice`] (a [`BackendKind`] and a device
//! index) names where a job runs, and [`with_backend!`](crate::with_backend)
//! runs one generic body on it — the `peft` command and the benches have one
//! code path for every backend. A backend that this build lacks is a
//! [`PeftError::Backend`] naming the cargo feature that brings it.

use std::fmt;
use std::str::FromStr;

use burn::prelude::DeviceOps;
use burn::tensor::backend::Backend;

use crate::{PeftError, Result};

/// The default CPU backend.
pub type CpuBackend = Flex;

/// The default CPU backend with autodiff, for training.
pub type CpuTrainBackend = burn::backend::Autodiff<CpuBackend>;

/// Runs one generic test body on every compiled backend, as candle runs one
/// test on every device: `backend_tests!(my_test)` where
/// `fn my_test<B: Backend>(device: &B::Device)` expands to
/// `my_test::ndarray`, `my_test::flex` and, with the calling crate's `wgpu` /
/// `cuda` features, `my_test::wgpu` / `my_test::cuda`.
#[macro_export]
macro_rules! backend_tests {
    ($($body:ident),+ $(,)?) => {$(
        mod $body {
            #[test]
            fn ndarray() {
                super::$body::<burn::backend::NdArray>(&Default::default());
            }
            #[test]
            fn flex() {
                super::$body::<burn::backend::Flex>(&Default::default());
            }
            #[cfg(feature = "wgpu")]
            #[test]
            fn wgpu() {
                super::$body::<burn::backend::Wgpu>(&Default::default());
            }
            #[cfg(feature = "cuda")]
            #[test]
            fn cuda() {
                super::$body::<burn::backend::Cuda>(&Default::default());
            }
        }
    )+};
}

/// [`backend_tests!`] for training bodies: `fn my_test<B: AutodiffBackend>(device)`
/// runs on `Autodiff<NdArray>`, `Autodiff<Flex>` and, with the features,
/// `Autodiff<Wgpu>` / `Autodiff<Cuda>`.
#[macro_export]
macro_rules! autodiff_backend_tests {
    ($($body:ident),+ $(,)?) => {$(
        mod $body {
            use burn::backend::Autodiff;
            #[test]
            fn ndarray() {
                super::$body::<Autodiff<burn::backend::NdArray>>(&Default::default());
            }
            #[test]
            fn flex() {
                super::$body::<Autodiff<burn::backend::Flex>>(&Default::default());
            }
            #[cfg(feature = "wgpu")]
            #[test]
            fn wgpu() {
                super::$body::<Autodiff<burn::backend::Wgpu>>(&Default::default());
            }
            #[cfg(feature = "cuda")]
            #[test]
            fn cuda() {
                super::$body::<Autodiff<burn::backend::Cuda>>(&Default::default());
            }
        }
    )+};
}

/// A backend a job can run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// `burn-ndarray` (CPU, always compiled).
    Ndarray,
    /// `burn-flex` (CPU, always compiled; the default: [`CpuBackend`]).
    Flex,
    /// Burn's WGPU backend (Vulkan, Metal, DX12; lavapipe on a CPU): the
    /// `wgpu` feature.
    Wgpu,
    /// Burn's CUDA backend: the `cuda` feature.
    Cuda,
}

impl BackendKind {
    /// Every backend, compiled in or not.
    pub const ALL: [BackendKind; 4] = [Self::Ndarray, Self::Flex, Self::Wgpu, Self::Cuda];

    /// The name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ndarray => "ndarray",
            Self::Flex => "flex",
            Self::Wgpu => "wgpu",
            Self::Cuda => "cuda",
        }
    }

    /// The cargo feature that compiles this backend in (`None`: always there).
    pub fn feature(self) -> Option<&'static str> {
        match self {
            Self::Ndarray | Self::Flex => None,
            Self::Wgpu => Some("wgpu"),
            Self::Cuda => Some("cuda"),
        }
    }

    /// Whether this build has the backend.
    pub fn compiled(self) -> bool {
        match self {
            Self::Ndarray | Self::Flex => true,
            Self::Wgpu => cfg!(feature = "wgpu"),
            Self::Cuda => cfg!(feature = "cuda"),
        }
    }

    /// Whether the backend runs on the host CPU (one device, index 0).
    pub fn is_cpu(self) -> bool {
        matches!(self, Self::Ndarray | Self::Flex)
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for BackendKind {
    type Err = PeftError;

    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| PeftError::Backend {
                backend: s.to_string(),
                message: "unknown backend; one of ndarray, flex, wgpu, cuda".into(),
            })
    }
}

/// Where a job runs: a backend and, on it, a device index (`None`: the
/// backend's default device — the CPU, or the GPU the GPU runtime ranks
/// first).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendChoice {
    /// The backend.
    pub kind: BackendKind,
    /// The device index (`--device`), `None` for the default device.
    pub device: Option<usize>,
}

impl Default for BackendChoice {
    /// [`CpuBackend`] on its one device.
    fn default() -> Self {
        Self {
            kind: BackendKind::Flex,
            device: None,
        }
    }
}

impl BackendChoice {
    /// A backend on its default device.
    pub fn new(kind: BackendKind) -> Self {
        Self { kind, device: None }
    }

    /// The error for a backend this build lacks, naming its cargo feature;
    /// `Ok` when it is compiled in and a CPU backend is asked for device 0.
    pub fn check(&self) -> Result<()> {
        let err = |message: String| PeftError::Backend {
            backend: self.kind.name().into(),
            message,
        };
        if !self.kind.compiled() {
            let feature = self.kind.feature().unwrap_or("?");
            return Err(err(format!(
                "not compiled into this build; rebuild with `--features {feature}` \
                 (e.g. `cargo install --path crates/peft-cli --features {feature}`)"
            )));
        }
        match self.device {
            Some(i) if self.kind.is_cpu() && i > 0 => Err(err(format!(
                "a CPU backend has one device (index 0); --device {i} does not exist"
            ))),
            _ => Ok(()),
        }
    }
}

/// Checks that `device` exists on backend `B` (a GPU index beyond the
/// runtime's device count is an error, and so is a GPU runtime that finds no
/// device at all, which Burn reports by panicking).
pub fn check_device<B: Backend>(choice: &BackendChoice, device: &B::Device) -> Result<()> {
    let Some(index) = choice.device else {
        return Ok(());
    };
    if choice.kind.is_cpu() {
        return Ok(());
    }
    let id = device.to_id();
    let count = crate::error::catch_panic(
        || B::device_count(id.type_id),
        "the runtime failed to start",
    )
    .map_err(|why| PeftError::Backend {
        backend: choice.kind.name().into(),
        message: format!("no device found: {why}"),
    })?;
    if index >= count {
        return Err(PeftError::Backend {
            backend: choice.kind.name().into(),
            message: format!("--device {index} does not exist: {count} device(s) of that kind"),
        });
    }
    Ok(())
}

/// The WGPU device for `--device`: the runtime's default device, or
/// discrete GPU `i`.
#[cfg(feature = "wgpu")]
pub fn wgpu_device(index: Option<usize>) -> burn::backend::wgpu::WgpuDevice {
    use burn::backend::wgpu::WgpuDevice;
    match index {
        None => WgpuDevice::DefaultDevice,
        Some(i) => WgpuDevice::DiscreteGpu(i),
    }
}

/// The CUDA device for `--device` (GPU 0 by default).
#[cfg(feature = "cuda")]
pub fn cuda_device(index: Option<usize>) -> burn::backend::cuda::CudaDevice {
    burn::backend::cuda::CudaDevice::new(index.unwrap_or(0))
}

/// Runs one generic body on the backend a [`BackendChoice`] names:
///
/// ```ignore
/// let logits = with_backend!(choice, |B, device| jobs::forward::<B>(&model, &device))?;
/// let report = with_backend!(autodiff choice, |B, device| jobs::train::<B>(&job, &device))?;
/// ```
///
/// `B` is the plain backend (or `Autodiff<…>` of it with `autodiff`) and
/// `device` a `B::Device`. The body returns `peft_core::Result<T>`; so does
/// the macro, with [`PeftError::Backend`] for a backend this build lacks
/// (naming its cargo feature) or a device that does not exist. Which GPU
/// backends exist is decided by `peft-core`'s own `wgpu` / `cuda` features.
#[macro_export]
macro_rules! with_backend {
    (autodiff $choice:expr, |$B:ident, $device:ident| $body:expr) => {
        $crate::with_backend!(@run $choice, $B, $device, $body, Autodiff)
    };
    ($choice:expr, |$B:ident, $device:ident| $body:expr) => {
        $crate::with_backend!(@run $choice, $B, $device, $body, Plain)
    };
    (@run $choice:expr, $B:ident, $device:ident, $body:expr, $wrap:ident) => {{
        let choice: $crate::backends::BackendChoice = $choice;
        match choice.check() {
            Err(e) => Err(e),
            Ok(()) => match choice.kind {
                $crate::backends::BackendKind::Ndarray => {
                    type $B = $crate::backends::$wrap<$crate::backends::NdArray>;
                    let $device: $crate::backends::DeviceOf<$B> = Default::default();
                    $body
                }
                $crate::backends::BackendKind::Flex => {
                    type $B = $crate::backends::$wrap<$crate::backends::Flex>;
                    let $device: $crate::backends::DeviceOf<$B> = Default::default();
                    $body
                }
                $crate::backends::BackendKind::Wgpu => {
                    $crate::__with_wgpu!(choice, $B, $device, $body, $wrap)
                }
                $crate::backends::BackendKind::Cuda => {
                    $crate::__with_cuda!(choice, $B, $device, $body, $wrap)
                }
            },
        }
    }};
}

/// The identity on backends: `Plain<B>` is `B` ([`with_backend!`]'s
/// non-autodiff form).
pub type Plain<B> = B;

/// A backend's device type (for [`with_backend!`]).
pub type DeviceOf<B> = burn::tensor::Device<B>;

#[cfg(feature = "cuda")]
pub use burn::backend::Cuda;
#[cfg(feature = "wgpu")]
pub use burn::backend::Wgpu;
pub use burn::backend::{Autodiff, Flex, NdArray};

#[cfg(feature = "wgpu")]
#[doc(hidden)]
#[macro_export]
macro_rules! __with_wgpu {
    ($choice:expr, $B:ident, $device:ident, $body:expr, $wrap:ident) => {{
        type $B = $crate::backends::$wrap<$crate::backends::Wgpu>;
        let $device = $crate::backends::wgpu_device($choice.device);
        match $crate::backends::check_device::<$B>(&$choice, &$device) {
            Err(e) => Err(e),
            Ok(()) => $body,
        }
    }};
}

#[cfg(not(feature = "wgpu"))]
#[doc(hidden)]
#[macro_export]
macro_rules! __with_wgpu {
    ($choice:expr, $B:ident, $device:ident, $body:expr, $wrap:ident) => {
        unreachable!("BackendChoice::check refuses a backend that is not compiled in")
    };
}

#[cfg(feature = "cuda")]
#[doc(hidden)]
#[macro_export]
macro_rules! __with_cuda {
    ($choice:expr, $B:ident, $device:ident, $body:expr, $wrap:ident) => {{
        type $B = $crate::backends::$wrap<$crate::backends::Cuda>;
        let $device = $crate::backends::cuda_device($choice.device);
        match $crate::backends::check_device::<$B>(&$choice, &$device) {
            Err(e) => Err(e),
            Ok(()) => $body,
        }
    }};
}

#[cfg(not(feature = "cuda"))]
#[doc(hidden)]
#[macro_export]
macro_rules! __with_cuda {
    ($choice:expr, $B:ident, $device:ident, $body:expr, $wrap:ident) => {
        unreachable!("BackendChoice::check refuses a backend that is not compiled in")
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for k in BackendKind::ALL {
            assert_eq!(k.name().parse::<BackendKind>().unwrap(), k);
        }
        let e = "tpu".parse::<BackendKind>().unwrap_err();
        assert!(e.to_string().contains("ndarray, flex, wgpu, cuda"), "{e}");
    }

    #[test]
    fn a_missing_backend_names_its_feature_and_cpu_has_one_device() {
        for k in [BackendKind::Wgpu, BackendKind::Cuda] {
            let e = BackendChoice::new(k).check();
            assert_eq!(e.is_ok(), k.compiled());
            if let Err(e) = e {
                assert!(
                    e.to_string().contains(&format!("--features {}", k.name())),
                    "{e}"
                );
            }
        }
        let two = BackendChoice {
            kind: BackendKind::Flex,
            device: Some(1),
        };
        assert!(two.check().unwrap_err().to_string().contains("--device 1"));
        let zero = BackendChoice {
            kind: BackendKind::Ndarray,
            device: Some(0),
        };
        zero.check().unwrap();
    }

    fn sum_on<B: Backend>(device: &B::Device) -> f32 {
        burn::tensor::Tensor::<B, 1>::from_floats([1.0, 2.0, 3.5], device)
            .sum()
            .into_data()
            .to_vec::<f32>()
            .unwrap()[0]
    }

    #[test]
    fn with_backend_runs_the_body_on_the_chosen_backend() {
        for kind in [BackendKind::Ndarray, BackendKind::Flex] {
            let (name, sum) = crate::with_backend!(BackendChoice::new(kind), |B, device| {
                Ok::<_, PeftError>((std::any::type_name::<B>(), sum_on::<B>(&device)))
            })
            .unwrap();
            assert_eq!(sum, 6.5);
            assert!(
                name.to_lowercase().contains(kind.name()),
                "{name} for {kind}"
            );
        }
        let grads = crate::with_backend!(autodiff BackendChoice::new(BackendKind::Flex), |B, device| {
            let x = burn::tensor::Tensor::<B, 1>::from_floats([2.0, 3.0], &device).require_grad();
            let g = (x.clone() * x.clone()).sum().backward();
            Ok::<_, PeftError>(x.grad(&g).unwrap().into_data().to_vec::<f32>().unwrap())
        })
        .unwrap();
        assert_eq!(grads, vec![4.0, 6.0]);
        if !BackendKind::Cuda.compiled() {
            let e = crate::with_backend!(BackendChoice::new(BackendKind::Cuda), |B, device| {
                Ok::<_, PeftError>(sum_on::<B>(&device))
            });
            assert!(matches!(e, Err(PeftError::Backend { .. })));
        }
    }
}
