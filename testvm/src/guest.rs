//! The guest workload program, built from source into the testvm binary.
//!
//! The guest is position-independent x86-64 assembly (below, in `global_asm!`), placed in a read-only data
//! section of the host binary between two symbols and copied into guest RAM at boot. It never runs on the
//! host. Every vCPU enters at the same entry point in 64-bit long mode (paging on, identity-mapped with
//! 2 MiB pages by the VMM, see [`crate::layout`]) with:
//!
//! - `RDI` = vCPU index, `RSI` = guest physical address of the [`cfg`] block, `RSP` = top of its own stack.
//!
//! What the guest does, per vCPU, on its own slice of the workload area (so that vCPUs never write the same
//! page and a run is deterministic given the seed):
//!
//! 1. Runs its workload: `idle` (updates a heartbeat, then naps), `hotset` (random pages of a hot set),
//!    `uniform` (random pages of its whole slice) or `scan` (sequential passes with a stride), paced by the
//!    TSC to `rate` pages per second per vCPU (0 = as fast as it can).
//! 2. A page write stores one fresh 64-bit PRNG value (an LCG's state) at a random qword of the page.
//!    The rest of the page keeps what was there: with `--fill` the VMM has filled all of RAM with PRNG
//!    output, so written pages stay incompressible.
//! 3. With the verify flag, before every page write it appends the page frame number to its log ring
//!    ([`log`]), so the VMM can check dirty tracking against the guest's own account. After the write it
//!    updates its [`status`] record (pages written, a running checksum). Every 8 writes it publishes its
//!    TSC and paces.
//!
//! Why one qword per page: on this project's hosts /dev/kvm is nested `kvm_pvm`, which runs a guest that
//! is not PVM-aware in its instruction emulator (measured: 0.74 us per instruction, register-only loop).
//! Filling a 4 KiB page costs 5,000 emulated instructions (~180 pages/s); one store costs one, which keeps
//! the hot loop at ~30 instructions. On hardware KVM the same program simply runs faster.
//!
//! Communication with the VMM is by port I/O: [`NAP_PORT`] (the guest asks to be descheduled for the
//! 32-bit number of microseconds it writes), [`EXCEPTION_PORT`] (written by the IDT stubs; the exception
//! frame is on the guest stack) and the 16550 serial port at [`SERIAL_PORT_BASE`].

use std::arch::global_asm;

/// I/O port the guest writes a 32-bit microsecond count to when it wants to nap (rate pacing, idle).
pub const NAP_PORT: u16 = 0x510;
/// I/O port the guest's exception stubs write the vector to; the frame `[vector, error, rip, cs, rflags,
/// rsp, ss]` (8 bytes each) is at the guest's `RSP` at that moment.
pub const EXCEPTION_PORT: u16 = 0x511;
/// Base of the COM1 16550 UART the guest prints to.
pub const SERIAL_PORT_BASE: u16 = 0x3f8;

/// Byte offsets of the configuration block the VMM writes for the guest (all fields `u64`).
pub mod cfg {
    /// Magic value the VMM stores, so a guest started on garbage stops at once.
    pub const MAGIC: usize = 0;
    /// Host page size in bytes (the unit of dirty tracking and of every workload write).
    pub const PAGE_SIZE: usize = 8;
    /// log2 of `PAGE_SIZE`.
    pub const PAGE_SHIFT: usize = 16;
    /// Workload kind: see [`super::WorkloadKind`] (`as u64`).
    pub const KIND: usize = 24;
    /// GPA of the first page of the workload area.
    pub const WORK_START: usize = 32;
    /// Pages in the workload area (all vCPUs together).
    pub const WORK_PAGES: usize = 40;
    /// Hot set size in pages, all vCPUs together (hotset only).
    pub const HOT_PAGES: usize = 48;
    /// Target write rate in pages per second per vCPU; 0 = unpaced.
    pub const RATE: usize = 56;
    /// TSC frequency in Hz, for pacing.
    pub const TSC_HZ: usize = 64;
    /// Flags: [`super::FLAG_VERIFY`].
    pub const FLAGS: usize = 72;
    /// PRNG seed.
    pub const SEED: usize = 80;
    /// Number of vCPUs.
    pub const VCPUS: usize = 88;
    /// GPA of vCPU 0's status record.
    pub const STATUS_BASE: usize = 96;
    /// Bytes between consecutive vCPUs' status records (one page).
    pub const STATUS_STRIDE: usize = 104;
    /// GPA of vCPU 0's log ring (verify mode).
    pub const LOG_BASE: usize = 112;
    /// Bytes between consecutive vCPUs' log rings.
    pub const LOG_STRIDE: usize = 120;
    /// Log ring capacity in entries (a power of two).
    pub const LOG_CAP: usize = 128;
    /// When nonzero, each vCPU stops writing once its pages-written counter reaches this value and naps
    /// until the VMM raises or clears it. The VMM may change it at any time.
    pub const STOP_AT_PAGES: usize = 136;
    /// Scan stride in pages (scan only, >= 1).
    pub const SCAN_STRIDE: usize = 144;
    /// Nap length of the idle loop, microseconds.
    pub const IDLE_NAP_US: usize = 152;
    /// vCPU 0 prints `pages=<16 hex digits>` on the console each time its pages-written counter has grown
    /// by this much (0 = never). Gives tests console output whose content says when it was produced.
    pub const PRINT_EVERY_PAGES: usize = 160;
    /// Size of the block in bytes.
    pub const SIZE: usize = 168;
}

/// Byte offsets of a vCPU's status record (all fields `u64`), one page per vCPU.
pub mod status {
    /// [`super::STATUS_MAGIC`] once the vCPU has started.
    pub const MAGIC: usize = 0;
    /// [`super::GuestState`] as `u64`.
    pub const STATE: usize = 8;
    /// Pages the workload has written (the fill is not counted).
    pub const PAGES_WRITTEN: usize = 16;
    /// Completed passes over the slice (scan only).
    pub const PASSES: usize = 24;
    /// Running checksum: per write, `c = rotl(c, 7) ^ gfn ^ value`.
    pub const CHECKSUM: usize = 32;
    /// TSC value published every 8 writes (or at each idle heartbeat).
    pub const LAST_TSC: usize = 40;
    /// Next page index of a scan.
    pub const SCAN_POS: usize = 64;
    /// Times the guest found its log ring full and had to wait for the VMM.
    pub const LOG_STALLS: usize = 72;
    /// TSC value when the workload (after the fill) started.
    pub const WORK_START_TSC: usize = 80;
    /// Pages-written value at which vCPU 0 prints its next progress line.
    pub const NEXT_PRINT: usize = 88;
}

/// Byte offsets within a vCPU's log ring. The ring is one header page followed by `LOG_CAP` `u32` entries
/// (page frame numbers). The guest advances `HEAD` after storing an entry; the VMM advances `TAIL` after
/// consuming entries. Both count entries since boot (entry `i` lives in slot `i % LOG_CAP`).
pub mod log {
    /// Entries produced (written by the guest).
    pub const HEAD: usize = 0;
    /// Entries consumed (written by the VMM), on its own cache line.
    pub const TAIL: usize = 64;
}

/// Value of [`cfg::MAGIC`].
pub const CONFIG_MAGIC: u64 = 0x4744_4943_4d56_5445; // "ETVMCIDG"
/// Value of [`status::MAGIC`] once a vCPU has started.
pub const STATUS_MAGIC: u64 = 0x5354_4154_5553_5654; // "TVSUTATS"
/// Log every written page frame number into the vCPU's log ring.
pub const FLAG_VERIFY: u64 = 2;
/// Magic at offset 0 of the guest image header.
pub const IMAGE_MAGIC: u64 = 0x4547_414d_4956_5445; // "ETVIMAGE"

/// What a vCPU's guest code is doing, from its status record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[repr(u64)]
pub enum GuestState {
    /// Not started yet (status record still zero).
    NotStarted = 0,
    /// Running its workload.
    Running = 2,
    /// Reached `STOP_AT_PAGES` and waiting.
    Stopped = 3,
}

impl GuestState {
    /// Decodes the raw status field; unknown values map to `None`.
    pub fn from_raw(v: u64) -> Option<Self> {
        match v {
            0 => Some(Self::NotStarted),
            2 => Some(Self::Running),
            3 => Some(Self::Stopped),
            _ => None,
        }
    }
}

/// Workload kinds, as the guest encodes them in [`cfg::KIND`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum WorkloadKind {
    /// Heartbeat and nap.
    Idle = 0,
    /// Random pages of a hot set.
    Hotset = 1,
    /// Random pages over all of the workload area.
    Uniform = 2,
    /// Sequential passes over the workload area with a stride.
    Scan = 3,
    /// Takes an exception on purpose (`#UD` or `#PF`), to exercise the IDT reporting path.
    Fault = 4,
}

/// Linear address the `fault:kind=pf` workload touches: canonical, outside the identity map (only PML4
/// entry 0 is present), so it raises `#PF` with this CR2.
pub const FAULT_PF_ADDRESS: u64 = 0x7f00_0000_0000;

/// Byte distance between consecutive exception stubs in the image.
pub const ISR_STUB_STRIDE: u64 = 16;
/// Number of exception vectors that get a reporting stub (the architectural exceptions).
pub const ISR_VECTORS: u8 = 32;

// The image. Header (all u64): magic, entry offset, ISR table offset, image length.
global_asm!(
    r#"
    .pushsection .rodata.endophyte_testvm_guest,"a",@progbits
    .balign 4096
    .globl endophyte_testvm_guest_start
    .hidden endophyte_testvm_guest_start
endophyte_testvm_guest_start:
    .quad {image_magic}
    .quad tvg_entry - endophyte_testvm_guest_start
    .quad tvg_isr_table - endophyte_testvm_guest_start
    .quad endophyte_testvm_guest_end - endophyte_testvm_guest_start

    .balign 64
tvg_entry:
    cld
    mov r15, rsi
    mov r14, rdi
    mov rax, [r15 + {cfg_magic}]
    movabs rcx, {config_magic}
    cmp rax, rcx
    jne tvg_bad_config
    // r13 = status record of this vCPU
    mov rax, [r15 + {cfg_status_stride}]
    imul rax, r14
    add rax, [r15 + {cfg_status_base}]
    mov r13, rax
    // r11 = log ring of this vCPU, 0 without verify
    xor r11d, r11d
    test qword ptr [r15 + {cfg_flags}], {flag_verify}
    jz 2f
    mov rax, [r15 + {cfg_log_stride}]
    imul rax, r14
    add rax, [r15 + {cfg_log_base}]
    mov r11, rax
2:
    // r12 = PRNG state: seed ^ (index + 1) * golden ratio
    lea rax, [r14 + 1]
    movabs rcx, 0x9E3779B97F4A7C15
    imul rax, rcx
    xor rax, [r15 + {cfg_seed}]
    jnz 3f
    mov eax, 1
3:
    mov r12, rax
    // rbp = pages in this vCPU's slice, rbx = GPA of its first page
    mov rax, [r15 + {cfg_work_pages}]
    xor edx, edx
    div qword ptr [r15 + {cfg_vcpus}]
    mov rbp, rax
    imul rax, r14
    mov rcx, [r15 + {cfg_page_shift}]
    shl rax, cl
    add rax, [r15 + {cfg_work_start}]
    mov rbx, rax
    // r10 = size of the page set the workload draws from
    mov r10, rbp
    cmp qword ptr [r15 + {cfg_kind}], {kind_hotset}
    jne 4f
    mov rax, [r15 + {cfg_hot_pages}]
    xor edx, edx
    div qword ptr [r15 + {cfg_vcpus}]
    cmp rax, rbp
    cmova rax, rbp
    test rax, rax
    jnz 5f
    mov eax, 1
5:
    mov r10, rax
4:
    movabs rax, {status_magic}
    mov [r13 + {st_magic}], rax
    test r14, r14
    jnz 6f
    lea rsi, [rip + tvg_msg_up]
    call tvg_puts
6:
    mov qword ptr [r13 + {st_state}], 2
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov [r13 + {st_work_start_tsc}], rax
    mov [r13 + {st_last_tsc}], rax
    mov r8, rax
    xor esi, esi
    // r9 = mask of qword offsets within a page, rcx = page shift (kept for the whole loop)
    mov r9, [r15 + {cfg_page_size}]
    sub r9, 8
    mov rcx, [r15 + {cfg_page_shift}]
    cmp qword ptr [r15 + {cfg_kind}], {kind_idle}
    je tvg_idle
    cmp qword ptr [r15 + {cfg_kind}], {kind_fault}
    je tvg_fault
    test rbp, rbp
    jz tvg_idle

    // The hot loop. Instructions here are what the guest pays per page write (under emulation every
    // instruction costs about a microsecond), so the loop is kept short: one LCG step, one store of fresh
    // PRNG output at a random qword of the chosen page, the counters, and the log entry when verifying.
tvg_loop:
    mov rax, [r15 + {cfg_stop_at}]
    test rax, rax
    jnz tvg_stop_check
tvg_after_stop:
    test esi, 7
    jz tvg_pace
tvg_pick:
    // r12 = r12 * 6364136223846793005 + 1442695040888963407 (Knuth's MMIX LCG); use its high bits.
    movabs rax, 6364136223846793005
    imul r12, rax
    movabs rax, 1442695040888963407
    add r12, rax
    cmp qword ptr [r15 + {cfg_kind}], {kind_scan}
    je tvg_scan_pick
    mov rax, r12
    shr rax, 32
    mul r10
    shr rax, 32
tvg_write:
    // rax = page index within the slice -> page GPA. With verification the page frame number is logged
    // before the store, so at most one logged write per vCPU is still in flight at any moment.
    shl rax, cl
    add rax, rbx
    test r11, r11
    jz 32f
    shr rax, cl
    call tvg_log_append
    shl rax, cl
32:
    // Store fresh PRNG output at a random qword of the page.
    mov rdx, r12
    shr rdx, 17
    and rdx, r9
    mov [rax + rdx], r12
    shr rax, cl
    // checksum = rotl(checksum, 7) ^ gfn ^ value
    mov rdx, [r13 + {st_checksum}]
    rol rdx, 7
    xor rdx, rax
    xor rdx, r12
    mov [r13 + {st_checksum}], rdx
    inc qword ptr [r13 + {st_pages}]
    inc rsi
    jmp tvg_loop

tvg_scan_pick:
    mov rax, [r13 + {st_scan_pos}]
    mov rdx, rax
    add rdx, [r15 + {cfg_scan_stride}]
    cmp rdx, r10
    jb 23f
    xor edx, edx
    inc qword ptr [r13 + {st_passes}]
23:
    mov [r13 + {st_scan_pos}], rdx
    jmp tvg_write

tvg_stop_check:
    cmp [r13 + {st_pages}], rax
    jb tvg_after_stop
    mov qword ptr [r13 + {st_state}], 3
    mov eax, 1000
    mov dx, {nap_port}
    out dx, eax
    mov qword ptr [r13 + {st_state}], 2
    // re-base pacing so the guest does not burst after the stop
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov r8, rax
    xor esi, esi
    jmp tvg_loop

    // Every 8 pages: maybe print progress (vCPU 0), publish the TSC and pace to the target rate.
tvg_pace:
    test r14, r14
    jnz 13f
    mov rax, [r15 + {cfg_print_every}]
    test rax, rax
    jz 13f
    mov rdx, [r13 + {st_pages}]
    cmp rdx, [r13 + {st_next_print}]
    jb 13f
    add rax, rdx
    mov [r13 + {st_next_print}], rax
    call tvg_print_progress
13:
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov [r13 + {st_last_tsc}], rax
    mov rdi, rax
    mov rax, [r15 + {cfg_rate}]
    test rax, rax
    jz tvg_pick
    // allowed = (now - base) * rate / tsc_hz
    mov rax, rdi
    sub rax, r8
    mul qword ptr [r15 + {cfg_rate}]
    div qword ptr [r15 + {cfg_tsc_hz}]
    cmp rsi, rax
    jb 12f
    // Ahead of schedule by (rsi - allowed) pages: nap for that long (at least 200 us, at most 5 ms).
    mov rdx, rsi
    sub rdx, rax
    imul rax, rdx, 1000000
    xor edx, edx
    div qword ptr [r15 + {cfg_rate}]
    cmp rax, 200
    jae 11f
    mov eax, 200
11:
    mov edx, 5000
    cmp rax, rdx
    cmova rax, rdx
    mov dx, {nap_port}
    out dx, eax
    jmp tvg_pace
12:
    // Behind by more than 20 ms worth of pages (throttled, paused, restored): re-base instead of
    // bursting to catch up.
    mov rdx, rax
    sub rdx, rsi
    push rdx
    mov rax, [r15 + {cfg_rate}]
    xor edx, edx
    mov edi, 50
    div rdi
    inc rax
    pop rdx
    cmp rdx, rax
    jbe tvg_pick
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov r8, rax
    xor esi, esi
    jmp tvg_pick

    // Deliberate exception: SCAN_STRIDE 0 = #UD, otherwise #PF at FAULT_PF_ADDRESS.
tvg_fault:
    cmp qword ptr [r15 + {cfg_scan_stride}], 0
    jne 70f
    .globl endophyte_testvm_guest_ud2
    .hidden endophyte_testvm_guest_ud2
endophyte_testvm_guest_ud2:
    ud2
70:
    movabs rax, {fault_pf_address}
    mov qword ptr [rax], 1
    jmp tvg_idle

tvg_idle:
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov [r13 + {st_last_tsc}], rax
    mov rax, [r15 + {cfg_idle_nap}]
    mov dx, {nap_port}
    out dx, eax
    jmp tvg_idle

    // Append the page frame number in rax to this vCPU's log ring (verify mode only). Waits while the
    // ring is full. Clobbers rdx, rdi.
tvg_log_append:
    push rax
40:
    mov rdx, [r11 + {log_head}]
    mov rdi, rdx
    sub rdi, [r11 + {log_tail}]
    cmp rdi, [r15 + {cfg_log_cap}]
    jb 41f
    inc qword ptr [r13 + {st_log_stalls}]
    mov eax, 50
    mov dx, {nap_port}
    out dx, eax
    mov rax, [rsp]
    jmp 40b
41:
    mov rdi, [r15 + {cfg_log_cap}]
    dec rdi
    and rdi, rdx
    shl rdi, 2
    add rdi, [r15 + {cfg_page_size}]
    mov [r11 + rdi], eax
    inc rdx
    mov [r11 + {log_head}], rdx
    pop rax
    ret

    // Print "pages=<rdx as 16 hex digits>\n" on the serial port. Clobbers rax, rdx, rdi.
tvg_print_progress:
    push rsi
    push rcx
    push rdx
    lea rsi, [rip + tvg_msg_pages]
    call tvg_puts
    pop rdi
    mov ecx, 16
60:
    rol rdi, 4
    mov eax, edi
    and eax, 15
    lea rsi, [rip + tvg_hex_digits]
    mov al, [rsi + rax]
    mov dx, {serial}
    out dx, al
    dec ecx
    jnz 60b
    mov al, 10
    out dx, al
    pop rcx
    pop rsi
    ret

    // Print the NUL-terminated string at rsi on the serial port. Clobbers rax, rdx, rsi.
tvg_puts:
    mov dx, {serial}
50:
    lodsb
    test al, al
    jz 51f
    out dx, al
    jmp 50b
51:
    ret

tvg_bad_config:
    lea rsi, [rip + tvg_msg_bad]
    call tvg_puts
    ud2

    .macro TVG_ISR_NOERR n
    .balign {isr_stride}
    push 0
    push \n
    jmp tvg_isr_common
    .endm
    .macro TVG_ISR_ERR n
    .balign {isr_stride}
    push \n
    jmp tvg_isr_common
    .endm

    .balign {isr_stride}
tvg_isr_table:
    TVG_ISR_NOERR 0
    TVG_ISR_NOERR 1
    TVG_ISR_NOERR 2
    TVG_ISR_NOERR 3
    TVG_ISR_NOERR 4
    TVG_ISR_NOERR 5
    TVG_ISR_NOERR 6
    TVG_ISR_NOERR 7
    TVG_ISR_ERR 8
    TVG_ISR_NOERR 9
    TVG_ISR_ERR 10
    TVG_ISR_ERR 11
    TVG_ISR_ERR 12
    TVG_ISR_ERR 13
    TVG_ISR_ERR 14
    TVG_ISR_NOERR 15
    TVG_ISR_NOERR 16
    TVG_ISR_ERR 17
    TVG_ISR_NOERR 18
    TVG_ISR_NOERR 19
    TVG_ISR_NOERR 20
    TVG_ISR_ERR 21
    TVG_ISR_NOERR 22
    TVG_ISR_NOERR 23
    TVG_ISR_NOERR 24
    TVG_ISR_NOERR 25
    TVG_ISR_NOERR 26
    TVG_ISR_NOERR 27
    TVG_ISR_NOERR 28
    TVG_ISR_ERR 29
    TVG_ISR_ERR 30
    TVG_ISR_NOERR 31

    .balign {isr_stride}
tvg_isr_common:
    mov eax, [rsp]
    mov dx, {exception_port}
    out dx, eax
60:
    hlt
    jmp 60b

tvg_msg_up:
    .asciz "testvm guest: vcpu 0 up\n"
tvg_msg_bad:
    .asciz "testvm guest: bad config block\n"
tvg_msg_pages:
    .asciz "pages="
tvg_hex_digits:
    .ascii "0123456789abcdef"

    .balign 8
    .globl endophyte_testvm_guest_end
    .hidden endophyte_testvm_guest_end
endophyte_testvm_guest_end:
    .popsection
"#,
    image_magic = const IMAGE_MAGIC,
    config_magic = const CONFIG_MAGIC,
    status_magic = const STATUS_MAGIC,
    cfg_magic = const cfg::MAGIC,
    cfg_page_size = const cfg::PAGE_SIZE,
    cfg_page_shift = const cfg::PAGE_SHIFT,
    cfg_kind = const cfg::KIND,
    cfg_work_start = const cfg::WORK_START,
    cfg_work_pages = const cfg::WORK_PAGES,
    cfg_hot_pages = const cfg::HOT_PAGES,
    cfg_rate = const cfg::RATE,
    cfg_tsc_hz = const cfg::TSC_HZ,
    cfg_flags = const cfg::FLAGS,
    cfg_seed = const cfg::SEED,
    cfg_vcpus = const cfg::VCPUS,
    cfg_status_base = const cfg::STATUS_BASE,
    cfg_status_stride = const cfg::STATUS_STRIDE,
    cfg_log_base = const cfg::LOG_BASE,
    cfg_log_stride = const cfg::LOG_STRIDE,
    cfg_log_cap = const cfg::LOG_CAP,
    cfg_stop_at = const cfg::STOP_AT_PAGES,
    cfg_scan_stride = const cfg::SCAN_STRIDE,
    cfg_idle_nap = const cfg::IDLE_NAP_US,
    cfg_print_every = const cfg::PRINT_EVERY_PAGES,
    st_magic = const status::MAGIC,
    st_state = const status::STATE,
    st_pages = const status::PAGES_WRITTEN,
    st_passes = const status::PASSES,
    st_checksum = const status::CHECKSUM,
    st_last_tsc = const status::LAST_TSC,
    st_scan_pos = const status::SCAN_POS,
    st_log_stalls = const status::LOG_STALLS,
    st_work_start_tsc = const status::WORK_START_TSC,
    st_next_print = const status::NEXT_PRINT,
    log_head = const log::HEAD,
    log_tail = const log::TAIL,
    flag_verify = const FLAG_VERIFY,
    kind_idle = const WorkloadKind::Idle as u64,
    kind_hotset = const WorkloadKind::Hotset as u64,
    kind_scan = const WorkloadKind::Scan as u64,
    kind_fault = const WorkloadKind::Fault as u64,
    fault_pf_address = const FAULT_PF_ADDRESS,
    nap_port = const NAP_PORT,
    exception_port = const EXCEPTION_PORT,
    serial = const SERIAL_PORT_BASE,
    isr_stride = const ISR_STUB_STRIDE,
);

unsafe extern "C" {
    static endophyte_testvm_guest_start: u8;
    static endophyte_testvm_guest_end: u8;
    static endophyte_testvm_guest_ud2: u8;
}

/// The assembled guest program, with the offsets the VMM needs to boot it.
#[derive(Clone, Copy, Debug)]
pub struct GuestImage {
    /// The image bytes, to be copied to a page-aligned guest address.
    pub bytes: &'static [u8],
    /// Offset of the entry point within `bytes`.
    pub entry_offset: u64,
    /// Offset of the exception stub for vector 0; vector `v` is at `isr_offset + v * ISR_STUB_STRIDE`.
    pub isr_offset: u64,
}

impl GuestImage {
    /// Returns the guest program linked into this binary.
    pub fn get() -> Self {
        // SAFETY: both symbols are defined by the global_asm! above in the same section, start before end, and the bytes between them are immutable data for the whole life of the program.
        let bytes: &'static [u8] = unsafe {
            let start = &raw const endophyte_testvm_guest_start;
            let end = &raw const endophyte_testvm_guest_end;
            std::slice::from_raw_parts(start, end.offset_from(start) as usize)
        };
        let word =
            |i: usize| u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        assert_eq!(word(0), IMAGE_MAGIC, "guest image header is corrupt");
        assert_eq!(word(3), bytes.len() as u64, "guest image length mismatch");
        Self {
            bytes,
            entry_offset: word(1),
            isr_offset: word(2),
        }
    }

    /// Offset within the image of the `ud2` that `fault:kind=ud` executes.
    pub fn ud2_offset(&self) -> u64 {
        // SAFETY: both symbols are defined in the same global_asm! section; only their addresses are used.
        unsafe {
            (&raw const endophyte_testvm_guest_ud2)
                .offset_from(&raw const endophyte_testvm_guest_start) as u64
        }
    }

    /// Offset of the stub for exception `vector` within the image.
    pub fn isr_stub_offset(&self, vector: u8) -> u64 {
        self.isr_offset + u64::from(vector) * ISR_STUB_STRIDE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Vectors for which the CPU pushes an error code (Intel SDM vol. 3A, table 6-1).
    const fn has_error_code(vector: u8) -> bool {
        matches!(vector, 8 | 10 | 11 | 12 | 13 | 14 | 17 | 21 | 29 | 30)
    }

    #[test]
    fn image_header_is_consistent() {
        let img = GuestImage::get();
        assert!(img.entry_offset < img.bytes.len() as u64);
        assert!(img.isr_stub_offset(31) < img.bytes.len() as u64);
        // Every stub starts with `push imm8` (0x6a): either the zero error code or the vector.
        for v in 0..ISR_VECTORS {
            let off = img.isr_stub_offset(v) as usize;
            assert_eq!(
                img.bytes[off], 0x6a,
                "stub {v} does not start with push imm8"
            );
            let vec_byte = if has_error_code(v) {
                img.bytes[off + 1]
            } else {
                img.bytes[off + 3]
            };
            assert_eq!(vec_byte, v, "stub {v} pushes the wrong vector");
        }
    }
}
