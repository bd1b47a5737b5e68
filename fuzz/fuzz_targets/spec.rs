//! The spec parser and checker, on any text: every input is refused with errors or
//! accepted, never a panic, and never slow (deep nesting is refused before parsing).
//! Documents that name hosts to resolve are checked up to the point of resolving them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_node::state::{machine, spec};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(doc) = machine::parse_checked(text, 1 << 20) else {
        return;
    };
    if spec::needs_dns(&doc) {
        return;
    }
    let _ = machine::check_parsed(text, doc);
});
