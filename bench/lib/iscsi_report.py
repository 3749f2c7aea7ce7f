#!/usr/bin/env python3
"""Collects per-job measurements of bench/iscsi-tcp.sh and renders JSON + markdown.

    iscsi_report.py record RUNS.jsonl key=value...      append one measured job
    iscsi_report.py render RUNS.jsonl META.json OUT.json  write OUT.json, print markdown

`record` keys: backend, job, rw, bs, queues, iodepth, rep, clk_tck; then either
loadgen (path to `vhost-iser-loadgen --json` output), procmon (procmon.py output), ticks0,
ticks1 (backend utime+stime in clock ticks before/after), sticks0, sticks1 (stime alone) — or iscsiperf (iscsiperf.py output);
tgtd0, tgtd1 (tgtd's ticks before/after); syscalls_file, tgtd_syscalls_file,
syscall_window_s (`perf stat -x,` output over a window inside the job); error (the job then has no numbers).
"""
import json
import sys

from report import fmt, peak_mib, pick, ratio

MAIN, REF, CEIL = "vhost-iser", "qsd", "iscsi-perf"


def _int(v):
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def read_perf(path):
    """{event: count} from `perf stat -x,` output; raw_syscalls:sys_enter becomes "total"."""
    counts = {}
    try:
        with open(path) as f:
            for line in f:
                p = line.strip().split(",")
                if len(p) < 3 or not p[2]:
                    continue
                name = p[2].replace("syscalls:sys_enter_", "")
                if name == "raw_syscalls:sys_enter":
                    name = "total"
                counts[name] = _int(p[0])
    except OSError:
        pass
    return counts


def record(runs_path, kv):
    a = dict(x.split("=", 1) for x in kv)
    rec = {k: a[k] for k in ("backend", "job", "rw")}
    rec.update({k: int(a[k]) for k in ("bs", "queues", "iodepth", "rep")})
    if a.get("error"):
        rec["error"] = a["error"]
    else:
        clk = int(a["clk_tck"])
        if a.get("iscsiperf"):
            with open(a["iscsiperf"]) as f:
                ip = json.load(f)
            ios = ip["ios"]
            cpu_s = ip["cpu_s"]
            rec["backend_sys_s"] = ip.get("sys_s")
            rec.update({"iops": ip["iops"], "mib_s": ip["mib_s"], "lat_us": None, "ios": ios,
                        "errors": 0, "backend_cpu_s": cpu_s, "client_cpu_s_per_mio": None,
                        "backend_mem_kib": {"peak": None, "maxrss_kib": ip.get("maxrss_kib")},
                        "iscsiperf": ip})
        else:
            with open(a["loadgen"]) as f:
                lg = json.load(f)
            try:
                with open(a["procmon"]) as f:
                    mon = json.load(f)
            except (OSError, ValueError) as e:
                mon = {"error": f"no memory samples: {e}"}
            ios = lg["ios"]
            cpu_s = (int(a["ticks1"]) - int(a["ticks0"])) / clk
            if a.get("sticks0") and a.get("sticks1"):
                rec["backend_sys_s"] = (int(a["sticks1"]) - int(a["sticks0"])) / clk
            rec.update({"iops": lg["iops"], "mib_s": lg["mib_s"], "lat_us": lg["lat_us"],
                        "ios": ios, "errors": lg["errors"], "backend_cpu_s": cpu_s,
                        "client_cpu_s_per_mio": lg["client_cpu_s"] / ios * 1e6 if ios else None,
                        "backend_mem_kib": {"idle": mon.get("first_kib"),
                                            "peak": mon.get("max_kib"),
                                            "detail": mon.get("detail"),
                                            "samples": mon.get("samples"),
                                            "error": mon.get("error")},
                        "loadgen": lg})
        rec["backend_cpu_s_per_mio"] = cpu_s / ios * 1e6 if ios else None
        sys_s = rec.get("backend_sys_s")
        rec["backend_sys_pct"] = 100 * sys_s / cpu_s if sys_s is not None and cpu_s else None
        if a.get("tgtd0") and a.get("tgtd1"):
            t = (int(a["tgtd1"]) - int(a["tgtd0"])) / clk
            rec["tgtd_cpu_s"] = t
            rec["tgtd_cpu_s_per_mio"] = t / ios * 1e6 if ios else None
        win = float(a["syscall_window_s"]) if a.get("syscall_window_s") else None
        for key, out in (("syscalls", "syscalls_per_io"), ("tgtd_syscalls", "tgtd_syscalls_per_io")):
            counts = read_perf(a[key + "_file"]) if a.get(key + "_file") else {}
            n = counts.get("total")
            rec[key] = counts
            # I/Os in the window estimated from the job's mean IOPS
            rec[out] = n / (rec["iops"] * win) if n is not None and win and rec["iops"] else None
        rec["syscall_window_s"] = win
    with open(runs_path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def lat(r, k):
    return ((r or {}).get("lat_us") or {}).get(k)


def median_of(recs, key):
    vals = sorted(r[key] for r in recs if "error" not in r and r.get(key) is not None)
    return vals[(len(vals) - 1) // 2] if vals else None


def render(runs_path, meta_path, out_path):
    with open(runs_path) as f:
        runs = [json.loads(line) for line in f if line.strip()]
    with open(meta_path) as f:
        meta = json.load(f)
    jobs, backends = [], []
    for r in runs:
        if r["job"] not in jobs:
            jobs.append(r["job"])
        if r["backend"] not in backends:
            backends.append(r["backend"])
    table, med = {}, {}
    for job in jobs:
        for b in backends:
            recs = [r for r in runs if r["job"] == job and r["backend"] == b]
            if recs:
                table[(job, b)] = pick(recs)
                # CPU and syscall figures: the median of each over the reps, independently
                med[(job, b)] = {k: median_of(recs, k) for k in
                                 ("backend_cpu_s_per_mio", "backend_sys_pct", "tgtd_cpu_s_per_mio",
                                  "syscalls_per_io", "tgtd_syscalls_per_io")}
    summary = []
    for (job, b), r in table.items():
        m = med[(job, b)]
        summary.append({"job": job, "backend": b, "rep": r.get("rep"), "error": r.get("error"),
                        "iops": r.get("iops"), "mib_s": r.get("mib_s"),
                        "p50_us": lat(r, "p50"), "p99_us": lat(r, "p99"),
                        "backend_private_dirty_peak_mib": peak_mib(r, "Private_Dirty"),
                        "backend_anonymous_peak_mib": peak_mib(r, "Anonymous"),
                        "iops_all_reps": [x.get("iops") for x in runs
                                          if x["job"] == job and x["backend"] == b],
                        **m})
    with open(out_path, "w") as f:
        json.dump({"meta": meta, "summary": summary, "runs": runs}, f, indent=1)

    o = []
    o.append(f"### iSCSI/TCP: {meta.get('title', '')}")
    o.append("")
    built = f"vhost-iser {meta['vhost_iser_git']}, " if meta.get("vhost_iser_git") else ""
    o.append(f"{meta.get('date', '')}, {built}bench git {meta.get('git')}, host {meta.get('host', '')}, "
             f"{meta.get('nproc', '?')} CPUs, loadavg before {meta.get('loadavg_before', '?')}, "
             f"after {meta.get('loadavg_after', '?')}; {meta.get('runtime_s')} s per job, "
             f"{meta.get('reps')} rep(s): IOPS/latency of the median rep by IOPS, CPU and "
             f"syscalls the median over reps; {meta.get('qsd_version') or ''}; libiscsi "
             f"{meta.get('libiscsi_version')}; target {meta.get('target')}.")
    o.append("")
    for b, cmd in (meta.get("backend_cmds") or {}).items():
        o.append(f"- `{b}`: `{cmd}`")
    o.append("")
    o.append("| job | backend | IOPS | MiB/s | p50 µs | p99 µs | backend CPU s / M I/O | kernel % of it | "
             "tgtd CPU s / M I/O | backend syscalls / I/O | backend Private_Dirty peak MiB | "
             "backend Anonymous peak MiB |")
    o.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for job in jobs:
        for b in backends:
            r = table.get((job, b))
            if r is None:
                continue
            if "error" in r:
                o.append(f"| {job} | {b} | FAILED: {r['error']} | | | | | | | | | |")
                continue
            m = med[(job, b)]
            o.append(f"| {job} | {b} | {fmt(r['iops'])} | {fmt(r['mib_s'], 1)} | "
                     f"{fmt(lat(r, 'p50'), 1)} | {fmt(lat(r, 'p99'), 1)} | "
                     f"{fmt(m['backend_cpu_s_per_mio'], 1)} | {fmt(m['backend_sys_pct'], 0)} | "
                     f"{fmt(m['tgtd_cpu_s_per_mio'], 1)} | "
                     f"{fmt(m['syscalls_per_io'], 2)} | {fmt(peak_mib(r, 'Private_Dirty'), 1)} | "
                     f"{fmt(peak_mib(r, 'Anonymous'), 1)} |")
    o.append("")
    o.append("iscsi-perf is load generator and initiator in one process: its \"backend\" CPU and "
             "syscalls are those of that process, and it reports no latency.")

    def ratio_table(x, y, what):
        rows = []
        for job in jobs:
            a, b = table.get((job, x)), table.get((job, y))
            if not a or not b or "error" in a or "error" in b:
                continue
            ma, mb = med[(job, x)], med[(job, y)]
            rows.append(f"| {job} | {ratio(a['iops'], b['iops'])} | "
                        f"{ratio(ma['backend_cpu_s_per_mio'], mb['backend_cpu_s_per_mio'])} | "
                        f"{ratio(ma['syscalls_per_io'], mb['syscalls_per_io'])} | "
                        f"{ratio(ma['tgtd_cpu_s_per_mio'], mb['tgtd_cpu_s_per_mio'])} |" +
                        (f" {ratio(lat(a, 'p50'), lat(b, 'p50'))} | "
                         f"{ratio(peak_mib(a, 'Anonymous'), peak_mib(b, 'Anonymous'))} |"
                         if what == "full" else ""))
        if not rows:
            return
        o.append("")
        o.append(f"Ratios {x} / {y}:")
        o.append("")
        if what == "full":
            o.append("| job | IOPS | backend CPU / I/O | syscalls / I/O | tgtd CPU / I/O | p50 | "
                     "Anonymous peak |")
            o.append("|---|---:|---:|---:|---:|---:|---:|")
        else:
            o.append("| job | IOPS | CPU / I/O | syscalls / I/O | tgtd CPU / I/O |")
            o.append("|---|---:|---:|---:|---:|")
        o.extend(rows)

    ratio_table(MAIN, REF, "full")
    ratio_table(MAIN, CEIL, "short")
    ratio_table(REF, CEIL, "short")

    # Which system calls, per I/O, in the 4 KiB QD1 and QD32 jobs (median rep by IOPS).
    for job in jobs:
        if not (job.endswith(" 1q QD1") or job.endswith(" 1q QD32")):
            continue
        rows = []
        names = []
        for b in backends:
            r = table.get((job, b))
            if r and not r.get("syscalls"):
                # the tabled rep has no counts (perf could not attach): take another rep
                r = next((x for x in runs if x["job"] == job and x["backend"] == b
                          and "error" not in x and x.get("syscalls")), None)
            if not r or "error" in r or not r.get("syscalls"):
                continue
            ios_in_window = r["iops"] * (r.get("syscall_window_s") or 0)
            if not ios_in_window:
                continue
            per = {k: v / ios_in_window for k, v in r["syscalls"].items() if v}
            rows.append((b, per))
            names += [k for k in per if k not in names and k != "total"]
        if rows:
            names.sort(key=lambda k: -max(p.get(k, 0) for _, p in rows))
            o.append("")
            o.append(f"System calls per I/O by name, {job} (the median rep by IOPS; perf stat "
                     "tracepoint counts over the middle of the job, I/Os from its mean IOPS):")
            o.append("")
            o.append("| backend | all | " + " | ".join(names) + " |")
            o.append("|---|---:|" + "---:|" * len(names))
            for b, per in rows:
                o.append(f"| {b} | {fmt(per.get('total'), 2)} | " +
                         " | ".join(fmt(per.get(k), 2) for k in names) + " |")

    # The targets, checked against this run.
    def get(job_pred, b):
        for job in jobs:
            if job_pred(job) and (job, b) in table and "error" not in table[(job, b)]:
                return job, table[(job, b)], med[(job, b)]
        return None, None, None

    o.append("")
    o.append("Targets (issue 3), from this run:")
    o.append("")
    o.append("| target | measured | met? |")
    o.append("|---|---|---|")
    j, a, _ = get(lambda s: s.startswith("4k randread 1q QD1"), MAIN)
    _, q, _ = get(lambda s: s == j, REF) if j else (None, None, None)
    if a and q:
        v = a["iops"] / q["iops"]
        o.append(f"| QD1 IOPS ≥ 2× qsd | {fmt(a['iops'])} vs {fmt(q['iops'])} = {v:.2f}× | "
                 f"{'met' if v >= 2 else 'NOT met'} |")
    cpu = []
    for job in jobs:
        if job.startswith("4k") or job.startswith("128k"):
            ma, mq = med.get((job, MAIN)), med.get((job, REF))
            if ma and mq and ma["backend_cpu_s_per_mio"] and mq["backend_cpu_s_per_mio"]:
                cpu.append((job, ma["backend_cpu_s_per_mio"] / mq["backend_cpu_s_per_mio"]))
    if cpu:
        worst = max(v for _, v in cpu)
        o.append("| backend CPU per I/O ≤ 0.3× qsd | " +
                 ", ".join(f"{j}: {v:.2f}×" for j, v in cpu) +
                 f" | {'met in every job' if worst <= 0.3 else 'met in %d of %d jobs' % (sum(v <= 0.3 for _, v in cpu), len(cpu))} |")
    j, a, ma = get(lambda s: s.startswith("4k randread 1q QD32"), MAIN)
    if a and ma.get("syscalls_per_io") is not None:
        v = ma["syscalls_per_io"]
        o.append(f"| ≤ 1 syscall per I/O at QD32 | {v:.2f} ({j}) | {'met' if v <= 1 else 'NOT met'} |")
    j, a, _ = get(lambda s: " 4q " in s, MAIN)
    if a:
        pd, an = peak_mib(a, "Private_Dirty"), peak_mib(a, "Anonymous")
        if pd is not None and an is not None:
            v = max(pd, an)
            o.append(f"| private memory ≤ 8 MiB at 4 sessions | Private_Dirty {pd:.1f} MiB, "
                     f"Anonymous {an:.1f} MiB ({j}) | {'met' if v <= 8 else 'NOT met'} |")
    print("\n".join(o))


def main():
    if len(sys.argv) >= 3 and sys.argv[1] == "record":
        record(sys.argv[2], sys.argv[3:])
    elif len(sys.argv) == 5 and sys.argv[1] == "render":
        render(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
