//! Hosts as network namespaces, joined by point-to-point links through the user-space emulator
//! ([`crate::link`]): each end is a TUN device inside its namespace; a thread in this process moves every
//! IP packet from one TUN to the other through a [`Link`], one per direction. TCP and UDP alike see the
//! profile's delay, jitter, loss, rate and queue. Needs root (namespaces, TUN devices) and `ip`
//! (iproute2).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::link::{Link, LinkProfile, LinkStats};

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip").args(args).output().map_err(|e| {
        anyhow::anyhow!(
            "running ip {}: {e} (is iproute2 installed?)",
            args.join(" ")
        )
    })?;
    anyhow::ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// A network namespace, deleted when dropped.
#[derive(Debug)]
pub struct Namespace {
    name: String,
}

impl Namespace {
    /// Creates namespace `name` (replacing a stale one of that name) with its loopback up.
    ///
    /// # Errors
    /// `ip` failed (not root, no namespaces), with its message.
    pub fn create(name: &str) -> anyhow::Result<Self> {
        let _ = ip(&["netns", "del", name]);
        ip(&["netns", "add", name])?;
        let ns = Self { name: name.into() };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip ARGS` inside the namespace.
    ///
    /// # Errors
    /// `ip` failed, with its message.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<()> {
        let mut all = vec!["netns", "exec", &self.name, "ip"];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// A command that runs inside the namespace (through `ip netns exec`).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs `f` on a thread that has entered the namespace: sockets and devices it creates belong to the
    /// namespace and can be used from any thread afterwards.
    ///
    /// # Errors
    /// Entering the namespace failed, or `f` did.
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        let path = PathBuf::from("/var/run/netns").join(&self.name);
        std::thread::spawn(move || -> anyhow::Result<T> {
            let ns = File::open(&path)
                .map_err(|e| anyhow::anyhow!("opening {}: {e}", path.display()))?;
            // SAFETY: setns(2) on an fd we own; it moves only this thread, which ends with `f`.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            anyhow::ensure!(
                rc == 0,
                "entering {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the thread in the namespace panicked"))?
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// `struct ifreq` as TUNSETIFF wants it: the name, then the flags.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

/// Opens TUN device `name` (IP packets, no packet-information header) in the calling thread's namespace.
fn open_tun(name: &str) -> anyhow::Result<File> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| anyhow::anyhow!("opening /dev/net/tun: {e}"))?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    anyhow::ensure!(
        name.len() < libc::IFNAMSIZ,
        "interface name {name:?} too long"
    );
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // TUNSETIFF reads and writes a `struct ifreq`: `IfReq` is its layout (name, flags, padding to 40 bytes).
    // SAFETY: the fd is the TUN control device just opened, and `req` is a valid, live `struct ifreq`.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
    anyhow::ensure!(
        rc == 0,
        "creating TUN device {name}: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: fcntl(2) on the fd just opened; F_SETFL with O_NONBLOCK changes only its status flags.
    let rc = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
    anyhow::ensure!(
        rc == 0,
        "making TUN device {name} non-blocking: {}",
        std::io::Error::last_os_error()
    );
    Ok(f)
}

/// Two namespaces joined by an emulated point-to-point link: `a` is 10.77.N.1, `b` is 10.77.N.2 (N from
/// `subnet`). The emulator thread stops when this is dropped.
pub struct EmulatedLink {
    stop: Arc<AtomicBool>,
    /// While set, every packet either side sends is dropped: a network partition.
    cut: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    stats: Arc<Mutex<[LinkStats; 2]>>,
    /// Address of side `a`.
    pub addr_a: std::net::Ipv4Addr,
    /// Address of side `b`.
    pub addr_b: std::net::Ipv4Addr,
}

impl EmulatedLink {
    /// Joins `a` and `b`: `a_to_b` shapes what `a` sends, `b_to_a` the other direction.
    ///
    /// # Errors
    /// TUN devices or addresses could not be set up (the message names the step).
    pub fn join(
        a: &Namespace,
        b: &Namespace,
        subnet: u8,
        a_to_b: LinkProfile,
        b_to_a: LinkProfile,
    ) -> anyhow::Result<Self> {
        let (ta, tb) = (format!("emu{subnet}a"), format!("emu{subnet}b"));
        let fa = {
            let n = ta.clone();
            a.run(move || open_tun(&n))?
        };
        let fb = {
            let n = tb.clone();
            b.run(move || open_tun(&n))?
        };
        let (addr_a, addr_b) = (
            std::net::Ipv4Addr::new(10, 77, subnet, 1),
            std::net::Ipv4Addr::new(10, 77, subnet, 2),
        );
        for (ns, dev, me, peer) in [(a, &ta, addr_a, addr_b), (b, &tb, addr_b, addr_a)] {
            ns.ip(&[
                "addr",
                "add",
                &format!("{me}"),
                "peer",
                &format!("{peer}"),
                "dev",
                dev,
            ])?;
            ns.ip(&["link", "set", dev, "mtu", "1500", "up"])?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let cut = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(Mutex::new([LinkStats::default(); 2]));
        let thread = {
            let (stop, cut, stats) = (stop.clone(), cut.clone(), stats.clone());
            let links = [Link::new(a_to_b, 1), Link::new(b_to_a, 2)];
            std::thread::Builder::new()
                .name(format!("emu{subnet}"))
                .spawn(move || pump([fa, fb], links, &stop, &cut, &stats))?
        };
        Ok(Self {
            stop,
            cut,
            thread: Some(thread),
            stats,
            addr_a,
            addr_b,
        })
    }

    /// Partitions the two sides (`true`: from now on every packet is dropped, both ways; what is in
    /// flight still arrives) or heals them (`false`). Both sides' processes keep running.
    pub fn set_partitioned(&self, cut: bool) {
        self.cut.store(cut, Ordering::SeqCst);
    }

    /// Counters per direction (`[a→b, b→a]`).
    pub fn stats(&self) -> [LinkStats; 2] {
        *self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for EmulatedLink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Moves packets between the two TUN devices through their links until `stop`.
fn pump(
    mut tun: [File; 2],
    mut links: [Link; 2],
    stop: &AtomicBool,
    cut: &AtomicBool,
    stats: &Mutex<[LinkStats; 2]>,
) {
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        // Deliver what is due: link i carries packets read from tun i into tun 1 - i.
        for i in 0..2 {
            while let Some(p) = links[i].poll_deliver(now) {
                let _ = tun[1 - i].write(&p);
            }
        }
        let wait = links
            .iter()
            .filter_map(|l| l.next_deadline())
            .min()
            .map_or(Duration::from_millis(50), |t| {
                t.saturating_duration_since(Instant::now())
            })
            .min(Duration::from_millis(50));
        let mut fds = [
            libc::pollfd {
                fd: tun[0].as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: tun[1].as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // Sub-millisecond waits round up to 1 ms in poll(2); ppoll takes a timespec.
        let ts = libc::timespec {
            tv_sec: wait.as_secs() as libc::time_t,
            tv_nsec: wait.subsec_nanos() as libc::c_long,
        };
        // SAFETY: ppoll(2) on two pollfds we own for the call's duration; no signal mask.
        let n = unsafe { libc::ppoll(fds.as_mut_ptr(), 2, &ts, std::ptr::null()) };
        if n <= 0 {
            continue;
        }
        // Drain what each device has queued (the fds are non-blocking), a bounded batch at a time so that
        // deliveries due meanwhile are not held up: one syscall round per packet caps the rate otherwise.
        for i in 0..2 {
            if fds[i].revents & libc::POLLIN != 0 {
                for _ in 0..64 {
                    match tun[i].read(&mut buf) {
                        Ok(_) if cut.load(Ordering::Relaxed) => {}
                        Ok(len) => {
                            links[i].offer(Instant::now(), buf[..len].to_vec());
                        }
                        Err(_) => break,
                    }
                }
            }
        }
        *stats.lock().unwrap_or_else(|e| e.into_inner()) = [links[0].stats(), links[1].stats()];
    }
}

/// Whether this process can make namespaces and TUN devices (root, `ip`, /dev/net/tun).
pub fn available() -> bool {
    // SAFETY: geteuid(2) has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    root && std::path::Path::new("/dev/net/tun").exists()
        && Command::new("ip")
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success())
}
