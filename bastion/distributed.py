"""Data-parallel training under ``torchrun``: the environment, the batch split and the reductions.

`fit` is the only user of most of this. Under ``torchrun --nproc_per_node N`` (or ``--nnodes``
with a rendezvous endpoint) torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``; `from_env` reads them and `init` joins the process group
(gloo on CPU, nccl on CUDA). Without them everything here is a no-op: a single process computes
exactly what it computed before.

The contract that makes N processes equal one process with the global batch B (float tolerance):

* *Batches.* The global batch order of epoch e comes from (seed, e) as in a single process; rank
  r takes the contiguous slice `rank_slice` of each global batch (per-rank batch ``B / N``).
* *Loss weight.* An objective's loss is a mean over its local batch; fit multiplies it by
  ``N * share`` (``share = local / global`` examples) so DDP's gradient average equals the global
  batch's mean gradient, also for a short last batch.
* *Randomness.* During a step, `sharded_randomness` intercepts draws from torch's random
  functions whose leading dimension is the local batch size (``torch.rand``/``randn``/``randint``,
  ``*_like``, ``Tensor.uniform_``/``normal_``/``bernoulli_``): it draws the global batch's
  numbers from the same generator state and returns this rank's rows, so noise and random
  starts are those of the single-process run. Draws of other shapes are left alone (they are the
  same on every rank because every generator is seeded alike). So a rank needs >= 2 rows: a
  draw of shape (1,) (the attack layer draws its seeds so) could not be told from a row.
* *Batch-level statistics* (AAER's m, V_A, V_N, C_A; the CO monitor's counts) are summed over
  ranks with `all_reduce_sum`; `step_share()` tells an objective its ``share``.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from bastion.errors import ConfigError

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistEnv:
    """What torchrun told this process. ``world_size`` 1 means a plain single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str | None = None
    master_port: str | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env(environ: dict[str, str] | None = None) -> DistEnv:
    """The torchrun environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
    ``MASTER_PORT``), or a single-process `DistEnv` when ``WORLD_SIZE`` is unset or 1."""
    env = os.environ if environ is None else environ
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise ConfigError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets them)") from None
    if world <= 1:
        return DistEnv()
    if not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} is outside 0..WORLD_SIZE-1={world - 1}")
    if not env.get("MASTER_ADDR") or not env.get("MASTER_PORT"):
        raise ConfigError("WORLD_SIZE > 1 but MASTER_ADDR/MASTER_PORT are not set; start with torchrun")
    return DistEnv(rank, world, local, env.get("MASTER_ADDR"), env.get("MASTER_PORT"))


def active() -> bool:
    """True when this process is one rank of an initialized process group of 2 or more."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() and world_size() > 1


def rank() -> int:
    return torch.distributed.get_rank() if _initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if _initialized() else 1


def is_main() -> bool:
    """True on rank 0 and in a single process: the process that writes checkpoints and logs."""
    return rank() == 0


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def device_for(env: DistEnv, requested: str | torch.device) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` when CUDA was requested, else as requested."""
    dev = torch.device(requested)
    if env.distributed and dev.type == "cuda":
        return torch.device("cuda", env.local_rank)
    return dev


def init(env: DistEnv, device: str | torch.device) -> bool:
    """Join the process group torchrun set up (nccl for CUDA, gloo otherwise); False (and nothing
    done) for a single process. Idempotent."""
    if not env.distributed:
        return False
    if _initialized():
        return True
    dev = torch.device(device)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    torch.distributed.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size)
    return True


def shutdown() -> None:
    if _initialized():
        torch.distributed.destroy_process_group()


def barrier() -> None:
    if active():
        torch.distributed.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over ranks (a new tensor; ``t`` itself when not distributed)."""
    if not active():
        return t
    out = t.detach().clone()
    torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (JSON-like values)."""
    if not active():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def rank_slice(batch: int, r: int | None = None, world: int | None = None) -> slice:
    """Rank ``r``'s contiguous rows of a global batch of ``batch`` rows (sizes differ by at most 1)."""
    r = rank() if r is None else r
    world = world_size() if world is None else world
    return slice(r * batch // world, (r + 1) * batch // world)


# ---------------------------------------------------------------------------------------------
# Per-step shard of the global batch: loss weight and randomness
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StepShard:
    offset: int   # first row of this rank in the global batch
    local: int    # rows of this rank
    total: int    # rows of the global batch

    @property
    def share(self) -> float:
        return self.local / self.total


_SHARD: contextvars.ContextVar[StepShard | None] = contextvars.ContextVar("bastion_step_shard", default=None)


def step_share() -> float:
    """This rank's fraction of the current global batch (1.0 outside a distributed step)."""
    s = _SHARD.get()
    return 1.0 if s is None else s.share


def current_shard() -> StepShard | None:
    return _SHARD.get()


# matched by name: torch.randint and the Tensor methods reach the mode as other objects than the
# public names (``torch._C._VariableFunctions.randint``, ``TensorBase.uniform_``)
_SIZE_FNS = ("rand", "randn")
_LIKE_FNS = ("rand_like", "randn_like")
_INPLACE_FNS = ("uniform_", "normal_", "bernoulli_")


def _lead(shape: Any) -> tuple[int, ...] | None:
    if isinstance(shape, torch.Size | tuple | list) and shape and all(isinstance(s, int) for s in shape):
        return tuple(shape)
    return None


class _ShardedRandom(torch.overrides.TorchFunctionMode):
    """Draw the global batch's random numbers, return this rank's rows (see the module doc)."""

    def __init__(self, shard: StepShard):
        super().__init__()
        self.shard = shard

    def _rows(self, full: torch.Tensor) -> torch.Tensor:
        return full[self.shard.offset:self.shard.offset + self.shard.local].contiguous()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        s = self.shard
        name = getattr(func, "__name__", "")
        method = "Tensor" in getattr(func, "__qualname__", "")
        if name in _SIZE_FNS and not method:
            shape = _lead(args[0] if args and not isinstance(args[0], int) else args) if args \
                else _lead(kwargs.get("size"))
            if shape and shape[0] == s.local:
                kw = {k: v for k, v in kwargs.items() if k != "size"}
                return self._rows(func((s.total, *shape[1:]), **kw))
        elif name == "randint" and not method:
            size = kwargs.get("size", args[-1] if args else None)
            shape = _lead(size)
            if shape and shape[0] == s.local:
                pos = [a for a in args if not isinstance(a, torch.Size | tuple | list)]
                kw = {k: v for k, v in kwargs.items() if k != "size"}
                return self._rows(func(*pos, (s.total, *shape[1:]), **kw))
        elif name in _LIKE_FNS and not method and args and args[0].dim() and args[0].shape[0] == s.local:
            x = args[0]
            kw = {"dtype": x.dtype, "device": x.device, **{k: v for k, v in kwargs.items() if k != "memory_format"}}
            return self._rows(func(torch.empty((s.total, *x.shape[1:]), dtype=x.dtype, device=x.device), **kw))
        elif name in _INPLACE_FNS and method:
            x = args[0]
            if x.dim() and x.shape[0] == s.local:
                full = torch.empty((s.total, *x.shape[1:]), dtype=x.dtype, device=x.device)
                func(full, *args[1:], **kwargs)
                with torch.no_grad():
                    x.copy_(self._rows(full))
                return x
        return func(*args, **kwargs)


@contextlib.contextmanager
def sharded_step(offset: int, local: int, total: int) -> Iterator[StepShard]:
    """Within this block: `step_share` is ``local / total`` and per-example random draws are this
    rank's rows of the global batch's draws. Use only when ``local < total`` (distributed)."""
    if not (0 < local <= total and 0 <= offset <= total - local) or local == 1 < total:
        raise ConfigError(f"bad step shard: rows {offset}..{offset + local} of {total}")
    shard = StepShard(offset, local, total)
    token = _SHARD.set(shard)
    try:
        if local == total:
            yield shard
        else:
            with _ShardedRandom(shard):
                yield shard
    finally:
        _SHARD.reset(token)
