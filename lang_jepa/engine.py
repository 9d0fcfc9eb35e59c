"""DeepSpeed wiring: the only module that imports deepspeed.

Distributed start-up (with or without a launcher), the engine config filled from ours (the HF
Trainer's ``"auto"`` convention), parameter groups and optimizer, schedule application, the
fp32 master-weight fragments the EMA update reads under ZeRO-0..3 and the all-gathers it uses, and
the consolidation of a ZeRO checkpoint's partitioned fp32 masters (for :mod:`lang_jepa.checkpoint`).
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from torch import Tensor, nn

from .config import Config, ConfigError, resolve_batch
from .ema import Fragment

log = logging.getLogger("lang_jepa")

# Engine settings filled from our config: DeepSpeed key -> the config key it comes from
AUTO_KEYS = {
    "train_micro_batch_size_per_gpu": "data.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum_steps",
    "train_batch_size": "train.global_batch_size",
    "gradient_clipping": "optim.grad_clip",
}
FORBIDDEN_SECTIONS = {
    "optimizer": "the optimizer is built from optim.* (AdamW, FusedAdam on GPU)",
    "scheduler": "lr / weight-decay schedules are pure functions of the step in lang_jepa.schedules",
    "fp16": "use train.precision=bf16 or auto (fp16 loss scaling is not supported)",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: float | None = None) -> tuple[int, int, int]:
    """Start torch.distributed through DeepSpeed; returns (rank, local_rank, world_size).

    Works under ``deepspeed``, ``torchrun`` and SLURM launchers, and as a plain ``python`` process:
    with no launcher variables a one-rank group on a free local port is set up (DeepSpeed would
    otherwise try MPI discovery). ``timeout_s``: the process group's collective timeout
    (``train.collective_timeout_s``; None: DeepSpeed's default).
    """
    if "RANK" not in os.environ and "SLURM_PROCID" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if not dist.is_initialized():
        kwargs = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
        deepspeed.init_distributed(
            dist_backend=get_accelerator().communication_backend_name(), **kwargs
        )
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    get_accelerator().set_device(local_rank)
    return dist.get_rank(), local_rank, dist.get_world_size()


def apply_collective_timeout(timeout_s: float) -> int:
    """Give every process group ``timeout_s`` (``train.collective_timeout_s``); returns how many.

    The world group gets it at :func:`init_distributed`, but DeepSpeed creates its data-parallel
    groups later with ``new_group(ranks)``, i.e. torch's default timeout (30 minutes for gloo):
    ZeRO's gradient all-reduce then waits that long for a rank behind a network partition.
    Call after ``deepspeed.initialize``. (torch has no public setter for an existing group.)
    """
    c10d = dist.distributed_c10d
    groups = [pg for pg in list(c10d._world.pg_map) if not c10d._rank_not_in_group(pg)]
    for pg in groups:
        c10d._set_pg_timeout(timedelta(seconds=timeout_s), pg)
    return len(groups)


def hostnames(world: int) -> list[str]:
    """Every rank's host name, by rank (one all-gather at start-up; error messages name hosts)."""
    if world == 1:
        return [socket.gethostname()]
    names: list[str | None] = [None] * world
    dist.all_gather_object(names, socket.gethostname())
    return [str(n) for n in names]


def device(local_rank: int) -> torch.device:
    return torch.device(get_accelerator().device_name(local_rank))


def accelerator_name() -> str:
    """'cuda' / 'cpu' / ...: the DeepSpeed accelerator in use."""
    return get_accelerator().device_name()


def build_ds_config(path: str | Path, cfg: Config, world_size: int) -> dict[str, Any]:
    """Read a ds_configs/*.json and fill batch, accumulation, clipping and precision from ``cfg``.

    A key set to ``"auto"`` or absent is filled; a hard value that disagrees with our config is an
    error naming the key (no value is defined in two places).
    """
    path = Path(path)
    try:
        ds = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"deepspeed config {path}: {err}") from err
    for section, why in FORBIDDEN_SECTIONS.items():
        if section in ds and (section != "fp16" or ds[section].get("enabled", False)):
            raise ConfigError(f"deepspeed config {path}: remove key {section!r}: {why}")
    micro, accum, glob = resolve_batch(cfg, world_size)
    ours = dict(zip(AUTO_KEYS, (micro, accum, glob, cfg.optim.grad_clip), strict=True))
    for key, value in ours.items():
        current = ds.get(key, "auto")
        if current != "auto" and current != value:
            raise ConfigError(
                f"deepspeed config {path}: key {key!r} is {current} but {AUTO_KEYS[key]} gives {value}; "
                f'set it to "auto" and configure {AUTO_KEYS[key]}'
            )
        ds[key] = value
    if cfg.train.precision not in ("bf16", "fp32"):
        raise ValueError(
            f"resolve train.precision={cfg.train.precision!r} first (resolve_precision)"
        )
    bf16 = cfg.train.precision == "bf16"
    ds_bf16 = ds.setdefault("bf16", {}).get("enabled", "auto")
    if ds_bf16 != "auto" and bool(ds_bf16) != bf16:
        raise ConfigError(
            f"deepspeed config {path}: key 'bf16.enabled' is {ds_bf16} but train.precision is "
            f'{cfg.train.precision}; set it to "auto"'
        )
    ds["bf16"]["enabled"] = bf16
    ds.setdefault("steps_per_print", 10**9)  # we log ourselves
    return ds


def cpu_bf16_flags() -> dict[str, bool]:
    """Whether this CPU computes bf16 natively: AVX-512-BF16 or AMX tiles (else bf16 matmuls are
    emulated: a `small` step 19x slower than fp32 on an AVX2 EPYC with torch 2.13)."""
    probes = {"avx512_bf16": "_is_avx512_bf16_supported", "amx": "_is_amx_tile_supported"}
    out = {}
    for name, probe in probes.items():
        fn = getattr(torch.cpu, probe, None)  # private torch API; /proc/cpuinfo where absent
        out[name] = (
            bool(fn()) if fn is not None else _cpuinfo_has(name if name != "amx" else "amx_bf16")
        )
    return out


def _cpuinfo_has(flag: str) -> bool:
    try:
        return f" {flag} " in f" {Path('/proc/cpuinfo').read_text().replace(chr(10), ' ')} "
    except OSError:
        return False


def resolve_precision(requested: str, dev: torch.device) -> tuple[str, str]:
    """``train.precision`` -> (``bf16`` | ``fp32``, why). ``auto``: bf16 on a GPU that supports
    it and on a CPU with native bf16, fp32 otherwise. An explicit ``bf16`` on a CPU without
    native bf16 is kept, with a warning naming the cost."""
    if dev.type == "cuda":
        native = torch.cuda.is_bf16_supported()
        where = f"{torch.cuda.get_device_name(dev)} {'supports' if native else 'lacks'} bf16"
    elif dev.type == "cpu":
        flags = cpu_bf16_flags()
        native = any(flags.values())
        cap = torch.backends.cpu.get_cpu_capability()
        where = f"CPU {cap}, " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in flags.items())
    else:  # other DeepSpeed accelerators train in bf16
        native, where = True, f"{dev.type} accelerator"
    if requested == "auto":
        return ("bf16" if native else "fp32"), f"auto: {where}"
    if requested == "bf16" and not native:
        log.warning(
            "train.precision=bf16 but this device has no native bf16 (%s): bf16 matmuls are "
            "emulated, 7x (one matmul) to 19x (a `small` step) slower than fp32 on an AVX2 EPYC; "
            "train.precision=auto picks fp32",
            where,
        )
    return requested, f"requested: {where}"


def zero_stage(ds_config: dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Two AdamW groups: weight decay on matrices, none on biases, norms and other 1-D tensors.

    ``wd_mult`` (1 or 0) tells :func:`apply_schedule` which groups the decay schedule scales.
    """
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)
    return [
        {"params": decay, "weight_decay": 0.0, "wd_mult": 1.0},
        {"params": no_decay, "weight_decay": 0.0, "wd_mult": 0.0},
    ]


def build_optimizer(
    groups: list[dict[str, Any]], cfg: Config, ds_config: dict[str, Any]
) -> torch.optim.Optimizer:
    """AdamW: DeepSpeedCPUAdam with optimizer offload, FusedAdam on GPU, torch AdamW otherwise."""
    o = cfg.optim
    kwargs: dict[str, Any] = {
        "lr": o.start_lr,
        "betas": tuple(o.betas),
        "eps": o.eps,
        "weight_decay": 0.0,
    }
    offload = (
        ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    )
    if offload in ("cpu", "nvme"):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    if get_accelerator().device_name() == "cuda":
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(groups, adam_w_mode=True, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


def initialize(
    model: nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict[str, Any]
) -> Any:
    """``deepspeed.initialize`` with our model, optimizer and filled config; returns the engine."""
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine


def apply_schedule(engine: Any, lr: float, wd: float) -> None:
    """Set this step's learning rate and weight decay on every parameter group."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
        group["weight_decay"] = wd * group.get("wd_mult", 1.0)


def _unfused_masters(optimizer: Any) -> dict[int, Tensor]:
    """ZeRO-0 with bf16 wraps the optimizer in FP16_UnfusedOptimizer, which keeps whole fp32
    masters beside the bf16 weights: map id(bf16 param) -> its fp32 master."""
    lp_groups, hp_groups = (
        getattr(optimizer, "fp16_groups", None),
        getattr(optimizer, "fp32_groups", None),
    )
    if not lp_groups or not hp_groups:
        return {}
    return {
        id(lp): hp
        for lg, hg in zip(lp_groups, hp_groups, strict=True)
        for lp, hp in zip(lg, hg, strict=True)
    }


def fp32_fragments(
    params: Iterable[nn.Parameter], optimizer: Any = None
) -> tuple[list[list[Fragment]], bool]:
    """This rank's fp32 master slices of each parameter, and whether they are partitioned.

    ZeRO-3: the rank's partition of the flattened parameter; ZeRO-1/2 and the bf16 optimizer:
    the fragment the rank's optimizer owns (``_hp_mapping``); ZeRO-0: the whole fp32 parameter
    (the fp32 master of the engine's ``optimizer`` under bf16). Returns (fragments per parameter,
    partitioned).
    """
    from deepspeed.utils import safe_get_local_fp32_param

    out: list[list[Fragment]] = []
    partitioned = False
    masters = _unfused_masters(optimizer)
    for p in params:
        if hasattr(p, "ds_id"):  # ZeRO-3
            partitioned = True
            local = safe_get_local_fp32_param(p).reshape(-1)
            # private API: which slice of the flat parameter this rank's partition holds
            rank = p._z3_optimizer._get_param_partition_rank(p)
            start = rank * local.numel()
            n = max(0, min(local.numel(), p.ds_numel - start))
            out.append([(start, local[:n])] if n else [])
        elif hasattr(p, "_hp_mapping"):  # ZeRO-1/2, bf16 optimizer
            partitioned = True
            mapping = p._hp_mapping
            if mapping is None:
                out.append([])
            else:
                out.append(
                    [(mapping.lp_fragment_address.start, mapping.get_hp_fragment().reshape(-1))]
                )
        else:
            master = masters.get(id(p), p)
            if master.dtype != torch.float32:
                raise RuntimeError("no fp32 master weights found for the EMA update")
            out.append([(0, master.detach().reshape(-1))])
    return out, partitioned


def universal_checkpoint_info() -> dict[str, Any]:
    """The client state DeepSpeed's ``ds_to_universal`` requires of a checkpoint it converts."""
    from deepspeed.checkpoint import constants as c

    info = {c.UNIVERSAL_CHECKPOINT_VERSION_KEY: c.UNIVERSAL_CHECKPOINT_VERSION_VALUE}
    return {c.UNIVERSAL_CHECKPOINT_INFO: info}


def dp_all_reduce(tensor: Tensor) -> None:
    """Sum over every rank, in place (data parallelism is the only parallelism here)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)


def dp_all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def dp_all_gather_into_tensor(output: Tensor, local: Tensor) -> None:
    """``output`` [world * n] <- every rank's ``local`` [n], in rank order. ``local`` may be this
    rank's slice of ``output`` (in place, as ZeRO gathers; gloo and NCCL both accept it)."""
    # torch 2.13 renamed all_gather_into_tensor (now deprecated) to all_gather_single
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, local)


def all_reduce_mean(values: Tensor) -> Tensor:
    values = values.clone()
    dp_all_reduce(values)
    return values / (dist.get_world_size() if dist.is_initialized() else 1)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def consolidated_fp32_state(ckpt_dir: Path, tag: str) -> dict[str, Tensor]:
    """The module's full fp32 state_dict from a ZeRO-1/2/3 checkpoint ``ckpt_dir/tag``: every
    rank's partition of the fp32 master weights put back together (DeepSpeed's ``zero_to_fp32``;
    runs on CPU, no process group needed)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)


def max_allocated_gb(dev: torch.device) -> float | None:
    if dev.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(dev) / 2**30
