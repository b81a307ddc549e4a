//! A replica written as a file another tool restores: a plain QEMU migration stream (what
//! `qemu-system-x86_64 ... -incoming "exec:cat FILE"` loads) or a libvirt save image (what `virsh restore`
//! reads).
//!
//! A libvirt save image (libvirt's `src/qemu/qemu_saveimage.h`, format version 2) is a 92-byte header,
//! the domain XML with its NUL, zero padding (libvirt leaves 64 KiB so that the XML can be edited in
//! place), then the QEMU stream. The header, in the host's byte order (libvirt writes the C struct as it
//! lies in memory; every host that reads it here is little-endian x86_64): the magic `LibvirtQemudSave`
//! (16 bytes), then u32 `version` (2), `data_len` (XML, its NUL, an optional cookie and the padding),
//! `was_running` (1: `virsh restore` resumes the guest), `format` (0: raw stream), `cookieOffset`
//! (0: no cookie) and 14 unused u32s. As libvirt does, the image is written with the magic
//! `LibvirtQemudPart` first and given its real magic only once complete, so that an interrupted export is
//! never taken for an image.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};

use quick_xml::events::Event;

use crate::state::QemuState;

/// The magic of a complete libvirt save image.
pub const LIBVIRT_MAGIC: &[u8; 16] = b"LibvirtQemudSave";
/// The magic of one still being written.
pub const LIBVIRT_PARTIAL: &[u8; 16] = b"LibvirtQemudPart";
/// The header format version written.
pub const LIBVIRT_VERSION: u32 = 2;
/// The header's size in bytes.
pub const LIBVIRT_HEADER_BYTES: usize = 16 + 4 * 5 + 4 * 14;
/// Room left after the XML for editing it in place, as libvirt leaves.
pub const LIBVIRT_XML_PADDING: usize = 64 * 1024;

/// Why an export failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The domain XML given is not a libvirt domain.
    #[error("the domain XML is not usable: {0}")]
    DomainXml(String),
    /// Reading the replica or writing the file failed.
    #[error("writing the export: {0}")]
    Io(#[from] std::io::Error),
}

/// Writes the plain migration stream that restores `state`'s VM from `replica` into `out`; returns the
/// stream's bytes.
///
/// # Errors
/// Reading the replica or writing failed.
pub fn qemu_stream(state: &QemuState, replica: &File, out: &mut File) -> Result<u64, ExportError> {
    let n = crate::launch::feed::rebuild(state, replica, &mut *out)?;
    out.sync_all()?;
    Ok(n)
}

/// Writes a libvirt save image of `state`'s VM from `replica` with `domain_xml` (the domain's definition,
/// as `virsh dumpxml --migratable` gives it: the machine and devices must be the source's) into `out`,
/// which must be empty; `was_running` says whether `virsh restore` resumes the guest. Returns the file's
/// bytes.
///
/// # Errors
/// [`ExportError::DomainXml`] for XML that is not one `<domain>` element (or holds a NUL); I/O.
pub fn libvirt_save(
    state: &QemuState,
    replica: &File,
    domain_xml: &str,
    was_running: bool,
    out: &mut File,
) -> Result<u64, ExportError> {
    check_domain_xml(domain_xml)?;
    let data_len = domain_xml.len() + 1 + LIBVIRT_XML_PADDING;
    let data_len_u32 = u32::try_from(data_len)
        .map_err(|_| ExportError::DomainXml(format!("{} bytes is too long", domain_xml.len())))?;
    out.write_all(&libvirt_header(LIBVIRT_PARTIAL, data_len_u32, was_running))?;
    out.write_all(domain_xml.as_bytes())?;
    out.write_all(&vec![0u8; 1 + LIBVIRT_XML_PADDING])?;
    let n = crate::launch::feed::rebuild(state, replica, &mut *out)?;
    out.sync_all()?;
    out.seek(SeekFrom::Start(0))?;
    out.write_all(LIBVIRT_MAGIC)?;
    out.sync_all()?;
    Ok((LIBVIRT_HEADER_BYTES + data_len) as u64 + n)
}

/// The header (see the module docs).
fn libvirt_header(magic: &[u8; 16], data_len: u32, was_running: bool) -> Vec<u8> {
    let mut h = Vec::with_capacity(LIBVIRT_HEADER_BYTES);
    h.extend_from_slice(magic);
    for v in [LIBVIRT_VERSION, data_len, u32::from(was_running), 0, 0] {
        h.extend_from_slice(&v.to_ne_bytes());
    }
    h.resize(LIBVIRT_HEADER_BYTES, 0);
    h
}

/// Whether `xml` is one well-formed element named `domain` (libvirt checks the rest when it restores).
fn check_domain_xml(xml: &str) -> Result<(), ExportError> {
    if xml.contains('\0') {
        return Err(ExportError::DomainXml("it holds a NUL byte".into()));
    }
    let bad = |why: String| ExportError::DomainXml(why);
    let mut r = quick_xml::Reader::from_str(xml);
    let mut depth = 0usize;
    let mut roots = 0usize;
    loop {
        let pos = r.buffer_position();
        match r.read_event() {
            Err(e) => return Err(bad(format!("at byte {pos}: {e}"))),
            Ok(Event::Eof) => break,
            Ok(Event::Start(e)) => {
                if depth == 0 {
                    roots += 1;
                    if e.name().as_ref() != b"domain" {
                        return Err(bad(format!(
                            "its root element is <{}>, not <domain>",
                            String::from_utf8_lossy(e.name().as_ref())
                        )));
                    }
                }
                depth += 1;
            }
            Ok(Event::End(_)) => depth = depth.saturating_sub(1),
            Ok(Event::Empty(e)) if depth == 0 => {
                return Err(bad(format!(
                    "its root element <{}/> is empty",
                    String::from_utf8_lossy(e.name().as_ref())
                )))
            }
            Ok(Event::Text(t)) if depth == 0 && !t.iter().all(u8::is_ascii_whitespace) => {
                return Err(bad(format!("text outside the root element at byte {pos}")))
            }
            Ok(_) => {}
        }
    }
    match roots {
        1 if depth == 0 => Ok(()),
        1 => Err(bad("the <domain> element is not closed".into())),
        0 => Err(bad("there is no <domain> element".into())),
        n => Err(bad(format!("{n} root elements"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_libvirts_struct_layout() {
        let h = libvirt_header(LIBVIRT_MAGIC, 0x1234, true);
        assert_eq!(h.len(), 92);
        assert_eq!(&h[..16], b"LibvirtQemudSave");
        assert_eq!(u32::from_le_bytes(h[16..20].try_into().unwrap()), 2);
        assert_eq!(u32::from_le_bytes(h[20..24].try_into().unwrap()), 0x1234);
        assert_eq!(u32::from_le_bytes(h[24..28].try_into().unwrap()), 1);
        assert!(h[28..].iter().all(|&b| b == 0));
    }

    #[test]
    fn domain_xml_is_checked() {
        let ok = "<?xml version='1.0'?>\n<domain type='kvm'><name>a</name></domain>\n";
        check_domain_xml(ok).unwrap();
        for (xml, says) in [
            ("<vm><name>a</name></vm>", "<vm>"),
            ("<domain><name>a</domain>", "byte"),
            ("<domain><name>a</name>", "not closed"),
            ("", "no <domain>"),
            ("<domain/>", "empty"),
            ("<domain></domain><domain></domain>", "2 root"),
            ("<domain>\0</domain>", "NUL"),
        ] {
            let e = check_domain_xml(xml).unwrap_err().to_string();
            assert!(e.contains(says), "{xml:?}: {e}");
        }
    }
}
