#!/usr/bin/env python3
"""Renders the raw output of bench/iser-vm-inner.sh into JSON and markdown.

    iser_vm_report.py RAW_DIR OUT_PREFIX [key=value]...

RAW_DIR holds what the VM side wrote (loadgen JSON per job, /proc tick counts, backend logs,
callgrind dumps); key=value pairs are metadata from the host script. Writes OUT_PREFIX.json and
OUT_PREFIX.md. Exit 1 if any backend or job failed (the files are written anyway).
"""
import glob
import json
import os
import re
import subprocess
import sys

NAMES = {
    "vi-iser": "vhost-iser, iSER",
    "vi-tcp": "vhost-iser, TCP",
    "qsd-iser": "qsd + libiscsi, iSER",
    "qsd-tcp": "qsd + libiscsi, TCP",
    "vi-iser-poll0": "vhost-iser, iSER, VHOST_ISER_POLL_US=0",
}
ORDER = ["vi-iser", "vi-tcp", "qsd-iser", "qsd-tcp", "vi-iser-poll0"]
COPY_RE = re.compile(
    r"iSER to (\S+): (\d+) commands, (\d+) bytes copied \(process: (\d+) bytes for scattered "
    r"guest buffers, (\d+) for unregistered")
CLOSE_RE = re.compile(
    r"closed after (\d+) commands; (\d+) bytes copied through bounce buffers \(process: (\d+) "
    r"bytes for scattered guest buffers, (\d+) for unregistered")


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


def tail(txt, n=15):
    return "\n".join((txt or "").splitlines()[-n:])


def copy_counters(log):
    """Last copy report of a vhost-iser log (iSER only)."""
    last = None
    for line in (log or "").splitlines():
        m = COPY_RE.search(line)
        if m:
            last = {"commands": int(m[2]), "bytes_copied": int(m[3]),
                    "process_scattered": int(m[4]), "process_unregistered": int(m[5]),
                    "line": line.strip()}
        m = CLOSE_RE.search(line)
        if m:
            last = {"commands": int(m[1]), "bytes_copied": int(m[2]),
                    "process_scattered": int(m[3]), "process_unregistered": int(m[4]),
                    "line": line.strip()}
    return last


def cg_dumps(raw, b):
    """Callgrind dumps of backend b: {trigger name (e.g. 'n1qd1', 'exit'): Ir}."""
    dumps = {}
    for path in glob.glob(os.path.join(raw, f"cg.{b}.out*")):
        txt = read(path, "")
        trig = re.search(r"^desc: Trigger: (?:dump )?(.*)$", txt, re.M)
        tot = re.search(r"^(?:totals|summary): *(\d+)", txt, re.M)
        if not tot:
            continue
        name = trig[1].strip() if trig else os.path.basename(path)
        dumps["exit" if "termination" in name else name] = int(tot[1])
        PATHS[(b, name)] = path
    return dumps


PATHS = {}


def profile(path, ios, top=14):
    """Self cost per I/O by object file and the top functions of one dump (callgrind_annotate)."""
    try:
        out = subprocess.run(["callgrind_annotate", "--threshold=100", "--inclusive=no", path],
                             capture_output=True, text=True, timeout=120).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    funcs = []
    by_obj = {}
    for line in out.split("file:function", 1)[-1].splitlines():
        m = re.match(r"\s*([\d,]+) \(.*?\)\s+(.*?)\s+\[(.*)\]\s*$", line)
        if not m or "clone.S" in m[2]:  # thread entry: inclusive of everything
            continue
        ir = int(m[1].replace(",", "")) / ios
        fn = m[2].split(":", 1)[-1] if m[2].startswith(("???:", "./")) else m[2]
        obj = os.path.basename(m[3])
        funcs.append((ir, fn, obj))
        by_obj[obj] = by_obj.get(obj, 0) + ir
    if not funcs:
        return None
    return {"by_object": dict(sorted(by_obj.items(), key=lambda kv: -kv[1])),
            "top": [{"ir_per_io": round(ir, 1), "function": fn, "object": obj} for ir, fn, obj in funcs[:top]]}


def main():
    raw, prefix = sys.argv[1], sys.argv[2]
    meta = dict(a.split("=", 1) for a in sys.argv[3:])
    clk = int((read(os.path.join(raw, "clk_tck")) or "100").strip() or 100)
    depths = [int(d) for d in meta.get("depths", "1 16").split()]
    status = (read(os.path.join(raw, "status.txt")) or "").splitlines()
    failed = any(s.startswith(("FAIL", "FATAL")) for s in status) or meta.get("vm_rc") != "0"
    if not status:
        failed = True
        status = ["no status from the VM side (it did not run or the VM failed)"]

    jobs = []
    backends = {}
    for b in ORDER:
        cmd = read(os.path.join(raw, f"cmd.{b}"))
        if cmd is None:
            continue
        log = read(os.path.join(raw, f"{b}.log"), "")
        backends[b] = {"name": NAMES[b], "cmd": cmd.strip(), "log_tail": tail(log, 25),
                       "copy": copy_counters(log) if b.startswith("vi-") else None}
        for d in depths:
            r = read_json(os.path.join(raw, f"{b}.qd{d}.json"))
            t = (read(os.path.join(raw, f"{b}.qd{d}.ticks")) or "").split()
            job = {"backend": b, "iodepth": d}
            if r is None or len(t) not in (3, 5) or t[-1] != "0" or not r.get("ios"):
                job["error"] = (read(os.path.join(raw, f"{b}.qd{d}.err")) or "no result")[-500:]
                jobs.append(job)
                continue
            if len(t) == 5:  # utime stime before, utime stime after, rc
                user_s = (float(t[2]) - float(t[0])) / clk
                sys_s = (float(t[3]) - float(t[1])) / clk
                cpu_s = user_s + sys_s
                job["backend_user_s_per_mio"] = user_s / r["ios"] * 1e6
                job["backend_sys_s_per_mio"] = sys_s / r["ios"] * 1e6
            else:
                cpu_s = (float(t[1]) - float(t[0])) / clk
            job.update({
                "iops": r["iops"], "ios": r["ios"], "errors": r["errors"],
                "runtime_s": r["runtime_s"],
                "lat_us": r["lat_us"], "backend_cpu_s": cpu_s,
                "backend_cpu_s_per_mio": cpu_s / r["ios"] * 1e6,
                "client_cpu_s_per_mio": r["client_cpu_s"] / r["ios"] * 1e6,
                "loadgen": r,
            })
            jobs.append(job)

    cg = {}
    cg_w, n1, n2 = (int(x) for x in meta.get("cg_ios", "50 100 500").split()[:3])
    cg_depths = [int(d) for d in meta.get("cg_depths", "1 16").split()]
    for b in ORDER:
        if not glob.glob(os.path.join(raw, f"cg.{b}.*")):
            continue
        dumps = cg_dumps(raw, b)
        clog = read(os.path.join(raw, f"cg.{b}.log"), "")
        e = {"dumps_Ir": dumps, "log_tail": tail(clog, 25),
             "copy": copy_counters(clog) if b.startswith("vi-") else None, "per_depth": {}}
        for d in cg_depths:
            a, z = dumps.get(f"n1qd{d}"), dumps.get(f"n2qd{d}")
            if a is not None and z is not None:
                e["per_depth"][str(d)] = {"Ir_n1": a, "Ir_n2": z, "Ir_per_io": (z - a) / (n2 - n1),
                                          "Ir_per_io_n2_alone": z / n2}
                if b.startswith("vi-") and (b, f"n2qd{d}") in PATHS:
                    e["per_depth"][str(d)]["profile_n2"] = profile(PATHS[(b, f"n2qd{d}")], n2)
        cg[b] = e

    def cg_per_io(b, d):
        return cg.get(b, {}).get("per_depth", {}).get(str(d), {}).get("Ir_per_io")

    def job(b, d):
        for j in jobs:
            if j["backend"] == b and j["iodepth"] == d and "error" not in j:
                return j
        return None

    ratios = {}
    for d in depths:
        a, t, q = job("vi-iser", d), job("vi-tcp", d), job("qsd-iser", d)
        if a and q:
            ratios[f"cpu_per_io_vi_iser_over_qsd_iser_qd{d}"] = a["backend_cpu_s_per_mio"] / q["backend_cpu_s_per_mio"]
            ratios[f"iops_vi_iser_over_qsd_iser_qd{d}"] = a["iops"] / q["iops"]
        if a and t:
            ratios[f"cpu_per_io_vi_iser_over_vi_tcp_qd{d}"] = a["backend_cpu_s_per_mio"] / t["backend_cpu_s_per_mio"]
    for d in cg_depths:
        a, t, q = cg_per_io("vi-iser", d), cg_per_io("vi-tcp", d), cg_per_io("qsd-iser", d)
        if a and t:
            ratios[f"instr_per_io_vi_iser_over_vi_tcp_qd{d}"] = a / t
        if a and q:
            ratios[f"instr_per_io_vi_iser_over_qsd_iser_qd{d}"] = a / q

    result = {"meta": meta, "lun": (read(os.path.join(raw, "lun_kind")) or "?").strip(),
              "status": status, "failed": failed, "jobs": jobs, "backends": backends,
              "callgrind": cg, "ratios": ratios,
              "tgtd_log_tail": tail(read(os.path.join(raw, "tgtd.log"), ""), 30)}
    with open(prefix + ".json", "w") as f:
        json.dump(result, f, indent=1)

    def split(j):
        if "backend_user_s_per_mio" not in j:
            return ""
        return f" ({j['backend_user_s_per_mio']:.0f} + {j['backend_sys_s_per_mio']:.0f})"

    md = []
    w = md.append
    w("# iSER in the soft-RoCE VM: vhost-iser (iSER, TCP) vs qemu-storage-daemon + libiscsi\n")
    w(f"{meta.get('date', '')} · {meta.get('vhost_iser_version', 'vhost-iser ?')} (bench scripts `{meta.get('git', '?')}`) · {meta.get('qsd_version', '')} · "
      f"{meta.get('valgrind_version', '')} · tgtd LUN: {result['lun']} · one VM run, "
      f"wall {meta.get('vm_wall_s', '?')} s, VM rc {meta.get('vm_rc', '?')} · host loadavg "
      f"{meta.get('loadavg_before', '?')} before, {meta.get('loadavg_after', '?')} after\n")
    if meta.get("command"):
        w(f"Command: `{meta['command']}`\n")
    w("## 4 KiB random reads, 1 queue, " + meta.get("runtime_s", "?") + " s per job\n")
    w("| backend | QD | IOPS | p50 µs | p99 µs | backend CPU s / 1M I/Os (user + sys) | client CPU s / 1M I/Os |")
    w("|---|---|---|---|---|---|---|")
    for j in jobs:
        n = NAMES[j["backend"]]
        if "error" in j:
            w(f"| {n} | {j['iodepth']} | failed: {j['error'].strip().splitlines()[-1][:120] if j['error'].strip() else 'no result'} | | | | |")
            continue
        w(f"| {n} | {j['iodepth']} | {j['iops']:.0f} | {j['lat_us']['p50']:.0f} | {j['lat_us']['p99']:.0f} "
          f"| {j['backend_cpu_s_per_mio']:.0f}{split(j)} | {j['client_cpu_s_per_mio']:.0f} |")
    w("")
    w("Backend CPU s per million I/Os = µs of backend CPU (utime+stime, all threads) per I/O.\n")
    if ratios:
        w("## Ratios (goals from issue 4)\n")
        w("| ratio | value | goal |")
        w("|---|---|---|")
        for k, v in ratios.items():
            goal = ""
            if k.startswith("cpu_per_io_vi_iser_over_qsd_iser"):
                goal = "≤ 0.5"
            elif k.startswith("instr_per_io_vi_iser_over_vi_tcp"):
                goal = "≤ 0.33"
            elif k.startswith("instr_per_io_vi_iser_over_qsd_iser"):
                goal = "(≤ 0.5, CPU goal)"
            w(f"| {k} | {v:.2f} | {goal} |")
        w("")
    w("## Bytes copied by vhost-iser (iSER bounce-buffer counters)\n")
    w("| run | commands | bytes copied (connection) | process: scattered | process: unregistered | bytes / command |")
    w("|---|---|---|---|---|---|")
    for label, src in [("throughput run", backends.get("vi-iser")), ("callgrind run", cg.get("vi-iser"))]:
        c = (src or {}).get("copy")
        if c:
            w(f"| {label} | {c['commands']} | {c['bytes_copied']} | {c['process_scattered']} | "
              f"{c['process_unregistered']} | {c['bytes_copied'] / max(c['commands'], 1):.1f} |")
        elif src is not None:
            w(f"| {label} | no copy report in the log | | | | |")
    w("")
    w("`unregistered` bytes are the start-up probes (INQUIRY, READ CAPACITY into the backend's "
      "own buffers, before guest memory is registered), not guest I/O. `bytes copied "
      "(connection)` is the connection's total since login.\n")
    w("The TCP transport has no such counter: it receives Data-In payloads straight into the "
      "guest buffer with readv, i.e. the kernel copies every byte (socket → guest memory); on iSER "
      "the target RDMA-writes into the registered guest memory.\n")
    if cg:
        w("## Instructions per 4 KiB read (callgrind, user space of the backend process)\n")
        w(f"Per queue depth: a warm-up of {cg_w} I/Os, then dumps after {n1} and after {n2} more "
          f"I/Os; per I/O = (Ir of the {n2}-I/O phase − Ir of the {n1}-I/O phase) / {n2 - n1}, so "
          "start-up, login and the client's vhost-user connect/disconnect cancel out.\n")
        w(f"| backend | QD | Ir, {n1} I/Os | Ir, {n2} I/Os | Ir per I/O (Δ) | Ir / I/O, {n2}-I/O phase alone |")
        w("|---|---|---|---|---|---|")
        for b, e in cg.items():
            for d in cg_depths:
                p = e["per_depth"].get(str(d))
                if p:
                    w(f"| {NAMES[b]} | {d} | {p['Ir_n1']:,} | {p['Ir_n2']:,} | {p['Ir_per_io']:,.0f} | {p['Ir_per_io_n2_alone']:,.0f} |")
                else:
                    w(f"| {NAMES[b]} | {d} | failed (see status) | | | |")
        w("")
    profs = [(b, d, e["per_depth"][str(d)].get("profile_n2")) for b, e in cg.items()
             for d in cg_depths if str(d) in e["per_depth"]]
    profs = [p for p in profs if p[2]]
    if profs:
        w(f"### Where vhost-iser's instructions go (self cost per I/O in the {n2}-I/O phase)\n")
        w("By object file (the phase's client connect/disconnect included, hence slightly above Δ):\n")
        objs = []
        for _, _, p in profs:
            for o in p["by_object"]:
                if o not in objs and not o.startswith("ld-linux"):
                    objs.append(o)
        w("| backend | QD | " + " | ".join(objs) + " |")
        w("|---|---|" + "---|" * len(objs))
        for b, d, p in profs:
            w(f"| {NAMES[b]} | {d} | " + " | ".join(f"{p['by_object'].get(o, 0):,.0f}" for o in objs) + " |")
        w("")
        for b, d, p in profs:
            if d != cg_depths[0]:
                continue
            w(f"Top functions, {NAMES[b]}, QD{d} (Ir per I/O, self):\n")
            w("| Ir / I/O | function | object |")
            w("|---|---|---|")
            for f in p["top"]:
                w(f"| {f['ir_per_io']:,.0f} | `{f['function'][:110]}` | {f['object']} |")
            w("")
    notes = read(prefix + ".notes.md")
    if notes:
        w(notes.rstrip() + "\n")
    w("## Status lines from the VM side\n")
    w("```")
    for s in status:
        w(s)
    w("```\n")
    w("## Method\n")
    w("* `bench/iser-vm.sh` boots `qemu/rdma-vm.sh` (TCG, 2 vCPUs, soft-RoCE `rxe0` on a veth "
      "pair) and runs `bench/iser-vm-inner.sh` there. One tgtd (`--iscsi portal=10.99.0.1:3260 "
      "--iser pool_sz_mb=64`), one target with one LUN (`--bstype null`: reads return zeroes, no "
      "storage cost), bound to `ALL` plus the two initiator names used (tgt 1.0.85's iSER ACL "
      "quirk).")
    tcp_t = (read(os.path.join(raw, "tcp_target")) or "").strip()
    if tcp_t:
        w(f"* TCP: tgt keeps targets per transport (`--lld`): the iSER target answers TCP logins "
          f"with \"target not found\", so TCP uses a {tcp_t} in the same tgtd, same portal. "
          "Both LUNs are `--bstype null`, so the target-side work per read is the same.")
    else:
        w("* TCP reaches the same target and LUN as iSER.")
    w("* Every backend serves one queue; the client is `vhost-iser-loadgen` (libblkio, "
      "interrupt-driven completions), 4 KiB random reads over the first GiB, after a 200-I/O "
      "warm-up. Backends run one after the other, each fresh; CPU = utime+stime of the backend "
      "process from `/proc/PID/stat` (10 ms ticks) across the job, divided by the I/Os done.")
    w("* vhost-iser runs with `VHOST_ISER_REPORT_EVERY` set so that its log has copy counters "
      "(`bytes copied`) near the end of the run; the last line is shown.")
    w("* callgrind: `valgrind --tool=callgrind` on the backend (vhost-iser without debug info, "
      "same code), `callgrind_control --dump` between phases (dump zeroes the counters). Instruction "
      "counts are exact user-space instructions of the backend (kernel work — syscalls, the "
      "soft-RoCE driver, TCP — is not counted). Idle wake-ups count too, so a phase's count can "
      "depend slightly on timing. vhost-iser's iSER connection polls its completion queue for "
      "`VHOST_ISER_POLL_US` (default 20 µs) before sleeping; under valgrind the clock runs "
      "normally while the code runs ~50× slower, so that polling costs fewer iterations than "
      "natively — the counts are closest to the work per I/O, not to polling overhead.\n")
    w("## Caveats\n")
    w("* TCG (no KVM) on a 2-core host shared with other builds: every process in the VM — tgtd, "
      "the soft-RoCE driver (which does in the kernel, with CPU copies, what an RNIC does in "
      "hardware), the backend and the client — shares 2 emulated CPUs. IOPS and CPU seconds "
      "say how the backends compare under identical conditions, not what they do on real "
      "hardware. Instruction counts are the most portable number here.")
    w("* With soft-RoCE the RDMA data movement is kernel CPU work in the VM (rxe copies the "
      "payload), done partly in the posting process's syscalls and partly in softirq/work-queue "
      "context charged to whoever runs: part of it lands in the backend's `sys` time, part in "
      "tgtd's or nobody's. On a real RNIC it disappears from the host CPU; the TCP path's kernel "
      "copy (recvmsg into guest memory, in the backend's thread) does not.")
    w("* VM time: about 8 min with the default three callgrind backends, 11 min with "
      "`vi-iser-poll0` added (each valgrind start-up takes 15–60 s under TCG); "
      "`--cg-backends \"vi-iser vi-tcp\"` shortens it.")
    w("* TCP goes to 10.99.0.1, a local address: the loopback path, no NIC.")
    w("* Short runs (a few thousand I/Os at QD1 under TCG): tick granularity (10 ms) matters "
      "for the CPU columns.\n")
    with open(prefix + ".md", "w") as f:
        f.write("\n".join(md))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
