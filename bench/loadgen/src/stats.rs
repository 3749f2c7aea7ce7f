//! Latency histograms and the summary numbers reported for a run.

use hdrhistogram::Histogram;

/// Highest latency the histogram can hold (60 s, in ns); longer ones are clamped to it.
const MAX_TRACKABLE_NS: u64 = 60_000_000_000;

/// Per-thread latency histogram in nanoseconds.
///
/// HDR log buckets with 3 significant digits: every recorded value is kept with a relative error
/// below 0.1 %, whatever its magnitude, at a fixed memory cost per thread.
pub struct LatencyHist(Histogram<u64>);

impl LatencyHist {
    /// An empty histogram (1 ns .. 60 s, 3 significant figures: about 200 KiB).
    pub fn new() -> Result<Self, hdrhistogram::CreationError> {
        Ok(LatencyHist(Histogram::new_with_bounds(
            1,
            MAX_TRACKABLE_NS,
            3,
        )?))
    }

    /// Records one latency; values out of range are clamped rather than dropped so that the
    /// I/O count and the histogram count always agree.
    pub fn record_ns(&mut self, ns: u64) {
        self.0.saturating_record(ns.clamp(1, MAX_TRACKABLE_NS));
    }

    /// Adds every sample of `other` into `self`.
    pub fn merge(&mut self, other: &LatencyHist) {
        // Both histograms come from `new()` with the same bounds, so adding cannot fail; if it
        // ever did, fall back to a per-value merge that clamps.
        if self.0.add(&other.0).is_err() {
            for v in other.0.iter_recorded() {
                self.0
                    .saturating_record_n(v.value_iterated_to(), v.count_at_value());
            }
        }
    }

    /// Number of samples.
    #[cfg(test)]
    pub fn len(&self) -> u64 {
        self.0.len()
    }

    /// Summary in microseconds.
    pub fn summary_us(&self) -> LatencySummary {
        let h = &self.0;
        if h.is_empty() {
            return LatencySummary::default();
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        LatencySummary {
            min: us(h.min()),
            mean: h.mean() / 1000.0,
            p50: us(h.value_at_quantile(0.50)),
            p90: us(h.value_at_quantile(0.90)),
            p99: us(h.value_at_quantile(0.99)),
            p99_9: us(h.value_at_quantile(0.999)),
            max: us(h.max()),
        }
    }
}

/// Latency percentiles in microseconds.
#[derive(Debug, Default, Clone, Copy, PartialEq, serde::Serialize)]
pub struct LatencySummary {
    /// Fastest I/O.
    pub min: f64,
    /// Arithmetic mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    #[serde(rename = "p99.9")]
    pub p99_9: f64,
    /// Slowest I/O.
    pub max: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_known_distribution() {
        let mut h = LatencyHist::new().unwrap();
        for i in 1..=1000u64 {
            h.record_ns(i * 1000); // 1..=1000 µs
        }
        let s = h.summary_us();
        assert!((s.p50 - 500.0).abs() < 1.0, "{s:?}");
        assert!((s.p90 - 900.0).abs() < 1.0, "{s:?}");
        assert!((s.p99 - 990.0).abs() < 1.0, "{s:?}");
        assert!((s.max - 1000.0).abs() < 1.0, "{s:?}");
        assert!((s.min - 1.0).abs() < 0.01, "{s:?}");
    }

    #[test]
    fn merge_adds_counts_and_clamps() {
        let mut a = LatencyHist::new().unwrap();
        let mut b = LatencyHist::new().unwrap();
        a.record_ns(0); // clamped to 1 ns, still counted
        b.record_ns(u64::MAX); // clamped to 60 s
        a.merge(&b);
        assert_eq!(a.len(), 2);
        assert!(a.summary_us().max >= 59_000_000.0);
        assert_eq!(
            LatencyHist::new().unwrap().summary_us(),
            LatencySummary::default()
        );
    }
}
