//! Frames: the envelope around every replication message.
//!
//! ```text
//! offset size field
//!  0     4    magic     b"EPHY"
//!  4     1    version   WIRE_VERSION (2: VM state became tagged and versioned)
//!  5     1    type      MessageType (0 is reserved as invalid)
//!  6     2    flags     reserved, must be 0
//!  8     4    length    payload bytes that follow the header (little-endian)
//! 12     4    crc32c    CRC32C (Castagnoli) over header bytes 0..12, then the payload
//! 16     ...  payload
//! ```
//!
//! All integers are little-endian. The length is checked against the reader's cap *before* any payload
//! buffer is allocated, and the CRC before the payload is parsed.

use bytes::{Bytes, BytesMut};

/// The four bytes every frame starts with.
pub const MAGIC: [u8; 4] = *b"EPHY";
/// The wire protocol version this crate speaks.
pub const WIRE_VERSION: u8 = 2;
/// Size of the fixed frame header in bytes.
pub const HEADER_BYTES: usize = 16;
/// Default cap on one frame's payload: 8 MiB (a chunk carries at most 1 MiB of page data).
pub const DEFAULT_MAX_PAYLOAD_BYTES: u32 = 8 << 20;

/// Why a frame was refused. Each message names what was wrong.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// The frame does not start with the magic bytes.
    #[error(
        "bad frame magic {found:02x?} (expected {MAGIC:02x?}): not an Endophyte replication stream"
    )]
    BadMagic {
        /// The four bytes found instead.
        found: [u8; 4],
    },
    /// The peer speaks another protocol version.
    #[error("unsupported wire version {found} (this node speaks {WIRE_VERSION})")]
    Version {
        /// The version the peer sent.
        found: u8,
    },
    /// Reserved flag bits were set.
    #[error("frame flags {flags:#06x} are reserved and must be 0")]
    Flags {
        /// The flags found.
        flags: u16,
    },
    /// The payload length exceeds the cap; nothing was allocated.
    #[error("frame of {len} payload bytes exceeds the cap of {max} bytes")]
    TooLarge {
        /// Length announced by the header.
        len: u32,
        /// The reader's cap.
        max: u32,
    },
    /// The CRC32C did not match: the frame was corrupted in transit.
    #[error("frame CRC32C mismatch (header says {expected:#010x}, content gives {actual:#010x}): corrupted frame")]
    Crc {
        /// CRC carried by the header.
        expected: u32,
        /// CRC computed over what arrived.
        actual: u32,
    },
}

/// A parsed and checked frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// Message type byte.
    pub msg_type: u8,
    /// Payload length in bytes.
    pub len: u32,
    /// CRC32C over header bytes 0..12 and the payload.
    pub crc: u32,
}

impl FrameHeader {
    /// Parses and checks the fixed header: magic, version, flags and the length cap `max_payload_bytes`.
    ///
    /// # Errors
    /// [`FrameError::BadMagic`], [`FrameError::Version`], [`FrameError::Flags`], [`FrameError::TooLarge`].
    pub fn parse(buf: &[u8; HEADER_BYTES], max_payload_bytes: u32) -> Result<Self, FrameError> {
        let magic: [u8; 4] = buf[0..4].try_into().expect("4 bytes");
        if magic != MAGIC {
            return Err(FrameError::BadMagic { found: magic });
        }
        if buf[4] != WIRE_VERSION {
            return Err(FrameError::Version { found: buf[4] });
        }
        let flags = u16::from_le_bytes([buf[6], buf[7]]);
        if flags != 0 {
            return Err(FrameError::Flags { flags });
        }
        let len = u32::from_le_bytes(buf[8..12].try_into().expect("4 bytes"));
        if len > max_payload_bytes {
            return Err(FrameError::TooLarge {
                len,
                max: max_payload_bytes,
            });
        }
        Ok(Self {
            msg_type: buf[5],
            len,
            crc: u32::from_le_bytes(buf[12..16].try_into().expect("4 bytes")),
        })
    }

    /// Checks `payload` (exactly `self.len` bytes) against the header's CRC.
    ///
    /// # Errors
    /// [`FrameError::Crc`] when the content does not match.
    pub fn verify(&self, header: &[u8; HEADER_BYTES], payload: &[&[u8]]) -> Result<(), FrameError> {
        let actual = frame_crc(&header[..12], payload);
        if actual != self.crc {
            return Err(FrameError::Crc {
                expected: self.crc,
                actual,
            });
        }
        Ok(())
    }
}

fn frame_crc(head12: &[u8], payload: &[&[u8]]) -> u32 {
    let mut crc = crc32c::crc32c(head12);
    for part in payload {
        crc = crc32c::crc32c_append(crc, part);
    }
    crc
}

/// Builds the 16-byte header for a payload made of `parts` (concatenated), computing its CRC.
pub fn encode_header(msg_type: u8, parts: &[&[u8]]) -> [u8; HEADER_BYTES] {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let len = u32::try_from(len).expect("frame payload over 4 GiB");
    let mut h = [0u8; HEADER_BYTES];
    h[0..4].copy_from_slice(&MAGIC);
    h[4] = WIRE_VERSION;
    h[5] = msg_type;
    h[8..12].copy_from_slice(&len.to_le_bytes());
    let crc = frame_crc(&h[..12], parts);
    h[12..16].copy_from_slice(&crc.to_le_bytes());
    h
}

/// One raw frame: its type byte and checked payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawFrame {
    /// Message type byte.
    pub msg_type: u8,
    /// The payload, CRC already verified.
    pub payload: Bytes,
}

/// Incremental frame reader for byte streams: push bytes in, take checked frames out.
///
/// A decoder that returned an error is poisoned: a stream with a bad frame cannot be resynchronised,
/// so the connection must be closed.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: BytesMut,
    max_payload_bytes: u32,
    poisoned: Option<FrameError>,
}

impl FrameDecoder {
    /// A decoder that refuses payloads over `max_payload_bytes`.
    pub fn new(max_payload_bytes: u32) -> Self {
        Self {
            buf: BytesMut::new(),
            max_payload_bytes,
            poisoned: None,
        }
    }

    /// Appends bytes read from the stream.
    pub fn push(&mut self, data: &[u8]) {
        if self.poisoned.is_none() {
            self.buf.extend_from_slice(data);
        }
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed.
    ///
    /// # Errors
    /// Any [`FrameError`]; afterwards every call returns the same error.
    pub fn next_frame(&mut self) -> Result<Option<RawFrame>, FrameError> {
        if let Some(e) = &self.poisoned {
            return Err(e.clone());
        }
        if self.buf.len() < HEADER_BYTES {
            return Ok(None);
        }
        let head: [u8; HEADER_BYTES] = self.buf[..HEADER_BYTES].try_into().expect("header");
        let header = match FrameHeader::parse(&head, self.max_payload_bytes) {
            Ok(h) => h,
            Err(e) => return Err(self.poison(e)),
        };
        let total = HEADER_BYTES + header.len as usize;
        if self.buf.len() < total {
            self.buf.reserve(total - self.buf.len());
            return Ok(None);
        }
        let mut frame = self.buf.split_to(total);
        let payload = frame.split_off(HEADER_BYTES).freeze();
        if let Err(e) = header.verify(&head, &[&payload]) {
            return Err(self.poison(e));
        }
        Ok(Some(RawFrame {
            msg_type: header.msg_type,
            payload,
        }))
    }

    fn poison(&mut self, e: FrameError) -> FrameError {
        self.buf.clear();
        self.poisoned = Some(e.clone());
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(ty: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = encode_header(ty, &[payload]).to_vec();
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn round_trip_byte_by_byte() {
        let mut bytes = frame(3, b"hello");
        bytes.extend(frame(4, b""));
        let mut d = FrameDecoder::new(1024);
        let mut got = vec![];
        for b in &bytes {
            d.push(std::slice::from_ref(b));
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].msg_type, 3);
        assert_eq!(&got[0].payload[..], b"hello");
        assert_eq!(got[1].payload.len(), 0);
    }

    #[test]
    fn flipped_bit_is_a_crc_error() {
        let mut bytes = frame(3, b"payload bytes");
        bytes[20] ^= 0x10;
        let mut d = FrameDecoder::new(1024);
        d.push(&bytes);
        assert!(matches!(d.next_frame(), Err(FrameError::Crc { .. })));
        // Poisoned from then on.
        d.push(&frame(3, b"x"));
        assert!(d.next_frame().is_err());
    }

    #[test]
    fn oversized_is_refused_from_the_header_alone() {
        let mut h = encode_header(3, &[b""]);
        h[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        let mut d = FrameDecoder::new(1 << 20);
        d.push(&h);
        let e = d.next_frame().unwrap_err();
        assert_eq!(
            e,
            FrameError::TooLarge {
                len: u32::MAX,
                max: 1 << 20
            }
        );
        assert!(e.to_string().contains("exceeds the cap"));
    }

    #[test]
    fn wrong_magic_and_version_are_named() {
        let mut bytes = frame(3, b"x");
        bytes[0] = b'X';
        let mut d = FrameDecoder::new(1024);
        d.push(&bytes);
        assert!(matches!(d.next_frame(), Err(FrameError::BadMagic { .. })));
        let mut bytes = frame(3, b"x");
        bytes[4] = 9;
        let mut d = FrameDecoder::new(1024);
        d.push(&bytes);
        assert_eq!(d.next_frame(), Err(FrameError::Version { found: 9 }));
    }
}
