"""The README's map of the code stays true: every `file.py:name` (or `file.py:Class.method`) it cites exists, and
every `file.py` it names is a file of the project. A rename that forgets the README fails here."""
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
REFERENCE = re.compile(r"`((?:[\w-]+/)*[\w-]+)\.py:([\w.]+)`")       # `diti.py:Partition.subset_of_t`
FILE = re.compile(r"`((?:[\w-]+/)*[\w-]+\.py)`")                       # `diffusion.py`


def references(text):
    """[(module path without .py, dotted name)] in order of appearance, each once."""
    return list(dict.fromkeys(REFERENCE.findall(text)))


def resolve(module, name):
    """Import module ('diti', or 'tests/x' as 'tests.x') and getattr along name ('Partition.subset_of_t')."""
    obj = importlib.import_module(module.replace("/", "."))
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def test_the_readme_cites_the_code_of_every_spec_section():
    cited = references(README)
    assert len(cited) >= 30, f"found only {len(cited)} `file.py:name` references: has the README's format changed?"
    assert {m for m, _ in cited} >= {"diffusion", "unet", "diti", "synthetic", "metrics"}


@pytest.mark.parametrize("module,name", references(README), ids=lambda v: v)
def test_readme_reference_exists(module, name):
    obj = resolve(module, name)
    assert callable(obj) or isinstance(obj, type), f"{module}.py:{name} is not a function or class"


@pytest.mark.parametrize("path", sorted(set(FILE.findall(README))))
def test_readme_file_exists(path):
    assert (ROOT / path).is_file(), f"README.md names {path}, which is not in the project"


def test_a_renamed_function_is_caught():
    assert references("see `diti.py:cumulative_mask_v2` and `diti.py:Partition.subset_of`") == \
        [("diti", "cumulative_mask_v2"), ("diti", "Partition.subset_of")]
    with pytest.raises(AttributeError):
        resolve("diti", "cumulative_mask_v2")
    with pytest.raises(AttributeError):
        resolve("diti", "Partition.subset_of")
