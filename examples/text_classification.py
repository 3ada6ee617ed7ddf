"""Train a small BERT with transformers.Trainer on a generated 3-class topic data set (10% of the training labels
flipped), saving checkpoint-N/ folders and the tokenizer; then explain it with two commands:

    python examples/text_classification.py --output_dir text_run
    tracin text --model_dir text_run/model --train text_run/train.jsonl --test text_run/test.jsonl \
                --output_dir text_run/results --self_influence
    tracin report --results_dir text_run/results

Nothing is downloaded: the data and a word-level tokenizer are generated here (pip install -e '.[hf]').
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", type=Path, default=Path("text_run"))
    p.add_argument("--n_train", type=int, default=600)
    p.add_argument("--n_test", type=int, default=60)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--flip_rate", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

    from tracin.workflows.text.generated import TOPICS, topic_rows, word_tokenizer, write_jsonl

    out = a.output_dir
    train, flipped = topic_rows(a.n_train, a.seed, a.flip_rate)
    test, _ = topic_rows(a.n_test, a.seed + 1)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "test.jsonl", test)
    np.save(out / "flipped.npy", flipped)
    tokenizer = word_tokenizer([r["text"] for r in train + test])
    names = list(TOPICS)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=64, num_labels=len(names),
                        id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    torch.manual_seed(a.seed)
    model = BertForSequenceClassification(config)
    encoded = [dict(tokenizer(r["text"]), labels=names.index(r["label"])) for r in train]
    args = TrainingArguments(output_dir=str(out / "model"), num_train_epochs=a.epochs, per_device_train_batch_size=16,
                             learning_rate=1e-3, save_strategy="epoch", logging_steps=10, report_to=[], use_cpu=True,
                             seed=a.seed, disable_tqdm=True)
    from transformers import DataCollatorWithPadding

    trainer = Trainer(model=model, args=args, train_dataset=encoded, processing_class=tokenizer,
                      data_collator=DataCollatorWithPadding(tokenizer))
    trainer.train()
    trainer.save_model()  # the final model and its tokenizer in text_run/model, beside checkpoint-N/
    print(f"Trained on {a.n_train} texts ({int(flipped.sum())} labels flipped, listed in {out / 'flipped.npy'}); "
          f"model and checkpoints in {out / 'model'}.")


if __name__ == "__main__":
    main()
