//! A testvm VM's saved state: what, with a copy of its RAM, resumes it elsewhere ([`VmState`], JSON
//! under [`STATE_FORMAT`]).

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use serde::{Deserialize, Serialize};

use crate::layout::{Layout, WorkloadConfig};

/// Format tag of saved testvm state.
pub const STATE_FORMAT: &str = "endophyte-testvm-state";
/// Version of the saved state format.
pub const STATE_VERSION: u32 = 1;

/// One vCPU's saved registers.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// General-purpose registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// x87/SSE state.
    pub fpu: FpuState,
    /// IA32_TSC.
    pub tsc: u64,
}

/// x87/SSE registers (mirrors `kvm_fpu`, which has no serde support).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    /// x87 registers ST0..ST7 (80 bits each, in 16-byte slots).
    pub fpr: [[u8; 16]; 8],
    /// FCW, FSW.
    pub fcw: u16,
    /// FSW.
    pub fsw: u16,
    /// Abridged tag word.
    pub ftwx: u8,
    /// Last x87 opcode.
    pub last_opcode: u16,
    /// Last x87 instruction pointer.
    pub last_ip: u64,
    /// Last x87 data pointer.
    pub last_dp: u64,
    /// XMM0..XMM15.
    pub xmm: [[u8; 16]; 16],
    /// MXCSR.
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        Self {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&FpuState> for kvm_fpu {
    fn from(f: &FpuState) -> Self {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// The 16550's registers (mirrors vm-superio's `SerialState`, which has no serde support).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SerialRegs {
    /// DLL, DLH, IER, IIR, LCR, LSR, MCR, MSR, SCR.
    pub regs: [u8; 9],
    /// Bytes waiting for the guest.
    pub in_buffer: Vec<u8>,
}

/// Everything needed to resume the VM elsewhere, given a copy of its RAM.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmState {
    /// Always [`STATE_FORMAT`].
    pub format: String,
    /// [`STATE_VERSION`].
    pub version: u32,
    /// Guest memory map.
    pub layout: Layout,
    /// The workload the guest runs (informational; the guest reads its config from RAM).
    pub workload: WorkloadConfig,
    /// TSC frequency of the source, kHz.
    pub tsc_khz: u32,
    /// Per-vCPU registers.
    pub vcpus: Vec<VcpuState>,
    /// Serial port.
    pub serial: SerialRegs,
}
