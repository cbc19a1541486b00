import numpy as np
from scipy.spatial.distance import pdist

from tasks.report import pairwise_stats


def test_exact_stats_match_brute_force():
    x = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32)
    stats = pairwise_stats(x, memory_gb=1.0)
    reference = pdist(x.astype(np.float64))
    assert stats["exact"] and stats["n_pairs"] == len(reference)
    np.testing.assert_allclose([stats["min"], stats["mean"], stats["max"]],
                               [reference.min(), reference.mean(), reference.max()], rtol=1e-5)


def test_large_inputs_are_estimated_from_random_pairs_within_the_memory_cap():
    x = np.random.default_rng(1).normal(size=(3000, 8)).astype(np.float32)
    stats = pairwise_stats(x, memory_gb=1e-6)
    reference = pdist(x.astype(np.float64))
    assert not stats["exact"] and stats["n_pairs"] == 2_000_000 or stats["n_pairs"] == len(reference)
    assert abs(stats["mean"] - reference.mean()) < 0.01 * reference.mean()


def test_fewer_than_two_samples_have_no_stats():
    assert pairwise_stats(np.zeros((1, 3), np.float32), 1.0) is None
