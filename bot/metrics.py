"""Prometheus metrics of one bot process, served on localhost when `[metrics].enabled`.

Every metric lives in a registry its owner passes in or gets fresh (never prometheus_client's global default
registry), so a process, a ChatCore in a test, or two of them side by side each count only their own jobs.

    drawbot_queue_length                  jobs waiting for the GPU (the one drawing not counted)
    drawbot_jobs_accepted_total{platform} jobs written to the queue
    drawbot_jobs_total{outcome}           finished jobs: done, failed, cancelled
    drawbot_refusals_total{reason}        submissions refused: a limit (cooldown, hourly, ...), policy, restarting
    drawbot_seconds_per_step              histogram of the mean seconds per denoising step of each job
    drawbot_generation_seconds            histogram of the time one picture took on the GPU
    drawbot_peak_vram_bytes               peak GPU memory reserved by the last job (absent on CPU)
    drawbot_delivery_failures_total{platform}  attempts to send a finished picture that failed
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from engine.jobs import GenerationResult

log = logging.getLogger(__name__)

OUTCOMES = ("done", "failed", "cancelled")

# Seconds per step run from ~0.05 (tiny model, resident 24 GB card) to ~5 (8 GB card, DiffSynth offload).
STEP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 16.0)
GENERATION_BUCKETS = (1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0, 600.0)


class Metrics:
    """The counters the chat core and the runner update. Cheap to create; one per process (or per test)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.queue_length = Gauge("drawbot_queue_length", "Jobs waiting for the GPU, not counting the one drawing",
                                  registry=r)
        self.jobs_accepted = Counter("drawbot_jobs_accepted", "Jobs accepted into the queue", ["platform"],
                                     registry=r)
        self.jobs = Counter("drawbot_jobs", "Finished jobs by outcome", ["outcome"], registry=r)
        self.refusals = Counter("drawbot_refusals", "Submissions refused, by the limit or rule that applied",
                                ["reason"], registry=r)
        self.seconds_per_step = Histogram("drawbot_seconds_per_step", "Mean seconds per denoising step of a job",
                                          buckets=STEP_BUCKETS, registry=r)
        self.generation_seconds = Histogram("drawbot_generation_seconds", "Seconds one picture took on the GPU",
                                            buckets=GENERATION_BUCKETS, registry=r)
        self.peak_vram_bytes = Gauge("drawbot_peak_vram_bytes", "Peak GPU memory reserved by the last job",
                                     registry=r)
        self.delivery_failures = Counter("drawbot_delivery_failures", "Failed attempts to deliver a picture",
                                         ["platform"], registry=r)
        for outcome in OUTCOMES:  # show every outcome at 0 from the start, so rate() works before the first failure
            self.jobs.labels(outcome)

    def track_queue(self, length: Callable[[], int]) -> None:
        """Read the queue length from `length()` at every scrape (no bookkeeping to get out of step)."""
        self.queue_length.set_function(lambda: float(length()))

    def accepted(self, platform: str) -> None:
        self.jobs_accepted.labels(platform).inc()

    def refused(self, reason: str) -> None:
        self.refusals.labels(str(reason)).inc()

    def finished(self, outcome: str, result: GenerationResult | None = None) -> None:
        """A job ended. `result` (for done jobs) feeds the timing and memory metrics."""
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r} (expected one of {', '.join(OUTCOMES)})")
        self.jobs.labels(outcome).inc()
        if result is None:
            return
        self.generation_seconds.observe(result.seconds)
        if result.seconds_per_step > 0:
            self.seconds_per_step.observe(result.seconds_per_step)
        if result.peak_vram_bytes is not None:
            self.peak_vram_bytes.set(result.peak_vram_bytes)

    def delivery_failed(self, platform: str) -> None:
        self.delivery_failures.labels(platform).inc()


@dataclass
class MetricsServer:
    """The /metrics HTTP endpoint running on a daemon thread."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def host(self) -> str:
        return str(self.server.server_address[0])

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def serve(metrics: Metrics, host: str, port: int) -> MetricsServer:
    """Serve `metrics` on http://host:port/metrics (port 0 = any free port). Raises OSError if it cannot listen."""
    server, thread = start_http_server(port, addr=host, registry=metrics.registry)
    if host not in ("127.0.0.1", "::1", "localhost"):
        log.warning("metrics are served on %s:%d, reachable from other machines; 127.0.0.1 keeps them local",
                    host, server.server_address[1])
    return MetricsServer(server, thread)
