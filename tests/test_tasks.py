"""The task registry: every part of every task resolves, lookups by settings, config block and export
work, and no module outside the registry asks which task it has."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from pipelines import tasks
from pipelines.workspace import UserError
from pipelines.detection.params import DetectorParams
from pipelines.segmentation.params import SegmenterParams

REPO = Path(__file__).resolve().parent.parent
@pytest.mark.parametrize("name", tasks.names())
def test_every_part_of_every_task_resolves(name):
    """Every part lives in the task's own package, under the same module and name in every task."""
    task = tasks.get(name)
    assert set(tasks.PARTS) >= {"translate", "config_rules", "train", "evaluator", "exporter", "predict", "service",
                                "report", "check_engine"}
    assert task.package == f"pipelines.{name}"
    for part, (module, attribute) in tasks.PARTS.items():
        found = task.load(part)
        assert callable(found), f"{name}.{part}"
        defined_in = getattr(found, "inner", found).__module__  # a BentoML service wraps its class
        assert defined_in == f"{task.package}.{module}", (part, defined_in)
    assert task.params.__module__ == f"{task.package}.params"
    assert all(field in {f.name for f in dataclasses.fields(task.params)}
               for field in task.init_fields + task.path_fields), name


def test_lookups():
    assert tasks.of_params(DetectorParams(num_classes=1)).name == "detection"
    assert tasks.of_params(SegmenterParams(num_classes=1)).name == "segmentation"
    with pytest.raises(ValueError, match="no registered task"):
        tasks.of_params(object())
    assert tasks.of_config_block("ssd").name == "detection"
    assert tasks.of_config_block("segmentation").name == "segmentation"
    assert tasks.of_config_block("faster_rcnn") is None
    assert tasks.config_blocks() == ["ssd", "segmentation"]
    with pytest.raises(ValueError, match=r"unknown task 'pose' \(known: detection, segmentation\)"):
        tasks.get("pose")


def test_the_export_names_its_task(tmp_path):
    (tmp_path / "saved_model").mkdir()
    (tmp_path / "saved_model" / "saved_model.pb").write_bytes(b"")
    assert tasks.of_export(tmp_path).name == "detection"  # exports from before metadata.json
    (tmp_path / "metadata.json").write_text(json.dumps({"task": "segmentation"}))
    assert tasks.of_export(tmp_path).name == "segmentation"
    assert tasks.of_export(tmp_path / "saved_model").name == "segmentation"
    (tmp_path / "metadata.json").write_text(json.dumps({"task": "pose"}))
    with pytest.raises(UserError, match="export of unknown task 'pose'"):
        tasks.of_export(tmp_path)


def _task_choices(tree, names: set[str]) -> list[tuple[int, str]]:
    """Where a module decides by itself which task it has: a task name (or a task's config block) compared
    with (==, !=, in), given as a default (`d.get(key, "detection")`, a parameter's or a dataclass field's
    default), or a settings class tested with isinstance."""
    import ast

    def named(node) -> bool:
        if isinstance(node, ast.Constant):
            return node.value in names
        return isinstance(node, (ast.Tuple, ast.List, ast.Set)) and any(named(e) for e in node.elts)

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(named(n) for n in [node.left, *node.comparators]):
            found.append((node.lineno, "compares with a task name"))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get" \
                and len(node.args) >= 2 and named(node.args[1]):
            found.append((node.lineno, "a task name as the default of a lookup"))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance" \
                and "Params" in ast.unparse(node.args[1]):
            found.append((node.lineno, "tests the settings' class"))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and any(
                named(d) for d in [*node.args.defaults, *node.args.kw_defaults] if d is not None):
            found.append((node.lineno, "a task name as a parameter's default"))
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and item.value is not None and named(item.value):
                    found.append((item.lineno, "a task name as a field's default"))
    return found


def test_no_module_outside_a_task_decides_which_task_it_has():
    """Outside a task's own package (and the registry, which reads the layout from before the "task"
    field: tasks.name_in), no module compares with a task name, defaults to one, or tests the settings'
    class: it asks the registry or the task object it was given."""
    import ast

    names = set(tasks.names()) | set(tasks.config_blocks())
    packages = {tasks.get(name).package.replace(".", "/") for name in tasks.names()}
    found = []
    for path in sorted((REPO / "pipelines").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel == "pipelines/tasks.py" or any(rel.startswith(package + "/") for package in packages):
            continue
        for line, what in _task_choices(ast.parse(path.read_text()), names):
            found.append(f"{rel}:{line}: {what}")
    assert not found, "\n".join(found)


def test_the_architecture_check_finds_what_it_looks_for():
    import ast

    names = {"detection", "segmentation", "ssd"}
    caught = ['if task == "segmentation": pass', 'x = kind in ("ssd", "faster_rcnn")',
              'name = metadata.get("task", "detection")', 'def f(task="detection"): pass',
              'class O:\n    task: str = "detection"', 'ok = isinstance(p, SegmenterParams)']
    for source in caught:
        assert _task_choices(ast.parse(source), names), source
    fine = ['x = ann.get("segmentation")', 'y = ann["segmentation"]', 'plans = {"detection": 1}',
            'p.add_argument("--kind", choices=("detection", "full"))']
    for source in fine:
        assert not _task_choices(ast.parse(source), names), source


def test_the_config_layer_imports_no_model_code():
    """pipelines/config/ is below the models: the text editor and the readers import no TensorFlow and no
    task code but the settings dataclasses they fill (the registry names the other parts, imported when
    asked)."""
    for path in sorted((REPO / "pipelines" / "config").glob("*.py")):
        top_level = [line for line in path.read_text().splitlines() if line.startswith(("import ", "from "))]
        bad = [line for line in top_level if re.search(r"tensorflow|tf_keras|official|pipelines\.(detection|"
                                                        r"segmentation|engine|serving)(?!\.params\b)", line)]
        assert not bad, f"{path.name}: {bad}"


def test_quiet_orbit_drops_orbits_prints_only():
    import contextlib
    import io

    from pipelines.engine.train import QuietOrbit

    out = io.StringIO()
    with contextlib.redirect_stdout(QuietOrbit(out)):
        print("train | step:      0 | training until step 6...")
        print("step 3/6  loss 1.0")
        print("train | step:      3 | steps/sec:    0.2 | output: \n    {'loss': 1.0}")
        print("saved checkpoint to /x/ckpt-3.")
        print(" eval | step:      3 | running complete evaluation...")
        print("eval at step 3: val mean IoU 0.5")
        print("a", "train | b", sep=" | ")
    assert out.getvalue() == "step 3/6  loss 1.0\neval at step 3: val mean IoU 0.5\na | train | b\n"


def _pipelines_imports() -> dict[str, set[str]]:
    """{module: the pipelines modules it imports}, counting imports inside functions."""
    import ast

    root = Path(__file__).resolve().parent.parent
    modules = {}
    for path in (root / "pipelines").rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + [base]).strip(".")
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rsplit(".", 1)[0] if "." in target else ""
                if target and target not in (name, "pipelines"):
                    found.add(target)
        graph[name] = found
    return graph


def test_no_import_cycles_in_the_package():
    """No module of pipelines/ reaches itself through imports, those inside functions included."""
    graph = _pipelines_imports()
    assert "pipelines.detection.model" in graph["pipelines.detection.export"]  # the walk sees imports at all

    def reaches(start: str) -> list[str] | None:
        seen, todo = set(), [(start, [start])]
        while todo:
            module, path = todo.pop()
            for nxt in graph.get(module, ()):
                if nxt == start:
                    return path + [start]
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append((nxt, path + [nxt]))
        return None

    cycles = [cycle for cycle in map(reaches, sorted(graph)) if cycle]
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles[:5])
