"""`make config`: rewrite a pipeline.config template for one dataset and run.

Sets num_classes from the label map, the label map and TFRecord paths of both readers, and
optionally the batch size, the number of steps and the fine-tune checkpoint. Everything else in
the file (comments, order, the other fields) stays as the user or template wrote it. A changed
batch size scales the learning rates linearly; a changed number of steps moves the cosine
schedule's total_steps with it and scales warmup_steps in proportion (never past total_steps).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

from pipelines import tasks
from pipelines.workspace import REPO_ROOT, UserError, display_path, resolve_dataset, workspace_dir, write_text_atomic
from pipelines.config import base, read, schema
from pipelines.config.base import memory_advice
from pipelines.config.textproto import TextProto
from pipelines.data.label_map import read_label_map

CONFIGS_DIR = REPO_ROOT / "configs"


@dataclass
class ConfigOptions:
    dataset: str
    model: str = "ssd_mobilenet_v2_fpnlite_320x320"
    run: str | None = None
    batch_size: int | None = None
    num_steps: int | None = None
    checkpoint: str | None = None
    checkpoint_type: str | None = None
    freeze: str | None = None  # 'backbone' or 'feature_extractor': train_config.freeze_variables
    learning_rate: float | None = None  # the schedule's peak (after any batch-size scaling)
    optimizer: str | None = None  # 'adam' or 'momentum': train_config.optimizer's member
    image_size: tuple[int, int] | None = None  # (height, width) of the fixed_shape_resizer


def template_path(model: str) -> Path:
    candidates = [CONFIGS_DIR / f"{model}.config", CONFIGS_DIR / model, Path(model)]
    for path in candidates:
        if path.is_file():
            return path
    names = sorted(p.stem for p in CONFIGS_DIR.glob("*.config"))
    raise UserError(model, f"no such config template; choose one of {', '.join(names)} or give a file path")


def data_dir(dataset: str) -> Path:
    """The data stage's output for DATASET (a name under workspace/, or a dataset path's name)."""
    direct = workspace_dir() / dataset / "data"
    if direct.is_dir():
        return direct
    try:
        name = resolve_dataset(dataset).name
    except UserError:
        name = Path(dataset).name
    folder = workspace_dir() / name / "data"
    if not folder.is_dir():
        raise UserError(display_path(folder), f"no data for dataset '{dataset}': run `make data DATASET={dataset}` first")
    return folder


def portable(path: Path) -> str:
    """Paths below the repository are written relative to it, so a checkout can move."""
    try:
        return Path(path).resolve().relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return str(Path(path).resolve())


def rewrite(doc: TextProto, data: Path, opts: ConfigOptions) -> list[str]:
    """Apply the rewrite rules to `doc`; returns what was changed, one line each.

    Every task's config shares the rules below; then come the task's own (its `config_rules` in
    pipelines/tasks.py: a detector's fine_tune_checkpoint, a segmenter's encoder_weights file)."""
    notes = []
    kind = base.model_kind(doc)
    labels = read_label_map(data / "label_map.pbtxt")
    if not doc.set(f"model.{kind}.num_classes", len(labels)):
        doc.add(f"model.{kind}", "num_classes", len(labels))
    label_map = portable(data / "label_map.pbtxt")
    for reader, split in (("train_input_reader", "train"), ("eval_input_reader", "val")):
        if not doc.set(f"{reader}.label_map_path", label_map):
            doc.add(reader, "label_map_path", label_map)
        pattern = portable(data) + f"/{split}-*.tfrecord"
        paths = doc.find(f"{reader}.tf_record_input_reader.input_path")
        if len(paths) > 1:
            doc.remove(f"{reader}.tf_record_input_reader.input_path")
            doc.add(f"{reader}.tf_record_input_reader", "input_path", pattern)
        elif not doc.set(f"{reader}.tf_record_input_reader.input_path", pattern):
            raise UserError(doc.source, f"{reader}.tf_record_input_reader: missing")

    switched = _optimizer(doc, opts.optimizer, notes) if opts.optimizer else None
    schedule, schedule_name = base.learning_rate_path(doc)
    rates = {"cosine_decay_learning_rate": ("learning_rate_base", "warmup_learning_rate"),
             "constant_learning_rate": ("learning_rate",)}.get(schedule_name, ())
    if opts.batch_size:
        old = int(doc.get("train_config.batch_size", opts.batch_size))
        doc.set("train_config.batch_size", opts.batch_size)
        if old != opts.batch_size:
            factor = opts.batch_size / old
            for name in rates:
                value = doc.get(f"{schedule}.{name}")
                if value is not None:
                    doc.set(f"{schedule}.{name}", _round(float(value) * factor))
            if rates:
                notes.append(f"batch size {old} -> {opts.batch_size}: learning rates scaled by {factor:g}")
    learning_rate = opts.learning_rate or (OPTIMIZER_PEAK[switched] if switched else None)
    if learning_rate:
        if not rates:
            raise UserError(doc.source, f"{schedule}: LR= sets cosine_decay_learning_rate or constant_learning_rate, "
                                        f"not {schedule_name}")
        peak = float(doc.get(f"{schedule}.{rates[0]}"))
        for name in rates:  # the warmup start keeps its ratio to the peak
            value = doc.get(f"{schedule}.{name}")
            if value is not None:
                doc.set(f"{schedule}.{name}", _round(float(value) * learning_rate / peak) if peak else
                        learning_rate)
        notes.append(f"learning rate {_round(peak)} -> {_round(learning_rate)}"
                     + (" (warmup_learning_rate in proportion)" if len(rates) > 1 else "")
                     + ("" if opts.learning_rate else f" ({switched}'s default peak; LR= sets another)"))
    if opts.image_size:
        resizer = f"model.{kind}.image_resizer.fixed_shape_resizer"
        if not doc.has(resizer):
            raise UserError(doc.source, f"{resizer}: missing, so SIZE= has nothing to set")
        old = (doc.get(f"{resizer}.height"), doc.get(f"{resizer}.width"))
        doc.set(f"{resizer}.height", opts.image_size[0])
        doc.set(f"{resizer}.width", opts.image_size[1])
        notes.append(f"input size {old[0]}x{old[1]} -> {opts.image_size[0]}x{opts.image_size[1]} (height x width)")
    cosine = schedule if schedule_name == "cosine_decay_learning_rate" else None
    if opts.num_steps:
        old_total = int(doc.get(f"{cosine}.total_steps", doc.get("train_config.num_steps", opts.num_steps))
                        if cosine else doc.get("train_config.num_steps", opts.num_steps))
        doc.set("train_config.num_steps", opts.num_steps)
        if cosine and doc.has(f"{cosine}.total_steps"):
            doc.set(f"{cosine}.total_steps", opts.num_steps)
    if cosine:
        total = int(doc.get(f"{cosine}.total_steps", 0) or 0)
        warmup = doc.get(f"{cosine}.warmup_steps")
        if opts.num_steps and warmup is not None and old_total:
            scaled = max(1, round(int(warmup) * opts.num_steps / old_total)) if int(warmup) else 0
            doc.set(f"{cosine}.warmup_steps", min(scaled, opts.num_steps))
        elif warmup is not None and total and int(warmup) > total:
            doc.set(f"{cosine}.warmup_steps", total)
            notes.append(f"warmup_steps {warmup} > total_steps {total}: set to {total}")

    notes += tasks.of_config_block(kind).load("config_rules")(doc, opts)
    return notes


# OPTIMIZER=...: the train_config.optimizer member, and the peak learning rate it gets unless LR= is
# given (a momentum peak means nothing to Adam). From scratch on the bundled sample Adam at 0.001
# learned far faster than momentum at its best peak (bench/RESULTS.md).
OPTIMIZERS = {"adam": "adam_optimizer", "momentum": "momentum_optimizer"}
OPTIMIZER_PEAK = {"adam": 0.001, "momentum": 0.01}
MOMENTUM = 0.9


def _optimizer(doc: TextProto, name: str, notes: list[str]) -> str | None:
    """Make train_config.optimizer's member OPTIMIZERS[name], keeping its learning-rate schedule;
    returns `name` when it changed, None when the config already had it."""
    members = [n for n in doc.message_names("train_config.optimizer") if n != "use_moving_average"]
    if not members:
        raise UserError(doc.source, "train_config.optimizer: missing, so OPTIMIZER= has nothing to change")
    old, new = members[0], OPTIMIZERS[name]
    if old == new:
        return None
    if old not in OPTIMIZERS.values():
        raise UserError(doc.source, f"train_config.optimizer.{old}: OPTIMIZER= switches between "
                                    f"{' and '.join(OPTIMIZERS.values())} only")
    doc.remove(f"train_config.optimizer.{old}.momentum_optimizer_value")
    doc.remove(f"train_config.optimizer.{old}.epsilon")
    doc.rename(f"train_config.optimizer.{old}", new)
    if new == "momentum_optimizer":
        doc.add(f"train_config.optimizer.{new}", "momentum_optimizer_value", MOMENTUM)
    notes.append(f"optimizer {old} -> {new}")
    return name


# A batch-norm moving average spans about 1 / (1 - decay) steps; at most this share of the run.
BN_WINDOW = 1 / 8
BN_MIN_DECAY = 0.9


def batch_norm_decay(doc: TextProto, decays: dict[str, tuple[str, float | None]], after: str | None = None) -> list[str]:
    """Lower a batch-norm `decay` too slow for the run's length (a rule with a note, like the others).
    `decays`: field path -> (its name in the note, the value the task takes when the field is absent, or
    None: nothing to lower then); a field added goes after the sibling `after`.

    The zoo's 0.997 averages over ~333 steps, made for tens of thousands of them. Over a short
    schedule the moving mean and variance, which evaluation and serving use, keep part of their
    initial 0 and 1 (0.997**800 = 9%) and lag the weights: a detector trained from scratch for 800
    steps then scored AP 0.001 (0.9942: 0.09; 0.99: 0.36; bench/RESULTS.md). The decay is set to
    1 - 1 / (BN_WINDOW * num_steps), at least BN_MIN_DECAY, when the config's is slower (0.99 for 800
    steps)."""
    steps = int(doc.get("train_config.num_steps", 0) or 0)
    notes = []
    if steps <= 0:
        return notes
    # Never below 0.9 (a 10-step window): a few-step run (a smoke test) keeps a sane average.
    target = max(BN_MIN_DECAY, int((1 - 1 / (BN_WINDOW * steps)) * 10000) / 10000)
    for path, (name, default) in decays.items():
        decay = doc.get(path)
        decay = default if decay is None else decay
        if decay is None or float(decay) <= target or not float(decay) < 1.0:
            continue  # fast enough, or not a decay (the translator names the field)
        if not doc.set(path, target):
            doc.add(path.rsplit(".", 1)[0], path.rsplit(".", 1)[1], target, after=after)
        notes.append(f"{name} {float(decay):g} -> {target:g}: its moving averages "
                     f"span ~{1 / (1 - float(decay)):.0f} steps, too many for a {steps}-step run (they would keep "
                     f"{float(decay) ** steps:.0%} of their initial values)")
    return notes


def _round(value: float) -> float:
    return float(f"{value:.6g}")


class _LineDiff(difflib.SequenceMatcher):
    """difflib's hunks over Myers' shortest edit script: O((N + M) * D) for D changed lines, where
    SequenceMatcher without autojunk (a config's many identical "}" lines must not count as junk)
    grows worse than quadratically with the file (a 0.4 MB config took 14 s)."""

    def get_opcodes(self):
        a, b = self.a, self.b
        n, m = len(a), len(b)
        v, trace = {1: 0}, []
        for d in range(n + m + 1):
            trace.append(dict(v))
            for k in range(-d, d + 1, 2):
                x = v[k + 1] if k == -d or (k != d and v[k - 1] < v[k + 1]) else v[k - 1] + 1
                y = x - k
                while x < n and y < m and a[x] == b[y]:
                    x, y = x + 1, y + 1
                v[k] = x
                if x >= n and y >= m:
                    return _opcodes(_backtrack(trace, x, y), n, m)
        return [("equal", 0, 0, 0, 0)]


def _backtrack(trace: list[dict], x: int, y: int) -> list[tuple[str, int, int]]:
    """The edit script's steps, first to last: ('=', i, j), ('-', i, j) or ('+', i, j)."""
    steps = []
    for d in range(len(trace) - 1, -1, -1):
        v, k = trace[d], x - y
        prev_k = k + 1 if k == -d or (k != d and v.get(k - 1, -1) < v.get(k + 1, -1)) else k - 1
        prev_x = v.get(prev_k, 0)
        prev_y = prev_x - prev_k
        while x > prev_x and y > prev_y:
            x, y = x - 1, y - 1
            steps.append(("=", x, y))
        if d > 0:
            steps.append(("+", prev_x, prev_y) if x == prev_x else ("-", prev_x, prev_y))
        x, y = prev_x, prev_y
    return steps[::-1]


def _opcodes(steps, n: int, m: int) -> list[tuple[str, int, int, int, int]]:
    """Steps -> difflib opcodes (runs of '=' are equal; a run of '-'/'+' is delete, insert or replace)."""
    ops, i, j, pos = [], 0, 0, 0
    while pos < len(steps):
        if steps[pos][0] == "=":
            start = pos
            while pos < len(steps) and steps[pos][0] == "=":
                pos += 1
            ops.append(("equal", i, i + pos - start, j, j + pos - start))
            i, j = i + pos - start, j + pos - start
            continue
        dels = adds = 0
        while pos < len(steps) and steps[pos][0] != "=":
            dels += steps[pos][0] == "-"
            adds += steps[pos][0] == "+"
            pos += 1
        tag = "replace" if dels and adds else "delete" if dels else "insert"
        ops.append((tag, i, i + dels, j, j + adds))
        i, j = i + dels, j + adds
    return ops or [("equal", 0, n, 0, m)]


def unified_diff(old: str, new: str, old_name: str, new_name: str, context: int = 1) -> str:
    """A unified diff of two versions of a config."""
    a, b = old.splitlines(), new.splitlines()
    lines = [f"--- {old_name}", f"+++ {new_name}"]
    for group in _LineDiff(None, a, b, autojunk=False).get_grouped_opcodes(context):
        i1, i2, j1, j2 = group[0][1], group[-1][2], group[0][3], group[-1][4]
        lines.append(f"@@ -{i1 + 1},{i2 - i1} +{j1 + 1},{j2 - j1} @@")
        for tag, a1, a2, b1, b2 in group:
            if tag == "equal":
                lines += [" " + line for line in a[a1:a2]]
                continue
            lines += ["-" + line for line in a[a1:a2]] + ["+" + line for line in b[b1:b2]]
    return "\n".join(lines)


def write_run_config(opts: ConfigOptions) -> Path:
    template = template_path(opts.model)
    data = data_dir(opts.dataset)
    run = opts.run or data.parent.name
    out = workspace_dir() / run / "pipeline.config"
    original = template.read_text(encoding="utf-8")
    doc = TextProto(original, display_path(template))
    schema.check(doc)  # the template's own mistakes, named by its lines
    defaults = []
    if template.resolve().parent == CONFIGS_DIR.resolve():  # one of ours (a user's own file keeps its values)
        opts, defaults = tasks.of_config_block(base.model_kind(doc)).load("config_defaults")(doc, opts)
    notes = defaults + rewrite(doc, data, opts)
    # Validate what will be written (fields and every path) before writing anything.
    translation = read.translate_any(TextProto(doc.text, display_path(out)))
    params, task = translation.params, translation.task
    # What only the model builder can tell (loads TensorFlow): can it load the weights the config names?
    restores = task.load("check_engine")(base.absolute_paths(task, params), display_path(out), restore=True)
    if restores:
        notes.append(restores)
    memory = memory_advice(task, params)
    if memory:
        notes.append(memory[1] + (": `make train` will refuse it without a GPU" if memory[0] else ""))
    write_text_atomic(out, doc.text)
    diff = unified_diff(original, doc.text, display_path(template), display_path(out))
    changes = diff + "".join(f"\n# note: {note}" for note in notes + translation.ignored) + "\n"
    (out.parent / "pipeline.config.diff").write_text(changes, encoding="utf-8")  # for the run's report

    print(f"read {display_path(template)}; label map {display_path(data / 'label_map.pbtxt')} "
          f"({translation.params.num_classes} classes)")
    print(diff)
    for note in notes + translation.ignored:
        print(f"note: {note}")
    print(f"wrote {display_path(out)}; next: make train RUN={run}")
    return out
