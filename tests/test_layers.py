"""The package's layers, read from its imports: the core (plain SD) imports nothing outside itself and no reference
library; the wings (fast/, bokeh/, lora/, cli/, ...) import the core; only cli/ imports other wings; no private name
is imported across modules. prompts/ is a package of the core (bundle, params and pipeline call it), not a wing."""
from __future__ import annotations

import ast

from _util import REPO

PACKAGE = REPO / "gbsd_core"
TEST_ONLY = ("diffusers", "transformers", "peft", "cv2", "pytest")
CORE_PACKAGES = ("prompts",)  # folders of the core, off the learning route: the core's own modules import them


def _imports(path):
    """(module imported, names) of every import in a file, relative imports resolved to dotted gbsd_core names."""
    parts = path.relative_to(REPO).with_suffix("").parts
    package = parts[:-1]  # the package a relative import starts from (for __init__.py: its own folder)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            else:
                module = node.module
            yield module, [a.name for a in node.names]


def _layer(module: str) -> str:
    """'core' for gbsd_core.X (a top-level module) or a core package's module, else the wing's name
    (gbsd_core.fast.step -> 'fast')."""
    rest = module.split(".")[1:]
    if not rest or (len(rest) == 1 and not (PACKAGE / rest[0]).is_dir()) or rest[0] in CORE_PACKAGES:
        return "core"
    return rest[0]


def _files():
    return sorted(p for p in PACKAGE.rglob("*.py"))


def test_the_core_imports_only_the_core_and_no_reference_library():
    for f in _files():
        mine = _layer(".".join(f.relative_to(REPO).with_suffix("").parts))
        for module, names in _imports(f):
            top = module.split(".")[0]
            assert top not in TEST_ONLY, f"{f.relative_to(REPO)} imports {module} (a test-only library)"
            if top != "gbsd_core":
                continue
            targets = [module] if names == [] else [module] + [f"{module}.{n}" for n in names
                                                              if (PACKAGE.joinpath(*module.split(".")[1:], f"{n}.py")).exists()]
            for target in targets:
                theirs = _layer(target)
                if mine == "core":
                    assert theirs == "core", f"core file {f.relative_to(REPO)} imports {target} (wing {theirs}/)"
                elif mine != "cli":
                    assert theirs in ("core", mine), f"{f.relative_to(REPO)} (wing {mine}/) imports {target} (wing {theirs}/)"


def test_no_private_name_is_imported_across_modules():
    for f in _files():
        for module, names in _imports(f):
            if module.split(".")[0] != "gbsd_core":
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            assert not private, f"{f.relative_to(REPO)} imports private {private} from {module}"


def test_the_layer_rule_can_fail(tmp_path):
    assert _layer("gbsd_core.fast.step") == "fast" and _layer("gbsd_core.unet") == "core"
    assert _layer("gbsd_core.fast") == "fast" and _layer("gbsd_core") == "core"
    assert _layer("gbsd_core.prompts.encode") == "core" and _layer("gbsd_core.lora.merge") == "lora"
