"""Helpers shared by the tests (the one module they import besides the package): small models covering
every supported layer kind and checkpoint factories, the naive float64 per-example-gradient reference
(torch.func vmap of grad), generated image folders, and the error-message extractor of the catalogue.
``python tests/helpers.py`` prints docs/errors.md's table."""
from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.func import functional_call, grad, vmap

from tracin import Checkpoint
from tracin.engine.scope import parameterised_modules

# -- models and checkpoints ----------------------------------------------------------------------
# The device the numeric tests score on: TRACIN_TEST_DEVICE=cuda runs them against the float64
# reference on a GPU (the reference itself always runs on the CPU).
DEVICE = os.environ.get("TRACIN_TEST_DEVICE", "cpu")


class MLP(nn.Module):
    """Linear layers with biases and a non-linearity after the last layer."""

    def __init__(self, d_in: int = 12, hidden: int = 16, classes: int = 5):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        return torch.tanh(self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))) * 3


class CNN(nn.Module):
    """Conv2d with stride/padding, BatchNorm (eval), in-place ReLU, grouped and dilated convs."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2, padding_mode="reflect", bias=False)
        self.gn = nn.GroupNorm(2, 8)
        self.conv3 = nn.Conv2d(8, 6, (2, 3), stride=(1, 2), padding="valid")
        self.fc = nn.Linear(6 * 3 * 2, classes)

    def forward(self, x):
        x = self.act(self.bn1(self.conv1(x)))
        x = torch.relu(self.gn(self.conv2(x)))
        x = torch.relu(self.conv3(x))
        return self.fc(x.flatten(1))


class SeqModel(nn.Module):
    """Embedding (with padding_idx, tokens repeated), Linear over tokens, LayerNorm, pooled head."""

    def __init__(self, vocab: int = 11, dim: int = 6, classes: int = 3):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.proj = nn.Linear(dim, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, classes)

    def forward(self, tokens):
        h = self.norm(torch.relu(self.proj(self.emb(tokens))))
        return self.head(h.mean(1))


class Conv1dModel(nn.Module):
    """Conv1d with 'same' padding, dilation, groups; BatchNorm1d; PReLU; Linear head."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.conv = nn.Conv1d(4, 6, 3, padding="same", dilation=2, groups=2)
        self.bn = nn.BatchNorm1d(6)
        self.act = nn.PReLU()
        self.conv2 = nn.Conv1d(6, 4, 2, stride=2, padding=1, padding_mode="circular")
        self.fc = nn.Linear(4 * 6, classes)

    def forward(self, x):
        return self.fc(self.conv2(self.act(self.bn(self.conv(x)))).flatten(1))


def random_sets(n_train: int, n_test: int, d: int, classes: int, seed: int):
    """Gaussian inputs [n, d] with random labels as (train, test) TensorDatasets."""
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(seed)
    train = TensorDataset(torch.randn(n_train, d, generator=g), torch.randint(0, classes, (n_train,), generator=g))
    test = TensorDataset(torch.randn(n_test, d, generator=g), torch.randint(0, classes, (n_test,), generator=g))
    return train, test


def perturbed_checkpoints(model: nn.Module, lrs: List[float], seed: int = 0, scale: float = 0.3) -> Tuple[List[Checkpoint], List[Tuple[dict, float]]]:
    """Checkpoints at random perturbations of the model's weights (running stats included)."""
    gen = torch.Generator().manual_seed(seed)
    ckpts, raw = [], []
    for i, lr in enumerate(lrs):
        state = {}
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                noise = torch.randn(v.shape, generator=gen, dtype=v.dtype) * scale
                state[k] = (v + noise).abs() + 0.5 if "running_var" in k else v + noise
            else:
                state[k] = v.clone()
        ckpts.append(Checkpoint(state, learning_rate=lr, name=f"ckpt{i}"))
        raw.append((state, lr))
    return ckpts, raw


class CountingDataset(torch.utils.data.Dataset):
    """A map-style dataset (batched by a DataLoader, not by slicing, as image folders are) that
    counts the examples read."""

    def __init__(self, x, y):
        self.x, self.y, self.reads = x, y, 0

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        self.reads += 1
        return self.x[i], self.y[i]


def make_case(kind: str, n_train: int = 23, n_test: int = 7):
    g = torch.Generator().manual_seed(1)
    if kind == "mlp":
        model, shape, classes = MLP(), (12,), 5
    elif kind == "cnn":
        model, shape, classes = CNN(), (3, 8, 10), 4
    elif kind == "conv1d":
        model, shape, classes = Conv1dModel(), (4, 10), 3
    elif kind == "seq":
        model, classes = SeqModel(), 3
        xs = torch.randint(0, 11, (n_train + n_test, 9), generator=g)
        xs[:, -2:] = 0  # padding tokens
        ys = torch.randint(0, classes, (n_train + n_test,), generator=g)
        return model, (xs[:n_train], ys[:n_train]), (xs[n_train:], ys[n_train:])
    else:
        raise KeyError(kind)
    xs = torch.randn((n_train + n_test,) + shape, generator=g)
    ys = torch.randint(0, classes, (n_train + n_test,), generator=g)
    return model, (xs[:n_train], ys[:n_train]), (xs[n_train:], ys[n_train:])


def all_module_names(model):
    return [name for name, _, _ in parameterised_modules(model)]


# -- the float64 reference ----------------------------------------------------------------------
LossOnOutput = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(out, y, reduction="none")


def scope_names(model: nn.Module, modules: Sequence[str]) -> List[str]:
    """Full names of the trainable parameters directly owned by ``modules``."""
    names = []
    for mname in modules:
        mod = model.get_submodule(mname)
        for pname, p in mod.named_parameters(recurse=False):
            if p.requires_grad:
                names.append(f"{mname}.{pname}" if mname else pname)
    return names


def per_example_grads(model: nn.Module, names: Sequence[str], x: torch.Tensor, y: torch.Tensor,
                      loss: LossOnOutput = cross_entropy) -> torch.Tensor:
    """[B, P] flattened per-example gradients of ``loss(model(x_i), y_i)`` w.r.t. ``names``."""
    state = {k: v for k, v in model.named_parameters()}
    state.update(dict(model.named_buffers()))
    scoped = {n: state[n].detach() for n in names}

    def f(p, xi, yi):
        out = functional_call(model, {**state, **p}, (xi.unsqueeze(0),))
        return loss(out, yi.unsqueeze(0)).sum()

    g = vmap(grad(f), in_dims=(None, 0, 0))(scoped, x, y)
    return torch.cat([g[n].reshape(x.shape[0], -1) for n in names], dim=1)


def reference_matrix(model: nn.Module, checkpoints: Sequence[Tuple[dict, float]], modules: Sequence[str],
                     train: Tuple[torch.Tensor, torch.Tensor], test: Tuple[torch.Tensor, torch.Tensor],
                     loss: LossOnOutput = cross_entropy, normalize: str = "none") -> torch.Tensor:
    """TracInCP [n_test, n_train] in float64: sum_c lr_c <g_test, g_train>. ``normalize``: "train"
    scales training gradients to unit length per checkpoint, "cosine" test gradients too."""
    ref = copy.deepcopy(model).double().eval()
    names = scope_names(ref, modules)
    total = None
    for state, lr in checkpoints:
        ref.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in state.items()})
        to64 = (lambda t: t.double() if t.is_floating_point() else t)
        g_train = per_example_grads(ref, names, to64(train[0]), train[1], loss)
        g_test = per_example_grads(ref, names, to64(test[0]), test[1], loss)
        m = _scores(g_test, g_train, lr, normalize)
        total = m if total is None else total + m
    return total.detach()


def _scores(g_test: torch.Tensor, g_train: torch.Tensor, lr: float, normalize: str) -> torch.Tensor:
    """lr * <g_test, g_train> [n_test, n_train], the training gradients (and with "cosine" the test ones) unit length."""
    if normalize != "none":
        g_train = g_train / g_train.norm(dim=1, keepdim=True)
    if normalize == "cosine":
        g_test = g_test / g_test.norm(dim=1, keepdim=True)
    return lr * g_test @ g_train.T


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|."""
    return float((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30))



def inverse_tolerance(matrices: torch.Tensor, slack: float = 10.0) -> float:
    """A relative (Frobenius) error bound for inverses of ``matrices`` [..., d, d] computed by any stable method in
    their dtype on any BLAS: slack * d * condition number * machine epsilon (a backward-stable inverse has relative
    error of order cond * eps; d covers the accumulation). Derived from the data, not from what one machine printed."""
    cond = float(torch.linalg.cond(matrices).max())
    return slack * matrices.shape[-1] * cond * torch.finfo(matrices.dtype).eps


FLOAT32_TOL = 1e-4  # float32 sums of up to ~10^3 products in any order, on any BLAS: 10^3 * 1.2e-7 ~ 1e-4 of the scale


def close(got, want, tol: float = FLOAT32_TOL) -> bool:
    """Whether float32 results computed in another order (tiles, chunks, ranks, BLAS kernels) agree: every entry
    within ``tol`` of the larger of its own size and the largest entry's (tensors or arrays; NaN equals NaN)."""
    got, want = np.asarray(torch.as_tensor(got).double()), np.asarray(torch.as_tensor(want).double())
    scale = float(np.nanmax(np.abs(want))) if want.size and not np.isnan(want).all() else 0.0
    return bool(np.allclose(got, want, rtol=tol, atol=tol * scale, equal_nan=True))


def matrix_rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| over the last two dimensions, the largest over the rest."""
    return float((torch.linalg.matrix_norm(got - want) / torch.linalg.matrix_norm(want)).max())


def task_per_example_grads(model: nn.Module, names: Sequence[str], task, items: Sequence) -> torch.Tensor:
    """[n, P] per-example gradients of ``task.loss`` on one-example batches (a naive loop of
    torch.func.grad over functional_call; works for any task, e.g. ranking pairs or triples)."""
    from torch.utils.data import default_collate

    class Bound(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, batch):
            return task.loss(self.model, batch).sum()

    bound = Bound()
    state = {f"model.{k}": v for k, v in model.named_parameters()}
    state.update({f"model.{k}": v for k, v in model.named_buffers()})
    scoped = {f"model.{n}": state[f"model.{n}"].detach() for n in names}
    rows = []
    for item in items:
        batch = default_collate([item])
        g = grad(lambda p: functional_call(bound, {**state, **p}, (batch,)))(scoped)
        rows.append(torch.cat([g[f"model.{n}"].reshape(-1) for n in names]))
    return torch.stack(rows)


def task_reference_matrix(model: nn.Module, checkpoints: Sequence[Tuple[dict, float]], modules: Optional[Sequence[str]], task,
                          train: Sequence, test: Sequence, normalize: str = "none") -> torch.Tensor:
    """TracInCP [n_test, n_train] in float64 for any task (items: what the datasets yield, float
    tensors cast to float64). Calls ``task.on_checkpoint`` after loading each checkpoint. ``modules`` None:
    every trainable parameter of the model (tied ones once, as ``named_parameters`` lists them)."""
    ref = copy.deepcopy(model).double().eval()
    names = scope_names(ref, modules) if modules is not None else [n for n, p in ref.named_parameters() if p.requires_grad]
    def to64(item):
        if isinstance(item, dict):
            return {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in item.items()}
        return tuple(t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in item)

    train64, test64 = [to64(i) for i in train], [to64(i) for i in test]
    total = None
    for index, (state, lr) in enumerate(checkpoints):
        ref.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in state.items()})
        if hasattr(task, "on_checkpoint"):
            with torch.no_grad():
                task.on_checkpoint(ref, index)
        m = _scores(task_per_example_grads(ref, names, task, test64), task_per_example_grads(ref, names, task, train64), lr, normalize)
        total = m if total is None else total + m
    return total.detach()


def _layer_positions(module: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-position inputs a [B, g, T, da] and output gradients d [B, g, T, dd] of a Linear or Conv2d call."""
    B = x.shape[0]
    if isinstance(module, nn.Linear):
        return x.reshape(B, 1, -1, x.shape[-1]), dy.reshape(B, 1, -1, dy.shape[-1])
    if isinstance(module, nn.Conv3d):
        return _volume_positions(module, x, dy)
    assert isinstance(module, nn.Conv2d)
    pad = module._reversed_padding_repeated_twice
    if any(pad):
        x = torch.nn.functional.pad(x, pad, mode="constant" if module.padding_mode == "zeros" else module.padding_mode)
    cols = torch.nn.functional.unfold(x, module.kernel_size, dilation=module.dilation, stride=module.stride)
    g = module.groups
    L = cols.shape[-1]
    return (cols.view(B, g, -1, L).transpose(2, 3),
            dy.reshape(B, g, module.out_channels // g, L).transpose(2, 3))


def _volume_positions(module: nn.Conv3d, x: torch.Tensor, dy: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """A Conv3d call's patches, written out voxel by voxel (independent of the library's unfolding)."""
    pad = module._reversed_padding_repeated_twice
    if any(pad):
        x = torch.nn.functional.pad(x, pad, mode="constant" if module.padding_mode == "zeros" else module.padding_mode)
    B, g = x.shape[0], module.groups
    (kd, kh, kw), (dd, dh, dw), (sd, sh, sw) = module.kernel_size, module.dilation, module.stride
    out = dy.shape[2:]
    patches = []
    for od in range(out[0]):
        for oh in range(out[1]):
            for ow in range(out[2]):
                block = x[:, :, od * sd:od * sd + dd * (kd - 1) + 1:dd, oh * sh:oh * sh + dh * (kh - 1) + 1:dh,
                          ow * sw:ow * sw + dw * (kw - 1) + 1:dw]
                patches.append(block.reshape(B, g, -1))
    a = torch.stack(patches, dim=2)  # [B, g, L, Cin/g * k]
    return a, dy.reshape(B, g, module.out_channels // g, -1).transpose(2, 3)


def kfac_reference_matrix(model: nn.Module, checkpoints: Sequence[Tuple[dict, float]], modules: Sequence[str],
                          train: Tuple[torch.Tensor, torch.Tensor], test: Tuple[torch.Tensor, torch.Tensor],
                          damping: float = 0.1, self_only: bool = False,
                          kept: Optional[Dict[str, Tuple[int, int]]] = None) -> torch.Tensor:
    """K-FAC-preconditioned TracInCP in float64, written out naively: per checkpoint and layer, the
    factors S_in = mean_i sum_t [a;1][a;1]^T and S_out = mean_i sum_t d d^T over ``train`` (d: gradient
    of example i's loss at the layer's output), damped by ``damping`` times their mean eigenvalue and
    inverted; the per-example gradient matrices M_i [g, dd, da(+1)] from torch.func; score
    sum_c lr_c sum_layers <S_out^-1 M_test S_in^-1, M_train>. Returns [n_test, n_train], or the
    self-influence [n_train] with ``self_only``. ``kept`` (projection_dim under K-FAC): each layer's inverses keep
    only its factors' leading (k_in, k_out) eigen-directions, U_k diag(1 / (s_k + l)) U_k^T."""
    ref = copy.deepcopy(model).double().eval()
    total = None
    for state, lr in checkpoints:
        ref.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in state.items()})
        x, y = train[0].double(), train[1]
        seen: dict = {}
        hooks = [ref.get_submodule(m).register_forward_hook(_keep(seen, m)) for m in modules]
        cross_entropy(ref(x), y).sum().backward()
        for h in hooks:
            h.remove()
        ref.zero_grad()
        for m in modules:
            module = ref.get_submodule(m)
            inputs, out = seen[m]
            a, d = _layer_positions(module, inputs, out.grad)
            has_bias = module.bias is not None and module.bias.requires_grad
            if has_bias:
                a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
            n = x.shape[0]
            keep = kept[m] if kept is not None else (None, None)
            inv = []
            for f, k in zip((a, d), keep):
                S = torch.einsum("bgti,bgtj->gij", f, f) / n
                lam = damping * torch.diagonal(S, dim1=1, dim2=2).mean(1)
                if k is None or k >= S.shape[-1]:
                    inv.append(torch.linalg.inv(S + lam[:, None, None] * torch.eye(S.shape[-1], dtype=S.dtype)))
                else:
                    values, vectors = torch.linalg.eigh(S)
                    U = vectors[..., -k:]
                    inv.append(U @ torch.diag_embed(1 / (values[..., -k:] + lam[:, None])) @ U.transpose(1, 2))
            names = scope_names(ref, [m])

            def matrices(data):
                flat = per_example_grads(ref, names, data[0].double(), data[1])
                g, dd = a.shape[1], d.shape[-1]
                weight = flat[:, :module.weight.numel()].reshape(flat.shape[0], g, dd, -1)
                if not has_bias:
                    return weight
                return torch.cat([weight, flat[:, module.weight.numel():].reshape(flat.shape[0], g, dd, 1)], dim=-1)

            M_train = matrices(train)
            M_test = M_train if self_only else matrices(test)
            pre = torch.einsum("gij,bgjk,gkl->bgil", inv[1], M_test, inv[0])
            s = lr * ((pre * M_train).sum(dim=(1, 2, 3)) if self_only else torch.einsum("mgij,ngij->mn", pre, M_train))
            total = s if total is None else total + s
    return total.detach()


def _keep(seen: dict, name: str):
    def hook(module, inputs, output):
        output.retain_grad()
        seen[name] = (inputs[0].detach(), output)
    return hook


# -- image folders ------------------------------------------------------------------------------
def make_image_folder(root: Path, classes=("cat", "dog", "fox"), n_train=8, n_test=3, size=12, seed=0) -> Path:
    """Colour-coded squares per class with noise: train/<class>/*.png, test/<class>/*.png."""
    rng = np.random.default_rng(seed)
    palette = {c: rng.integers(0, 255, 3) for c in classes}
    for split, n in (("train", n_train), ("test", n_test)):
        for c in classes:
            folder = root / split / c
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = np.clip(palette[c] + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{c}_{i:02d}.png")
    return root


# -- the error catalogue ------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]
RAISE = re.compile(r"raise (TracInError|CheckpointError|DataError|UnsupportedModuleError)\(\s*(.*?)\)\s*(?:from \w+)?\n", re.S)


def messages():
    """(module, error type, message with each {placeholder} shown as …) for every raise in src/tracin."""
    out = []
    for path in sorted((ROOT / "src" / "tracin").rglob("*.py")):
        for m in RAISE.finditer(path.read_text()):
            text = "".join(re.findall(r'f?"((?:[^"\\]|\\.)*)"', m.group(2)))
            out.append((str(path.relative_to(ROOT / "src" / "tracin")), m.group(1), re.sub(r"\{[^{}]*\}", "…", text)))
    return out


if __name__ == "__main__":  # regenerate the table of docs/errors.md
    for module, kind, text in messages():
        print(f"| `{module}` | {kind} | {text.replace('|', '/')} |")


def train_image_run(root: Path, epochs: int = 3):
    """A smallcnn trained by ``tracin train`` on a tiny generated image folder: (root, data folder, checkpoint folder)."""
    from tracin.workflows.cli import main

    data = make_image_folder(root / "data")
    ckpt = root / "ckpts"
    assert main(["train", "--data_dir", str(data), "--arch", "smallcnn", "--epochs", str(epochs), "--save_every", "1",
                 "--checkpoint_dir", str(ckpt), "--learning_rate", "0.05", "--batch_size", "8", "--image_size", "16",
                 "--quiet"]) == 0
    return root, data, ckpt


def text_run(root: Path, kind: str = "sequence", n_train: int = 150, n_test: int = 9, epochs: int = 6, flip_rate: float = 0.1):
    """A tiny Hugging Face model trained on generated texts, saved as a Trainer saves it: ``model/`` with the final
    weights and the tokenizer, ``model/checkpoint-N/`` with each epoch's weights and trainer_state.json. ``kind``:
    "sequence" (a BERT classifier on topic texts, ``flip_rate`` of the training labels flipped) or "causal_lm" (a
    GPT-2 on prompt/completion rows). Returns (model folder, train file, test file, [n_train] flipped mask)."""
    import json

    import transformers

    from tracin.workflows.text.encode import PadBatch
    from tracin.workflows.text.generated import TOPICS, completion_rows, topic_rows, word_tokenizer, write_jsonl

    names = list(TOPICS)
    torch.manual_seed(0)
    if kind == "sequence":
        train, flipped = topic_rows(n_train, 0, flip_rate)
        test, _ = topic_rows(n_test, 1)
        tok = word_tokenizer([r["text"] for r in train + test])
        config = transformers.BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=32, max_position_embeddings=32, num_labels=3,
                                         id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
        model = transformers.BertForSequenceClassification(config)
        examples = [{**tok(r["text"]), "labels": names.index(r["label"])} for r in train]
    else:
        train, test, flipped = completion_rows(n_train, 0), completion_rows(n_test, 1), np.zeros(n_train, dtype=bool)
        tok = word_tokenizer([r["prompt"] + r["completion"] for r in train + test], causal=True)
        config = transformers.GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2, n_positions=32,
                                         bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
        model = transformers.GPT2LMHeadModel(config)
        examples = []
        for r in train:
            head, tail = tok(r["prompt"])["input_ids"], tok(r["completion"], add_special_tokens=False)["input_ids"]
            examples.append({"input_ids": head + tail, "attention_mask": [1] * (len(head) + len(tail)),
                             "labels": [-100] * len(head) + tail})
    out = root / "model"
    opt = torch.optim.AdamW(model.parameters(), lr=0.003)
    pad, step = PadBatch(tok.pad_token_id), 0
    for _ in range(epochs):
        for i in range(0, n_train, 8):
            loss = model(**pad(examples[i:i + 8])).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
        model.save_pretrained(out / f"checkpoint-{step}")
        (out / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"log_history": [{"step": step, "learning_rate": 0.003}]}))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out, write_jsonl(root / "train.jsonl", train), write_jsonl(root / "test.jsonl", test), flipped
