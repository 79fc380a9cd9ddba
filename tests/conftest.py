"""Suite-wide fixtures: every test starts from a known seed, whatever ran before it.

Options (see ``make test-fragility``):
- ``--seed N``: the seed every test starts from (default 0). A test that passes at one seed and
  fails at another compares with a tolerance that does not follow from the math.
- ``--shuffle N``: run the modules, and the tests inside each module, in an order drawn with
  seed ``N`` (modules stay contiguous so module-scoped fixtures are built once). A test that
  depends on what ran before it fails here.

Under pytest-xdist (``make test``: ``-n 2 --dist loadfile``) every worker seeds each test the
same way; a test file runs whole on one worker, so its module-scoped fixtures are built once. Every
worker collects the same ``--shuffle`` order (same seed), as xdist requires.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--seed", type=int, default=0, help="seed every test starts from (default 0)")
    parser.addoption(
        "--shuffle", type=int, default=None, help="shuffle module and test order with this seed (default: file order)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    shuffle = config.getoption("--shuffle")
    if shuffle is None:
        return
    rng = random.Random(shuffle)
    modules: dict[str, list[pytest.Item]] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::")[0], []).append(item)
    order = list(modules)
    rng.shuffle(order)
    items[:] = []
    for name in order:
        tests = modules[name]
        rng.shuffle(tests)
        items.extend(tests)


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


@pytest.fixture(autouse=True, scope="module")
def _seeded_module(request: pytest.FixtureRequest) -> None:
    """Seed before a module's fixtures run: autouse fixtures are set up before the module-scoped ones a test uses."""
    _seed_all(request.config.getoption("--seed"))


@pytest.fixture(autouse=True)
def _seeded(request: pytest.FixtureRequest) -> None:
    """Seed torch, numpy and ``random`` before each test so its data never depends on test order."""
    _seed_all(request.config.getoption("--seed"))
