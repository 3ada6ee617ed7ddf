"""The K-FAC fit's statistics: rows kept, gathered and multiplied out, and input factors shared by every checkpoint,
against X^T X summed directly."""
from typing import Dict, List, Optional

import pytest
import torch

from helpers import rel_err
from tracin.layers.statistics import CovarianceSums, InvariantInputs


def test_statistics_keep_few_rows_then_gather_rows_into_float64_sums(monkeypatch):
    """A factor keeps its rows while they are under half its width, then sums X^T X, a wide one over gathered rows
    (multiplied out once ROWS are gathered, and when read); the total is the same either way."""
    monkeypatch.setattr(CovarianceSums, "ROWS", 30)
    g = torch.Generator().manual_seed(4)
    sums = CovarianceSums(torch.float64, torch.device("cpu"))
    batches = [(torch.randn(3, 1, 1, 400, generator=g), torch.randn(3, 1, 1, 4, generator=g)) for _ in range(100)]
    seen, gathered = [], []
    for i, (A, D) in enumerate(batches):
        sums.add("fc", A, D, ones=True)
        seen.append(A)
        rows = sums.rows("fc", 0)
        assert (rows is not None) == (3 * (i + 1) * 2 <= 401)  # 401 columns with the bias: rows while 2 r <= 401
        assert sums.rows("fc", 1) is None  # 4 columns: summed from the first batch
        gathered.append((sums.nbytes() - (401 ** 2 + 4 ** 2) * 8) // (400 * 4))  # rows held beside the float64 sums
    assert max(gathered[67:]) < 30 and 0 in gathered[67:]  # past the kept rows, multiplied out every 30 rows
    X = torch.cat([torch.cat([a.flatten(0, 2), torch.ones(3, 1)], 1) for a in seen]).double()
    assert rel_err(sums.total("fc", 0)[0], X.T @ X) <= 1e-6 and sums.total("fc", 0).dtype == torch.float64


def _fit(batches: List[Dict[int, Dict[str, Optional[torch.Tensor]]]], groups: List[List[int]], checkpoints: int,
         limit: Optional[int], skipped: Optional[list] = None) -> List[CovarianceSums]:
    """Statistics of raw batches ({checkpoint: {layer: A or None}} per batch, D the same as A) read group by group at
    every checkpoint in turn, as a fit reads them; with ``limit``, through :class:`InvariantInputs` (the input
    factors not summed are listed in ``skipped``)."""
    sums = [CovarianceSums(torch.float64, torch.device("cpu")) for _ in range(checkpoints)]
    invariant = InvariantInputs(sums, limit) if limit is not None else None
    for group in groups:
        for c in range(checkpoints):
            for b in group:
                factors = batches[b][c]
                for name, A in factors.items():
                    if A is not None:
                        shared = invariant is not None and invariant.matches(c, b, name, A, False)
                        if shared:
                            skipped.append((c, b, name))
                        sums[c].add(name, A, A[..., :3], False, inputs=not shared)
                if invariant is not None and c > 0:
                    invariant.absent(c, b, factors)
                sums[c].count += 2
    if invariant is not None:
        invariant.finish()
    return sums


@pytest.mark.parametrize("limit", [10**9, 6000])
def test_input_factors_shared_by_checkpoints_sum_the_same(limit):
    """Layer "data" has the same inputs at every checkpoint; "deep" differs at every checkpoint; "late" matches until
    checkpoint 2 differs in the second group's middle batch; "branch" is absent at checkpoint 1 from batch 4 on (and at
    checkpoint 0 from batch 5). The totals equal plain sums; a ``limit`` of 6,000 bytes makes "late" (2,400 bytes a
    batch) stop taking part in the second group, after it matched in the first."""
    g = torch.Generator().manual_seed(0)

    def rows(width=50):
        return torch.randn(2, 1, 1, width, generator=g)

    batches = []
    for b in range(8):
        data, late, branch = rows(), rows(300), rows()
        batches.append({c: {"data": data.clone(), "deep": rows(),
                            "branch": None if (c == 1 and b >= 4) or (c == 0 and b >= 5) else branch.clone(),
                            "late": rows(300) if (c == 2 and b == 5) else late.clone()}
                        for c in range(3)})
    groups = [[0], [1, 2, 3], [4, 5, 6, 7]]
    skipped: list = []
    plain, shared = _fit(batches, groups, 3, None), _fit(batches, groups, 3, limit, skipped)
    for c in range(3):
        for name in ("data", "deep", "late", "branch"):
            assert rel_err(shared[c].total(name, 0), plain[c].total(name, 0)) <= 1e-12, (c, name)
            assert rel_err(shared[c].total(name, 1), plain[c].total(name, 1)) <= 1e-12, (c, name)
    assert torch.equal(shared[2].total("data", 0), shared[0].total("data", 0))
    assert not any(name == "deep" for _, _, name in skipped)
    assert len([s for s in skipped if s[2] == "data"]) == 16 and (1, 3, "branch") in skipped and (1, 4, "branch") not in skipped
    late = {(c, b) for c, b, name in skipped if name == "late"}
    if limit > 10**6:  # "late" up to its divergence at checkpoint 2
        assert (2, 4) in late and (2, 5) not in late and (1, 7) in late
    else:  # held in the first group only
        assert late == {(1, 0), (2, 0)}
