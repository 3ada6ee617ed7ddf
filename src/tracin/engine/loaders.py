"""Iterating datasets in fixed order, in batches."""
from __future__ import annotations

from typing import Callable, Iterator, Optional, Tuple, Union

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset, Sampler, SequentialSampler, Subset, TensorDataset

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


def _map_style(data: object) -> bool:
    """A torch Dataset, or any other indexable, sized collection of examples (a Hugging Face ``datasets.Dataset``);
    not a bare tuple, list, tensor or array, which hold columns rather than examples."""
    if isinstance(data, Dataset):
        return True
    if isinstance(data, (tuple, list, torch.Tensor, np.ndarray, str, bytes)) or data is None:
        return False
    return hasattr(data, "__getitem__") and hasattr(data, "__len__")


def _sliceable(data: Dataset) -> bool:
    return isinstance(data, TensorDataset) or (isinstance(data, Subset) and isinstance(data.dataset, TensorDataset))


def make_loader(data: DataSource, batch_size: int, what: str, num_workers: int = 0) -> DataLoader:
    """A DataLoader over ``data`` that yields examples in index order.

    A DataLoader passed in is used as it is, but it must not shuffle: result indices are
    positions in the order the loader yields.
    """
    if isinstance(data, DataLoader):
        _check_loader(data, what)
        loader = data
    elif not _map_style(data):
        raise DataError(f"The {what} set is a {type(data).__name__}, not a torch Dataset or DataLoader; wrap tensors as "
                        "TensorDataset(inputs, labels) (from torch.utils.data), or pass a map-style Dataset.")
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


def _check_loader(loader: DataLoader, what: str) -> None:
    """Refuse a DataLoader whose batches are not every example once, in index order: one that shuffles or
    samples (its own sampler or batch_sampler), or one that drops its last incomplete batch."""
    batches = loader.batch_sampler
    in_order = (isinstance(loader.sampler, (SequentialSampler, _SliceSampler)) if batches is None
                else type(batches) is BatchSampler and isinstance(batches.sampler, SequentialSampler))
    if not in_order and not isinstance(loader.dataset, IterableDataset):
        raise DataError(f"The {what} DataLoader shuffles or samples (its sampler or batch_sampler is not sequential); pass "
                        "one with shuffle=False and no custom sampler so indices mean positions.")
    if loader.drop_last:
        raise DataError(f"The {what} DataLoader has drop_last=True, so the examples of its last batch would get no score; "
                        "pass one with drop_last=False.")


def numbered_batches(loader: DataLoader, batch_size: Callable[[object], int], first: int = 0) -> Iterator[Tuple[int, object]]:
    """(index of the batch's first example, batch) for each batch; ``first``: the index of the loader's first
    example. Refuses a dataset that yields more or fewer examples than its length says (an iterable dataset
    with a wrong ``__len__``), which would otherwise shift or drop scores."""
    sampler = loader.sampler
    end = first + (sampler.n - sampler.start if isinstance(sampler, _SliceSampler) else dataset_size(loader))
    for batch in loader:
        size = batch_size(batch)
        if first + size > end:
            raise DataError(f"The dataset yielded more examples than its length ({end}); fix its __len__ so every "
                            "example gets its own index.")
        yield first, batch
        first += size
    if first != end:
        raise DataError(f"The dataset yielded {first} examples but its length says {end}; fix its __len__ so every "
                        "example gets its own index.")


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


class Indexed(Dataset):
    """A map-style dataset whose items carry their index first: ``(i, *dataset[i])`` (a dict item gains ``"index"``),
    so a shuffling DataLoader still tells the recorder which examples each batch holds."""

    def __init__(self, dataset: object):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> object:
        item = self.dataset[i]  # type: ignore[index]
        if isinstance(item, dict):
            return {"index": i, **item}
        return (i, *item) if isinstance(item, (tuple, list)) else (i, item)
