"""The training loop both Hugging Face examples share: AdamW on the model's own loss, a checkpoint per epoch."""
from pathlib import Path
from typing import List

import torch

from tracin import Checkpoint, save_checkpoint


def train_with_checkpoints(model: torch.nn.Module, train, workdir: Path, epochs: int, lr: float) -> List[Checkpoint]:
    """Train ``model`` on the dict batches of ``train`` (batches of 16, shuffled with seed 0) and save
    ``workdir/epoch_<n>.pt`` after every epoch with its learning rate: TracIn's step size for that checkpoint."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    loader = torch.utils.data.DataLoader(train, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    checkpoints = []
    for epoch in range(1, epochs + 1):
        model.train()
        for batch in loader:
            opt.zero_grad()
            model(**batch).loss.backward()
            opt.step()
        path = save_checkpoint(Path(workdir) / f"epoch_{epoch}.pt", model.state_dict(), learning_rate=lr, epoch=epoch)
        checkpoints.append(Checkpoint(path))
    model.eval()
    return checkpoints
