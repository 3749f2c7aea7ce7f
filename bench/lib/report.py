#!/usr/bin/env python3
"""Collects per-job measurements of bench/vhost-layer.sh and renders JSON + markdown.

    report.py record RUNS.jsonl key=value...      append one measured job
    report.py render RUNS.jsonl META.json OUT.json  write OUT.json, print markdown to stdout

`record` keys: backend, job, queues, iodepth, rep, loadgen (path to loadgen --json output),
procmon (path to procmon.py output), ticks0, ticks1 (utime+stime of the backend before and
after, in clock ticks), clk_tck, error (optional text; the job then has no numbers).
"""
import json
import sys

RATIO_OF = ("vhost-iser", "qsd")  # ratios are RATIO_OF[0] / RATIO_OF[1]


def record(runs_path, kv):
    a = dict(x.split("=", 1) for x in kv)
    rec = {"backend": a["backend"], "job": a["job"], "queues": int(a["queues"]),
           "iodepth": int(a["iodepth"]), "rep": int(a.get("rep", 0))}
    if a.get("error"):
        rec["error"] = a["error"]
    else:
        with open(a["loadgen"]) as f:
            lg = json.load(f)
        mon = {}
        try:
            with open(a["procmon"]) as f:
                mon = json.load(f)
        except (OSError, ValueError) as e:
            mon = {"error": f"no memory samples: {e}"}
        clk = int(a["clk_tck"])
        cpu_s = (int(a["ticks1"]) - int(a["ticks0"])) / clk
        ios = lg["ios"]
        rec.update({
            "iops": lg["iops"],
            "mib_s": lg["mib_s"],
            "lat_us": lg["lat_us"],
            "ios": ios,
            "errors": lg["errors"],
            "backend_cpu_s": cpu_s,
            "backend_cpu_s_per_mio": cpu_s / ios * 1e6 if ios else None,
            "client_cpu_s_per_mio": lg["client_cpu_s"] / ios * 1e6 if ios else None,
            "backend_mem_kib": {
                "idle": mon.get("first_kib"),
                "peak": mon.get("max_kib"),
                "detail": mon.get("detail"),
                "samples": mon.get("samples"),
                "error": mon.get("error"),
            },
            "loadgen": lg,
        })
    with open(runs_path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def pick(recs):
    """The median repetition by IOPS (all reps stay in the JSON)."""
    ok = [r for r in recs if "error" not in r]
    if not ok:
        return recs[0] if recs else None
    ok.sort(key=lambda r: r["iops"])
    return ok[(len(ok) - 1) // 2]


def fmt(v, nd=0):
    if v is None:
        return "—"
    if isinstance(v, float) and nd == 0:
        return f"{v:,.0f}"
    return f"{v:,.{nd}f}"


def ratio(a, b):
    if a is None or b in (None, 0):
        return "—"
    return f"{a / b:.2f}"


def peak_mib(r, field):
    peak = (r.get("backend_mem_kib") or {}).get("peak") or {}
    v = peak.get(field)
    return None if v is None else v / 1024


def peak_priv_mib(r):
    return peak_mib(r, "Private_Dirty")


def peak_anon_mib(r):
    return peak_mib(r, "Anonymous")


def targets_table(table, jobs):
    """The backend-core issue's targets against the measured ratios: one queue
    IOPS >= 2x qsd at QD 1/32/128, CPU per I/O <= 0.5x qsd, Private_Dirty <= 8 MiB
    with 4 queues. Lines of markdown (none when a backend is missing)."""
    pairs = []
    for job in jobs:
        a = table.get((job, RATIO_OF[0]))
        q = table.get((job, RATIO_OF[1]))
        if a and q and not a.get("error") and not q.get("error"):
            pairs.append((job, a, q))
    if not pairs:
        return []

    def rat(x, y):
        return x / y if x is not None and y else None

    def met(n, of):
        return "met" if n == of else f"met in {n} of {of}"

    out = ["", "Targets (backend-core issue):", "",
           "| target | measured | met? |", "|---|---|---|"]
    one_q = [(j, rat(a["iops"], q["iops"])) for j, a, q in pairs if j[1] == 1]
    if one_q:
        n = sum(1 for _, v in one_q if v is not None and v >= 2)
        out.append("| 1 queue IOPS ≥ 2× qsd at every depth | "
                   + ", ".join(f"QD{j[2]} {v:.2f}×" for j, v in one_q if v is not None)
                   + f" | {met(n, len(one_q))} |")
    cpu = [(j, rat(a.get("backend_cpu_s_per_mio"), q.get("backend_cpu_s_per_mio")))
           for j, a, q in pairs]
    cpu = [(j, v) for j, v in cpu if v is not None]
    if cpu:
        n = sum(1 for _, v in cpu if v <= 0.5)
        out.append("| backend CPU per I/O ≤ 0.5× qsd | "
                   + ", ".join(f"{j[0]}: {v:.2f}×" for j, v in cpu)
                   + f" | {met(n, len(cpu))} |")
    four = [peak_priv_mib(a) for j, a, _ in pairs if j[1] == 4]
    four = [m for m in four if m is not None]
    if four:
        worst = max(four)
        out.append(f"| Private_Dirty ≤ 8 MiB with 4 queues | {worst:.1f} MiB at most | "
                   f"{'met' if worst <= 8 else 'NOT met'} |")
    return out


def render(runs_path, meta_path, out_path):
    with open(runs_path) as f:
        runs = [json.loads(line) for line in f if line.strip()]
    with open(meta_path) as f:
        meta = json.load(f)
    jobs = []
    for r in runs:
        key = (r["job"], r["queues"], r["iodepth"])
        if key not in jobs:
            jobs.append(key)
    backends = []
    for r in runs:
        if r["backend"] not in backends:
            backends.append(r["backend"])
    table = {}
    for job in jobs:
        for b in backends:
            recs = [r for r in runs if (r["job"], r["queues"], r["iodepth"]) == job
                    and r["backend"] == b]
            if recs:
                table[(job, b)] = pick(recs)
    summary = []
    for (job, b), r in table.items():
        summary.append({"job": job[0], "queues": job[1], "iodepth": job[2], "backend": b,
                        "rep": r.get("rep"), "error": r.get("error"),
                        "iops": r.get("iops"),
                        "p50_us": (r.get("lat_us") or {}).get("p50"),
                        "p99_us": (r.get("lat_us") or {}).get("p99"),
                        "backend_cpu_s_per_mio": r.get("backend_cpu_s_per_mio"),
                        "client_cpu_s_per_mio": r.get("client_cpu_s_per_mio"),
                        "backend_private_dirty_peak_mib": peak_priv_mib(r),
                        "backend_anonymous_peak_mib": peak_anon_mib(r)})
    with open(out_path, "w") as f:
        json.dump({"meta": meta, "summary": summary, "runs": runs}, f, indent=1)

    out = []
    out.append(f"### vhost layer: {meta.get('title', '4 KiB randread')}")
    out.append("")
    out.append(f"{meta.get('date', '')}, host {meta.get('host', '')}, {meta.get('nproc', '?')} CPUs, "
               f"loadavg before {meta.get('loadavg_before', '?')}; {meta.get('runtime_s')} s per job, "
               f"{meta.get('reps')} rep(s) (median by IOPS shown); completion mode "
               f"{meta.get('completion')}; backend CPUs {meta.get('backend_cpus') or 'unpinned'}, "
               f"client CPUs {meta.get('client_cpus') or 'unpinned'}.")
    out.append("")
    for b, cmd in (meta.get("backend_cmds") or {}).items():
        out.append(f"- `{b}`: `{cmd}`")
    out.append("")
    out.append("| job | backend | IOPS | p50 µs | p99 µs | backend CPU s / M I/O | "
               "client CPU s / M I/O | backend Private_Dirty peak MiB | backend Anonymous peak MiB |")
    out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for job in jobs:
        for b in backends:
            r = table.get((job, b))
            if r is None:
                continue
            name = f"{job[0]}"
            if "error" in r:
                out.append(f"| {name} | {b} | FAILED: {r['error']} | | | | | | |")
                continue
            lat = r["lat_us"]
            out.append(f"| {name} | {b} | {fmt(r['iops'])} | {fmt(lat['p50'], 1)} | "
                       f"{fmt(lat['p99'], 1)} | {fmt(r['backend_cpu_s_per_mio'], 2)} | "
                       f"{fmt(r['client_cpu_s_per_mio'], 2)} | {fmt(peak_priv_mib(r), 1)} | "
                       f"{fmt(peak_anon_mib(r), 1)} |")
    if all(b in backends for b in RATIO_OF):
        out.append("")
        out.append(f"Ratios {RATIO_OF[0]} / {RATIO_OF[1]} (IOPS: higher is better for "
                   f"{RATIO_OF[0]}; latency, CPU, memory: lower is better):")
        out.append("")
        out.append("| job | IOPS | p50 | p99 | backend CPU / I/O | Private_Dirty peak | "
                   "Anonymous peak |")
        out.append("|---|---:|---:|---:|---:|---:|---:|")
        for job in jobs:
            a = table.get((job, RATIO_OF[0]))
            q = table.get((job, RATIO_OF[1]))
            if not a or not q or "error" in a or "error" in q:
                out.append(f"| {job[0]} | — | — | — | — | — | — |")
                continue
            out.append(f"| {job[0]} | {ratio(a['iops'], q['iops'])} | "
                       f"{ratio(a['lat_us']['p50'], q['lat_us']['p50'])} | "
                       f"{ratio(a['lat_us']['p99'], q['lat_us']['p99'])} | "
                       f"{ratio(a['backend_cpu_s_per_mio'], q['backend_cpu_s_per_mio'])} | "
                       f"{ratio(peak_priv_mib(a), peak_priv_mib(q))} | "
                       f"{ratio(peak_anon_mib(a), peak_anon_mib(q))} |")
    out.extend(targets_table(table, jobs))
    # Where the client's memory shows up in the backend: evidence for the README's claim.
    out.append("")
    out.append("Client memory (libblkio memfd buffers and rings) as seen in each backend's "
               "/proc/PID/smaps, sampled ~1 s into the largest job:")
    out.append("")
    out.append("| backend | mapping | size KiB | Rss KiB | Shared KiB | Private KiB |")
    out.append("|---|---|---:|---:|---:|---:|")
    for b in backends:
        recs = [r for r in runs if r["backend"] == b and "error" not in r]
        if not recs:
            continue
        r = max(recs, key=lambda r: (r["queues"] * r["iodepth"], r["queues"], -r["rep"]))
        detail = (r.get("backend_mem_kib") or {}).get("detail") or {}
        for name, m in sorted((detail.get("memfd") or {}).items()):
            shared = m.get("Shared_Clean", 0) + m.get("Shared_Dirty", 0)
            private = m.get("Private_Clean", 0) + m.get("Private_Dirty", 0)
            out.append(f"| {b} | `{name}` ×{m['mappings']} | {m['size_kib']} | {m.get('Rss', 0)} | "
                       f"{shared} | {private} |")
    print("\n".join(out))


def main():
    if len(sys.argv) >= 3 and sys.argv[1] == "record":
        record(sys.argv[2], sys.argv[3:])
    elif len(sys.argv) == 5 and sys.argv[1] == "render":
        render(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
