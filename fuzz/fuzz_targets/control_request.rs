//! Control-socket request lines: any bytes through `control::decode_request`, the daemon's only entry from a
//! client. Checked besides "no panic": a request that decodes, encoded again as the CLI sends it (the version
//! next to the request's own fields), decodes to the same request; a refused line gets a bad-request error.

#![no_main]

use detector_user::control::{ErrorKind, PROTOCOL_VERSION, Request, decode_request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match decode_request(data) {
        Ok(request) => {
            let again = decode_request(&encode(&request)).expect("an encoded request decodes");
            assert_eq!(again, request);
        }
        Err(e) => assert_eq!(e.kind, ErrorKind::BadRequest, "{e:?}"),
    }
});

/// The line `control::call` writes: `{"version":1,` then the request's fields.
fn encode(request: &Request) -> Vec<u8> {
    let mut value = serde_json::to_value(request).expect("requests serialize");
    value
        .as_object_mut()
        .expect("a request is an object")
        .insert("version".into(), PROTOCOL_VERSION.into());
    serde_json::to_vec(&value).expect("values serialize")
}
