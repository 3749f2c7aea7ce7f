#!/usr/bin/env python3
"""Reads processes' CPU time whenever a guest job starts or ends (bench/guest-fio.sh).

    cpu_markers.py DIR OUT.json NAME=PID [NAME=PID]...

Polls DIR every 20 ms for new marker files (JOB.start, JOB.end, written by
bench/lib/guest-fio-jobs.sh inside the guest over a 9p share). For each new one it records
the wall time, the host's load average and, for every NAME=PID, utime+stime of the whole
process (all threads; /proc/PID/stat fields 14 and 15) in seconds and the context switches
of all its threads ("cs"). Writes OUT.json on
SIGTERM/SIGINT: {"clk_tck": .., "markers": {"JOB.start": {"t":.., "loadavg":[..],
"cpu": {NAME: seconds}}}, "first": {...}, "last": {...}}.
"""
import json
import os
import signal
import sys
import time

TCK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid):
    """utime+stime of process PID in seconds, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    # the command name (field 2) may contain spaces: split after its closing parenthesis
    fields = data[data.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / TCK


def ctxt_switches(pid):
    """Voluntary + involuntary context switches summed over the process's threads."""
    n = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        n += int(line.split()[1])
    except OSError:
        return None
    return n


def sample(pids):
    with open("/proc/loadavg") as f:
        load = [float(x) for x in f.read().split()[:3]]
    return {"t": time.time(), "loadavg": load,
            "cpu": {name: cpu_s(pid) for name, pid in pids.items()},
            "cs": {name: ctxt_switches(pid) for name, pid in pids.items()}}


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    watch, out = sys.argv[1], sys.argv[2]
    pids = {}
    for arg in sys.argv[3:]:
        name, _, pid = arg.partition("=")
        pids[name] = int(pid)
    res = {"clk_tck": TCK, "pids": pids, "markers": {}, "first": sample(pids)}
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    while not stop:
        try:
            names = os.listdir(watch)
        except OSError:
            names = []
        for n in names:
            if (n.endswith(".start") or n.endswith(".end")) and n not in res["markers"]:
                res["markers"][n] = sample(pids)
        time.sleep(0.02)
    res["last"] = sample(pids)
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=1)
    os.replace(tmp, out)


if __name__ == "__main__":
    main()
