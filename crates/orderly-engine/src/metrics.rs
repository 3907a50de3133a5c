//! A small metrics registry: counters and gauges with labels, rendered in the
//! Prometheus text format. Services update it per batch, not per event, on
//! hot paths.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

type Key = (&'static str, Vec<(&'static str, String)>);

/// Upper bounds (seconds) of the latency histograms' buckets.
pub const LATENCY_BUCKETS: [f64; 12] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// Width of the buckets behind [`Metrics::count_at`], in milliseconds.
const WINDOW_BUCKET_MS: i64 = 60_000;
/// How long windowed counts are kept, in milliseconds.
const WINDOW_KEEP_MS: i64 = 7 * 86_400_000;

/// One histogram series: counts per bucket (cumulative when rendered), sum, count.
#[derive(Debug, Clone, Default)]
struct Histogram {
    buckets: Vec<u64>,
    sum: f64,
    count: u64,
}

/// Counters, gauges, histograms, and counts per minute for windowed ratios.
#[derive(Debug, Default)]
pub struct Metrics {
    counters: Mutex<BTreeMap<Key, u64>>,
    gauges: Mutex<BTreeMap<Key, f64>>,
    histograms: Mutex<BTreeMap<Key, Histogram>>,
    windows: Mutex<BTreeMap<(&'static str, i64), u64>>,
    help: Mutex<BTreeMap<&'static str, &'static str>>,
}

fn key(name: &'static str, labels: &[(&'static str, &str)]) -> Key {
    (name, labels.iter().map(|(k, v)| (*k, (*v).to_owned())).collect())
}

impl Metrics {
    /// Adds `by` to a counter.
    pub fn inc(&self, name: &'static str, labels: &[(&'static str, &str)], by: u64) {
        let mut c = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        *c.entry(key(name, labels)).or_insert(0) += by;
    }

    /// Sets a gauge.
    pub fn set(&self, name: &'static str, labels: &[(&'static str, &str)], value: f64) {
        let mut g = self.gauges.lock().unwrap_or_else(|p| p.into_inner());
        g.insert(key(name, labels), value);
    }

    /// Records one observation (seconds) in a histogram with [`LATENCY_BUCKETS`].
    pub fn observe(&self, name: &'static str, labels: &[(&'static str, &str)], value: f64) {
        let mut h = self.histograms.lock().unwrap_or_else(|p| p.into_inner());
        let e = h.entry(key(name, labels)).or_default();
        if e.buckets.is_empty() {
            e.buckets = vec![0; LATENCY_BUCKETS.len()];
        }
        if let Some(i) = LATENCY_BUCKETS.iter().position(|b| value <= *b) {
            e.buckets[i] += 1;
        }
        e.sum += value;
        e.count += 1;
    }

    /// A histogram's observation count (0 when never observed).
    pub fn histogram_count(&self, name: &'static str, labels: &[(&'static str, &str)]) -> u64 {
        let h = self.histograms.lock().unwrap_or_else(|p| p.into_inner());
        h.get(&key(name, labels)).map_or(0, |e| e.count)
    }

    /// A histogram's sum of observations (0 when never observed).
    pub fn histogram_sum(&self, name: &'static str, labels: &[(&'static str, &str)]) -> f64 {
        let h = self.histograms.lock().unwrap_or_else(|p| p.into_inner());
        h.get(&key(name, labels)).map_or(0.0, |e| e.sum)
    }

    /// Counts `by` occurrences of `what` at `at_ms` (engine clock), for
    /// [`Metrics::count_since`]; minute resolution, kept for a week.
    pub fn count_at(&self, what: &'static str, at_ms: i64, by: u64) {
        let mut w = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        let bucket = at_ms.div_euclid(WINDOW_BUCKET_MS);
        *w.entry((what, bucket)).or_insert(0) += by;
        let oldest = bucket - WINDOW_KEEP_MS / WINDOW_BUCKET_MS;
        w.retain(|(_, b), _| *b >= oldest);
    }

    /// Occurrences of `what` counted at or after `since_ms` (to the minute).
    pub fn count_since(&self, what: &'static str, since_ms: i64) -> u64 {
        let w = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        let from = since_ms.div_euclid(WINDOW_BUCKET_MS);
        w.range((what, from)..=(what, i64::MAX)).map(|(_, v)| *v).sum()
    }

    /// Documents a metric (shown as `# HELP`).
    pub fn describe(&self, name: &'static str, help: &'static str) {
        self.help.lock().unwrap_or_else(|p| p.into_inner()).insert(name, help);
    }

    /// A counter's value (0 when never incremented).
    pub fn counter(&self, name: &'static str, labels: &[(&'static str, &str)]) -> u64 {
        let c = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        c.get(&key(name, labels)).copied().unwrap_or(0)
    }

    /// The sum of a counter over all label sets.
    pub fn counter_total(&self, name: &'static str) -> u64 {
        let c = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        c.iter().filter(|((n, _), _)| *n == name).map(|(_, v)| *v).sum()
    }

    /// A gauge's value, if set.
    pub fn gauge(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Option<f64> {
        let g = self.gauges.lock().unwrap_or_else(|p| p.into_inner());
        g.get(&key(name, labels)).copied()
    }

    /// Renders everything in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let help = self.help.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let counters = self.counters.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let gauges = self.gauges.lock().unwrap_or_else(|p| p.into_inner()).clone();
        render_family(&mut out, &help, "counter", counters.iter().map(|(k, v)| (k, *v as f64)));
        render_family(&mut out, &help, "gauge", gauges.iter().map(|(k, v)| (k, *v)));
        let histograms = self.histograms.lock().unwrap_or_else(|p| p.into_inner()).clone();
        render_histograms(&mut out, &help, &histograms);
        out
    }
}

fn render_histograms(out: &mut String, help: &BTreeMap<&'static str, &'static str>, series: &BTreeMap<Key, Histogram>) {
    let mut last: Option<&str> = None;
    for ((name, labels), h) in series {
        if last != Some(name) {
            if let Some(text) = help.get(name) {
                let _ = writeln!(out, "# HELP {name} {text}");
            }
            let _ = writeln!(out, "# TYPE {name} histogram");
            last = Some(name);
        }
        let base = label_text(labels);
        let mut cumulative = 0;
        for (bound, n) in LATENCY_BUCKETS.iter().zip(&h.buckets) {
            cumulative += n;
            let _ = writeln!(
                out,
                "{name}_bucket{{{base}{}le=\"{bound}\"}} {cumulative}",
                if base.is_empty() { "" } else { "," }
            );
        }
        let _ =
            writeln!(out, "{name}_bucket{{{base}{}le=\"+Inf\"}} {}", if base.is_empty() { "" } else { "," }, h.count);
        let braces = if base.is_empty() { String::new() } else { format!("{{{base}}}") };
        let _ = writeln!(out, "{name}_sum{braces} {}", h.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", h.count);
    }
}

fn label_text(labels: &[(&'static str, String)]) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")))
        .collect::<Vec<_>>()
        .join(",")
}

fn render_family<'a>(
    out: &mut String,
    help: &BTreeMap<&'static str, &'static str>,
    kind: &str,
    series: impl Iterator<Item = (&'a Key, f64)>,
) {
    let mut last: Option<&str> = None;
    for ((name, labels), value) in series {
        if last != Some(name) {
            if let Some(h) = help.get(name) {
                let _ = writeln!(out, "# HELP {name} {h}");
            }
            let _ = writeln!(out, "# TYPE {name} {kind}");
            last = Some(name);
        }
        out.push_str(name);
        if !labels.is_empty() {
            out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                let escaped = v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
                let _ = write!(out, "{k}=\"{escaped}\"");
            }
            out.push('}');
        }
        let _ = writeln!(out, " {value}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.describe("orderly_x_total", "Things.");
        m.inc("orderly_x_total", &[("service", "orders")], 2);
        m.inc("orderly_x_total", &[("service", "orders")], 1);
        m.set("orderly_lag_seconds", &[("consumer", "a\"b")], 1.5);
        let text = m.render();
        assert!(text.contains("# TYPE orderly_x_total counter\n"));
        assert!(text.contains("orderly_x_total{service=\"orders\"} 3\n"));
        assert!(text.contains("orderly_lag_seconds{consumer=\"a\\\"b\"} 1.5\n"));
        assert_eq!(m.counter_total("orderly_x_total"), 3);
    }

    #[test]
    fn renders_histograms_cumulatively() {
        let m = Metrics::default();
        m.observe("orderly_t_seconds", &[("route", "/v1/x")], 0.003);
        m.observe("orderly_t_seconds", &[("route", "/v1/x")], 0.2);
        m.observe("orderly_t_seconds", &[("route", "/v1/x")], 99.0);
        let text = m.render();
        assert!(text.contains("# TYPE orderly_t_seconds histogram\n"), "{text}");
        assert!(text.contains("orderly_t_seconds_bucket{route=\"/v1/x\",le=\"0.001\"} 0\n"), "{text}");
        assert!(text.contains("orderly_t_seconds_bucket{route=\"/v1/x\",le=\"0.005\"} 1\n"), "{text}");
        assert!(text.contains("orderly_t_seconds_bucket{route=\"/v1/x\",le=\"0.25\"} 2\n"), "{text}");
        assert!(text.contains("orderly_t_seconds_bucket{route=\"/v1/x\",le=\"+Inf\"} 3\n"), "{text}");
        assert!(text.contains("orderly_t_seconds_count{route=\"/v1/x\"} 3\n"), "{text}");
        assert_eq!(m.histogram_count("orderly_t_seconds", &[("route", "/v1/x")]), 3);
    }

    #[test]
    fn windowed_counts_forget_what_is_older_than_the_window() {
        let m = Metrics::default();
        m.count_at("manual", 0, 2);
        m.count_at("manual", 3_600_000, 1);
        m.count_at("other", 3_600_000, 5);
        assert_eq!(m.count_since("manual", 0), 3);
        assert_eq!(m.count_since("manual", 60_000), 1);
        assert_eq!(m.count_since("manual", 3_660_000), 0);
        assert_eq!(m.count_since("other", 0), 5);
    }
}
