"""Prometheus metrics of one engine / server, in their own registry (several servers may share a
process, e.g. in tests)."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """Counters, gauges and histograms exported at ``/metrics``."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("softprompt_requests", "Engine requests by kind and outcome",
                                ["kind", "outcome"], registry=r)
        self.batch_rows = Histogram("softprompt_batch_rows", "Rows per forward pass (classify: one batch; "
                                    "generate: one decoding step)", ["kind"], buckets=ROW_BUCKETS, registry=r)
        self.queue_depth = Gauge("softprompt_queue_depth", "Requests waiting to be batched", registry=r)
        self.generation_rows = Gauge("softprompt_generation_rows", "Rows in the running generation batch", registry=r)
        self.latency = Histogram("softprompt_request_latency_seconds", "Engine latency from queueing to result",
                                 ["kind"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("softprompt_queue_wait_seconds", "Time from queueing to the first forward pass",
                                    ["kind"], buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("softprompt_generated_tokens", "Tokens generated", registry=r)
        self.prompts = Gauge("softprompt_prompts_loaded", "Prompts usable by name (resident, or indexed in --prompts)",
                             registry=r)
        self.http = Counter("softprompt_http_requests", "HTTP requests by route and status",
                            ["route", "status"], registry=r)
        self.http_latency = Histogram("softprompt_http_latency_seconds", "HTTP latency by route",
                                      ["route"], buckets=LATENCY_BUCKETS, registry=r)

    def watch_store(self, stats: Callable[[], object]) -> None:
        """Export the prompt store's numbers (``PromptBank.stats``), read at each scrape."""
        self.registry.register(_StoreCollector(stats))


class _StoreCollector:
    """The prompt store at ``/metrics``: resident prompts and bytes, the byte limit, cache hits,
    misses and evictions, the seconds spent loading prompt files and prefilling prefixes, and the
    prefix spill's files, bytes and counts."""

    def __init__(self, stats: Callable[[], object]):
        self.stats = stats

    def collect(self):
        s = self.stats()
        yield GaugeMetricFamily("softprompt_prompts_resident", "Prompts whose entry is in the prefix cache", value=s.resident)
        yield GaugeMetricFamily("softprompt_prefix_cache_bytes", "Bytes of the resident prompts (tensors and key/value prefixes)",
                                value=s.bytes)
        yield GaugeMetricFamily("softprompt_prefix_cache_limit_bytes", "--prefix-cache-mb, in bytes", value=s.limit)
        yield CounterMetricFamily("softprompt_prefix_cache_hits", "Prompt look-ups answered from the cache", value=s.hits)
        yield CounterMetricFamily("softprompt_prefix_cache_misses", "Prompt look-ups that were not resident", value=s.misses)
        yield CounterMetricFamily("softprompt_prefix_cache_evictions", "Prompts dropped to stay within the limit",
                                  value=s.evictions)
        yield CounterMetricFamily("softprompt_prompt_load_seconds", "Seconds spent reading, parsing and checking prompts",
                                  value=s.load_seconds)
        yield CounterMetricFamily("softprompt_prefix_prefill_seconds", "Seconds spent computing prompts' key/value prefixes",
                                  value=s.prefill_seconds)
        yield CounterMetricFamily("softprompt_prefix_prefills", "Key/value prefixes computed", value=s.prefills)
        d = s.spill  # the prefixes on disk (--prefix-spill-mb); zeros when off
        yield GaugeMetricFamily("softprompt_prefix_spill_files", "Input-prompt prefixes kept on disk", value=d.files)
        yield GaugeMetricFamily("softprompt_prefix_spill_bytes", "Bytes of the prefix files on disk", value=d.bytes)
        yield GaugeMetricFamily("softprompt_prefix_spill_limit_bytes", "--prefix-spill-mb, in bytes (0: off)", value=d.limit)
        for name, what, value in (
            ("hits", "Prefixes read back from disk instead of computed", d.hits),
            ("misses", "Prefixes looked for on disk and not found (then computed)", d.misses),
            ("writes", "Computed prefixes written to disk", d.writes),
            ("evictions", "Prefix files deleted to stay within the limit", d.evictions),
            ("errors", "Unusable prefix files found (deleted) and failed writes", d.errors),
            ("dropped", "Computed prefixes not written: the write queue was full", d.dropped),
            ("read_seconds", "Seconds spent reading prefixes back from disk", d.read_seconds),
        ):
            yield CounterMetricFamily(f"softprompt_prefix_spill_{name}", what, value=value)
