#!/usr/bin/env python3
"""Samples a process's memory while a benchmark job runs.

    procmon.py PID OUT.json [INTERVAL_S]

Reads /proc/PID/smaps_rollup every INTERVAL_S (default 0.2 s) and keeps the first sample
(backend idle, before the job) and the maximum of every field. Once, about one second in (the
job is running by then), it reads the full /proc/PID/smaps and records, per mapping, the
memfd mappings (the client's buffers and rings, which vhost-user maps into the backend) and the
largest mapping, so that the report can show where private memory sits. Writes OUT.json when it
gets SIGTERM/SIGINT or the process exits.
"""
import json
import signal
import sys
import time

FIELDS = ("Rss", "Pss", "Shared_Clean", "Shared_Dirty", "Private_Clean", "Private_Dirty",
          "Anonymous", "Swap")


def read_rollup(pid):
    vals = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[0].rstrip(":") in FIELDS and parts[2] == "kB":
                vals[parts[0].rstrip(":")] = int(parts[1])
    return vals


def read_smaps(pid):
    """Returns a list of mappings: {name, size_kib, <FIELDS in KiB>}."""
    maps = []
    cur = None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            parts = line.split()
            if not parts:
                continue
            if "-" in parts[0] and not parts[0].endswith(":"):
                lo, hi = parts[0].split("-")
                cur = {"name": " ".join(parts[5:]) if len(parts) > 5 else "[anon]",
                       "size_kib": (int(hi, 16) - int(lo, 16)) // 1024}
                maps.append(cur)
            elif cur is not None and parts[0].rstrip(":") in FIELDS and len(parts) >= 3:
                cur[parts[0].rstrip(":")] = int(parts[1])
    return maps


def summarize_maps(maps):
    memfd = {}
    for m in maps:
        if "memfd:" in m["name"]:
            agg = memfd.setdefault(m["name"], {"mappings": 0, "size_kib": 0,
                                               **{k: 0 for k in FIELDS}})
            agg["mappings"] += 1
            agg["size_kib"] += m["size_kib"]
            for k in FIELDS:
                agg[k] += m.get(k, 0)
    largest = max(maps, key=lambda m: m.get("Private_Dirty", 0), default=None)
    return {"memfd": memfd, "largest_private_dirty_mapping": largest}


def main():
    pid = int(sys.argv[1])
    out = sys.argv[2]
    interval = float(sys.argv[3]) if len(sys.argv) > 3 else 0.2
    state = {"first_kib": None, "max_kib": {}, "samples": 0, "detail": None, "error": None}
    stop = {"flag": False}

    def on_signal(_sig, _frm):
        stop["flag"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    t0 = time.monotonic()
    while not stop["flag"]:
        try:
            r = read_rollup(pid)
            if state["first_kib"] is None:
                state["first_kib"] = r
            for k, v in r.items():
                state["max_kib"][k] = max(v, state["max_kib"].get(k, 0))
            state["samples"] += 1
            if state["detail"] is None and time.monotonic() - t0 >= 1.0:
                state["detail"] = summarize_maps(read_smaps(pid))
        except FileNotFoundError:
            state["error"] = "process exited"
            break
        except (OSError, ValueError) as e:
            state["error"] = str(e)
            break
        time.sleep(interval)
    with open(out, "w") as f:
        json.dump(state, f, indent=1)


if __name__ == "__main__":
    main()
