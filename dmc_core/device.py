"""Which device a learner runs on, and how torch is set up for it: the device actually
used (logged), TF32 for float32 matmuls on GPUs that have it, and a deterministic mode."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

log = logging.getLogger(__name__)

# cuBLAS's reproducible workspace (CUDA's documentation); read when the first cuBLAS
# handle is made, so it is set before a deterministic learner's first matmul.
CUBLAS_WORKSPACE_CONFIG = ":4096:8"


def resolve_device(requested: str) -> str:
    """The device to use for `requested` ("auto": CUDA when it starts, else the CPU), logged
    with the reason when "auto" falls back to the CPU."""
    if requested != "auto":
        return requested
    if not torch.cuda.is_available():
        log.info("device auto: no CUDA device is available; using cpu")
        return "cpu"
    try:
        torch.zeros(1, device="cuda")
    except RuntimeError as error:
        log.warning("device auto: CUDA is present but could not start (%s); using cpu", error)
        return "cpu"
    log.info("device auto: using cuda (%s)", torch.cuda.get_device_name())
    return "cuda"


def usable_device(saved: str) -> str:
    """A saved state's device where it is loaded: a GPU state on a machine without CUDA
    loads on the CPU (its tensors are stored device-free)."""
    if torch.device(saved).type == "cuda" and not torch.cuda.is_available():
        log.warning("the state was saved on %s, which this machine lacks; loading on cpu", saved)
        return "cpu"
    return resolve_device(saved)


def prepare(device: torch.device, *, deterministic: bool) -> None:
    """Process-wide settings for a learner on `device`: TF32 for float32 matmuls on a GPU
    that has it, and cuBLAS's reproducible workspace when `deterministic`."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE_CONFIG)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """While inside: torch's deterministic algorithms and the math attention kernel (the
    flash and memory-efficient kernels' backward passes accumulate in a nondeterministic
    order on CUDA). The previous settings come back afterwards."""
    if not enabled:
        yield
        return
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)
