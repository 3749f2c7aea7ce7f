//! Opening a target from its `--target` string.

use std::sync::Arc;

use crate::blk::mem::MemTarget;
use crate::blk::target::{Target, TargetError};

/// Opens the target named by `spec`:
/// - `mem:SIZE`: a RAM disk (tests, demos, benchmarks of the vhost layer);
/// - `iscsi://[user@]host[:port]/iqn/lun`: an iSCSI LUN over TCP;
/// - `iser://[user@]host[:port]/iqn/lun`: an iSCSI LUN over iSER (RDMA).
pub fn open_target(spec: &str, read_only: bool) -> Result<Arc<dyn Target>, TargetError> {
    if let Some(size) = spec.strip_prefix("mem:") {
        return Ok(Arc::new(MemTarget::from_spec(size, read_only)?));
    }
    Err(TargetError::BadTarget {
        target: spec.to_string(),
        reason: "expected mem:SIZE, iscsi://host[:port]/iqn/lun or iser://host[:port]/iqn/lun"
            .to_string(),
    })
}
