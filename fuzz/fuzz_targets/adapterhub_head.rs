#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    peft_fuzz::unhook_abort();
    peft_fuzz::adapterhub_head(data);
});
