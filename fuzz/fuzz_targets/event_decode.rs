//! The ring-buffer record decoder: any bytes give an event or a `DecodeError`, never a panic; a record shorter
//! than an event header never decodes.

#![no_main]

use detector_common::EventHeader;
use detector_user::events::decode;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match decode(data) {
        Ok(event) => {
            assert!(data.len() >= size_of::<EventHeader>());
            std::hint::black_box(format!("{event:?}"));
        }
        Err(e) => {
            std::hint::black_box(e.to_string());
        }
    }
});
