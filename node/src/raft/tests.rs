//! openraft's storage conformance suite against the sled stores, plus what the suite does
//! not cover: the state surviving a reopen through its snapshot. (That a restarted node
//! re-applies its log after the snapshot is shown by the restart tests in tests/.)

use openraft::testing::{StoreBuilder, Suite};
use openraft::{StorageError, storage::RaftStateMachine};

use super::log_store::LogStore;
use super::state_machine::StateMachineStore;
use super::{NodeId, TypeConfig};

struct SledBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, ()> for SledBuilder {
    async fn build(&self) -> Result<((), LogStore, StateMachineStore), StorageError<NodeId>> {
        let db = sled::Config::new()
            .temporary(true)
            .open()
            .expect("temporary sled db");
        let log = LogStore::open(&db).expect("log store");
        let sm = StateMachineStore::open(&db)?;
        Ok(((), log, sm))
    }
}

#[test]
fn the_sled_store_passes_openraft_storage_suite() {
    Suite::test_all(SledBuilder).expect("openraft storage suite");
}

#[tokio::test]
async fn the_state_survives_a_reopen_through_its_snapshot() {
    use crate::state::machine::{check_spec, put_spec_command};
    use openraft::{EntryPayload, LeaderId, LogId, RaftSnapshotBuilder};

    let dir = std::env::temp_dir().join(format!("tollgate-sm-reopen-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let spec = "upstreams:\n  a:\n    endpoints: [{address: 127.0.0.1:1}]\n";
    {
        let db = super::open_db(&dir).unwrap();
        let mut sm = StateMachineStore::open(&db).unwrap();
        let cmd = put_spec_command(&check_spec(spec, 1 << 20).unwrap(), "r1");
        let entry = super::Entry {
            log_id: LogId::new(LeaderId::new(1, 1), 7),
            payload: EntryPayload::Normal(cmd),
        };
        let out = sm.apply([entry]).await.unwrap();
        assert_eq!(out[0].generation, 1);
        sm.get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
    }
    let db = super::open_db(&dir).unwrap();
    let mut sm = StateMachineStore::open(&db).unwrap();
    let (applied, _) = sm.applied_state().await.unwrap();
    assert_eq!(applied.map(|l| l.index), Some(7));
    sm.read(|a| {
        assert_eq!(a.state.generation, 1);
        assert_eq!(&*a.state.spec_yaml, spec);
        assert_eq!(a.state.history.len(), 1);
        assert_eq!(a.state.history[0].request_id, "r1");
    });
    drop(sm);
    drop(db);
    let _ = std::fs::remove_dir_all(&dir);
}
