"""The README's map of the code stays true: every `file.py:name` (or `file.py:Class.method`) it and CLAIMS.md cite
exists, every `file.py` they name is a file of the project, and every relative link they hold leads to a file that
is in the repository. A rename or a moved result that forgets the docs fails here."""
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = {name: (ROOT / name).read_text(encoding="utf-8") for name in ("README.md", "CLAIMS.md")}
README = DOCS["README.md"]
REFERENCE = re.compile(r"`((?:[\w-]+/)*[\w-]+)\.py:([\w.]+)`")       # `diti.py:Partition.subset_of_t`
FILE = re.compile(r"`((?:[\w-]+/)*[\w-]+\.py)`")                       # `diffusion.py`
LINK = re.compile(r"\]\(([^)\s]+)\)")                                    # [claims.md](results/claims/claims.md)


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


def links(text):
    """Relative link targets of a markdown text, without #anchors; web addresses and in-page anchors left out."""
    targets = (link.split("#")[0] for link in LINK.findall(text) if not link.startswith(("http", "#")))
    return sorted(set(targets))


@pytest.mark.parametrize("module,name", references("\n".join(DOCS.values())), ids=lambda v: v)
def test_readme_reference_exists(module, name):
    obj = resolve(module, name)
    assert callable(obj) or isinstance(obj, type), f"{module}.py:{name} is not a function or class"


@pytest.mark.parametrize("doc,path", [(d, p) for d, text in DOCS.items() for p in sorted(set(FILE.findall(text)))])
def test_readme_file_exists(doc, path):
    assert (ROOT / path).is_file(), f"{doc} names {path}, which is not in the project"


@pytest.mark.parametrize("doc,path", [(d, p) for d, text in DOCS.items() for p in links(text)])
def test_doc_link_leads_to_a_file(doc, path):
    assert (ROOT / path).exists(), f"{doc} links {path}, which is not in the project: fix the link or commit the file"


def test_links_finds_relative_targets_only():
    text = "see [a](results/a.md), [b](results/a.md#top), [web](https://x.org/p) and [here](#tests)"
    assert links(text) == ["results/a.md"]


def test_a_renamed_function_is_caught():
    assert references("see `diti.py:cumulative_mask_v2` and `diti.py:Partition.subset_of`") == \
        [("diti", "cumulative_mask_v2"), ("diti", "Partition.subset_of")]
    with pytest.raises(AttributeError):
        resolve("diti", "cumulative_mask_v2")
    with pytest.raises(AttributeError):
        resolve("diti", "Partition.subset_of")
