"""Text rows to token ids: what each example's loss is on, and the batches the scorer reads.

* sequence classification: ``text`` (and ``text_pair``) tokenized as the model was trained, ``labels`` the class id;
* causal language modelling: ``prompt`` + ``completion`` with the loss on the completion tokens only (the prompt's
  labels are -100, which :class:`tracin.tasks.hf.HFTask` ignores), or ``text`` whole when no prompt field is given.

Sequences longer than ``max_length`` tokens are truncated (a prompt loses its beginning, so the completion stays) and
counted. Batches are padded to their longest example (right side; padding masked and labelled -100), so a batch costs
what its own texts cost.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch.utils.data import Dataset

from ...errors import DataError
from .records import Records, display

IGNORE = -100


@dataclass(frozen=True)
class TextFields:
    """Which fields of a row hold what, and the longest sequence scored."""

    kind: str = "sequence"  # "sequence" | "causal_lm"
    text: str = "text"
    text_pair: Optional[str] = None
    label: str = "label"
    prompt: Optional[str] = None
    completion: Optional[str] = None
    max_length: int = 512


GENERIC = re.compile(r"LABEL_\d+")


@dataclass
class LabelSet:
    """A sequence classifier's classes in output order, from its config's ``id2label``."""

    names: List[str]

    def named_for(self, values: Sequence[Any]) -> "LabelSet":
        """The classes as the data names them. A config that never named its classes (``LABEL_0``, ``LABEL_1``, ...,
        transformers' default) met with labels given as names: the names in sorted order take the ids (as
        ``datasets``' ``class_encode_column`` and scikit-learn's ``LabelEncoder`` number them), with a warning that
        says so; more names than the model has outputs is one clear error."""
        words = sorted({v for v in values if isinstance(v, str) and not v.strip().lstrip("-").isdigit()})
        if not words or not all(GENERIC.fullmatch(n) for n in self.names) or set(words) <= set(self.names):
            return self
        if len(words) > len(self.names):
            raise DataError(f"The data has {len(words)} label names ({', '.join(words[:8])}) but the model has "
                            f"{len(self.names)} outputs; give the --label_field it was trained on, or the matching model.")
        warnings.warn(f"The model's config names its classes {', '.join(self.names)}, so the labels are numbered in sorted "
                      f"order: {', '.join(f'{w}={i}' for i, w in enumerate(words))}; if it was trained otherwise, set "
                      "id2label in its config.json.", stacklevel=2)
        return LabelSet(words + self.names[len(words):])

    def id_of(self, value: Any, where: str, flag: str) -> int:
        """The class id of a label given by name or by number; one clear error for anything else."""
        if isinstance(value, str) and value in self.names:
            return self.names.index(value)
        number = value if isinstance(value, int) and not isinstance(value, bool) else \
            int(value) if isinstance(value, str) and value.strip().lstrip("-").isdigit() else None
        if number is not None and 0 <= number < len(self.names):
            return number
        shown = ", ".join(self.names[:12]) + (" ..." if len(self.names) > 12 else "")
        raise DataError(f"The label {value!r} at {where} ({flag}) is not in the model's label set ({shown}, or their "
                        f"numbers 0-{len(self.names) - 1}); fix the label, or give the field that holds it.")


@dataclass
class Encoded:
    """Token ids of every example of one split, and what the tables show of it.

    examples[i]: ``input_ids``, ``attention_mask`` (``token_type_ids``) as lists, ``labels`` an int (sequence) or a
    list aligned with ``input_ids`` (causal LM). shown[i]: the input text for display; target[i]: its label name or
    completion; truncated: examples cut to ``max_length``.
    """

    examples: List[Dict[str, Any]]
    shown: List[str]
    target: List[str]
    truncated: int


def encode(records: Records, fields: TextFields, tokenizer: Any, labels: Optional[LabelSet]) -> Encoded:
    """The examples of ``records`` as ``fields`` describe them (``labels``: the classifier's classes)."""
    if fields.kind == "sequence":
        assert labels is not None, "a sequence classifier has a label set"
        return _sequence(records, fields, tokenizer, labels)
    return _causal(records, fields, tokenizer)


def _texts(records: Records, name: str, flag: str) -> List[str]:
    values = records.column(name, flag)
    bad = next((w for w, v in zip(records.where, values) if not isinstance(v, str)), None)
    if bad is not None:
        raise DataError(f"The field {name!r} ({flag}) at {bad} is not text; give the field that holds the text.")
    return values


def _sequence(records: Records, fields: TextFields, tokenizer: Any, labels: LabelSet) -> Encoded:
    texts = _texts(records, fields.text, "--text_field")
    pairs = _texts(records, fields.text_pair, "--text_pair_field") if fields.text_pair else None
    ids = [labels.id_of(v, w, "--label_field") for v, w in zip(records.column(fields.label, "--label_field"), records.where)]
    whole = tokenizer(texts, pairs)["input_ids"]
    encoded = tokenizer(texts, pairs, truncation=True, max_length=fields.max_length)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded]
    examples = [{**{k: encoded[k][i] for k in keys}, "labels": ids[i]} for i in range(len(texts))]
    shown = [display(t if pairs is None else f"{t} ‖ {pairs[i]}") for i, t in enumerate(texts)]
    return Encoded(examples, shown, [labels.names[i] for i in ids], sum(len(w) > fields.max_length for w in whole))


def _causal(records: Records, fields: TextFields, tokenizer: Any) -> Encoded:
    limit = fields.max_length
    if fields.prompt:
        prompts = _texts(records, fields.prompt, "--prompt_field")
        completions = _texts(records, fields.completion or "completion", "--completion_field")
        heads = tokenizer(prompts)["input_ids"]
        tails = tokenizer(completions, add_special_tokens=False)["input_ids"]
    else:
        prompts, completions = [""] * len(records.rows), _texts(records, fields.text, "--text_field")
        heads, tails = [[] for _ in prompts], tokenizer(completions)["input_ids"]
    examples, truncated = [], 0
    for head, tail in zip(heads, tails):
        if len(head) + len(tail) > limit:
            truncated += 1
            tail = tail[:limit]
            head = head[len(head) - (limit - len(tail)):] if limit > len(tail) else []  # the prompt loses its beginning
        examples.append({"input_ids": head + tail, "attention_mask": [1] * (len(head) + len(tail)),
                         "labels": [IGNORE] * len(head) + list(tail)})
    empty = next((w for w, t in zip(records.where, tails) if not t), None)
    if empty is not None:
        raise DataError(f"The completion at {empty} has no tokens, so its loss is empty; give every example a completion.")
    return Encoded(examples, [display(p) for p in prompts], [display(c) for c in completions], truncated)


class Examples(Dataset):
    """A split's encoded examples, one dict of lists each; batch them with :class:`PadBatch`."""

    def __init__(self, examples: Sequence[Dict[str, Any]]):
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        return self.examples[i]


class PadBatch:
    """Collate examples into a dict of tensors padded on the right to the batch's longest: ``input_ids`` with
    ``pad_id``, masks and token types with 0, per-token labels with -100; class labels as a [B] tensor."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: Sequence[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        longest = max(len(e["input_ids"]) for e in batch)
        fill = {"input_ids": self.pad_id, "attention_mask": 0, "token_type_ids": 0, "labels": IGNORE}
        out = {}
        for key in batch[0]:
            if key == "labels" and not isinstance(batch[0][key], list):
                out[key] = torch.tensor([e[key] for e in batch])
            else:
                out[key] = torch.tensor([e[key] + [fill[key]] * (longest - len(e[key])) for e in batch])
        return out
