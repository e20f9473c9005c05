//! Prometheus metrics, kept by hand (text exposition format 0.0.4).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Latency buckets, seconds.
const BUCKETS: &[f64] =
    &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0];

#[derive(Default)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, v: f64) {
        if self.counts.is_empty() {
            self.counts = vec![0; BUCKETS.len()];
        }
        for (i, b) in BUCKETS.iter().enumerate() {
            if v <= *b {
                self.counts[i] += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {}", self.counts.get(i).copied().unwrap_or(0));
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

/// All counters of the server.
#[derive(Default)]
pub struct Metrics {
    /// (route, status) -> count
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    prompt_tokens: AtomicU64,
    generated_tokens: AtomicU64,
    in_flight: AtomicU64,
    ttft: Mutex<Histogram>,
    latency: Mutex<Histogram>,
    queue_time: Mutex<Histogram>,
}

impl Metrics {
    pub fn record_request(&self, route: &str, status: u16) {
        let mut m = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry((route.to_string(), status)).or_default() += 1;
    }

    pub fn add_tokens(&self, prompt: u64, generated: u64) {
        self.prompt_tokens.fetch_add(prompt, Ordering::Relaxed);
        self.generated_tokens.fetch_add(generated, Ordering::Relaxed);
    }

    pub fn observe_ttft(&self, seconds: f64) {
        self.ttft.lock().unwrap_or_else(|e| e.into_inner()).observe(seconds);
    }

    pub fn observe_latency(&self, seconds: f64) {
        self.latency.lock().unwrap_or_else(|e| e.into_inner()).observe(seconds);
    }

    pub fn observe_queue(&self, seconds: f64) {
        self.queue_time.lock().unwrap_or_else(|e| e.into_inner()).observe(seconds);
    }

    pub fn in_flight_inc(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    pub fn in_flight_dec(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// The exposition text; `queue_depth`, `running` and `max_batch` come from the scheduler.
    pub fn render(&self, queue_depth: usize, running: usize, max_batch: usize) -> String {
        let mut out = String::new();
        out.push_str("# HELP videollava_requests_total HTTP requests answered, by route and status.\n");
        out.push_str("# TYPE videollava_requests_total counter\n");
        for ((route, status), n) in self.requests.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(out, "videollava_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}");
        }
        let gauge = |out: &mut String, name: &str, kind: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        gauge(
            &mut out,
            "videollava_prompt_tokens_total",
            "counter",
            "Prompt tokens processed.",
            self.prompt_tokens.load(Ordering::Relaxed),
        );
        gauge(
            &mut out,
            "videollava_generated_tokens_total",
            "counter",
            "Tokens generated.",
            self.generated_tokens.load(Ordering::Relaxed),
        );
        gauge(
            &mut out,
            "videollava_requests_in_flight",
            "gauge",
            "Chat completion requests being handled.",
            self.in_flight.load(Ordering::Relaxed),
        );
        gauge(
            &mut out,
            "videollava_queue_depth",
            "gauge",
            "Requests waiting in the scheduler's queue.",
            queue_depth as u64,
        );
        gauge(&mut out, "videollava_running_requests", "gauge", "Requests in the running batch.", running as u64);
        gauge(&mut out, "videollava_max_batch_size", "gauge", "Largest running batch allowed.", max_batch as u64);
        self.ttft.lock().unwrap_or_else(|e| e.into_inner()).write(
            &mut out,
            "videollava_time_to_first_token_seconds",
            "Time from submission to the first generated token.",
        );
        self.latency.lock().unwrap_or_else(|e| e.into_inner()).write(
            &mut out,
            "videollava_request_latency_seconds",
            "Time from the request's arrival to its last token.",
        );
        self.queue_time.lock().unwrap_or_else(|e| e.into_inner()).write(
            &mut out,
            "videollava_queue_time_seconds",
            "Time requests waited in the scheduler's queue.",
        );
        out
    }
}

/// Running requests reading another one's keys and values (the same bits: questions about one
/// video) instead of their own.
pub fn render_batch_sharing(s: &videollava::engine::SchedulerStats) -> String {
    let mut out = String::new();
    for (name, kind, help, v) in [
        (
            "videollava_batch_shared_positions",
            "gauge",
            "Cached positions of running requests read from another request's keys and values.",
            s.shared_positions as u64,
        ),
        (
            "videollava_batch_shared_position_reads_total",
            "counter",
            "Positions decode steps read from another request's keys and values instead of their own.",
            s.shared_position_reads,
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
    }
    out
}

/// Videos decoded from request bytes and kept by content ([`videollava::media::recent`]).
pub fn render_media_cache(s: &videollava::media::recent::RecentStats) -> String {
    let mut out = String::new();
    for (name, kind, help, v) in [
        ("videollava_media_cache_hits_total", "counter", "Videos taken decoded from memory (same bytes).", s.hits),
        ("videollava_media_cache_misses_total", "counter", "Videos decoded.", s.misses),
        ("videollava_media_cache_bytes", "gauge", "Bytes of decoded frames held.", s.bytes as u64),
        ("videollava_media_cache_entries", "gauge", "Decoded videos held.", s.entries as u64),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
    }
    out
}

/// The engine's prefix cache (computed prompt prefixes reused by later prompts) in the
/// exposition format.
pub fn render_prefix_cache(s: &videollava::model::prefix_cache::PrefixCacheStats) -> String {
    let mut out = String::new();
    for (name, kind, help, v) in [
        ("videollava_prefix_cache_hits_total", "counter", "Prompts that reused a cached prefix.", s.hits),
        ("videollava_prefix_cache_misses_total", "counter", "Prompts with no cached prefix.", s.misses),
        (
            "videollava_prefix_cache_reused_tokens_total",
            "counter",
            "Prompt positions taken from the prefix cache instead of the decoder.",
            s.reused_tokens,
        ),
        ("videollava_prefix_cache_bytes", "gauge", "Bytes of keys/values held by the prefix cache.", s.bytes as u64),
        ("videollava_prefix_cache_capacity_bytes", "gauge", "Byte budget of the prefix cache.", s.capacity as u64),
        ("videollava_prefix_cache_entries", "gauge", "Prefix segments held.", s.entries as u64),
        ("videollava_prefix_cache_disk_loads_total", "counter", "Saved prefixes read.", s.disk_loads),
        ("videollava_prefix_cache_disk_saves_total", "counter", "Prefixes saved.", s.disk_saves),
        (
            "videollava_prefix_cache_disk_rejected_total",
            "counter",
            "Saved prefixes ignored (another model, dtype or cache format, or damaged).",
            s.disk_rejected,
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
    }
    out
}
