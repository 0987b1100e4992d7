"""The package's layout as docs/architecture.md states it: folders by stage that import each other in one
direction, every module in the module map with its first docstring line, none over 400 lines."""

import ast
import re

from conftest import REPO

PACKAGE = REPO / "lorapipe"
# docs/architecture.md, "The package by stage": each group imports only groups below it.
LAYERS = [{"cli", "experiments"}, {"config", "report", "infer"}, {"train", "weights", "exports"}, {"data"}, {"model"}, {"formats"},
          {"outputs", "provenance"}, {"errors", "digests", "progress"}]
LAYER_OF = {group: depth for depth, groups in enumerate(LAYERS) for group in groups}


def modules():
    """lorapipe's modules; not weights/remote_code/, the tiny base's Baichuan files (HF remote code, which
    imports transformers only)."""
    return sorted(p for p in PACKAGE.rglob("*.py") if "remote_code" not in p.parts)


def group(module):
    """The folder (or core module) of a dotted lorapipe module name."""
    return module.split(".")[1]


def imports(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lorapipe."):
            yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("lorapipe."))


def test_folders_import_each_other_in_one_direction():
    wrong = []
    for path in modules():
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts == ("__init__",):
            continue
        mine = parts[0]
        assert mine in LAYER_OF, f"{path}: in no layer of docs/architecture.md"
        for module in imports(path):
            theirs = group(module)
            if theirs != mine and LAYER_OF[theirs] <= LAYER_OF[mine]:
                wrong.append(f"{path.relative_to(REPO)} imports {module}")
    assert not wrong, wrong


def test_every_module_is_in_the_map_with_its_first_docstring_line():
    text = (REPO / "docs/architecture.md").read_text()
    listed = dict(re.findall(r"^\| `(lorapipe/[\w/]+\.py)` \| (.*) \|$", text, re.M))
    for path in modules():
        name = str(path.relative_to(REPO))
        docstring = ast.get_docstring(ast.parse(path.read_text()))
        assert docstring, f"{name}: no docstring"
        assert listed.get(name, "").replace("\\|", "|") == docstring.splitlines()[0], name
    assert sorted(listed) == [str(p.relative_to(REPO)) for p in modules()], "docs/architecture.md lists modules that do not exist"


def test_no_module_is_over_400_lines():
    assert not [(p.name, n) for p in modules() if (n := len(p.read_text().splitlines())) > 400]
