"""Iterating datasets in fixed order, in batches."""
from __future__ import annotations

from typing import Optional, Union

from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, SequentialSampler, Subset, TensorDataset

from ..errors import DataError

DataSource = Union[Dataset, DataLoader]


class _SliceSampler(Sampler):
    """Yields slice(start, stop) per batch, in order: tensor datasets then return whole batches as
    views, with no per-example indexing or collation."""

    def __init__(self, n: int, batch_size: int, start: int = 0):
        self.n, self.batch_size, self.start = n, batch_size, start

    def __iter__(self):
        return (slice(i, min(i + self.batch_size, self.n)) for i in range(self.start, self.n, self.batch_size))

    def __len__(self) -> int:
        return -(-(self.n - self.start) // self.batch_size)


def _sliceable(data: Dataset) -> bool:
    return isinstance(data, TensorDataset) or (isinstance(data, Subset) and isinstance(data.dataset, TensorDataset))


def make_loader(data: DataSource, batch_size: int, what: str, num_workers: int = 0) -> DataLoader:
    """A DataLoader over ``data`` that yields examples in index order.

    A DataLoader passed in is used as it is, but it must not shuffle: result indices are
    positions in the order the loader yields.
    """
    if isinstance(data, DataLoader):
        if not isinstance(data.sampler, SequentialSampler) and getattr(data, "batch_sampler", None) is not None:
            sampler = data.batch_sampler.sampler if hasattr(data.batch_sampler, "sampler") else None
            if not isinstance(sampler, SequentialSampler):
                raise DataError(f"The {what} DataLoader shuffles or samples; pass one with shuffle=False so indices mean positions.")
        loader = data
    elif _sliceable(data):
        loader = DataLoader(data, batch_size=None, sampler=_SliceSampler(len(data), batch_size))
    else:
        loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                            persistent_workers=num_workers > 0)
    try:
        size = len(loader.dataset)  # type: ignore[arg-type]
    except TypeError:
        size = None
    if size == 0:
        raise DataError(f"The {what} set is empty; give it at least one example.")
    return loader


def loader_from(loader: DataLoader, start: int) -> Optional[DataLoader]:
    """A loader yielding the batches ``loader`` yields from example ``start`` on, without reading the
    examples before it (a resumed run need not decode what it already scored); None when that cannot
    be done safely: an iterable dataset, a custom sampler, or ``start`` not on a batch boundary."""
    if start == 0:
        return loader
    dataset = loader.dataset
    if isinstance(dataset, IterableDataset):
        return None
    if isinstance(loader.sampler, _SliceSampler):
        sampler = loader.sampler
        if start % sampler.batch_size or sampler.start:
            return None
        return DataLoader(dataset, batch_size=None, sampler=_SliceSampler(sampler.n, sampler.batch_size, start))
    size = loader.batch_size
    if not isinstance(loader.sampler, SequentialSampler) or not size or start % size or loader.drop_last:
        return None
    workers = loader.num_workers
    return DataLoader(Subset(dataset, range(start, len(dataset))), batch_size=size, shuffle=False,  # type: ignore[arg-type]
                      num_workers=workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                      persistent_workers=workers > 0 and loader.persistent_workers)


def dataset_size(loader: DataLoader) -> int:
    """Number of examples behind a loader (requires a sized dataset)."""
    try:
        return len(loader.dataset)  # type: ignore[arg-type]
    except TypeError as exc:
        raise DataError("The dataset has no length; wrap it in a map-style Dataset.") from exc
