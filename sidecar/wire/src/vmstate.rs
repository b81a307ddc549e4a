//! VM state: the vCPU and device state a VMM saves at an epoch's pause, as tagged, versioned bytes.
//!
//! Replication never looks inside it. The VMM implementation that saved it names its format (`format`,
//! e.g. `"testvm"`) and the format's version; the wire, the backup's journal and its checkpoint carry those
//! bytes untouched, and only a VMM implementation that knows the format restores it (a mismatch is an
//! error naming both formats, never a guess).
//!
//! Encoding (little-endian), inside [`crate::msg::EpochEnd`] and [`crate::msg::Switchover`]:
//!
//! ```text
//! format  u8 length (1..=64) + ASCII [a-z0-9._-]   the producer's format tag
//! version u32                                       the format's version
//! data    u32 length + bytes                        at most MAX_STATE_BYTES
//! ```
//!
//! An absent state (an epoch whose state could not be saved) is a single zero byte: a format length of 0.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Longest format tag, bytes.
pub const MAX_FORMAT_BYTES: usize = 64;
/// Largest state accepted, bytes: 4 MiB (QEMU's device state for a plain VM is tens of KiB; a frame's
/// payload cap is 8 MiB).
pub const MAX_STATE_BYTES: usize = 4 << 20;

/// Why bytes are not a valid [`VmState`].
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum VmStateError {
    /// The encoding ends early.
    #[error("VM state truncated: {what} needs {need} bytes, {have} left")]
    Truncated {
        /// Which field.
        what: &'static str,
        /// Bytes it needs.
        need: usize,
        /// Bytes left.
        have: usize,
    },
    /// The format tag is empty, too long or not of the allowed characters.
    #[error(
        "VM state format tag {tag:?} is invalid (1-{MAX_FORMAT_BYTES} of a-z, 0-9, '.', '_', '-')"
    )]
    BadFormat {
        /// The tag, lossily decoded.
        tag: String,
    },
    /// The state is larger than [`MAX_STATE_BYTES`].
    #[error("VM state of {len} bytes exceeds the cap of {MAX_STATE_BYTES} bytes")]
    TooLarge {
        /// Length announced.
        len: usize,
    },
}

/// vCPU and device state from a VMM, opaque to replication. See the module docs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmState {
    /// Format tag of the VMM implementation that produced it (e.g. `"testvm"`).
    pub format: String,
    /// Version of that format.
    pub version: u32,
    /// The state itself.
    pub data: Bytes,
}

fn valid_format(tag: &[u8]) -> bool {
    !tag.is_empty()
        && tag.len() <= MAX_FORMAT_BYTES
        && tag.iter().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'_' | b'-')
        })
}

impl VmState {
    /// A state of `format` (version `version`) holding `data`.
    ///
    /// # Errors
    /// [`VmStateError::BadFormat`] or [`VmStateError::TooLarge`].
    pub fn new(
        format: impl Into<String>,
        version: u32,
        data: impl Into<Bytes>,
    ) -> Result<Self, VmStateError> {
        let s = Self {
            format: format.into(),
            version,
            data: data.into(),
        };
        s.check()?;
        Ok(s)
    }

    fn check(&self) -> Result<(), VmStateError> {
        if !valid_format(self.format.as_bytes()) {
            return Err(VmStateError::BadFormat {
                tag: self.format.clone(),
            });
        }
        if self.data.len() > MAX_STATE_BYTES {
            return Err(VmStateError::TooLarge {
                len: self.data.len(),
            });
        }
        Ok(())
    }

    /// Bytes [`encode_opt`] writes for this state.
    pub fn encoded_len(&self) -> usize {
        1 + self.format.len() + 4 + 4 + self.data.len()
    }
}

/// Appends `state` (or the absent marker) to `b`.
///
/// # Panics
/// If the state breaks the caps of [`VmState::new`] (a state built field by field must be checked first).
pub fn encode_opt(b: &mut BytesMut, state: Option<&VmState>) {
    encode_head(b, state);
    if let Some(s) = state {
        b.put_slice(&s.data);
    }
}

/// Appends everything of `state` but its data bytes (tag, version, data length), so that a caller can send
/// the data without copying it; the data must follow immediately.
///
/// # Panics
/// As [`encode_opt`].
pub fn encode_head(b: &mut BytesMut, state: Option<&VmState>) {
    let Some(s) = state else {
        b.put_u8(0);
        return;
    };
    s.check().expect("a VM state within its caps");
    b.put_u8(s.format.len() as u8);
    b.put_slice(s.format.as_bytes());
    b.put_u32_le(s.version);
    b.put_u32_le(s.data.len() as u32);
}

/// Reads a state (or the absent marker) from the front of `p`.
///
/// # Errors
/// Any [`VmStateError`]; a length is checked against what is left and against the cap before anything is
/// taken.
pub fn decode_opt(p: &mut Bytes) -> Result<Option<VmState>, VmStateError> {
    let need = |what, n: usize, p: &Bytes| {
        if p.remaining() < n {
            Err(VmStateError::Truncated {
                what,
                need: n,
                have: p.remaining(),
            })
        } else {
            Ok(())
        }
    };
    need("format length", 1, p)?;
    let n = p.get_u8() as usize;
    if n == 0 {
        return Ok(None);
    }
    need("format tag", n, p)?;
    let tag = p.split_to(n);
    if !valid_format(&tag) {
        return Err(VmStateError::BadFormat {
            tag: String::from_utf8_lossy(&tag).into_owned(),
        });
    }
    need("version and data length", 8, p)?;
    let version = p.get_u32_le();
    let len = p.get_u32_le() as usize;
    if len > MAX_STATE_BYTES {
        return Err(VmStateError::TooLarge { len });
    }
    need("data", len, p)?;
    Ok(Some(VmState {
        format: String::from_utf8(tag.to_vec()).expect("checked ASCII"),
        version,
        data: p.split_to(len),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trips(tag in "[a-z0-9._-]{1,64}", version: u32, data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let s = VmState::new(tag, version, data).unwrap();
            let mut b = BytesMut::new();
            encode_opt(&mut b, Some(&s));
            prop_assert_eq!(b.len(), s.encoded_len());
            let mut p = b.freeze();
            prop_assert_eq!(decode_opt(&mut p).unwrap(), Some(s));
            prop_assert!(p.is_empty());
        }

        #[test]
        fn any_prefix_is_an_error_not_a_panic(data in proptest::collection::vec(any::<u8>(), 0..64), cut in 0usize..80) {
            let s = VmState::new("testvm", 1, data).unwrap();
            let mut b = BytesMut::new();
            encode_opt(&mut b, Some(&s));
            let full = b.freeze();
            let cut = cut.min(full.len());
            let mut p = full.slice(..cut);
            if cut < full.len() {
                prop_assert!(decode_opt(&mut p).is_err(), "a {cut}-byte prefix of {} decoded", full.len());
            }
        }
    }

    #[test]
    fn absent_is_one_zero_byte() {
        let mut b = BytesMut::new();
        encode_opt(&mut b, None);
        assert_eq!(&b[..], &[0]);
        assert_eq!(decode_opt(&mut b.freeze()).unwrap(), None);
    }

    #[test]
    fn bad_tags_and_sizes_are_named() {
        assert!(VmState::new("", 1, vec![]).is_err());
        assert!(VmState::new("Upper", 1, vec![]).is_err());
        let e = VmState::new("testvm", 1, vec![0u8; MAX_STATE_BYTES + 1]).unwrap_err();
        assert!(e.to_string().contains("exceeds the cap"), "{e}");
        let mut p = Bytes::from_static(&[3, b'a', b'B', b'c', 0, 0, 0, 0, 0, 0, 0, 0]);
        let e = decode_opt(&mut p).unwrap_err();
        assert!(matches!(e, VmStateError::BadFormat { .. }), "{e}");
        let mut big = BytesMut::new();
        big.put_u8(1);
        big.put_u8(b'q');
        big.put_u32_le(1);
        big.put_u32_le(u32::MAX);
        let e = decode_opt(&mut big.freeze()).unwrap_err();
        assert!(matches!(e, VmStateError::TooLarge { .. }), "{e}");
    }
}
