//! A QEMU migration stream (what a QEMU, or whatever holds its monitor, writes into an epoch's socket), cut
//! at fuzzer-chosen points, through the sans-IO parser to its end; and a VM state as a backup journals it
//! and a target restores it (the wire's encoding around QEMU's), which must round-trip when it decodes.
#![no_main]

use endophyte_qemu::stream::parse::Parser;
use endophyte_qemu::QemuState;
use endophyte_wire::vmstate;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 1 {
        let mut b = bytes::Bytes::copy_from_slice(rest);
        if let Ok(Some(vm)) = vmstate::decode_opt(&mut b) {
            if let Ok(q) = QemuState::from_vm_state(&vm) {
                let _ = q.runstate();
                let again = QemuState::from_vm_state(&q.to_vm_state()).expect("our own encoding");
                assert_eq!(again, q, "a QEMU state re-encodes to itself");
            }
        }
        return;
    }
    let mut p = Parser::new();
    for piece in rest.chunks(usize::from(mode >> 1).max(1) * 16) {
        p.push(piece);
        loop {
            match p.poll() {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
    let _ = p.finish();
});
