"""The packages depend one way: kernels <- minillava <- weights <- the scripts (train, generate, eval, demo) and
the tests. Checked twice: every import statement of each package's files, function-local ones included (a
deferred import hides a cycle, it does not remove it), and each package imported alone in a fresh interpreter."""
import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = {"kernels": set(), "minillava": {"kernels"}, "weights": {"kernels", "minillava"}}  # package: may import
ABOVE = {"train", "generate", "eval", "demo", "serve", "benchmarks", "tests"}
OURS = set(LAYERS) | ABOVE


def imports(path: Path):
    """(top-level module name, line) of every absolute import in the file, at any depth."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from ((alias.name.split(".")[0], node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module.split(".")[0], node.lineno


def test_every_import_points_down():
    checked = 0
    for package, allowed in LAYERS.items():
        for path in sorted((ROOT / package).glob("*.py")):
            for name, line in imports(path):
                if name in OURS:
                    checked += 1
                    assert name == package or name in allowed, \
                        f"{path.relative_to(ROOT)}:{line} imports {name}, a layer above {package}"
    assert checked > 20


def test_each_package_imports_alone():
    for package, allowed in LAYERS.items():
        code = (f"import sys, json, {package}; "
                f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({sorted(OURS)!r}))))")
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        loaded = set(json.loads(out.stdout))
        assert package in loaded and loaded <= allowed | {package}, (package, loaded)
