//! Client action details become Avro records through `SchemaSet::build`.
//! Input: one byte choosing the action record, then the details as JSON.
#![no_main]

use cceb::schema::convert::{to_json, Keys};
use cceb::schema::SchemaSet;
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};
use std::sync::OnceLock;

fn schemas() -> &'static (SchemaSet, Vec<String>) {
    static SET: OnceLock<(SchemaSet, Vec<String>)> = OnceLock::new();
    SET.get_or_init(|| {
        let set = SchemaSet::load(None).expect("built-in schema set");
        // Sorted, so a byte picks the same record in every run (the set is a HashMap).
        let mut names: Vec<String> = set.action_names().map(str::to_owned).collect();
        names.sort();
        (set, names)
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, json)) = data.split_first() else { return };
    let (set, names) = schemas();
    let record = set.action(&names[usize::from(pick) % names.len()]).expect("listed action");
    let Ok(details) = serde_json::from_slice::<Map<String, Value>>(json) else { return };
    if let Ok(avro) = set.build(record, &details) {
        // What notifications and the backend see must convert back to the same record.
        let back = to_json(&avro, Keys::AsIs);
        let again = set.build(record, back.as_object().expect("a record becomes an object"));
        assert_eq!(again.as_ref(), Ok(&avro), "JSON {back} does not rebuild the record");
    }
});
