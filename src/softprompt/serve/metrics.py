"""Prometheus metrics of one engine / server, in their own registry (several servers may share a
process, e.g. in tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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
        self.prompts = Gauge("softprompt_prompts_loaded", "Prompts loaded", registry=r)
        self.http = Counter("softprompt_http_requests", "HTTP requests by route and status",
                            ["route", "status"], registry=r)
        self.http_latency = Histogram("softprompt_http_latency_seconds", "HTTP latency by route",
                                      ["route"], buckets=LATENCY_BUCKETS, registry=r)
