//! The domain mutation on domains shaped as KubeVirt's virt-launcher and as people write them
//! (`tests/domains/`): the result validates against libvirt's own schema (`virt-xml-validate`), holds the
//! monitor once, keeps every other element, attribute and text as it was (compared by a second XML parser,
//! roxmltree), and a second mutation changes nothing.

use std::path::Path;
use std::process::Command;

use endophyte_kubevirt_hooks::domain::{add_monitor, monitor_args, DomainError, QEMU_NS};

const QMP: &str = "/var/run/kubevirt-hooks/hook-sidecar-0/endophyte/qmp.sock";

fn fixtures() -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/domains");
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    assert!(v.len() >= 4, "the domain shapes are missing");
    v
}

/// libvirt's schema check; `None` when libvirt-clients is not installed (a failure under CI).
fn validate(xml: &[u8]) -> Option<Result<(), String>> {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), xml).unwrap();
    match Command::new("virt-xml-validate")
        .arg(f.path())
        .arg("domain")
        .output()
    {
        Ok(o) if o.status.success() => Some(Ok(())),
        Ok(o) => Some(Err(format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ))),
        Err(_) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must install libvirt-clients and libxml2-utils"
            );
            None
        }
    }
}

/// Every element in document order with its namespace, attributes and non-blank text, the monitor's
/// `<arg>`s left out when `skip_ours`; a `commandline` with nothing else in it is left out in either
/// case (an empty one in the input gains only the monitor).
fn outline(xml: &[u8], skip_ours: bool) -> Vec<String> {
    let doc = roxmltree::Document::parse(std::str::from_utf8(xml).unwrap()).unwrap();
    let ours = monitor_args(QMP);
    let is_ours = |n: &roxmltree::Node| {
        n.tag_name().namespace() == Some(QEMU_NS)
            && n.tag_name().name() == "arg"
            && n.attribute("value")
                .is_some_and(|v| ours.iter().any(|o| o == v))
    };
    let mut out = vec![];
    for n in doc.descendants().filter(|n| n.is_element()) {
        if skip_ours && is_ours(&n) {
            continue;
        }
        if n.tag_name().namespace() == Some(QEMU_NS)
            && n.tag_name().name() == "commandline"
            && n.children().filter(|c| c.is_element()).all(|c| is_ours(&c))
        {
            continue;
        }
        let mut attrs: Vec<String> = n
            .attributes()
            .map(|a| format!("{:?}:{}={}", a.namespace(), a.name(), a.value()))
            .collect();
        attrs.sort();
        let text: String = n
            .children()
            .filter(|c| c.is_text())
            .map(|c| c.text().unwrap_or("").trim().to_string())
            .collect();
        out.push(format!(
            "{:?}:{} {attrs:?} {text:?}",
            n.tag_name().namespace(),
            n.tag_name().name()
        ));
    }
    out
}

#[test]
fn every_domain_shape_gains_one_monitor_and_keeps_the_rest() {
    for (name, xml) in fixtures() {
        if let Some(r) = validate(&xml) {
            r.unwrap_or_else(|e| panic!("{name}: the fixture itself is invalid: {e}"));
        }
        let m = add_monitor(&xml, QMP).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(m.changed, "{name}");
        if let Some(r) = validate(&m.xml) {
            r.unwrap_or_else(|e| panic!("{name}: {e}\n{}", String::from_utf8_lossy(&m.xml)));
        }
        let text = String::from_utf8(m.xml.clone()).unwrap();
        let doc = roxmltree::Document::parse(&text).unwrap();
        let args: Vec<&str> = doc
            .descendants()
            .filter(|n| n.tag_name().namespace() == Some(QEMU_NS) && n.tag_name().name() == "arg")
            .filter_map(|n| n.attribute("value"))
            .collect();
        let ours = monitor_args(QMP);
        let at = args
            .iter()
            .position(|a| *a == ours[0] && args.get(1).is_some())
            .unwrap_or_else(|| panic!("{name}: no -chardev in {args:?}"));
        let at = args[at..]
            .iter()
            .position(|a| *a == ours[1])
            .map(|p| p + at - 1)
            .unwrap();
        assert_eq!(
            &args[at..at + 4],
            &ours.each_ref().map(String::as_str),
            "{name}"
        );
        assert_eq!(
            args.iter()
                .filter(|a| a.starts_with("socket,id=endophyte-qmp"))
                .count(),
            1,
            "{name}"
        );
        assert_eq!(
            outline(&m.xml, true),
            outline(&xml, false),
            "{name}: something else changed"
        );
        let again = add_monitor(&m.xml, QMP).unwrap();
        assert!(!again.changed, "{name}: the second define changed it");
        assert_eq!(again.xml, m.xml, "{name}");
    }
}

#[test]
fn the_added_lines_follow_the_documents_indentation() {
    let (_, xml) = fixtures()
        .into_iter()
        .find(|(n, _)| n == "kubevirt-containerdisk.xml")
        .unwrap();
    let m = String::from_utf8(add_monitor(&xml, QMP).unwrap().xml).unwrap();
    assert!(
        m.ends_with(&format!(
            "\t<qemu:commandline>\n\t\t<qemu:arg value=\"-chardev\"/>\n\t\t<qemu:arg value=\"socket,id=endophyte-qmp,path={QMP},server=on,wait=off\"/>\n\t\t<qemu:arg value=\"-mon\"/>\n\t\t<qemu:arg value=\"chardev=endophyte-qmp,mode=control\"/>\n\t</qemu:commandline>\n</domain>\n"
        )),
        "{m}"
    );
}

#[test]
fn what_cannot_be_mutated_is_named() {
    let e = |xml: &str| add_monitor(xml.as_bytes(), QMP).unwrap_err();
    assert!(matches!(
        e("<domain><name>x</name>"),
        DomainError::Malformed { .. }
    ));
    let bad = e("<domain><name>x</nam></domain>");
    assert!(bad.to_string().contains("byte"), "{bad}");
    assert!(matches!(e("<vm/>"), DomainError::NotDomain(n) if n == "vm"));
    assert!(matches!(e(""), DomainError::Empty));
    assert!(matches!(
        e("<domain xmlns:qemu='urn:other'><name>x</name></domain>"),
        DomainError::PrefixTaken(_)
    ));
    assert!(matches!(
        add_monitor(b"<domain><name>x</name></domain>", "/run/a,b.sock").unwrap_err(),
        DomainError::BadPath(_)
    ));
}

/// Inputs the fuzzer (`fuzz/fuzz_targets/hook_xml.rs`) found: each is refused, or mutated into a domain
/// the hook accepts again and leaves as it is.
#[test]
fn fuzz_findings_are_refused_or_mutate_into_a_fixed_point() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fuzz");
    for f in std::fs::read_dir(&dir).unwrap().flatten() {
        let input = std::fs::read(f.path()).unwrap();
        let Ok(m) = add_monitor(&input, "/var/run/endophyte/qmp.sock") else {
            continue;
        };
        let again = add_monitor(&m.xml, "/var/run/endophyte/qmp.sock").unwrap_or_else(|e| {
            panic!(
                "{}: the hook refuses its own output ({e}):\n{}",
                f.path().display(),
                String::from_utf8_lossy(&m.xml)
            )
        });
        assert!(!again.changed, "{}", f.path().display());
        assert_eq!(again.xml, m.xml, "{}", f.path().display());
    }
}
