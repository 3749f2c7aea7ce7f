#!/usr/bin/env python3
"""Fills the generated sections of bench/RESULTS.md from the scripts' markdown output.

    results_page.py [bench/RESULTS.md]

Replaces what is between `<!-- BEGIN name -->` and `<!-- END name -->`: `targets` (the
targets table of results/iscsi-tcp.md), `vhost-layer` (the ratio table of
results/vhost-layer.md), `vhost-targets` (its targets table), `iscsi-tcp` (all of results/iscsi-tcp.md but its heading);
and `<!-- T:run -->...` with the date line of the iSCSI/TCP run. Hand-written text is kept.
"""
import os
import re
import sys


def between(text, start, stop):
    i = text.index(start)
    j = text.find(stop, i + len(start)) if stop else -1
    return text[i:j if j >= 0 else len(text)].strip()


def main():
    page = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "RESULTS.md")
    res = os.path.join(os.path.dirname(page), "results")
    iscsi = open(os.path.join(res, "iscsi-tcp.md")).read()
    vlayer = open(os.path.join(res, "vhost-layer.md")).read()
    parts = {
        "targets": between(iscsi, "| target | measured | met? |", None),
        "vhost-layer": between(vlayer, "| job | IOPS | p50 |", "\n\n"),
        "iscsi-tcp": iscsi.split("\n", 1)[1].strip(),
    }
    if "| target | measured | met? |" in vlayer:
        parts["vhost-targets"] = between(vlayer, "| target | measured | met? |", "\n\n")
    text = open(page).read()
    for name, body in parts.items():
        text = re.sub(rf"(<!-- BEGIN {name} -->\n).*?(<!-- END {name} -->)",
                      lambda m: m.group(1) + body + "\n" + m.group(2), text, flags=re.S)
    run = iscsi.split("\n")[2].split(";")[0]
    text = re.sub(r"<!-- T:run -->[^)]*", "<!-- T:run -->" + run.replace("\\", ""), text)
    open(page, "w").write(text)


if __name__ == "__main__":
    main()
