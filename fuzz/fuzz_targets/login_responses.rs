//! Arbitrary Login Responses fed to the LoginNegotiator. The first byte
//! picks a configuration (no auth, CHAP, mutual CHAP, discovery, iSER); the
//! rest is a stream of PDUs (48-byte BHS + data of the length it announces).
//! The identifiers and secrets match the tgtd/libiscsi capture in the seed
//! corpus so seeds reach the end of a real mutual-CHAP login.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vhost_iser::iscsi::chap::{ChapCredentials, ChapSecret};
use vhost_iser::iscsi::login::{LoginConfig, LoginNegotiator, LoginStep, LoginTarget, MutualChap};
use vhost_iser::iscsi::pdu::{self, TargetPdu, BHS_LEN};

const ISID: [u8; 6] = [0x80, 0xf2, 0x8f, 0x12, 0x00, 0x00];
const ITT: u32 = 0x6549_6ff5;
const MUTUAL_CHALLENGE: &str = "0xA0BE36B8B58D8F810C87D885EAA985334AFED12B22CEEBE760335577464A5BE6";

fn secret(s: &str) -> ChapSecret {
    ChapSecret::new(s.as_bytes().to_vec(), "fuzz").expect("long enough")
}

fn config(kind: u8) -> LoginConfig {
    let target = if kind % 5 == 3 {
        LoginTarget::Discovery
    } else {
        LoginTarget::Normal {
            target_name: "iqn.2024-01.test:chap".into(),
        }
    };
    let mut c = LoginConfig::new("127.0.0.1:3260", "iqn.2024-01.test:init", target, ISID);
    c.itt = ITT;
    if matches!(kind % 5, 1 | 2) {
        c.chap = Some(ChapCredentials {
            username: "inituser".into(),
            secret: secret("initsecret123"),
        });
    }
    if kind % 5 == 2 {
        c.mutual_chap = Some(MutualChap {
            target_username: None,
            secret: secret("tgtsecret4567"),
        });
    }
    c.iser = kind % 5 == 4;
    c
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, mut rest)) = data.split_first() else {
        return;
    };
    let challenge =
        vhost_iser::iscsi::chap::decode_binary("CHAP_C", MUTUAL_CHALLENGE).expect("valid hex");
    let Ok(l) = LoginNegotiator::new(config(kind)) else {
        return;
    };
    let mut l = l.with_mutual_challenge(1, challenge);
    if l.start().is_err() {
        return;
    }
    while rest.len() >= BHS_LEN {
        let mut bhs = [0u8; BHS_LEN];
        bhs.copy_from_slice(&rest[..BHS_LEN]);
        rest = &rest[BHS_LEN..];
        let (_, dsl) = pdu::peek_lengths(&bhs);
        let take = (dsl as usize).min(rest.len());
        let payload = &rest[..take];
        let padded = (pdu::padded_len(dsl) as usize).min(rest.len());
        rest = &rest[padded..];
        let Ok(p) = TargetPdu::decode(&bhs) else {
            return;
        };
        match l.on_pdu(&p, payload) {
            Ok(LoginStep::Send(req)) => {
                assert!(req.data.len() <= vhost_iser::iscsi::login::LOGIN_PDU_DATA_MAX);
                assert!(!(req.header.transit && req.header.cont));
            }
            Ok(LoginStep::Done(out)) => {
                assert_ne!(out.tsih, 0);
                return;
            }
            Ok(LoginStep::Redirect { .. }) | Err(_) => return,
        }
    }
});
