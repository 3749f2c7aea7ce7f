#!/usr/bin/env python3
"""Runs libiscsi's iscsi-perf once and writes its result as JSON (for bench/iscsi-tcp.sh).

    iscsiperf.py OUT.json PIDFILE -- iscsi-perf [args...] URL

iscsi-perf prints a progress line per second and, at the end, "iops average N (M MB/s)"; it
has no latency figures. It is the load generator and the iSCSI initiator in one process, so its
CPU time (utime + stime, from wait4's rusage) is the cost of initiator + client together.
The child's pid is written to PIDFILE as soon as it runs (so that tgtd's and its CPU can be
sampled around it). Exit status: 0 ok, 1 iscsi-perf failed or printed no result.
"""
import json
import os
import re
import subprocess
import sys
import time


def main():
    if len(sys.argv) < 5 or sys.argv[3] != "--":
        sys.exit(__doc__)
    out_path, pid_path, cmd = sys.argv[1], sys.argv[2], sys.argv[4:]
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with open(pid_path, "w") as f:
        f.write(f"{p.pid}\n")
    text = p.stdout.read()  # until iscsi-perf closes it (exits)
    _, status, ru = os.wait4(p.pid, 0)
    elapsed = time.monotonic() - t0
    rc = os.waitstatus_to_exitcode(status)
    # progress lines are separated by \r or spaces; the final summary is the last match
    avgs = re.findall(r"iops average (\d+) \((\d+) MB/s\)", text)
    bs = re.search(r"transfer size of (\d+) blocks \((\d+) byte\)", text)
    res = {"cmd": cmd, "rc": rc, "elapsed_s": elapsed,
           "cpu_s": ru.ru_utime + ru.ru_stime,
           "sys_s": ru.ru_stime,
           "maxrss_kib": ru.ru_maxrss,
           "output_tail": text[-600:]}
    ok = rc == 0 and avgs
    if avgs:
        iops = int(avgs[-1][0])
        res["iops"] = iops
        res["bs"] = int(bs.group(2)) if bs else None
        res["mib_s"] = iops * (res["bs"] or 0) / 1048576
        # iscsi-perf reports no I/O count; its run time is the -t argument
        runtime = None
        if "-t" in cmd:
            runtime = float(cmd[cmd.index("-t") + 1])
        res["runtime_s"] = runtime
        res["ios"] = int(iops * (runtime or elapsed))
    if not ok:
        res["error"] = f"iscsi-perf exit status {rc}: " + " ".join(text[-300:].split())
    with open(out_path, "w") as f:
        json.dump(res, f, indent=1)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
