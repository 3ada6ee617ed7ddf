"""Which training sentences made a (tiny) BERT classifier call a review positive?

A BERT-style sequence classifier is built from a small config (nothing is downloaded), trained for a few epochs
on generated reviews with AdamW, saving a checkpoint (weights + learning rate) after each epoch. TracIn then scores
every parameter, exactly (the position embeddings, looked up once per batch, with their output expanded to the
batch while the gradients are captured, so they keep a fast kernel too), with the
default task for Hugging Face dict batches: the cross-entropy of the logits against ``labels``. Each checkpoint
is weighted by its learning rate, TracIn's plain-gradient reading of the optimizer's step. Some training
reviews carry the wrong label on purpose; they show up as opponents and at the top of self-influence.

    python examples/hf_text_classification.py --workdir hf_out     # about 20 s on 2 CPU cores
"""
import argparse
import random
from pathlib import Path

import torch
from datasets import Dataset
from transformers import BertConfig, BertForSequenceClassification

from hf_training import train_with_checkpoints  # examples/hf_training.py
from tracin import TracIn

POSITIVE = ["good", "great", "lovely", "excellent", "fine", "superb"]
NEGATIVE = ["bad", "awful", "poor", "terrible", "boring", "dull"]
FILLER = ["the", "film", "was", "a", "story", "plot", "acting", "really", "quite", "and", "music", "ending"]
VOCAB = ["[PAD]", "[CLS]"] + POSITIVE + NEGATIVE + FILLER


def review(rng: random.Random, positive: bool) -> str:
    words = rng.sample(FILLER, 4) + rng.sample(POSITIVE if positive else NEGATIVE, 2)
    rng.shuffle(words)
    return " ".join(words)


def encode(texts, labels, length=8) -> Dataset:
    """Word-level ids with a [CLS] token first, padded to ``length``, as a torch-formatted datasets.Dataset."""
    ids = [[1] + [VOCAB.index(w) for w in t.split()][: length - 1] for t in texts]
    rows = {"input_ids": [x + [0] * (length - len(x)) for x in ids],
            "attention_mask": [[1] * len(x) + [0] * (length - len(x)) for x in ids], "labels": labels}
    return Dataset.from_dict(rows).with_format("torch")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("hf_out"))
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    rng = random.Random(0)
    texts, labels = [], []
    for i in range(120):
        positive = i % 2 == 0
        texts.append(review(rng, positive))
        labels.append(int(positive) if i % 20 != 3 else int(not positive))  # 6 reviews labelled wrongly on purpose
    train = encode(texts, labels)
    test_texts = ["the film was really superb and lovely", "a boring plot and awful acting"]
    test = encode(test_texts, [1, 0])

    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=16, num_labels=2)
    model = BertForSequenceClassification(config)
    checkpoints = train_with_checkpoints(model, train, args.workdir, args.epochs, lr=0.005)
    everything = train[:]
    with torch.no_grad():
        logits = model(input_ids=everything["input_ids"], attention_mask=everything["attention_mask"]).logits
    accuracy = float((logits.argmax(1) == everything["labels"]).float().mean())
    print(f"Trained a {sum(p.numel() for p in model.parameters()):,}-parameter BERT for {args.epochs} epochs "
          f"(training accuracy {accuracy:.0%}); {len(checkpoints)} checkpoints in {args.workdir}.")

    tr = TracIn(model, checkpoints, layers="all", batch_size=32, progress=False)
    result = tr.influence(train, test, top_k=3)
    for row, text in enumerate(test_texts):
        print(f"\nTest: {text!r}")
        for kind, top in (("proponent", result.proponents), ("opponent", result.opponents)):
            for score, j in zip(top.values[row].tolist(), top.indices[row].tolist()):
                print(f"  {kind:10s} {score:+.4f}  [{'pos' if labels[j] else 'neg'}] {texts[j]}")
    selfs = tr.self_influence(train)
    flipped = {i for i in range(len(texts)) if i % 20 == 3}
    top = selfs.argsort(descending=True)[: len(flipped)].tolist()
    print(f"\nSelf-influence: {len(flipped & set(top))} of the {len(flipped)} wrongly labelled reviews are among the "
          f"top {len(flipped)}. Kernels: {sorted({row['kernel'] for row in tr.scope()})}.")


if __name__ == "__main__":
    main()
