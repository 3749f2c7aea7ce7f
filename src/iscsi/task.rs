//! The task table: commands in flight on one session, found by their
//! Initiator Task Tag.
//!
//! An ITT carries the slot index in its low 16 bits and the slot's generation
//! in the high bits, so a target that answers a task which already finished
//! (a reused slot) is caught instead of writing into someone else's buffer.

use std::sync::Arc;

use crate::blk::buffer::IoBuffers;

/// Direction of a command's data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataDir {
    /// No data.
    None,
    /// From the target into the buffer.
    Read,
    /// From the buffer to the target.
    Write,
}

/// A SCSI command to run on a session.
#[derive(Clone)]
pub struct ScsiCommandReq {
    /// LUN, SAM-encoded as on the wire.
    pub lun: u64,
    /// The CDB (up to 16 bytes).
    pub cdb: [u8; 16],
    /// Length of the CDB.
    pub cdb_len: u8,
    /// Data direction.
    pub dir: DataDir,
    /// The data buffer (request buffers in guest memory, or owned bytes).
    pub buf: Option<Arc<IoBuffers>>,
    /// Offset of this command's data in `buf`.
    pub offset: u64,
    /// Expected data transfer length.
    pub len: u32,
    /// The caller's tag, returned with the result.
    pub tag: u64,
}

impl std::fmt::Debug for ScsiCommandReq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SCSI command {:02x?} ({:?}, {} bytes, tag {})",
            &self.cdb[..self.cdb_len as usize],
            self.dir,
            self.len,
            self.tag
        )
    }
}

/// A command on the wire.
pub struct Task {
    /// The command.
    pub req: ScsiCommandReq,
    /// Its ITT.
    pub itt: u32,
    /// Its CmdSN.
    pub cmd_sn: u32,
    /// Data-In bytes received so far.
    pub data_in: u64,
    /// Next expected DataSN (Data-In) for this task.
    pub exp_data_sn: u32,
    /// Bytes of write data the target asked for (R2T) or we sent unsolicited.
    pub data_out: u64,
    /// R2Ts answered so far (R2TSN check).
    pub exp_r2t_sn: u32,
    /// When the command went out (per-command deadline).
    pub started: std::time::Instant,
    /// How many times it was re-issued after a lost connection.
    pub reissued: u8,
    /// ABORT TASK (or LUN RESET) sent for it after its deadline passed.
    pub aborting: bool,
}

/// Slots of tasks in flight.
impl Task {
    /// A read still waiting for its first Data-In (and not being aborted):
    /// what the transport may read ahead for, in the order sent.
    pub fn awaits_data_in(&self) -> bool {
        self.req.dir == DataDir::Read && self.data_in == 0 && !self.aborting
    }
}

#[derive(Default)]
pub struct TaskTable {
    slots: Vec<(u16, Option<Task>)>,
    free: Vec<u16>,
    live: usize,
}

/// Largest number of tasks in flight on one session.
pub const MAX_TASKS: usize = 4096;

/// ITT index (low 16 bits) of the session's NOP-Out pings; never a task slot.
pub const NOP_ITT_INDEX: u32 = 0xf000;
/// ITT index (low 16 bits) of the session's task management requests.
pub const TMF_ITT_INDEX: u32 = 0xf001;

impl TaskTable {
    /// Number of tasks in flight.
    pub fn len(&self) -> usize {
        self.live
    }

    /// Whether no task is in flight.
    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Whether another task fits.
    pub fn has_room(&self) -> bool {
        self.live < MAX_TASKS
    }

    /// Inserts a task (its `itt` field is set here); returns the ITT.
    pub fn insert(&mut self, mut task: Task) -> Option<u32> {
        let idx = match self.free.pop() {
            Some(i) => i as usize,
            None => {
                if self.slots.len() >= MAX_TASKS {
                    return None;
                }
                self.slots.push((0, None));
                self.slots.len() - 1
            }
        };
        let slot = &mut self.slots[idx];
        slot.0 = slot.0.wrapping_add(1);
        // ITT 0xffffffff is reserved: generation 0xffff with index 0xffff never occurs
        // because MAX_TASKS < 0xffff. Indexes from SPECIAL_ITT_INDEX up are the
        // session's own (NOP-Out pings, task management).
        let itt = (slot.0 as u32) << 16 | idx as u32;
        task.itt = itt;
        slot.1 = Some(task);
        self.live += 1;
        Some(itt)
    }

    fn index(&self, itt: u32) -> Option<usize> {
        let idx = (itt & 0xffff) as usize;
        let gen = (itt >> 16) as u16;
        match self.slots.get(idx) {
            Some((g, Some(_))) if *g == gen => Some(idx),
            _ => None,
        }
    }

    /// The task with this ITT, if it is in flight.
    pub fn get(&self, itt: u32) -> Option<&Task> {
        let i = self.index(itt)?;
        self.slots[i].1.as_ref()
    }

    /// The task with this ITT, to update, if it is in flight.
    pub fn get_mut(&mut self, itt: u32) -> Option<&mut Task> {
        let i = self.index(itt)?;
        self.slots[i].1.as_mut()
    }

    /// Removes and returns the task with this ITT.
    pub fn remove(&mut self, itt: u32) -> Option<Task> {
        let i = self.index(itt)?;
        let t = self.slots[i].1.take();
        self.free.push(i as u16);
        self.live -= 1;
        t
    }

    /// Every task in flight (any order).
    pub fn iter(&self) -> impl Iterator<Item = &Task> {
        self.slots.iter().filter_map(|s| s.1.as_ref())
    }

    /// Removes every task (connection lost), in CmdSN order.
    pub fn drain(&mut self) -> Vec<Task> {
        let mut all: Vec<Task> = Vec::with_capacity(self.live);
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if let Some(t) = slot.1.take() {
                all.push(t);
                self.free.push(i as u16);
            }
        }
        self.live = 0;
        all.sort_by(|a, b| {
            crate::iscsi::pdu::serial_cmp(a.cmd_sn, b.cmd_sn).unwrap_or(std::cmp::Ordering::Equal)
        });
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(tag: u64, cmd_sn: u32) -> Task {
        Task {
            req: ScsiCommandReq {
                lun: 0,
                cdb: [0; 16],
                cdb_len: 6,
                dir: DataDir::None,
                buf: None,
                offset: 0,
                len: 0,
                tag,
            },
            itt: 0,
            cmd_sn,
            data_in: 0,
            exp_data_sn: 0,
            data_out: 0,
            exp_r2t_sn: 0,
            started: std::time::Instant::now(),
            reissued: 0,
            aborting: false,
        }
    }

    #[test]
    fn stale_itt_is_not_found() {
        let mut t = TaskTable::default();
        let a = t.insert(task(1, 10)).unwrap();
        assert_eq!(t.remove(a).unwrap().req.tag, 1);
        let b = t.insert(task(2, 11)).unwrap();
        assert_eq!(a & 0xffff, b & 0xffff, "slot reused");
        assert_ne!(a, b, "generation changed");
        assert!(t.get_mut(a).is_none());
        assert!(t.remove(a).is_none());
        assert_eq!(t.get_mut(b).unwrap().req.tag, 2);
        assert!(t.get_mut(0xffff_ffff).is_none());
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn drain_in_cmdsn_order_across_wrap() {
        let mut t = TaskTable::default();
        t.insert(task(3, 1)).unwrap();
        t.insert(task(1, u32::MAX - 1)).unwrap();
        t.insert(task(2, u32::MAX)).unwrap();
        let tags: Vec<u64> = t.drain().iter().map(|x| x.req.tag).collect();
        assert_eq!(tags, vec![1, 2, 3]);
        assert!(t.is_empty());
    }
}
