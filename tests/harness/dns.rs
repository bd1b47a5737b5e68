//! A DNS server the test controls: answers A queries for the names it is given, with the
//! addresses and TTL it is told, over UDP on loopback (a node points `--dns-resolver` at
//! it). It can be made to fail (SERVFAIL) to show a node keeping its last good answer.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};

#[derive(Default)]
struct Zone {
    /// Name (lowercase, no trailing dot) -> addresses and TTL.
    records: Mutex<HashMap<String, (Vec<Ipv4Addr>, u32)>>,
    failing: AtomicBool,
    queries: AtomicUsize,
}

pub struct TestDns {
    pub addr: SocketAddr,
    zone: Arc<Zone>,
    task: tokio::task::JoinHandle<()>,
}

impl TestDns {
    pub async fn start() -> TestDns {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let zone = Arc::new(Zone::default());
        let z = zone.clone();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                    continue;
                };
                let Ok(query) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                z.queries.fetch_add(1, Ordering::SeqCst);
                let answer = answer(&z, &query);
                if let Ok(bytes) = answer.to_vec() {
                    let _ = socket.send_to(&bytes, from).await;
                }
            }
        });
        TestDns { addr, zone, task }
    }

    /// Answers `name` with `addrs`, valid for `ttl` seconds.
    pub fn set(&self, name: &str, addrs: &[Ipv4Addr], ttl: u32) {
        self.zone
            .records
            .lock()
            .unwrap()
            .insert(name.to_ascii_lowercase(), (addrs.to_vec(), ttl));
    }

    /// Answers SERVFAIL to everything while `failing`.
    pub fn fail(&self, failing: bool) {
        self.zone.failing.store(failing, Ordering::SeqCst);
    }

    /// Queries received so far.
    pub fn queries(&self) -> usize {
        self.zone.queries.load(Ordering::SeqCst)
    }
}

impl Drop for TestDns {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn answer(zone: &Zone, query: &Message) -> Message {
    let mut out = Message::new();
    out.set_id(query.id())
        .set_message_type(MessageType::Response)
        .set_op_code(query.op_code())
        .set_recursion_desired(query.recursion_desired())
        .set_recursion_available(true)
        .set_authoritative(true);
    for q in query.queries() {
        out.add_query(q.clone());
    }
    if zone.failing.load(Ordering::SeqCst) {
        out.set_response_code(ResponseCode::ServFail);
        return out;
    }
    let records = zone.records.lock().unwrap();
    for q in query.queries() {
        let name = q
            .name()
            .to_ascii()
            .trim_end_matches('.')
            .to_ascii_lowercase();
        match records.get(&name) {
            None => {
                out.set_response_code(ResponseCode::NXDomain);
            }
            Some((addrs, ttl)) if q.query_type() == RecordType::A => {
                for ip in addrs {
                    out.add_answer(Record::from_rdata(q.name().clone(), *ttl, RData::A(A(*ip))));
                }
            }
            // AAAA and others: the name exists, with no such record.
            Some(_) => {}
        }
    }
    out
}
