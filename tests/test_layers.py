"""The layers of hf_pp stay real: every module sits in one layer of the module map (the package docstring),
and imports, at module level or inside a function, only from its own layer and the layers below it.

The pipeline layer is torch only: it imports no part of the Hugging Face stack (transformers, peft, trl, ...),
so it works on any ``nn.Module``. docs/design.md repeats the map word for word.
"""

from __future__ import annotations

import ast
import os
import re

import pytest

import hf_pp

PACKAGE = os.path.dirname(os.path.abspath(hf_pp.__file__))
DESIGN = os.path.join(os.path.dirname(PACKAGE), "docs", "design.md")
HF_STACK = {"transformers", "peft", "trl", "accelerate", "datasets", "huggingface_hub", "safetensors", "tokenizers"}
LAYER_LINE = re.compile(r"^(?P<layer>[a-z]+): (?P<what>.+)$")
MODULE_LINE = re.compile(r"^    (?P<module>\w+) +(?P<what>\S.*)$")


def module_map(doc: str) -> tuple[list[str], dict[str, str], list[str]]:
    """(layers bottom-up, {module: layer}, the map's lines) of the package docstring's module map."""
    lines = doc.splitlines()
    start = next(i for i, line in enumerate(lines) if LAYER_LINE.match(line))
    layers, where, block = [], {}, []
    for line in lines[start:]:
        if not line.strip():
            break
        block.append(line)
        if m := LAYER_LINE.match(line):
            layers.append(m["layer"])
        elif m := MODULE_LINE.match(line):
            assert m["module"] not in where, f"{m['module']} is in the module map twice"
            where[m["module"]] = layers[-1]
        else:
            raise AssertionError(f"not a line of the module map: {line!r}")
    return layers, where, block


def imports_of(source: str) -> tuple[set[str], set[str]]:
    """(hf_pp modules, top-level outside packages) that ``source`` imports anywhere: module level, functions, classes."""
    internal, external = set(), set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "hf_pp":
                    internal.update(parts[1:2])
                else:
                    external.add(parts[0])
        elif isinstance(node, ast.ImportFrom):
            parts = (node.module or "").split(".")
            if node.level == 0 and parts[0] != "hf_pp":
                external.add(parts[0])
            elif (node.level and node.module) or len(parts) > 1:  # from .x import ..., from hf_pp.x import ...
                internal.add(parts[0] if node.level else parts[1])
            else:  # from . import a, b / from hf_pp import a: the names are modules or the package's own exports
                internal.update(alias.name for alias in node.names)
    return internal, external


LAYERS, LAYER_OF, MAP_LINES = module_map(hf_pp.__doc__)
MODULES = sorted(name[:-3] for name in os.listdir(PACKAGE) if name.endswith(".py") and name != "__init__.py")


def _imports(module: str) -> tuple[set[str], set[str]]:
    with open(os.path.join(PACKAGE, module + ".py")) as f:
        return imports_of(f.read())


def test_the_module_map_places_every_module_once_in_four_layers():
    assert LAYERS == ["pipeline", "models", "trainer", "tools"]
    assert sorted(LAYER_OF) == MODULES, (
        f"not in the map of hf_pp/__init__.py: {sorted(set(MODULES) - set(LAYER_OF))}; "
        f"in the map without a file: {sorted(set(LAYER_OF) - set(MODULES))}"
    )


def test_docs_design_repeats_the_module_map():
    with open(DESIGN) as f:
        design = f.read().splitlines()
    start = design.index(MAP_LINES[0]) if MAP_LINES[0] in design else None
    assert start is not None, "docs/design.md lacks the module map of hf_pp/__init__.py"
    assert design[start:start + len(MAP_LINES)] == MAP_LINES, "docs/design.md's module map differs from hf_pp/__init__.py's"


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_only_its_own_layer_and_below(module):
    internal, external = _imports(module)
    rank = LAYERS.index(LAYER_OF[module])
    higher = sorted(m for m in internal if m in LAYER_OF and LAYERS.index(LAYER_OF[m]) > rank)
    assert not higher, f"hf_pp.{module} ({LAYER_OF[module]}) imports a higher layer: " + ", ".join(
        f"{m} ({LAYER_OF[m]})" for m in higher)
    root = sorted(m for m in internal if m not in LAYER_OF)  # `from . import PipelineTrainer`: the package root
    assert not root, f"hf_pp.{module} imports {root} from the package root, which imports every layer"
    if LAYER_OF[module] == "pipeline":
        assert not external & HF_STACK, f"hf_pp.{module} is in the torch-only layer but imports {sorted(external & HF_STACK)}"
    if LAYERS.index(LAYER_OF[module]) < LAYERS.index("trainer"):
        assert "trl" not in external, f"hf_pp.{module} imports trl below the trainer layer"


def test_the_import_reader_sees_imports_inside_functions():
    source = (
        "import torch.nn as nn\nfrom . import grads\nfrom .split import x\nimport hf_pp.mesh\n"
        "def f():\n    from transformers import PreTrainedModel\n    from .trainer_loss import y\n"
        "class C:\n    def g(self):\n        import peft.tuners\n        from hf_pp.planner import z\n"
    )
    assert imports_of(source) == ({"grads", "split", "mesh", "trainer_loss", "planner"}, {"torch", "transformers", "peft"})
