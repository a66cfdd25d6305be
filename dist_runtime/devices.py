"""One GPU per rank: pick this rank's GPU before mlx starts CUDA.

mlx.launch starts every local rank with all GPUs visible, and each would use GPU 0.
When CUDA_VISIBLE_DEVICES is not set already and the host has several NVIDIA GPUs, rank
r takes GPU r modulo their number (the ranks of one host are consecutive in a hostfile
that lists the host several times). Must run before `import mlx.core`. On a Mac, or a
host with no NVIDIA GPU, it does nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess

NVIDIA_SMI_TIMEOUT = 10  # s; a wedged driver must not wedge the start


def count_gpus() -> int:
    """NVIDIA GPUs on this host (0 without nvidia-smi)."""
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                             timeout=NVIDIA_SMI_TIMEOUT).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def pin_gpu():
    """Set CUDA_VISIBLE_DEVICES to this rank's GPU (see the module docstring)."""
    rank = os.environ.get("MLX_RANK") or os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK")
    if rank is None or "CUDA_VISIBLE_DEVICES" in os.environ:
        return
    n = count_gpus()
    if n > 1:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(int(rank) % n)
