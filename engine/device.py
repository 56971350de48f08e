"""Device choice, mixed precision and batch sizes (DESIGN §8)."""

from __future__ import annotations

import contextlib
import contextvars
import os
import random
from collections.abc import Iterator

import numpy as np
import torch

from engine.api import ConfigError


def resolve_device(device: str = "auto") -> str:
    """"auto" -> "cuda" when available else "cpu"; "cuda" without CUDA is a ConfigError."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' asked for, but no CUDA GPU is available here; use --device auto or cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise ConfigError(f"unknown device {device!r}; use auto, cpu or cuda")
    return device


def autocast(device: str):
    """Mixed precision on CUDA (bf16 where supported), a no-op context on CPU."""
    if device.startswith("cuda"):
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def cpu_bf16() -> bool:
    """Whether this CPU trains the methods that allow it (registry `cpu_bf16`) in bfloat16 mixed precision.

    On CPUs with AMX tiles (Intel Sapphire Rapids and later) oneDNN runs bf16 convolutions and matmuls on the
    tile unit: a training step of a small conv autoencoder at 128 px took 88–133 ms in bf16 against 339–396 ms
    in fp32 on one core here. Without AMX, bf16 is emulated or only partly accelerated and not worth its
    rounding, so the default is on exactly when the CPU has AMX and AVX-512 bf16. ADLAB_CPU_BF16=1 forces it on
    (any x86 CPU runs it, slowly without AMX), 0 off. Weights stay fp32 (autocast rounds the inputs of matmuls
    and convolutions); backbone features and predictions stay fp32.
    """
    env = os.environ.get("ADLAB_CPU_BF16", "").strip().lower()
    if env in ("0", "1", "true", "false", "on", "off"):
        return env in ("1", "true", "on")
    if env:
        raise ConfigError(f"ADLAB_CPU_BF16={env!r}: use 1 (on), 0 (off) or leave it unset (on where the CPU has AMX)")
    return _cpu_has_amx()


def _cpu_has_amx() -> bool:
    cpu = getattr(torch, "cpu", None)
    try:
        return bool(cpu._is_amx_tile_supported() and cpu._is_avx512_bf16_supported())  # type: ignore[union-attr]
    except (AttributeError, RuntimeError):  # an older torch without the probes: stay in fp32
        return False


# Whether the method training now allows bf16 on CPU (its registry entry's `cpu_bf16`; set by BaseDetector.fit).
# In some networks bf16 is slower on CPU (BatchNorm after depthwise convolutions: Uninformed Students' fit took
# 64 s against 49 s in fp32), so it is a per-method choice, measured, not a global switch.
_BF16_ALLOWED: contextvars.ContextVar[bool] = contextvars.ContextVar("adlab_cpu_bf16_allowed", default=False)


@contextlib.contextmanager
def cpu_bf16_allowed(allowed: bool) -> Iterator[None]:
    """Within the block, `train_autocast` on CPU uses bf16 when `allowed` and `cpu_bf16()`."""
    token = _BF16_ALLOWED.set(bool(allowed))
    try:
        yield
    finally:
        _BF16_ALLOWED.reset(token)


def train_precision(device: str, allowed: bool | None = None) -> str:
    """The precision of training steps on `device`: "fp32", "bf16-mixed" or "fp16-mixed" (CUDA without bf16).
    allowed: whether the method allows bf16 on CPU; None reads the enclosing `cpu_bf16_allowed` block."""
    if device.startswith("cuda"):
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "fp16-mixed"
    ok = _BF16_ALLOWED.get() if allowed is None else allowed
    return "bf16-mixed" if ok and cpu_bf16() else "fp32"


def train_autocast(device: str):
    """The autocast context of a training step: `autocast` on CUDA; on CPU bf16 when `train_precision` says so."""
    if device == "cpu" and train_precision(device) == "bf16-mixed":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return autocast(device)


def conv_layout(module: torch.nn.Module, device: str) -> torch.nn.Module:
    """Convolution weights in channels-last layout on CPU (in place; returns `module`).

    oneDNN's channels-last kernels are much faster than NCHW ones on CPU (measured on 1 core: a DRAEM training step
    1007 → 563 ms, the EfficientNet-Lite0 backbone over 16 images at 256 px 1520 → 970 ms). Inputs need not be
    converted: a convolution whose weight is channels-last gives a channels-last output, and the layout flows on.
    Values are the same up to float rounding (sums in another order, as with another thread count). Off with
    ADLAB_CHANNELS_LAST=0; on CUDA the layout is left as it is (not measured on a GPU yet).
    """
    if device == "cpu" and os.environ.get("ADLAB_CHANNELS_LAST", "1") != "0":
        module.to(memory_format=torch.channels_last)
    return module


# Pixels per inference batch on CPU: past about this many, a bigger batch is slower per image (its activations
# leave the caches) and its peak grows. EfficientNet-Lite0, ms per image at 1 thread, batch 16 → 4: 256² px
# 41.8 → 28.4, 512² px 203 → 153 (batch 2: 115); 128² px about equal (benchmarks in the README).
CPU_BATCH_PIXELS = 2**18


def batch_size(device: str, cpu: int = 16, cuda: int = 128, image_shape: tuple[int, ...] | None = None) -> int:
    """Inference batch size: large on GPUs, modest on CPU; on CPU at most CPU_BATCH_PIXELS / (H·W) images of
    `image_shape` (…, H, W) (but at least 2) when given."""
    if device.startswith("cuda"):
        return cuda
    if image_shape is None:
        return cpu
    h, w = image_shape[-2:]
    return min(cpu, max(2, CPU_BATCH_PIXELS // max(1, int(h) * int(w))))


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch Generator seeded the same way (CPU)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    return torch.Generator().manual_seed(seed)


_thread_lock = __import__("threading").Lock()


@contextlib.contextmanager
def single_thread():
    """Run a block with one intra-op thread.

    Batched LAPACK on many small matrices (per-position covariances) is dominated by thread start-up
    and spin-waiting: on 2 busy cores it ran 25× slower with 2 threads than with 1.
    """
    with _thread_lock:
        prev = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(prev)
