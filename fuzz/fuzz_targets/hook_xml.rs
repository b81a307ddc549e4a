//! A libvirt domain XML as KubeVirt's hook hands it to the sidecar hook (onDefineDomain): it is mutated
//! (a QMP monitor added) or refused with a reason; a mutated domain is accepted again and left as it is
//! (KubeVirt may call the hook on a domain it defined before).
#![no_main]

use endophyte_kubevirt_hooks::domain::add_monitor;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = add_monitor(data, "/var/run/endophyte/qmp.sock") {
        let again = add_monitor(&m.xml, "/var/run/endophyte/qmp.sock")
            .expect("a domain the hook produced is refused by the hook");
        assert!(!again.changed, "the hook mutated its own output again");
        assert_eq!(again.xml, m.xml);
    }
});
