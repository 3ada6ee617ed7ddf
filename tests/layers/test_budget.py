"""How projection_dim's budget is shared among the layers under K-FAC (tracin.layers.budget), against brute force."""
import itertools

import torch

from tracin.layers.budget import _best_splits, _share, _upper_hull, allocate
from tracin.layers.inverses import damped_eigen
from tracin.layers.sizing import sides
from tracin.layers.statistics import CovarianceSums


def _curve(values):
    v = torch.tensor(values, dtype=torch.float64)
    return torch.cat([v.new_zeros(1), v.cumsum(0)])


def test_best_split_of_each_total_is_the_brute_force_one():
    g = torch.Generator().manual_seed(0)
    inputs, outputs = _curve(torch.rand(5, generator=g).tolist()), _curve(torch.rand(7, generator=g).tolist())
    best, k_in = _best_splits(inputs, outputs)
    for b in range(2, 13):
        want = max(inputs[i] * outputs[b - i] for i in range(1, 6) if 1 <= b - i <= 7)
        assert torch.isclose(best[b], want) and torch.isclose(inputs[k_in[b]] * outputs[b - k_in[b]], want)
    assert best[1] == float("-inf")


def test_hull_is_concave_and_covers_every_point():
    f = [0.0, 0.0, 1.0, 1.2, 3.0, 3.1, 3.15, 4.0, 4.01]
    hull = _upper_hull(f, start=2)
    assert hull[0] == 2 and hull[-1] == len(f) - 1
    slopes = [(f[b] - f[a]) / (b - a) for a, b in zip(hull, hull[1:])]
    assert all(x >= y for x, y in zip(slopes, slopes[1:]))
    for a, b in zip(hull, hull[1:]):  # no point above a chord
        assert all(f[m] <= f[a] + (f[b] - f[a]) * (m - a) / (b - a) + 1e-12 for m in range(a, b + 1))


def test_shared_budget_is_optimal_for_concave_gains():
    """With concave per-layer gains the slopes taken in order give the optimum of the sum (checked exhaustively)."""
    g = torch.Generator().manual_seed(1)
    pooled = {}
    for name, width in (("a", 6), ("b", 9), ("c", 4)):
        steps = torch.rand(width - 2, generator=g, dtype=torch.float64).sort(descending=True).values
        f = torch.cat([torch.tensor([float("-inf"), float("-inf"), 0.0], dtype=torch.float64), steps.cumsum(0)])
        pooled[name] = (f, torch.ones(width + 1, dtype=torch.long))
    for budget in (6, 10, 13, 19):
        totals = _share(pooled, budget)
        assert sum(totals.values()) == budget and all(2 <= t < len(pooled[n][0]) for n, t in totals.items())
        got = sum(float(pooled[n][0][t]) for n, t in totals.items())
        best = max(sum(float(pooled[n][0][t]) for n, t in zip(pooled, choice))
                   for choice in itertools.product(*(range(2, len(f)) for f, _ in pooled.values())) if sum(choice) == budget)
        assert abs(got - best) <= 1e-9


def test_layers_share_the_budget_by_their_spectra():
    """A layer whose factors are flat keeps more than one with a few strong directions; the shared total is the
    budget times the ghost-form layers; a layer of many positions keeps about the budget on its own."""
    g = torch.Generator().manual_seed(2)
    sums = [CovarianceSums(torch.float64, torch.device("cpu")) for _ in range(2)]
    strong = torch.randn(40, 1, 1, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 30, generator=g, dtype=torch.float64)
    for s in sums:
        s.add("flat", torch.randn(40, 1, 1, 30, generator=g, dtype=torch.float64), torch.randn(40, 1, 1, 20, generator=g, dtype=torch.float64), False)
        s.add("strong", strong + 0.01 * torch.randn(strong.shape, generator=g, dtype=torch.float64),
              torch.randn(40, 1, 1, 1, generator=g, dtype=torch.float64) * torch.ones(20, dtype=torch.float64), False)
        s.add("conv", torch.randn(4, 1, 10, 30, generator=g, dtype=torch.float64), torch.randn(4, 1, 10, 20, generator=g, dtype=torch.float64),
              False, ghost=False)
        s.count = 40
    def spectrum(c, name, side):
        values, _, lam = damped_eigen(sums[c].total(name, side) / sums[c].count, 0.1)
        return values, lam

    kept = allocate(sums, 16, spectrum)
    assert sum(kept["flat"]) + sum(kept["strong"]) == 32 and all(k >= 1 for name in ("flat", "strong") for k in kept[name])
    assert sum(kept["flat"]) > sum(kept["strong"]) and kept["strong"][1] <= 2  # its output gradients have one direction
    assert kept["conv"] == sides(16, 30, 20, False)
