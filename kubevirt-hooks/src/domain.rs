//! The domain XML mutation: a libvirt domain (as virt-launcher defines it) gains an extra QMP monitor
//! that the Endophyte sidecar drives, added with libvirt's QEMU namespace (`<qemu:commandline>`, libvirt's
//! `docs/drvqemu.rst`, "Pass-through of arbitrary qemu commands"):
//!
//! ```text
//! -chardev socket,id=endophyte-qmp,path=PATH,server=on,wait=off -mon chardev=endophyte-qmp,mode=control
//! ```
//!
//! Everything else passes through event by event (quick-xml), so devices, their order, comments and
//! whitespace stay as they were. A domain that already has the monitor is returned unchanged, so a second
//! define of the same domain changes nothing more.

use quick_xml::events::{BytesEnd, BytesStart, BytesText, Event};
use quick_xml::{Reader, Writer};

/// libvirt's QEMU namespace URI.
pub const QEMU_NS: &str = "http://libvirt.org/schemas/domain/qemu/1.0";
/// The chardev id of the monitor the mutation adds.
pub const CHARDEV_ID: &str = "endophyte-qmp";

/// Why a domain could not be mutated.
#[derive(Debug, thiserror::Error)]
pub enum DomainError {
    /// The bytes are not well-formed XML.
    #[error("the domain XML is malformed at byte {offset}: {message}")]
    Malformed {
        /// Byte offset in the input where the reader stopped.
        offset: u64,
        /// The parser's message.
        message: String,
    },
    /// The root element is not a libvirt `<domain>`.
    #[error("the document's root element is <{0}>, not <domain>")]
    NotDomain(String),
    /// There is no root element.
    #[error("the document has no root element")]
    Empty,
    /// `xmlns:qemu` is bound to another namespace, so the QEMU namespace cannot take that prefix.
    #[error("xmlns:qemu is bound to {0:?}, not libvirt's QEMU namespace {QEMU_NS}")]
    PrefixTaken(String),
    /// The monitor socket path cannot go into a QEMU option value.
    #[error("the monitor path {0:?} contains a comma or a control character, which QEMU's option syntax cannot carry")]
    BadPath(String),
}

/// A mutated domain.
#[derive(Debug)]
pub struct Mutated {
    /// The domain XML to define.
    pub xml: Vec<u8>,
    /// Whether anything was added (false: the monitor was already there).
    pub changed: bool,
}

/// The four `<qemu:arg>` values that add the monitor at `path`.
pub fn monitor_args(path: &str) -> [String; 4] {
    [
        "-chardev".into(),
        format!("socket,id={CHARDEV_ID},path={path},server=on,wait=off"),
        "-mon".into(),
        format!("chardev={CHARDEV_ID},mode=control"),
    ]
}

/// Adds the monitor at `qmp_path` (as the QEMU process sees it) to `xml`.
///
/// # Errors
/// [`DomainError`]: malformed XML, a root that is not `<domain>`, the `qemu` prefix bound elsewhere, or a
/// path QEMU's option syntax cannot carry.
pub fn add_monitor(xml: &[u8], qmp_path: &str) -> Result<Mutated, DomainError> {
    if qmp_path.contains(',') || qmp_path.chars().any(char::is_control) {
        return Err(DomainError::BadPath(qmp_path.into()));
    }
    let m = mutate(xml, qmp_path)?;
    // The reader is lenient where XML is strict; a domain the hook writes must be one it would accept
    // and leave as it is, or virt-launcher would define malformed XML. Checked, not assumed: the
    // fuzzer found three leniencies this way (tests/fixtures/fuzz).
    if m.changed && !mutate(&m.xml, qmp_path).is_ok_and(|again| !again.changed) {
        return Err(DomainError::Malformed {
            offset: 0,
            message: "the domain is malformed in a way the reader let through: mutated, it is no \
                      longer a domain the hook accepts"
                .into(),
        });
    }
    Ok(m)
}

/// One mutation pass of [`add_monitor`], unchecked.
fn mutate(xml: &[u8], qmp_path: &str) -> Result<Mutated, DomainError> {
    let mut m = Mutation {
        r: Reader::from_reader(xml),
        w: Writer::new(Vec::with_capacity(xml.len() + 512)),
        pending: None,
    };
    m.r.config_mut().trim_text(false);
    let args = monitor_args(qmp_path);
    let marker = format!("socket,id={CHARDEV_ID},");
    let mut depth = 0usize;
    let mut prefix = String::from("qemu");
    let mut seen_root = false;
    // The whitespace before <domain>'s first child: one level of indentation.
    let mut indent: Option<String> = None;
    let mut in_cmdline = false;
    let (mut have_cmdline, mut have_monitor, mut changed) = (false, false, false);
    loop {
        let ev = m.r.read_event().map_err(|e| m.malformed(&e))?.into_owned();
        m.check_names(&ev)?;
        match ev {
            Event::Text(t) => {
                // Held until the next event, so that insertions can go before it.
                m.flush()?;
                m.pending = Some(t);
                continue;
            }
            Event::Start(ref e) | Event::Empty(ref e) if depth == 0 => {
                let name = String::from_utf8_lossy(e.name().as_ref()).into_owned();
                if name != "domain" {
                    return Err(DomainError::NotDomain(name));
                }
                if matches!(ev, Event::Empty(_)) {
                    return Err(DomainError::NotDomain("domain/> (empty)".into()));
                }
                seen_root = true;
                let (start, p, added) = m.root_with_namespace(e)?;
                prefix = p;
                changed |= added;
                m.write(Event::Start(start))?;
                depth = 1;
            }
            Event::Start(ref e) => {
                if depth == 1 {
                    indent.get_or_insert_with(|| m.pending_text());
                    if e.name().as_ref() == format!("{prefix}:commandline").as_bytes() {
                        in_cmdline = true;
                        have_cmdline = true;
                    }
                }
                depth += 1;
                m.write(ev)?;
            }
            Event::Empty(ref e) => {
                let name = e.name().as_ref().to_vec();
                if depth == 1 {
                    indent.get_or_insert_with(|| m.pending_text());
                }
                if depth == 1 && name == format!("{prefix}:commandline").as_bytes() {
                    // An empty <qemu:commandline/> becomes one holding the monitor.
                    have_cmdline = true;
                    have_monitor = true;
                    changed = true;
                    let ind = indent.clone().unwrap_or_default();
                    let e = e.to_owned();
                    m.write(Event::Start(e.clone()))?;
                    m.write_args(&prefix, &ind, &args)?;
                    m.write_text(&ind)?;
                    m.write(Event::End(e.to_end().into_owned()))?;
                    continue;
                }
                if in_cmdline && depth == 2 && name == format!("{prefix}:arg").as_bytes() {
                    let value = e
                        .try_get_attribute("value")
                        .map_err(|x| m.malformed(&x))?
                        .map(|a| a.unescape_value().map(|v| v.into_owned()))
                        .transpose()
                        .map_err(|x| m.malformed(&x))?;
                    have_monitor |= value.is_some_and(|v| v.starts_with(&marker));
                }
                m.write(ev)?;
            }
            Event::End(_) => {
                if depth == 2 && in_cmdline {
                    in_cmdline = false;
                    if !have_monitor {
                        have_monitor = true;
                        changed = true;
                        let ind = indent.clone().unwrap_or_default();
                        m.write_args_before_pending(&prefix, &ind, &args)?;
                    }
                }
                if depth == 1 && !have_cmdline {
                    have_cmdline = true;
                    changed = true;
                    let ind = indent.clone().unwrap_or_else(|| "\n  ".into());
                    // After the last child's line, before the whitespace that ends <domain>.
                    let tag = format!("{prefix}:commandline");
                    let held = m.pending.take();
                    m.write_text(&ind)?;
                    m.w.write_event(Event::Start(BytesStart::new(tag.clone())))
                        .map_err(|x| m.malformed(&x))?;
                    m.write_args(&prefix, &ind, &args)?;
                    m.write_text(&ind)?;
                    m.w.write_event(Event::End(BytesEnd::new(tag)))
                        .map_err(|x| m.malformed(&x))?;
                    m.pending = held;
                }
                depth = depth.saturating_sub(1);
                m.write(ev)?;
            }
            Event::Eof => break,
            other => m.write(other)?,
        }
    }
    m.flush()?;
    if !seen_root {
        return Err(DomainError::Empty);
    }
    if depth != 0 {
        return Err(DomainError::Malformed {
            offset: xml.len() as u64,
            message: "the document ends inside <domain>".into(),
        });
    }
    if !changed {
        return Ok(Mutated {
            xml: xml.to_vec(),
            changed: false,
        });
    }
    Ok(Mutated {
        xml: m.w.into_inner(),
        changed,
    })
}

/// The reader and writer of one mutation, and the text event read but not yet written.
struct Mutation<'a> {
    r: Reader<&'a [u8]>,
    w: Writer<Vec<u8>>,
    pending: Option<BytesText<'static>>,
}

impl Mutation<'_> {
    /// The reader does not check names: an element or attribute name that is no XML name (found by
    /// the fuzzer: bytes like `<` or 0xff inside one) is refused here, before it is copied to the
    /// output and makes that malformed.
    fn check_names(&self, ev: &Event<'_>) -> Result<(), DomainError> {
        let bad = |what: &str, n: &[u8]| {
            let n = String::from_utf8_lossy(n);
            (!is_xml_name(&n)).then(|| self.malformed(&format!("{what} {n:?} is not an XML name")))
        };
        let err = match ev {
            Event::Start(e) | Event::Empty(e) => {
                bad("element name", e.name().as_ref()).or_else(|| {
                    e.attributes()
                        .flatten()
                        .find_map(|a| bad("attribute name", a.key.as_ref()))
                })
            }
            Event::End(e) => bad("element name", e.name().as_ref()),
            _ => None,
        };
        err.map_or(Ok(()), Err)
    }

    fn malformed(&self, e: &dyn std::fmt::Display) -> DomainError {
        DomainError::Malformed {
            offset: self.r.buffer_position(),
            message: e.to_string(),
        }
    }

    /// The held text, as written in the input.
    fn pending_text(&self) -> String {
        self.pending
            .as_ref()
            .map(|t| String::from_utf8_lossy(t.as_ref()).into_owned())
            .unwrap_or_default()
    }

    fn flush(&mut self) -> Result<(), DomainError> {
        if let Some(t) = self.pending.take() {
            self.w
                .write_event(Event::Text(t))
                .map_err(|x| self.malformed(&x))?;
        }
        Ok(())
    }

    /// Writes the held text, then `ev`.
    fn write(&mut self, ev: Event<'_>) -> Result<(), DomainError> {
        self.flush()?;
        self.w.write_event(ev).map_err(|x| self.malformed(&x))
    }

    /// Writes whitespace `s` (already escaped: it is only spaces, tabs and line breaks).
    fn write_text(&mut self, s: &str) -> Result<(), DomainError> {
        self.w
            .write_event(Event::Text(BytesText::from_escaped(s.to_string())))
            .map_err(|x| self.malformed(&x))
    }

    /// Writes the monitor's `<P:arg value=.../>` elements, each on its own line one level deeper than
    /// `indent` (the indentation of `<domain>`'s children), after the held text.
    fn write_args(
        &mut self,
        prefix: &str,
        indent: &str,
        args: &[String],
    ) -> Result<(), DomainError> {
        self.flush()?;
        let inner = format!("{indent}{}", unit(indent));
        for v in args {
            self.write_text(&inner)?;
            let mut arg = BytesStart::new(format!("{prefix}:arg"));
            arg.push_attribute(("value", v.as_str()));
            self.w
                .write_event(Event::Empty(arg))
                .map_err(|x| self.malformed(&x))?;
        }
        Ok(())
    }

    /// As [`Self::write_args`], but before the held text (the indentation of a closing tag).
    fn write_args_before_pending(
        &mut self,
        prefix: &str,
        indent: &str,
        args: &[String],
    ) -> Result<(), DomainError> {
        let held = self.pending.take();
        self.write_args(prefix, indent, args)?;
        self.pending = held;
        Ok(())
    }

    /// The root start tag with the QEMU namespace declared: the tag, the namespace's prefix, and whether
    /// the declaration was added.
    fn root_with_namespace(
        &self,
        e: &BytesStart<'_>,
    ) -> Result<(BytesStart<'static>, String, bool), DomainError> {
        let mut bound_qemu = None;
        for a in e.attributes() {
            let a = a.map_err(|x| self.malformed(&x))?;
            let key = String::from_utf8_lossy(a.key.as_ref()).into_owned();
            // The reader does not check names; the prefix found here names every element the hook
            // writes, so a key that is no XML name would make the output malformed.
            if !is_xml_name(&key) {
                return Err(self.malformed(&format!(
                    "the root's attribute name {key:?} is not an XML name"
                )));
            }
            let value = a.unescape_value().map_err(|x| self.malformed(&x))?;
            if let Some(p) = key.strip_prefix("xmlns:") {
                // A prefix is an NCName (Namespaces in XML 1.0, section 4): "xmlns:2emu" is a name,
                // but "2emu:commandline" would not be.
                if !is_xml_name(p) || p.contains(':') {
                    return Err(
                        self.malformed(&format!("namespace prefix {p:?} is not an XML NCName"))
                    );
                }
                if value == QEMU_NS {
                    return Ok((e.to_owned(), p.to_string(), false));
                }
                if p == "qemu" {
                    bound_qemu = Some(value.into_owned());
                }
            }
        }
        if let Some(v) = bound_qemu {
            return Err(DomainError::PrefixTaken(v));
        }
        let mut start = e.to_owned();
        start.push_attribute(("xmlns:qemu", QEMU_NS));
        Ok((start, "qemu".into(), true))
    }
}

/// Whether `s` is an XML `Name` (XML 1.0, fifth edition, section 2.3, productions 4, 4a and 5).
fn is_xml_name(s: &str) -> bool {
    fn start(c: char) -> bool {
        matches!(c, ':' | 'A'..='Z' | '_' | 'a'..='z' | '\u{C0}'..='\u{D6}' | '\u{D8}'..='\u{F6}'
            | '\u{F8}'..='\u{2FF}' | '\u{370}'..='\u{37D}' | '\u{37F}'..='\u{1FFF}'
            | '\u{200C}'..='\u{200D}' | '\u{2070}'..='\u{218F}' | '\u{2C00}'..='\u{2FEF}'
            | '\u{3001}'..='\u{D7FF}' | '\u{F900}'..='\u{FDCF}' | '\u{FDF0}'..='\u{FFFD}'
            | '\u{10000}'..='\u{EFFFF}')
    }
    let mut chars = s.chars();
    chars.next().is_some_and(start)
        && chars.all(|c| {
            start(c)
                || matches!(c, '-' | '.' | '0'..='9' | '\u{B7}' | '\u{300}'..='\u{36F}'
                    | '\u{203F}'..='\u{2040}')
        })
}

/// One level of indentation as `indent` (a line break then spaces or tabs) shows it.
fn unit(indent: &str) -> &str {
    let spaces = indent.trim_start_matches(['\n', '\r']);
    if spaces.starts_with('\t') {
        "\t"
    } else if spaces.is_empty() {
        ""
    } else {
        "  "
    }
}
