"""Suite-wide fixtures: every test starts from a known seed, whatever ran before it.

Options (see ``make test-fragility``):
- ``--seed N``: the seed every test starts from (default 0). A test that passes at one seed and
  fails at another compares with a tolerance that does not follow from the math.
- ``--shuffle N``: run the modules, and the tests inside each module, in an order drawn with
  seed ``N`` (modules stay contiguous so module-scoped fixtures are built once). A test that
  depends on what ran before it fails here.

Under pytest-xdist (``make test``: ``-n 2 --dist loadgroup``) every worker process seeds each
test the same way, and the tests that use a module-scoped fixture are put in one ``xdist_group``
(see :func:`_group_tests_sharing_module_fixtures`), so that fixture is built once, not once per
worker.
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


def _module_fixture_names(item: pytest.Item) -> list[str]:
    """Module-scoped fixtures ``item`` uses, the suite-wide seeding one aside (cheap, and used by every test)."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:  # not a plain test function (e.g. a doctest item)
        return []
    return [name for name, defs in info.name2fixturedefs.items()
            if name != "_seeded_module" and any(d.scope == "module" for d in defs)]


def _group_tests_sharing_module_fixtures(items: list[pytest.Item]) -> None:
    """Mark the tests that share a module-scoped fixture with one ``xdist_group`` per fixture.

    With ``--dist loadgroup`` xdist sends each group whole to one worker, so the fixture (a
    subprocess run, a saved model) is built once instead of once per worker that gets one of its
    tests; every other test is dealt out on its own. Fixtures that some test uses together land in
    one group (``<module>::<fixture>+<fixture>``). Without xdist the mark does nothing.
    """
    group_of: dict[tuple[str, str], set[str]] = {}  # (module, fixture) -> the fixtures grouped with it
    uses = []
    for item in items:
        module = item.nodeid.split("::")[0]
        names = set(_module_fixture_names(item))
        for name in list(names):
            names |= group_of.get((module, name), set())
        for name in names:
            group_of[(module, name)] = names
        uses.append((item, module, names))
    for item, module, names in uses:
        if names:
            item.add_marker(pytest.mark.xdist_group(f"{module}::{'+'.join(sorted(group_of[(module, min(names))]))}"))


# tryfirst: xdist's own hook reads the xdist_group marks (to suffix node ids) and must see them.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    _group_tests_sharing_module_fixtures(items)
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
