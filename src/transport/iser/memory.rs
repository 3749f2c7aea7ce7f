//! Guest memory registered once per region with each RDMA device, so the
//! target moves command data straight to and from guest memory (zero copy).
//!
//! - One protection domain per RDMA device, shared by every iSER connection
//!   of the process that goes through that device (created at the first
//!   connection; it keeps that connection's CM id allocated, which keeps the
//!   device context open for the life of the process).
//! - Each region of the guest memory table is registered with
//!   LOCAL_WRITE | REMOTE_READ | REMOTE_WRITE. A command advertises the
//!   region's rkey with the buffer's host virtual address (iSER VA; ZBVA not
//!   used).
//! - [`GuestMemoryRegistration::update`] is called at every memory table
//!   change: regions already registered (same host address and length, i.e.
//!   the same mapping) are kept, new ones registered, removed ones dropped.
//!   A registration keeps the memory table it came from alive, so its
//!   mapping outlives the MR; commands in flight hold an `Arc` of the
//!   registration they use, so a table change never pulls an MR from under a
//!   command.
//!
//! Security note: a registered region's rkey lets the target read and write
//! the whole region (all of guest RAM) for as long as the connection lives,
//! not only the buffers of commands in flight. That is the price of
//! registering once instead of per I/O (fast registration); the target is
//! trusted with the guest's memory, as it is trusted with its disk.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use log::{info, warn};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use super::verbs::{Access, CmId, MemoryRegion, ProtectionDomain, VerbsError};
use crate::blk::buffer::GuestMemoryMmap;

/// One registered guest memory region.
pub struct RegionReg {
    // Field order: the MR is deregistered before the mapping may go away.
    mr: MemoryRegion,
    /// A memory table that maps this region (swapped to the newest table that
    /// still contains the same mapping).
    mem: Mutex<Arc<GuestMemoryMmap>>,
    start: u64,
    len: u64,
}

impl std::fmt::Debug for RegionReg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegionReg")
            .field("start", &format_args!("{:#x}", self.start))
            .field("len", &self.len)
            .field("rkey", &format_args!("{:#x}", self.mr.rkey()))
            .finish()
    }
}

impl RegionReg {
    /// Remote key (STag) to advertise for buffers in this region.
    pub fn rkey(&self) -> u32 {
        self.mr.rkey()
    }

    /// Local key for SGEs pointing into this region.
    pub fn lkey(&self) -> u32 {
        self.mr.lkey()
    }

    /// Whether `addr..addr+len` lies inside the region.
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        addr >= self.start
            && addr
                .checked_add(len)
                .is_some_and(|end| end <= self.start + self.len)
    }
}

/// The registrations of one device.
pub type Regions = Arc<Vec<Arc<RegionReg>>>;

/// Finds the registration containing `addr..addr+len`.
pub fn find(regions: &Regions, addr: u64, len: u64) -> Option<&Arc<RegionReg>> {
    regions.iter().find(|r| r.contains(addr, len))
}

struct DeviceReg {
    key: usize,
    pd: ProtectionDomain,
    regions: Regions,
}

#[derive(Default)]
struct Inner {
    mem: Option<Arc<GuestMemoryMmap>>,
    devices: Vec<DeviceReg>,
}

/// Guest memory registrations of the process, per RDMA device.
#[derive(Default)]
pub struct GuestMemoryRegistration {
    inner: Mutex<Inner>,
    /// Bumped at every change, so connections refresh their snapshot cheaply.
    epoch: AtomicU64,
    warned_unregistered: AtomicBool,
}

impl std::fmt::Debug for GuestMemoryRegistration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestMemoryRegistration")
            .field("epoch", &self.epoch.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

fn region_ranges(mem: &GuestMemoryMmap) -> Vec<(u64, u64)> {
    mem.iter()
        .filter_map(|r| {
            let p = r.get_host_address(MemoryRegionAddress(0)).ok()?;
            Some((p as u64, r.len()))
        })
        .filter(|&(_, len)| len > 0)
        .collect()
}

/// Registers the regions of `mem` on `pd`, reusing registrations from `old`
/// with the same host range.
fn register_all(
    pd: &ProtectionDomain,
    mem: &Arc<GuestMemoryMmap>,
    old: &[Arc<RegionReg>],
) -> Vec<Arc<RegionReg>> {
    let mut out = Vec::new();
    for (start, len) in region_ranges(mem) {
        if let Some(r) = old.iter().find(|r| r.start == start && r.len == len) {
            // Same live mapping in both tables: hold the newer table instead.
            if let Ok(mut m) = r.mem.lock() {
                *m = mem.clone();
            }
            out.push(r.clone());
            continue;
        }
        let Ok(size) = usize::try_from(len) else {
            continue;
        };
        // SAFETY: start..start+len is a region mapping of `mem`, which the
        // registration keeps alive (field `mem`) until after the MR is
        // dropped (field order). Guest memory is only ever accessed through
        // raw copies; the device and the target may write it at any time,
        // which the guest and the virtio protocol already allow.
        match unsafe { MemoryRegion::register(pd, start as *mut u8, size, Access::ISER_DATA) } {
            Ok(mr) => {
                info!(
                    "iSER: registered guest memory {start:#x}+{} MiB (rkey {:#x})",
                    len >> 20,
                    mr.rkey()
                );
                out.push(Arc::new(RegionReg {
                    mr,
                    mem: Mutex::new(mem.clone()),
                    start,
                    len,
                }))
            }
            Err(e) => warn!(
                "iSER: cannot register guest memory {start:#x}+{len:#x} with the RDMA device: {e} \
                 (commands on it use bounce buffers; is the memlock limit (ulimit -l) high enough?)"
            ),
        }
    }
    out
}

impl GuestMemoryRegistration {
    /// An empty registry (no memory table yet).
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Current epoch (changes whenever any registration changes).
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// The shared protection domain of `id`'s device (allocated on the first
    /// call for that device, with the current guest memory registered on it).
    pub fn pd_for(&self, id: &CmId) -> Result<ProtectionDomain, VerbsError> {
        let key = id.device_key()?;
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(d) = g.devices.iter().find(|d| d.key == key) {
            return Ok(d.pd.clone());
        }
        let pd = id.alloc_pd()?;
        let regions = match &g.mem {
            Some(mem) => register_all(&pd, mem, &[]),
            None => Vec::new(),
        };
        g.devices.push(DeviceReg {
            key,
            pd: pd.clone(),
            regions: Arc::new(regions),
        });
        self.epoch.fetch_add(1, Ordering::AcqRel);
        Ok(pd)
    }

    /// The registrations on the device of `pd`, with the epoch they belong to.
    pub fn snapshot(&self, pd: &ProtectionDomain) -> (u64, Regions) {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let epoch = self.epoch();
        let key = pd.context() as usize;
        let regions = g
            .devices
            .iter()
            .find(|d| d.key == key)
            .map(|d| d.regions.clone())
            .unwrap_or_default();
        (epoch, regions)
    }

    /// The guest memory table changed: register new regions on every known
    /// device, drop registrations of regions that are gone.
    pub fn update(&self, mem: &Arc<GuestMemoryMmap>) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.mem = Some(mem.clone());
        for d in g.devices.iter_mut() {
            d.regions = Arc::new(register_all(&d.pd, mem, &d.regions));
        }
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// Whether every segment of `iov` lies inside one registered region of
    /// the first RDMA device, i.e. could be named in place by that region's
    /// rkey if it were a command's whole buffer. Appends each segment's
    /// length to `runs`. The caller passes segments already merged where
    /// adjacent ([`crate::blk::buffer::IoBuffers`] does that), so each is one
    /// host-contiguous run. False before any connection or memory table.
    ///
    /// A process has one device in practice; should a second device lack a
    /// region, its connection bounces that command instead (still correct).
    pub fn registered_runs(&self, iov: &[libc::iovec], runs: &mut Vec<u64>) -> bool {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let Some(d) = g.devices.first() else {
            return false;
        };
        for v in iov {
            if find(&d.regions, v.iov_base as u64, v.iov_len as u64).is_none() {
                return false;
            }
            runs.push(v.iov_len as u64);
        }
        true
    }

    /// Logs once that a command's buffer was outside registered memory.
    pub fn warn_unregistered_once(&self, addr: u64, len: u64) {
        if !self.warned_unregistered.swap(true, Ordering::Relaxed) {
            info!(
                "iSER: buffer {addr:#x}+{len} is not in registered guest memory \
                 (start-up probes use their own buffers); such commands use bounce buffers (logged once)"
            );
        }
    }
}
