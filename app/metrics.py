"""GET /metrics in Prometheus text format: requests, tokens, latency histograms, and the card's state.

Counters and histograms are fed by the per-request records (requestlog.py) when each response closes;
queue depth, runner state, restarts and card status are read from the card at scrape time.
"""
from flask import Blueprint, Response, current_app
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram,
                               disable_created_metrics, generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from app import requestlog
from app.runner.card import CardState

disable_created_metrics()  # no *_created series: they double the output for nothing we use
bp = Blueprint("metrics", __name__)

# Label values come from a fixed set: a client's made-up method or status must not mint new series.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
NPU_STATUSES = ("available", "emulated", "unavailable")


class Metrics:
    def __init__(self, backend):
        self.backend = backend
        self.registry = CollectorRegistry()
        self.requests = Counter("qwen_chat_requests", "HTTP requests by endpoint, method and status",
                                ["endpoint", "method", "status"], registry=self.registry)
        self.prompt_tokens = Counter("qwen_chat_prompt_tokens", "Prompt tokens fed to the card",
                                     ["endpoint"], registry=self.registry)
        self.completion_tokens = Counter("qwen_chat_completion_tokens", "Tokens generated and returned",
                                         ["endpoint"], registry=self.registry)
        self.finished = Counter("qwen_chat_generations", "Generations by finish reason", ["finish_reason"],
                                registry=self.registry)
        # The card feeds prompt tokens at ~14/s, so time to first token ranges from a fraction of a second
        # to over a minute.
        self.ttft = Histogram("qwen_chat_time_to_first_token_seconds", "Arrival to first text",
                              buckets=(0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120), registry=self.registry)
        self.queue_wait = Histogram("qwen_chat_queue_wait_seconds", "Arrival until the card took the request",
                                    buckets=(0.01, 0.1, 0.5, 1, 5, 15, 30, 60, 120, 300), registry=self.registry)
        self.truncated = Counter("qwen_chat_context_truncated_requests", "Requests whose conversation was "
                                 "shortened to fit the window", ["endpoint"], registry=self.registry)
        self.dropped = Counter("qwen_chat_context_dropped", "Messages and tool definitions left out to fit the "
                               "window", ["part"], registry=self.registry)
        self.tool_selections = Counter("qwen_chat_context_tool_selections", "Requests whose tool definitions did not "
                                    "all fit, so that only those the last message asks for were kept",
                                    ["endpoint"], registry=self.registry)
        self.tools_kept = Counter("qwen_chat_context_tools_kept", "Tool definitions kept when only some fit, "
                                  "as sent or compacted", ["rendering"], registry=self.registry)
        self.tools_unfit = Counter("qwen_chat_context_tool_unfit", "Requests that needed a tool none of whose "
                                   "renderings fit the window, answered without the card", ["endpoint"],
                                   registry=self.registry)
        self.classes = Counter("qwen_chat_card_requests", "Requests that used the card, by class",
                               ["request_class"], registry=self.registry)
        self.tokens_per_second = Histogram("qwen_chat_tokens_per_second", "Output tokens per second",
                                           buckets=(1, 2, 4, 8, 10, 12, 14, 16, 20, 30, 100, 1000, 10000),
                                           registry=self.registry)
        self.registry.register(_CardCollector(backend))

    def observe(self, record):
        method = record.method if record.method in METHODS else "other"
        status = str(record.status) if isinstance(record.status, int) and 100 <= record.status <= 599 else "other"
        self.requests.labels(record.endpoint, method, status).inc()
        if record.prompt_tokens is not None and record.completion_tokens is not None:
            self.prompt_tokens.labels(record.endpoint).inc(record.prompt_tokens)
            self.completion_tokens.labels(record.endpoint).inc(record.completion_tokens)
        if record.finish_reason:
            self.finished.labels(record.finish_reason).inc()
        if record.ttft is not None:
            self.ttft.observe(record.ttft)
        if record.queue_wait is not None:
            self.queue_wait.observe(record.queue_wait)
        if record.tokens_per_second:
            self.tokens_per_second.observe(record.tokens_per_second)
        if record.request_class:
            self.classes.labels(record.request_class).inc()
        fit = record.fit
        if fit is None:
            return
        if fit.dropped_messages or fit.dropped_tools:
            self.truncated.labels(record.endpoint).inc()
            self.dropped.labels("messages").inc(fit.dropped_messages)
            self.dropped.labels("tools").inc(fit.dropped_tools)
        if fit.kept_tools is not None:
            self.tool_selections.labels(record.endpoint).inc()
            self.tools_kept.labels("as_sent").inc(len(fit.kept_tools) - fit.compacted_tools)
            self.tools_kept.labels("compacted").inc(fit.compacted_tools)
        if fit.unfit_tool:
            self.tools_unfit.labels(record.endpoint).inc()


class _CardCollector:
    """The card's state, read when Prometheus scrapes."""

    def __init__(self, backend):
        self.backend = backend

    def collect(self):
        card = self.backend.card
        yield self._labelled(GaugeMetricFamily, "qwen_chat_queue_depth", "Requests waiting for the card, by class",
                             "request_class", card.queue_depths())
        yield self._labelled(GaugeMetricFamily, "qwen_chat_runner_state", "The runner's state (1 for the current "
                             "one)", "state", {state.value: int(card.state == state) for state in CardState})
        yield self._labelled(GaugeMetricFamily, "qwen_chat_npu_status", "The card's status (1 for the current one)",
                             "status", {status: int(card.npu == status) for status in NPU_STATUSES})
        for family, name, documentation, value in (
                (CounterMetricFamily, "qwen_chat_preemptions", "Background generations interrupted for a person's "
                 "request (and run again later)", card.preemptions),
                (GaugeMetricFamily, "qwen_chat_card_busy", "1 while the card is generating", int(card.busy)),
                (CounterMetricFamily, "qwen_chat_generations_retried", "Generations run again (once) on a new "
                 "runner after the runner failed under them before their client saw text", card.retries),
                (CounterMetricFamily, "qwen_chat_runner_restarts", "Runner starts after the first", card.restarts),
                (GaugeMetricFamily, "qwen_chat_runner_consecutive_failures", "Failures since the last success",
                 card.failures)):
            metric = family(name, documentation)
            metric.add_metric([], value)
            yield metric

    @staticmethod
    def _labelled(family, name, documentation, label, values):
        metric = family(name, documentation, labels=[label])
        for key, value in values.items():
            metric.add_metric([key], value)
        return metric


@bp.get("/metrics")
def metrics():
    registry = current_app.extensions["qwen_metrics"].registry
    return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)


def init_app(app, backend):
    """After requestlog.init_app: the counters are fed by its request records."""
    metrics = Metrics(backend)
    app.extensions["qwen_metrics"] = metrics
    requestlog.add_observer(app, metrics.observe)
    app.register_blueprint(bp)
