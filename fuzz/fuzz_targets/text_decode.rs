//! Arbitrary text data through every text consumer: the key=value decoder,
//! SendTargets parsing, TargetAddress parsing, CHAP binary values and the
//! parameter negotiation.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vhost_iser::iscsi::params::{Negotiation, ParamOffer, SessionType};
use vhost_iser::iscsi::{chap, discovery, text};

fuzz_target!(|data: &[u8]| {
    let _ = text::decode_unique(data);
    let _ = discovery::parse_send_targets(data);
    if let Ok(pairs) = text::decode(data) {
        // Re-encoding decoded pairs gives text that decodes to the same.
        let kv: Vec<(String, String)> = pairs
            .iter()
            .map(|p| (p.key.clone(), p.value.clone()))
            .collect();
        if let Ok(enc) = text::encode(&kv) {
            assert_eq!(
                text::decode(&enc).expect("re-encoded text must decode"),
                pairs
            );
        }
        for st in [SessionType::Normal, SessionType::Discovery] {
            let mut n =
                Negotiation::new(ParamOffer::default(), st).expect("default offer is valid");
            for p in &pairs {
                if n.handle(&p.key, &p.value).is_err() {
                    break;
                }
            }
            let _ = n.take_replies();
            let _ = n.finish();
        }
        for p in &pairs {
            let _ = discovery::parse_target_address(&p.value);
            let _ = chap::decode_binary("CHAP_C", &p.value);
        }
    }
    let mut asm = text::TextAssembler::new(4096);
    for chunk in data.chunks(7) {
        let _ = asm.push(chunk, true);
    }
    let _ = asm.push(&[], false);
});
