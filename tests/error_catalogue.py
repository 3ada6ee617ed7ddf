"""Extract every user error message raised in the package (shared by the catalogue test and the doc generator)."""
import re
from pathlib import Path

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
