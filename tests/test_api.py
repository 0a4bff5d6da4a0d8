"""fedprompt.api: README.md's Python example runs as written, on a tiny BERT backbone."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.simulation,
]  # a whole demo federation (3 x 600 notes) on Ray, minutes on a loaded 2-core host

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    section = README.read_text(encoding="utf-8").split("## Python API", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    return code


def test_readme_python_example_runs(tmp_path, tiny_backbone, monkeypatch, capsys):
    """The example's one substitution: its `backbone = None` line names a tiny BERT instead."""
    # the demo's 256 tokens + prompt
    tiny = tiny_backbone(max_positions=512)
    code = readme_example()
    assert code.count("backbone = None") == 1
    monkeypatch.chdir(tmp_path)  # the example writes runs/notebook
    monkeypatch.delenv("PYTHONPATH", raising=False)
    namespace: dict = {}
    exec(compile(code.replace("backbone = None", f"backbone = {str(tiny)!r}"), str(README), "exec"), namespace)
    result, model = namespace["result"], namespace["model"]
    assert result.trained and result.export == Path("runs/notebook/export") and result.export.is_dir()
    assert [r.round for r in result.rounds] == list(range(6)) and result.test == result.rounds[-1].test
    assert (tmp_path / "runs/notebook/logs/simulate.log").is_file() and (
        tmp_path / "runs/notebook/report.html"
    ).is_file()
    assert {row["hospital"] for row in result.hospital_comparison} == {"hospital-1", "hospital-2", "hospital-3"}
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith(
        "[fedprompt] demo workspace (3 hospitals, synthetic notes) written to runs/notebook/workspace"
    )
    predictions = model.predict(["new onset seizure", "abdominal pain"])
    assert [p.text for p in predictions] == ["new onset seizure", "abdominal pain"]
    for p in predictions:
        assert p.label == max(p.probabilities, key=p.probabilities.get) and list(p.probabilities) == model.labels
        assert sum(p.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert all(
        any(line.startswith(f"{label} 0.") or line.startswith(f"{label} 1.") for label in model.labels)
        for line in printed[-2:]
    )
    assert model.private and model.personalized is None and model.predict([]) == []
    # Flower's Ray backend exports PYTHONPATH into the caller's process; the simulation puts it back
    assert "PYTHONPATH" not in os.environ
