"""TF_CONFIG from Slurm: `srun python -m launcher ...` in a multi-task job step.

When TF_CONFIG is unset and the Slurm job step has more than one task, each task
builds the same cluster from Slurm's variables: the step's node list
(SLURM_STEP_NODELIST, e.g. `gpu[01-04]`), the tasks per node
(SLURM_STEP_TASKS_PER_NODE, e.g. `2(x4)`) and its rank (SLURM_PROCID). Tasks are
numbered as Slurm's default block distribution places them; task r listens on
port base + its index on its node, the base `LAUNCHER_SLURM_PORT_BASE` or, unset, one
of the job's own (from SLURM_JOB_ID: jobs sharing a node do not take each other's
ports). Worker 0 is the chief. GPUs are bound by Slurm (`--gpus-per-task`), not here.

TensorFlow's own SlurmClusterResolver is not used: it sorts host names (so ranks
can disagree with Slurm's) and cannot describe CPU-only tasks (no GPUs -> no tasks).

    srun --distribution=block python -m launcher --job jobs/cifar10_multiworker.yaml
"""

from __future__ import annotations

import json
import re
from typing import Mapping

from resnet18.runtime.errors import SetupError

# Without LAUNCHER_SLURM_PORT_BASE, job J's tasks on a node listen on JOB_PORTS_LOW + (J mod N) * PORTS_PER_JOB
# onwards: jobs with nearby ids (those likely to share a node) get disjoint ports, all below Linux's default
# ephemeral range (32768-60999), from which outgoing connections take theirs.
JOB_PORTS_LOW, JOB_PORTS_HIGH = 10000, 30000
PORTS_PER_JOB = 16  # tasks of one job on one node (a GPU node seldom has more than 8)


def expand_hostlist(hostlist: str) -> list[str]:
    """Slurm host list -> host names, in order: 'n[1-2],m5,o[08-10]' -> n1 n2 m5 o08 o09 o10."""
    hosts: list[str] = []
    for part in _split_outside_brackets(hostlist):
        match = re.fullmatch(r"([^\[\]]*)\[([^\]]+)\]([^\[\]]*)", part)
        if match is None:
            if "[" in part or "]" in part or not part:
                raise SetupError(f"SLURM_STEP_NODELIST {hostlist!r}: cannot read {part!r}")
            hosts.append(part)
            continue
        prefix, ranges, suffix = match.groups()
        for item in ranges.split(","):
            low, _, high = item.partition("-")
            if not low.isdigit() or (high and not high.isdigit()):
                raise SetupError(f"SLURM_STEP_NODELIST {hostlist!r}: bad range {item!r}")
            for number in range(int(low), int(high or low) + 1):
                hosts.append(f"{prefix}{str(number).zfill(len(low))}{suffix}")
    return hosts


def _split_outside_brackets(text: str) -> list[str]:
    parts, current, depth = [], "", 0
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth not in (0, 1):
            raise SetupError(f"SLURM_STEP_NODELIST {text!r}: unbalanced brackets")
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    if depth:
        raise SetupError(f"SLURM_STEP_NODELIST {text!r}: unbalanced brackets")
    return parts + [current]


def expand_tasks_per_node(text: str) -> list[int]:
    """Slurm tasks-per-node -> one count per node: '2(x3),1' -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for part in text.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match is None:
            raise SetupError(f"SLURM_STEP_TASKS_PER_NODE {text!r}: cannot read {part!r}")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


def tf_config_from_slurm(environ: Mapping[str, str]) -> str | None:
    """TF_CONFIG (JSON) for this Slurm task, or None outside a multi-task Slurm step.

    Only srun's step variables count: in a job's batch shell SLURM_NTASKS, SLURM_JOB_NODELIST and
    SLURM_PROCID=0 describe the whole allocation, and a process started there without srun is alone.
    """
    num_tasks = int(environ.get("SLURM_STEP_NUM_TASKS", "1") or 1)
    if num_tasks <= 1 or "SLURM_PROCID" not in environ:
        return None
    nodelist = environ.get("SLURM_STEP_NODELIST", "")
    tasks_per_node = environ.get("SLURM_STEP_TASKS_PER_NODE", "")
    hosts = expand_hostlist(nodelist)
    counts = expand_tasks_per_node(tasks_per_node)
    if len(hosts) != len(counts) or sum(counts) != num_tasks:
        raise SetupError(
            f"Slurm variables disagree: {len(hosts)} node(s) in {nodelist!r}, tasks per node {tasks_per_node!r}, "
            f"{num_tasks} task(s)"
        )
    port_base = _port_base(environ, max(counts))
    addresses = [f"{host}:{port_base + local}" for host, count in zip(hosts, counts) for local in range(count)]
    rank = int(environ["SLURM_PROCID"])
    if not 0 <= rank < num_tasks:
        raise SetupError(f"SLURM_PROCID {rank} is out of range for {num_tasks} tasks")
    own_host = addresses[rank].rpartition(":")[0]
    node_name = environ.get("SLURMD_NODENAME")
    if node_name and node_name != own_host:
        raise SetupError(
            f"Slurm placed task {rank} on {node_name}, but block distribution puts it on {own_host}; "
            "run srun with --distribution=block"
        )
    return json.dumps({"cluster": {"worker": addresses}, "task": {"type": "worker", "index": rank}})


def _port_base(environ: Mapping[str, str], tasks_on_a_node: int) -> int:
    """The first port of the job's tasks on each node: LAUNCHER_SLURM_PORT_BASE, else one from SLURM_JOB_ID."""
    given = environ.get("LAUNCHER_SLURM_PORT_BASE", "")
    if not given:
        if tasks_on_a_node > PORTS_PER_JOB:  # its ports would run into the next job id's
            raise SetupError(f"{tasks_on_a_node} tasks on one node take more than the {PORTS_PER_JOB} ports a job "
                             "gets from its id: set LAUNCHER_SLURM_PORT_BASE to a free range")
        job = environ.get("SLURM_JOB_ID", "")
        job_id = int(job) if job.isdigit() else 0
        return JOB_PORTS_LOW + job_id % ((JOB_PORTS_HIGH - JOB_PORTS_LOW) // PORTS_PER_JOB) * PORTS_PER_JOB
    if not given.isdigit() or not 1024 <= int(given) <= 65536 - tasks_on_a_node:
        raise SetupError(f"LAUNCHER_SLURM_PORT_BASE={given}: expected a port from 1024 to "
                         f"{65536 - tasks_on_a_node} (it and the next {tasks_on_a_node - 1} on each node are this "
                         "job's)")
    return int(given)
