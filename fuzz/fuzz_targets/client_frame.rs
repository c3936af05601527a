//! Every client WebSocket text frame goes through `parse_client_message`.
#![no_main]

use cceb_protocol::incoming::MAX_UUID_LEN;
use cceb_protocol::parse_client_message;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // A WebSocket text frame is valid UTF-8 by the time the parser sees it.
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(message) = parse_client_message(text) {
        // docs/PROTOCOL.md section 2: a uuid is 1 to 128 characters.
        let uuid = message.uuid();
        assert!(!uuid.is_empty() && uuid.len() <= MAX_UUID_LEN, "accepted uuid {uuid:?}");
    }
});
