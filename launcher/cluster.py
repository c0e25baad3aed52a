"""TF_CONFIG: read once, validated before any TensorFlow server starts.

Cluster systems (Kubeflow TFJob, Vertex AI, Slurm wrappers, our own
`--workers` launcher) describe a multi-worker job in the TF_CONFIG environment
variable. TensorFlow reports mistakes in it late and obscurely (or hangs), so
the launcher checks it first and exits 2 naming the field at fault.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Mapping

from resnet18.runtime.errors import SetupError
from resnet18.runtime.topology import TRAINING_ROLES, chief_task

# Chief and workers train (MultiWorkerMirroredStrategy); an `evaluator` evaluates the chief's
# checkpoints as they appear (train.evaluation: sidecar) and joins no collective. Kubeflow lists it in
# the cluster, Vertex AI may not: both are accepted. `ps` belongs to ParameterServerStrategy.
EVALUATOR = "evaluator"
ROLES = (*TRAINING_ROLES, EVALUATOR)
UNSUPPORTED_ROLES = {
    "ps": "parameter servers belong to ParameterServerStrategy, which this launcher does not run",
    "master": "the legacy 'master' role is not supported; use 'chief'",
}


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    """A validated TF_CONFIG: the cluster and this process's task in it."""

    cluster: dict[str, list[str]]
    task_type: str
    task_index: int

    @property
    def num_tasks(self) -> int:
        """Tasks that train (chief and workers; not the evaluator)."""
        return sum(len(self.cluster.get(role, [])) for role in TRAINING_ROLES)

    @property
    def is_evaluator(self) -> bool:
        return self.task_type == EVALUATOR

    @property
    def address(self) -> str | None:
        """This task's own host:port (an evaluator that the cluster does not list has none)."""
        addresses = self.cluster.get(self.task_type, [])
        return addresses[self.task_index] if self.task_index < len(addresses) else None

    @property
    def is_chief(self) -> bool:
        """The chief task, or worker 0 when the cluster has no chief (topology.chief_task)."""
        return (self.task_type, self.task_index) == chief_task(self.cluster)

    @property
    def chief_address(self) -> str:
        task_type, index = chief_task(self.cluster)
        return self.cluster[task_type][index]

    @property
    def rank(self) -> int:
        """A single number per task: chief first, then the workers."""
        offset = len(self.cluster.get("chief", [])) if self.task_type == "worker" else 0
        return offset + self.task_index


def read_tf_config(environ: Mapping[str, str] | None = None) -> ClusterSpec | None:
    """Parses and validates TF_CONFIG; None when it is unset or empty."""
    environ = os.environ if environ is None else environ
    raw = environ.get("TF_CONFIG", "").strip()
    if not raw:
        return None
    try:
        parsed = json.loads(raw)
    except json.JSONDecodeError as error:
        raise SetupError(f"TF_CONFIG is not valid JSON: {error}") from None
    return parse_tf_config(parsed)


def parse_tf_config(parsed: object) -> ClusterSpec:
    """Validates a decoded TF_CONFIG object; raises SetupError naming the field."""
    if not isinstance(parsed, dict):
        raise SetupError(f"TF_CONFIG must be a JSON object, got {type(parsed).__name__}")
    cluster = parsed.get("cluster")
    if not isinstance(cluster, dict) or not cluster:
        raise SetupError('TF_CONFIG["cluster"] is missing or not a non-empty object of role -> addresses')
    task = parsed.get("task")
    if not isinstance(task, dict):
        raise SetupError('TF_CONFIG["task"] is missing or not an object with "type" and "index"')

    seen: dict[str, str] = {}
    for role, addresses in cluster.items():
        if role in UNSUPPORTED_ROLES:
            raise SetupError(f'TF_CONFIG["cluster"]["{role}"]: {UNSUPPORTED_ROLES[role]}')
        if role not in ROLES:
            raise SetupError(f'TF_CONFIG["cluster"]["{role}"]: unknown role; allowed roles are {ROLES}')
        if not isinstance(addresses, list) or not addresses:
            raise SetupError(f'TF_CONFIG["cluster"]["{role}"] must be a non-empty list of "host:port"')
        for index, address in enumerate(addresses):
            where = f'TF_CONFIG["cluster"]["{role}"][{index}]'
            _check_address(address, where)
            if address in seen:
                raise SetupError(f"{where}: address {address!r} is also used by {seen[address]}")
            seen[address] = where
    for role in ("chief", EVALUATOR):
        if len(cluster.get(role, [])) > 1:
            raise SetupError(f'TF_CONFIG["cluster"]["{role}"] lists {len(cluster[role])} tasks; a cluster has at '
                             f'most one {role}')
    if not any(cluster.get(role) for role in TRAINING_ROLES):
        raise SetupError('TF_CONFIG["cluster"] has no "chief" or "worker" task: nothing would train')

    task_type = task.get("type")
    task_index = task.get("index")
    if task_type == EVALUATOR and task_type not in cluster:  # Vertex AI's evaluator pool
        cluster = dict(cluster, **{EVALUATOR: []})
        if task_index != 0:
            raise SetupError(f'TF_CONFIG["task"]["index"] is {task_index!r}; the evaluator is task 0')
        return ClusterSpec(cluster={role: list(a) for role, a in cluster.items()}, task_type=task_type, task_index=0)
    if task_type not in cluster:
        allowed = ", ".join(sorted(cluster))
        raise SetupError(f'TF_CONFIG["task"]["type"] is {task_type!r}; it must be a role of the cluster: {allowed}')
    if not isinstance(task_index, int) or isinstance(task_index, bool):
        raise SetupError(f'TF_CONFIG["task"]["index"] must be an integer, got {task_index!r}')
    count = len(cluster[task_type])
    if not 0 <= task_index < count:
        raise SetupError(
            f'TF_CONFIG["task"]["index"] is {task_index}, out of range: '
            f'the cluster has {count} {task_type!r} task(s), indices 0..{count - 1}'
        )
    return ClusterSpec(cluster={role: list(a) for role, a in cluster.items()},
                       task_type=task_type, task_index=task_index)


def _check_address(address: object, where: str) -> None:
    if not isinstance(address, str):
        raise SetupError(f'{where} must be a "host:port" string, got {address!r}')
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SetupError(f'{where} is {address!r}; expected "host:port" with a port in 1..65535')


def cluster_address(environ: Mapping[str, str] | None = None) -> str:
    """This task's address in TF_CONFIG, for messages ("unknown" when there is none)."""
    try:
        spec = read_tf_config(environ)
    except SetupError:
        spec = None
    return (spec.address if spec else None) or "unknown"


def environment_without_cluster(environ: Mapping[str, str] | None = None, **updates: str) -> dict[str, str]:
    """A copy of the environment for a process that must run alone: no TF_CONFIG, no Slurm task variables.

    Tests and benchmarks start launcher processes of their own; inside a cluster task
    (a TFJob pod, a Slurm step) they would otherwise join the cluster's job.
    """
    environ = os.environ if environ is None else environ
    cleaned = {key: value for key, value in environ.items()
               if key != "TF_CONFIG" and not key.startswith(("SLURM_STEP_", "SLURM_PROCID", "SLURM_NTASKS"))}
    cleaned.update(updates)
    return cleaned
