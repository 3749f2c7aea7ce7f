//! The virtio-blk configuration space and feature bits (virtio 1.2, 5.2.3–5.2.4).

use super::target::DeviceInfo;

/// VIRTIO_BLK_F_SIZE_MAX: `size_max` is valid.
pub const VIRTIO_BLK_F_SIZE_MAX: u32 = 1;
/// VIRTIO_BLK_F_SEG_MAX: `seg_max` is valid.
pub const VIRTIO_BLK_F_SEG_MAX: u32 = 2;
/// VIRTIO_BLK_F_RO: read-only device.
pub const VIRTIO_BLK_F_RO: u32 = 5;
/// VIRTIO_BLK_F_BLK_SIZE: `blk_size` is valid.
pub const VIRTIO_BLK_F_BLK_SIZE: u32 = 6;
/// VIRTIO_BLK_F_FLUSH: flush command.
pub const VIRTIO_BLK_F_FLUSH: u32 = 9;
/// VIRTIO_BLK_F_TOPOLOGY: topology fields are valid.
pub const VIRTIO_BLK_F_TOPOLOGY: u32 = 10;
/// VIRTIO_BLK_F_CONFIG_WCE: the guest can toggle writeback.
pub const VIRTIO_BLK_F_CONFIG_WCE: u32 = 11;
/// VIRTIO_BLK_F_MQ: several queues.
pub const VIRTIO_BLK_F_MQ: u32 = 12;
/// VIRTIO_BLK_F_DISCARD.
pub const VIRTIO_BLK_F_DISCARD: u32 = 13;
/// VIRTIO_BLK_F_WRITE_ZEROES.
pub const VIRTIO_BLK_F_WRITE_ZEROES: u32 = 14;
/// VIRTIO_RING_F_INDIRECT_DESC.
pub const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;
/// VIRTIO_RING_F_EVENT_IDX.
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;
/// VIRTIO_F_VERSION_1.
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// Offset of the `writeback` byte in the config space.
pub const WRITEBACK_OFFSET: usize = 32;
/// Size of the config space we serve (through `write_zeroes_may_unmap` and padding).
pub const CONFIG_LEN: usize = 60;

/// Largest single segment we advertise (SIZE_MAX).
pub const SIZE_MAX: u32 = 1 << 20;

/// The virtio feature bits offered for this device.
pub fn device_features(info: &DeviceInfo, num_queues: usize) -> u64 {
    let mut f = [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_TOPOLOGY,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_CONFIG_WCE,
    ]
    .iter()
    .fold(0u64, |acc, bit| acc | 1 << bit);
    if num_queues > 1 {
        f |= 1 << VIRTIO_BLK_F_MQ;
    }
    if info.read_only {
        f |= 1 << VIRTIO_BLK_F_RO;
    } else {
        if info.discard.is_some() {
            f |= 1 << VIRTIO_BLK_F_DISCARD;
        }
        if info.write_zeroes.is_some() {
            f |= 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
    }
    f
}

/// Builds the little-endian `struct virtio_blk_config`.
pub fn config_space(
    info: &DeviceInfo,
    num_queues: u16,
    seg_max: u32,
    writeback: bool,
) -> [u8; CONFIG_LEN] {
    let mut c = [0u8; CONFIG_LEN];
    let put32 = |c: &mut [u8; CONFIG_LEN], off: usize, v: u32| {
        c[off..off + 4].copy_from_slice(&v.to_le_bytes())
    };
    c[0..8].copy_from_slice(&info.capacity_sectors.to_le_bytes());
    put32(&mut c, 8, SIZE_MAX);
    put32(&mut c, 12, seg_max);
    // geometry (16..20) left zero: not offered.
    put32(&mut c, 20, info.logical_block_size);
    c[24] = info.physical_block_exp;
    c[25] = info.alignment_offset;
    c[26..28].copy_from_slice(&info.min_io_size.to_le_bytes());
    put32(&mut c, 28, info.opt_io_size);
    c[WRITEBACK_OFFSET] = writeback as u8;
    c[34..36].copy_from_slice(&num_queues.to_le_bytes());
    if let Some(d) = info.discard {
        put32(&mut c, 36, d.max_sectors);
        put32(&mut c, 40, d.max_segments);
        put32(&mut c, 44, d.alignment_sectors);
    }
    if let Some(w) = info.write_zeroes {
        put32(&mut c, 48, w.max_sectors);
        put32(&mut c, 52, w.max_segments);
        c[56] = info.write_zeroes_may_unmap as u8;
    }
    c
}

/// Puts `sectors` into the `capacity` field of a config space from
/// [`config_space`] (the capacity can change after start).
pub fn set_capacity(space: &mut [u8; CONFIG_LEN], sectors: u64) {
    space[0..8].copy_from_slice(&sectors.to_le_bytes());
}

/// Answers GET_CONFIG: the requested window, zero-padded past our fields.
pub fn read_window(space: &[u8], offset: u32, size: u32) -> Vec<u8> {
    let mut out = vec![0u8; size as usize];
    let start = offset as usize;
    if start < space.len() {
        let n = (space.len() - start).min(out.len());
        out[..n].copy_from_slice(&space[start..start + n]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blk::target::RangeOpLimits;

    #[test]
    fn layout() {
        let mut info = DeviceInfo::simple(1 << 30);
        info.logical_block_size = 4096;
        info.physical_block_exp = 3;
        info.discard = Some(RangeOpLimits {
            max_sectors: 8192,
            max_segments: 16,
            alignment_sectors: 8,
        });
        let c = config_space(&info, 4, 126, true);
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 2097152);
        assert_eq!(u32::from_le_bytes(c[12..16].try_into().unwrap()), 126);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 4096);
        assert_eq!(c[24], 3);
        assert_eq!(c[32], 1);
        assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 4);
        assert_eq!(u32::from_le_bytes(c[36..40].try_into().unwrap()), 8192);
        assert_eq!(u32::from_le_bytes(c[44..48].try_into().unwrap()), 8);
        let mut grown = c;
        set_capacity(&mut grown, 4194304);
        assert_eq!(read_window(&grown, 0, 8), 4194304u64.to_le_bytes());
        assert_eq!(grown[8..], c[8..]);
        let f = device_features(&info, 4);
        assert!(f & (1 << VIRTIO_BLK_F_DISCARD) != 0);
        assert!(f & (1 << VIRTIO_BLK_F_WRITE_ZEROES) == 0);
        assert!(f & (1 << VIRTIO_BLK_F_MQ) != 0);
        info.read_only = true;
        let f = device_features(&info, 1);
        assert!(f & (1 << VIRTIO_BLK_F_RO) != 0);
        assert!(f & (1 << VIRTIO_BLK_F_DISCARD) == 0);
        assert!(f & (1 << VIRTIO_BLK_F_MQ) == 0);
    }

    #[test]
    fn window() {
        let space = [1u8, 2, 3, 4];
        assert_eq!(read_window(&space, 2, 4), vec![3, 4, 0, 0]);
        assert_eq!(read_window(&space, 10, 2), vec![0, 0]);
    }
}
