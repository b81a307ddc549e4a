//! A backup's QEMU command template (`endophyte backup --target-qemu`) from the command line libvirt
//! would run for a domain (`virsh domxml-to-native qemu-argv`): the same machine, devices and options,
//! so that the target QEMU accepts the source's migration stream, with what belongs to the source's host
//! moved into the VM's directory on the backup:
//!
//! - the environment assignments before the program are dropped;
//! - libvirt's own monitor (`-chardev socket,id=charmonitor,...`) becomes the backup's, at `{qmp}`;
//! - every other socket or file chardev and `-qmp unix:` monitor keeps its file name in `{dir}`;
//! - libvirt's master-key secret object (a file in libvirt's per-domain directory) is dropped.
//!
//! A command line that takes file descriptors from libvirt (`fd=`, `-add-fd`: tap devices, pre-opened
//! disks) cannot be started from a template, and is refused naming them.

/// The chardev id libvirt gives its own monitor.
pub const LIBVIRT_MONITOR: &str = "charmonitor";

/// Why a libvirt command line cannot become a template.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// The text does not split into words.
    #[error("the QEMU command line does not split into words: {0}")]
    Split(String),
    /// There is no program.
    #[error("the QEMU command line is empty")]
    Empty,
    /// libvirt's monitor is missing: the backup would have nothing to drive.
    #[error(
        "the QEMU command line has no libvirt monitor (-chardev socket,id={LIBVIRT_MONITOR},...)"
    )]
    NoMonitor,
    /// Options take descriptors only libvirt holds.
    #[error("the QEMU command line takes file descriptors from libvirt ({0}): a backup cannot start it from a template")]
    Descriptors(String),
}

/// The template for `argv` (`virsh domxml-to-native qemu-argv` output, shell-quoted as libvirt prints it).
///
/// # Errors
/// [`TemplateError`].
pub fn template_from_native(argv: &str) -> Result<Vec<String>, TemplateError> {
    let words = shell_words::split(argv).map_err(|e| TemplateError::Split(e.to_string()))?;
    let mut words = words.into_iter().skip_while(|w| is_assignment(w));
    let program = words.next().ok_or(TemplateError::Empty)?;
    let mut out = vec![program];
    let mut monitor = false;
    let mut fds = vec![];
    while let Some(w) = words.next() {
        let value = match w.as_str() {
            "-object" | "-chardev" | "-qmp" | "-add-fd" | "-netdev" | "-device" | "-blockdev"
            | "-drive" => words.next(),
            _ => None,
        };
        let Some(v) = value else {
            out.push(w);
            continue;
        };
        if w == "-add-fd" || v.split(',').any(|kv| kv.starts_with("fd=")) || v.contains("\"fd\":") {
            fds.push(format!("{w} {v}"));
            continue;
        }
        match w.as_str() {
            "-object" if v.contains("\"qom-type\":\"secret\"") && v.contains("masterKey") => {
                continue
            }
            "-chardev" => {
                let mut parts: Vec<String> = v.split(',').map(String::from).collect();
                let id = parts
                    .iter()
                    .find_map(|p| p.strip_prefix("id="))
                    .map(String::from);
                let kind = parts[0].clone();
                if matches!(kind.as_str(), "socket" | "file") {
                    for p in parts.iter_mut() {
                        if let Some(path) = p.strip_prefix("path=") {
                            *p = if id.as_deref() == Some(LIBVIRT_MONITOR) {
                                monitor = true;
                                "path={qmp}".into()
                            } else {
                                format!("path={{dir}}/{}", file_name(path))
                            };
                        }
                    }
                }
                out.push(w);
                out.push(parts.join(","));
            }
            "-qmp" => {
                let v = match v.strip_prefix("unix:") {
                    Some(rest) => {
                        let (path, opts) = rest.split_once(',').unwrap_or((rest, ""));
                        let opts = if opts.is_empty() {
                            String::new()
                        } else {
                            format!(",{opts}")
                        };
                        format!("unix:{{dir}}/{}{opts}", file_name(path))
                    }
                    None => v,
                };
                out.push(w);
                out.push(v);
            }
            _ => {
                out.push(w);
                out.push(v);
            }
        }
    }
    if !fds.is_empty() {
        return Err(TemplateError::Descriptors(fds.join("; ")));
    }
    if !monitor {
        return Err(TemplateError::NoMonitor);
    }
    Ok(out)
}

fn is_assignment(w: &str) -> bool {
    w.split_once('=').is_some_and(|(k, _)| {
        !k.is_empty()
            && k.bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
    })
}

fn file_name(path: &str) -> String {
    std::path::Path::new(path)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_libvirt_command_line_becomes_a_template() {
        let argv = "LC_ALL=C PATH=/usr/bin HOME=/var/lib/libvirt/qemu/domain--1-d /usr/bin/qemu-system-x86_64 \
            -name guest=d,debug-threads=on -S \
            -object '{\"qom-type\":\"secret\",\"id\":\"masterKey0\",\"format\":\"raw\",\"file\":\"/var/lib/libvirt/qemu/domain--1-d/master-key.aes\"}' \
            -machine pc-i440fx-7.2,memory-backend=pc.ram -m 16 \
            -chardev socket,id=charmonitor,path=/var/lib/libvirt/qemu/domain--1-d/monitor.sock,server=on,wait=off \
            -mon chardev=charmonitor,id=monitor,mode=control \
            -chardev file,id=charserial0,path=/tmp/x/run/serial.log \
            -chardev socket,id=endophyte-qmp,path=/var/run/kubevirt-hooks/h/endophyte/qmp.sock,server=on,wait=off \
            -qmp unix:/tmp/x/run/probe.qmp,server=on,wait=off";
        let t = template_from_native(argv).unwrap();
        assert_eq!(t[0], "/usr/bin/qemu-system-x86_64");
        let joined = t.join(" ");
        assert!(
            !joined.contains("masterKey") && !joined.contains("LC_ALL"),
            "{joined}"
        );
        assert!(joined.contains("socket,id=charmonitor,path={qmp},server=on,wait=off"));
        assert!(joined.contains("file,id=charserial0,path={dir}/serial.log"));
        assert!(joined.contains("socket,id=endophyte-qmp,path={dir}/qmp.sock,server=on,wait=off"));
        assert!(joined.contains("-qmp unix:{dir}/probe.qmp,server=on,wait=off"));
        assert!(joined.contains("-machine pc-i440fx-7.2,memory-backend=pc.ram -m 16"));
    }

    #[test]
    fn what_cannot_be_templated_is_named() {
        let e = template_from_native(
            "qemu -netdev tap,fd=23,id=hostnet0 -chardev socket,id=charmonitor,path=/m",
        )
        .unwrap_err();
        assert!(e.to_string().contains("fd=23"), "{e}");
        assert!(matches!(
            template_from_native("qemu -m 16"),
            Err(TemplateError::NoMonitor)
        ));
        assert!(matches!(
            template_from_native("A=b"),
            Err(TemplateError::Empty)
        ));
        assert!(matches!(
            template_from_native("qemu 'x"),
            Err(TemplateError::Split(_))
        ));
    }
}
