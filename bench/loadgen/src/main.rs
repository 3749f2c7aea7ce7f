//! vhost-iser-loadgen: drives a vhost-user-blk backend directly through libblkio (no VM, no
//! guest kernel) so that the cost measured is the backend's, not a TCG guest's.
//!
//! One client thread per virtqueue keeps `--iodepth` requests in flight and records the latency
//! of each in an HDR histogram. See bench/README.md for the method.

mod job;
mod pattern;
mod stats;

use anyhow::{bail, Context, Result};
use blkio::Blkio;
use clap::Parser;
use job::{Accept, Phase, QueueCtx, QueueResult, Rw, Stop, Verify};
use std::sync::{Arc, Barrier};
use std::time::Duration;

/// libblkio driver for a vhost-user-blk socket.
const DRIVER: &str = "virtio-blk-vhost-user";

/// Descriptors one virtio-blk request takes in libblkio 0.5 (header, data, status; it uses no
/// indirect descriptors), which bounds the requests a ring of a given size can hold.
const DESCS_PER_REQUEST: usize = 3;

/// vhost-user-blk load generator.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// vhost-user-blk socket of the backend.
    #[arg(long)]
    socket: String,
    /// Virtqueues to use, one client thread each.
    #[arg(long, default_value_t = 1)]
    queues: usize,
    /// Requests in flight per queue.
    #[arg(long, default_value_t = 1)]
    iodepth: usize,
    /// Access pattern.
    #[arg(long, value_enum, default_value_t = Rw::Randread)]
    rw: Rw,
    /// Bytes per I/O (suffixes k, m, g = powers of 1024).
    #[arg(long, default_value = "4k", value_parser = parse_size)]
    bs: u64,
    /// Bytes of the device to use, from offset 0 (default: the whole device).
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Seconds to run (default 10 unless --ios is given).
    #[arg(long, conflicts_with = "ios")]
    runtime: Option<f64>,
    /// Total I/Os to do, spread evenly over the queues.
    #[arg(long)]
    ios: Option<u64>,
    /// Percentage of reads for --rw randrw.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u8).range(0..=100))]
    rwmixread: u8,
    /// Write a known pattern over the range first, check every read during the run, and read
    /// everything back at the end if the run wrote.
    #[arg(long)]
    verify: bool,
    /// Seed for offsets and patterns (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// Busy-poll for completions (libblkio poll queues) instead of sleeping on the completion
    /// eventfd. Polling burns a client core per queue; see README before using it.
    #[arg(long)]
    poll: bool,
    /// Virtqueue size (default: enough for --iodepth, at least 256).
    #[arg(long)]
    queue_size: Option<u32>,
    /// Split every request's buffer into N equal pieces that are not adjacent in memory
    /// (readv/writev with N iovecs, a gap of one piece after each), as a guest's scattered
    /// pages are. 1 = one contiguous buffer.
    #[arg(long, default_value_t = 1)]
    scatter: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Do not touch the I/O buffers before the run. Pages the backend then writes first are
    /// mapped only in the backend and show up as its Private memory in /proc/PID/smaps
    /// (used to demonstrate that accounting; see README).
    #[arg(long)]
    no_prefault: bool,
    /// Count the main phase's completions per 10 ms and put that timeline in the report
    /// (`timeline`: wall-clock start, successes and failures per bucket). Fault-injection runs
    /// (bench/faults.sh) measure recovery times from it.
    #[arg(long)]
    timeline: bool,
    /// Create this file when the main phase starts (after the --verify precondition pass), so a
    /// script can start injecting faults then.
    #[arg(long, value_name = "PATH")]
    ready_file: Option<std::path::PathBuf>,
    /// End the main phase (like --runtime) once this file exists; looked for every 50 ms.
    #[arg(long, value_name = "PATH")]
    stop_file: Option<std::path::PathBuf>,
    /// With --verify: after the read-back, also check the target's backing file itself (PATH,
    /// readable by this process, offset 0 = device offset 0) block by block against what the
    /// client wrote.
    #[arg(long, value_name = "PATH", requires = "verify")]
    check_file: Option<std::path::PathBuf>,
}

/// Parses "4096", "4k", "1M", "2g" (powers of 1024).
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let mult: u64 = match c.to_ascii_lowercase() {
                'k' => 1 << 10,
                'm' => 1 << 20,
                'g' => 1 << 30,
                't' => 1 << 40,
                _ => return Err(format!("unknown size suffix '{c}' (use k, m, g or t)")),
            };
            (s.get(..i).unwrap_or(""), mult)
        }
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size in bytes"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("'{s}' is too large"))
}

/// The iovecs of every slot when requests are scattered: slot `s`, piece `k` starts at
/// `buf + 2 * (s * bs + k * piece)` (each piece followed by a gap of its own size).
/// Empty when `scatter` is 1.
fn scattered_iovecs(buf: *mut u8, bs: usize, depth: usize, scatter: usize) -> Vec<libc::iovec> {
    if scatter <= 1 {
        return Vec::new();
    }
    let piece = bs / scatter;
    (0..depth)
        .flat_map(|s| {
            (0..scatter).map(move |k| libc::iovec {
                iov_base: buf.wrapping_add(2 * (s * bs + k * piece)).cast(),
                iov_len: piece,
            })
        })
        .collect()
}

/// Queue size big enough for `iodepth` requests of `DESCS_PER_REQUEST` descriptors each.
fn default_queue_size(iodepth: usize) -> u32 {
    let need = iodepth
        .saturating_mul(DESCS_PER_REQUEST)
        .next_power_of_two();
    u32::try_from(need.max(256)).unwrap_or(32768).min(32768)
}

fn round_up(n: usize, align: usize) -> Option<usize> {
    let align = align.max(1);
    n.checked_add(align - 1).map(|v| v / align * align)
}

/// CPU seconds (user + system) this process has used so far.
fn process_cpu_seconds() -> f64 {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a complete rusage into the pointer we give it; RUSAGE_SELF is
    // always valid, and on failure we ignore the zeroed contents.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr()) };
    if rc != 0 {
        return 0.0;
    }
    // SAFETY: getrusage returned 0, so it initialised the structure.
    let ru = unsafe { ru.assume_init() };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Runs one phase on all queues at once and merges their results.
fn run_phase(queues: &mut [QueueCtx], phase: &Phase) -> Result<QueueResult> {
    let nq = queues.len();
    let barrier = Barrier::new(nq);
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = queues
            .iter_mut()
            .enumerate()
            .map(|(i, ctx)| {
                let barrier = &barrier;
                s.spawn(move || job::run_queue(ctx, i, nq, phase, barrier))
            })
            .collect();
        handles.into_iter().map(|h| h.join()).collect()
    });
    let mut total: Option<QueueResult> = None;
    for r in results {
        let r = match r {
            Ok(r) => r?,
            Err(_) => bail!("A client queue thread panicked"),
        };
        match total.as_mut() {
            Some(t) => t.merge(r),
            None => total = Some(r),
        }
    }
    total.context("No queues were run")
}

/// What the tool prints.
#[derive(serde::Serialize)]
struct Report {
    socket: String,
    rw: Rw,
    bs: u64,
    size: u64,
    queues: usize,
    iodepth: usize,
    queue_size: u32,
    completion: &'static str,
    device_capacity: u64,
    device_max_queues: i32,
    runtime_s: f64,
    ios: u64,
    reads: u64,
    writes: u64,
    errors: u64,
    first_error: Option<String>,
    iops: f64,
    mib_s: f64,
    lat_us: stats::LatencySummary,
    client_cpu_s: f64,
    verify: Option<VerifyReport>,
    timeline: Option<Timeline>,
}

/// Completions of the main phase per time bucket.
#[derive(serde::Serialize)]
struct Timeline {
    /// Wall-clock time (Unix seconds) of bucket 0's start.
    start_unix: f64,
    /// Bucket width in milliseconds.
    bucket_ms: u64,
    /// Successful completions per bucket.
    ok: Vec<u32>,
    /// Failed completions per bucket.
    err: Vec<u32>,
    /// Successful completions per bucket of each queue.
    ok_by_queue: Vec<Vec<u32>>,
}

#[derive(serde::Serialize)]
struct VerifyReport {
    seed_precondition: u64,
    seed_writes: u64,
    precondition_ios: u64,
    precondition_errors: u64,
    readback_ios: u64,
    readback_errors: u64,
    reads_checked: u64,
    mismatches: u64,
    first_mismatches: Vec<job::Mismatch>,
    /// The backing file check (--check-file).
    file: Option<FileCheck>,
}

/// What the target's backing file held, block by block.
#[derive(serde::Serialize)]
struct FileCheck {
    path: String,
    blocks_checked: u64,
    mismatches: u64,
    first_mismatches: Vec<job::Mismatch>,
}

/// Checks `nblocks` blocks of `bs` bytes of `path` against the pattern expected after the run:
/// `new` where the bitmap says a write completed, `old` elsewhere.
fn check_file(
    path: &std::path::Path,
    bs: usize,
    nblocks: u64,
    written: &[u64],
    new: u64,
    old: u64,
) -> Result<FileCheck> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path)
        .with_context(|| format!("Cannot open the backing file {}", path.display()))?;
    let mut buf = vec![0u8; bs];
    let mut fc = FileCheck {
        path: path.display().to_string(),
        blocks_checked: 0,
        mismatches: 0,
        first_mismatches: Vec::new(),
    };
    for block in 0..nblocks {
        f.read_exact_at(&mut buf, block * bs as u64)
            .with_context(|| format!("Cannot read block {block} of {}", path.display()))?;
        let w = usize::try_from(block / 64)
            .ok()
            .and_then(|i| written.get(i))
            .is_some_and(|w| w & (1 << (block % 64)) != 0);
        fc.blocks_checked += 1;
        if let Err(found) = pattern::check(&buf, block, &[if w { new } else { old }]) {
            fc.mismatches += 1;
            if fc.first_mismatches.len() < 8 {
                fc.first_mismatches.push(job::Mismatch {
                    offset: block * bs as u64,
                    found,
                });
            }
        }
    }
    Ok(fc)
}

fn main() {
    match run() {
        Ok(ok) => std::process::exit(if ok { 0 } else { 1 }),
        Err(e) => {
            eprintln!("vhost-iser-loadgen: {e:#}");
            std::process::exit(2);
        }
    }
}

/// Returns Ok(false) when the run completed but found errors or mismatches.
fn run() -> Result<bool> {
    let a = Args::parse();
    if a.queues == 0 || a.iodepth == 0 {
        bail!("--queues and --iodepth must be at least 1");
    }
    let bs = usize::try_from(a.bs).context("--bs does not fit in memory")?;
    if bs == 0 {
        bail!("--bs must be at least 1");
    }
    if a.verify && bs < pattern::MIN_BLOCK {
        bail!(
            "--verify needs --bs of at least {} bytes",
            pattern::MIN_BLOCK
        );
    }
    let queue_size = a.queue_size.unwrap_or(default_queue_size(a.iodepth));
    if (queue_size as usize) < a.iodepth.saturating_mul(DESCS_PER_REQUEST) {
        eprintln!(
            "vhost-iser-loadgen: warning: --queue-size {queue_size} holds only {} requests; \
             the rest wait in libblkio's backlog",
            queue_size as usize / DESCS_PER_REQUEST
        );
    }

    let mut b = Blkio::new(DRIVER).context("Cannot create libblkio instance")?;
    b.set_str("path", &a.socket)
        .context("Cannot set socket path")?;
    b.connect()
        .with_context(|| format!("Cannot connect to vhost-user-blk socket {}", a.socket))?;
    let capacity = b.get_u64("capacity").context("Cannot read capacity")?;
    let max_queues = b.get_i32("max-queues").context("Cannot read max-queues")?;
    let req_align = b
        .get_i32("request-alignment")
        .context("Cannot read request-alignment")?;
    let mem_align = b
        .get_u64("mem-region-alignment")
        .context("Cannot read mem-region-alignment")?;

    let req_align = u64::try_from(req_align.max(1)).unwrap_or(512);
    if a.bs % req_align != 0 {
        bail!(
            "--bs {} is not a multiple of the device's block size {req_align}",
            a.bs
        );
    }
    let size = a.size.unwrap_or(capacity);
    if size > capacity {
        bail!("--size {size} is larger than the device ({capacity} bytes)");
    }
    let nblocks = size / a.bs;
    if nblocks < a.queues as u64 {
        bail!(
            "--size {size} holds {nblocks} blocks of {} bytes: need at least one per queue",
            a.bs
        );
    }
    let nq = i32::try_from(a.queues).context("--queues is too large")?;
    if nq > max_queues {
        bail!("--queues {nq}: the backend offers only {max_queues} queue(s)");
    }

    let (nqueues, npoll) = if a.poll { (0, nq) } else { (nq, 0) };
    b.set_i32("num-queues", nqueues)
        .context("Cannot set num-queues")?;
    b.set_i32("num-poll-queues", npoll)
        .context("Cannot set num-poll-queues")?;
    b.set_i32(
        "queue-size",
        i32::try_from(queue_size).context("--queue-size is too large")?,
    )
    .context("Cannot set queue-size")?;
    let started = b
        .start()
        .context("Cannot start the device (the backend refused the queue setup)")?;
    let blkioqs = if a.poll {
        started.poll_queues
    } else {
        started.queues
    };

    // The page size is the least alignment that makes regions mmap-able by the backend.
    let page = 4096usize;
    let align = usize::try_from(mem_align).unwrap_or(page).max(page);
    if a.scatter == 0 || !bs.is_multiple_of(a.scatter) || !(bs / a.scatter).is_multiple_of(512) {
        bail!(
            "--scatter {} must divide --bs {bs} into pieces of a multiple of 512 bytes",
            a.scatter
        );
    }
    if a.scatter > 1 && a.verify {
        bail!("--scatter and --verify cannot be combined");
    }
    // Scattered buffers leave a gap as large as each piece after it.
    let spread = if a.scatter > 1 { 2 } else { 1 };
    let buf_len = bs
        .checked_mul(a.iodepth)
        .and_then(|n| n.checked_mul(spread))
        .and_then(|n| round_up(n, align))
        .context("--bs x --iodepth is too large")?;
    let mut queues = Vec::with_capacity(blkioqs.len());
    for q in blkioqs {
        let region = b
            .alloc_mem_region(buf_len)
            .context("Cannot allocate I/O buffer memory")?;
        b.map_mem_region(&region)
            .context("Cannot register I/O buffer memory with the backend")?;
        let buf = region.addr as *mut u8;
        // Touching every page now makes them resident in this process too, so in the backend's
        // /proc/PID/smaps they count as Shared, not as the backend's private memory.
        if !a.no_prefault {
            // SAFETY: the region is a fresh read-write mapping of `buf_len` bytes owned by `b`.
            unsafe { std::ptr::write_bytes(buf, 0, buf_len) };
        }
        let iovecs = scattered_iovecs(buf, bs, a.iodepth, a.scatter);
        queues.push(QueueCtx {
            q,
            buf,
            buf_len,
            iovecs,
            scatter: a.scatter,
        });
    }

    let seed = a.seed.unwrap_or_else(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        (t.as_nanos() as u64) ^ u64::from(std::process::id()).rotate_left(32)
    });
    let seed_pre = pattern_seed(seed, 1);
    let seed_wr = pattern_seed(seed, 2);
    let stop = match (a.ios, a.runtime) {
        (Some(n), _) => Stop::Ios(n),
        (None, Some(t)) if t.is_finite() && t > 0.0 => Stop::Runtime(Duration::from_secs_f64(t)),
        (None, Some(_)) => bail!("--runtime must be a positive number of seconds"),
        (None, None) => Stop::Runtime(Duration::from_secs(10)),
    };
    let base = Phase {
        rw: a.rw,
        bs,
        nblocks,
        iodepth: a.iodepth,
        rwmixread: a.rwmixread,
        stop,
        verify: None,
        rng_seed: seed,
        timeline: None,
        stop_file: None,
    };

    let mut verify_report = None;
    if a.verify {
        let pre = Phase {
            rw: Rw::Write,
            stop: Stop::OnePass,
            verify: Some(Verify {
                fill_seed: seed_pre,
                accept: Accept::Seeds(vec![seed_pre]),
            }),
            ..base.clone()
        };
        let r = run_phase(&mut queues, &pre).context("Precondition (pattern write) failed")?;
        verify_report = Some(VerifyReport {
            seed_precondition: seed_pre,
            seed_writes: seed_wr,
            precondition_ios: r.ios,
            precondition_errors: r.errors,
            readback_ios: 0,
            readback_errors: 0,
            reads_checked: 0,
            mismatches: 0,
            first_mismatches: Vec::new(),
            file: None,
        });
        if r.errors > 0 {
            eprintln!(
                "vhost-iser-loadgen: {} precondition writes failed; first: {}",
                r.errors,
                r.first_error.as_deref().unwrap_or("?")
            );
        }
    }

    let main_phase = Phase {
        verify: a.verify.then(|| Verify {
            fill_seed: seed_wr,
            accept: Accept::Seeds(if a.rw.has_writes() {
                vec![seed_pre, seed_wr]
            } else {
                vec![seed_pre]
            }),
        }),
        timeline: a.timeline.then(std::time::Instant::now),
        stop_file: a.stop_file.clone(),
        ..base.clone()
    };
    let start_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    if let Some(p) = &a.ready_file {
        std::fs::write(p, format!("{start_unix:.6}\n"))
            .with_context(|| format!("Cannot create --ready-file {}", p.display()))?;
    }
    let cpu0 = process_cpu_seconds();
    let res = run_phase(&mut queues, &main_phase).context("Benchmark run failed")?;
    let client_cpu_s = process_cpu_seconds() - cpu0;

    if let Some(v) = verify_report.as_mut() {
        v.reads_checked += res.verified;
        v.mismatches += res.mismatches;
        v.first_mismatches
            .extend(res.mismatch_details.iter().cloned());
        if a.rw.has_writes() {
            let back = Phase {
                rw: Rw::Read,
                stop: Stop::OnePass,
                verify: Some(Verify {
                    fill_seed: seed_wr,
                    accept: Accept::ByBitmap {
                        written: Arc::new(res.written.clone()),
                        new: seed_wr,
                        old: seed_pre,
                    },
                }),
                ..base.clone()
            };
            let r = run_phase(&mut queues, &back).context("Read-back verification failed")?;
            v.readback_ios = r.ios;
            v.readback_errors = r.errors;
            v.reads_checked += r.verified;
            v.mismatches += r.mismatches;
            v.first_mismatches.extend(r.mismatch_details);
        }
        v.first_mismatches.truncate(8);
        if let Some(path) = &a.check_file {
            let (written, new) = if a.rw.has_writes() {
                (res.written.as_slice(), seed_wr)
            } else {
                (&[][..], seed_pre)
            };
            v.file = Some(check_file(path, bs, nblocks, written, new, seed_pre)?);
        }
    }
    let timeline = main_phase.timeline.map(|_| Timeline {
        start_unix,
        bucket_ms: job::TIMELINE_BUCKET.as_millis() as u64,
        ok: res.timeline_ok.clone(),
        err: res.timeline_err.clone(),
        ok_by_queue: res.timeline_queues.clone(),
    });

    let secs = res.elapsed.as_secs_f64().max(1e-9);
    let report = Report {
        socket: a.socket.clone(),
        rw: a.rw,
        bs: a.bs,
        size: nblocks * a.bs,
        queues: a.queues,
        iodepth: a.iodepth,
        queue_size,
        completion: if a.poll { "poll" } else { "interrupt" },
        device_capacity: capacity,
        device_max_queues: max_queues,
        runtime_s: secs,
        ios: res.ios,
        reads: res.reads,
        writes: res.writes,
        errors: res.errors,
        first_error: res.first_error.clone(),
        iops: res.ios as f64 / secs,
        mib_s: res.ios as f64 * a.bs as f64 / secs / (1024.0 * 1024.0),
        lat_us: res.hist.summary_us(),
        client_cpu_s,
        verify: verify_report,
        timeline,
    };
    let ok = report.errors == 0
        && report.verify.as_ref().is_none_or(|v| {
            v.mismatches == 0
                && v.precondition_errors == 0
                && v.readback_errors == 0
                && v.file.as_ref().is_none_or(|f| f.mismatches == 0)
        });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_text(&report);
    }
    drop(queues);
    drop(b);
    Ok(ok)
}

/// Distinct, never-equal pattern seeds derived from the run seed.
fn pattern_seed(seed: u64, n: u64) -> u64 {
    seed.rotate_left(17) ^ n.wrapping_mul(0xa076_1d64_78bd_642f)
}

fn print_text(r: &Report) {
    println!(
        "{:?} bs={} size={} queues={} iodepth={} ({} completion, queue-size {})",
        r.rw, r.bs, r.size, r.queues, r.iodepth, r.completion, r.queue_size
    );
    println!(
        "  {:.0} IOPS, {:.1} MiB/s, {} I/Os in {:.2} s ({} reads, {} writes), {} errors",
        r.iops, r.mib_s, r.ios, r.runtime_s, r.reads, r.writes, r.errors
    );
    let l = &r.lat_us;
    println!(
        "  latency us: p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}  mean {:.1}",
        l.p50, l.p90, l.p99, l.p99_9, l.max, l.mean
    );
    println!("  client CPU {:.2} s", r.client_cpu_s);
    if let Some(e) = &r.first_error {
        println!("  first error: {e}");
    }
    if let Some(v) = &r.verify {
        println!(
            "  verify: {} reads checked, {} mismatches (precondition {} writes, read-back {} reads)",
            v.reads_checked, v.mismatches, v.precondition_ios, v.readback_ios
        );
        for m in &v.first_mismatches {
            println!("    offset {}: {:?}", m.offset, m.found);
        }
        if let Some(f) = &v.file {
            println!(
                "  backing file {}: {} blocks checked, {} mismatches",
                f.path, f.blocks_checked, f.mismatches
            );
            for m in &f.first_mismatches {
                println!("    offset {}: {:?}", m.offset, m.found);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert!(parse_size("4x").is_err());
        assert!(parse_size("k").is_err());
        assert!(parse_size("99999999999999t").is_err());
    }

    #[test]
    fn queue_size_holds_iodepth() {
        assert_eq!(default_queue_size(1), 256);
        assert_eq!(default_queue_size(128), 512);
        assert_eq!(default_queue_size(1_000_000), 32768);
    }

    #[test]
    fn seeds_differ() {
        assert_ne!(pattern_seed(0, 1), pattern_seed(0, 2));
        assert_ne!(pattern_seed(5, 1), pattern_seed(6, 1));
    }

    #[test]
    fn cli_rejects_runtime_with_ios() {
        let r = Args::try_parse_from(["x", "--socket", "s", "--runtime", "1", "--ios", "5"]);
        assert!(r.is_err());
        let r = Args::try_parse_from(["x", "--socket", "s", "--rwmixread", "101"]);
        assert!(r.is_err());
    }
}
