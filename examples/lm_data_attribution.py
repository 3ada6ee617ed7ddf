"""Which training documents drive a (tiny) language model's continuation?

A GPT-2-style causal language model is built from a small config (nothing is downloaded) and trained on generated
documents, each stating where a few people live ("alice lives in paris ."), with a checkpoint (weights + learning
rate) after each epoch. The test example is a prompt and its continuation with the prompt's labels set to -100,
so the loss, and so the influence, is that of the continuation alone. TracIn scores every parameter, exactly:
GPT-2's Conv1D layers with the Linear kernels, its position embeddings with the embedding kernel (looked up once
per batch, their output expanded to the batch while gradients are captured), and its embedding matrix (tied to the
output layer) from both uses, summed (materialised). The documents that state the fact come out on top.

    python examples/lm_data_attribution.py --workdir lm_out     # about 30 s on 2 CPU cores
"""
import argparse
import random
from pathlib import Path

import torch
from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel

from hf_training import train_with_checkpoints  # examples/hf_training.py
from tracin import TracIn

PEOPLE = ["alice", "bob", "carol", "dave", "erin", "frank"]
CITIES = ["paris", "rome", "oslo", "lima", "cairo", "tokyo"]
WORDS = ["[pad]", "lives", "in", ".", "and", "likes", "tea", "coffee"] + PEOPLE + CITIES
LENGTH = 16


def documents(rng: random.Random, n: int):
    """Documents of two or three statements; each person lives in one city (their own), a few likes in between."""
    home = dict(zip(PEOPLE, CITIES))
    docs = []
    for _ in range(n):
        who = rng.sample(PEOPLE, rng.choice([2, 3]))
        parts = []
        for person in who:
            parts += [person, "lives", "in", home[person], "."] if rng.random() < 0.7 else [person, "likes", rng.choice(["tea", "coffee"]), "."]
        docs.append(" ".join(parts))
    return docs


def encode(texts, prompts=None) -> Dataset:
    """Token ids padded to LENGTH; labels are the ids (padding -100), and -100 over each prompt when given."""
    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    for i, text in enumerate(texts):
        ids = [WORDS.index(w) for w in text.split()][:LENGTH]
        pad = LENGTH - len(ids)
        labels = ids + [-100] * pad
        if prompts is not None:
            labels[: len(prompts[i].split())] = [-100] * len(prompts[i].split())
        rows["input_ids"].append(ids + [0] * pad)
        rows["attention_mask"].append([1] * len(ids) + [0] * pad)
        rows["labels"].append(labels)
    return Dataset.from_dict(rows).with_format("torch")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("lm_out"))
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    rng = random.Random(0)
    texts = documents(rng, 96)
    train = encode(texts)
    prompt, continuation = "carol lives in", dict(zip(PEOPLE, CITIES))["carol"]
    test = encode([f"{prompt} {continuation}"], prompts=[prompt])

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(WORDS), n_embd=32, n_layer=2, n_head=2, n_positions=LENGTH, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    checkpoints = train_with_checkpoints(model, train, args.workdir, args.epochs, lr=0.01)
    with torch.no_grad():
        ids = torch.tensor([[WORDS.index(w) for w in prompt.split()]])
        guess = WORDS[int(model(input_ids=ids).logits[0, -1].argmax())]
    print(f"Trained a {sum(p.numel() for p in model.parameters()):,}-parameter GPT-2 on {len(texts)} documents for "
          f"{args.epochs} epochs; it continues {prompt!r} with {guess!r}.")

    tr = TracIn(model, checkpoints, layers="all", batch_size=32, progress=False)
    result = tr.influence(train, test, top_k=5)
    print(f"\nTraining documents that most helped '{prompt} -> {continuation}':")
    for score, j in zip(result.proponents.values[0].tolist(), result.proponents.indices[0].tolist()):
        print(f"  {score:+.4f}  {texts[j]}")
    print("Most opposed:")
    for score, j in zip(result.opponents.values[0].tolist(), result.opponents.indices[0].tolist()):
        print(f"  {score:+.4f}  {texts[j]}")
    top = result.proponents.indices[0].tolist()
    stating = sum(f"{prompt} {continuation}" in texts[j] for j in top)
    print(f"\n{stating} of the top {len(top)} proponents state '{prompt} {continuation}'. Kernels: "
          f"{sorted({row['kernel'] for row in tr.scope()})}.")


if __name__ == "__main__":
    main()
