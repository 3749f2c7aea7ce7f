#!/usr/bin/env python3
"""Turns the outputs of bench/lib/faults-inner.sh into the fault table.

usage: faults_report.py OUTDIR [--json FILE] [--md FILE] [--title TEXT]

Reads, per fault kind, KIND.lg.json (loadgen report with its completion timeline),
KIND.inj.jsonl (injections: wall-clock start/end) and KIND.vi.log (vhost-iser log), and
prints one `FAULT kind=... key=value ...` line per kind (tests/faults_vm.rs reads them), then
writes the JSON and markdown if asked.

Definitions (per injection):
  recovery   from the end of the fault to the next successful client completion; "every
             queue": until each client queue (each has its own vhost queue and iSCSI session) has
             completed an I/O again. End of the fault: the moment the script starts removing it
             (tc qdisc del / ip link set up / kill -CONT), for kill -9 the moment tgtd was
             restarted and its target configured again (tgtadm bind done).
             Resolution: the loadgen's 10 ms timeline buckets; the first bucket counted is the
             first that starts after the fault ended, and its end is taken (an upper bound).
             Under TCG, starting `tc`/`ip`/`kill` takes 0.1-0.3 s, included in the recovery.
  stall      the longest time without any successful completion between the start of the
             fault and its recovery (what the client saw as "the disk hangs").
  rate       successful completions per second in the GAP seconds before the fault and while
             it was applied.
  events     backend log lines between the start of the fault and 1 s after its recovery:
             connection drops, reconnects, ABORT TASK, LUN RESET, re-issued commands.
"""
import datetime
import json
import math
import os
import statistics
import sys

KINDS = {
    "loss5": "tc netem loss 5 % (both directions)",
    "loss20": "tc netem loss 20 % (both directions)",
    "delay": "tc netem delay 100 ms ± 50 ms (normal), both directions",
    "reorder": "tc netem delay 10 ms, reorder 25 % (50 % correlation)",
    "dup": "tc netem duplicate 20 % (both directions)",
    "link": "ip link set down, then up (veth)",
    "kill": "kill -9 tgtd, restart it",
    "stop": "SIGSTOP tgtd, SIGCONT (NOP-Out timeout)",
    "ladder": "SIGSTOP tgtd, SIGCONT (command timeout: ABORT TASK, LUN RESET, drop)",
}
ORDER = list(KINDS)

EVENTS = {
    "drops": "; failing ",  # "iSCSI session to X: <why>; failing N command(s), keeping M ..."
    "reconnects": ": reconnected to ",
    "nop_timeouts": "did not answer a NOP-Out ping",
    "aborts": "sending ABORT TASK",
    "lun_resets": "resetting the LUN",
    "reissues": "re-issuing ",
    "gave_up": "no new connection within the replacement timeout",
    "panics": "panicked",
}


def parse_ts(line):
    """Unix time of a vhost-iser log line (RFC 3339, UTC, millis), or None."""
    ts = line.split(" ", 1)[0]
    if not ts.endswith("Z"):
        return None
    try:
        d = datetime.datetime.strptime(ts[:-1], "%Y-%m-%dT%H:%M:%S.%f")
    except ValueError:
        return None
    return d.replace(tzinfo=datetime.timezone.utc).timestamp()


def load_events(path):
    ev = []
    try:
        with open(path, errors="replace") as f:
            for line in f:
                t = parse_ts(line)
                for name, needle in EVENTS.items():
                    if needle in line:
                        ev.append((t, name, line.rstrip()))
    except FileNotFoundError:
        pass
    return ev


def pct(vals, p):
    if not vals:
        return None
    s = sorted(vals)
    k = max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))
    return s[k]


def analyse_kind(out, kind):
    lg_path = os.path.join(out, f"{kind}.lg.json")
    try:
        with open(lg_path) as f:
            lg = json.load(f)
    except (FileNotFoundError, json.JSONDecodeError) as e:
        return {"kind": kind, "what": KINDS.get(kind, kind), "error": f"no loadgen report: {e}"}
    inj = []
    try:
        with open(os.path.join(out, f"{kind}.inj.jsonl")) as f:
            inj = [json.loads(l) for l in f if l.strip()]
    except FileNotFoundError:
        pass
    v = lg.get("verify") or {}
    fc = v.get("file") or {}
    tl = lg.get("timeline") or {}
    t0 = tl.get("start_unix", 0.0)
    w = tl.get("bucket_ms", 10) / 1000.0
    ok = tl.get("ok", [])
    events = load_events(os.path.join(out, f"{kind}.vi.log"))

    def ok_between(a, b):
        i, j = max(0, int(math.floor((a - t0) / w))), max(0, int(math.floor((b - t0) / w)))
        return sum(ok[i:j])

    by_queue = tl.get("ok_by_queue") or [ok]

    def first_after(line, end):
        b0 = max(0, int(math.ceil((end - t0) / w)))
        for b in range(b0, len(line)):
            if line[b] > 0:
                return (b + 1) * w + t0 - end
        return None

    per = []
    for x in inj:
        end = x["end"]
        rec = first_after(ok, end)
        recs_q = [first_after(q, end) for q in by_queue]
        rec_all = None if any(r is None for r in recs_q) else max(recs_q)
        # longest stretch of empty buckets from the fault's start to the recovery
        bs = max(0, int(math.floor((x["start"] - t0) / w)))
        be = len(ok) if rec is None else int(math.ceil((end + rec - t0) / w))
        stall = run = 0
        for b in range(bs, min(be, len(ok))):
            run = run + 1 if ok[b] == 0 else 0
            stall = max(stall, run)
        hold = max(1e-3, x["removing"] - x["applied"])
        gap = float(os.environ.get("FAULTS_GAP", "3"))  # s of normal I/O before each fault
        upto = end + (rec or 0) + 1.0
        counts = {k: 0 for k in EVENTS}
        for t, name, _ in events:
            if t is not None and x["start"] - 0.05 <= t <= upto:
                counts[name] += 1
        per.append({
            "n": x["n"],
            "start": x["start"],
            "end": end,
            "fault_s": round(end - x["start"], 3),
            "recovery_s": None if rec is None else round(rec, 3),
            "recovery_all_s": None if rec_all is None else round(rec_all, 3),
            "stall_s": round(stall * w, 3),
            "rate_before": round(ok_between(x["start"] - gap, x["start"]) / gap, 1),
            "rate_during": round(ok_between(x["applied"], x["removing"]) / hold, 1),
            "events": counts,
        })
    recs = [p["recovery_s"] for p in per if p["recovery_s"] is not None]
    recs_all = [p["recovery_all_s"] for p in per if p["recovery_all_s"] is not None]
    totals = {k: sum(1 for _, n, _ in events if n == k) for k in EVENTS}
    errors = lg.get("errors", 0) + v.get("precondition_errors", 0) + v.get("readback_errors", 0)
    return {
        "kind": kind,
        "what": KINDS.get(kind, kind),
        "injected": len(inj),
        "ios": lg.get("ios", 0),
        "runtime_s": lg.get("runtime_s"),
        "client_errors": errors,
        "first_error": lg.get("first_error"),
        "reads_checked": v.get("reads_checked", 0),
        "mismatches": v.get("mismatches", 0),
        "file_blocks": fc.get("blocks_checked", 0),
        "file_mismatches": fc.get("mismatches", 0) if fc else None,
        "first_mismatches": (v.get("first_mismatches") or []) + (fc.get("first_mismatches") or []),
        "recovered": len(recs),
        "recovery_p50_s": None if not recs else round(statistics.median(recs), 3),
        "recovery_max_s": None if not recs else round(max(recs), 3),
        "recovery_all_p50_s": None if not recs_all else round(statistics.median(recs_all), 3),
        "recovery_all_max_s": None if not recs_all else round(max(recs_all), 3),
        "stall_max_s": max((p["stall_s"] for p in per), default=None),
        "rate_before": round(statistics.mean([p["rate_before"] for p in per]), 1) if per else None,
        "rate_during": round(statistics.mean([p["rate_during"] for p in per]), 1) if per else None,
        "events": totals,
        "injections": per,
    }


def fmt_s(x):
    return "–" if x is None else f"{x:.2f}"


def markdown(rows, title):
    lines = [f"### {title}", ""] if title else []
    lines += [
        "| fault | injected | I/Os completed | client errors | verify mismatches (reads / backing file) "
        "| recovery p50 / max (first I/O) | recovery p50 / max (every queue) | longest stall | I/O/s before → during | backend: drops / reconnects / ABORT TASK / LUN RESET |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['what']} | – | – | – | {r['error']} | | | | | |")
            continue
        e = r["events"]
        lines.append(
            f"| {r['what']} | {r['injected']} | {r['ios']} | {r['client_errors']} "
            f"| {r['mismatches']} / {r['file_mismatches']} ({r['file_blocks']} blocks) "
            f"| {fmt_s(r['recovery_p50_s'])} / {fmt_s(r['recovery_max_s'])} s "
            f"| {fmt_s(r['recovery_all_p50_s'])} / {fmt_s(r['recovery_all_max_s'])} s | {fmt_s(r['stall_max_s'])} s "
            f"| {r['rate_before']:.0f} → {r['rate_during']:.0f} "
            f"| {e['drops']} / {e['reconnects']} / {e['aborts']} / {e['lun_resets']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv):
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    out = argv[1]
    opts = dict(zip(argv[2::2], argv[3::2]))
    kinds = [k for k in ORDER if os.path.exists(os.path.join(out, f"{k}.lg.json"))
             or os.path.exists(os.path.join(out, f"{k}.inj.jsonl"))]
    rows = [analyse_kind(out, k) for k in kinds]
    for r in rows:
        if "error" in r:
            print(f"FAULT kind={r['kind']} error=1")
            continue
        e = r["events"]
        print(
            f"FAULT kind={r['kind']} injected={r['injected']} recovered={r['recovered']} ios={r['ios']} "
            f"errors={r['client_errors']} mismatches={r['mismatches']} file_mismatches={r['file_mismatches']} "
            f"file_blocks={r['file_blocks']} drops={e['drops']} reconnects={e['reconnects']} "
            f"nop_timeouts={e['nop_timeouts']} aborts={e['aborts']} lun_resets={e['lun_resets']} "
            f"reissues={e['reissues']} gave_up={e['gave_up']} panics={e['panics']} "
            f"recovery_p50={fmt_s(r['recovery_p50_s'])} recovery_max={fmt_s(r['recovery_max_s'])} "
            f"recovery_all_max={fmt_s(r['recovery_all_max_s'])} "
            f"stall_max={fmt_s(r['stall_max_s'])}"
        )
    if "--json" in opts:
        with open(opts["--json"], "w") as f:
            json.dump({"kinds": rows}, f, indent=1)
    if "--md" in opts:
        with open(opts["--md"], "w") as f:
            f.write(markdown(rows, opts.get("--title", "")))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
