"""The package's shape, read from the source with `ast`: the library never imports the
application (`mpafer.app`), the modules people copy stand alone, nothing imports in a circle,
and train.py reads as one recipe.

Every import counts, also those inside functions (a lazy import in a circle is still a circle).
"""
import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Copied on their own: they may use the vendored CLIP, nothing else of mpafer.
STANDALONE = ("mpafer.losses", "mpafer.alignment", "mpafer.prompts", "mpafer.clip",
              "mpafer.faces")
# The prototype mean (L_v) is copied with the vendored CLIP, the batch normalisation it shares
# with training, the loader iteration that cannot hang, and the progress bar.
PROTOTYPES_NEED = ("mpafer.clip", "mpafer.data.device_augment", "mpafer.data.batches",
                   "mpafer.progress")
# Leaves: import nothing from mpafer at all.
LEAVES = ("mpafer.labels", "mpafer.metrics", "mpafer.files", "mpafer.progress",
          "mpafer.precision", "mpafer.app.bench.measure")
# The commands on top of the library (`python -m mpafer.<name>`): each only starts its code in
# the application.
COMMANDS = ("mpafer.interpret", "mpafer.report", "mpafer.bench", "mpafer.predict",
            "mpafer.expclip.__main__")


def module_files():
    """{module name: path} of every Python file in mpafer/."""
    modules = {}
    for folder, _, files in os.walk(os.path.join(REPO, "mpafer")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                parts = os.path.relpath(path, REPO)[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                modules[".".join(parts)] = path
    return modules


MODULES = module_files()


def is_package(name):
    return MODULES[name].endswith("__init__.py")


def imported_modules(name):
    """The mpafer modules that module `name` imports (`from pkg import sub` -> pkg.sub)."""
    found = set()
    tree = ast.parse(open(MODULES[name], encoding="utf-8").read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "mpafer")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = name.split(".") if is_package(name) else name.split(".")[:-1]
                base = package[:len(package) - (node.level - 1)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module
            if base.split(".")[0] != "mpafer":
                continue
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    unknown = found - set(MODULES)
    assert not unknown, f"{name} imports {sorted(unknown)}, which are not modules of mpafer"
    return found


GRAPH = {name: imported_modules(name) for name in MODULES}


def within(name, roots):
    return any(name == root or name.startswith(root + ".") for root in roots)


def test_the_graph_is_read_correctly():
    # Relative and absolute spellings, packages and modules, lazy imports inside functions.
    assert "mpafer.clip.model" in GRAPH["mpafer.clip.loading"]
    assert "mpafer.data.base" in GRAPH["mpafer.data.rafdb"]
    assert "mpafer.expclip.features" in GRAPH["mpafer.expclip.teacher"]
    assert "mpafer.clip" in GRAPH["mpafer"] and "mpafer.model" in GRAPH["mpafer"]
    assert "mpafer.losses" in GRAPH["mpafer.model"]  # `from . import losses`


@pytest.mark.parametrize("name", [m for m in MODULES if within(m, STANDALONE)])
def test_copyable_modules_need_only_the_vendored_clip(name):
    own = [root for root in STANDALONE if within(name, (root,))]  # its own package is in the copy
    outside = sorted(m for m in GRAPH[name] if not within(m, ("mpafer.clip", *own)))
    assert not outside, f"{name} imports {outside}: it must need nothing of mpafer but mpafer.clip"


def library_modules():
    return sorted(m for m in MODULES if not within(m, ("mpafer.app",)) and m not in COMMANDS)


def closure(name):
    seen, todo = set(), [name]
    while todo:
        for target in GRAPH[todo.pop()]:
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


@pytest.mark.parametrize("name", library_modules())
def test_the_library_never_imports_the_application(name):
    """Directly or through another module: what a paper reader reads (and copies) stands on its
    own; configuration, runs, faults, protocol, engine, report, figures and demo sit above."""
    application = sorted(m for m in closure(name) if within(m, ("mpafer.app",)))
    assert not application, f"{name} imports the application: {application}"


def test_importing_the_library_loads_no_application_module():
    """The same, as Python sees it: import every library module in a fresh interpreter."""
    import subprocess
    import sys
    code = ("import importlib, sys\n"
            f"for name in {library_modules()!r}:\n"
            "    importlib.import_module(name)\n"
            "print(sorted(m for m in sys.modules if m.startswith('mpafer.app')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_the_commands_only_start_the_application():
    for name in COMMANDS:
        if name in MODULES:
            assert len(open(MODULES[name], encoding="utf-8").read().splitlines()) <= 15, name


def test_the_configuration_reads_no_checkpoint():
    """Configuration only parses and checks; resolving a resume (reading last.pt) is the run
    layer's."""
    assert not {"mpafer.checkpoint", "mpafer.app.runs"} & GRAPH["mpafer.app.config"]
    source = open(MODULES["mpafer.app.config"], encoding="utf-8").read()
    assert "load_checkpoint" not in source and "torch.load" not in source


def test_the_prototype_mean_is_copyable():
    outside = sorted(m for m in closure("mpafer.prototypes") if not within(m, PROTOTYPES_NEED))
    assert not outside, f"mpafer.prototypes needs {outside}"


@pytest.mark.parametrize("name", LEAVES)
def test_leaf_modules_import_nothing_from_mpafer(name):
    assert not GRAPH[name], f"{name} imports {sorted(GRAPH[name])}"


def test_no_import_cycle():
    state = {}  # name -> "open" while on the current path, "done" after

    def visit(name, path):
        state[name] = "open"
        for target in sorted(GRAPH[name]):
            if state.get(target) == "open":
                cycle = path[path.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, path + [target])
        state[name] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])


def test_a_planted_cycle_is_found(monkeypatch):
    # The cycle check itself works: make mpafer.labels import mpafer.data, which imports it.
    monkeypatch.setitem(GRAPH, "mpafer.labels", {"mpafer.data"})
    with pytest.raises(pytest.fail.Exception, match="import cycle: .*mpafer.labels"):
        test_no_import_cycle()


def test_train_script_is_main_and_the_epoch_loop():
    """train.py is the recipe: `main` and the epoch loop `train`, read top to bottom. A helper
    used once belongs in one of them; anything reusable belongs in the package."""
    tree = ast.parse(open(os.path.join(REPO, "train.py"), encoding="utf-8").read())
    functions = [node.name for node in tree.body if isinstance(node, ast.FunctionDef)]
    calls = [node.func.id for node in ast.walk(tree)
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)]
    assert functions[:2] == ["main", "train"], functions
    once = [name for name in functions[2:] if calls.count(name) < 2]
    assert not once, f"train.py: {once} are called from one place only"
