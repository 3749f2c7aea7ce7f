"""Unit tests of the benchmark report code on recorded JSON (bench/lib/testdata).

    python3 -m unittest discover -s bench/lib -p 'test_*.py'
"""
import os
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import charts  # noqa: E402
import report  # noqa: E402
import results_page  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "testdata")


class LoadPoints(unittest.TestCase):
    def setUp(self):
        self.points = charts.load_points(DATA)

    def find(self, comparison_prefix, job, backend):
        hits = [
            p
            for p in self.points
            if p["comparison"].startswith(comparison_prefix) and p["job"] == job and p["backend"] == backend
        ]
        self.assertEqual(len(hits), 1, f"{comparison_prefix} {job} {backend}: {hits}")
        return hits[0]

    def test_every_source_is_read(self):
        comparisons = {p["comparison"] for p in self.points}
        self.assertEqual(len(comparisons), 3, comparisons)

    def test_values_come_from_the_recorded_rows(self):
        p = self.find("iSCSI/TCP", "4k randread 1q QD1", "vhost-iser")
        self.assertAlmostEqual(p["iops"], 9479.19, places=1)
        self.assertAlmostEqual(p["p99_us"], 177.663, places=2)
        self.assertAlmostEqual(p["cpu_us_per_io"], 44.52, places=1)
        q = self.find("vhost layer", "4k randread 1q QD128", "qemu-storage-daemon")
        self.assertEqual(round(q["iops"]), 1234962)

    def test_guest_ratios_are_not_taken_for_a_backend(self):
        backends = {p["backend"] for p in self.points if p["comparison"].startswith("TCG guest")}
        self.assertEqual(backends, {"vhost-iser", "qemu-storage-daemon"})
        g = self.find("TCG guest", "guest randread", "vhost-iser")
        self.assertAlmostEqual(g["cpu_us_per_io"], 19.43, places=1)

    def test_series_aligns_values_with_jobs(self):
        data = charts.series(self.points, "iops")
        jobs, by_backend = data["vhost layer (RAM / null-co)"]
        self.assertEqual(jobs, ["4k randread 1q QD1", "4k randread 1q QD32", "4k randread 1q QD128"])
        self.assertEqual(round(by_backend["vhost-iser"][0]), 131765)
        self.assertEqual(round(by_backend["qemu-storage-daemon"][1]), 955553)
        for values in by_backend.values():
            self.assertEqual(len(values), len(jobs))

    def test_missing_results_give_no_points(self):
        with tempfile.TemporaryDirectory() as d:
            self.assertEqual(charts.load_points(d), [])


class ResultsPage(unittest.TestCase):
    def test_vhost_layer_targets_from_recorded_rows(self):
        import json
        with open(os.path.join(os.path.dirname(__file__), "testdata", "vhost-layer.json")) as f:
            summary = json.load(f)["summary"]
        jobs, table = [], {}
        for r in summary:
            key = (r["job"], r["queues"], r["iodepth"])
            if key not in jobs:
                jobs.append(key)
            # The run record's shape, from the summary row.
            mem = {"peak": {"Private_Dirty": r["backend_private_dirty_peak_mib"] * 1024}}
            table[(key, r["backend"])] = dict(r, backend_mem_kib=mem)
        lines = report.targets_table(table, jobs)
        text = "\n".join(lines)
        self.assertIn("| 1 queue IOPS ≥ 2× qsd at every depth | QD1 ", text)
        self.assertIn("| backend CPU per I/O ≤ 0.5× qsd |", text)
        # (The recorded run has one-queue jobs only: no memory row.)
        self.assertNotIn("4 queues", text)
        # Every row says whether it is met, and the verdicts follow the numbers.
        for row in lines[5:]:
            self.assertRegex(row, r"\| (met|met in \d+ of \d+|NOT met) \|$")
        # A ratio below 2 at one depth cannot be reported as met.
        q = table[(jobs[0], "qsd")]
        table[(jobs[0], "vhost-iser")] = dict(table[(jobs[0], "vhost-iser")], iops=q["iops"])
        self.assertNotIn("| met |", report.targets_table(table, jobs)[5])

    def test_between_finds_the_table(self):
        text = "x\n| a | b |\n|---|---|\n| 1 | 2 |\n\nafter"
        self.assertEqual(results_page.between(text, "| a | b |", "\n\n"), "| a | b |\n|---|---|\n| 1 | 2 |")


if __name__ == "__main__":
    unittest.main()
