//! A latency histogram of atomic counters, encoded as a Prometheus histogram.
//!
//! `prometheus-client`'s own `Histogram` takes a mutex on every observation; this one is on the
//! request path of every request, so each observation is three relaxed atomic adds instead
//! (the bucket, the count, the sum in nanoseconds) and no lock.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

#[derive(Debug)]
struct Inner {
    /// Upper bounds in seconds, ascending; an implicit `+Inf` bucket follows.
    bounds: &'static [f64],
    /// One counter per bound, plus `+Inf` (not cumulative).
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

/// A lock-free histogram of durations. Clones share the same counters.
#[derive(Debug, Clone)]
pub struct AtomicHistogram(Arc<Inner>);

impl AtomicHistogram {
    /// A histogram with these upper bounds (seconds, ascending).
    pub fn new(bounds: &'static [f64]) -> Self {
        Self(Arc::new(Inner {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_nanos: AtomicU64::new(0),
        }))
    }

    /// Records one duration.
    pub fn observe(&self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        let inner = &*self.0;
        let bucket = inner
            .bounds
            .iter()
            .position(|bound| secs <= *bound)
            .unwrap_or(inner.bounds.len());
        inner.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        inner.count.fetch_add(1, Ordering::Relaxed);
        inner.sum_nanos.fetch_add(
            u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.0.count.load(Ordering::Relaxed)
    }
}

impl TypedMetric for AtomicHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for AtomicHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let inner = &*self.0;
        let buckets: Vec<(f64, u64)> = inner
            .bounds
            .iter()
            .copied()
            // prometheus-client writes an infinite bound as `+Inf`.
            .chain(std::iter::once(f64::INFINITY))
            .zip(inner.buckets.iter().map(|b| b.load(Ordering::Relaxed)))
            .collect();
        let sum = inner.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(
            sum,
            inner.count.load(Ordering::Relaxed),
            &buckets,
            None,
        )
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::registry::Registry;

    #[test]
    fn encodes_cumulative_buckets_count_and_sum() {
        static BOUNDS: [f64; 2] = [0.01, 0.1];
        let h = AtomicHistogram::new(&BOUNDS);
        h.observe(Duration::from_millis(5));
        h.observe(Duration::from_millis(50));
        h.observe(Duration::from_millis(60));
        h.observe(Duration::from_secs(2));
        let mut registry = Registry::default();
        registry.register("latency_seconds", "test", h.clone());
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        assert!(
            out.contains("latency_seconds_bucket{le=\"0.01\"} 1"),
            "{out}"
        );
        assert!(
            out.contains("latency_seconds_bucket{le=\"0.1\"} 3"),
            "{out}"
        );
        assert!(
            out.contains("latency_seconds_bucket{le=\"+Inf\"} 4"),
            "{out}"
        );
        assert!(out.contains("latency_seconds_count 4"), "{out}");
        assert!(out.contains("latency_seconds_sum 2.115"), "{out}");
        assert_eq!(h.count(), 4);
    }
}
