"""The README's Python example runs as written, and the quickstart example runs end to end."""
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_readme_python_example_runs():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python example"
    exec(compile(blocks[0], "README.md", "exec"), {"__name__": "__readme__"})


def test_readme_commands_match_ci():
    text = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", text, flags=re.S)
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1].strip() in ci


def test_quickstart_finds_flipped_labels(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), "--output_dir", str(tmp_path)],
                   check=True, capture_output=True, text=True)
    metrics = json.loads((tmp_path / "quickstart_metrics.json").read_text())
    assert metrics["recall_top20pct"] >= 0.9
    assert len(list((tmp_path / "checkpoints").glob("*.pt"))) == 5


def test_task_guide_example_runs():
    """docs/tasks.md: the custom task written from the guide works (influence and stratified sampling)."""
    text = (ROOT / "docs" / "tasks.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    scope = {"__name__": "__guide__"}
    exec(compile(blocks[0], "docs/tasks.md", "exec"), scope)
    import torch

    scored = torch.isfinite(scope["half"].self_influence(scope["train"]))
    positive = scope["y"][:100] > 0
    for group in (positive, ~positive):  # stratified by the task's own "sign" key
        assert abs(int(scored[group].sum()) - round(0.5 * int(group.sum()))) <= 1
