//! The migration stream a QEMU started with `-incoming defer` loads a replica from: every page of the
//! replica once, then the pages later epochs rewrite (QEMU takes a page sent again as pre-copy's next
//! pass), then the device state of the epoch to start. Written by a thread of its own ([`Feeder`]), so
//! that a standby QEMU loads the replica while epochs go on and a switchover's restore carries only the
//! final epoch's pages and the device state; or all at once ([`rebuild`]).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use crate::layout::RamLayout;
use crate::state::QemuState;
use crate::stream::write::Writer;
use crate::stream::TARGET_PAGE_SIZE;

/// Why feeding a QEMU failed.
#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    /// Reading the replica or writing the stream failed (QEMU closed it: it refused the stream, or died).
    #[error("writing the restore stream: {0}")]
    Io(#[from] std::io::Error),
    /// The epoch to start has another machine configuration or RAM block list than the one fed so far.
    #[error("the VM's configuration or RAM blocks changed since the replica was loaded (machine {was:?}, now {now:?})")]
    Changed {
        /// The machine type fed.
        was: String,
        /// The epoch's.
        now: String,
    },
    /// The feeding thread is gone.
    #[error("the stream's writer thread ended early")]
    Gone,
}

enum Feed {
    Pages(Vec<u64>),
    Finish(bytes::Bytes),
}

/// The thread writing one restore stream. See the module docs.
pub struct Feeder {
    tx: mpsc::Sender<Feed>,
    scanned: Arc<AtomicBool>,
    thread: JoinHandle<std::io::Result<u64>>,
    head: QemuState,
}

impl Feeder {
    /// Starts writing the stream of `state`'s VM (its header, RAM section start and block list) into
    /// `out`, with every page of `replica` (laid out as [`RamLayout`] of the blocks).
    pub fn start(state: QemuState, replica: File, out: UnixStream) -> Self {
        let (tx, rx) = mpsc::channel();
        let head = QemuState {
            tail: bytes::Bytes::new(),
            ..state
        };
        let h = head.clone();
        let scanned = Arc::new(AtomicBool::new(false));
        let done = scanned.clone();
        let thread = std::thread::Builder::new()
            .name("qemu-feed".into())
            .spawn(move || run(&h, &replica, out, &rx, &done))
            .expect("spawning the restore stream's writer");
        Self {
            tx,
            scanned,
            thread,
            head,
        }
    }

    /// Whether every page of the replica went once (what follows is only what epochs rewrite).
    ///
    /// # Errors
    /// [`FeedError::Gone`]: the writer failed before (its error comes with [`Feeder::finish`]).
    pub fn loaded(&self) -> Result<bool, FeedError> {
        if self.scanned.load(Ordering::Acquire) {
            Ok(true)
        } else if self.thread.is_finished() {
            Err(FeedError::Gone)
        } else {
            Ok(false)
        }
    }

    /// Queues `pages` (replica addresses) to be sent again: an epoch rewrote them.
    ///
    /// # Errors
    /// [`FeedError::Gone`]: the writer failed (its error comes with [`Feeder::finish`]).
    pub fn pages(&self, pages: &[u64]) -> Result<(), FeedError> {
        self.tx
            .send(Feed::Pages(pages.to_vec()))
            .map_err(|_| FeedError::Gone)
    }

    /// Ends the stream with `state`'s device state once every queued page went; returns the stream's
    /// bytes.
    ///
    /// # Errors
    /// `state` is not of the VM fed ([`FeedError::Changed`]); writing failed.
    pub fn finish(self, state: &QemuState) -> Result<u64, FeedError> {
        let same = state.prefix == self.head.prefix
            && state.ram_start == self.head.ram_start
            && state.blocks == self.head.blocks
            && state.section_id == self.head.section_id;
        if !same {
            return Err(FeedError::Changed {
                was: self.head.machine.clone(),
                now: state.machine.clone(),
            });
        }
        let sent = self.tx.send(Feed::Finish(state.tail.clone()));
        let r = self.thread.join().map_err(|_| FeedError::Gone)?;
        let n = r?;
        sent.map_err(|_| FeedError::Gone)?;
        Ok(n)
    }
}

fn run(
    head: &QemuState,
    replica: &File,
    out: UnixStream,
    rx: &mpsc::Receiver<Feed>,
    scanned: &AtomicBool,
) -> std::io::Result<u64> {
    let layout = RamLayout::new(head.blocks.clone());
    let t0 = std::time::Instant::now();
    let mut w = begin(head, out)?;
    all_pages(&mut w, &layout, replica)?;
    w.flush()?;
    scanned.store(true, Ordering::Release);
    tracing::info!(took = ?t0.elapsed(), bytes = layout.geometry().mem_bytes(), "the replica is loaded into the standby QEMU");
    let mut page = vec![0u8; TARGET_PAGE_SIZE];
    loop {
        match rx.recv() {
            Ok(Feed::Pages(pages)) => {
                for addr in pages {
                    let Some((block, offset)) = layout.locate(addr) else {
                        return Err(std::io::Error::other(format!(
                            "page {addr:#x} lies outside the VM's RAM blocks"
                        )));
                    };
                    replica.read_exact_at(&mut page, addr)?;
                    put(&mut w, block, offset, &page)?;
                }
                w.flush()?;
            }
            Ok(Feed::Finish(tail)) => {
                let (mut out, n) = w.finish(&tail)?;
                out.flush()?;
                return Ok(n);
            }
            Err(_) => return Err(std::io::Error::other("abandoned before its end")),
        }
    }
}

fn begin<W: Write>(head: &QemuState, w: W) -> std::io::Result<Writer<BufWriter<W>>> {
    Writer::begin(
        BufWriter::with_capacity(1 << 20, w),
        &head.prefix,
        &head.ram_start,
        &head.blocks,
        head.section_id,
    )
}

fn put<W: Write>(w: &mut Writer<W>, block: usize, offset: u64, page: &[u8]) -> std::io::Result<()> {
    if endophyte_wire::chunk::is_zero_page(page) {
        w.zero(block, offset)
    } else {
        w.page(block, offset, page)
    }
}

/// Every page of every block, from the replica, in order.
fn all_pages<W: Write>(
    w: &mut Writer<W>,
    layout: &RamLayout,
    replica: &File,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    for (i, b) in layout.blocks().iter().enumerate() {
        let mut off = 0u64;
        while off < b.used_bytes {
            let n = (b.used_bytes - off).min(buf.len() as u64) as usize;
            replica.read_exact_at(&mut buf[..n], layout.addr(i, off))?;
            for (k, page) in buf[..n].chunks(TARGET_PAGE_SIZE).enumerate() {
                put(w, i, off + (k * TARGET_PAGE_SIZE) as u64, page)?;
            }
            off += n as u64;
        }
    }
    Ok(())
}

/// Writes the whole stream that restores the VM of `state` from the replica file `replica` into `w`;
/// returns the bytes written.
///
/// # Errors
/// Reading the replica or writing failed.
pub fn rebuild(state: &QemuState, replica: &File, w: impl Write) -> std::io::Result<u64> {
    let layout = RamLayout::new(state.blocks.clone());
    let mut out = begin(state, w)?;
    all_pages(&mut out, &layout, replica)?;
    let (mut w, n) = out.finish(&state.tail)?;
    w.flush()?;
    Ok(n)
}
