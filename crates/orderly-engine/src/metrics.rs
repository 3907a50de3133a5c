//! A small metrics registry: counters and gauges with labels, rendered in the
//! Prometheus text format. Services update it per batch, not per event, on
//! hot paths.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

type Key = (&'static str, Vec<(&'static str, String)>);

/// Counters and gauges.
#[derive(Debug, Default)]
pub struct Metrics {
    counters: Mutex<BTreeMap<Key, u64>>,
    gauges: Mutex<BTreeMap<Key, f64>>,
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
        out
    }
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
}
