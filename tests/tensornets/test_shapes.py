import math
import signal

import pytest

from tensornets import factorize, padded_size, prime_factors


@pytest.mark.parametrize(
    "n, k, expected",
    [(768, 3, (8, 8, 12)), (4096, 4, (8, 8, 8, 8)), (3072, 4, (6, 8, 8, 8)), (11008, 4, (4, 8, 8, 43)), (60, 1, (60,))],
)
def test_factorize_known_sizes(n, k, expected):
    assert factorize(n, k) == expected


@pytest.mark.parametrize("n", [2, 12, 96, 576, 768, 1000, 1536, 2048, 3072, 4096, 11008])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_factorize_is_exact_and_most_balanced(n, k):
    if len(prime_factors(n)) < k:
        with pytest.raises(ValueError, match=f"n={n}"):
            factorize(n, k)
        return
    modes = factorize(n, k)
    assert math.prod(modes) == n and len(modes) == k and all(m > 1 for m in modes)
    assert list(modes) == sorted(modes)
    # brute force: no split has a smaller largest mode
    def splits(m, parts):
        if parts == 1:
            yield (m,)
            return
        for d in range(2, m + 1):
            if m % d == 0:
                for rest in splits(m // d, parts - 1):
                    yield (d,) + rest
    if n <= 4096:
        assert max(modes) == min(max(s) for s in splits(n, k))


def test_prime_cannot_split_and_padding_fixes_it():
    with pytest.raises(ValueError, match=r"n=769 .* pad"):
        factorize(769, 2)
    m = padded_size(769, 2)
    assert m >= 769 and len(factorize(m, 2)) == 2
    assert padded_size(768, 3) == 768


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_factorize_rejects_bad_sizes(bad):
    with pytest.raises((TypeError, ValueError), match="n"):
        factorize(bad, 2)


@pytest.fixture
def fails_instead_of_hanging():
    """A padded_size search that never ends (the bug these tests pin) fails after 10 s instead of hanging the run."""
    def timeout(*_):
        raise TimeoutError("padded_size did not return within 10 s")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(10)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.usefixtures("fails_instead_of_hanging")
@pytest.mark.parametrize(
    "max_ratio, error",
    [(0, ValueError), (-1.0, ValueError), (0.5, ValueError), (float("nan"), ValueError), ("2", TypeError),
     (True, TypeError)],
)
def test_padded_size_refuses_a_max_ratio_no_size_can_meet(max_ratio, error):
    # max_ratio < 1 or NaN: the search for a well-balanced size looped forever
    with pytest.raises(error, match=r"max_ratio="):
        padded_size(12, 2, max_ratio=max_ratio)


@pytest.mark.usefixtures("fails_instead_of_hanging")
@pytest.mark.parametrize("n", [1, 2, 769, 1000])
def test_padded_size_ends_at_max_ratio_one(n):
    # a mode is at least 2, so for n = 1 the bound is 2, not ceil(1 ** (1/k)) = 1 (which no split meets)
    m = padded_size(n, 2, max_ratio=1)
    assert m >= n and max(factorize(m, 2)) <= max(2, math.ceil(n**0.5))

