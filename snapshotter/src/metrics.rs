//! The snapshotter's Prometheus metrics. One [`Metrics`] is shared by the
//! snapshot service (operation latencies) and the daemon manager (daemons,
//! recoveries, and figures scraped from each daemon).

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RecoveryLabels {
    pub how: &'static str,
}

pub struct Metrics {
    registry: Registry,
    op_seconds: Family<OpLabels, Histogram>,
    daemon_deaths: Counter,
    daemon_hangs: Counter,
    daemon_recoveries: Family<RecoveryLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("lode_snapshotter");
        let op_seconds = Family::<OpLabels, Histogram>::new_with_constructor(|| {
            // 50 µs .. ~3.3 s
            Histogram::new(exponential_buckets(0.00005, 2.0, 17))
        });
        registry.register(
            "operation_duration_seconds",
            "Latency of snapshot API operations",
            op_seconds.clone(),
        );
        let daemon_deaths = Counter::default();
        registry.register(
            "daemon_deaths",
            "lode-fsd daemons that died (crashed or were killed)",
            daemon_deaths.clone(),
        );
        let daemon_hangs = Counter::default();
        registry.register(
            "daemon_hangs",
            "lode-fsd daemons killed for missing a call's deadline (then recovered like dead ones)",
            daemon_hangs.clone(),
        );
        let daemon_recoveries = Family::<RecoveryLabels, Counter>::default();
        registry.register(
            "daemon_recoveries",
            "Daemons recovered, by how (failover: takeover of the live FUSE connection; restart: new mount)",
            daemon_recoveries.clone(),
        );
        Self {
            registry,
            op_seconds,
            daemon_deaths,
            daemon_hangs,
            daemon_recoveries,
        }
    }

    /// Records one snapshot API operation (`prepare`, `commit`, ...).
    pub fn observe_op(&self, op: &'static str, elapsed: Duration) {
        self.op_seconds
            .get_or_create(&OpLabels { op })
            .observe(elapsed.as_secs_f64());
    }

    pub fn daemon_died(&self) {
        self.daemon_deaths.inc();
    }

    pub fn daemon_hung(&self) {
        self.daemon_hangs.inc();
    }

    /// `how` is "failover" or "restart".
    pub fn daemon_recovered(&self, how: &'static str) {
        self.daemon_recoveries
            .get_or_create(&RecoveryLabels { how })
            .inc();
    }

    /// The registry, for metrics other modules register.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// Prometheus text exposition of everything registered.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_show_in_the_exposition() {
        let metrics = Metrics::new();
        metrics.observe_op("prepare", Duration::from_millis(3));
        let text = metrics.encode();
        assert!(
            text.contains("lode_snapshotter_operation_duration_seconds_count{op=\"prepare\"} 1"),
            "{text}"
        );
    }
}
