//! Any 48 bytes through both BHS decoders: never a panic, and whatever
//! decodes re-encodes to bytes that decode to the same PDU.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vhost_iser::iscsi::pdu::{self, InitiatorPdu, TargetPdu, BHS_LEN};

fuzz_target!(|data: &[u8]| {
    let Some(head) = data.get(..BHS_LEN) else {
        return;
    };
    let mut bhs = [0u8; BHS_LEN];
    bhs.copy_from_slice(head);
    let (ahs, dsl) = pdu::peek_lengths(&bhs);
    let _ = pdu::pdu_wire_length(ahs, dsl, true, true);
    if let Ok(p) = TargetPdu::decode(&bhs) {
        let again = TargetPdu::decode(&p.encode()).expect("re-encoded target PDU must decode");
        assert_eq!(again, p);
        assert_eq!(p.data_segment_length(), dsl);
    }
    if let Ok(p) = InitiatorPdu::decode(&bhs) {
        let again =
            InitiatorPdu::decode(&p.encode()).expect("re-encoded initiator PDU must decode");
        assert_eq!(again, p);
    }
});
