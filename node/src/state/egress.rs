//! Where tenants' API versions may send requests (docs/security.md).
//!
//! An API version's upstreams are written by a tenant (or for one), and the proxy connects
//! to them from inside the cluster's network: left open, a version whose upstream is
//! `127.0.0.1:<admin port>` publishes the node's `/metrics` to anyone. So every endpoint of
//! an API version is checked, against the address it resolved to:
//!
//! 1. never one of the cluster's own listeners: a member's proxy, gRPC or admin address,
//!    or its port on a loopback or unspecified address (every node's loopback is its own);
//! 2. never a range the operator denies (`tenant_upstreams.deny` in the cluster's spec);
//! 3. always a range the operator allows (`tenant_upstreams.allow`);
//! 4. otherwise never loopback, link-local (169.254.0.0/16, fe80::/10), unspecified
//!    (0.0.0.0/8, ::), multicast or broadcast addresses, nor a member's address on any port.
//!
//! The check runs on the leader when a version is created, edited or published (the
//! write is refused, naming the endpoint and the rule), and again on every node when it
//! compiles what it serves, against the address the endpoint resolves to then: a name
//! that later resolves somewhere denied (DNS rebinding) leaves the version unavailable
//! (503) on that node instead of reaching it. The operator's own spec may point anywhere.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::str::FromStr;

use ipnet::IpNet;
use serde::Deserialize;

use crate::state::spec::{Spec, SpecErrors};

/// The operator's list for tenants' upstreams: `tenant_upstreams` in the cluster's spec,
/// replicated, so every node decides alike.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantUpstreams {
    /// Ranges API versions may reach although denied by default (loopback on a dev box
    /// or in tests, say). Never opens the cluster's own listeners.
    #[serde(default, deserialize_with = "nets")]
    pub allow: Vec<IpNet>,
    /// More ranges API versions may never reach (the nodes' networks, cloud metadata
    /// services, internal services). Wins over `allow`.
    #[serde(default, deserialize_with = "nets")]
    pub deny: Vec<IpNet>,
}

/// `10.0.0.0/8`, `fd00::/8`, or one address (`10.1.2.3`).
fn nets<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
    let texts = Vec::<String>::deserialize(d)?;
    texts
        .iter()
        .map(|t| {
            let t = t.trim();
            IpNet::from_str(t)
                .or_else(|_| IpAddr::from_str(t).map(IpNet::from))
                .map(|n| n.trunc())
                .map_err(|_| {
                    serde::de::Error::custom(format!(
                        "{t:?} is not an address range; write it like 10.0.0.0/8, fd00::/8 or 10.1.2.3"
                    ))
                })
        })
        .collect()
}

impl TenantUpstreams {
    /// The list in applied spec text (checked when it was applied). Text that does not
    /// decode gives the empty list: the defaults, the strictest.
    pub fn of_spec_yaml(text: &str) -> TenantUpstreams {
        let Ok(serde_yaml_ng::Value::Mapping(top)) =
            serde_yaml_ng::from_str::<serde_yaml_ng::Value>(text)
        else {
            return TenantUpstreams::default();
        };
        top.get("tenant_upstreams")
            .cloned()
            .and_then(|v| serde_yaml_ng::from_value(v).ok())
            .unwrap_or_default()
    }
}

/// A member's listeners as the membership advertises them (`host:port`).
#[derive(Debug, Clone, Default)]
pub struct Member {
    pub id: u64,
    pub proxy: String,
    pub grpc: String,
    pub admin: String,
}

impl Member {
    fn listeners(&self) -> [(&'static str, &str); 3] {
        [
            ("proxy", self.proxy.as_str()),
            ("gRPC", self.grpc.as_str()),
            ("admin", self.admin.as_str()),
        ]
    }
}

/// Whether resolving these members' addresses would ask DNS (a host is a name).
pub fn members_need_dns(members: &[Member]) -> bool {
    members.iter().any(|m| {
        m.listeners()
            .iter()
            .any(|(_, a)| !a.is_empty() && a.parse::<SocketAddr>().is_err())
    })
}

#[derive(Debug, Clone)]
struct Listener {
    node: u64,
    what: &'static str,
    port: u16,
    ips: Vec<IpAddr>,
}

/// The cluster's own listeners, resolved.
#[derive(Debug, Clone, Default)]
pub struct OwnAddrs {
    listeners: Vec<Listener>,
}

impl OwnAddrs {
    /// Resolves every member's listeners; blocks on DNS when [`members_need_dns`]. A name
    /// that does not resolve still closes its port on loopback and unspecified addresses.
    pub fn resolve(members: &[Member]) -> OwnAddrs {
        let mut listeners = Vec::new();
        for m in members {
            for (what, addr) in m.listeners() {
                let Some(port) = addr
                    .rsplit_once(':')
                    .and_then(|(_, p)| p.parse::<u16>().ok())
                else {
                    continue;
                };
                let ips = match addr.parse::<SocketAddr>() {
                    Ok(a) => vec![canonical(a.ip())],
                    Err(_) => addr
                        .to_socket_addrs()
                        .map(|it| it.map(|a| canonical(a.ip())).collect())
                        .unwrap_or_default(),
                };
                listeners.push(Listener {
                    node: m.id,
                    what,
                    port,
                    ips,
                });
            }
        }
        OwnAddrs { listeners }
    }
}

/// IPv4-mapped IPv6 (`::ffff:127.0.0.1`) as the IPv4 address it is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// What a default-denied address is, in words.
fn denied_by_default(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => {
            if v4.is_loopback() {
                Some("a loopback address")
            } else if v4.is_link_local() {
                Some("a link-local address")
            } else if v4.octets()[0] == 0 {
                Some("an unspecified address (0.0.0.0/8 means this host)")
            } else if v4.is_multicast() {
                Some("a multicast address")
            } else if v4.is_broadcast() {
                Some("the broadcast address")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            if v6.is_loopback() {
                Some("a loopback address")
            } else if v6.segments()[0] & 0xffc0 == 0xfe80 {
                Some("a link-local address")
            } else if v6.is_unspecified() {
                Some("an unspecified address (:: means this host)")
            } else if v6.is_multicast() {
                Some("a multicast address")
            } else {
                None
            }
        }
    }
}

/// Whether an API version may send requests to `addr`; why not, when it may not.
pub fn check(policy: &TenantUpstreams, own: &OwnAddrs, addr: SocketAddr) -> Result<(), String> {
    let ip = canonical(addr.ip());
    // Loopback and unspecified addresses reach the node that connects: its own listeners.
    let this_host = match ip {
        IpAddr::V4(v4) => v4.is_loopback() || v4.octets()[0] == 0,
        IpAddr::V6(v6) => v6.is_loopback() || v6.is_unspecified(),
    };
    if let Some(l) = own
        .listeners
        .iter()
        .find(|l| l.port == addr.port() && (this_host || l.ips.contains(&ip)))
    {
        return Err(format!(
            "{addr} is the {} port of node {}: API versions may never reach the cluster's own \
             listeners",
            l.what, l.node
        ));
    }
    if let Some(net) = policy.deny.iter().find(|n| n.contains(&ip)) {
        return Err(format!(
            "{addr} is in {net}, which the cluster's spec denies to API versions \
             (tenant_upstreams.deny)"
        ));
    }
    if policy.allow.iter().any(|n| n.contains(&ip)) {
        return Ok(());
    }
    let why = denied_by_default(ip).map(str::to_string).or_else(|| {
        own.listeners
            .iter()
            .find(|l| l.ips.contains(&ip))
            .map(|l| format!("an address of node {}", l.node))
    });
    match why {
        Some(why) => Err(format!(
            "{addr} is {why}: API versions may not reach it unless the cluster's spec allows \
             its range (tenant_upstreams.allow)"
        )),
        None => Ok(()),
    }
}

/// Checks every endpoint of an API version's spec (resolved by [`Spec::from_value`]),
/// listing each one refused with its field path and the address it was written as.
pub fn check_spec(policy: &TenantUpstreams, own: &OwnAddrs, spec: &Spec) -> Result<(), SpecErrors> {
    let mut errors = SpecErrors::default();
    let providers = spec.providers.iter().filter_map(|(name, p)| {
        p.upstream
            .as_ref()
            .map(|u| (format!("providers.{name}.base_url"), u))
    });
    let upstreams = spec
        .upstreams
        .iter()
        .map(|(name, up)| (format!("upstreams.{name}.endpoints"), up));
    for (at, up) in upstreams.chain(providers) {
        for (i, ep) in up.endpoints.iter().enumerate() {
            let Some(addr) = ep.resolved else { continue };
            if let Err(why) = check(policy, own, addr) {
                let written = if ep.address == addr.to_string() {
                    String::new()
                } else {
                    format!("{} resolves to {addr}; ", ep.address)
                };
                let at = if at.ends_with("base_url") {
                    at.clone()
                } else {
                    format!("{at}[{i}].address")
                };
                errors.push(at, format!("{written}{why}"));
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow: &[&str], deny: &[&str]) -> TenantUpstreams {
        let nets = |v: &[&str]| v.iter().map(|s| s.parse().unwrap()).collect();
        TenantUpstreams {
            allow: nets(allow),
            deny: nets(deny),
        }
    }

    fn node() -> OwnAddrs {
        OwnAddrs::resolve(&[Member {
            id: 1,
            proxy: "10.0.0.5:8080".into(),
            grpc: "10.0.0.5:7070".into(),
            admin: "127.0.0.1:7071".into(),
        }])
    }

    fn refused(p: &TenantUpstreams, addr: &str) -> String {
        check(p, &node(), addr.parse().unwrap()).expect_err(addr)
    }

    #[test]
    fn loopback_link_local_unspecified_and_the_nodes_are_denied_by_default() {
        let p = TenantUpstreams::default();
        assert!(refused(&p, "127.0.0.1:9000").contains("loopback"));
        assert!(refused(&p, "[::1]:9000").contains("loopback"));
        assert!(refused(&p, "[::ffff:127.0.0.1]:9000").contains("loopback"));
        assert!(refused(&p, "169.254.169.254:80").contains("link-local"));
        assert!(refused(&p, "[fe80::1]:80").contains("link-local"));
        assert!(refused(&p, "0.0.0.0:80").contains("unspecified"));
        assert!(refused(&p, "[::]:80").contains("unspecified"));
        assert!(refused(&p, "10.0.0.5:22").contains("an address of node 1"));
        assert_eq!(check(&p, &node(), "10.0.0.6:8080".parse().unwrap()), Ok(()));
        assert_eq!(
            check(&p, &node(), "93.184.215.14:443".parse().unwrap()),
            Ok(())
        );
    }

    #[test]
    fn the_nodes_listeners_stay_closed_whatever_the_operator_allows() {
        let p = policy(&["127.0.0.0/8", "10.0.0.0/8", "::/0"], &[]);
        assert!(refused(&p, "127.0.0.1:7071").contains("admin port of node 1"));
        // Every node's loopback is its own: the port is closed on any loopback address.
        assert!(refused(&p, "127.0.0.2:7070").contains("gRPC port of node 1"));
        assert!(refused(&p, "0.0.0.0:8080").contains("proxy port of node 1"));
        assert!(refused(&p, "10.0.0.5:8080").contains("proxy port of node 1"));
        assert!(refused(&p, "[::ffff:10.0.0.5]:7070").contains("gRPC port"));
        // The allow list opens the rest.
        assert_eq!(
            check(&p, &node(), "127.0.0.1:9000".parse().unwrap()),
            Ok(())
        );
        assert_eq!(check(&p, &node(), "10.0.0.5:22".parse().unwrap()), Ok(()));
    }

    #[test]
    fn the_deny_list_wins_over_the_allow_list() {
        let p = policy(&["10.0.0.0/8"], &["10.9.0.0/16"]);
        assert!(refused(&p, "10.9.1.1:80").contains("10.9.0.0/16"));
        assert_eq!(check(&p, &node(), "10.8.1.1:80".parse().unwrap()), Ok(()));
        let p = policy(&[], &["203.0.113.0/24"]);
        assert!(refused(&p, "203.0.113.9:443").contains("tenant_upstreams.deny"));
    }

    #[test]
    fn the_list_is_read_from_spec_text() {
        let text = "upstreams: {}\ntenant_upstreams:\n  allow: [127.0.0.0/8, \"::1\"]\n  deny: [10.1.2.3]\n";
        let p = TenantUpstreams::of_spec_yaml(text);
        assert_eq!(p, policy(&["127.0.0.0/8", "::1/128"], &["10.1.2.3/32"]));
        assert_eq!(
            TenantUpstreams::of_spec_yaml("routes: {}"),
            TenantUpstreams::default()
        );
    }
}
