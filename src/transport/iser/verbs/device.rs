//! RDMA device discovery and capabilities.

use super::{last_err, Result, VerbsError};
use rdma_sys::{
    ibv_context, ibv_device_attr, ibv_free_device_list, ibv_get_device_list, ibv_get_device_name,
    ibv_query_device,
};
use std::ffi::CStr;

/// Names of the RDMA devices libibverbs sees (e.g. `rxe0`, `mlx5_0`).
/// An empty list means none; on a kernel without RDMA support
/// `ibv_get_device_list` returns NULL (errno ENOSYS), also reported as none.
pub fn device_names() -> Vec<String> {
    let mut n: libc::c_int = 0;
    // SAFETY: n is a valid out pointer; the returned list is freed below.
    let list = unsafe { ibv_get_device_list(&mut n) };
    if list.is_null() {
        return Vec::new();
    }
    let count = usize::try_from(n).unwrap_or(0);
    let mut names = Vec::with_capacity(count);
    for i in 0..count {
        // SAFETY: list holds `n` valid device pointers (NULL-terminated).
        let dev = unsafe { *list.add(i) };
        if dev.is_null() {
            break;
        }
        // SAFETY: dev is a valid ibv_device; the name is a NUL-terminated
        // string owned by the device, copied before the list is freed.
        let name = unsafe { ibv_get_device_name(dev) };
        if !name.is_null() {
            // SAFETY: non-NULL, NUL-terminated (see above).
            names.push(
                unsafe { CStr::from_ptr(name) }
                    .to_string_lossy()
                    .into_owned(),
            );
        }
    }
    // SAFETY: list came from ibv_get_device_list and is freed once.
    unsafe { ibv_free_device_list(list) };
    names
}

/// Returns the device names, or [`VerbsError::NoDevice`] when there is none:
/// the check every entry point makes first so that a host without RDMA gets
/// one clear message instead of an obscure errno from librdmacm.
pub fn ensure_device() -> Result<Vec<String>> {
    let names = device_names();
    if names.is_empty() {
        return Err(VerbsError::NoDevice {
            seen: "none".to_string(),
        });
    }
    Ok(names)
}

/// `device_names()` joined for error messages.
pub(crate) fn seen_devices() -> String {
    let names = device_names();
    if names.is_empty() {
        "none".to_string()
    } else {
        names.join(", ")
    }
}

/// Limits of an RDMA device that matter for sizing queues and RDMA Read
/// credits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceCaps {
    /// Largest memory region.
    pub max_mr_size: u64,
    /// Work requests per queue.
    pub max_qp_wr: u32,
    /// Scatter/gather entries per work request.
    pub max_sge: u32,
    /// Entries per completion queue.
    pub max_cqe: u32,
    /// RDMA Reads this device can serve as responder, per QP
    /// (a connection's `responder_resources`).
    pub max_qp_rd_atom: u32,
    /// RDMA Reads this device can have outstanding as initiator, per QP
    /// (a connection's `initiator_depth`).
    pub max_qp_init_rd_atom: u32,
}

/// Queries the capabilities of an open device context.
pub(crate) fn query_caps(ctx: *mut ibv_context) -> Result<DeviceCaps> {
    // SAFETY: ibv_device_attr is plain C data; all-zero is a valid value.
    let mut attr: ibv_device_attr = unsafe { std::mem::zeroed() };
    // SAFETY: ctx is a live context (the caller holds the CM id owning it)
    // and attr is a valid out pointer.
    if unsafe { ibv_query_device(ctx, &mut attr) } != 0 {
        return Err(last_err("ibv_query_device"));
    }
    let u = |v: libc::c_int| u32::try_from(v).unwrap_or(0);
    Ok(DeviceCaps {
        max_mr_size: attr.max_mr_size,
        max_qp_wr: u(attr.max_qp_wr),
        max_sge: u(attr.max_sge),
        max_cqe: u(attr.max_cqe),
        max_qp_rd_atom: u(attr.max_qp_rd_atom),
        max_qp_init_rd_atom: u(attr.max_qp_init_rd_atom),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ensure_device_agrees_with_device_names() {
        let names = device_names();
        match ensure_device() {
            Ok(n) => assert_eq!(n, names),
            Err(e) => {
                assert!(names.is_empty());
                let msg = e.to_string();
                assert_eq!(
                    msg,
                    "no RDMA device found (ibv_get_device_list saw: none); is the rdma_rxe/mlx5 module loaded?"
                );
                assert_eq!(seen_devices(), "none");
            }
        }
    }
}
