"""Approximate search over a gradient index with FAISS (``pip install -e '.[ann]'``): an inverted-file index
(``IVF{lists},Flat``, inner product) over the rows, trained on a spread sample, filled shard by shard, and kept in
the index directory (``ann.faiss``, FAISS's own binary format, no pickle) until the index's rows change. A query
probes ``probes`` of its lists for the proponents (largest q . x) and again with -q for the opponents; the exact
search of :func:`tracin.engine.index.search` stays the default, and benchmarks/index_scale.py prints the recall.
"""
from __future__ import annotations

import json
import math
from typing import Any, Dict, Tuple

import numpy as np
import torch

from ..errors import TracInError
from ..io import write_bytes, write_json
from .index import GradientIndex, search

ANN_FILE = "ann.faiss"
ANN_META = "ann.json"
_LOADED: dict = {}  # the FAISS index read last, by its file's (path, mtime, size)


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise TracInError("Approximate search needs FAISS: pip install -e '.[ann]' (faiss-cpu), or drop the ANN "
                          "option for the exact search.") from None
    return faiss


def _key(index: GradientIndex) -> dict:
    return {"rows": index.meta.n_rows, "shards": [s["name"] for s in index.meta.shards]}


def ann_index(index: GradientIndex) -> Any:
    """The FAISS index of ``index``'s rows, read from the directory when it matches the rows, else built and saved."""
    faiss = _faiss()
    index.require_complete()
    path, meta_path = index.directory / ANN_FILE, index.directory / ANN_META
    if path.is_file() and _recorded(meta_path) == _key(index):
        stamp = (str(path.resolve()), path.stat().st_mtime_ns, path.stat().st_size)
        try:
            if _LOADED.get("stamp") != stamp:  # the last one read stays in memory for the next query
                _LOADED.update(stamp=stamp, ivf=faiss.deserialize_index(np.fromfile(path, dtype=np.uint8)))
            if _LOADED["ivf"].d == index.width():
                return _LOADED["ivf"]
        except RuntimeError:  # a damaged file: built again below
            _LOADED.clear()
    n, width = index.meta.n_rows, index.width()
    lists = max(1, min(int(4 * math.sqrt(n)), n // 39))  # FAISS wants about 39 training points per list
    ivf = faiss.index_factory(width, f"IVF{lists},Flat", faiss.METRIC_INNER_PRODUCT)
    ivf.train(_sample(index, min(n, 64 * lists)))
    for shard in index.meta.shards:
        ivf.add(index.as_float(index.read_rows(shard)).numpy())
    write_bytes(path, faiss.serialize_index(ivf).tobytes())
    write_json(meta_path, _key(index))
    return ivf


def _recorded(meta_path) -> Any:
    """What ``ann.json`` says the FAISS file was built from (None when it is missing or unreadable)."""
    try:
        return json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None


def _sample(index: GradientIndex, count: int) -> np.ndarray:
    """About ``count`` rows spread over every shard (a seeded choice within each), float32."""
    g = np.random.default_rng(0)
    parts = []
    for shard in index.meta.shards:
        take = max(1, round(count * shard["rows"] / index.meta.n_rows))
        rows = index.as_float(index.read_rows(shard)).numpy()
        parts.append(rows[np.sort(g.choice(len(rows), size=min(take, len(rows)), replace=False))])
    return np.concatenate(parts)


def approximate_search(index: GradientIndex, queries: torch.Tensor, top_k: int, probes: int
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(proponent values, indices, opponent values, indices), each [m, top_k], from ``probes`` lists of the IVF index;
    the probes are raised where fewer would not hold ``top_k`` rows."""
    ivf = ann_index(index)
    ivf.nprobe = min(ivf.nlist, max(probes, math.ceil(2 * top_k * ivf.nlist / max(1, index.meta.n_rows))))
    q = np.ascontiguousarray(queries.detach().float().cpu().numpy())
    pos_v, pos_i = ivf.search(q, top_k)
    neg_v, neg_i = ivf.search(-q, top_k)
    if (pos_i < 0).any() or (neg_i < 0).any():
        raise TracInError(f"The approximate search found fewer than top_k={top_k} rows in {ivf.nprobe} of its {ivf.nlist} "
                          "lists; raise the probes or use the exact search.")
    return (torch.from_numpy(pos_v), torch.from_numpy(pos_i).long(), torch.from_numpy(-neg_v), torch.from_numpy(neg_i).long())


def approximate_with_recall(index: GradientIndex, queries: torch.Tensor, top_k: int, probes: int,
                            exact_on: Tuple[torch.device, int]) -> Tuple[Tuple[torch.Tensor, ...], Dict[str, Any]]:
    """:func:`approximate_search` of ``queries`` [m, width], and its recall@k against the exact search
    (:func:`tracin.engine.index.search` on ``exact_on`` = (device, tile bytes)) measured on up to 10 of them:
    (the four [m, top_k] results, {"search", "ann_recall", "ann_recall_sample"})."""
    if not isinstance(probes, int) or isinstance(probes, bool) or probes < 1:
        raise TracInError(f"ann_probes must be a positive integer (lists probed), got {probes!r}.")
    found = approximate_search(index, queries, top_k, probes)
    device, tile_bytes = exact_on
    sample = queries[:10]
    exact = search(index, sample.to(device), top_k, tile_bytes).result()[1].cpu()
    hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found[1], exact))
    return found, {"search": f"ann, {probes} probes", "ann_recall": hits / (len(sample) * top_k),
                   "ann_recall_sample": len(sample)}
