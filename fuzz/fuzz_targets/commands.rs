//! The protobuf commands the state machine applies, on any bytes: a sequence of commands
//! (each a length byte and that many bytes) decoded and applied to a fresh state, then
//! the state written to a snapshot and read back. Apply is what every node runs on every
//! entry of the log: it must refuse, never panic, and the snapshot must round-trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use tollgate_node::state::machine::ClusterState;
use tollgate_proto::state::v1::Command;

fuzz_target!(|data: &[u8]| {
    let mut state = ClusterState::default();
    let mut rest = data;
    let mut index = 1;
    while let Some((&len, tail)) = rest.split_first() {
        let len = (len as usize).min(tail.len());
        let (one, tail) = tail.split_at(len);
        rest = tail;
        if let Ok(cmd) = Command::decode(one) {
            state.apply(index, &cmd);
            index += 1;
        }
    }
    let snapshot = state.to_proto();
    let back = ClusterState::from_proto(snapshot.clone());
    assert_eq!(back.to_proto(), snapshot);
});
