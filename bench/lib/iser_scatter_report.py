#!/usr/bin/env python3
"""Renders the raw output of bench/iser-scatter-inner.sh into JSON and markdown.

    iser_scatter_report.py RAW_DIR OUT_PREFIX [key=value]...

RAW_DIR holds what the VM side wrote: per run RW.JOB.qdD.json (loadgen) and RW.JOB.qdD.raw
("job policy bs scatter rw qd rc|backend utime stime before|after|tgtd before|after|counters
before|after", counters = iSER commands, bytes copied for scattered buffers, requests split).
key=value pairs are metadata from the host script. Writes OUT_PREFIX.json and OUT_PREFIX.md
(with OUT_PREFIX.notes.md appended when it exists). Exit 1 if any job failed.
"""
import glob
import json
import os
import sys

JOB_ORDER = ["c4k", "c64k", "c128k", "s32-bounce", "s32-split", "s2-bounce", "s2-split"]
JOB_NAMES = {
    "c4k": "4 KiB contiguous",
    "c64k": "64 KiB contiguous",
    "c128k": "128 KiB contiguous",
    "s32-bounce": "128 KiB = 32 x 4 KiB, bounce",
    "s32-split": "128 KiB = 32 x 4 KiB, split",
    "s2-bounce": "128 KiB = 2 x 64 KiB, bounce",
    "s2-split": "128 KiB = 2 x 64 KiB, split",
}
MIB = 1 << 20


def read(path, default=None):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return default


def read_json(path):
    txt = read(path)
    if not txt:
        return None
    try:
        return json.loads(txt)
    except ValueError:
        return None


def nums(s):
    return [float(x) for x in s.split()]


def parse_run(raw_dir, path, clk):
    """One measured run, or a dict with "error"."""
    fields = (read(path) or "").strip().split("|")
    head = fields[0].split()
    if len(head) != 7 or len(fields) != 7:
        return {"error": f"malformed {os.path.basename(path)}: {fields!r}"}
    job, policy, bs, scatter, rw, qd, rc = head
    run = {"job": job, "name": JOB_NAMES.get(job, job), "policy": policy, "bs": int(bs),
           "scatter": int(scatter), "rw": rw, "iodepth": int(qd)}
    base = path[: -len(".raw")]
    lg = read_json(base + ".json")
    if rc != "0" or lg is None or not lg.get("ios"):
        run["error"] = (read(base + ".err") or "no result")[-500:]
        return run
    try:
        b0, b1, t0, t1, c0, c1 = (nums(f) for f in fields[1:])
    except ValueError:
        run["error"] = f"unparsable counters in {os.path.basename(path)}"
        return run
    if len(b0) != 2 or len(b1) != 2 or len(t0) != 2 or len(t1) != 2 or len(c0) != 3 or len(c1) != 3:
        run["error"] = f"missing counters in {os.path.basename(path)}"
        return run
    ios = lg["ios"]
    mib = ios * int(bs) / MIB
    b_user = (b1[0] - b0[0]) / clk
    b_sys = (b1[1] - b0[1]) / clk
    t_cpu = (t1[0] + t1[1] - t0[0] - t0[1]) / clk
    run.update({
        "ios": ios,
        "errors": lg.get("errors", 0),
        "iops": lg["iops"],
        "mib_s": lg["mib_s"],
        "lat_us": lg["lat_us"],
        "runtime_s": lg.get("runtime_s"),
        "mib": mib,
        "backend_user_s": b_user,
        "backend_sys_s": b_sys,
        "backend_cpu_ms_per_mib": 1000 * (b_user + b_sys) / mib,
        "backend_user_ms_per_mib": 1000 * b_user / mib,
        "backend_sys_ms_per_mib": 1000 * b_sys / mib,
        "tgtd_cpu_s": t_cpu,
        "tgtd_cpu_ms_per_mib": 1000 * t_cpu / mib,
        "commands_per_io": (c1[0] - c0[0]) / ios,
        "copied_bytes_per_io": (c1[1] - c0[1]) / ios,
        "splits_per_io": (c1[2] - c0[2]) / ios,
        "loadgen": lg,
    })
    return run


def fmt(v, nd=1):
    return "–" if v is None else f"{v:,.{nd}f}"


def main():
    raw, prefix = sys.argv[1], sys.argv[2]
    meta = dict(a.split("=", 1) for a in sys.argv[3:])
    clk = int((read(os.path.join(raw, "clk_tck")) or "100").strip() or 100)
    status = (read(os.path.join(raw, "status.txt")) or "").splitlines()
    failed = any(s.startswith(("FAIL", "FATAL")) for s in status) or meta.get("vm_rc") != "0"
    if not status:
        failed = True
        status = ["no status from the VM side (it did not run or the VM failed)"]
    runs = [parse_run(raw, p, clk) for p in sorted(glob.glob(os.path.join(raw, "*.raw")))]
    if any("error" in r for r in runs):
        failed = True
    order = {j: i for i, j in enumerate(JOB_ORDER)}
    runs.sort(key=lambda r: (r.get("rw", ""), r.get("iodepth", 0), order.get(r.get("job"), 99)))

    # split / bounce ratios for the same shape, rw and depth.
    ratios = []
    by = {(r.get("rw"), r.get("iodepth"), r.get("job")): r for r in runs if "error" not in r}
    for (rw, qd, job), s in sorted(by.items(), key=lambda kv: str(kv[0])):
        if not job.endswith("-split"):
            continue
        b = by.get((rw, qd, job.replace("-split", "-bounce")))
        if not b:
            continue
        ratios.append({
            "rw": rw, "iodepth": qd, "shape": job[: -len("-split")],
            "iops_split_over_bounce": s["iops"] / b["iops"] if b["iops"] else None,
            "backend_cpu_split_over_bounce": (s["backend_cpu_ms_per_mib"] / b["backend_cpu_ms_per_mib"]
                                              if b["backend_cpu_ms_per_mib"] else None),
            "tgtd_cpu_split_over_bounce": (s["tgtd_cpu_ms_per_mib"] / b["tgtd_cpu_ms_per_mib"]
                                           if b["tgtd_cpu_ms_per_mib"] else None),
        })

    doc = {"meta": meta, "status": status, "failed": failed, "runs": runs, "ratios": ratios,
           "tgtd_log_tail": "\n".join((read(os.path.join(raw, "tgtd.log")) or "").splitlines()[-15:])}
    with open(prefix + ".json", "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)

    out = []
    w = out.append
    w("# iSER scattered requests: bounce buffer vs one command per piece (soft-RoCE VM)\n\n")
    w(f"{meta.get('date', '?')} · {meta.get('vhost_iser_version', 'vhost-iser ?')} "
      f"(tree `{meta.get('git', '?')}`) · tgtd LUN: null · one VM run, wall {meta.get('vm_wall_s', '?')} s, "
      f"VM rc {meta.get('vm_rc', '?')} · host loadavg {meta.get('loadavg_before', '?')} before, "
      f"{meta.get('loadavg_after', '?')} after · {meta.get('runtime_s', '?')} s per run\n\n")
    w(f"Command: `{meta.get('command', '?')}`\n\n")
    for rw in ("randread", "randwrite"):
        rr = [r for r in runs if r.get("rw") == rw]
        if not rr:
            continue
        w(f"## {'Random reads' if rw == 'randread' else 'Random writes'}, 1 queue\n\n")
        w("| request | QD | IOPS | MiB/s | p50 µs | p99 µs | backend CPU ms / MiB (user + sys) "
          "| tgtd CPU ms / MiB | iSER commands / I/O | bytes copied / I/O |\n")
        w("|---|---|---|---|---|---|---|---|---|---|\n")
        for r in rr:
            if "error" in r:
                w(f"| {r.get('name', '?')} | {r.get('iodepth', '?')} | failed: "
                  f"{r['error'].strip().splitlines()[-1][:120] if r['error'].strip() else '?'} "
                  "| | | | | | | |\n")
                continue
            w(f"| {r['name']} | {r['iodepth']} | {fmt(r['iops'], 0)} | {fmt(r['mib_s'], 2)} "
              f"| {fmt(r['lat_us']['p50'], 0)} | {fmt(r['lat_us']['p99'], 0)} "
              f"| {fmt(r['backend_cpu_ms_per_mib'])} ({fmt(r['backend_user_ms_per_mib'])} + "
              f"{fmt(r['backend_sys_ms_per_mib'])}) | {fmt(r['tgtd_cpu_ms_per_mib'])} "
              f"| {fmt(r['commands_per_io'], 2)} | {fmt(r['copied_bytes_per_io'], 0)} |\n")
        w("\n")
    if ratios:
        w("## Split / bounce, same shape and depth\n\n")
        w("| rw | QD | pieces | IOPS | backend CPU / MiB | tgtd CPU / MiB |\n|---|---|---|---|---|---|\n")
        for x in ratios:
            w(f"| {x['rw']} | {x['iodepth']} | {x['shape'].replace('s', '')} "
              f"| {fmt(x['iops_split_over_bounce'], 2)} | {fmt(x['backend_cpu_split_over_bounce'], 2)} "
              f"| {fmt(x['tgtd_cpu_split_over_bounce'], 2)} |\n")
        w("\n")
    w("## Status lines from the VM side\n\n```\n" + "\n".join(status) + "\n```\n\n")
    w("## Method\n\n"
      "* `bench/iser-scatter.sh` boots `qemu/rdma-vm.sh` (TCG, 2 vCPUs, soft-RoCE `rxe0`) and runs "
      "`bench/iser-scatter-inner.sh` there: one tgtd (`--iser pool_sz_mb=64`), one iSER target with one "
      "`--bstype null` LUN (reads return zeroes, writes are dropped: no storage cost).\n"
      "* vhost-iser (1 queue) is started fresh for every job with `VHOST_ISER_SCATTER` = the job's "
      "policy; the client is `vhost-iser-loadgen` (libblkio, interrupt-driven completions) with "
      "`--scatter N`: every request is N equal pieces of the buffer with a gap of one piece after "
      "each (a readv/writev of N iovecs), so no two pieces are adjacent in host memory. Random "
      "offsets over the first GiB, after a 64-I/O warm-up of the same shape.\n"
      "* CPU: utime+stime of the backend and of tgtd from `/proc/PID/stat` (10 ms ticks) before and "
      "after the run, divided by the MiB moved. Commands, bytes copied and splits per I/O: the "
      "backend's counters (`vhost_iser_iser_commands_total`, "
      "`vhost_iser_iser_copied_bytes_total{reason=\"scattered\"}`, "
      "`vhost_iser_scatter_splits_total`, read with `vhost-iser stats --raw`) before and after, "
      "divided by the I/Os.\n"
      "* bounce: one command per request, its data through one 1 MiB buffer of the connection's "
      "registered pool (8 buffers), copied by the CPU (reads after the response, writes before the "
      "command). split: one command per piece, each naming the piece in place in registered guest "
      "memory (rkey + address); the pieces' commands run in parallel and the request completes with "
      "the last.\n\n")
    w("## Caveats\n\n"
      "* TCG on a 2-core host shared with other work: tgtd, the soft-RoCE driver (which copies every "
      "payload byte with the CPU, in the kernel), the backend and the client share 2 emulated CPUs. "
      "Compare runs of this table with each other, not with hardware.\n"
      "* Short runs under TCG: tens to hundreds of I/Os per run; the 10 ms tick granularity of the "
      "CPU columns matters for the smallest counts.\n\n")
    notes = read(prefix + ".notes.md")
    if notes:
        w(notes.rstrip() + "\n")
    with open(prefix + ".md", "w") as f:
        f.write("".join(out))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
