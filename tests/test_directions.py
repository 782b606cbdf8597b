"""The direction spec itself: Philox known answers, layout rules and the statistics of z."""

import numpy as np
import pytest
import torch
from scipy import stats

from hosl.directions.spec import philox4x32_10, randn_reference, split_seed


def _words(*values):
    return tuple(torch.tensor([v], dtype=torch.int64) for v in values)


@pytest.mark.parametrize(
    "counter,key,expected",
    [  # Random123's published known-answer vectors for philox4x32-10
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ],
)
def test_philox_known_answers(counter, key, expected):
    out = philox4x32_10(_words(*counter), key)
    assert tuple(int(w) for w in out) == expected


def test_seed_halves_are_the_key():
    assert split_seed(0x0123456789ABCDEF) == (0x89ABCDEF, 0x01234567)


def test_window_equals_slice_of_longer_draw():
    full = randn_reference(11, 1000)
    for offset, numel in [(0, 1), (1, 3), (3, 5), (7, 129), (998, 2)]:
        assert torch.equal(randn_reference(11, numel, offset), full[offset : offset + numel])


def test_large_offsets_and_extreme_seeds_are_finite_and_distinct():
    for seed in (0, 2**64 - 1):
        a = randn_reference(seed, 4097, 2**40 + 1)
        b = randn_reference(seed, 4097, 2**32 - 3)
        assert torch.isfinite(a).all() and torch.isfinite(b).all()
        assert not torch.equal(a, b)
    assert not torch.equal(randn_reference(0, 64), randn_reference(2**64 - 1, 64))


def test_counter_carry_across_2_32_boundary():
    # coordinates 4*(2**32 - 1) .. 4*2**32 + 3 cross the low counter word's wrap
    start = 4 * (2**32 - 1)
    joined = randn_reference(5, 8, start)
    assert torch.equal(joined[:4], randn_reference(5, 4, start))
    assert torch.equal(joined[4:], randn_reference(5, 4, start + 4))
    assert not torch.equal(joined[4:], randn_reference(5, 4, 4 * 0))  # high word really used


@pytest.mark.parametrize("seed", [0, 1, 2**63, 2**64 - 1])
def test_moments_and_normality(seed):
    z = randn_reference(seed, 1 << 18).double().numpy()
    n = z.size
    assert abs(z.mean()) < 5 / np.sqrt(n)
    assert abs(z.var() - 1) < 5 * np.sqrt(2 / n)
    assert abs(stats.skew(z)) < 5 * np.sqrt(6 / n)
    assert abs(stats.kurtosis(z)) < 5 * np.sqrt(24 / n)
    assert stats.kstest(z, "norm").pvalue > 1e-4


def test_tails_are_gaussian():
    z = randn_reference(3, 1 << 20).numpy()
    # P(|z| > 3) = 0.0026998; allow 6 sigma of binomial noise
    p, n = 0.0026998, z.size
    observed = np.mean(np.abs(z) > 3)
    assert abs(observed - p) < 6 * np.sqrt(p * (1 - p) / n)
    assert np.abs(z).max() < 6.5  # 23-bit radius uniform bounds |z| by sqrt(2*23*ln 2) ~ 5.65


def test_no_correlation_between_neighbouring_coordinates():
    z = randn_reference(7, 1 << 18).double().numpy()
    bound = 5 / np.sqrt(z.size)
    for lag in (1, 2, 3, 4, 5, 8):
        assert abs(np.corrcoef(z[:-lag], z[lag:])[0, 1]) < bound, lag
    # the two members of a Box-Muller pair and the two pairs of one Philox call
    quads = z.reshape(-1, 4)
    corr = np.corrcoef(quads.T)
    assert np.abs(corr - np.eye(4)).max() < 5 / np.sqrt(quads.shape[0])
    # squares too: Box-Muller pairs share a radius, which would show up here if broken
    sq = quads**2
    corr_sq = np.corrcoef(sq.T)
    assert np.abs(corr_sq - np.eye(4)).max() < 5 / np.sqrt(quads.shape[0])


def test_no_correlation_between_neighbouring_seeds():
    n = 1 << 16
    draws = [randn_reference(s, n).double().numpy() for s in range(8)]
    bound = 5 / np.sqrt(n)
    for a, b in zip(draws, draws[1:]):
        assert abs(np.corrcoef(a, b)[0, 1]) < bound
    big = [randn_reference(2**64 - 1 - s, n).double().numpy() for s in range(2)]
    assert abs(np.corrcoef(big[0], big[1])[0, 1]) < bound
