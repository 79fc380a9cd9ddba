import math

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
