"""Make ``accelerate launch --cpu --num_processes N`` start N data-parallel CPU processes.

accelerate 1.15 starts CPU workers only through mpirun: with ``--cpu --num_processes 2`` and no MPI host file it
runs the script once, as a single process, and the requested count is lost. The training scripts call
:func:`spawn_cpu_processes` first: when they find themselves launched that way, they start the N workers
themselves with torch.distributed's environment rendezvous (gloo), wait for them, and exit with their status.
Under torchrun (or ``accelerate launch --multi_gpu``) on a machine without GPUs, :func:`cpu_only` tells the
Accelerator to use gloo.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import torch


def _parent_command_line() -> list[str]:
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as handle:
            return [part.decode(errors="replace") for part in handle.read().split(b"\0") if part]
    except OSError:  # not Linux, or no /proc: nothing to detect
        return []


def requested_cpu_processes(parent: list[str] | None = None) -> int:
    """N from the parent ``accelerate launch ... --cpu --num_processes N`` command line, else 1."""
    parent = _parent_command_line() if parent is None else parent
    # The launcher's own options start after its `launch` word (`accelerate launch`, `python -m
    # accelerate.commands.launch`, `python .../accelerate/commands/launch.py`): the `-m` of `python -m` before it is
    # not the script's.
    launch_word = [
        i for i, part in enumerate(parent[:4]) if part == "launch" or part.endswith((".launch", "launch.py"))
    ]
    if not any("accelerate" in part for part in parent[:3]) or not launch_word:
        return 1
    first = launch_word[0] + 1
    count, cpu = 1, False
    for i, part in enumerate(parent[first:], start=first):
        if (part.endswith(".py") and not part.endswith(("accelerate", "launch.py"))) or part in ("-m", "--module"):
            break  # the script (or module): what follows are its own arguments
        if part in ("--cpu", "--use_cpu"):
            cpu = True
        elif part in ("--num_processes", "--num-processes") and i + 1 < len(parent):
            count = int(parent[i + 1])
        elif part.startswith(("--num_processes=", "--num-processes=")):
            count = int(part.split("=", 1)[1])
    return count if cpu else 1


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _relaunch_command() -> list[str]:
    """This process's own command: ``python -m module args`` if it was started that way (a module's file run as a
    script would lose its package, and its relative imports with it), else ``python script args``."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        module = spec.name[: -len(".__main__")] if spec.name.endswith(".__main__") else spec.name
        return [sys.executable, "-m", module, *sys.argv[1:]]
    return [sys.executable, *sys.argv]


def spawn_cpu_processes() -> None:
    """If launched by ``accelerate launch --cpu --num_processes N`` as one process, run N gloo workers and exit."""
    if "WORLD_SIZE" in os.environ or os.environ.get("ACCELERATE_USE_CPU", "").lower() != "true":
        return
    count = requested_cpu_processes()
    if count <= 1:
        return
    port = str(_free_port())
    workers = []
    for rank in range(count):
        env = {
            **os.environ,
            "WORLD_SIZE": str(count),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(count),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
        }
        workers.append(subprocess.Popen(_relaunch_command(), env=env))
    codes = [worker.wait() for worker in workers]
    sys.exit(max(codes, key=abs))


def cpu_only() -> bool:
    """True when several processes were started on a machine without CUDA: the Accelerator must then use gloo."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
