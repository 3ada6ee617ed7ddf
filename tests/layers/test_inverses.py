"""Damped inverses of Kronecker factors: formed, solved and whitened, against torch.linalg.inv in float64."""
import torch

from helpers import inverse_tolerance, matrix_rel_err, rel_err
from tracin.layers.inverses import Inverses, damped_cholesky, low_rank_inverses, whitener


def test_whitener_inverts_the_damped_factor_and_leaves_a_zero_factor_alone():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(2, 30, 5, generator=g, dtype=torch.float64)
    S = X.transpose(1, 2) @ X / 30
    W = whitener(S, 0.1)
    lam = 0.1 * torch.diagonal(S, dim1=1, dim2=2).mean(1)
    damped = S + lam[:, None, None] * torch.eye(5, dtype=S.dtype)
    assert matrix_rel_err(W @ W.transpose(1, 2), torch.linalg.inv(damped)) <= inverse_tolerance(damped)
    assert torch.equal(whitener(torch.zeros(1, 3, 3), 0.1), torch.eye(3, dtype=torch.float64).unsqueeze(0))


def test_the_inverse_applied_by_solves_and_by_the_formed_inverse_agree():
    """A few query rows are solved with the Cholesky factor; past n d / 3 rows the inverse is formed and multiplied."""
    g = torch.Generator().manual_seed(2)
    X = torch.randn(2, 3, 40, 9, generator=g, dtype=torch.float64)
    S = X.transpose(-1, -2) @ X / 40  # [n=2 checkpoints, g=3 groups, 9, 9]
    L, W = damped_cholesky(S.flatten(0, 1), 0.1)
    assert W is None
    inverses = Inverses(torch.device("cpu"), torch.float32, cholesky=L.view(S.shape))
    lam = 0.1 * torch.diagonal(S, dim1=-2, dim2=-1).mean(-1)
    want_P = torch.linalg.inv(S + lam[..., None, None] * torch.eye(9, dtype=torch.float64))
    for rows in (2, 4, 20):  # 2 and 4 rows: within 2 * 9 / 3 = 6 rows, solved; 20: past it, the inverse is formed
        Q = torch.randn(rows, 3, 1, 9, generator=g)
        for c in range(2):
            want = torch.einsum("bgti,gij->bgtj", Q.double(), want_P[c])
            assert rel_err(inverses.apply_inverse(c, Q), want) <= 1e-5
    assert rel_err(inverses.inverse(), want_P) <= 1e-5 and rel_err(
        inverses.whitener() @ inverses.whitener().transpose(-1, -2), want_P) <= 1e-5


def test_a_factor_of_few_rows_has_an_exact_low_rank_inverse(monkeypatch):
    """S = X^T X / n of rank r < d: the damped inverse, a whitener and their application from the r x r Gram matrix;
    no eigen-decomposition until a whitener is asked for."""
    g = torch.Generator().manual_seed(3)
    X = torch.randn(2, 6, 20, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, 20, dtype=torch.float64)
    X[1, 3] = X[1, 2]  # a repeated row: the Gram matrix is singular, its zero direction drops out
    inverses = low_rank_inverses(X, 6, 0.1, (torch.device("cpu"), torch.float64))
    S = X.transpose(1, 2) @ X / 6
    lam = 0.1 * torch.diagonal(S, dim1=1, dim2=2).mean(1)
    want_P = torch.linalg.inv(S + lam[:, None, None] * torch.eye(20, dtype=torch.float64))
    decomposed, eigh = [], torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda M: decomposed.append(M.shape) or eigh(M))
    Q = torch.randn(5, 2, 3, 20, generator=g)
    assert rel_err(inverses.apply_inverse(0, Q), torch.einsum("bgti,gij->bgtj", Q.double(), want_P)) <= 1e-6
    assert rel_err(inverses.inverse()[0], want_P) <= 1e-10 and not decomposed
    W = inverses.whitener()[0]
    assert decomposed == [(1, 2, 6, 6)]
    assert rel_err(W @ W.transpose(-1, -2), want_P) <= 1e-10
    assert rel_err(inverses.apply_whitener(0, Q), torch.einsum("bgti,gij->bgtj", Q.double(), W)) <= 1e-6
    zero = low_rank_inverses(torch.zeros(1, 2, 4, dtype=torch.float64), 2, 0.1, (torch.device("cpu"), torch.float64))
    assert torch.equal(zero.inverse()[0], torch.eye(4, dtype=torch.float64).unsqueeze(0))
