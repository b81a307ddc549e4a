//! A libvirt domain XML as KubeVirt's hook hands it to the sidecar hook (onDefineDomain): it is mutated
//! (a QMP monitor added) or refused with a reason, and a mutated domain is XML that mutates again.
#![no_main]

use endophyte_kubevirt_hooks::domain::add_monitor;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = add_monitor(data, "/var/run/endophyte/qmp.sock") {
        let _ = add_monitor(&m.xml, "/var/run/endophyte/qmp.sock");
    }
});
