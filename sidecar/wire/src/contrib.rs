//! Service contributions: the bytes each registered service hands over at an epoch's pause, carried by
//! that epoch's end marker, journaled and committed with it (docs/services.md).
//!
//! Replication never looks inside them; only the service's twin on the backup does, when it is restored.
//!
//! Encoding (little-endian), after the VM state inside [`crate::msg::EpochEnd`]:
//!
//! ```text
//! count   u16                                        contributions that follow (at most MAX_SERVICES)
//! each:   name u8 length (1..=63) + [a-z0-9-]        the service, unique in the list
//!         data u32 length + bytes                    at most MAX_CONTRIBUTION_BYTES
//! ```
//!
//! An end marker that ends right after the VM state holds no contributions (the encoding of wire
//! version 2 before services), so journals written before them still read.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Most contributions in one epoch.
pub const MAX_SERVICES: usize = 64;
/// Largest contribution of one service to one epoch, bytes: 1 MiB.
pub const MAX_CONTRIBUTION_BYTES: usize = 1 << 20;
/// Largest sum of one epoch's contributions, bytes: 2 MiB (with a 4 MiB VM state, an end marker stays
/// within a frame's 8 MiB payload).
pub const MAX_TOTAL_BYTES: usize = 2 << 20;

/// Why bytes are not a valid list of contributions.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ContribError {
    /// The encoding ends early.
    #[error("service contributions truncated: {what} needs {need} bytes, {have} left")]
    Truncated {
        /// Which field.
        what: &'static str,
        /// Bytes it needs.
        need: usize,
        /// Bytes left.
        have: usize,
    },
    /// A service name is empty, too long, not of `[a-z0-9-]` or repeated.
    #[error(
        "service name {name:?} is invalid or repeated (1-63 of a-z, 0-9, '-', once per epoch)"
    )]
    BadName {
        /// The name, lossily decoded.
        name: String,
    },
    /// Too many contributions, or too many bytes.
    #[error("service contributions exceed their caps: {what} is {have}, at most {max}")]
    TooLarge {
        /// Which cap.
        what: &'static str,
        /// What was announced.
        have: usize,
        /// The cap.
        max: usize,
    },
}

/// One service's contribution to one epoch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Contribution {
    /// The service's registered name (`[a-z0-9][a-z0-9-]{0,62}`).
    pub service: String,
    /// Its bytes, opaque here.
    pub data: Bytes,
}

/// Whether `n` is a service name: `[a-z0-9][a-z0-9-]{0,62}`.
pub fn valid_name(n: &[u8]) -> bool {
    !n.is_empty()
        && n.len() <= 63
        && (n[0].is_ascii_lowercase() || n[0].is_ascii_digit())
        && n.iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
}

/// Checks a list against the caps and the name rules.
///
/// # Errors
/// [`ContribError::BadName`] or [`ContribError::TooLarge`].
pub fn check(list: &[Contribution]) -> Result<(), ContribError> {
    if list.len() > MAX_SERVICES {
        return Err(ContribError::TooLarge {
            what: "the number of contributions",
            have: list.len(),
            max: MAX_SERVICES,
        });
    }
    let mut total = 0usize;
    for (i, c) in list.iter().enumerate() {
        if !valid_name(c.service.as_bytes()) || list[..i].iter().any(|o| o.service == c.service) {
            return Err(ContribError::BadName {
                name: c.service.clone(),
            });
        }
        if c.data.len() > MAX_CONTRIBUTION_BYTES {
            return Err(ContribError::TooLarge {
                what: "one contribution's bytes",
                have: c.data.len(),
                max: MAX_CONTRIBUTION_BYTES,
            });
        }
        total += c.data.len();
    }
    if total > MAX_TOTAL_BYTES {
        return Err(ContribError::TooLarge {
            what: "the epoch's contribution bytes",
            have: total,
            max: MAX_TOTAL_BYTES,
        });
    }
    Ok(())
}

/// Bytes [`encode`] writes for `list`.
pub fn encoded_len(list: &[Contribution]) -> usize {
    2 + list
        .iter()
        .map(|c| 1 + c.service.len() + 4 + c.data.len())
        .sum::<usize>()
}

/// Appends `list` to `b`.
///
/// # Panics
/// If `list` breaks the caps of [`check`] (a list built by hand must be checked first).
pub fn encode(b: &mut BytesMut, list: &[Contribution]) {
    check(list).expect("contributions within their caps");
    b.put_u16_le(list.len() as u16);
    for c in list {
        b.put_u8(c.service.len() as u8);
        b.put_slice(c.service.as_bytes());
        b.put_u32_le(c.data.len() as u32);
        b.put_slice(&c.data);
    }
}

/// Reads a list from the front of `p`; nothing left at all reads as no contributions.
///
/// # Errors
/// Any [`ContribError`]; each length is checked against what is left and against its cap before
/// anything is taken.
pub fn decode(p: &mut Bytes) -> Result<Vec<Contribution>, ContribError> {
    if p.is_empty() {
        return Ok(Vec::new());
    }
    let need = |what, n: usize, p: &Bytes| {
        if p.remaining() < n {
            Err(ContribError::Truncated {
                what,
                need: n,
                have: p.remaining(),
            })
        } else {
            Ok(())
        }
    };
    need("count", 2, p)?;
    let count = p.get_u16_le() as usize;
    if count > MAX_SERVICES {
        return Err(ContribError::TooLarge {
            what: "the number of contributions",
            have: count,
            max: MAX_SERVICES,
        });
    }
    let mut list = Vec::with_capacity(count);
    for _ in 0..count {
        need("name length", 1, p)?;
        let n = p.get_u8() as usize;
        need("name", n, p)?;
        let name = p.split_to(n);
        need("data length", 4, p)?;
        let len = p.get_u32_le() as usize;
        if len > MAX_CONTRIBUTION_BYTES {
            return Err(ContribError::TooLarge {
                what: "one contribution's bytes",
                have: len,
                max: MAX_CONTRIBUTION_BYTES,
            });
        }
        need("data", len, p)?;
        list.push(Contribution {
            service: String::from_utf8_lossy(&name).into_owned(),
            data: p.split_to(len),
        });
    }
    // Names (valid, once each) and the epoch's total, as an encoder checks them.
    check(&list)?;
    Ok(list)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trips(items in proptest::collection::btree_map("[a-z0-9][a-z0-9-]{0,20}",
                proptest::collection::vec(any::<u8>(), 0..256), 0..8)) {
            let list: Vec<Contribution> = items
                .into_iter()
                .map(|(service, data)| Contribution { service, data: data.into() })
                .collect();
            let mut b = BytesMut::new();
            encode(&mut b, &list);
            prop_assert_eq!(b.len(), encoded_len(&list));
            let mut p = b.freeze();
            prop_assert_eq!(decode(&mut p).unwrap(), list);
            prop_assert!(p.is_empty());
        }

        #[test]
        fn never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode(&mut Bytes::from(bytes));
        }
    }

    #[test]
    fn nothing_left_is_no_contributions() {
        assert_eq!(decode(&mut Bytes::new()).unwrap(), vec![]);
    }

    #[test]
    fn a_repeated_name_is_refused() {
        let mut b = BytesMut::new();
        b.put_u16_le(2);
        for _ in 0..2 {
            b.put_u8(2);
            b.put_slice(b"kv");
            b.put_u32_le(0);
        }
        let err = decode(&mut b.freeze()).unwrap_err();
        assert!(
            matches!(&err, ContribError::BadName { name } if name == "kv"),
            "{err}"
        );
    }

    #[test]
    fn an_announced_length_over_the_cap_is_refused_before_reading() {
        let mut b = BytesMut::new();
        b.put_u16_le(1);
        b.put_u8(2);
        b.put_slice(b"kv");
        b.put_u32_le(MAX_CONTRIBUTION_BYTES as u32 + 1);
        let err = decode(&mut b.freeze()).unwrap_err();
        assert!(matches!(err, ContribError::TooLarge { .. }), "{err}");
    }

    #[test]
    fn an_uppercase_name_is_refused() {
        let mut b = BytesMut::new();
        b.put_u16_le(1);
        b.put_u8(2);
        b.put_slice(b"KV");
        b.put_u32_le(0);
        assert!(matches!(
            decode(&mut b.freeze()),
            Err(ContribError::BadName { .. })
        ));
    }
}
