//! The W3C traceparent parser, on any bytes: never a panic, and what it accepts, written
//! back as version 00, reads back the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_node::telemetry::traces::parse_traceparent;

fuzz_target!(|data: &[u8]| {
    if let Some(ctx) = parse_traceparent(data) {
        let again = format!(
            "00-{}-{}-{:02x}",
            ctx.trace_id(),
            ctx.span_id(),
            ctx.trace_flags().to_u8()
        );
        assert_eq!(parse_traceparent(again.as_bytes()), Some(ctx));
    }
});
