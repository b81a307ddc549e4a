//! The bench's hosts and the links between them.
//!
//! With a link profile, every host is a network namespace (`epb-<host>`) and every pair that talks gets one
//! or more emulated point-to-point links ([`crate::netns::EmulatedLink`], one subnet each), shaped by the
//! profile in both directions. With the `loopback` profile there is no emulator: every host is this
//! machine's loopback, 127.0.0.1.
//!
//! Processes are started inside a host with [`Topology::command`]; Unix sockets (attach, control, QMP) are
//! files and work across namespaces, so the bench drives everything from the root namespace.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;

use crate::link::{LinkProfile, LinkStats};
use crate::netns::{EmulatedLink, Namespace};

/// A profile by name, `loopback` included (`None`: no emulator).
///
/// # Errors
/// The name is not `loopback`, `lan`, `wan` or `thin-wan`.
pub fn profile_named(name: &str) -> Result<Option<LinkProfile>, String> {
    match name {
        "loopback" => Ok(None),
        other => LinkProfile::named(other).map(Some),
    }
}

/// Hosts, and the emulated links between them.
pub struct Topology {
    profile: Option<LinkProfile>,
    // Links before namespaces: a link's pump thread must stop before its devices' namespaces go.
    links: Vec<(String, String, EmulatedLink)>,
    hosts: Vec<(String, Option<Namespace>)>,
}

impl Topology {
    /// Builds `hosts`, and `count` links between each pair `(a, b, count)` of `pairs` (each link its own
    /// subnet, 10.77.N.0/30-style point-to-point addresses), all shaped by `profile` both ways. With
    /// `profile` `None`, nothing is built and every address is 127.0.0.1.
    ///
    /// # Errors
    /// A namespace or link could not be made (not root, no `ip`, no TUN), or a pair names an unknown host.
    pub fn build(
        profile: Option<&LinkProfile>,
        hosts: &[&str],
        pairs: &[(&str, &str, usize)],
    ) -> anyhow::Result<Self> {
        let mut t = Self {
            profile: profile.cloned(),
            links: vec![],
            hosts: vec![],
        };
        for h in hosts {
            let ns = match profile {
                Some(_) => Some(Namespace::create(&format!("epb-{h}"))?),
                None => None,
            };
            t.hosts.push((h.to_string(), ns));
        }
        let Some(p) = profile else {
            return Ok(t);
        };
        let mut subnet = 1u8;
        for &(a, b, count) in pairs {
            for _ in 0..count {
                let link = EmulatedLink::join(t.ns(a)?, t.ns(b)?, subnet, p.clone(), p.clone())?;
                t.links.push((a.into(), b.into(), link));
                subnet = subnet
                    .checked_add(1)
                    .ok_or_else(|| anyhow::anyhow!("more than 254 links"))?;
            }
        }
        Ok(t)
    }

    fn ns(&self, host: &str) -> anyhow::Result<&Namespace> {
        self.hosts
            .iter()
            .find(|(h, _)| h == host)
            .and_then(|(_, ns)| ns.as_ref())
            .ok_or_else(|| anyhow::anyhow!("no host {host:?} in the topology"))
    }

    /// The profile (`None`: loopback).
    pub fn profile(&self) -> Option<&LinkProfile> {
        self.profile.as_ref()
    }

    /// The profile's name (`loopback` without one).
    pub fn profile_name(&self) -> &str {
        self.profile.as_ref().map_or("loopback", |p| &p.name)
    }

    /// `host`'s address on its `k`-th link with `peer` (what `peer` connects to); 127.0.0.1 on loopback.
    ///
    /// # Errors
    /// There is no such link.
    pub fn addr(&self, host: &str, peer: &str, k: usize) -> anyhow::Result<Ipv4Addr> {
        if self.profile.is_none() {
            return Ok(Ipv4Addr::LOCALHOST);
        }
        self.links
            .iter()
            .filter_map(|(a, b, l)| {
                if a == host && b == peer {
                    Some(l.addr_a)
                } else if a == peer && b == host {
                    Some(l.addr_b)
                } else {
                    None
                }
            })
            .nth(k)
            .ok_or_else(|| anyhow::anyhow!("no link {k} between {host} and {peer}"))
    }

    /// A command running `program` on `host` (inside its namespace).
    ///
    /// # Errors
    /// No such host.
    pub fn command(&self, host: &str, program: &Path) -> anyhow::Result<Command> {
        match &self.profile {
            None => Ok(Command::new(program)),
            Some(_) => {
                let mut c = self.ns(host)?.command("env");
                c.arg(program);
                Ok(c)
            }
        }
    }

    /// Bytes the emulator delivered from `from` to `to`, over every link between them (0 on loopback).
    pub fn delivered_bytes(&self, from: &str, to: &str) -> u64 {
        self.links
            .iter()
            .map(|(a, b, l)| {
                let s = l.stats();
                if a == from && b == to {
                    s[0].delivered_bytes
                } else if a == to && b == from {
                    s[1].delivered_bytes
                } else {
                    0
                }
            })
            .sum()
    }

    /// Counters of every link: `(a, b, [a→b, b→a])`.
    pub fn link_stats(&self) -> Vec<(String, String, [LinkStats; 2])> {
        self.links
            .iter()
            .map(|(a, b, l)| (a.clone(), b.clone(), l.stats()))
            .collect()
    }
}
