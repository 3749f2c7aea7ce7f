//! RDMA connection manager: event channels, connection ids (active and
//! passive side) and their events.
//!
//! Every connection gets its own event channel, so its fd can sit in an
//! epoll set and only ever reports events of that connection. The passive
//! side moves each accepted id off the listener's channel with
//! `rdma_migrate_id`.
//!
//! rdma-sys quirk: `rdma_cm_event` is hand-written with the C union
//! `param` named `param_t { conn, ud }`; `private_data` points into the
//! event and is only valid until `rdma_ack_cm_event`, so events are copied
//! into [`CmEvent`] and acknowledged at once (which also keeps
//! `rdma_destroy_id`, which waits for all events to be acked, from hanging).

use super::cq::CompletionQueue;
use super::device::{ensure_device, query_caps, seen_devices, DeviceCaps};
use super::mr::ProtectionDomain;
use super::qp::{QpCaps, QueuePair};
use super::{last_err, set_nonblocking, wait_readable, Result, VerbsError};
use rdma_sys::{
    ibv_context, ibv_get_device_name, ibv_qp_init_attr, ibv_qp_type, rdma_accept,
    rdma_ack_cm_event, rdma_bind_addr, rdma_cm_event, rdma_cm_event_type, rdma_cm_id,
    rdma_conn_param, rdma_connect, rdma_create_event_channel, rdma_create_id, rdma_create_qp,
    rdma_destroy_event_channel, rdma_destroy_id, rdma_disconnect, rdma_event_channel,
    rdma_get_cm_event, rdma_listen, rdma_migrate_id, rdma_port_space, rdma_reject,
    rdma_resolve_addr, rdma_resolve_route,
};
use std::ffi::CStr;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Owned `rdma_event_channel` with a nonblocking fd.
struct Channel(*mut rdma_event_channel);

impl Channel {
    fn new() -> Result<Self> {
        // SAFETY: no arguments; returns NULL on error.
        let ch = unsafe { rdma_create_event_channel() };
        if ch.is_null() {
            return Err(last_err("rdma_create_event_channel"));
        }
        let ch = Channel(ch);
        set_nonblocking(ch.fd(), "fcntl(O_NONBLOCK) on the RDMA CM channel")?;
        Ok(ch)
    }

    fn fd(&self) -> RawFd {
        // SAFETY: self.0 is a live channel for the lifetime of self.
        unsafe { (*self.0).fd }
    }

    /// Reads one event without blocking, copies and acks it.
    fn try_get(&self) -> Result<Option<RawEvent>> {
        let mut ev: *mut rdma_cm_event = std::ptr::null_mut();
        // SAFETY: channel is live; ev is a valid out pointer.
        if unsafe { rdma_get_cm_event(self.0, &mut ev) } != 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                return Ok(None);
            }
            return Err(VerbsError::Call {
                call: "rdma_get_cm_event",
                source: e,
            });
        }
        // SAFETY: ev is a valid event until acked below; for connection
        // events `param.conn` is the active union member and its
        // private_data points to private_data_len readable bytes.
        let raw = unsafe {
            let e = &*ev;
            let conn = &e.param.conn;
            let private_data = if conn.private_data.is_null() || conn.private_data_len == 0 {
                Vec::new()
            } else {
                std::slice::from_raw_parts(
                    conn.private_data as *const u8,
                    usize::from(conn.private_data_len),
                )
                .to_vec()
            };
            RawEvent {
                id: e.id,
                listen_id: e.listen_id,
                event: CmEvent {
                    kind: CmEventKind::from_raw(e.event),
                    status: e.status,
                    private_data,
                    responder_resources: conn.responder_resources,
                    initiator_depth: conn.initiator_depth,
                },
            }
        };
        // SAFETY: ev came from rdma_get_cm_event and is acked exactly once;
        // nothing refers to it afterwards (data was copied).
        if unsafe { rdma_ack_cm_event(ev) } != 0 {
            return Err(last_err("rdma_ack_cm_event"));
        }
        Ok(Some(raw))
    }

    /// Waits up to `deadline` for one event.
    fn wait(&self, deadline: Instant) -> Result<Option<RawEvent>> {
        loop {
            if let Some(ev) = self.try_get()? {
                return Ok(Some(ev));
            }
            if !wait_readable(self.fd(), deadline)? {
                return Ok(None);
            }
        }
    }
}

impl Drop for Channel {
    fn drop(&mut self) {
        // SAFETY: created by rdma_create_event_channel, destroyed once,
        // after every id on it (IdInner drops its id before its channel).
        unsafe { rdma_destroy_event_channel(self.0) };
    }
}

struct RawEvent {
    id: *mut rdma_cm_id,
    #[allow(dead_code)]
    listen_id: *mut rdma_cm_id,
    event: CmEvent,
}

/// A CM id with the event channel its events arrive on. Shared (`Arc`) by
/// the PD, CQs and QP created from it so it is destroyed after them.
pub(crate) struct IdInner {
    id: *mut rdma_cm_id,
    channel: Channel,
}

// SAFETY: librdmacm and libibverbs are thread-safe (their objects carry
// their own locks); the raw pointers are only handles into the library.
unsafe impl Send for IdInner {}
// SAFETY: as above; shared access only performs thread-safe library calls.
unsafe impl Sync for IdInner {}

impl IdInner {
    pub(crate) fn raw(&self) -> *mut rdma_cm_id {
        self.id
    }

    pub(crate) fn verbs(&self) -> Result<*mut ibv_context> {
        // SAFETY: id is live while self is.
        let ctx = unsafe { (*self.id).verbs };
        if ctx.is_null() {
            return Err(VerbsError::InvalidArgument(
                "the CM id is not bound to an RDMA device yet (resolve the address first)".into(),
            ));
        }
        Ok(ctx)
    }
}

impl Drop for IdInner {
    fn drop(&mut self) {
        // SAFETY: id came from rdma_create_id or a connect request and is
        // destroyed once; all its events were acked in Channel::try_get and
        // every QP/CQ/PD on it holds an Arc to self, so they are gone.
        unsafe { rdma_destroy_id(self.id) };
        // self.channel drops after this body: the channel outlives the id.
    }
}

/// Kind of an RDMA CM event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmEventKind {
    /// `rdma_resolve_addr` finished.
    AddrResolved,
    /// `rdma_resolve_addr` failed.
    AddrError,
    /// `rdma_resolve_route` finished.
    RouteResolved,
    /// `rdma_resolve_route` failed.
    RouteError,
    /// A peer wants to connect (passive side).
    ConnectRequest,
    /// Connect response (only for ids without a QP).
    ConnectResponse,
    /// Error while connecting.
    ConnectError,
    /// Peer unreachable or not responding.
    Unreachable,
    /// The peer rejected the connection.
    Rejected,
    /// The connection is up.
    Established,
    /// The connection was closed.
    Disconnected,
    /// The RDMA device was removed.
    DeviceRemoval,
    /// Multicast join done.
    MulticastJoin,
    /// Multicast error.
    MulticastError,
    /// The local address changed.
    AddrChange,
    /// The QP left the timewait state.
    TimewaitExit,
    /// Unknown event number.
    Other(u32),
}

impl CmEventKind {
    fn from_raw(v: rdma_cm_event_type::Type) -> Self {
        use rdma_cm_event_type::*;
        match v {
            RDMA_CM_EVENT_ADDR_RESOLVED => Self::AddrResolved,
            RDMA_CM_EVENT_ADDR_ERROR => Self::AddrError,
            RDMA_CM_EVENT_ROUTE_RESOLVED => Self::RouteResolved,
            RDMA_CM_EVENT_ROUTE_ERROR => Self::RouteError,
            RDMA_CM_EVENT_CONNECT_REQUEST => Self::ConnectRequest,
            RDMA_CM_EVENT_CONNECT_RESPONSE => Self::ConnectResponse,
            RDMA_CM_EVENT_CONNECT_ERROR => Self::ConnectError,
            RDMA_CM_EVENT_UNREACHABLE => Self::Unreachable,
            RDMA_CM_EVENT_REJECTED => Self::Rejected,
            RDMA_CM_EVENT_ESTABLISHED => Self::Established,
            RDMA_CM_EVENT_DISCONNECTED => Self::Disconnected,
            RDMA_CM_EVENT_DEVICE_REMOVAL => Self::DeviceRemoval,
            RDMA_CM_EVENT_MULTICAST_JOIN => Self::MulticastJoin,
            RDMA_CM_EVENT_MULTICAST_ERROR => Self::MulticastError,
            RDMA_CM_EVENT_ADDR_CHANGE => Self::AddrChange,
            RDMA_CM_EVENT_TIMEWAIT_EXIT => Self::TimewaitExit,
            other => Self::Other(other),
        }
    }

    /// The librdmacm name of the event (as `rdma_event_str` prints it).
    pub fn name(self) -> &'static str {
        match self {
            Self::AddrResolved => "RDMA_CM_EVENT_ADDR_RESOLVED",
            Self::AddrError => "RDMA_CM_EVENT_ADDR_ERROR",
            Self::RouteResolved => "RDMA_CM_EVENT_ROUTE_RESOLVED",
            Self::RouteError => "RDMA_CM_EVENT_ROUTE_ERROR",
            Self::ConnectRequest => "RDMA_CM_EVENT_CONNECT_REQUEST",
            Self::ConnectResponse => "RDMA_CM_EVENT_CONNECT_RESPONSE",
            Self::ConnectError => "RDMA_CM_EVENT_CONNECT_ERROR",
            Self::Unreachable => "RDMA_CM_EVENT_UNREACHABLE",
            Self::Rejected => "RDMA_CM_EVENT_REJECTED",
            Self::Established => "RDMA_CM_EVENT_ESTABLISHED",
            Self::Disconnected => "RDMA_CM_EVENT_DISCONNECTED",
            Self::DeviceRemoval => "RDMA_CM_EVENT_DEVICE_REMOVAL",
            Self::MulticastJoin => "RDMA_CM_EVENT_MULTICAST_JOIN",
            Self::MulticastError => "RDMA_CM_EVENT_MULTICAST_ERROR",
            Self::AddrChange => "RDMA_CM_EVENT_ADDR_CHANGE",
            Self::TimewaitExit => "RDMA_CM_EVENT_TIMEWAIT_EXIT",
            Self::Other(_) => "unknown RDMA CM event",
        }
    }
}

/// A CM event, copied out of librdmacm and already acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CmEvent {
    /// What happened.
    pub kind: CmEventKind,
    /// Event status: negative errno for errors, the IB CM reject reason for
    /// [`CmEventKind::Rejected`].
    pub status: i32,
    /// Private data of a connect request / accept / reject (IB/RoCE pad it
    /// with zeros to the CM message size).
    pub private_data: Vec<u8>,
    /// Responder resources offered (connect request) or agreed.
    pub responder_resources: u8,
    /// Initiator depth offered (connect request) or agreed.
    pub initiator_depth: u8,
}

/// Readable meaning of common IB CM reject reasons (IBTA table 112,
/// `enum ib_cm_rej_reason`).
pub(crate) fn reject_reason_text(reason: i32) -> &'static str {
    match reason {
        1 => "no QP available at the peer",
        3 => "peer has no resources",
        4 => "CM timeout",
        5 => "unsupported request",
        8 => "nobody listens on that port (invalid service ID)",
        9 => "invalid transport type",
        10 => "stale connection",
        28 => "invalid path MTU",
        29 => "insufficient responder resources",
        30 => "rejected by the peer application (consumer defined)",
        31 => "invalid RNR retry count",
        _ => "see the IB CM reject reason table",
    }
}

/// Parameters of `rdma_connect` / `rdma_accept`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnParam {
    /// Private data (iSER CM header, see [`super::super::cm`]); at most 56
    /// bytes for a connect request over IB/RoCE, 196 for an accept.
    pub private_data: Vec<u8>,
    /// RDMA Reads the peer may have outstanding against us.
    pub responder_resources: u8,
    /// RDMA Reads we may have outstanding against the peer.
    pub initiator_depth: u8,
    /// Transport retries (0–7).
    pub retry_count: u8,
    /// Receiver-not-ready retries (0–7, 7 = infinite).
    pub rnr_retry_count: u8,
}

/// Largest private data of an IB/RoCE connect request once librdmacm has
/// added its own 36-byte header.
const MAX_REQ_PRIVATE_DATA: usize = 56;
/// Largest private data of an IB/RoCE accept (REP) or reject.
const MAX_REP_PRIVATE_DATA: usize = 196;

impl ConnParam {
    fn to_raw(&self, max_pd: usize) -> Result<rdma_conn_param> {
        if self.private_data.len() > max_pd {
            return Err(VerbsError::InvalidArgument(format!(
                "CM private data of {} bytes exceeds the limit of {max_pd}",
                self.private_data.len()
            )));
        }
        if self.retry_count > 7 || self.rnr_retry_count > 7 {
            return Err(VerbsError::InvalidArgument(
                "retry_count and rnr_retry_count must be 0..=7".into(),
            ));
        }
        // SAFETY: rdma_conn_param is plain C data; all-zero is valid.
        let mut p: rdma_conn_param = unsafe { std::mem::zeroed() };
        if !self.private_data.is_empty() {
            p.private_data = self.private_data.as_ptr().cast();
            // Bounded by max_pd <= 196 above.
            p.private_data_len = self.private_data.len() as u8;
        }
        p.responder_resources = self.responder_resources;
        p.initiator_depth = self.initiator_depth;
        p.retry_count = self.retry_count;
        p.rnr_retry_count = self.rnr_retry_count;
        Ok(p)
    }
}

/// One RDMA CM connection id (RC, `RDMA_PS_TCP` port space) with its own
/// event channel. Active side: [`CmId::resolve`] then create PD/CQ/QP, post
/// receives, [`CmId::connect`]. Passive side: from [`Listener::get_request`]
/// then create PD/CQ/QP, post receives, [`CmId::accept`].
///
/// The channel fd ([`AsRawFd`]) is nonblocking and becomes readable when an
/// event (e.g. DISCONNECTED) is pending: read it with [`CmId::poll_event`].
pub struct CmId {
    inner: Arc<IdInner>,
    peer: String,
    /// `rdma_disconnect` was called (DREQ sent, or DREP for a peer's DREQ).
    disconnect_sent: bool,
}

impl std::fmt::Debug for CmId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CmId").field("peer", &self.peer).finish()
    }
}

impl AsRawFd for CmId {
    fn as_raw_fd(&self) -> RawFd {
        self.inner.channel.fd()
    }
}

fn sockaddr_from(addr: &SocketAddr) -> libc::sockaddr_storage {
    // SAFETY: sockaddr_storage is plain C data; all-zero is valid.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for
            // sockaddr_in.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin) };
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo().to_be(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above for sockaddr_in6.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin6) };
        }
    }
    ss
}

fn socketaddr_to(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(ss.ss_family) {
        libc::AF_INET => {
            // SAFETY: family says the storage holds a sockaddr_in.
            let sin: libc::sockaddr_in =
                unsafe { std::ptr::read((ss as *const libc::sockaddr_storage).cast()) };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes()),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: family says the storage holds a sockaddr_in6.
            let sin6: libc::sockaddr_in6 =
                unsafe { std::ptr::read((ss as *const libc::sockaddr_storage).cast()) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                u32::from_be(sin6.sin6_flowinfo),
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

fn timeout_ms(t: Duration) -> libc::c_int {
    t.as_millis().clamp(1, i32::MAX as u128) as libc::c_int
}

fn new_id(channel: Channel) -> Result<IdInner> {
    let mut id: *mut rdma_cm_id = std::ptr::null_mut();
    // SAFETY: channel is live; id is a valid out pointer; RC over the TCP
    // port space, as iSER requires.
    let ret = unsafe {
        rdma_create_id(
            channel.0,
            &mut id,
            std::ptr::null_mut(),
            rdma_port_space::RDMA_PS_TCP,
        )
    };
    if ret != 0 {
        return Err(last_err("rdma_create_id"));
    }
    Ok(IdInner { id, channel })
}

impl CmId {
    /// Creates an id on its own channel and resolves `dst` to a local RDMA
    /// device and a route (`rdma_resolve_addr` + `rdma_resolve_route`), each
    /// step bounded by `timeout`. No source address is bound: the kernel
    /// picks the device from the routing table.
    pub fn resolve(dst: SocketAddr, timeout: Duration) -> Result<CmId> {
        ensure_device()?;
        let inner = Arc::new(new_id(Channel::new()?)?);
        let id = CmId {
            inner,
            peer: dst.to_string(),
            disconnect_sent: false,
        };
        let mut ss = sockaddr_from(&dst);
        // SAFETY: id is live; ss is a valid sockaddr for the call (the CM
        // copies it); NULL source lets the kernel choose.
        let ret = unsafe {
            rdma_resolve_addr(
                id.inner.id,
                std::ptr::null_mut(),
                (&mut ss as *mut libc::sockaddr_storage).cast(),
                timeout_ms(timeout),
            )
        };
        if ret != 0 {
            return Err(last_err("rdma_resolve_addr"));
        }
        // Our wait outlasts the CM's own timeout so its ADDR_ERROR (with the
        // real reason) wins over our generic timeout.
        let ev = id.wait_for("address resolution", timeout + Duration::from_secs(2))?;
        match ev.kind {
            CmEventKind::AddrResolved => {}
            CmEventKind::AddrError => {
                return Err(VerbsError::AddrResolve {
                    addr: dst,
                    devices: seen_devices(),
                    reason: io::Error::from_raw_os_error(ev.status.abs()),
                })
            }
            other => return Err(unexpected("RDMA_CM_EVENT_ADDR_RESOLVED", other, &ev)),
        }
        // SAFETY: id is live and address-resolved.
        if unsafe { rdma_resolve_route(id.inner.id, timeout_ms(timeout)) } != 0 {
            return Err(last_err("rdma_resolve_route"));
        }
        let ev = id.wait_for("route resolution", timeout + Duration::from_secs(2))?;
        match ev.kind {
            CmEventKind::RouteResolved => Ok(id),
            CmEventKind::RouteError => Err(VerbsError::RouteResolve {
                addr: dst,
                reason: io::Error::from_raw_os_error(ev.status.abs()),
            }),
            other => Err(unexpected("RDMA_CM_EVENT_ROUTE_RESOLVED", other, &ev)),
        }
    }

    /// Name of the RDMA device this id is bound to (e.g. `rxe0`).
    pub fn device_name(&self) -> Result<String> {
        let ctx = self.inner.verbs()?;
        // SAFETY: ctx is live; its device pointer is valid for its lifetime
        // and the name is NUL-terminated, copied at once.
        let name = unsafe { ibv_get_device_name((*ctx).device) };
        if name.is_null() {
            return Ok(String::new());
        }
        // SAFETY: non-NULL, NUL-terminated.
        Ok(unsafe { CStr::from_ptr(name) }
            .to_string_lossy()
            .into_owned())
    }

    /// Capabilities of the device this id is bound to.
    pub fn query_device(&self) -> Result<DeviceCaps> {
        query_caps(self.inner.verbs()?)
    }

    /// Local address of the connection (after resolution or accept).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        // SAFETY: id is live; src_storage is the widest member of the union
        // and is fully initialised by the CM (zeros when unset).
        let ss = unsafe { (*self.inner.id).route.addr.src_addr_union.src_storage };
        socketaddr_to(&ss)
    }

    /// Peer address of the connection.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        // SAFETY: as in local_addr, for the destination union.
        let ss = unsafe { (*self.inner.id).route.addr.dst_addr_union.dst_storage };
        socketaddr_to(&ss)
    }

    /// Identifies the RDMA device (verbs context) this id is bound to, for
    /// per-device tables (one protection domain and one set of guest memory
    /// registrations per device). Stable for the life of the process:
    /// librdmacm opens each device once.
    pub fn device_key(&self) -> Result<usize> {
        Ok(self.inner.verbs()? as usize)
    }

    /// Allocates a protection domain on this id's device.
    pub fn alloc_pd(&self) -> Result<ProtectionDomain> {
        ProtectionDomain::new(self.inner.clone())
    }

    /// Creates a completion queue of at least `entries` entries with its own
    /// nonblocking completion channel.
    pub fn create_cq(&self, entries: u32) -> Result<CompletionQueue> {
        CompletionQueue::new(self.inner.clone(), entries)
    }

    /// Creates the RC queue pair of this connection (`rdma_create_qp`) and
    /// returns it with the capabilities the provider actually granted.
    /// `sq_sig_all` is off: sends are signaled per request.
    pub fn create_qp(
        &self,
        pd: &ProtectionDomain,
        send_cq: &CompletionQueue,
        recv_cq: &CompletionQueue,
        caps: QpCaps,
    ) -> Result<QueuePair> {
        // SAFETY: if a QP already exists on this id, rdma_create_qp would
        // leak/replace it; reading the field is fine while id is live.
        if !unsafe { (*self.inner.id).qp }.is_null() {
            return Err(VerbsError::InvalidArgument(
                "this CM id already has a queue pair".into(),
            ));
        }
        let ctx = self.inner.verbs()?;
        if pd.context() != ctx || send_cq.context() != ctx || recv_cq.context() != ctx {
            return Err(VerbsError::InvalidArgument(
                "PD and CQs must belong to the CM id's device".into(),
            ));
        }
        // SAFETY: ibv_qp_init_attr is plain C data; all-zero is valid.
        let mut attr: ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        attr.send_cq = send_cq.raw();
        attr.recv_cq = recv_cq.raw();
        attr.qp_type = ibv_qp_type::IBV_QPT_RC;
        attr.sq_sig_all = 0;
        attr.cap.max_send_wr = caps.max_send_wr;
        attr.cap.max_recv_wr = caps.max_recv_wr;
        attr.cap.max_send_sge = caps.max_send_sge;
        attr.cap.max_recv_sge = caps.max_recv_sge;
        attr.cap.max_inline_data = caps.max_inline_data;
        // SAFETY: id, pd and cqs are live and on the same device (checked);
        // attr is a valid in/out pointer (the provider writes the granted
        // caps back into attr.cap).
        if unsafe { rdma_create_qp(self.inner.id, pd.raw(), &mut attr) } != 0 {
            return Err(last_err("rdma_create_qp"));
        }
        // SAFETY: rdma_create_qp succeeded, so id->qp is the new QP.
        let qp = unsafe { (*self.inner.id).qp };
        let granted = QpCaps {
            max_send_wr: attr.cap.max_send_wr,
            max_recv_wr: attr.cap.max_recv_wr,
            max_send_sge: attr.cap.max_send_sge,
            max_recv_sge: attr.cap.max_recv_sge,
            max_inline_data: attr.cap.max_inline_data,
        };
        Ok(QueuePair::new(
            qp,
            self.inner.clone(),
            pd.inner().clone(),
            send_cq.inner().clone(),
            recv_cq.inner().clone(),
            granted,
        ))
    }

    /// Active side: sends the connect request and waits up to `timeout` for
    /// ESTABLISHED. Returns the private data of the peer's accept (REP).
    /// Post receive buffers before calling: the peer may send right away.
    pub fn connect(&mut self, param: &ConnParam, timeout: Duration) -> Result<Vec<u8>> {
        let mut raw = param.to_raw(MAX_REQ_PRIVATE_DATA)?;
        // SAFETY: id is live and route-resolved; raw and the private data it
        // points to outlive the call (the CM copies them).
        if unsafe { rdma_connect(self.inner.id, &mut raw) } != 0 {
            return Err(last_err("rdma_connect"));
        }
        let ev = self.wait_for("connection establishment", timeout)?;
        match ev.kind {
            CmEventKind::Established => Ok(ev.private_data),
            _ => Err(self.event_error("RDMA_CM_EVENT_ESTABLISHED", ev)),
        }
    }

    /// Passive side: accepts the connect request this id came from and waits
    /// up to `timeout` for ESTABLISHED.
    pub fn accept(&mut self, param: &ConnParam, timeout: Duration) -> Result<()> {
        let mut raw = param.to_raw(MAX_REP_PRIVATE_DATA)?;
        // SAFETY: id is a live connect-request id; raw outlives the call.
        if unsafe { rdma_accept(self.inner.id, &mut raw) } != 0 {
            return Err(last_err("rdma_accept"));
        }
        let ev = self.wait_for("connection establishment", timeout)?;
        match ev.kind {
            CmEventKind::Established => Ok(()),
            _ => Err(self.event_error("RDMA_CM_EVENT_ESTABLISHED", ev)),
        }
    }

    /// Passive side: rejects the connect request this id came from.
    pub fn reject(self, private_data: &[u8]) -> Result<()> {
        if private_data.len() > MAX_REP_PRIVATE_DATA {
            return Err(VerbsError::InvalidArgument(format!(
                "reject private data of {} bytes exceeds {MAX_REP_PRIVATE_DATA}",
                private_data.len()
            )));
        }
        let ptr = if private_data.is_empty() {
            std::ptr::null()
        } else {
            private_data.as_ptr().cast()
        };
        // SAFETY: id is live; ptr/len describe readable memory or NULL/0.
        if unsafe { rdma_reject(self.inner.id, ptr, private_data.len() as u8) } != 0 {
            return Err(last_err("rdma_reject"));
        }
        Ok(())
    }

    /// Starts an orderly disconnect (sends a DREQ; the QP moves to the error
    /// state and posted work requests complete with flush errors), or, after
    /// the peer disconnected, answers its DREQ with a DREP. The
    /// DISCONNECTED event follows; see [`CmId::wait_disconnected`].
    ///
    /// A peer-initiated disconnect must be answered with this call (or
    /// [`CmId::wait_disconnected`], which does it): until then the peer
    /// waits for the DREP and only sees DISCONNECTED after its CM timeout.
    pub fn disconnect(&mut self) -> Result<()> {
        // SAFETY: id is live.
        if unsafe { rdma_disconnect(self.inner.id) } != 0 {
            return Err(last_err("rdma_disconnect"));
        }
        self.disconnect_sent = true;
        Ok(())
    }

    /// Waits for the DISCONNECTED event (ignoring TIMEWAIT_EXIT). When the
    /// peer started the disconnect, answers it (DREP) so the peer is not
    /// left waiting.
    pub fn wait_disconnected(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ev = self.wait_for("disconnection", left)?;
            match ev.kind {
                CmEventKind::Disconnected => {
                    if !self.disconnect_sent {
                        self.disconnect()?;
                    }
                    return Ok(());
                }
                CmEventKind::TimewaitExit => continue,
                other => return Err(unexpected("RDMA_CM_EVENT_DISCONNECTED", other, &ev)),
            }
        }
    }

    /// Reads one pending event without blocking (for an epoll loop that
    /// watches this id's fd).
    pub fn poll_event(&mut self) -> Result<Option<CmEvent>> {
        Ok(self.inner.channel.try_get()?.map(|r| r.event))
    }

    /// Turns an event into the error it means for an established or
    /// connecting connection (DISCONNECTED, REJECTED, UNREACHABLE…).
    pub fn event_error(&self, expected: &'static str, ev: CmEvent) -> VerbsError {
        let peer = self.peer.clone();
        match ev.kind {
            CmEventKind::Rejected => VerbsError::Rejected {
                peer,
                reason: ev.status,
                reason_text: reject_reason_text(ev.status),
                private_data: ev.private_data,
            },
            CmEventKind::Unreachable | CmEventKind::ConnectError => VerbsError::Unreachable {
                peer,
                event: ev.kind.name(),
                reason: io::Error::from_raw_os_error(ev.status.abs()),
            },
            CmEventKind::Disconnected => VerbsError::Disconnected { peer },
            CmEventKind::DeviceRemoval => VerbsError::DeviceRemoved,
            other => unexpected(expected, other, &ev),
        }
    }

    fn wait_for(&self, what: &'static str, timeout: Duration) -> Result<CmEvent> {
        match self.inner.channel.wait(Instant::now() + timeout)? {
            Some(raw) => Ok(raw.event),
            None => Err(VerbsError::Timeout {
                what,
                after: timeout,
            }),
        }
    }
}

fn unexpected(expected: &'static str, got: CmEventKind, ev: &CmEvent) -> VerbsError {
    VerbsError::UnexpectedEvent {
        expected,
        got: got.name(),
        status: ev.status,
    }
}

/// A passive CM id listening for connect requests (used by the loopback
/// tests; an initiator never listens).
pub struct Listener {
    inner: Arc<IdInner>,
}

/// A connect request taken from a [`Listener`]: a new id, already moved to
/// its own event channel, plus what the peer asked for.
#[derive(Debug)]
pub struct ConnectRequest {
    /// The new connection id; create PD/CQ/QP on it, then accept or reject.
    pub id: CmId,
    /// The peer's private data (e.g. the iSER CM header), zero padded.
    pub private_data: Vec<u8>,
    /// RDMA Reads the peer wants to serve for us.
    pub responder_resources: u8,
    /// RDMA Reads the peer wants to have outstanding against us.
    pub initiator_depth: u8,
}

impl Listener {
    /// Binds to `addr` (a local IP on an RDMA-capable interface) and listens.
    pub fn bind(addr: SocketAddr, backlog: i32) -> Result<Listener> {
        ensure_device()?;
        let inner = new_id(Channel::new()?)?;
        let mut ss = sockaddr_from(&addr);
        // SAFETY: id is live; ss is a valid sockaddr (copied by the CM).
        if unsafe { rdma_bind_addr(inner.id, (&mut ss as *mut libc::sockaddr_storage).cast()) } != 0
        {
            return Err(last_err("rdma_bind_addr"));
        }
        // SAFETY: id is live and bound.
        if unsafe { rdma_listen(inner.id, backlog) } != 0 {
            return Err(last_err("rdma_listen"));
        }
        Ok(Listener {
            inner: Arc::new(inner),
        })
    }

    /// Local address the listener is bound to (port filled in).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        // SAFETY: as in CmId::local_addr.
        let ss = unsafe { (*self.inner.id).route.addr.src_addr_union.src_storage };
        socketaddr_to(&ss)
    }

    /// Waits up to `timeout` for the next connect request.
    pub fn get_request(&mut self, timeout: Duration) -> Result<ConnectRequest> {
        let deadline = Instant::now() + timeout;
        loop {
            let raw = self
                .inner
                .channel
                .wait(deadline)?
                .ok_or(VerbsError::Timeout {
                    what: "a connect request",
                    after: timeout,
                })?;
            match raw.event.kind {
                CmEventKind::ConnectRequest => {}
                CmEventKind::DeviceRemoval => return Err(VerbsError::DeviceRemoved),
                // Events of ids not yet migrated (none in practice) are
                // dropped; they were acked.
                _ => continue,
            }
            let channel = Channel::new()?;
            // SAFETY: raw.id is the new id of the (already acked) connect
            // request, owned by nobody else; the channel is live.
            if unsafe { rdma_migrate_id(raw.id, channel.0) } != 0 {
                let err = last_err("rdma_migrate_id");
                // SAFETY: the new id is ours to destroy (rejecting implicitly).
                unsafe { rdma_destroy_id(raw.id) };
                return Err(err);
            }
            let inner = Arc::new(IdInner {
                id: raw.id,
                channel,
            });
            let mut id = CmId {
                inner,
                peer: String::new(),
                disconnect_sent: false,
            };
            id.peer = id
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|| "unknown peer".into());
            return Ok(ConnectRequest {
                id,
                private_data: raw.event.private_data,
                responder_resources: raw.event.responder_resources,
                initiator_depth: raw.event.initiator_depth,
            });
        }
    }
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("local_addr", &self.local_addr())
            .finish()
    }
}

impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        self.inner.channel.fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockaddr_roundtrip_v4_v6() {
        let a: SocketAddr = "10.99.0.1:3260".parse().unwrap();
        let ss = sockaddr_from(&a);
        assert_eq!(i32::from(ss.ss_family), libc::AF_INET);
        assert_eq!(socketaddr_to(&ss), Some(a));
        let b: SocketAddr = "[fe80::1%2]:3261".parse().unwrap();
        assert_eq!(socketaddr_to(&sockaddr_from(&b)), Some(b));
        // SAFETY: zeroed sockaddr_storage is valid (family AF_UNSPEC).
        let z: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        assert_eq!(socketaddr_to(&z), None);
    }

    #[test]
    fn conn_param_limits() {
        let p = ConnParam {
            private_data: vec![0; 57],
            ..Default::default()
        };
        assert!(matches!(
            p.to_raw(MAX_REQ_PRIVATE_DATA),
            Err(VerbsError::InvalidArgument(_))
        ));
        let p = ConnParam {
            private_data: vec![0xc0, 0, 0, 0],
            responder_resources: 4,
            initiator_depth: 1,
            retry_count: 7,
            rnr_retry_count: 6,
        };
        let raw = p.to_raw(MAX_REQ_PRIVATE_DATA).unwrap();
        assert_eq!(raw.private_data_len, 4);
        assert_eq!(raw.responder_resources, 4);
        assert_eq!(raw.rnr_retry_count, 6);
        let bad = ConnParam {
            retry_count: 8,
            ..Default::default()
        };
        assert!(bad.to_raw(MAX_REQ_PRIVATE_DATA).is_err());
        assert!(ConnParam::default()
            .to_raw(MAX_REQ_PRIVATE_DATA)
            .unwrap()
            .private_data
            .is_null());
    }

    #[test]
    fn event_names_and_reject_reasons() {
        use rdma_cm_event_type::*;
        assert_eq!(
            CmEventKind::from_raw(RDMA_CM_EVENT_ESTABLISHED),
            CmEventKind::Established
        );
        assert_eq!(
            CmEventKind::from_raw(RDMA_CM_EVENT_REJECTED).name(),
            "RDMA_CM_EVENT_REJECTED"
        );
        assert_eq!(CmEventKind::from_raw(999), CmEventKind::Other(999));
        assert!(reject_reason_text(8).contains("nobody listens"));
        assert!(reject_reason_text(30).contains("consumer"));
    }

    #[test]
    fn resolve_without_device_names_the_problem() {
        if !super::super::device_names().is_empty() {
            return; // a host with RDMA: covered by the VM tests instead
        }
        let err =
            CmId::resolve("10.99.0.1:3260".parse().unwrap(), Duration::from_secs(1)).unwrap_err();
        assert!(matches!(err, VerbsError::NoDevice { .. }), "{err}");
        let err = Listener::bind("10.99.0.1:0".parse().unwrap(), 1).unwrap_err();
        assert!(err.to_string().contains("rdma_rxe/mlx5"), "{err}");
    }
}
