#!/usr/bin/env python3
"""Write the seed corpora in fuzz/corpus/<target>/ from real PDUs.

The captures in src/iscsi/testdata/ are real traffic between libiscsi and
tgtd (login with and without mutual CHAP, SendTargets discovery, SCSI
commands). PDU types missing from them (R2T, NOP-In, task management
response, Reject, Async Message) are built here by the RFC 7143 layouts.
Run from anywhere: python3 fuzz/gen_corpus.py
"""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
TESTDATA = os.path.join(HERE, '..', 'src', 'iscsi', 'testdata')
CORPUS = os.path.join(HERE, 'corpus')

ISID = bytes.fromhex('80f28f120000')
ITT = 0x65496ff5


def split(stream):
    out = []
    while len(stream) >= 48:
        bhs = stream[:48]
        ahs = bhs[4] * 4
        dsl = int.from_bytes(bhs[5:8], 'big')
        total = 48 + ahs + ((dsl + 3) & ~3)
        out.append(stream[:total])
        stream = stream[total:]
    return out


def bhs(op, flags, dsl=0, lun=0, itt=0xffffffff, rest=b''):
    b = bytearray(48)
    b[0] = op
    b[1] = flags
    b[5:8] = dsl.to_bytes(3, 'big')
    b[8:16] = lun.to_bytes(8, 'big')
    b[16:20] = itt.to_bytes(4, 'big')
    b[20:20 + len(rest)] = rest
    return bytes(b)


def seq(stat=1, exp=2, mx=33):
    return struct.pack('>III', stat, exp, mx)


def pad(data):
    return data + b'\0' * ((4 - len(data) % 4) % 4)


def login_rsp(transit, csg, nsg, text, stat, tsih=0, cls=0, det=0):
    flags = (0x80 if transit else 0) | (csg << 2) | (nsg if transit else 0)
    b = bytearray(48)
    b[0] = 0x23
    b[1] = flags
    b[5:8] = len(text).to_bytes(3, 'big')
    b[8:14] = ISID
    b[14:16] = tsih.to_bytes(2, 'big')
    b[16:20] = ITT.to_bytes(4, 'big')
    b[24:36] = seq(stat, 1, 1)
    b[36] = cls
    b[37] = det
    return bytes(b) + pad(text)


def write(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), 'wb') as f:
        f.write(data)


def main():
    caps = {}
    for f in sorted(os.listdir(TESTDATA)):
        caps[f] = open(os.path.join(TESTDATA, f), 'rb').read()
    for f, stream in caps.items():
        for i, pdu in enumerate(split(stream)):
            write('pdu_decode', '%s-%02d' % (f, i), pdu)
            dsl = int.from_bytes(pdu[5:8], 'big')
            if pdu[0] & 0x3f in (0x03, 0x04, 0x23, 0x24) and dsl:
                write('text_decode', '%s-%02d' % (f, i), pdu[48:48 + dsl])
    synth = {
        'r2t': bhs(0x31, 0x80, lun=1 << 48, itt=5,
                   rest=struct.pack('>I', 0x10) + seq() + struct.pack('>III', 0, 4096, 65536)),
        'nop-in-ping': bhs(0x20, 0x80, rest=struct.pack('>I', 0x42) + seq()),
        'tmf-rsp': bhs(0x22, 0x80, itt=9, rest=b'\0' * 4 + seq()),
        'reject': bhs(0x3f, 0x80, dsl=48, rest=b'\0' * 4 + seq()),
        'async-logout': bhs(0x32, 0x80, rest=b'\0' * 4 + seq() + bytes([1, 0, 0, 5])),
    }
    synth['tmf-rsp'] = bytearray(synth['tmf-rsp'])
    synth['reject'] = bytearray(synth['reject'])
    synth['reject'][2] = 0x04
    for k, v in synth.items():
        write('pdu_decode', 'synth-' + k, bytes(v))
    write('text_decode', 'sendtargets-v6',
          b'TargetName=iqn.2024-01.test:a\0TargetAddress=[fd00::1]:3260,1\0TargetAddress=10.0.0.1,2\0')
    write('text_decode', 'chap', b'CHAP_A=7\0CHAP_I=0x05\0CHAP_C=0b3q2+7w==\0')

    # login_responses: first byte picks the configuration (see the target).
    chap = split(caps['tgtd_chap.t2i'])[:4]
    write('login_responses', 'tgtd-mutual-chap', bytes([2]) + b''.join(chap))
    # One-way CHAP: the same exchange without the target's CHAP_N/CHAP_R.
    one_way = chap[:2] + [login_rsp(True, 0, 1, b'', 2)] + [chap[3]]
    write('login_responses', 'one-way-chap', bytes([1]) + b''.join(one_way))
    op_text = split(caps['tgtd_plain.t2i'])[0]
    op_text = op_text[48:48 + int.from_bytes(op_text[5:8], 'big')]
    for kind, name in ((0, 'no-auth'), (3, 'discovery'), (4, 'iser')):
        text = op_text + (b'RDMAExtensions=Yes\0' if kind == 4 else b'')
        seed = login_rsp(True, 0, 1, b'AuthMethod=None\0TargetPortalGroupTag=1\0', 0) + \
            login_rsp(True, 1, 3, text, 1, tsih=0x100)
        write('login_responses', name, bytes([kind]) + seed)
    write('login_responses', 'redirect', bytes([0]) + login_rsp(
        False, 0, 0, b'TargetAddress=[fd00::2]:3260,1\0', 0, cls=1, det=1))
    write('login_responses', 'auth-failure', bytes([1]) + login_rsp(False, 0, 0, b'', 0, cls=2, det=1))

    # iser_message: received RDMA Sends (28-byte iSER header + the real tgtd
    # PDUs above), Hello/HelloReply, and RDMA CM private data as ib_isert and
    # tgtd send it (4-byte iSER CM header, zero-padded by the CM).
    iser_ctrl = bytes([0x10]) + bytes(27)
    iser_rsv = bytes([0x14, 0, 0, 0]) + bytes(4) + bytes(8) + \
        (0x1234).to_bytes(4, 'big') + (0x7f0000001000).to_bytes(8, 'big')
    for i, pdu in enumerate(split(caps['tgtd_plain.t2i'])[:4]):
        write('iser_message', 'tgtd-%02d' % i, iser_ctrl + pdu)
    write('iser_message', 'scsi-rsp-rsv', iser_rsv + bhs(0x21, 0x80, itt=7, rest=seq()))
    write('iser_message', 'hello', bytes([0x20, 0x11, 0x00, 0x10]) + bytes(8))
    write('iser_message', 'hello-reply', bytes([0x30, 0x11, 0x00, 0x10]) + bytes(8))
    write('iser_message', 'hello-reply-reject', bytes([0x31, 0x21, 0x00, 0x00]) + bytes(8))
    write('iser_message', 'cm-isert', bytes([0x80, 0, 0, 0]) + bytes(52))
    write('iser_message', 'cm-linux-initiator', bytes([0xc0, 0, 0, 0]))

    # tcp_stream: byte 0 = digests (bit 0) and piece sizes, then what a target
    # sends: Data-In for the four reads in flight (ITT 1-4: 4096, 512, 1000
    # and 8192 bytes) in and out of order, split, and mixed with responses.
    def data_in(itt, data, off=0, final=True, digests=False):
        rest = (0xffffffff).to_bytes(4, 'big') + seq() + (0).to_bytes(4, 'big') + \
            off.to_bytes(4, 'big')
        h = bhs(0x25, 0x81 if final else 0x00, len(data), itt=itt, rest=rest)
        return frame(h, data, digests)

    def frame(h, data, digests):
        out = h + (crc32c(h).to_bytes(4, 'little') if digests else b'')
        if data:
            out += pad(data) + (crc32c(pad(data)).to_bytes(4, 'little') if digests else b'')
        return out

    lens = {1: 4096, 2: 512, 3: 1000, 4: 8192}
    fill = {i: bytes((i * 7 + j) & 0xff for j in range(n)) for i, n in lens.items()}
    for digests in (False, True):
        tag = '-digests' if digests else ''
        flag = bytes([0x11 if digests else 0x10])
        write('tcp_stream', 'in-order' + tag,
              flag + b''.join(data_in(i, fill[i], digests=digests) for i in (1, 2, 3, 4)))
        write('tcp_stream', 'out-of-order' + tag,
              flag + b''.join(data_in(i, fill[i], digests=digests) for i in (3, 1, 4, 2)))
        mixed = data_in(1, fill[1][:2048], final=False, digests=digests) + \
            frame(bhs(0x20, 0x80, itt=0xffffffff, rest=(0x1234).to_bytes(4, 'big') + seq()), b'', digests) + \
            data_in(1, fill[1][2048:], off=2048, digests=digests) + \
            frame(bhs(0x21, 0x80, 18, itt=2, rest=bytes(4) + seq()), bytes([0, 16, 0x70]) + bytes(15), digests) + \
            data_in(3, fill[3], digests=digests)
        write('tcp_stream', 'mixed' + tag, flag + mixed)


def crc32c(data):
    crc = 0xffffffff
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82f63b78 if crc & 1 else 0)
    return crc ^ 0xffffffff


if __name__ == '__main__':
    main()
