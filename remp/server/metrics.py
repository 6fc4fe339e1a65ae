"""Prometheus metrics of one server, named `remp:...` after vLLM's `vllm:...`.

Request counters and latency histograms are fed by the HTTP layer when a request ends;
engine state (queue lengths, KV usage, preemptions, the current layout) is read from the
engine at scrape time, so it is never stale and needs no background task. Each app gets
its own registry, so a process (a test) can hold several apps.
"""
from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from remp.engine.outputs import RequestOutput
from remp.policy.policy import Decision
from remp.reconfig.transaction import ReconfigResult

# vLLM's buckets, so dashboards built for vLLM read remp unchanged.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0, 960.0, 1920.0, 7680.0)
SWITCH_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ServerMetrics:
    def __init__(self, engine, model_name: str):
        self.registry = CollectorRegistry()
        self._model = model_name
        labels = ["model_name"]
        reg = self.registry
        self.requests = Counter("remp:request_success", "Finished requests by finish reason.",
                                labels + ["finished_reason"], registry=reg)
        self.prompt_tokens = Counter("remp:prompt_tokens", "Prompt tokens of finished requests.",
                                     labels, registry=reg)
        self.generation_tokens = Counter("remp:generation_tokens", "Generated tokens.", labels,
                                         registry=reg)
        self.ttft = Histogram("remp:time_to_first_token_seconds", "Time to first token.", labels,
                              buckets=TTFT_BUCKETS, registry=reg)
        self.tpot = Histogram("remp:time_per_output_token_seconds",
                              "Mean time per output token after the first, per request.", labels,
                              buckets=TPOT_BUCKETS, registry=reg)
        self.e2e = Histogram("remp:e2e_request_latency_seconds", "Arrival to finish.", labels,
                             buckets=E2E_BUCKETS, registry=reg)
        self.reconfigurations = Counter("remp:reconfigurations", "Layout switches by outcome.",
                                        labels + ["outcome"], registry=reg)
        self.reconfiguration_phases = Histogram("remp:reconfiguration_phase_seconds",
                                                "Duration of each phase of a layout switch.", labels + ["phase"],
                                                buckets=SWITCH_BUCKETS, registry=reg)
        self.policy_decisions = Counter("remp:policy_decisions", "Auto-reconfigure decisions by the layout "
                                        "chosen ('stay' or a target).", labels + ["decision"], registry=reg)
        self.policy_last = Info("remp:policy_last_decision", "The latest auto-reconfigure decision and its reason.",
                                labels, registry=reg)
        reg.register(_EngineCollector(engine, model_name))

    def record(self, prompt_tokens: int, last: RequestOutput | None, finish_reason: str) -> None:
        """Count one request that ended with `finish_reason`; `last` is its last output (None
        when it was aborted before producing any)."""
        self.requests.labels(self._model, finish_reason).inc()
        self.prompt_tokens.labels(self._model).inc(prompt_tokens)
        if last is None:
            return
        self.generation_tokens.labels(self._model).inc(len(last.token_ids))
        m = last.metrics
        if m is None or m.first_token_time is None:
            return
        self.ttft.labels(self._model).observe(m.first_token_time - m.arrival_time)
        if len(last.token_ids) > 1 and m.last_token_time is not None:
            self.tpot.labels(self._model).observe(
                (m.last_token_time - m.first_token_time) / (len(last.token_ids) - 1))
        end = m.finished_time or m.last_token_time
        if end is not None:
            self.e2e.labels(self._model).observe(end - m.arrival_time)

    def record_reconfiguration(self, result: ReconfigResult) -> None:
        self.reconfigurations.labels(self._model, result.outcome).inc()
        for phase, seconds in result.timings_s.items():
            self.reconfiguration_phases.labels(self._model, phase).observe(seconds)

    def record_decision(self, current: str, decision: Decision) -> None:
        self.policy_decisions.labels(self._model, decision.target or "stay").inc()
        self.policy_last.labels(self._model).info({"current": current, "target": decision.target or current,
                                                   "reason": decision.reason})

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector(Collector):
    """Engine state, read when Prometheus scrapes."""

    def __init__(self, engine, model_name: str):
        self.engine = engine
        self.model_name = model_name

    def collect(self) -> Iterator[Metric]:
        stats = self.engine.stats()
        topology = self.engine.topology
        gauges = {
            "remp:num_requests_running": ("Requests in the running batch.", stats.num_running),
            "remp:num_requests_waiting": ("Requests waiting to be scheduled.", stats.num_waiting),
            "remp:kv_cache_usage_perc": ("Fraction of KV cache blocks in use (0-1).", stats.kv_usage),
            "remp:num_kv_blocks": ("KV cache blocks in the current layout.", stats.num_kv_blocks),
            "remp:tensor_parallel_size": ("Tensor parallel size of the current layout.", topology.tp),
            "remp:pipeline_parallel_size": ("Pipeline parallel size of the current layout.", topology.pp),
            "remp:data_parallel_size": ("Data parallel size of the current layout.", topology.dp),
            "remp:expert_parallel": ("1 if the current layout spreads whole experts over the ranks (expert "
                                     "parallelism), else 0.", int(topology.ep)),
        }
        for name, (doc, value) in gauges.items():
            gauge = GaugeMetricFamily(name, doc, labels=["model_name"])
            gauge.add_metric([self.model_name], value)
            yield gauge
        counters = {
            "remp:num_preemptions": ("Requests preempted (KV recomputed).", stats.num_preemptions),
            "remp:engine_steps": ("Engine steps completed.", stats.step_count),
            "remp:engine_steps_cut": ("Steps cut short for a layout switch's pause (run again on the new layout).",
                                      stats.steps_cut),
            "remp:worker_replacements": ("Worker processes that died or hung and were replaced.",
                                         stats.num_worker_replacements),
            "remp:step_seconds": ("Wall time from submitting a step to its tokens, summed.", stats.step_wall_s),
            "remp:control_plane_seconds": ("Time spent building, sending and parsing step commands "
                                           "(engine and worker sides), summed.", stats.control_plane_s),
        }
        for name, (doc, value) in counters.items():
            counter = CounterMetricFamily(name, doc, labels=["model_name"])
            counter.add_metric([self.model_name], value)
            yield counter
