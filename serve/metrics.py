"""Prometheus metrics, served over HTTP on their own port (`lstmgen serve --metrics-port`).

Hot-path rule: the scheduler's worker thread reports once per model call (`on_decode`,
`on_prefill`), never per row or token. Row and queue gauges and the token counters are read from
the scheduler only when /metrics is scraped. The edge (event loop) reports once per stream.
Each server owns its registry: no module-level state, several servers per process are fine.
"""
from __future__ import annotations

import bisect
import itertools
import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector, ProcessCollector
from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from lstmgen.errors import UserError

TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
ITL_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
STEP_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
STATUSES = ("OK", "CANCELLED", "DEADLINE_EXCEEDED", "INVALID_ARGUMENT", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED",
            "UNAVAILABLE", "INTERNAL", "UNAUTHENTICATED")
REASONS = ("overloaded", "invalid_argument", "failed_precondition", "shutting_down", "unauthenticated")


class MetricsBindError(UserError, OSError):
    """The metrics address cannot be listened on."""


class WeightedHistogram:
    """A histogram that takes `n` equal observations at once: one step's rows all waited the same
    gap, so the inter-token histogram costs one lock per step instead of one per token."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self._counts = [0] * (len(bounds) + 1)  # last: above every bound
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float, n: int = 1) -> None:
        i = bisect.bisect_left(self.bounds, value)  # first bucket with value <= le
        with self._lock:
            self._counts[i] += n
            self._sum += value * n

    def family(self, name: str, doc: str) -> HistogramMetricFamily:
        with self._lock:
            counts, total = list(self._counts), self._sum
        cum = list(itertools.accumulate(counts))
        buckets = [(floatToGoString(b), c) for b, c in zip(self.bounds, cum)] + [("+Inf", cum[-1])]
        return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=total)


class _FrameCollector:
    """A frame model's scheduler (serve/frame_scheduler.py), read at scrape time."""

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def describe(self):
        return []

    def collect(self):
        s = self.scheduler
        yield GaugeMetricFamily("lstmgen_frame_streams", "Frame streams open", value=s.open_streams)
        yield CounterMetricFamily("lstmgen_frames", "Frames run through the model", value=s.frames)
        yield CounterMetricFamily("lstmgen_frame_calls", "Model calls that ran frames", value=s.steps)


class _SchedulerCollector:
    """Gauges and counters the scheduler already keeps, read at scrape time."""

    def __init__(self, scheduler, itl: WeightedHistogram):
        self.scheduler, self.itl = scheduler, itl

    def describe(self):
        return []  # unchecked collector: its names are fixed below

    def collect(self):
        st = self.scheduler.stats()
        yield GaugeMetricFamily("lstmgen_active_rows", "Rows in the model: prefill plus generating",
                                value=st.active_rows)
        yield GaugeMetricFamily("lstmgen_generating_rows", "Rows in the decode batch", value=st.generating_rows)
        yield GaugeMetricFamily("lstmgen_parked_streams", "Streams whose generation waits for their reader to take "
                                "its output (--max-unread-output)", value=st.parked)
        yield GaugeMetricFamily("lstmgen_queued_streams", "Accepted streams waiting for a row", value=st.queued)
        yield GaugeMetricFamily("lstmgen_streams_in_system", "Accepted streams not finished yet (queued + active)",
                                value=self.scheduler.in_system)
        yield CounterMetricFamily("lstmgen_generated_tokens", "Tokens generated", value=st.tokens_generated)
        yield CounterMetricFamily("lstmgen_prompt_tokens", "Prompt tokens prefilled", value=st.prompt_tokens)
        yield CounterMetricFamily("lstmgen_decode_steps", "Decode steps run", value=st.steps)
        yield self.itl.family("lstmgen_inter_token_latency_seconds",
                              "Gap between a row's consecutive tokens (per decode step, weighted by its rows)")
        cache = getattr(self.scheduler, "prefix_cache", None)
        if cache is not None:
            pc = cache.stats()
            yield CounterMetricFamily("lstmgen_prefix_cache_hits", "Prompts that found a cached prefix state",
                                      value=pc.hits)
            yield CounterMetricFamily("lstmgen_prefix_cache_misses", "Prompts that found no cached prefix state",
                                      value=pc.misses)
            yield CounterMetricFamily("lstmgen_prefix_cache_tokens_saved", "Prompt tokens not prefilled thanks to "
                                      "the prefix cache", value=pc.tokens_saved)
            yield CounterMetricFamily("lstmgen_prefix_cache_evictions", "Prefix states dropped to stay in budget",
                                      value=pc.evictions)
            yield GaugeMetricFamily("lstmgen_prefix_cache_bytes", "Bytes held by the prefix cache",
                                    value=pc.bytes_held)
            yield GaugeMetricFamily("lstmgen_prefix_cache_entries", "Prefix states held", value=pc.entries)


class Metrics:
    """Every metric of one server. Implements the scheduler's StepObserver."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)  # process_resident_memory_bytes, cpu seconds, open fds
        PlatformCollector(registry=r)
        self.open_streams = Gauge("lstmgen_open_streams", "Generate calls in progress at the gRPC edge",
                                  registry=r)
        requests = Counter("lstmgen_requests", "Generate calls, and calls refused before any handler ran (auth), "
                           "by final status", ["status"], registry=r)
        self._requests = {s: requests.labels(s) for s in STATUSES}
        self._requests_family = requests
        rejections = Counter("lstmgen_rejections", "Calls refused before generating, by reason", ["reason"],
                             registry=r)
        self._rejections = {s: rejections.labels(s) for s in REASONS}
        self.ttft = Histogram("lstmgen_time_to_first_token_seconds",
                              "From the call's arrival to its first token (queueing and prefill included)",
                              buckets=TTFT_BUCKETS, registry=r)
        step = Histogram("lstmgen_step_seconds", "Duration of one model call", ["kind"], buckets=STEP_BUCKETS,
                         registry=r)
        rows = Histogram("lstmgen_batch_rows", "Rows in one model call", ["kind"], buckets=ROW_BUCKETS, registry=r)
        self._step_decode, self._step_prefill = step.labels("decode"), step.labels("prompt")
        # beside the decode step: what choosing its tokens adds to each inter-token gap
        self._sampling = Histogram("lstmgen_sampling_seconds", "Choosing the next tokens of one decode step "
                                   "(penalties and the sampler, all rows)", buckets=STEP_BUCKETS, registry=r)
        self._rows_decode, self._rows_prefill = rows.labels("decode"), rows.labels("prompt")
        self.itl = WeightedHistogram(ITL_BUCKETS)
        self._http = None

    def watch(self, scheduler) -> None:
        self.registry.register(_SchedulerCollector(scheduler, self.itl))

    def watch_frames(self, scheduler) -> None:
        self.registry.register(_FrameCollector(scheduler))

    # -- the scheduler's worker thread, once per model call ---------------------------------------
    def on_decode(self, rows: int, seconds: float, gap_s: float | None) -> None:
        self._step_decode.observe(seconds)
        self._rows_decode.observe(rows)
        if gap_s is not None:
            self.itl.observe(gap_s, rows)

    def on_prefill(self, rows: int, tokens: int, seconds: float) -> None:
        self._step_prefill.observe(seconds)
        self._rows_prefill.observe(rows)

    def on_sample(self, rows: int, seconds: float) -> None:
        self._sampling.observe(seconds)

    # -- the gRPC edge, once per call ------------------------------------------------------------
    def stream_ended(self, status: str) -> None:
        counter = self._requests.get(status)
        (counter or self._requests_family.labels(status)).inc()

    def rejected(self, reason: str) -> None:
        self._rejections[reason].inc()

    def refused(self, status: str, reason: str) -> None:
        """A call refused before any handler ran (auth): like every call it counts once under its
        final status, and once under why it was refused."""
        self.stream_ended(status)
        self.rejected(reason)

    # -- HTTP ------------------------------------------------------------------------------------
    def serve(self, host: str, port: int) -> int:
        """Expose /metrics on host:port (0: a free port); returns the bound port."""
        try:
            self._http, _thread = start_http_server(port, host, registry=self.registry)
        except OSError as e:  # bare, "[Errno 98] Address already in use" names neither flag nor port
            raise MetricsBindError(f"cannot listen on {host}:{port} for metrics (--metrics-port): {e.strerror}; "
                                   "free the port or choose another --metrics-port (0: any free port), and a "
                                   "--metrics-host of this machine") from None
        return self._http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
