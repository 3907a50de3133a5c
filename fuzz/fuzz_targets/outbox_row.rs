#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| orderly_fuzz::outbox_row(data));
