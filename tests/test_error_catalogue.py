"""docs/errors.md lists every user error the package raises."""
from helpers import ROOT, messages


def test_every_user_error_is_catalogued():
    doc = (ROOT / "docs" / "errors.md").read_text()
    found = messages()
    assert len(found) > 50
    missing = [text for _, _, text in found if text.replace("|", "/") not in doc]
    assert not missing, f"add these to docs/errors.md (python tests/helpers.py): {missing}"
