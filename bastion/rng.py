"""Seeds, generators and devices: the one place the project derives randomness from.

Every random draw of a run comes from an explicit ``torch.Generator`` seeded by `derive_seed` of
the parts that identify it (run seed, probe, chunk, example...), so results depend on what was
asked, never on batching, sharding, resume or the caller's global RNG state.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a stateless module."""
    p = next(iter(model.parameters()), None)
    if p is not None:
        return p.device
    b = next(iter(model.buffers()), None)
    return b.device if b is not None else torch.device("cpu")


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts (run seed, probe name, chunk, example index...)."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def make_generator(device: torch.device | str, *parts: Any) -> torch.Generator:
    """A generator on ``device`` seeded with ``derive_seed(*parts)``."""
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(*parts))
    return g


def child_generator(generator: torch.Generator, device: torch.device | None = None) -> torch.Generator:
    """A new generator on ``device`` seeded by one draw of ``generator`` (independent streams)."""
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator, device=generator.device))
    g = torch.Generator(device=device if device is not None else generator.device)
    g.manual_seed(seed)
    return g


@contextlib.contextmanager
def forked_rng(device: torch.device, generator: torch.Generator) -> Iterator[None]:
    """Run a block with the global RNG of the CPU (and of ``device`` when CUDA) seeded from
    ``generator``; the caller's global RNG state is restored afterwards."""
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator, device=generator.device))
    if device.type != "cuda":  # what fork_rng does for the CPU alone, without its device lookups
        state = torch.get_rng_state()
        try:
            torch.default_generator.manual_seed(seed)
            yield
        finally:
            torch.set_rng_state(state)
        return
    with torch.random.fork_rng(devices=[device], device_type="cuda"):
        torch.default_generator.manual_seed(seed)
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)
        yield
