"""The tutorial notebook's code cells run top to bottom (no Jupyter needed)."""

import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_tour_notebook_runs(tmp_path, monkeypatch):
    with open(os.path.join(ROOT, "notebooks", "tour.ipynb")) as f:
        cells = [c for c in json.load(f)["cells"] if c["cell_type"] == "code"]
    monkeypatch.chdir(ROOT)
    scope: dict = {}
    for cell in cells:
        source = "".join(cell["source"]).replace('os.path.join(ROOT, "outputs", "notebook")', repr(str(tmp_path)))
        source = source.replace('picture="interleaved.png"', f'picture={str(tmp_path / "i.png")!r}')
        exec(compile(source, "tour.ipynb", "exec"), scope)
    assert scope["run"].returncode == 0, scope["run"].stderr[-3000:]
    assert scope["plan"].expected_bubble < 0.2
    assert isinstance(scope["model"].config.num_hidden_layers, int)
