"""The documented configuration matches the code: every setting in .env.example and the README."""

import re
from pathlib import Path

from imagegen.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent


def example_names() -> set[str]:
    lines = (ROOT / ".env.example").read_text().splitlines()
    return {line.split("=", 1)[0] for line in lines if line and not line.startswith("#")}


def test_env_example_documents_every_setting():
    assert example_names() == {name.upper() for name in Settings.model_fields}


def test_env_example_loads_as_is(monkeypatch):
    for name in example_names():
        monkeypatch.delenv(name, raising=False)
    settings = load_settings(ROOT / ".env.example")
    assert settings.queue_concurrency == 5
    assert settings.jimeng_timeout == 600_000


def test_readme_names_every_setting():
    # Whole names only: `_STATUS` somewhere in the text does not document POCKETBASE_FIELD_STATUS.
    names = set(re.findall(r"\b[A-Z][A-Z0-9_]*[A-Z0-9]\b", (ROOT / "README.md").read_text()))
    undocumented = sorted(name.upper() for name in Settings.model_fields if name.upper() not in names)
    assert undocumented == []
