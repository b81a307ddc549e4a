//! Helpers shared by the real-guest test files.

/// Whether /dev/kvm is there. Under CI (`CI` set) a missing /dev/kvm fails the test; elsewhere the test
/// prints a notice and passes without running.
pub fn kvm_available() -> bool {
    if std::path::Path::new("/dev/kvm").exists() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("/dev/kvm is missing on a CI runner: the KVM tests cannot run");
    }
    eprintln!("SKIPPED: /dev/kvm is missing; KVM tests did not run");
    false
}
