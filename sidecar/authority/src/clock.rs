//! The node's boot clock, which [`endophyte_wire::authority`] measures holds on.

use endophyte_wire::authority::BootInstant;

/// Reads `CLOCK_BOOTTIME` (clock_gettime(2)): time since boot, including time suspended, so that a hold
/// measured across a suspend counts the suspend.
pub fn boot_now() -> BootInstant {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_BOOTTIME exists on every Linux since 2.6.39.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    assert_eq!(r, 0, "clock_gettime(CLOCK_BOOTTIME) failed");
    BootInstant::from_since_boot(std::time::Duration::new(
        ts.tv_sec as u64,
        ts.tv_nsec as u32,
    ))
}
