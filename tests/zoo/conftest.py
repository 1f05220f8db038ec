import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic():
    """Each zoo case builds its model under seed 0; keep torch's global RNG state from leaking across tests."""
    state = torch.random.get_rng_state()
    yield
    torch.random.set_rng_state(state)
