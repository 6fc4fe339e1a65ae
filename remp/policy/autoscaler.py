"""`remp serve --auto-reconfigure`: the policy, run against the live server.

Every `interval_s` it records the scheduler's state in the engine's load tracker, asks the
policy (the same `Policy.decide` the simulator calls) and, when the policy names a target,
switches through the same transaction as `POST /v1/admin/reconfigure`. Every decision is
logged and handed to `on_decision` (the server exports it to /metrics); every switch result to
`on_result`. A switch that rolls back leaves the policy's dwell timer alone, so it may retry.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from remp.policy.policy import Decision, Policy
from remp.reconfig.transaction import ReconfigInProgress, ReconfigResult
from remp.topology import Topology

if TYPE_CHECKING:
    from remp.engine.async_engine import AsyncEngine

log = logging.getLogger("remp.autoscaler")


class AutoReconfigurer:
    def __init__(self, engine: "AsyncEngine", policy: Policy, interval_s: float,
                 on_decision: Callable[[str, Decision], None], on_result: Callable[[ReconfigResult], None]):
        if interval_s <= 0:
            raise ValueError(f"the policy interval must be positive, not {interval_s}")
        self.engine = engine
        self.policy = policy
        self.interval_s = interval_s
        self.on_decision = on_decision
        self.on_result = on_result

    async def run(self) -> None:
        """Decide forever (cancel the task to stop); a failed switch is logged, never fatal."""
        while True:
            await asyncio.sleep(self.interval_s)
            if not self.engine.alive:
                return
            await self.decide_once()

    async def decide_once(self) -> ReconfigResult | None:
        now = time.monotonic()
        stats = self.engine.stats()
        self.engine.load.observe(now, stats.num_running, stats.num_waiting, stats.kv_usage)
        current = str(self.engine.topology)
        decision = self.policy.decide(self.engine.load.stats(now), current, now)
        log.info("policy at %s -> %s: %s", current, decision.target or "stay", decision.reason)
        self.on_decision(current, decision)
        if decision.target is None:
            return None
        try:
            result = await self.engine.reconfigure(Topology.parse(decision.target))
        except ReconfigInProgress:  # an operator's switch is running; decide again next time
            return None
        self.on_result(result)
        if result.outcome == "committed":
            self.policy.on_switched(time.monotonic(), decision.target)
        log.info("auto switch %s -> %s: %s in %.2f s (pause %.0f ms)%s", current, decision.target, result.outcome,
                 result.timings_s.get("total", 0.0), 1000 * result.timings_s.get("pause", 0.0),
                 f": {result.reason}" if result.reason else "")
        return result
