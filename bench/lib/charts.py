#!/usr/bin/env python3
"""Charts of the benchmark results: IOPS, p99 latency and backend CPU per I/O per peer.

    charts.py [RESULTS_DIR [OUT_DIR]]     (defaults: bench/results, bench/charts)

Reads the JSON the benchmark scripts write (vhost-layer.json, iscsi-tcp.json,
guest-fio.json; any that is missing is left out) and draws one grouped bar chart
per measure: bench/charts/iops.png, latency-p99.png, cpu-per-io.png. The data
extraction (`load_points`) is plain Python and unit-tested; only `draw` needs
matplotlib (Debian: python3-matplotlib).
"""
import json
import os
import sys

# (file, comparison title) in the order the charts show them.
SOURCES = [
    ("vhost-layer.json", "vhost layer (RAM / null-co)"),
    ("iscsi-tcp.json", "iSCSI/TCP to tgtd null LUN"),
    ("guest-fio.json", "TCG guest fio via tgtd"),
]

COLORS = {
    "vhost-iser": "tab:orange",
    "qemu-storage-daemon": "tab:blue",
    "iscsi-perf (no vhost)": "tab:gray",
}

BACKEND_NAMES = {
    "vhost-iser": "vhost-iser",
    "qsd": "qemu-storage-daemon",
    "iscsi-perf": "iscsi-perf (no vhost)",
}


def _point(comparison, job, backend, iops, p99_us, cpu_s_per_mio):
    return {
        "comparison": comparison,
        "job": job,
        "backend": BACKEND_NAMES.get(backend, backend),
        "iops": float(iops) if iops is not None else None,
        "p99_us": float(p99_us) if p99_us is not None else None,
        # CPU seconds per million I/Os = CPU microseconds per I/O.
        "cpu_us_per_io": float(cpu_s_per_mio) if cpu_s_per_mio is not None else None,
    }


def load_points(results_dir):
    """One dict per (comparison, job, backend) from the scripts' JSON summaries."""
    points = []
    for name, title in SOURCES:
        path = os.path.join(results_dir, name)
        if not os.path.exists(path):
            continue
        with open(path) as f:
            summary = json.load(f).get("summary")
        if isinstance(summary, list):
            # vhost-layer.json and iscsi-tcp.json: a row per job and backend.
            for row in summary:
                if row.get("error"):
                    continue
                points.append(
                    _point(
                        title,
                        row["job"],
                        row["backend"],
                        row.get("iops"),
                        row.get("p99_us"),
                        row.get("backend_cpu_s_per_mio"),
                    )
                )
        elif isinstance(summary, dict):
            # guest-fio.json: {job: {backend: values}}.
            for job, backends in summary.items():
                if not isinstance(backends, dict):
                    continue
                for backend, v in backends.items():
                    # Ratio entries sit next to the backends; they are not one.
                    if backend.startswith("ratio") or not isinstance(v, dict) or "iops" not in v:
                        continue
                    points.append(
                        _point(
                            title,
                            f"guest {job}",
                            backend,
                            v.get("iops"),
                            v.get("clat_p99_us"),
                            v.get("backend_cpu_s_per_mio"),
                        )
                    )
    return points


def series(points, measure):
    """{comparison: (jobs, {backend: [value per job or None]})} for one measure."""
    out = {}
    for p in points:
        if p[measure] is None:
            continue
        jobs, by_backend = out.setdefault(p["comparison"], ([], {}))
        if p["job"] not in jobs:
            jobs.append(p["job"])
    for p in points:
        if p[measure] is None:
            continue
        jobs, by_backend = out[p["comparison"]]
        values = by_backend.setdefault(p["backend"], [None] * len(jobs))
        values += [None] * (len(jobs) - len(values))
        values[jobs.index(p["job"])] = p[measure]
    return out


MEASURES = [
    ("iops", "IOPS (higher is better)", "iops.png", True),
    ("p99_us", "p99 latency, µs (lower is better)", "latency-p99.png", True),
    ("cpu_us_per_io", "backend CPU µs per I/O (lower is better)", "cpu-per-io.png", False),
]


def draw(points, out_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    written = []
    for measure, label, filename, log in MEASURES:
        data = series(points, measure)
        if not data:
            continue
        fig, axes = plt.subplots(1, len(data), figsize=(5.5 * len(data), 4.2), squeeze=False)
        for ax, (comparison, (jobs, by_backend)) in zip(axes[0], data.items()):
            n = max(len(by_backend), 1)
            width = 0.8 / n
            for i, (backend, values) in enumerate(sorted(by_backend.items())):
                xs = [j + (i - (n - 1) / 2) * width for j in range(len(jobs))]
                ys = [v if v is not None else 0 for v in values]
                ax.bar(xs, ys, width, label=backend, color=COLORS.get(backend))
            ax.set_xticks(range(len(jobs)))
            ax.set_xticklabels([j.replace("4k randread ", "4k rr ") for j in jobs], rotation=30, ha="right", fontsize=8)
            ax.set_title(comparison, fontsize=10)
            # Log scale only where values span more than a decade and a half:
            # elsewhere it exaggerates small differences.
            vals = [v for vs in by_backend.values() for v in vs if v]
            if log and vals and max(vals) / min(vals) > 30:
                ax.set_yscale("log")
            ax.grid(axis="y", alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(label)
        fig.tight_layout()
        path = os.path.join(out_dir, filename)
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    results = sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "..", "results")
    out = sys.argv[2] if len(sys.argv) > 2 else os.path.join(here, "..", "charts")
    points = load_points(results)
    if not points:
        sys.exit(f"charts.py: no results found in {results}")
    for p in draw(points, out):
        print(f"charts.py: wrote {os.path.normpath(p)}")


if __name__ == "__main__":
    main()
