"""Generated text data for the examples and tests: a 3-class topic data set (some training labels flipped), a
prompt/completion set, and a word-level tokenizer built from their words. Nothing is downloaded."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

TOPICS: Dict[str, Sequence[str]] = {
    "sports": ("goal", "match", "team", "coach", "score", "league", "player", "stadium", "referee", "season", "keeper", "final"),
    "weather": ("rain", "storm", "sunny", "cloud", "wind", "forecast", "snow", "humid", "thunder", "cold", "fog", "breeze"),
    "food": ("bread", "cheese", "soup", "recipe", "oven", "spicy", "salad", "dinner", "sugar", "pasta", "garlic", "butter"),
}
FILLER = ("the", "a", "today", "really", "we", "saw", "very", "new", "after", "this", "again", "some", "was", "and",
          "it", "in", "at", "for", "with", "on")
SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def topic_sentence(rng: np.random.Generator, topic: str) -> str:
    """A short sentence: 3-5 words of ``topic`` mixed with 3-6 filler words."""
    words = list(rng.choice(TOPICS[topic], size=int(rng.integers(3, 6)))) + list(rng.choice(FILLER, size=int(rng.integers(3, 7))))
    rng.shuffle(words)
    return " ".join(words)


def topic_rows(n: int, seed: int, flip_rate: float = 0.0) -> Tuple[List[Dict[str, object]], np.ndarray]:
    """``n`` rows ``{"text", "label", "true_label"}`` (labels are topic names) and a [n] bool mask of the rows whose
    label was flipped to another topic (``flip_rate`` of them, seeded)."""
    rng = np.random.default_rng(seed)
    names = list(TOPICS)
    rows, flipped = [], np.zeros(n, dtype=bool)
    flip = set(rng.choice(n, size=int(round(flip_rate * n)), replace=False).tolist()) if flip_rate > 0 else set()
    for i in range(n):
        topic = names[i % len(names)]
        label = topic
        if i in flip:
            label = names[(names.index(topic) + int(rng.integers(1, len(names)))) % len(names)]
            flipped[i] = True
        rows.append({"text": topic_sentence(rng, topic), "label": label, "true_label": topic})
    return rows, flipped


def completion_rows(n: int, seed: int) -> List[Dict[str, str]]:
    """Prompt/completion rows: 'topic of: <sentence>' -> ' <topic>'."""
    rng = np.random.default_rng(seed)
    names = list(TOPICS)
    return [{"prompt": f"topic of {topic_sentence(rng, names[i % 3])} is", "completion": f" {names[i % 3]}"}
            for i in range(n)]


def write_jsonl(path: Path, rows: Sequence[Dict[str, object]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def word_tokenizer(texts: Sequence[str], causal: bool = False):
    """A ``transformers`` fast tokenizer over the whitespace-separated words of ``texts`` (plus the topic words),
    built locally. BERT-style ([CLS] text [SEP], padding with [PAD]) unless ``causal``: then no special tokens are
    added, and [SEP] serves as the end-of-text and padding token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in texts for w in t.split()} | {w for ws in TOPICS.values() for w in ws} | set(FILLER)
                   | {"topic", "of", "is"} | set(TOPICS))
    vocab = {w: i for i, w in enumerate(list(SPECIAL) + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if causal:
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[SEP]", eos_token="[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")
