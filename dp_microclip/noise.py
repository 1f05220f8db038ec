"""Gaussian noise from generators the engine owns: seeded and checkpointable, or cryptographically secure.

Never torch's global RNG: the user's own random calls (dropout, shuffling) would
change the noise, and a resumed run could not reproduce it.

* :class:`NoiseSource` (default): one torch generator (Mersenne Twister on the
  CPU, Philox on CUDA) per device, all seeded from one master seed drawn from the
  OS (``secrets``) unless a seed is given. Fast, and reproducible from its state.
  Its state predicts every future draw: a checkpoint that holds it
  (``engine.state_dict(include_rng_state=True)``) must stay as secret as the data.
* :class:`SecureNoiseSource` (``attach(..., privacy=DP(secure_rng=True))``): every draw comes
  from the operating system's cryptographically secure generator
  (``os.urandom``): 53-bit uniforms turned into Gaussians with the Box-Muller
  transform in float64. No state exists that predicts the noise, so a run cannot
  be reproduced or resumed bit for bit. It guarantees that nobody can regenerate
  the noise from a seed or a checkpoint; like every floating-point sampler it does
  not address the floating-point attacks on the Gaussian mechanism itself
  (Mironov 2012 for Laplace; Jin et al. 2022 for Gaussian). Cost, measured in
  ``docs/privacy.md``: it is a CPU-side draw copied to the parameter's device.
"""

from __future__ import annotations

import math
import os
import secrets

from typing import Protocol

import torch


#: What the privacy statement adds when the noise came from :class:`SecureNoiseSource`.
SECURE_STATEMENT = (" Noise was drawn from the operating system's cryptographically secure generator; the "
                    "sampling and grouping coins from generators seeded by it.")


class NoiseLike(Protocol):
    """What the step needs of a noise source: Gaussian draws shaped like a tensor, and a checkpointable state."""

    def gaussian_like(self, tensor: torch.Tensor, std: float) -> torch.Tensor:
        """``N(0, std^2)`` with the shape, dtype and device of ``tensor``."""
        ...

    def state_dict(self) -> dict:
        """The state that resumes the same draws."""
        ...

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict`."""
        ...


class NoiseSource:
    """Draws ``N(0, std^2)`` tensors shaped like parameters, on the parameter's device."""

    secure = False

    def __init__(self, seed: int | None = None):
        # A secure default: without a seed, the noise is not predictable from the code.
        self.seed = secrets.randbits(63) if seed is None else int(seed)
        self._generators: dict[str, torch.Generator] = {}

    def generator(self, device: torch.device | str) -> torch.Generator:
        """The generator of one device, created (and seeded from the master seed) on first use."""
        key = str(torch.device(device))
        if key not in self._generators:
            gen = torch.Generator(device=key)
            gen.manual_seed(self.seed + len(self._generators))
            self._generators[key] = gen
        return self._generators[key]

    def gaussian_like(self, tensor: torch.Tensor, std: float) -> torch.Tensor:
        """Fresh ``N(0, std^2)`` noise with ``tensor``'s shape, dtype and device."""
        gen = self.generator(tensor.device)
        noise = torch.empty_like(tensor)
        noise.normal_(mean=0.0, std=std, generator=gen)
        return noise

    def state_dict(self) -> dict:
        """The master seed and every generator's state (secret: it predicts the noise)."""
        return {
            "seed": self.seed,
            "order": list(self._generators),
            "states": {k: g.get_state() for k, g in self._generators.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the generators saved by :meth:`state_dict`."""
        self.seed = int(state["seed"])
        self._generators = {}
        for key in state["order"]:
            gen = self.generator(key)
            gen.set_state(state["states"][key])


class SecureNoiseSource:
    """Gaussian noise from ``os.urandom`` (a CSPRNG), float64 Box-Muller; nothing to checkpoint."""

    secure = True
    seed = None

    def gaussian_like(self, tensor: torch.Tensor, std: float) -> torch.Tensor:
        """Fresh ``N(0, std^2)`` noise with ``tensor``'s shape, dtype and device, from the OS's CSPRNG."""
        n = tensor.numel()
        pairs = (n + 1) // 2
        raw = torch.frombuffer(bytearray(os.urandom(16 * pairs)), dtype=torch.int64).reshape(2, pairs)
        # 53 random bits -> uniform in (0, 1]; u1 > 0 keeps the log finite.
        bits = (raw >> 11) & ((1 << 53) - 1)  # 53 random bits, non-negative
        u = (bits.to(torch.float64) + 1.0) * (1.0 / 2**53)  # (2, pairs), in (0, 1]
        radius = torch.sqrt(-2.0 * torch.log(u[0]))
        angle = (2.0 * math.pi) * u[1]
        normal = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:n]  # (n,)
        return (normal * std).to(dtype=tensor.dtype, device=tensor.device).reshape(tensor.shape)

    def state_dict(self) -> dict:
        """Nothing: the secure source has no state that could reproduce its noise."""
        return {"secure": True}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore (the secure source is stateless)."""
