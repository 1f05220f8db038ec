"""Gaussian noise from generators the engine owns and checkpoints.

Never torch's global RNG: the user's own random calls (dropout, shuffling) would
change the noise, and a resumed run could not reproduce it. One generator per
device, all seeded from one master seed; ``state_dict`` carries their states.
"""

from __future__ import annotations

import secrets

import torch


class NoiseSource:
    """Draws ``N(0, std^2)`` tensors shaped like parameters, on the parameter's device."""

    def __init__(self, seed: int | None = None):
        # A secure default: without a seed, the noise is not predictable from the code.
        self.seed = secrets.randbits(63) if seed is None else int(seed)
        self._generators: dict[str, torch.Generator] = {}

    def generator(self, device: torch.device | str) -> torch.Generator:
        key = str(torch.device(device))
        if key not in self._generators:
            gen = torch.Generator(device=key)
            gen.manual_seed(self.seed + len(self._generators))
            self._generators[key] = gen
        return self._generators[key]

    def gaussian_like(self, tensor: torch.Tensor, std: float) -> torch.Tensor:
        gen = self.generator(tensor.device)
        noise = torch.empty_like(tensor)
        noise.normal_(mean=0.0, std=std, generator=gen)
        return noise

    def state_dict(self) -> dict:
        return {
            "seed": self.seed,
            "order": list(self._generators),
            "states": {k: g.get_state() for k, g in self._generators.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])
        self._generators = {}
        for key in state["order"]:
            gen = self.generator(key)
            gen.set_state(state["states"][key])
