"""What a launch will do, said one way: printed by `--dry_run` and at the start of every real run.

The dry run and the real run resolve the strategy with the same function
(`strategy.resolve_strategy_name`) and describe it with the same printer
(`describe`), so a dry run can never promise what the run then refuses.

    python -m launcher --job jobs/cpu_smoke.yaml --dry_run
"""

from __future__ import annotations

import dataclasses
import json

from launcher.cluster import ClusterSpec
from resnet18.config import Config

STRATEGY_CLASSES = {"one_device": "OneDeviceStrategy", "mirrored": "MirroredStrategy",
                    "multi_worker": "MultiWorkerMirroredStrategy", "tpu": "TPUStrategy"}


@dataclasses.dataclass
class Plan:
    """A resolved launch: the strategy and where it runs, before or after it exists."""

    config: Config
    workdir: str
    strategy: str  # the strategy's class name, e.g. MirroredStrategy
    cluster: ClusterSpec | None = None  # this task's TF_CONFIG on a cluster
    local_workers: int | None = None  # --workers N
    min_workers: int | None = None  # --min_workers M (elastic: down to M workers)
    network: str | None = None  # where a local group's network is (launcher/isolation.py)
    gpus: tuple[str | None, ...] = ()  # CUDA_VISIBLE_DEVICES per local worker (None: all it sees)
    evaluator: bool = False  # a sidecar evaluator task
    num_replicas: int | None = None  # known once the strategy exists (or from --workers)
    devices: tuple[str, ...] = ()
    started: bool = False  # whether the strategy was created (a dry run on a cluster does not connect)


def describe(plan: Plan) -> str:
    """The plan as `key: value` lines (the same in a dry run and in the real run)."""
    lines = [f"strategy: {plan.strategy}"
             + ("" if plan.started or plan.local_workers else " (not started in a dry run)")]
    if plan.local_workers:
        devices = "; ".join(f"worker {rank}: {'CPU' if not gpus else 'GPU ' + gpus}"
                            for rank, gpus in enumerate(plan.gpus)) if any(plan.gpus) else "each on the CPU"
        lines.append(f"workers: {plan.local_workers} local processes on 127.0.0.1 ({devices})"
                     + (" and a sidecar evaluator" if plan.evaluator else ""))
    if plan.num_replicas is not None:
        lines.append(f"num_replicas: {plan.num_replicas}")
        per_replica = plan.config.train.global_batch_size // plan.num_replicas
        lines.append(f"batch: {plan.config.train.global_batch_size} global = {plan.num_replicas} x {per_replica}")
    if plan.network:
        lines.append(plan.network)
    if plan.local_workers and plan.min_workers and plan.min_workers < plan.local_workers:
        fewest = plan.min_workers * (plan.num_replicas // plan.local_workers)
        lines.append(f"elastic: down to {plan.min_workers} worker(s); each replica's batch then grows up to "
                     f"{plan.config.train.global_batch_size // fewest}: an out-of-memory there exits 1, not retried")
    if plan.devices:
        lines.append(f"devices: {', '.join(plan.devices)}")
    if plan.cluster is not None and plan.cluster.is_evaluator:
        lines.append("role: evaluator (sidecar: evaluates each new checkpoint of the chief; joins no collective)")
    elif plan.cluster is not None:
        cluster = plan.cluster
        lines.append(f"role: {cluster.task_type} {cluster.task_index} (rank {cluster.rank} of {cluster.num_tasks}, "
                     f"{'chief' if cluster.is_chief else 'not chief'})")
        lines.append(f"chief: {cluster.chief_address}")
        lines.append(f"cluster: {json.dumps(cluster.cluster)}")
    lines.append(f"workdir: {plan.workdir}")
    return "\n".join(lines)
