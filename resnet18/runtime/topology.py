"""Who this process is in the job: input pipelines, its own pipeline, whether it is the chief.

Decided here once, for the launcher (from TF_CONFIG, before TensorFlow starts) and
for training (from the strategy), so the two can never disagree:

- The chief is the `chief` task when the cluster has one, else worker 0. It alone
  keeps checkpoints, TensorBoard events, the summary and the report.
- MultiWorkerMirroredStrategy has one input pipeline per worker process.
- TPUStrategy is driven by one Python process (also on multi-host pod slices, where
  the other hosts only serve); that process is the chief, and there is one input
  pipeline per TPU host (`InputContext.num_input_pipelines == extended.num_hosts`).
- Every other strategy is one process, one pipeline, chief.

    python -c "import resnet18.runtime.topology as t; help(t)"
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

TRAINING_ROLES = ("chief", "worker")


def chief_task(cluster: Mapping[str, Sequence[Any]]) -> tuple[str, int]:
    """(task type, index) of the chief of a TF_CONFIG cluster: the `chief` task, else worker 0."""
    return ("chief", 0) if cluster.get("chief") else ("worker", 0)


def training_tasks(cluster: Mapping[str, Sequence[Any]]) -> int:
    """Tasks that train (chief and workers): one input pipeline each."""
    return sum(len(cluster.get(role, [])) for role in TRAINING_ROLES)


@dataclasses.dataclass(frozen=True)
class Topology:
    """This process's place in the job, as training sees it."""

    num_replicas: int  # replicas in sync, over all processes
    num_input_pipelines: int  # one per worker process (MultiWorkerMirrored) or per TPU host
    num_processes: int  # Python processes that run this loop; > 1: decisions must be agreed on
    is_chief: bool
    task: str  # e.g. "worker 1", for messages


def tpu_topology(num_replicas: int, num_hosts: int) -> Topology:
    """A TPU slice: one Python process (the chief) drives every host; one input pipeline per host."""
    return Topology(num_replicas, max(1, num_hosts), 1, True, "TPU client")


def topology_of(strategy: Any) -> Topology:
    """The Topology of `strategy` (a tf.distribute.Strategy)."""
    import tensorflow as tf

    replicas = strategy.num_replicas_in_sync
    if isinstance(strategy, tf.distribute.TPUStrategy):
        return tpu_topology(replicas, int(strategy.extended.num_hosts))
    resolver = getattr(strategy, "cluster_resolver", None)
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and resolver is not None \
            and resolver.task_type is not None:
        cluster = resolver.cluster_spec().as_dict()
        is_chief = (resolver.task_type, resolver.task_id) == chief_task(cluster)
        tasks = max(1, training_tasks(cluster))
        return Topology(replicas, tasks, tasks, is_chief, f"{resolver.task_type} {resolver.task_id}")
    return Topology(replicas, 1, 1, True, "local")


def describe(strategy: Any) -> dict[str, object]:
    """Name, replica count and devices, for --dry_run and the run summary."""
    import tensorflow as tf

    extended = strategy.extended
    devices = list(getattr(extended, "worker_devices", []) or [])
    names = [(tf.distribute.MultiWorkerMirroredStrategy, "MultiWorkerMirroredStrategy"),
             (tf.distribute.TPUStrategy, "TPUStrategy")]
    name = next((label for kind, label in names if isinstance(strategy, kind)), type(strategy).__name__)
    return {
        "strategy": name,
        "num_replicas": strategy.num_replicas_in_sync,
        "devices": devices,
    }
