//! Any bytes as the content of a received RDMA Send (iSER header, BHS, AHS,
//! data) and as RDMA CM private data: never a panic; whatever decodes
//! re-encodes to bytes that decode to the same value, and a split control
//! message's slices stay inside the received bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vhost_iser::transport::iser::cm::CmHdr;
use vhost_iser::transport::iser::header::{
    ControlHeader, ControlMessage, Hello, HelloReply, Message, CONTROL_HEADER_LEN, HELLO_LEN,
};

fuzz_target!(|data: &[u8]| {
    if let Ok((msg, used)) = Message::decode(data) {
        assert!(used <= data.len());
        match msg {
            Message::Control(h) => {
                assert_eq!(used, CONTROL_HEADER_LEN);
                assert_eq!(ControlHeader::decode(&h.encode()), Ok(h));
            }
            Message::Hello(h) => {
                assert_eq!(used, HELLO_LEN);
                let b = h.encode().expect("a decoded Hello must encode");
                assert_eq!(Hello::decode(&b), Ok(h));
            }
            Message::HelloReply(h) => {
                assert_eq!(used, HELLO_LEN);
                let b = h.encode().expect("a decoded HelloReply must encode");
                assert_eq!(HelloReply::decode(&b), Ok(h));
            }
        }
    }
    if let Ok(m) = ControlMessage::parse(data) {
        let base = data.as_ptr() as usize;
        for part in [m.ahs, m.data] {
            let start = part.as_ptr() as usize;
            assert!(start >= base && start + part.len() <= base + data.len());
        }
        assert_eq!(m.ahs.len(), usize::from(m.bhs[4]) * 4);
        assert_eq!(&data[CONTROL_HEADER_LEN..CONTROL_HEADER_LEN + 48], &m.bhs);
    }
    if let Ok(Some(h)) = CmHdr::decode(data) {
        let b = h.encode();
        assert_eq!(CmHdr::decode(&b), Ok(Some(h)));
    }
});
