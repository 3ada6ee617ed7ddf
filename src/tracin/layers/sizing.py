"""How a per-layer dimension budget (``projection_dim``) splits between the two factors of a layer's gradient; shared
by random projection and by K-FAC's kept eigen-directions."""
from __future__ import annotations

import math
from typing import Tuple


def sides(dim: int, da: int, dd: int, ghost: bool) -> Tuple[int, int]:
    """(k_in, k_out) for a per-example representation of about ``dim`` numbers of a layer's gradient sum_t d_t a_t^T
    (inputs ``da`` wide, bias included, output-gradients ``dd`` wide). ``ghost``: the kernel uses the two factors
    themselves, so k_in + k_out = dim, the narrower side kept whole when it is under half; otherwise their product
    is the representation, k_in * k_out = dim. A side that fits stays at its full width."""
    if ghost:
        if da + dd <= dim:
            return da, dd
        if dd <= da:
            k_out = min(dd, max(1, dim // 2))
            return min(da, max(1, dim - k_out)), k_out
        k_in = min(da, max(1, dim // 2))
        return k_in, min(dd, max(1, dim - k_in))
    k_out = min(dd, max(1, round(math.sqrt(dim))))
    k_in = min(da, max(1, dim // k_out))
    if k_in == da and k_out < dd:  # the input side fits: give the output side the rest
        k_out = min(dd, max(1, dim // da))
    return k_in, k_out
