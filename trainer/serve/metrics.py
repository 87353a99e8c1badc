"""Prometheus metrics of a `llmctl serve` replica (prometheus_client, one registry per replica).

    llmctl_serve_requests_total{run,code}             requests answered, by HTTP status (rate: requests/s)
    llmctl_serve_tokens_total{run}                    generated tokens (rate: tokens/s)
    llmctl_serve_time_to_first_token_seconds{run}     request arrival -> first token, histogram
    llmctl_serve_queue_depth{run}                     requests waiting for a batch row
    llmctl_serve_active_requests{run}                 requests decoding now

`run` is the served run's name, the label the training metrics (trainer/metrics.py) carry too, so the fleet
dashboard's `$run` filter covers both. Served on the replica's own port (pod port `llm-serve`, 9500), which
the chart's serve PodMonitor scrapes; the chart's `LlmctlServeErrorRate` alert reads the requests counter.
"""

from __future__ import annotations

METRICS_PORT = 9500  # next to the trainer's 9400 + rank (trainer/metrics.py); pod port `llm-serve`
# Time to first token buckets: a CPU toy answers in milliseconds, a queued GPU request in seconds.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SERVE_METRIC_NAMES = (
    "llmctl_serve_requests_total", "llmctl_serve_tokens_total", "llmctl_serve_time_to_first_token_seconds_bucket",
    "llmctl_serve_time_to_first_token_seconds_sum", "llmctl_serve_time_to_first_token_seconds_count",
    "llmctl_serve_queue_depth", "llmctl_serve_active_requests",
)


class ServeMetrics:
    """The replica's metrics; `engine` (trainer/serve/batching.py BatchEngine) is read for the two gauges."""

    def __init__(self, run: str, engine) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.run = run
        self.requests = Counter("llmctl_serve_requests", "Requests answered, by HTTP status code",
                                ["run", "code"], registry=r)
        self.tokens = Counter("llmctl_serve_tokens", "Tokens generated", ["run"], registry=r).labels(run)
        self.ttft = Histogram("llmctl_serve_time_to_first_token_seconds", "Request arrival to first token",
                              ["run"], buckets=TTFT_BUCKETS, registry=r).labels(run)
        Gauge("llmctl_serve_queue_depth", "Requests waiting for a batch row", ["run"],
              registry=r).labels(run).set_function(lambda: engine.queue_depth)
        Gauge("llmctl_serve_active_requests", "Requests decoding now", ["run"],
              registry=r).labels(run).set_function(lambda: engine.active)
        self.port: int | None = None
        self.host: str | None = None

    def count(self, code: int) -> None:
        self.requests.labels(self.run, str(code)).inc()

    def serve_http(self, port: int, host: str = "0.0.0.0") -> None:
        """Expose the registry on `host`:`port` (0: any free one); if it is taken, the next of 8 ports, else none.
        `host`: where the API listens (`serve --local --host 127.0.0.1` keeps the metrics on loopback too)."""
        from prometheus_client import start_http_server

        for p in ([0] if port == 0 else range(port, port + 8)):
            try:
                server, _ = start_http_server(p, addr=host, registry=self.registry)
            except OSError:
                continue
            self.port, self.host = server.server_port, host
            return
