//! Fuzzes the client frame parser and the encoders fed by what it returns.
//!
//! Run (cargo-fuzz needs nightly features; RUSTC_BOOTSTRAP lets the stable toolchain use them):
//! `cd fuzz && mkdir -p corpus/parse_frame && RUSTC_BOOTSTRAP=1 cargo fuzz run parse_frame corpus/parse_frame seeds/parse_frame -- -max_total_time=300`
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use thinws::protocol::{self, server, Command, Limits};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match protocol::parse(text, &Limits::default()) {
        Ok(frame) => {
            let ack = server::ack(frame.message_id);
            assert!(serde_json::from_str::<Value>(&ack).is_ok(), "invalid ack {ack}");
            if let Command::Message { room, payload, .. } = frame.command {
                let delivery = server::delivery(&room, "fuzz", payload);
                // Deliveries must be readable by a parser with a recursion limit.
                assert!(
                    serde_json::from_str::<Value>(&delivery).is_ok(),
                    "invalid delivery {delivery}"
                );
            }
        }
        Err(e) => {
            let error = server::error(e.message_id, e.code, &e.message);
            assert!(serde_json::from_str::<Value>(&error).is_ok(), "invalid error {error}");
        }
    }
});
