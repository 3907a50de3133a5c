#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| orderly_fuzz::http::order_body(data));
