//! A real Linux guest (QEMU, vhost-user-blk) sees its disk grow: the fake
//! iSCSI target answers one READ with UNIT ATTENTION 2A/09 and reports twice
//! the blocks from then on; vhost-iser re-reads the capacity and sends a
//! config-change notice on the backend channel, QEMU raises the virtio
//! config interrupt, and the guest's /sys/block/vda/size follows.

mod client;
mod support;

use client::Backend;
use support::fake_target::{FakeTarget, Misbehave};

const MIB: usize = 1 << 20;
/// The block whose READ meets the unit attention: far from the partition
/// table and the end, which the guest reads on its own at boot.
const TRIGGER_LBA: u64 = 20_000;

/// The guest side: the size before, one direct read of the trigger block,
/// then the size until it changes (10 s at most), then a read of the new
/// last block.
const GUEST: &str = r#"
set -u
before=$(cat /sys/block/vda/size)
echo "size-before=$before"
dd if=/dev/vda of=/dev/null bs=512 skip=$TRIGGER count=1 iflag=direct 2>/dev/null || { echo "trigger read failed"; exit 3; }
after=$before
for i in $(seq 100); do
  after=$(cat /sys/block/vda/size)
  [ "$after" != "$before" ] && break
  sleep 0.1
done
echo "size-after=$after"
last=$((after - 1))
dd if=/dev/vda of=/dev/null bs=512 skip=$last count=1 iflag=direct 2>/dev/null && echo "last-block-read=ok"
dmesg | grep -i "capacity change" | tail -n 2
exit 0
"#;

#[test]
fn guest_sees_the_disk_grow() {
    let t = FakeTarget::start(16 * MIB, false);
    t.arm_at(Misbehave::CapacityChanged, TRIGGER_LBA);
    let url = t.url();
    let backend = Backend::start(&["--target", &url]);
    let sock = backend.socket.to_str().expect("utf-8");
    let trigger = format!("TRIGGER={TRIGGER_LBA}");
    let run = support::vm::run_script(
        "run-guest.sh",
        &[
            "--sock",
            sock,
            "--queues",
            "1",
            "--mem",
            "512",
            "--timeout",
            "180",
            "--",
            "env",
            &trigger,
            "sh",
            "-c",
            GUEST,
        ],
    );
    let text = run.text();
    let log = backend.log();
    eprintln!("guest capacity change: wall {:.1}s", run.wall.as_secs_f64());
    for l in text
        .lines()
        .filter(|l| l.contains("size-") || l.contains("capacity change"))
    {
        eprintln!("guest: {l}");
    }
    assert_eq!(
        run.code,
        Some(0),
        "guest failed:\n{text}\n--- vhost-iser ---\n{log}"
    );
    assert!(
        text.contains("size-before=32768"),
        "{text}\n--- vhost-iser ---\n{log}"
    );
    assert!(
        text.contains("size-after=65536"),
        "the guest did not see the new size:\n{text}\n--- vhost-iser ---\n{log}"
    );
    assert!(text.contains("last-block-read=ok"), "{text}");
    assert!(
        log.contains("frontend set up a backend request channel"),
        "{log}"
    );
    assert!(
        log.contains("frontend notified of the config change"),
        "{log}"
    );
}
