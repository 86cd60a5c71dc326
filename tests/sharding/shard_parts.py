"""Real parts for the sharding machine tests: keys, a signed plan, and SecAgg+ clients driving a WorkerRound.

Nothing is faked: signatures are Ed25519, the worker's SecAgg+ server is the real one, and the
devices are real SecAgg+ client machines whose messages go through the codec both ways.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from aggregator.rounds.cohort import CohortPolicy
from aggregator.rounds.host_round import HostConfig, draft_plan, start_host_round
from aggregator.sharding.coordinator_round import ShardingPolicy, start_coordinator_round
from aggregator.sharding.work_messages import Task, TaskResult
from aggregator.sharding.worker_round import COORDINATOR, WorkerConfig, handle_worker, start_worker
from aggregator.strategy import make_strategy
from edge_sdk.privacy.encoding import EncodingParams
from edge_sdk.protocol.layout import ParameterLayout
from edge_sdk.protocol.messages import Ready
from edge_sdk.protocol.plan import RoundPlan, Sampling, SecAggPolicy, TrainingPlan
from edge_sdk.secagg import codec
from edge_sdk.secagg.client import ClientConfig, handle_client, start_client
from edge_sdk.secagg.keys import IdentityKey

FLEET = "shardfleet"
PARAMS = {"w": np.zeros(7, dtype=np.float32)}
BITS = 24


@dataclass
class Parts:
    aggregator: IdentityKey
    identities: dict[str, IdentityKey]
    host: HostConfig
    plan: RoundPlan  # signed

    @property
    def devices(self) -> list[str]:
        return sorted(self.identities)


def build(n: int = 12, t_honest: int = 5) -> Parts:
    identities = {f"dev-{i:02d}": IdentityKey.generate() for i in range(n)}
    aggregator = IdentityKey.generate()
    layout = ParameterLayout.of(PARAMS)
    host = HostConfig(FLEET, aggregator, {d: k.public for d, k in identities.items()}, layout,
                      make_strategy("fedavg"), CohortPolicy(min_size=2, max_size=n, over_selection=0.0))
    encoding = EncodingParams(dim=layout.dim, clip=10.0, gamma=1e-4, bits=BITS, rotation_seed=bytes(range(16)))
    plan = draft_plan(host, PARAMS, round_index=1, model_version=0,
                      training=TrainingPlan(epochs=1, batch_size=4, lr=0.1, seed=1), encoding=encoding,
                      mechanism="skellam", noise_multiplier=1e-3, t_honest=t_honest, privacy_mode="distributed",
                      sampling=Sampling.server(sorted(identities)),
                      secagg=SecAggPolicy(dropout_fraction=0.0, colluding_fraction=0.0, stage_timeout=10.0))
    return Parts(aggregator, identities, host, start_host_round(host, plan, PARAMS, 0.0).state.plan)


def coordinator(parts: Parts, workers=("w0", "w1"), shared: bool = False, parts_count: int = 2,
                claim_timeout: float = 5.0, max_attempts: int = 2):
    policy = ShardingPolicy(shared, 2, claim_timeout, max_attempts, parts_count)
    return start_coordinator_round(parts.host, policy, parts.plan, PARAMS, 0.0, tuple(workers)).state


def ready(parts: Parts, device: str) -> Ready:
    return Ready(FLEET, device, parts.plan.round_index, parts.plan.digest).sign(parts.identities[device])


def task_for(parts: Parts, cohort, task_id: int = 0, attempt: int = 0, worker: str = "w0") -> Task:
    return Task(FLEET, parts.plan.round_index, task_id, attempt, worker, parts.plan.to_bytes(), tuple(cohort),
                parts.host.enrolled.digest).sign(parts.aggregator)


def worker(parts: Parts, worker_id: str = "w0"):
    return start_worker(WorkerConfig(FLEET, worker_id, parts.aggregator, parts.host.enrolled))


def run_task(parts: Parts, state, task: Task, inputs: dict[str, np.ndarray]):
    """Hand ``task`` to the worker machine and play its devices; returns the worker state and its results."""
    results: list[TaskResult] = []
    clients = {}
    step = handle_worker(state, task, 0.0)
    state = step.state
    downlink = deque()
    for send in step.sends:
        (results.append(send.message) if send.to == COORDINATOR else downlink.append((send.to, send.message)))
    plan = parts.plan
    for d in inputs:
        config = ClientConfig(d, parts.identities[d], parts.aggregator.public, parts.host.enrolled,
                              stage_timeout=60.0, colluding_fraction=0.0)
        clients[d] = start_client(config, inputs[d], 0.0, plan.round_index, t_honest=plan.t_honest)
    while downlink:
        device, message = downlink.popleft()
        if device not in clients:
            continue
        clients[device], replies = handle_client(clients[device], codec.decode(codec.encode(message)), 0.0)
        for reply in replies:
            step = handle_worker(state, codec.decode(codec.encode(reply)), 0.0)
            state = step.state
            for send in step.sends:
                (results.append(send.message) if send.to == COORDINATOR
                 else downlink.append((send.to, send.message)))
    return state, results


def inputs_for(parts: Parts, cohort, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    length = parts.plan.vector_length
    return {d: rng.integers(0, 1 << BITS, length, dtype=np.uint64).astype(np.uint32) for d in cohort}
