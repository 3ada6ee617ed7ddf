"""Hugging Face models and data: dict batches, the default per-example loss from logits and labels, BERT's
broadcast position embeddings and GPT-2's Conv1D layers and tied embeddings, against the float64 reference."""
import pytest
import torch

from helpers import DEVICE, perturbed_checkpoints, rel_err, task_reference_matrix
from tracin import TracIn
from tracin.tasks import HFTask

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")


def bert():
    config = transformers.BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=16, max_position_embeddings=16, num_labels=3)
    return transformers.BertForSequenceClassification(config)


def gpt2():
    config = transformers.GPT2Config(vocab_size=20, n_embd=8, n_layer=1, n_head=2, n_positions=16)
    return transformers.GPT2LMHeadModel(config)


def token_data(n, vocab, length, labels, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[::3, -2:] = 0  # some padding
    rows = {"input_ids": ids, "attention_mask": mask}
    rows["labels"] = torch.randint(0, 3, (n,), generator=g) if labels == "sequence" else ids.masked_fill(mask == 0, -100)
    return datasets.Dataset.from_dict({k: v.tolist() for k, v in rows.items()}).with_format("torch")


@pytest.mark.parametrize("build, labels, vocab", [(bert, "sequence", 30), (gpt2, "causal", 20)])
def test_hf_models_on_dict_batches_match_the_reference(build, labels, vocab):
    torch.manual_seed(0)
    model = build().eval()
    train, test = token_data(7, vocab, 6, labels, 1), token_data(3, vocab, 6, labels, 2)
    ckpts, raw = perturbed_checkpoints(model, [0.1, 0.05], scale=0.05)
    tr = TracIn(model, ckpts, layers="all", device=DEVICE, batch_size=4, progress=False)  # the default task
    got = tr.influence_matrix(train, test)
    want = task_reference_matrix(model, raw, None, HFTask(), [train[i] for i in range(7)], [test[i] for i in range(3)])
    assert rel_err(got, want) <= 1e-4
    kernels = {row["name"]: row["kernel"] for row in tr.scope()}
    if build is bert:
        # looked up once per batch and broadcast: its output is expanded to the batch during capture, so it keeps a kernel
        assert kernels["bert.embeddings.position_embeddings"] in ("ghost", "materialize")
    else:
        assert kernels["transformer.h.0.attn.c_attn"] in ("ghost", "materialize")  # Conv1D, with the Linear kernels
        assert kernels["transformer.wte.weight (tied to lm_head.weight)"] == "materialize"  # both uses summed
        assert kernels["transformer.wpe"] in ("ghost", "materialize")  # positions [1, T], broadcast: expanded


def test_mean_reduction_and_explicit_kinds():
    torch.manual_seed(0)
    model = gpt2().eval()
    batch = token_data(2, 20, 5, "causal", 3)[:2]
    summed = HFTask("causal_lm").loss(model, batch)
    mean = HFTask("causal_lm", reduction="mean").loss(model, batch)
    counts = (batch["labels"][:, 1:] != -100).sum(1)
    assert torch.allclose(summed / counts, mean)
    assert torch.allclose(HFTask().loss(model, batch), summed)  # auto: a causal language model shifts
    unshifted = HFTask("token").loss(model, batch)
    assert not torch.allclose(unshifted, summed)


@pytest.mark.slow
@pytest.mark.parametrize("script, expect, kernel", [
    ("hf_text_classification.py", "wrongly labelled reviews are among the top", "ghost"),  # positions expanded: no exact
    ("lm_data_attribution.py", "5 of the top 5 proponents state 'carol lives in oslo'", "materialize"),  # tied: both uses
])
def test_examples_run_as_documented(tmp_path, script, expect, kernel):
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "examples" / script
    done = subprocess.run([sys.executable, str(example), "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert expect in done.stdout and f"'{kernel}'" in done.stdout, done.stdout
    assert "'exact'" not in done.stdout  # no per-example passes in either
