"""Prometheus metrics of the server, written in the text exposition format (version 0.0.4) without a client
library: counters by label, gauges read when scraped, and cumulative histograms."""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(pairs: tuple[tuple[str, str], ...]) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}" if pairs else ""


def _number(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class Counter:
    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.label_names = name, help, labels
        self.values: dict[tuple, float] = {}
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0, **labels) -> None:
        key = tuple((name, str(labels[name])) for name in self.label_names)
        with self._lock:
            self.values[key] = self.values.get(key, 0.0) + amount

    def get(self, **labels) -> float:
        return self.values.get(tuple((name, str(labels[name])) for name in self.label_names), 0.0)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        with self._lock:
            lines += [f"{self.name}{_labels(k)} {_number(v)}" for k, v in sorted(self.values.items())]
        return lines


class Gauge:
    """A value read when scraped (`read`), e.g. the queue's length."""

    def __init__(self, name: str, help: str, read: Callable[[], float]):
        self.name, self.help, self.read = name, help, read

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge", f"{self.name} {_number(self.read())}"]


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help, tuple(sorted(buckets))
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self.counts[bisect.bisect_left(self.buckets, value)] += 1
            self.sum += value
            self.count += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        with self._lock:
            total = 0
            for bound, n in zip(self.buckets + (float("inf"),), self.counts):
                total += n
                lines.append(f'{self.name}_bucket{{le="{_number(bound)}"}} {total}')
            lines += [f"{self.name}_sum {_number(self.sum)}", f"{self.name}_count {self.count}"]
        return lines


class Metrics:
    """Everything /metrics shows. The queue gauges read the batcher when scraped."""

    def __init__(self, queue_length: Callable[[], float] = lambda: 0, running: Callable[[], float] = lambda: 0,
                 ready: Callable[[], float] = lambda: 0):
        self.requests = Counter("lightpipe_requests_total", "HTTP requests answered, by route and status.",
                                ("route", "status"))
        self.queue_seconds = Histogram("lightpipe_queue_seconds",
                                       "Seconds a request waited in the queue before its batch started.", SECONDS)
        self.inference_seconds = Histogram("lightpipe_inference_seconds", "Seconds the model took per batch.",
                                           SECONDS)
        self.batch_size = Histogram("lightpipe_batch_size", "Inputs per model batch.", SIZES)
        self.gauges = [
            Gauge("lightpipe_queue_length", "Requests waiting for the model.", lambda: queue_length()),
            Gauge("lightpipe_running_requests", "Requests whose batch is running.", lambda: running()),
            Gauge("lightpipe_model_ready", "1 once the pipeline is loaded.", lambda: ready()),
        ]

    def render(self) -> str:
        lines: list[str] = []
        for metric in (self.requests, *self.gauges, self.queue_seconds, self.inference_seconds, self.batch_size):
            lines += metric.render()
        return "\n".join(lines) + "\n"
