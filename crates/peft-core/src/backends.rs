//! Backend selection and the one-body-every-device test harness.
//!
//! CPU: [`CpuBackend`] is the faster of `burn-ndarray` and `burn-flex` on a
//! LoRA training step on this project's reference machine (see the figures
//! in `docs/ARCHITECTURE.md`); both are always compiled. GPU backends come
//! with the `wgpu` and `cuda` features.

/// The default CPU backend.
pub type CpuBackend = burn::backend::NdArray;

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
