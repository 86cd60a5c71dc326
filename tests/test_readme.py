"""The README's Python quickstart runs as printed, and the README cites nothing outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def quickstart() -> str:
    section = README[README.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


@pytest.mark.slow
def test_the_python_quickstart_trains_digits(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torch")
    monkeypatch.chdir(tmp_path)
    code = quickstart()
    assert len([line for line in code.splitlines() if line.strip() and not line.startswith(("import", "from"))]) <= 12
    exec(compile(code, "README.md quickstart", "exec"), {"__name__": "quickstart"})
    accuracy = float(capsys.readouterr().out.split()[-1])
    assert accuracy >= 0.9
    assert (tmp_path / "bundle" / "manifest.json").is_file()


@pytest.mark.parametrize("doc", ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))])
def test_docs_link_only_to_files_in_the_repository(doc):
    text = (ROOT / doc).read_text()
    assert "DESIGN" not in text, f"{doc} cites a design document that is not in the repository"
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        if target.startswith(("http://", "https://")):
            continue
        path = ((ROOT / doc).parent / target).resolve()
        assert path.is_relative_to(ROOT) and path.exists(), f"{doc} links to {target}, which is not in the repository"
