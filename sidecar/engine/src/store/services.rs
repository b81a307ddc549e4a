//! The services' committed state on a backup: for each service, its newest contribution among the
//! committed epochs and the epoch it came with (docs/services.md).
//!
//! Each committed epoch's contributions replace those of the same services; a service that did not
//! contribute to an epoch (it was late and the policy skipped it) keeps its older one, with that older
//! epoch, so that its twin knows how old what it restores is.
//!
//! At a checkpoint the whole map goes into `services-<epoch>.bin`, written durably before `state.json`
//! names it (with its length and BLAKE3). Encoding, little-endian:
//!
//! ```text
//! count u16; each: name u8 length + [a-z0-9-], epoch u64, data u32 length + bytes
//! ```

use std::collections::BTreeMap;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use endophyte_wire::contrib::{valid_name, MAX_CONTRIBUTION_BYTES};
use endophyte_wire::Contribution;

/// One service's committed contribution.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceState {
    /// The epoch it was contributed at (at most the committed epoch).
    pub epoch: u64,
    /// Its bytes, as the service handed them over.
    pub data: Bytes,
}

/// Every service's committed contribution, by name.
pub type ServiceStates = BTreeMap<String, ServiceState>;

/// Takes epoch `epoch`'s contributions into `states`.
pub fn merge(states: &mut ServiceStates, epoch: u64, contributions: &[Contribution]) {
    for c in contributions {
        states.insert(
            c.service.clone(),
            ServiceState {
                epoch,
                data: c.data.clone(),
            },
        );
    }
}

/// The file bytes of `states`.
pub(super) fn encode(states: &ServiceStates) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u16_le(states.len() as u16);
    for (name, s) in states {
        b.put_u8(name.len() as u8);
        b.put_slice(name.as_bytes());
        b.put_u64_le(s.epoch);
        b.put_u32_le(s.data.len() as u32);
        b.put_slice(&s.data);
    }
    b.to_vec()
}

/// Reads what [`encode`] wrote.
///
/// # Errors
/// What is wrong, for the caller to name the file with.
pub(super) fn decode(bytes: Vec<u8>) -> Result<ServiceStates, String> {
    let mut p = Bytes::from(bytes);
    let need = |n: usize, what: &str, p: &Bytes| {
        if p.remaining() < n {
            Err(format!("truncated at the {what}"))
        } else {
            Ok(())
        }
    };
    need(2, "count", &p)?;
    let count = p.get_u16_le();
    let mut states = ServiceStates::new();
    for _ in 0..count {
        need(1, "name length", &p)?;
        let n = p.get_u8() as usize;
        need(n, "name", &p)?;
        let name = p.split_to(n);
        if !valid_name(&name) {
            return Err(format!(
                "service name {:?} is invalid",
                String::from_utf8_lossy(&name)
            ));
        }
        need(12, "epoch and length", &p)?;
        let epoch = p.get_u64_le();
        let len = p.get_u32_le() as usize;
        if len > MAX_CONTRIBUTION_BYTES {
            return Err(format!(
                "a contribution of {len} bytes exceeds the cap of {MAX_CONTRIBUTION_BYTES}"
            ));
        }
        need(len, "data", &p)?;
        let data = p.split_to(len);
        states.insert(
            String::from_utf8(name.to_vec()).expect("checked ASCII"),
            ServiceState { epoch, data },
        );
    }
    if p.has_remaining() {
        return Err(format!("{} trailing bytes", p.remaining()));
    }
    Ok(states)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_that_skipped_an_epoch_keeps_its_older_contribution() {
        let mut s = ServiceStates::new();
        let c = |n: &str, d: &'static [u8]| Contribution {
            service: n.into(),
            data: Bytes::from_static(d),
        };
        merge(&mut s, 4, &[c("kv", b"a=1"), c("disk", b"j4")]);
        merge(&mut s, 5, &[c("kv", b"a=2")]);
        assert_eq!(s["kv"].epoch, 5);
        assert_eq!(&s["kv"].data[..], b"a=2");
        assert_eq!(s["disk"].epoch, 4);
        let back = decode(encode(&s)).unwrap();
        assert_eq!(back, s);
        let mut bytes = encode(&s);
        bytes.push(0);
        assert!(decode(bytes).unwrap_err().contains("trailing"));
    }

    /// Epoch `e` on the store: one page of `fill`, with `contributions`.
    fn commit(
        s: &mut super::super::ReplicaStore,
        e: u64,
        fill: u8,
        contributions: &[(&str, &str)],
    ) {
        use endophyte_wire::{msg::epoch_hash, ChunkBuilder, EpochEnd};
        let ps = 4096;
        let mut b = ChunkBuilder::new(e, ps, 4);
        b.push(ps as u64, &vec![fill; ps]);
        let c = b.finish(true);
        s.store_chunk(0, &c, 9).unwrap();
        let end = EpochEnd {
            epoch: e,
            base_epoch: e - 1,
            chunk_count: 1,
            page_count: 1,
            epoch_hash: epoch_hash(1, [&c.content_hash]),
            state: None,
            contributions: contributions
                .iter()
                .map(|(n, d)| Contribution {
                    service: (*n).into(),
                    data: Bytes::copy_from_slice(d.as_bytes()),
                })
                .collect(),
        };
        s.commit(&end, 9).unwrap();
    }

    #[test]
    fn contributions_survive_a_checkpoint_and_a_crash_after_their_commit() {
        use super::super::{CrashPoint, ReplicaStore};
        let dir = tempfile::tempdir().unwrap();
        let open = || ReplicaStore::open(dir.path(), "vm", 1 << 20, 4096, CrashPoint::default());
        let mut s = open().unwrap();
        commit(&mut s, 1, 1, &[("kv", "a=1"), ("disk", "j1")]);
        s.checkpoint_now().unwrap();
        // Committed, not checkpointed: only its journal holds it when the process goes.
        commit(&mut s, 2, 2, &[("kv", "a=2")]);
        drop(s);
        let s = open().unwrap();
        assert_eq!(s.committed_epoch(), 2);
        let got = s.service_states();
        assert_eq!((got["kv"].epoch, &got["kv"].data[..]), (2, &b"a=2"[..]));
        assert_eq!((got["disk"].epoch, &got["disk"].data[..]), (1, &b"j1"[..]));
        // The reopen checkpointed: the file is there, named in state.json, and a damaged one is refused.
        let f = dir.path().join(format!("services-{:020}.bin", 2));
        let mut bytes = std::fs::read(&f).unwrap();
        drop(s);
        *bytes.last_mut().unwrap() ^= 1;
        std::fs::write(&f, bytes).unwrap();
        let err = open()
            .err()
            .expect("a damaged services file fails the open")
            .to_string();
        assert!(err.contains("services") && err.contains("damaged"), "{err}");
    }
}
