#!/usr/bin/env python3
"""Summarises bench/guest-fio.sh runs.

    guest_fio_report.py RUNS_DIR[:RUNS_DIR...] OUT_PREFIX META_JSON

RUNS_DIR/<rep>-<backend>/ holds out/g/<job>.json (fio, group_reporting), out/g/<job>.start
and .end (guest /sys/block/vda/stat), cpu.json (bench/lib/cpu_markers.py), guest.rc.
Writes OUT_PREFIX.json (every run) and OUT_PREFIX.md (medians per backend and job, ratios
vhost-iser / qsd, method and caveats).
"""
import json
import os
import statistics
import sys

BACKENDS = ("vhost-iser", "qsd")
JOB_DIR = {"randread": "read", "randwrite": "write", "seqread": "read"}
JOB_DESC = {"randread": "4 KiB random read", "randwrite": "4 KiB random write",
            "seqread": "128 KiB sequential read"}


def diskstat_ios(path):
    with open(path) as f:
        v = [int(x) for x in f.readline().split()]
    return v[0] + v[4]   # reads completed + writes completed


def guest_irqs(path):
    """virtio-blk interrupts recorded in a marker file (line "irq N"), or None."""
    with open(path) as f:
        for line in f:
            if line.startswith("irq "):
                return int(line.split()[1])
    return None


def one_job(run, job, cpu):
    g = os.path.join(run, "out", "g")
    fj = os.path.join(g, job + ".json")
    if not os.path.exists(fj):
        return None
    with open(fj) as f:
        txt = f.read()
    # fio may print warnings before the JSON object
    fio = json.loads(txt[txt.index("{"):])
    j = fio["jobs"][0]
    d = j[JOB_DIR[job]]
    pct = d.get("clat_ns", {}).get("percentile", {})
    r = {"iops": d["iops"], "mib_s": d["bw_bytes"] / 2**20, "io_count_fio": d["total_ios"],
         "lat_mean_us": d["lat_ns"]["mean"] / 1e3,
         "clat_p50_us": pct.get("50.000000", 0) / 1e3, "clat_p99_us": pct.get("99.000000", 0) / 1e3,
         "errors": j.get("error", 0),
         "guest_cpu_usr_pct": j.get("usr_cpu"), "guest_cpu_sys_pct": j.get("sys_cpu")}
    ms, me = cpu["markers"].get(job + ".start"), cpu["markers"].get(job + ".end")
    try:
        ios = diskstat_ios(os.path.join(g, job + ".end")) - diskstat_ios(os.path.join(g, job + ".start"))
    except (OSError, ValueError, IndexError):
        ios = None
    r["io_count_device"] = ios
    try:
        i0, i1 = guest_irqs(os.path.join(g, job + ".start")), guest_irqs(os.path.join(g, job + ".end"))
        if i0 is not None and i1 is not None and ios:
            r["guest_irqs_per_io"] = (i1 - i0) / ios
    except (OSError, ValueError):
        pass
    if ms and me and ios:
        r["window_s"] = me["t"] - ms["t"]
        r["host_loadavg_start"] = ms["loadavg"]
        r["host_loadavg_end"] = me["loadavg"]
        for who in ("backend", "tgtd"):
            a, b = ms["cpu"].get(who), me["cpu"].get(who)
            if a is not None and b is not None:
                r[f"{who}_cpu_s"] = b - a
                r[f"{who}_cpu_s_per_mio"] = (b - a) / ios * 1e6
            a, b = ms.get("cs", {}).get(who), me.get("cs", {}).get(who)
            if a is not None and b is not None:
                r[f"{who}_ctxsw_per_io"] = (b - a) / ios
    return r


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, nd=0):
    return "—" if x is None else f"{x:,.{nd}f}"


def main():
    runs_dir, outp, meta = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    runs = []
    # several sessions' RUNS_DIRs may be joined with ':'; their repetitions are renumbered
    entries, off = [], 0
    for d in runs_dir.split(":"):
        names = os.listdir(d)
        reps = sorted({int(n.split("-", 1)[0]) for n in names})
        for n in sorted(names, key=lambda n: (int(n.split("-", 1)[0]), n)):
            rep, backend = n.split("-", 1)
            entries.append((off + reps.index(int(rep)) + 1, backend, os.path.join(d, n)))
        off += len(reps)
    meta["reps"] = off
    meta["sessions"] = len(runs_dir.split(":"))
    for rep, backend, run in entries:
        try:
            with open(os.path.join(run, "cpu.json")) as f:
                cpu = json.load(f)
        except (OSError, ValueError):
            cpu = {"markers": {}}
        try:
            rc = int(open(os.path.join(run, "guest.rc")).read())
        except (OSError, ValueError):
            rc = None
        jobs = {}
        for job in JOB_DIR:
            r = one_job(run, job, cpu)
            if r:
                jobs[job] = r
        runs.append({"rep": rep, "backend": backend, "guest_rc": rc, "jobs": jobs})
    jobs_seen = [j for j in JOB_DIR if any(j in r["jobs"] for r in runs)]
    summary = {}
    keys = ("iops", "mib_s", "lat_mean_us", "clat_p50_us", "clat_p99_us",
            "backend_cpu_s_per_mio", "tgtd_cpu_s_per_mio", "backend_ctxsw_per_io",
            "tgtd_ctxsw_per_io", "guest_irqs_per_io")
    for job in jobs_seen:
        summary[job] = {}
        for b in BACKENDS:
            rs = [r["jobs"][job] for r in runs if r["backend"] == b and job in r["jobs"]
                  and r["guest_rc"] == 0 and not r["jobs"][job]["errors"]]
            summary[job][b] = {k: med([x.get(k) for x in rs]) for k in keys}
            summary[job][b]["n"] = len(rs)
            summary[job][b]["iops_all"] = [round(x["iops"]) for x in rs]
        v, q = summary[job]["vhost-iser"], summary[job]["qsd"]
        summary[job]["ratio_vhost_iser_over_qsd"] = {
            k: (v[k] / q[k] if v[k] and q[k] else None) for k in keys}
        # the same ratio taken within each repetition (the two runs of a pair ran back to
        # back, under similar host load), then the median over repetitions
        by = {(r["rep"], r["backend"]): r["jobs"].get(job) for r in runs if r["guest_rc"] == 0}
        pairs = [by[(k, "vhost-iser")]["iops"] / by[(k, "qsd")]["iops"]
                 for k in sorted({r["rep"] for r in runs})
                 if by.get((k, "vhost-iser")) and by.get((k, "qsd")) and by[(k, "qsd")]["iops"]]
        summary[job]["paired_iops_ratios"] = [round(x, 3) for x in pairs]
        summary[job]["paired_iops_ratio_median"] = med(pairs)
    loads = [l for r in runs for j in r["jobs"].values()
             for l in (j.get("host_loadavg_start", [None])[0], j.get("host_loadavg_end", [None])[0])
             if l is not None]
    meta["host_loadavg_1min_range"] = [min(loads), max(loads)] if loads else None
    with open(outp + ".json", "w") as f:
        json.dump({"meta": meta, "summary": summary, "runs": runs}, f, indent=1)

    L = []
    L.append("# Guest fio: vhost-iser vs qemu-storage-daemon (libiscsi), same tgtd LUN\n")
    L.append(f"Generated by `bench/guest-fio.sh` on {meta['date']} (git {meta['git']}); "
             f"{meta['reps']} repetitions per backend"
             f"{' in ' + str(meta['sessions']) + ' sessions' if meta['sessions'] > 1 else ''}, alternating, medians shown; "
             f"{meta['runtime_s']} s per job after a 2 s ramp; guest 2 vCPUs (TCG), "
             f"{meta['queues']} virtqueues. Raw data: `guest-fio.json`.\n")
    L.append("| job | backend | IOPS | MiB/s | mean lat µs | p50 µs | p99 µs | backend CPU s / 1M I/O | tgtd CPU s / 1M I/O | backend ctx switches / I/O | guest virtio-blk IRQs / I/O | runs (IOPS each) |")
    L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for job in jobs_seen:
        for b in BACKENDS:
            s = summary[job][b]
            L.append(f"| {JOB_DESC[job]} | {b} | {fmt(s['iops'])} | {fmt(s['mib_s'], 1)} | "
                     f"{fmt(s['lat_mean_us'])} | {fmt(s['clat_p50_us'])} | {fmt(s['clat_p99_us'])} | "
                     f"{fmt(s['backend_cpu_s_per_mio'], 1)} | {fmt(s['tgtd_cpu_s_per_mio'], 1)} | "
                     f"{fmt(s['backend_ctxsw_per_io'], 2)} | "
                     f"{fmt(s['guest_irqs_per_io'], 2)} | {s['n']} ({', '.join(str(x) for x in s['iops_all'])}) |")
    L.append("\nRatios vhost-iser / qsd (IOPS: > 1 is better for vhost-iser; latency and CPU: < 1 is better):\n")
    L.append("| job | IOPS (ratio of medians) | IOPS (median of per-repetition ratios) | mean latency | p99 latency | backend CPU per I/O | tgtd CPU per I/O | guest IRQs per I/O |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    for job in jobs_seen:
        r = summary[job]["ratio_vhost_iser_over_qsd"]
        L.append(f"| {JOB_DESC[job]} | {fmt(r['iops'], 2)} | "
                 f"{fmt(summary[job]['paired_iops_ratio_median'], 2)} | {fmt(r['lat_mean_us'], 2)} | "
                 f"{fmt(r['clat_p99_us'], 2)} | {fmt(r['backend_cpu_s_per_mio'], 2)} | "
                 f"{fmt(r['tgtd_cpu_s_per_mio'], 2)} | {fmt(r['guest_irqs_per_io'], 2)} |")
    lr = meta["host_loadavg_1min_range"]
    failed = [f"{r['rep']}-{r['backend']} (rc {r['guest_rc']})" for r in runs if r["guest_rc"] != 0]
    L.append(f"""
## Method

* One private `tgtd` ({meta['tgtd']}) on 127.0.0.1 (free port, private control port), one
  1 GiB LUN: a file on `/dev/shm` whose first 256 MiB hold random data (the 4 KiB jobs touch
  only those 256 MiB; the sequential job reads 2 x 256 MiB streams, one per fio job).
* Backends, each started fresh for every guest boot, both with {meta['queues']} queues:
  * **vhost-iser** (release build): `--target iscsi://127.0.0.1:PORT/IQN/1 --queues {meta['queues']}`
    (one iSCSI session per virtqueue, one worker thread per queue);
  * **qsd** ({meta['qemu']}): `--blockdev driver=iscsi,transport=tcp,portal=127.0.0.1:PORT,target=IQN,lun=1,initiator-name=...`
    `--export type=vhost-user-blk,...,num-queues={meta['queues']}` (QEMU's libiscsi driver: one
    iSCSI session, everything in qsd's main loop; no iothread, as configured by default).
* Guest: `qemu/run-guest.sh --queues {meta['queues']} --cpus 2 --mem 512` (TCG), running
  `bench/lib/guest-fio-jobs.sh`: for each job one fio process with `numjobs=2` (pinned one per
  vCPU, `cpus_allowed_policy=split`, so both virtqueues carry I/O), `iodepth=16` each,
  libaio, `direct=1`, `ramp_time=2`, `runtime={meta['runtime_s']}`, `group_reporting`.
  IOPS and latency (completion latency percentiles, total latency mean) come from fio's JSON.
* Backend CPU: utime+stime of the backend process (all threads, `/proc/PID/stat`) read by
  `bench/lib/cpu_markers.py` when the guest creates the job's start and end marker files (9p
  share, polled every 20 ms), divided by the I/Os the guest's block device completed in that
  window (`/sys/block/vda/stat`, ramp included). Same for tgtd, which serves both backends
  (a check that both send it the same work). Context switches: voluntary + involuntary of
  all the backend's threads (`/proc/PID/task/*/status`) in the same window, per I/O. Guest
  IRQs: interrupts of the virtio-blk request queues in the guest's `/proc/interrupts` over the
  same window, per I/O (how well the backend batches completions into one notification).
* Repetitions alternate the backends and flip their order each time; medians over runs whose
  guest exited 0 without fio errors.{(' Failed runs: ' + ', '.join(failed) + '.') if failed else ''}

## Caveats

* **TCG guest**: the guest's virtual CPUs (emulated, on a 2-core host) are the bottleneck,
  not the backends. IOPS and latency show how much each *stack* adds per I/O under that
  limit (and the CPU-per-I/O columns show each backend's own cost), not what either
  backend can reach with a KVM guest. `bench/vhost-layer.sh` measures the vhost layer
  without a guest.
* Shared host: {meta['host_cpus']} cores, other builds and VMs running; host 1-minute load
  average during the jobs: {fmt(lr[0], 1) if lr else '?'} – {fmt(lr[1], 1) if lr else '?'}.
  Backend, tgtd, QEMU and the guest compete for the same 2 cores, so expect run-to-run noise
  of ±10-20 %; the alternating order spreads it over both backends.
* Both stacks reach the target over loopback TCP; tgtd's file backend on `/dev/shm`.
""")
    with open(outp + ".md", "w") as f:
        f.write("\n".join(L))
    print("\n".join(L))


if __name__ == "__main__":
    main()
