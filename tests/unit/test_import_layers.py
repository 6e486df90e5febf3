"""The product never imports the lab, and no import runs from a lower layer back up to a higher one.

Every ``import`` / ``from ... import`` in every product module is checked, including lazy ones inside functions
and ``TYPE_CHECKING`` blocks (the AST is walked, nothing is executed). Layers, lowest first::

    contract, api, services  <  datalayer  <  cycle  <  predictor  <  scheduling (+ plugin, the SDK facade)  <  admission, observe  <  server

A module may import its own layer and any layer below it. The lab (``sim``, ``bench``, ``harness``, ``demo``)
and the separate batch service (``batch``) sit outside the product: the product imports none of them, nor any
other non-product module of the package (CLIs, the Envoy config renderer, the sidecar).
"""

from __future__ import annotations

import ast
from pathlib import Path

import extproc

PKG = Path(extproc.__file__).resolve().parent

# product group → layer rank (a module may import groups of rank <= its own)
LAYERS: dict[str, int] = {
    "contract": 0,
    "api": 0,
    "services": 0,
    "datalayer": 1,
    "cycle": 2,
    "predictor": 3,
    "scheduling": 4,
    "plugin": 4,
    "admission": 5,
    "observe": 5,
    "server": 6,
}
LAB = ("sim", "bench", "harness", "demo", "batch")


def _module_name(path: Path, pkg: Path = PKG) -> str:
    parts = list(path.relative_to(pkg.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _group(module: str) -> str | None:
    """``extproc.scheduling.plugins.prefix`` → ``scheduling``; ``extproc`` itself → None."""
    parts = module.split(".")
    if parts[0] != "extproc" or len(parts) < 2:
        return None
    return parts[1]


def _imports(path: Path, pkg: Path = PKG) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, imported names) for every import statement in the file, at any depth."""
    module = _module_name(path, pkg)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: list[tuple[int, str, list[str]]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, a.name, []) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                if node.level > 1:
                    base = base[: -(node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((node.lineno, target, [a.name for a in node.names]))
    return out


def _product_files() -> list[Path]:
    files: list[Path] = []
    for group in LAYERS:
        d = PKG / group
        if d.is_dir():
            files.extend(sorted(d.rglob("*.py")))
        elif (PKG / f"{group}.py").is_file():
            files.append(PKG / f"{group}.py")
    return files


def _targets(target: str, names: list[str]) -> list[str]:
    """The extproc modules an import may load: ``from extproc import sim`` names the module ``extproc.sim``."""
    if target == "extproc":
        return [f"extproc.{n}" for n in names]
    return [target]


def layer_violations() -> list[str]:
    bad: list[str] = []
    for path in _product_files():
        module = _module_name(path)
        group = _group(module)
        assert group is not None
        rank = LAYERS[group]
        rel = path.relative_to(PKG.parent)
        for line, target, names in _imports(path):
            for t in _targets(target, names):
                tg = _group(t)
                if tg is None or tg == group:
                    continue
                if tg in LAB:
                    bad.append(f"{rel}:{line}: product module {module} imports the lab ({t})")
                elif tg not in LAYERS:
                    bad.append(f"{rel}:{line}: product module {module} imports non-product {t}")
                elif LAYERS[tg] > rank:
                    bad.append(f"{rel}:{line}: {module} (layer {group}) imports {t} from the higher layer {tg}")
    return bad


def test_product_files_found() -> None:
    files = {_module_name(p) for p in _product_files()}
    for m in ("extproc.api", "extproc.cycle", "extproc.plugin", "extproc.server.handler", "extproc.predictor.service"):
        assert m in files
    assert len(files) > 40


def test_product_imports_no_lab_and_no_higher_layer() -> None:
    bad = layer_violations()
    assert not bad, "import layering violated:\n" + "\n".join(bad)


def test_checker_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    """The walker finds imports nested in functions and resolves relative ones (so the rule cannot be dodged)."""
    src = tmp_path / "extproc" / "datalayer"
    src.mkdir(parents=True)
    f = src / "x.py"
    f.write_text("def f():\n    from ..sim import engine\n    import extproc.bench.client\n")
    found = [(t, n) for _, t, n in _imports(f, tmp_path / "extproc")]
    assert ("extproc.sim", ["engine"]) in found
    assert ("extproc.bench.client", []) in found
