"""The layers depend one way: minillava.kernels <- minillava (the model package) <- minillava.weights <-
minillava.generation (the library the scripts answer with: it loads checkpoints) <- the scripts (minillava.train,
.generate, .eval, .serve, .demo, .quantize, and synthetic.py, the demo's dataset: a helper beside them at the
root, which imports no script and which, of the scripts, demo.py alone imports), the benchmarks and the tests.
Checked twice: every import statement of each layer's files, function-local ones included (a deferred import hides
a cycle, it does not remove it), and each layer imported alone in a fresh interpreter. Nothing of ours is imported
by a top-level name of its folder or file (`kernels`, `weights`, `generate`, `synthetic`...): installed, only
`minillava` exists (setup.py)."""
import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = {"train", "generate", "eval", "serve", "demo", "quantize"}
HELPERS = {"synthetic"}  # modules beside the scripts, for them (demo.py), not commands: the scripts' layer
FILES = {"kernels": ROOT.glob("kernels/*.py"),
         "minillava": (p for p in ROOT.glob("minillava/*.py") if p.name != "generation.py"),
         "weights": ROOT.glob("weights/*.py"), "generation": [ROOT / "minillava" / "generation.py"],
         "scripts": (ROOT / f"{s}.py" for s in SCRIPTS | HELPERS)}
MAY_IMPORT = {"kernels": set(), "minillava": {"kernels"}, "weights": {"kernels", "minillava"},
              "generation": {"kernels", "minillava", "weights"},
              "scripts": {"kernels", "minillava", "weights", "generation", "scripts"}}
OLD_NAMES = {"kernels", "weights"} | SCRIPTS | HELPERS  # the folders' and root files' own names, not import names


def layer(module: str):
    """'minillava.kernels.rope' -> 'kernels', 'minillava.llama' -> 'minillava', 'minillava.train' and
    'minillava.synthetic' -> 'scripts'; None for another library's module."""
    parts = module.split(".")
    if parts[0] != "minillava":
        return None
    if len(parts) > 1 and parts[1] in ("kernels", "weights", "generation"):
        return parts[1]
    return "scripts" if len(parts) > 1 and parts[1] in SCRIPTS | HELPERS else "minillava"


def imports(path: Path):
    """(module, line) of every import in the file, at any depth; `from a import b` gives 'a.b', which is
    the module b where b is one (`from minillava import generate`) and a name in module a otherwise."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from ((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):  # a relative import comes out as ".module": the tests refuse it
            yield from ((f"{'.' * node.level}{node.module or ''}.{alias.name}", node.lineno) for alias in node.names)


def test_every_import_points_down():
    checked = 0
    for own, files in FILES.items():
        for path in sorted(files):
            for module, line in imports(path):
                where = f"{path.relative_to(ROOT)}:{line}"
                assert not module.startswith("."), f"{where}: a relative import ({module}); write minillava.*"
                assert module.split(".")[0] not in OLD_NAMES, f"{where} imports {module}: it is minillava.{module}"
                if layer(module):
                    checked += 1
                    assert layer(module) in MAY_IMPORT[own] | {own}, f"{where} imports {module}, a layer above {own}"
    assert checked > 100


def test_tests_and_benchmarks_use_the_one_name():
    for path in sorted([*ROOT.glob("tests/*.py"), *ROOT.glob("benchmarks/*.py")]):
        for module, line in imports(path):
            assert module.split(".")[0] not in OLD_NAMES, \
                f"{path.relative_to(ROOT)}:{line} imports {module}: it is minillava.{module}"


def test_each_layer_imports_alone():
    for module, allowed in (("minillava", {"minillava"}),  # its API is imported when first used
                            ("minillava.llava", {"minillava", "kernels"}),
                            ("minillava.weights", {"minillava", "kernels", "weights"}),
                            ("minillava.generation", {"minillava", "kernels", "weights", "generation"})):
        code = (f"import sys, json, {module}; "
                f"print(json.dumps(sorted({{m for m in sys.modules if m.startswith('minillava')}})))")
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        loaded = {layer(m) for m in json.loads(out.stdout)}
        assert layer(module) in loaded and loaded <= allowed, (module, loaded)


def test_no_cycle_inside_a_package():
    """Inside kernels/, minillava/ and weights/, the modules import one another one way too (function-local imports
    included): a cycle there is as hard to read as one between packages."""
    for folder, prefix in (("kernels", "minillava.kernels."), ("minillava", "minillava."),
                           ("weights", "minillava.weights.")):
        names = {p.stem for p in ROOT.glob(f"{folder}/*.py")} - {"__init__"}
        graph = {}
        for name in names:
            found = set()
            for module, _ in imports(ROOT / folder / f"{name}.py"):
                rest = module[len(prefix):] if module.startswith(prefix) else ""
                parts = rest.split(".")
                # 'minillava.weights.quantize.QUANT_KEY' -> quantize; 'minillava.weights.quantize' -> quantize
                found |= {p for p in parts[:2] if p in names and p != name}
            graph[name] = found
        seen, done = [], set()

        def visit(n):
            assert n not in seen, f"{folder}/: import cycle {' -> '.join(seen[seen.index(n):] + [n])}"
            if n in done:
                return
            seen.append(n)
            for m in sorted(graph[n]):
                visit(m)
            seen.pop()
            done.add(n)
        for n in sorted(graph):
            visit(n)
        assert done == names


def test_no_script_imports_another():
    """The scripts are command lines over the library (minillava.generation for answering), not over each other;
    demo.py alone runs the others' main(), as a user runs their commands. A helper (synthetic.py, the demo's
    dataset) sits at the scripts' level for demo.py's sake: demo.py alone may import it, and it imports the library,
    never a script or another helper."""
    for script in sorted((SCRIPTS | HELPERS) - {"demo"}):
        for module, line in imports(ROOT / f"{script}.py"):
            assert layer(module) != "scripts" or module.split(".")[1] == script, \
                f"{script}.py:{line} imports {module}: use the library (minillava.generation, minillava.weights)"


def test_helpers_sit_beside_the_scripts():
    """synthetic.py is at the root, not in minillava/ (the model package): the name minillava.synthetic reaches it
    in a checkout through the package's search path (minillava/__init__.py) and installed through setup.py's copy."""
    for name in HELPERS:
        assert (ROOT / f"{name}.py").is_file() and not (ROOT / "minillava" / f"{name}.py").exists(), name
    setup = (ROOT / "setup.py").read_text()
    assert all(f'"{name}"' in setup for name in HELPERS), "setup.py's build_py must copy the helpers into the package"
    code = "import json, minillava.synthetic as s; print(json.dumps(s.__file__))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert Path(json.loads(out.stdout)).resolve() == ROOT / "synthetic.py"
