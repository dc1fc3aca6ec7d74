//! Process-wide memory settings for CPU training and inference.

/// Keeps freed heap memory for reuse instead of handing it back to the
/// kernel. A forward or backward pass allocates and frees tensors of
/// megabytes hundreds of times; glibc's `malloc` serves each one with a
/// fresh `mmap` (or trims the heap after it is freed), so every new
/// buffer pays a page fault per 4 KiB and the kernel's zeroing. Raising
/// the mmap threshold to its maximum (32 MiB) and the trim threshold to
/// 2 GiB removes that: on the `ops` bench suite (MiniLM layer pieces at
/// 16 × 128, Flex) the sum of the pieces fell from 1.95 s to 1.26 s.
///
/// Call once, at the start of `main`; the `peft` command, the benches and
/// the examples do. A no-op where the C library is not glibc.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only changes allocator parameters; called before
    // the tensors it affects are allocated, and safe to call at any time.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}
