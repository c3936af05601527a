//! Every `POST /backend/v1/events` body goes through `parse_events`.
#![no_main]

use cceb::http::backend::parse_events;
use cceb::notify::EventReader;
use cceb::schema::SchemaSet;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use std::sync::{Arc, OnceLock};

/// Small enough that bodies within libFuzzer's default input size can exceed it,
/// so the size refusal is reached too.
const MAX_NOTIFICATION_BYTES: usize = 512;

fn reader() -> &'static EventReader {
    static READER: OnceLock<EventReader> = OnceLock::new();
    READER.get_or_init(|| {
        let set = SchemaSet::load(None).expect("built-in schema set");
        EventReader::new(Arc::new(set), MAX_NOTIFICATION_BYTES)
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(events) = parse_events(reader(), data) {
        // Taken whole or not at all: one event per item of an accepted body.
        let items = match serde_json::from_slice::<Value>(data).expect("an accepted body is JSON") {
            Value::Array(items) => items.len(),
            _ => 1,
        };
        assert_eq!(events.len(), items);
    }
});
