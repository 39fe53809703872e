"""Where a process computes, and in what precision (``[compute]``).

The frozen base runs on ``device`` in the compute ``dtype`` (stored in it on accelerators, which
halves its memory; on the CPU it stays stored in float32 and autocast lowers the matmuls). What a
party trains (LoRA factors, heads, full-weight slots) and its optimizer state are float32 master
copies whatever the compute dtype, and everything that crosses a party boundary is moved to the
CPU and sent as float32 (``fedlora.channel.encode``), so the bytes on the wire never depend on
where or how precisely a party computed.
"""

from __future__ import annotations

import math
import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

from fedlora.config import ComputeConfig, Config, ConfigError, round_size
from fedlora.lazy import torch


def available_devices() -> list[str]:
    """The devices this machine offers, as ``compute.device`` names them."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        found.append("mps")
    return found


def resolve_device(name: str, key: str = "compute.device") -> torch.device:
    """``auto`` -> cuda, else mps, else cpu; a named device must exist here (else a
    ``ConfigError`` naming it and what is available). Under torchrun, ``cuda`` means this
    rank's GPU (``LOCAL_RANK``)."""
    if name == "auto":
        name = (
            "cuda"
            if torch.cuda.is_available()
            else "mps"
            if torch.backends.mps.is_available()
            else "cpu"
        )
    available = available_devices()
    if name not in available:
        raise ConfigError(
            f"{key} {name!r}: this machine has no such device; available: {', '.join(available)}"
        )
    if name == "cuda":  # several local ranks on fewer GPUs share them round-robin
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(name)


def _supports_bfloat16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "mps":
        try:
            torch.ones(1, dtype=torch.bfloat16, device=device)
        except (RuntimeError, TypeError):
            return False
        return True
    return False


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on an accelerator that supports it, float32 otherwise (the CPUs we
    run on have no bfloat16 matmul hardware: ~400x slower)."""
    if name == "auto":
        return torch.bfloat16 if _supports_bfloat16(device) else torch.float32
    return getattr(torch, name)  # a name the schema allows: float32, bfloat16, float16


@dataclass(frozen=True)
class Compute:
    """A resolved ``[compute]`` table: what the model, trainer and engines need to know."""

    device: torch.device
    dtype: torch.dtype
    edge_device: torch.device
    gradient_checkpointing: bool = False
    states_on_device: bool = False
    compile: bool = False

    @property
    def mixed(self) -> bool:
        """Whether the base computes below float32 (autocast on, a grad scaler for float16)."""
        return self.dtype != torch.float32

    @property
    def stores_base_in_dtype(self) -> bool:
        """Accelerators store the frozen base in the compute dtype; the CPU keeps float32."""
        return self.mixed and self.device.type != "cpu"

    def autocast(self) -> AbstractContextManager:
        """Mixed-precision compute of the base on ``device`` (a no-op in float32)."""
        if not self.mixed:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """float16 needs loss scaling against gradient underflow; bfloat16 and float32 do not."""
        if self.dtype != torch.float16:
            return None
        return torch.amp.GradScaler(self.device.type)

    def idle(self, tensor: torch.Tensor) -> torch.Tensor:
        """Where an optimizer state tensor waits while its client is not training."""
        if self.states_on_device:
            return tensor.detach().clone()
        return tensor.detach().to("cpu", copy=True)

    def describe(self) -> str:
        where = str(self.device)
        if self.device.type == "cuda":
            where += f" ({torch.cuda.get_device_name(self.device)})"
        count = torch.get_num_threads()
        threads = f", {count} CPU thread{'s' * (count > 1)}" if self.device.type == "cpu" else ""
        checkpointing = ", gradient checkpointing" if self.gradient_checkpointing else ""
        compiled = ", compiled" if self.compile else ""
        dtype = str(self.dtype).removeprefix("torch.")
        return f"{where}, {dtype}{threads}{checkpointing}{compiled}"


def rank_backend(compute: Compute) -> str:
    """torch.distributed's backend for a rank: nccl when every local rank has a GPU of its own
    (nccl refuses two ranks on one GPU), else gloo (messages are CPU bytes either way)."""
    if compute.device.type != "cuda":
        return "gloo"
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return "nccl" if local_ranks <= torch.cuda.device_count() else "gloo"


def on_cpu() -> Compute:
    """float32 on the CPU: what code given no ``[compute]`` runs on (a function, not a
    constant, so that importing this module does not load torch)."""
    return Compute(torch.device("cpu"), torch.float32, torch.device("cpu"))


def resolve(config: ComputeConfig) -> Compute:
    """The machine's answer to ``[compute]``; ``ConfigError`` for what it cannot do."""
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    if dtype == torch.bfloat16 and device.type != "cpu" and not _supports_bfloat16(device):
        raise ConfigError(f"compute.dtype 'bfloat16': {device} does not support it; use float16")
    if dtype == torch.float16 and device.type == "mps":
        raise ConfigError("compute.dtype 'float16': no gradient scaler on mps; use bfloat16")
    return Compute(
        device,
        dtype,
        resolve_device(config.edge_device, "compute.edge_device"),
        config.gradient_checkpointing,
        config.states_on_device,
        config.compile,
    )


def cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0))


# How much faster one client trains on all c cores' intra-op threads than on one, per core:
# measured 0.83-0.90 on 2 cores (1.66x at batch 8 x 64, 1.68x at 16 x 32, 1.80x at 32 x 64;
# docs/benchmarks.md, "Clients in parallel"); the rule takes the highest, so that it picks the
# pool only where the pool won at every measured shape. Not measured beyond 2 cores.
INTRA_OP_SPEEDUP_PER_CORE = 0.90


def pool_pays(per_round: int, cores: int) -> bool:
    """Whether one single-thread worker per core beats one process on all cores for rounds of
    ``per_round`` clients: the pool takes ceil(n / c) single-thread client times, the process
    n client times sped up by its threads (s = 0.9 c). With 2 cores: even rounds yes, odd
    rounds below 11 no (the last client trains alone while a core idles)."""
    if cores < 2 or per_round < 2:
        return False
    return math.ceil(per_round / cores) * INTRA_OP_SPEEDUP_PER_CORE * cores < per_round


def pool_size(config: Config, device: torch.device) -> tuple[int, int]:
    """(worker processes, intra-op threads each) of an in-process run of server methods
    (``compute.workers``; 1 worker: the clients train in the server's process, in turn).
    ``auto``: one single-thread worker per core when the run computes on the CPU and that
    pays (``pool_pays``), else 1. Threads per worker: ``compute.threads``, else the cores
    shared out among the workers."""
    compute, federation = config.compute, config.federation
    per_round = round_size(
        config.partition.num_clients, federation.clients_per_round, federation.fraction
    )
    if compute.workers == "auto":
        from fedlora.methods import method_class
        from fedlora.preflight import pool_refusal  # preflight imports this module

        # "auto" takes the pool for server rounds; gossip runs on it when asked by count
        serves = method_class(config.method.name).engine == "simulation"
        able = serves and pool_refusal(config, device.type) is None
        workers = cores() if able and pool_pays(per_round, cores()) else 1
    else:
        workers = min(compute.workers, per_round)
    return workers, compute.threads or max(1, cores() // workers)


def configure_threads(config: ComputeConfig, default: int | None = None) -> None:
    """``compute.threads``, or ``default`` (a distributed rank's 1), or torch's own choice."""
    threads = config.threads or default
    if threads is not None:
        torch.set_num_threads(threads)


def configure_determinism(device: torch.device) -> None:
    """Deterministic kernels: strict on the CPU (bit-identical reruns); on CUDA cuBLAS needs a
    fixed workspace (set before its first use) and a few kernels have no deterministic version,
    which then warn instead of stopping the run (docs/benchmarks.md says what reproduces)."""
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.use_deterministic_algorithms(True)
