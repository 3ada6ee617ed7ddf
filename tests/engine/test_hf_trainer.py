"""InRunTrainer: transformers.Trainer recording in-run TracIn, against a float64 replay of the micro-batches it
trained on (AdamW, the Trainer's linear schedule, gradient accumulation), and training exactly as the Trainer does."""
import copy

import pytest
import torch
import torch.nn.functional as F

from helpers import rel_err

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")


def _setup(dropout=0.0):
    from tracin.workflows.text.encode import Examples, PadBatch
    from tracin.workflows.text.generated import TOPICS, topic_rows, word_tokenizer

    train, _ = topic_rows(48, 0, 0.1)
    test, _ = topic_rows(6, 1)
    tok = word_tokenizer([r["text"] for r in train + test])
    names = list(TOPICS)
    config = transformers.BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32, num_labels=3,
                                     hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    encode = lambda rows: [dict(tok(r["text"]), labels=names.index(r["label"])) for r in rows]  # noqa: E731
    queries = torch.utils.data.DataLoader(Examples(encode(test)), batch_size=4, collate_fn=PadBatch(tok.pad_token_id))
    return config, encode(train), queries, tok


def _args(tmp_path):
    return transformers.TrainingArguments(output_dir=str(tmp_path), num_train_epochs=2, per_device_train_batch_size=8,
                                          gradient_accumulation_steps=2, learning_rate=5e-3, save_strategy="no",
                                          report_to=[], use_cpu=True, seed=0, disable_tqdm=True)


def test_in_run_trainer_matches_the_float64_replay_of_its_micro_batches(tmp_path):
    from tracin.engine.hf_trainer import InRunTrainer

    config, train, queries, tok = _setup()
    log = []

    class Logging(InRunTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training and "index" in inputs:
                log.append((copy.deepcopy(model.state_dict()), inputs["index"].clone(), self.optimizer.param_groups[0]["lr"]))
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    trainer = Logging(model=model, args=_args(tmp_path), train_dataset=train,
                      data_collator=transformers.DataCollatorWithPadding(tok), in_run={"queries": queries, "layers": "classifier"})
    trainer.train()
    assert len(log) == trainer.recorder.describe()["steps"] == 2 * 48 // 8
    ref = copy.deepcopy(model).double().eval()
    names = ["classifier.weight", "classifier.bias"]

    def grads(example):
        batch = {k: torch.tensor([v]) for k, v in example.items() if k != "labels"}
        loss = F.cross_entropy(ref(**batch).logits, torch.tensor([example["labels"]]))
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, [dict(ref.named_parameters())[n] for n in names])])

    q_items = [e for e in queries.dataset.examples]
    S, M = torch.zeros(48, dtype=torch.float64), torch.zeros(len(q_items), 48, dtype=torch.float64)
    for state, ids, lr in log:
        ref.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in state.items()})
        gq = torch.stack([grads(e) for e in q_items])
        for i in ids.tolist():
            g = grads(train[i])
            S[i] += lr * g @ g
            M[:, i] += lr * gq @ g
    assert rel_err(trainer.recorder.result().self_influence.double(), S) <= 1e-4
    assert rel_err(trainer.recorder.influence_matrix(), M) <= 1e-4


def test_in_run_trainer_trains_exactly_as_the_trainer(tmp_path):
    """Dropout on: the recorder's query passes leave the random state as they found it."""
    from tracin.engine.hf_trainer import InRunTrainer

    config, train, queries, tok = _setup(dropout=0.1)
    weights = []
    for make, extra in ((transformers.Trainer, {}), (InRunTrainer, {"in_run": {"queries": queries, "layers": "classifier"}})):
        torch.manual_seed(0)
        model = transformers.BertForSequenceClassification(config)
        make(model=model, args=_args(tmp_path), train_dataset=train, data_collator=transformers.DataCollatorWithPadding(tok),
             **extra).train()
        weights.append(model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(weights[0].values(), weights[1].values()))
