//! Login state machine tests: replays of real tgtd traffic and scripted
//! targets, including hostile ones.

use super::*;
use crate::iscsi::params::DigestKind;
use crate::iscsi::pdu::{SeqNums, BHS_LEN};

/// Split a captured TCP byte stream (no digests) into (BHS, data) PDUs.
pub(crate) fn split_stream(mut b: &[u8]) -> Vec<([u8; BHS_LEN], Vec<u8>)> {
    let mut out = Vec::new();
    while b.len() >= BHS_LEN {
        let mut bhs = [0u8; BHS_LEN];
        bhs.copy_from_slice(&b[..BHS_LEN]);
        let (ahs, dsl) = crate::iscsi::pdu::peek_lengths(&bhs);
        let start = BHS_LEN + ahs;
        let data = b[start..start + dsl as usize].to_vec();
        let total = start + crate::iscsi::pdu::padded_len(dsl) as usize;
        out.push((bhs, data));
        b = &b[total.min(b.len())..];
    }
    out
}

fn login_rsp(bhs: &[u8; BHS_LEN]) -> LoginResponse {
    match TargetPdu::decode(bhs).unwrap() {
        TargetPdu::LoginResponse(r) => r,
        other => panic!("not a login response: {other:?}"),
    }
}

fn secret(s: &str) -> ChapSecret {
    ChapSecret::new(s.as_bytes().to_vec(), "test").unwrap()
}

fn expect_send(step: LoginStep) -> LoginPdu {
    match step {
        LoginStep::Send(p) => p,
        other => panic!("expected a request, got {other:?}"),
    }
}

fn pairs_of(data: &[u8]) -> Vec<(String, String)> {
    text::decode(data)
        .unwrap()
        .into_iter()
        .map(|p| (p.key, p.value))
        .collect()
}

fn get<'a>(pairs: &'a [(String, String)], k: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(key, _)| key == k)
        .map(|(_, v)| v.as_str())
}

#[test]
fn every_captured_tgtd_pdu_decodes() {
    for cap in [
        &include_bytes!("../testdata/tgtd_plain.t2i")[..],
        &include_bytes!("../testdata/tgtd_chap.t2i")[..],
        &include_bytes!("../testdata/tgtd_discovery.t2i")[..],
    ] {
        let pdus = split_stream(cap);
        assert!(pdus.len() >= 3);
        for (bhs, data) in pdus {
            let p = TargetPdu::decode(&bhs).unwrap();
            assert_eq!(p.data_segment_length() as usize, data.len());
            assert_eq!(p.encode(), bhs, "re-encoding gives the same bytes");
        }
    }
    for cap in [
        &include_bytes!("../testdata/libiscsi_plain.i2t")[..],
        &include_bytes!("../testdata/libiscsi_chap.i2t")[..],
    ] {
        for (bhs, _) in split_stream(cap) {
            crate::iscsi::pdu::InitiatorPdu::decode(&bhs).unwrap();
        }
    }
}

/// libiscsi and tgtd computed these CHAP responses in a real mutual-CHAP
/// login; ours must agree with both.
#[test]
fn chap_matches_libiscsi_and_tgtd() {
    let t2i = split_stream(include_bytes!("../testdata/tgtd_chap.t2i"));
    let i2t = split_stream(include_bytes!("../testdata/libiscsi_chap.i2t"));
    let challenge = pairs_of(&t2i[1].1);
    let c = chap::decode_binary("CHAP_C", get(&challenge, "CHAP_C").unwrap()).unwrap();
    let answer = pairs_of(&i2t[2].1);
    let r = ChapAlgorithm::Md5.response(1, &secret("initsecret123"), &c);
    assert_eq!(
        chap::decode_binary("CHAP_R", get(&answer, "CHAP_R").unwrap()).unwrap(),
        r
    );
    let our_c = chap::decode_binary("CHAP_C", get(&answer, "CHAP_C").unwrap()).unwrap();
    let tgt = pairs_of(&t2i[2].1);
    let tr = ChapAlgorithm::Md5.response(1, &secret("tgtsecret4567"), &our_c);
    assert_eq!(
        chap::decode_binary("CHAP_R", get(&tgt, "CHAP_R").unwrap()).unwrap(),
        tr
    );
}

fn chap_config_from_capture() -> (LoginConfig, Vec<u8>) {
    let i2t = split_stream(include_bytes!("../testdata/libiscsi_chap.i2t"));
    let first = match crate::iscsi::pdu::InitiatorPdu::decode(&i2t[0].0).unwrap() {
        crate::iscsi::pdu::InitiatorPdu::LoginRequest(r) => r,
        other => panic!("{other:?}"),
    };
    let mut cfg = LoginConfig::new(
        "127.0.0.1:3270",
        "iqn.2024-01.test:init",
        LoginTarget::Normal {
            target_name: "iqn.2024-01.test:chap".into(),
        },
        first.isid,
    );
    cfg.itt = first.itt;
    cfg.cmd_sn = first.cmd_sn;
    cfg.chap = Some(ChapCredentials {
        username: "inituser".into(),
        secret: secret("initsecret123"),
    });
    cfg.mutual_chap = Some(MutualChap {
        target_username: Some("tgtuser".into()),
        secret: secret("tgtsecret4567"),
    });
    let answer = pairs_of(&i2t[2].1);
    let our_c = chap::decode_binary("CHAP_C", get(&answer, "CHAP_C").unwrap()).unwrap();
    (cfg, our_c)
}

/// Replay tgtd's answers to a mutual-CHAP login through our state machine.
#[test]
fn replay_tgtd_mutual_chap_login() {
    let t2i = split_stream(include_bytes!("../testdata/tgtd_chap.t2i"));
    let (cfg, our_c) = chap_config_from_capture();
    let mut l = LoginNegotiator::new(cfg)
        .unwrap()
        .with_mutual_challenge(1, our_c);
    let first = l.start().unwrap();
    assert!(!first.header.transit, "CHAP offered: stay in security");
    assert_eq!(first.header.csg, Stage::Security);
    let p = pairs_of(&first.data);
    assert_eq!(get(&p, "AuthMethod"), Some("CHAP"), "mutual: no None");
    assert_eq!(get(&p, "SessionType"), Some("Normal"));
    assert_eq!(get(&p, "TargetName"), Some("iqn.2024-01.test:chap"));

    let r0 = login_rsp(&t2i[0].0);
    let req = expect_send(l.on_response(&r0, &t2i[0].1).unwrap());
    assert_eq!(pairs_of(&req.data), vec![("CHAP_A".into(), "7,5".into())]);
    assert_eq!(req.header.exp_stat_sn, 1);

    let r1 = login_rsp(&t2i[1].0);
    let req = expect_send(l.on_response(&r1, &t2i[1].1).unwrap());
    let p = pairs_of(&req.data);
    assert_eq!(get(&p, "CHAP_N"), Some("inituser"));
    assert_eq!(get(&p, "CHAP_I"), Some("1"));
    assert!(req.header.transit);
    assert_eq!(req.header.nsg, Stage::Operational);

    let r2 = login_rsp(&t2i[2].0);
    let req = expect_send(l.on_response(&r2, &t2i[2].1).unwrap());
    assert_eq!(req.header.csg, Stage::Operational);
    assert_eq!(req.header.nsg, Stage::FullFeature);
    assert!(req.header.transit);
    let p = pairs_of(&req.data);
    assert_eq!(get(&p, "ImmediateData"), Some("Yes"));

    let r3 = login_rsp(&t2i[3].0);
    let LoginStep::Done(out) = l.on_response(&r3, &t2i[3].1).unwrap() else {
        panic!("login should be complete");
    };
    assert_eq!(out.tsih, 0x0200);
    assert!(out.chap_used && out.target_authenticated);
    assert_eq!(out.exp_stat_sn, 4);
    assert!(out.params.initial_r2t);
    assert!(out.params.immediate_data);
    assert_eq!(out.params.max_burst_length, 262_144);
    assert_eq!(out.params.first_burst_length, 65_536);
    assert_eq!(out.params.target_max_recv_data_segment_length, 8192);
    assert_eq!(out.params.target_portal_group_tag, Some(1));
    assert_eq!(out.params.header_digest, DigestKind::None);
    // Nothing more is accepted.
    assert!(matches!(
        l.on_response(&r3, &t2i[3].1),
        Err(LoginError::Finished(_))
    ));
}

#[test]
fn replay_with_wrong_mutual_secret_fails() {
    let t2i = split_stream(include_bytes!("../testdata/tgtd_chap.t2i"));
    let (mut cfg, our_c) = chap_config_from_capture();
    cfg.mutual_chap = Some(MutualChap {
        target_username: None,
        secret: secret("not-the-target-secret"),
    });
    let mut l = LoginNegotiator::new(cfg)
        .unwrap()
        .with_mutual_challenge(1, our_c);
    l.start().unwrap();
    for (bhs, data) in &t2i[..2] {
        l.on_response(&login_rsp(bhs), data).unwrap();
    }
    let e = l.on_response(&login_rsp(&t2i[2].0), &t2i[2].1).unwrap_err();
    assert!(
        matches!(
            e,
            LoginError::MutualAuthFailed {
                what: "wrong CHAP_R",
                ..
            }
        ),
        "{e}"
    );
}

// ---------- scripted target ----------

struct Script {
    isid: [u8; 6],
    itt: u32,
    stat_sn: u32,
}

impl Script {
    fn new() -> Self {
        Script {
            isid: [0x80, 1, 2, 3, 0, 1],
            itt: 0x10,
            stat_sn: 100,
        }
    }

    fn rsp(
        &mut self,
        transit: bool,
        csg: Stage,
        nsg: Stage,
        pairs: &[(&str, &str)],
    ) -> (LoginResponse, Vec<u8>) {
        let data = text::encode(pairs).unwrap();
        let r = LoginResponse {
            transit,
            cont: false,
            csg,
            nsg: if transit { nsg } else { csg },
            version_max: 0,
            version_active: 0,
            data_segment_length: U24::from_len(data.len()).unwrap(),
            isid: self.isid,
            tsih: if nsg == Stage::FullFeature && transit {
                7
            } else {
                0
            },
            itt: self.itt,
            seq: SeqNums {
                stat_sn: self.stat_sn,
                exp_cmd_sn: 1,
                max_cmd_sn: 32,
            },
            status_class: 0,
            status_detail: 0,
        };
        self.stat_sn += 1;
        (r, data)
    }
}

fn cfg(target: LoginTarget) -> LoginConfig {
    let mut c = LoginConfig::new(
        "127.0.0.1:3260",
        "iqn.2024-01.test:init",
        target,
        [0x80, 1, 2, 3, 0, 1],
    );
    c.itt = 0x10;
    c.cmd_sn = 1;
    c
}

fn normal() -> LoginConfig {
    cfg(LoginTarget::Normal {
        target_name: "iqn.2024-01.test:disk".into(),
    })
}

const OP_ANSWERS: &[(&str, &str)] = &[
    ("HeaderDigest", "None"),
    ("DataDigest", "None"),
    ("InitialR2T", "No"),
    ("ImmediateData", "Yes"),
    ("MaxBurstLength", "524288"),
    ("FirstBurstLength", "131072"),
    ("MaxOutstandingR2T", "1"),
    ("MaxConnections", "1"),
    ("DefaultTime2Wait", "2"),
    ("DefaultTime2Retain", "0"),
    ("ErrorRecoveryLevel", "0"),
    ("DataPDUInOrder", "Yes"),
    ("DataSequenceInOrder", "Yes"),
    ("MaxRecvDataSegmentLength", "65536"),
];

#[test]
fn no_auth_login() {
    let mut s = Script::new();
    let mut l = LoginNegotiator::new(normal()).unwrap();
    let first = l.start().unwrap();
    assert!(first.header.transit);
    assert_eq!(get(&pairs_of(&first.data), "AuthMethod"), Some("None"));
    let (r, d) = s.rsp(
        true,
        Stage::Security,
        Stage::Operational,
        &[
            ("AuthMethod", "None"),
            ("TargetPortalGroupTag", "1"),
            ("TargetAlias", "disk"),
        ],
    );
    let req = expect_send(l.on_response(&r, &d).unwrap());
    assert_eq!(req.header.exp_stat_sn, 101);
    assert_eq!(req.header.cmd_sn, 1);
    let (r, d) = s.rsp(true, Stage::Operational, Stage::FullFeature, OP_ANSWERS);
    let LoginStep::Done(out) = l.on_response(&r, &d).unwrap() else {
        panic!()
    };
    assert_eq!(out.tsih, 7);
    assert_eq!(out.cmd_sn, 1);
    assert_eq!(out.exp_stat_sn, 102);
    assert_eq!((out.exp_cmd_sn, out.max_cmd_sn), (1, 32));
    assert!(!out.params.initial_r2t);
    assert_eq!(out.params.max_burst_length, 524_288);
    assert_eq!(out.params.target_max_recv_data_segment_length, 65_536);
    assert_eq!(out.params.target_alias.as_deref(), Some("disk"));
    assert!(!out.chap_used);
}

#[test]
fn target_stays_in_stage_then_moves() {
    let mut s = Script::new();
    let mut l = LoginNegotiator::new(normal()).unwrap();
    l.start().unwrap();
    // Target answers without moving on: we ask again with T=1.
    let (r, d) = s.rsp(
        false,
        Stage::Security,
        Stage::Security,
        &[("AuthMethod", "None")],
    );
    let req = expect_send(l.on_response(&r, &d).unwrap());
    assert!(req.header.transit && req.data.is_empty());
    let (r, d) = s.rsp(true, Stage::Security, Stage::Operational, &[]);
    expect_send(l.on_response(&r, &d).unwrap());
    // Operational: the target offers a key of its own first.
    let (r, d) = s.rsp(
        false,
        Stage::Operational,
        Stage::Operational,
        &[("X-vendor.Foo", "1"), ("HeaderDigest", "None")],
    );
    let req = expect_send(l.on_response(&r, &d).unwrap());
    assert_eq!(
        pairs_of(&req.data),
        vec![("X-vendor.Foo".into(), "NotUnderstood".into())]
    );
    let (r, d) = s.rsp(
        true,
        Stage::Operational,
        Stage::FullFeature,
        &OP_ANSWERS[1..],
    );
    assert!(matches!(l.on_response(&r, &d).unwrap(), LoginStep::Done(_)));
}

fn chap_cfg(mutual: bool) -> LoginConfig {
    let mut c = normal();
    c.chap = Some(ChapCredentials {
        username: "user".into(),
        secret: secret("initiator-secret"),
    });
    if mutual {
        c.mutual_chap = Some(MutualChap {
            target_username: Some("target".into()),
            secret: secret("target-secret-x"),
        });
    }
    c
}

#[test]
fn scripted_sha256_mutual_chap() {
    let mut s = Script::new();
    let our_c = vec![9u8; 16];
    let mut l = LoginNegotiator::new(chap_cfg(true))
        .unwrap()
        .with_mutual_challenge(77, our_c.clone());
    l.start().unwrap();
    let (r, d) = s.rsp(
        false,
        Stage::Security,
        Stage::Security,
        &[("AuthMethod", "CHAP")],
    );
    expect_send(l.on_response(&r, &d).unwrap());
    let (r, d) = s.rsp(
        false,
        Stage::Security,
        Stage::Security,
        &[
            ("CHAP_A", "7"),
            ("CHAP_I", "0x05"),
            ("CHAP_C", "0b3q2+7w=="),
        ],
    );
    let req = expect_send(l.on_response(&r, &d).unwrap());
    let p = pairs_of(&req.data);
    // Independent: Python hashlib.sha256(b'\x05' + b'initiator-secret' + bytes.fromhex('deadbeef'))
    assert_eq!(
        get(&p, "CHAP_R"),
        Some("0xd7a47b270f91d7fce753ba1ed00a95f85ae95b9af6b4449451913a1055827c7b")
    );
    assert_eq!(get(&p, "CHAP_I"), Some("77"));
    assert_eq!(get(&p, "CHAP_C"), Some(chap::encode_hex(&our_c).as_str()));
    let tr = ChapAlgorithm::Sha256.response(77, &secret("target-secret-x"), &our_c);
    let tr_hex = chap::encode_hex(&tr);
    let (r, d) = s.rsp(
        true,
        Stage::Security,
        Stage::Operational,
        &[("CHAP_N", "target"), ("CHAP_R", &tr_hex)],
    );
    expect_send(l.on_response(&r, &d).unwrap());
    let (r, d) = s.rsp(true, Stage::Operational, Stage::FullFeature, OP_ANSWERS);
    let LoginStep::Done(out) = l.on_response(&r, &d).unwrap() else {
        panic!()
    };
    assert!(out.target_authenticated);
}

/// Drive a CHAP login up to the target's challenge answer.
fn chap_until_result(mutual: bool) -> (LoginNegotiator, Script) {
    let mut s = Script::new();
    let mut l = LoginNegotiator::new(chap_cfg(mutual))
        .unwrap()
        .with_mutual_challenge(1, vec![1; 16]);
    l.start().unwrap();
    let (r, d) = s.rsp(
        false,
        Stage::Security,
        Stage::Security,
        &[("AuthMethod", "CHAP")],
    );
    expect_send(l.on_response(&r, &d).unwrap());
    let (r, d) = s.rsp(
        false,
        Stage::Security,
        Stage::Security,
        &[("CHAP_A", "5"), ("CHAP_I", "3"), ("CHAP_C", "0x0102030405")],
    );
    expect_send(l.on_response(&r, &d).unwrap());
    (l, s)
}

#[test]
fn target_skipping_mutual_chap_is_refused() {
    let (mut l, mut s) = chap_until_result(true);
    let (r, d) = s.rsp(true, Stage::Security, Stage::Operational, &[]);
    let e = l.on_response(&r, &d).unwrap_err();
    assert!(matches!(e, LoginError::MutualAuthFailed { .. }), "{e}");
    assert!(e.to_string().contains("mutual CHAP"));
}

#[test]
fn wrong_target_chap_name_is_refused() {
    let (mut l, mut s) = chap_until_result(true);
    let tr =
        chap::encode_hex(&ChapAlgorithm::Md5.response(1, &secret("target-secret-x"), &[1; 16]));
    let (r, d) = s.rsp(
        true,
        Stage::Security,
        Stage::Operational,
        &[("CHAP_N", "mallory"), ("CHAP_R", &tr)],
    );
    assert!(matches!(
        l.on_response(&r, &d),
        Err(LoginError::MutualAuthFailed { .. })
    ));
}

#[test]
fn one_way_chap_then_operational() {
    let (mut l, mut s) = chap_until_result(false);
    let (r, d) = s.rsp(true, Stage::Security, Stage::Operational, &[]);
    expect_send(l.on_response(&r, &d).unwrap());
    let (r, d) = s.rsp(true, Stage::Operational, Stage::FullFeature, OP_ANSWERS);
    let LoginStep::Done(out) = l.on_response(&r, &d).unwrap() else {
        panic!()
    };
    assert!(out.chap_used && !out.target_authenticated);
}

#[test]
fn hostile_chap_challenges() {
    let bad_challenges: &[&[(&str, &str)]] = &[
        &[("CHAP_A", "5"), ("CHAP_I", "3")], // no CHAP_C
        &[("CHAP_A", "6"), ("CHAP_I", "3"), ("CHAP_C", "0x01")], // SHA-1 not offered
        &[("CHAP_A", "5"), ("CHAP_I", "256"), ("CHAP_C", "0x01")], // id out of range
        &[("CHAP_A", "5"), ("CHAP_I", "1"), ("CHAP_C", "plain")], // bad encoding
        &[
            ("CHAP_A", "5"),
            ("CHAP_I", "1"),
            ("CHAP_C", "0x01"),
            ("CHAP_R", "0x01"),
        ],
        &[
            ("AuthMethod", "CHAP"),
            ("CHAP_A", "5"),
            ("CHAP_I", "1"),
            ("CHAP_C", "0x01"),
        ],
    ];
    for pairs in bad_challenges {
        let mut s = Script::new();
        let mut l = LoginNegotiator::new(chap_cfg(false)).unwrap();
        l.start().unwrap();
        let (r, d) = s.rsp(
            false,
            Stage::Security,
            Stage::Security,
            &[("AuthMethod", "CHAP")],
        );
        expect_send(l.on_response(&r, &d).unwrap());
        let (r, d) = s.rsp(false, Stage::Security, Stage::Security, pairs);
        assert!(l.on_response(&r, &d).is_err(), "{pairs:?}");
    }
}

#[test]
fn reflected_challenge_is_refused() {
    let mut s = Script::new();
    let mut l = LoginNegotiator::new(chap_cfg(true))
        .unwrap()
        .with_mutual_challenge(1, vec![1, 2, 3, 4, 5]);
    l.start().unwrap();
    let (r, d) = s.rsp(
        false,
        Stage::Security,
        Stage::Security,
        &[("AuthMethod", "CHAP")],
    );
    expect_send(l.on_response(&r, &d).unwrap());
    let (r, d) = s.rsp(
        false,
        Stage::Security,
        Stage::Security,
        &[("CHAP_A", "5"), ("CHAP_I", "3"), ("CHAP_C", "0x0102030405")],
    );
    assert!(matches!(
        l.on_response(&r, &d),
        Err(LoginError::MutualAuthFailed { .. })
    ));
}

#[test]
fn auth_method_mismatches() {
    // Target wants CHAP, we have no credentials.
    let mut s = Script::new();
    let mut l = LoginNegotiator::new(normal()).unwrap();
    l.start().unwrap();
    let (r, d) = s.rsp(
        false,
        Stage::Security,
        Stage::Security,
        &[("AuthMethod", "CHAP")],
    );
    let e = l.on_response(&r, &d).unwrap_err();
    assert!(e.to_string().contains("no CHAP credentials"), "{e}");
    // Target picks None while we require mutual CHAP.
    let mut s = Script::new();
    let mut l = LoginNegotiator::new(chap_cfg(true)).unwrap();
    l.start().unwrap();
    let (r, d) = s.rsp(
        false,
        Stage::Security,
        Stage::Security,
        &[("AuthMethod", "None")],
    );
    assert!(matches!(
        l.on_response(&r, &d),
        Err(LoginError::AuthUnavailable { .. })
    ));
    // CHAP offered with None allowed: None accepted, then we ask to move on.
    let mut s = Script::new();
    let mut l = LoginNegotiator::new(chap_cfg(false)).unwrap();
    assert_eq!(
        get(&pairs_of(&l.start().unwrap().data), "AuthMethod"),
        Some("CHAP,None")
    );
    let (r, d) = s.rsp(
        false,
        Stage::Security,
        Stage::Security,
        &[("AuthMethod", "None")],
    );
    let req = expect_send(l.on_response(&r, &d).unwrap());
    assert!(req.header.transit);
    // Missing AuthMethod while we offered CHAP.
    let mut s = Script::new();
    let mut l = LoginNegotiator::new(chap_cfg(false)).unwrap();
    l.start().unwrap();
    let (r, d) = s.rsp(false, Stage::Security, Stage::Security, &[]);
    assert!(l.on_response(&r, &d).is_err());
}

/// Start a no-auth login and return it with the script, first request sent.
fn started() -> (LoginNegotiator, Script) {
    let mut l = LoginNegotiator::new(normal()).unwrap();
    l.start().unwrap();
    (l, Script::new())
}

#[test]
fn hostile_headers() {
    type Mutate = fn(&mut LoginResponse, &mut Vec<u8>);
    let cases: &[(&str, Mutate)] = &[
        ("wrong ITT", |r, _| r.itt = 0x11),
        ("wrong ISID", |r, _| r.isid[5] = 9),
        ("version", |r, _| r.version_active = 1),
        ("stage mismatch", |r, _| r.csg = Stage::Operational),
        ("backwards", |r, _| r.nsg = Stage::Security),
        ("length mismatch", |r, _| {
            r.data_segment_length = U24::new(3).unwrap()
        }),
        ("garbage text", |r, d| {
            *d = b"\xff\xfe=\0".to_vec();
            r.data_segment_length = U24::new(4).unwrap();
        }),
        ("duplicate keys", |r, d| {
            *d = b"AuthMethod=None\0AuthMethod=None\0".to_vec();
            r.data_segment_length = U24::from_len(d.len()).unwrap();
        }),
        ("success detail", |r, _| r.status_detail = 1),
    ];
    for (name, m) in cases {
        let (mut l, mut s) = started();
        let (mut r, mut d) = s.rsp(
            true,
            Stage::Security,
            Stage::Operational,
            &[("AuthMethod", "None")],
        );
        m(&mut r, &mut d);
        assert!(l.on_response(&r, &d).is_err(), "{name}");
        // After an error the login is over.
        assert!(
            matches!(l.on_response(&r, &d), Err(LoginError::Finished(_))),
            "{name}"
        );
    }
}

#[test]
fn t_bit_without_our_consent() {
    let mut s = Script::new();
    let mut l = LoginNegotiator::new(chap_cfg(false)).unwrap();
    l.start().unwrap(); // T=0: CHAP offered
    let (r, d) = s.rsp(
        true,
        Stage::Security,
        Stage::Operational,
        &[("AuthMethod", "CHAP")],
    );
    let e = l.on_response(&r, &d).unwrap_err();
    assert!(e.to_string().contains("did not ask"), "{e}");
}

#[test]
fn jump_beyond_requested_stage() {
    let (mut l, mut s) = started();
    let (r, d) = s.rsp(
        true,
        Stage::Security,
        Stage::FullFeature,
        &[("AuthMethod", "None")],
    );
    assert!(l.on_response(&r, &d).is_err());
}

#[test]
fn statsn_going_backwards() {
    let (mut l, mut s) = started();
    let (r, d) = s.rsp(
        false,
        Stage::Security,
        Stage::Security,
        &[("AuthMethod", "None")],
    );
    expect_send(l.on_response(&r, &d).unwrap());
    s.stat_sn = 50;
    let (r, d) = s.rsp(true, Stage::Security, Stage::Operational, &[]);
    assert!(l.on_response(&r, &d).is_err());
}

#[test]
fn negotiation_errors_surface() {
    let (mut l, mut s) = started();
    let (r, d) = s.rsp(
        true,
        Stage::Security,
        Stage::Operational,
        &[("AuthMethod", "None")],
    );
    expect_send(l.on_response(&r, &d).unwrap());
    let (r, d) = s.rsp(
        true,
        Stage::Operational,
        Stage::FullFeature,
        &[("MaxBurstLength", "99999999")],
    );
    let e = l.on_response(&r, &d).unwrap_err();
    assert!(matches!(e, LoginError::Negotiation { .. }), "{e}");
    // Security keys in the operational stage.
    let (mut l, mut s) = started();
    let (r, d) = s.rsp(
        true,
        Stage::Security,
        Stage::Operational,
        &[("AuthMethod", "None")],
    );
    expect_send(l.on_response(&r, &d).unwrap());
    let (r, d) = s.rsp(
        false,
        Stage::Operational,
        Stage::Operational,
        &[("CHAP_A", "5")],
    );
    assert!(l.on_response(&r, &d).is_err());
}

#[test]
fn missing_tsih_on_final_response() {
    let (mut l, mut s) = started();
    let (r, d) = s.rsp(
        true,
        Stage::Security,
        Stage::Operational,
        &[("AuthMethod", "None")],
    );
    expect_send(l.on_response(&r, &d).unwrap());
    let (mut r, d) = s.rsp(true, Stage::Operational, Stage::FullFeature, OP_ANSWERS);
    r.tsih = 0;
    assert!(l.on_response(&r, &d).is_err());
}

#[test]
fn status_classes_in_words() {
    let (mut l, mut s) = started();
    let (mut r, d) = s.rsp(false, Stage::Security, Stage::Security, &[]);
    r.status_class = 2;
    r.status_detail = 1;
    let e = l.on_response(&r, &d).unwrap_err();
    assert_eq!(
        e.to_string(),
        "login to 127.0.0.1:3260 rejected: authentication failure"
    );
    assert!(matches!(
        e,
        LoginError::Rejected {
            class: 2,
            detail: 1,
            ..
        }
    ));
    for (c, d, w) in [
        (2, 2, "authorization failure"),
        (2, 3, "target not found"),
        (2, 4, "target removed"),
        (2, 5, "unsupported iSCSI version"),
        (2, 6, "too many connections"),
        (2, 7, "missing parameter"),
        (2, 8, "cannot include connection in session"),
        (2, 9, "session type not supported"),
        (2, 10, "session does not exist"),
        (2, 11, "invalid request during login"),
        (2, 0, "initiator error"),
        (3, 0, "target error"),
        (3, 1, "service unavailable"),
        (3, 2, "out of resources"),
        (2, 99, "unknown initiator error status"),
    ] {
        assert!(status_words(c, d).starts_with(w), "{c}/{d}");
    }
}

#[test]
fn redirect() {
    for (detail, permanent) in [(1, false), (2, true)] {
        let (mut l, mut s) = started();
        let (mut r, d) = s.rsp(
            false,
            Stage::Security,
            Stage::Security,
            &[("TargetAddress", "[fd00::5]:3261,2")],
        );
        r.status_class = 1;
        r.status_detail = detail;
        match l.on_response(&r, &d).unwrap() {
            LoginStep::Redirect {
                portal,
                permanent: p,
            } => {
                assert_eq!(portal.host, "fd00::5");
                assert_eq!(portal.port, 3261);
                assert_eq!(p, permanent);
            }
            other => panic!("{other:?}"),
        }
    }
    let (mut l, mut s) = started();
    let (mut r, d) = s.rsp(false, Stage::Security, Stage::Security, &[]);
    r.status_class = 1;
    r.status_detail = 1;
    assert!(l.on_response(&r, &d).is_err(), "redirect without address");
}

#[test]
fn target_continued_text_is_joined() {
    let (mut l, mut s) = started();
    let full = text::encode(&[("AuthMethod", "None"), ("TargetAlias", "a-long-alias")]).unwrap();
    let (a, b) = full.split_at(10);
    let (mut r, _) = s.rsp(false, Stage::Security, Stage::Security, &[]);
    r.cont = true;
    r.data_segment_length = U24::from_len(a.len()).unwrap();
    let req = expect_send(l.on_response(&r, a).unwrap());
    assert!(req.data.is_empty() && req.header.transit && !req.header.cont);
    let (mut r, _) = s.rsp(true, Stage::Security, Stage::Operational, &[]);
    r.data_segment_length = U24::from_len(b.len()).unwrap();
    let req = expect_send(l.on_response(&r, b).unwrap());
    assert_eq!(req.header.csg, Stage::Operational);
}

#[test]
fn our_long_text_goes_out_with_c_bit() {
    let mut c = normal();
    c.initiator_alias = Some("x".repeat(8190));
    let mut l = LoginNegotiator::new(c).unwrap();
    let first = l.start().unwrap();
    assert!(first.header.cont && !first.header.transit);
    assert_eq!(first.data.len(), LOGIN_PDU_DATA_MAX);
    let mut s = Script::new();
    let (r, d) = s.rsp(false, Stage::Security, Stage::Security, &[]);
    let second = expect_send(l.on_response(&r, &d).unwrap());
    assert!(!second.header.cont && second.header.transit);
    let mut all = first.data.clone();
    all.extend(&second.data);
    assert_eq!(get(&pairs_of(&all), "AuthMethod"), Some("None"));
    // A target that answers before the text is complete is wrong.
    let mut l = LoginNegotiator::new({
        let mut c = normal();
        c.initiator_alias = Some("x".repeat(8190));
        c
    })
    .unwrap();
    l.start().unwrap();
    let (r, d) = s.rsp(
        false,
        Stage::Security,
        Stage::Security,
        &[("AuthMethod", "None")],
    );
    assert!(l.on_response(&r, &d).is_err());
}

#[test]
fn endless_target_is_cut_off() {
    let (mut l, mut s) = started();
    let (r, d) = s.rsp(
        false,
        Stage::Security,
        Stage::Security,
        &[("AuthMethod", "None")],
    );
    expect_send(l.on_response(&r, &d).unwrap());
    let mut result = Ok(());
    for _ in 0..100 {
        let (r, d) = s.rsp(false, Stage::Security, Stage::Security, &[]);
        if let Err(e) = l.on_response(&r, &d) {
            result = Err(e);
            break;
        }
    }
    assert!(result.is_err());
}

#[test]
fn discovery_login() {
    let mut l = LoginNegotiator::new(cfg(LoginTarget::Discovery)).unwrap();
    let first = l.start().unwrap();
    let p = pairs_of(&first.data);
    assert_eq!(get(&p, "SessionType"), Some("Discovery"));
    assert_eq!(get(&p, "TargetName"), None);
    let mut s = Script::new();
    let (r, d) = s.rsp(
        true,
        Stage::Security,
        Stage::Operational,
        &[("AuthMethod", "None")],
    );
    let req = expect_send(l.on_response(&r, &d).unwrap());
    assert_eq!(
        pairs_of(&req.data).len(),
        3,
        "digests and MaxRecvDataSegmentLength only"
    );
    let (r, d) = s.rsp(
        true,
        Stage::Operational,
        Stage::FullFeature,
        &[
            ("HeaderDigest", "None"),
            ("DataDigest", "None"),
            ("MaxBurstLength", "262144"),
        ],
    );
    assert!(matches!(l.on_response(&r, &d).unwrap(), LoginStep::Done(_)));
}

#[test]
fn iser_login_requires_rdma_extensions() {
    let mut c = normal();
    c.iser = true;
    let mut l = LoginNegotiator::new(c).unwrap();
    l.start().unwrap();
    let mut s = Script::new();
    let (r, d) = s.rsp(
        true,
        Stage::Security,
        Stage::Operational,
        &[("AuthMethod", "None")],
    );
    let req = expect_send(l.on_response(&r, &d).unwrap());
    assert_eq!(get(&pairs_of(&req.data), "RDMAExtensions"), Some("Yes"));
    let mut answers = OP_ANSWERS.to_vec();
    answers.push(("RDMAExtensions", "No"));
    let (r, d) = s.rsp(true, Stage::Operational, Stage::FullFeature, &answers);
    assert!(matches!(
        l.on_response(&r, &d),
        Err(LoginError::Negotiation { .. })
    ));
}

#[test]
fn config_errors() {
    let mut c = chap_cfg(true);
    c.mutual_chap.as_mut().unwrap().secret = secret("initiator-secret");
    assert!(matches!(
        LoginNegotiator::new(c),
        Err(LoginError::Config(_))
    ));
    let mut c = normal();
    c.mutual_chap = chap_cfg(true).mutual_chap;
    assert!(LoginNegotiator::new(c).is_err());
    let mut c = normal();
    c.initiator_name.clear();
    assert!(LoginNegotiator::new(c).is_err());
    let mut c = normal();
    c.initiator_name = "bad\0name".into();
    let mut l = LoginNegotiator::new(c).unwrap();
    assert!(l.start().is_err());
}

#[test]
fn reject_and_other_pdus_end_login() {
    let (mut l, _) = started();
    let rej = TargetPdu::Reject(crate::iscsi::pdu::Reject {
        reason: RejectReason::ProtocolError,
        data_segment_length: U24::ZERO,
        seq: SeqNums::default(),
        data_sn: 0,
    });
    let e = l.on_pdu(&rej, &[]).unwrap_err();
    assert!(e.to_string().contains("rejected our login request"), "{e}");
}

#[test]
fn random_isid_format() {
    let a = random_isid(1).unwrap();
    assert_eq!(a[0], 0x80);
    assert_eq!(&a[4..], &[0, 1]);
}
