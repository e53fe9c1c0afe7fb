//! The batch decoder against arbitrary bytes: it never panics, and what it accepts re-encodes
//! to a batch that decodes to the same records.
//!
//! cargo-fuzz builds with `--cfg fuzzing`, under which the decoder does not enforce the
//! checksum, so that mutated frames reach zstd and the record decoder instead of stopping at the
//! checksum compare (tests/batch_codec.rs proves the checksum refuses every flipped bit).

#![no_main]

use fencelog::batch::{BatchDecoder, BatchEncoder};
use fencelog::limits::Limits;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let mut decoder = BatchDecoder::new(Limits::default()).expect("default limits are valid");
    let Ok(batch) = decoder.decode(bytes) else {
        return;
    };
    let mut encoder = BatchEncoder::new(Limits::default(), 1).expect("default limits are valid");
    let encoded = encoder.encode(&batch).expect("an accepted batch re-encodes");
    assert_eq!(decoder.decode(encoded.as_bytes()).expect("decodes"), batch);
});
