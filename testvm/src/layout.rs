//! Guest physical memory map of a testvm guest, and the structures the VMM builds in it before boot:
//! GDT, IDT, identity-mapped 4-level page tables (2 MiB pages), the guest program and its config block.
//!
//! Every structure starts on its own host page, so that the dirty pages a harvest reports can be told
//! apart: the system area (tables, code, config) is never written once the guest runs; each vCPU's stack,
//! status record and log ring are its own pages; the rest is the workload area.
//!
//! ```text
//! 0                 page 0, unused
//! gdt_gpa           GDT: null, 64-bit code (0x08), data (0x10)
//! idt_gpa           IDT: 256 gates, the first 32 pointing at the guest's reporting stubs
//! pml4_gpa ..       PML4, PDPT, one PD per GiB (2 MiB pages, A and D preset so the CPU never writes them)
//! config_gpa        config block (guest::cfg)
//! image_gpa         guest program
//! stack_gpa         vCPU stacks, STACK_BYTES each
//! status_gpa        vCPU status records, one page each
//! log_gpa           vCPU log rings (verify mode only), log_stride bytes each
//! work_gpa ..       workload area, up to mem_bytes
//! ```

use serde::{Deserialize, Serialize};

use crate::guest::{self, GuestImage, WorkloadKind};

/// Bytes of x86-64 paging structures and descriptor tables (architectural, not the host page size).
const X86_TABLE_BYTES: u64 = 4096;
/// A 2 MiB large page.
const LARGE_PAGE_BYTES: u64 = 2 << 20;
/// Bytes one page directory maps.
const PD_SPAN_BYTES: u64 = 1 << 30;
/// Stack per vCPU.
pub const STACK_BYTES: u64 = 16 << 10;
/// GDT selector of the 64-bit code segment.
pub const CODE_SELECTOR: u16 = 0x08;
/// GDT selector of the data segment.
pub const DATA_SELECTOR: u16 = 0x10;
/// Largest log ring, in entries.
const MAX_LOG_CAP: u64 = 1 << 18;
/// Smallest log ring, in entries.
const MIN_LOG_CAP: u64 = 1 << 12;

/// Paging-structure entry bits (Intel SDM vol. 3A, 4.5).
mod pte {
    pub const PRESENT: u64 = 1 << 0;
    pub const WRITABLE: u64 = 1 << 1;
    pub const ACCESSED: u64 = 1 << 5;
    pub const DIRTY: u64 = 1 << 6;
    pub const LARGE: u64 = 1 << 7;
}

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// guest RAM of {mem_bytes} bytes is too small: the system area alone needs {needed_bytes} bytes
    #[error("guest RAM of {mem_bytes} bytes is too small: the system area for {vcpus} vCPUs needs {needed_bytes} bytes plus at least one workload page per vCPU")]
    TooSmall {
        /// Requested RAM.
        mem_bytes: u64,
        /// vCPUs requested.
        vcpus: u32,
        /// Bytes the system area takes.
        needed_bytes: u64,
    },
    /// Guest RAM size is not a multiple of the page size, or above the 512 GiB the page tables map.
    #[error("guest RAM of {mem_bytes} bytes must be a multiple of the {page_size}-byte page size and at most 512 GiB")]
    BadSize {
        /// Requested RAM.
        mem_bytes: u64,
        /// Host page size.
        page_size: u64,
    },
    /// No vCPUs, or more than the layout supports.
    #[error("{vcpus} vCPUs requested; testvm supports 1 to 64")]
    BadVcpus {
        /// vCPUs requested.
        vcpus: u32,
    },
}

/// Where everything lives in guest physical memory. All fields are guest physical addresses or byte
/// counts; serialized into saved VM state so that a restored VM finds its guest where it left it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    /// Guest RAM size in bytes.
    pub mem_bytes: u64,
    /// Host page size in bytes: the unit of dirty tracking.
    pub page_size: u64,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// GDT.
    pub gdt_gpa: u64,
    /// IDT.
    pub idt_gpa: u64,
    /// PML4 (CR3).
    pub pml4_gpa: u64,
    /// PDPT.
    pub pdpt_gpa: u64,
    /// First page directory.
    pub pd_gpa: u64,
    /// Number of page directories (one per GiB).
    pub pd_count: u64,
    /// Config block.
    pub config_gpa: u64,
    /// Guest program.
    pub image_gpa: u64,
    /// Guest program size in bytes.
    pub image_bytes: u64,
    /// First vCPU stack (lowest address).
    pub stack_gpa: u64,
    /// First vCPU status record.
    pub status_gpa: u64,
    /// First vCPU log ring (0 when not verifying).
    pub log_gpa: u64,
    /// Bytes per vCPU log ring, header page included (0 when not verifying).
    pub log_stride: u64,
    /// Log ring capacity in entries (0 when not verifying).
    pub log_cap: u64,
    /// Workload area start.
    pub work_gpa: u64,
    /// Workload area size in pages.
    pub work_pages: u64,
}

impl Layout {
    /// Computes the layout for `mem_bytes` of guest RAM, `vcpus` vCPUs, host pages of `page_size` bytes,
    /// and a guest image of `image_bytes`; `verify` reserves the per-vCPU log rings.
    ///
    /// # Errors
    /// [`LayoutError`] when the size is not page-aligned, too large, too small, or the vCPU count is
    /// out of range.
    pub fn new(
        mem_bytes: u64,
        vcpus: u32,
        page_size: u64,
        image_bytes: u64,
        verify: bool,
    ) -> Result<Self, LayoutError> {
        if !(1..=64).contains(&vcpus) {
            return Err(LayoutError::BadVcpus { vcpus });
        }
        if mem_bytes == 0 || mem_bytes % page_size != 0 || mem_bytes > 512 * PD_SPAN_BYTES {
            return Err(LayoutError::BadSize {
                mem_bytes,
                page_size,
            });
        }
        let align = |x: u64| x.next_multiple_of(page_size);
        let mut cursor = align(X86_TABLE_BYTES.max(page_size)); // leave page 0 unused
        let mut take = |bytes: u64| {
            let at = cursor;
            cursor = align(cursor + bytes);
            at
        };
        let gdt_gpa = take(X86_TABLE_BYTES);
        let idt_gpa = take(X86_TABLE_BYTES);
        let pml4_gpa = take(X86_TABLE_BYTES);
        let pdpt_gpa = take(X86_TABLE_BYTES);
        let pd_count = mem_bytes.div_ceil(PD_SPAN_BYTES);
        let pd_gpa = take(pd_count * X86_TABLE_BYTES);
        let config_gpa = take(guest::cfg::SIZE as u64);
        let image_gpa = take(image_bytes);
        let stack_gpa = take(STACK_BYTES * u64::from(vcpus));
        let status_gpa = take(page_size * u64::from(vcpus));
        let mem_pages = mem_bytes / page_size;
        let (log_cap, log_stride) = if verify {
            let cap = (mem_pages / 4)
                .next_power_of_two()
                .clamp(MIN_LOG_CAP, MAX_LOG_CAP);
            (cap, page_size + align(cap * 4))
        } else {
            (0, 0)
        };
        let log_gpa = if verify {
            take(log_stride * u64::from(vcpus))
        } else {
            0
        };
        let work_gpa = cursor;
        if work_gpa + page_size * u64::from(vcpus) > mem_bytes {
            return Err(LayoutError::TooSmall {
                mem_bytes,
                vcpus,
                needed_bytes: work_gpa,
            });
        }
        Ok(Self {
            mem_bytes,
            page_size,
            vcpus,
            gdt_gpa,
            idt_gpa,
            pml4_gpa,
            pdpt_gpa,
            pd_gpa,
            pd_count,
            config_gpa,
            image_gpa,
            image_bytes,
            stack_gpa,
            status_gpa,
            log_gpa,
            log_stride,
            log_cap,
            work_gpa,
            work_pages: (mem_bytes - work_gpa) / page_size,
        })
    }

    /// Top of vCPU `i`'s stack (the initial RSP).
    pub fn stack_top(&self, vcpu: u32) -> u64 {
        self.stack_gpa + STACK_BYTES * (u64::from(vcpu) + 1)
    }

    /// Guest physical address of vCPU `i`'s status record.
    pub fn status_record(&self, vcpu: u32) -> u64 {
        self.status_gpa + self.page_size * u64::from(vcpu)
    }

    /// Guest physical address of vCPU `i`'s log ring header, if verifying.
    pub fn log_ring(&self, vcpu: u32) -> Option<u64> {
        (self.log_cap > 0).then(|| self.log_gpa + self.log_stride * u64::from(vcpu))
    }

    /// Whether page index `page` is a vCPU's own page (stack, status record or log ring).
    pub fn is_vcpu_own_page(&self, page: u64) -> bool {
        let gpa = page * self.page_size;
        let vcpus = u64::from(self.vcpus);
        let in_range = |start: u64, len: u64| gpa >= start && gpa < start + len;
        in_range(self.stack_gpa, STACK_BYTES * vcpus)
            || in_range(self.status_gpa, self.page_size * vcpus)
            || (self.log_cap > 0 && in_range(self.log_gpa, self.log_stride * vcpus))
    }

    /// Whether page index `page` is in the workload area.
    pub fn is_work_page(&self, page: u64) -> bool {
        let gpa = page * self.page_size;
        gpa >= self.work_gpa && gpa < self.mem_bytes
    }

    /// Writes GDT, IDT, page tables and the guest image into guest RAM through `write(gpa, bytes)`.
    pub fn write_system_area(&self, image: &GuestImage, write: &mut dyn FnMut(u64, &[u8])) {
        // GDT: null, 64-bit code (L=1, P, DPL0, execute/read, accessed), data (P, read/write, accessed).
        let gdt: [u64; 3] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];
        write(self.gdt_gpa, &words_to_bytes(&gdt));

        // IDT: 64-bit interrupt gates (type 0xE, present, DPL 0) for the architectural exceptions.
        let mut idt = vec![0u8; 256 * 16];
        for v in 0..guest::ISR_VECTORS {
            let handler = self.image_gpa + image.isr_stub_offset(v);
            let gate = &mut idt[usize::from(v) * 16..usize::from(v) * 16 + 16];
            gate[0..2].copy_from_slice(&(handler as u16).to_le_bytes());
            gate[2..4].copy_from_slice(&CODE_SELECTOR.to_le_bytes());
            gate[4] = 0; // IST
            gate[5] = 0x8e; // present, DPL 0, 64-bit interrupt gate
            gate[6..8].copy_from_slice(&((handler >> 16) as u16).to_le_bytes());
            gate[8..12].copy_from_slice(&((handler >> 32) as u32).to_le_bytes());
        }
        write(self.idt_gpa, &idt);

        // Identity map of all RAM with 2 MiB pages; accessed/dirty preset so the CPU never writes the
        // tables (they would otherwise show up as dirty pages the guest did not write).
        let table = pte::PRESENT | pte::WRITABLE | pte::ACCESSED;
        let mut pml4 = [0u64; 512];
        pml4[0] = self.pdpt_gpa | table;
        write(self.pml4_gpa, &words_to_bytes(&pml4));
        let mut pdpt = [0u64; 512];
        for (i, e) in pdpt.iter_mut().enumerate().take(self.pd_count as usize) {
            *e = (self.pd_gpa + i as u64 * X86_TABLE_BYTES) | table;
        }
        write(self.pdpt_gpa, &words_to_bytes(&pdpt));
        let large_pages = self.mem_bytes.div_ceil(LARGE_PAGE_BYTES);
        for pd in 0..self.pd_count {
            let mut entries = [0u64; 512];
            for (i, e) in entries.iter_mut().enumerate() {
                let n = pd * 512 + i as u64;
                if n < large_pages {
                    *e = (n * LARGE_PAGE_BYTES) | table | pte::DIRTY | pte::LARGE;
                }
            }
            write(
                self.pd_gpa + pd * X86_TABLE_BYTES,
                &words_to_bytes(&entries),
            );
        }
        write(self.image_gpa, image.bytes);
    }

    /// The config block for the guest, as bytes to write at `config_gpa`.
    pub fn config_block(&self, w: &WorkloadConfig, tsc_hz: u64) -> Vec<u8> {
        use guest::cfg;
        let mut b = vec![0u8; cfg::SIZE];
        let mut put = |off: usize, v: u64| b[off..off + 8].copy_from_slice(&v.to_le_bytes());
        put(cfg::MAGIC, guest::CONFIG_MAGIC);
        put(cfg::PAGE_SIZE, self.page_size);
        put(cfg::PAGE_SHIFT, u64::from(self.page_size.trailing_zeros()));
        put(cfg::KIND, w.kind as u64);
        put(cfg::WORK_START, self.work_gpa);
        put(cfg::WORK_PAGES, self.work_pages);
        put(cfg::HOT_PAGES, w.hot_bytes / self.page_size);
        put(cfg::RATE, w.rate_pages_per_s / u64::from(self.vcpus));
        put(cfg::TSC_HZ, tsc_hz);
        let mut flags = 0;
        if self.log_cap > 0 {
            flags |= guest::FLAG_VERIFY;
        }
        put(cfg::FLAGS, flags);
        put(cfg::SEED, w.seed);
        put(cfg::VCPUS, u64::from(self.vcpus));
        put(cfg::STATUS_BASE, self.status_gpa);
        put(cfg::STATUS_STRIDE, self.page_size);
        put(cfg::LOG_BASE, self.log_gpa);
        put(cfg::LOG_STRIDE, self.log_stride);
        put(cfg::LOG_CAP, self.log_cap);
        put(cfg::STOP_AT_PAGES, w.stop_at_pages);
        let stride = if w.kind == WorkloadKind::Fault {
            w.scan_stride
        } else {
            w.scan_stride.max(1)
        };
        put(cfg::SCAN_STRIDE, stride);
        put(cfg::IDLE_NAP_US, 1000);
        put(cfg::PRINT_EVERY_PAGES, w.print_every_pages);
        b
    }
}

/// What the guest should do: parsed from `--workload` (see [`WorkloadConfig::parse`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadConfig {
    /// Workload kind (encoded as in the guest).
    #[serde(with = "kind_serde")]
    pub kind: WorkloadKind,
    /// Hot set size in bytes (hotset).
    pub hot_bytes: u64,
    /// Target write rate, pages per second, all vCPUs together; 0 = as fast as the guest can.
    pub rate_pages_per_s: u64,
    /// Scan stride in pages (scan).
    pub scan_stride: u64,
    /// Fill all of the workload area with PRNG output (the VMM does it, before boot).
    pub fill: bool,
    /// PRNG seed.
    pub seed: u64,
    /// Per-vCPU page-write limit; 0 = none.
    pub stop_at_pages: u64,
    /// vCPU 0 prints a `pages=<hex>` console line every this many pages; 0 = never.
    #[serde(default)]
    pub print_every_pages: u64,
}

mod kind_serde {
    use super::WorkloadKind;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(k: &WorkloadKind, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(super::kind_name(*k))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<WorkloadKind, D::Error> {
        let name = String::deserialize(d)?;
        super::kind_from_name(&name)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown workload kind {name:?}")))
    }
}

fn kind_name(k: WorkloadKind) -> &'static str {
    match k {
        WorkloadKind::Idle => "idle",
        WorkloadKind::Hotset => "hotset",
        WorkloadKind::Uniform => "uniform",
        WorkloadKind::Scan => "scan",
        WorkloadKind::Fault => "fault",
    }
}

fn kind_from_name(s: &str) -> Option<WorkloadKind> {
    Some(match s {
        "idle" => WorkloadKind::Idle,
        "hotset" => WorkloadKind::Hotset,
        "uniform" => WorkloadKind::Uniform,
        "scan" => WorkloadKind::Scan,
        "fault" => WorkloadKind::Fault,
        _ => return None,
    })
}

/// Errors parsing a workload description.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WorkloadParseError {
    /// Unknown kind.
    #[error("unknown workload {0:?}: expected idle, hotset, uniform, scan or fault")]
    UnknownKind(String),
    /// Unknown or malformed `key=value`.
    #[error("workload {kind}: bad parameter {param:?}: {why}")]
    BadParam {
        /// Workload kind.
        kind: String,
        /// The offending `key=value`.
        param: String,
        /// What is wrong with it.
        why: String,
    },
}

impl WorkloadConfig {
    /// Parses `kind[:key=value,...]`, e.g. `hotset:size=256M,rate=50000`, `uniform:rate=10000`,
    /// `scan:stride=4`, `idle`, `fault:kind=pf` (`ud` or `pf`: takes that exception on purpose). Keys: `size` (bytes, with K/M/G suffixes; hotset), `rate` (pages/s, all
    /// vCPUs together; 0 = unpaced), `stride` (pages; scan), `seed`, `stop_at` (pages per vCPU).
    ///
    /// # Errors
    /// [`WorkloadParseError`] naming the unknown kind or the bad parameter.
    pub fn parse(s: &str) -> Result<Self, WorkloadParseError> {
        let (kind_s, params) = s.split_once(':').unwrap_or((s, ""));
        let kind = kind_from_name(kind_s)
            .ok_or_else(|| WorkloadParseError::UnknownKind(kind_s.to_string()))?;
        let mut w = Self {
            kind,
            hot_bytes: 64 << 20,
            rate_pages_per_s: 0,
            scan_stride: 1,
            fill: false,
            seed: 0x5eed_1234_abcd_0001,
            stop_at_pages: 0,
            print_every_pages: 0,
        };
        for param in params.split(',').filter(|p| !p.is_empty()) {
            let bad = |why: &str| WorkloadParseError::BadParam {
                kind: kind_s.to_string(),
                param: param.to_string(),
                why: why.to_string(),
            };
            let (k, v) = param
                .split_once('=')
                .ok_or_else(|| bad("expected key=value"))?;
            match (k, kind) {
                ("size", WorkloadKind::Hotset) => {
                    w.hot_bytes =
                        parse_bytes(v).ok_or_else(|| bad("expected a byte size like 256M"))?;
                    if w.hot_bytes == 0 {
                        return Err(bad("hot set must not be empty"));
                    }
                }
                ("rate", _) => {
                    w.rate_pages_per_s = v.parse().map_err(|_| bad("expected pages per second"))?
                }
                ("stride", WorkloadKind::Scan) => {
                    w.scan_stride = v.parse().map_err(|_| bad("expected a page count"))?;
                    if w.scan_stride == 0 {
                        return Err(bad("stride must be at least 1"));
                    }
                }
                ("kind", WorkloadKind::Fault) => {
                    // The guest reads the fault kind from the scan-stride field: 0 = #UD, 1 = #PF.
                    w.scan_stride = match v {
                        "ud" => 0,
                        "pf" => 1,
                        _ => return Err(bad("expected ud or pf")),
                    }
                }
                ("seed", _) => w.seed = v.parse().map_err(|_| bad("expected an integer"))?,
                ("stop_at", _) => {
                    w.stop_at_pages = v.parse().map_err(|_| bad("expected a page count"))?
                }
                ("print", _) => {
                    w.print_every_pages = v.parse().map_err(|_| bad("expected a page count"))?
                }
                _ => return Err(bad("unknown key for this workload")),
            }
        }
        Ok(w)
    }

    /// The canonical text form, which [`WorkloadConfig::parse`] reads back.
    pub fn describe(&self) -> String {
        match self.kind {
            WorkloadKind::Idle => "idle".to_string(),
            WorkloadKind::Hotset => format!(
                "hotset:size={},rate={}",
                self.hot_bytes, self.rate_pages_per_s
            ),
            WorkloadKind::Uniform => format!("uniform:rate={}", self.rate_pages_per_s),
            WorkloadKind::Scan => format!(
                "scan:stride={},rate={}",
                self.scan_stride, self.rate_pages_per_s
            ),
            WorkloadKind::Fault => {
                format!(
                    "fault:kind={}",
                    if self.scan_stride == 0 { "ud" } else { "pf" }
                )
            }
        }
    }
}

/// Parses a byte size: a number with an optional K, M, G or T suffix (binary units, optional `i`/`B`).
pub fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let s = s.strip_suffix('B').unwrap_or(s);
    let s = s.strip_suffix('i').unwrap_or(s);
    let (num, mult) = match s.chars().last()? {
        'K' | 'k' => (&s[..s.len() - 1], 1u64 << 10),
        'M' | 'm' => (&s[..s.len() - 1], 1 << 20),
        'G' | 'g' => (&s[..s.len() - 1], 1 << 30),
        'T' | 't' => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

fn words_to_bytes(w: &[u64]) -> Vec<u8> {
    w.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_separates_areas_by_page() {
        let l = Layout::new(64 << 20, 2, 4096, 8192, true).unwrap();
        assert!(l.work_gpa > l.log_gpa && l.log_gpa > l.status_gpa && l.status_gpa > l.stack_gpa);
        assert_eq!(l.work_gpa % 4096, 0);
        assert!(l.log_cap.is_power_of_two());
        assert!(l.is_vcpu_own_page(l.status_record(1) / 4096));
        assert!(!l.is_vcpu_own_page(l.work_gpa / 4096));
        assert!(l.is_work_page((l.mem_bytes - 4096) / 4096));
    }

    #[test]
    fn rejects_bad_sizes() {
        assert!(matches!(
            Layout::new(4096 * 3, 1, 4096, 8192, false),
            Err(LayoutError::TooSmall { .. })
        ));
        assert!(matches!(
            Layout::new(12345, 1, 4096, 8192, false),
            Err(LayoutError::BadSize { .. })
        ));
        assert!(matches!(
            Layout::new(1 << 30, 0, 4096, 8192, false),
            Err(LayoutError::BadVcpus { .. })
        ));
    }

    #[test]
    fn parses_workloads() {
        let w = WorkloadConfig::parse("hotset:size=256M,rate=50000").unwrap();
        assert_eq!(
            (w.kind, w.hot_bytes, w.rate_pages_per_s),
            (WorkloadKind::Hotset, 256 << 20, 50000)
        );
        assert_eq!(WorkloadConfig::parse(&w.describe()).unwrap(), w);
        assert_eq!(
            WorkloadConfig::parse("scan:stride=8").unwrap().scan_stride,
            8
        );
        assert!(matches!(
            WorkloadConfig::parse("hotspot"),
            Err(WorkloadParseError::UnknownKind(_))
        ));
        assert!(matches!(
            WorkloadConfig::parse("idle:size=1M"),
            Err(WorkloadParseError::BadParam { .. })
        ));
        assert!(matches!(
            WorkloadConfig::parse("hotset:size=lots"),
            Err(WorkloadParseError::BadParam { .. })
        ));
        assert_eq!(parse_bytes("1G"), Some(1 << 30));
        assert_eq!(parse_bytes("512MiB"), Some(512 << 20));
    }
}
