"""`make suggest`: which of a dataset folder's unlabelled images a person should label next, ranked by a run's
export, written to workspace/RUN/suggest/<dataset>-<time>.json.

The unlabelled images are those `make prelabel` drafts (pipelines/annotator/prelabel.py: no annotation in the
dataset's newest export). Strategies:
- `uncertainty`: the images the model is least sure about, by its task's score (pipelines/<task>/suggest.py);
- `diversity`: greedy k-center (Sener & Savarese 2018, core-set) on each image's features: the next image is
  the one farthest from every labelled and already suggested image, so fifty frames of one scene are not all
  picked; an image as close as a copy to one already there is never suggested;
- `hybrid` (the default): the CANDIDATES x COUNT most uncertain images, then k-center among them (uncertainty
  first, then diversity, as Zhdanov 2019 and Citovsky et al. 2021, cluster-margin, do): each suggested image is
  both doubtful and unlike the others, and the list can be cut anywhere;
- `random`: a permutation of the unlabelled images drawn with the seed, the baseline; the model is not run.

Scores and features come from one forward pass of the export's suggest signature per image
(pipelines/model_store.py SUGGEST_SIGNATURE), the pass predicting them once costs; a task whose score takes a
second view (the detector's mirror image) runs it on the SHORTLIST x COUNT images the first pass finds most
doubtful only, and ranks those first by their two-view score, so the cost does not double with the folder.
The labelled images are run too (features only) when the strategy needs them, at most MAX_CENTRES of them,
drawn with the seed. Features are L2-normalized and projected to FEATURE_DIMS dimensions with a fixed random
projection (distances kept within a few percent), so 100,000 images take 51 MB; besides them each image keeps
one score, and the shortlisted ones their detections.
"""

from __future__ import annotations

import functools
import heapq
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import numpy as np

from pipelines.workspace import UserError, dataset_name, display_path, write_text_atomic

STRATEGIES = ("hybrid", "uncertainty", "diversity", "random")
DEFAULT_STRATEGY = "hybrid"
DEFAULT_COUNT = 50
CANDIDATES = 3  # hybrid: k-center among the CANDIDATES x COUNT most uncertain images
SHORTLIST = 2 * CANDIDATES  # the SHORTLIST x COUNT most uncertain images by the first view get the second view
FEATURE_DIMS = 128
MAX_CENTRES = 5000  # labelled images whose features k-center starts from
SAME = 1e-6  # feature distance (of unit vectors) at or below which two images are copies
SUGGEST_DIR = "suggest"


@dataclass
class Suggestion:
    """What one `make suggest` ranked: the file written, the suggested images best first, and notes."""

    path: Path | None
    strategy: str
    seed: int
    unlabelled: int = 0  # images it could suggest
    labelled: int = 0
    ranked: list[dict] = field(default_factory=list)  # {"rank", "file_name", "path", "uncertainty", "distance", "reason"}
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


@functools.lru_cache(maxsize=4)
def _projection(width: int, dims: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((width, dims)).astype(np.float32) / np.sqrt(dims)


def project(features: np.ndarray, dims: int = FEATURE_DIMS) -> np.ndarray:
    """Rows L2-normalized, projected to `dims` dimensions by a fixed Gaussian matrix (the same for every run
    of every model of this width), normalized again; float32."""
    x = np.asarray(features, np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if x.shape[1] > dims:
        x = x @ _projection(x.shape[1], dims)
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x


def _distances(points: np.ndarray, to: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """For each row of `points`, its distance to the nearest row of `to` (inf when `to` is empty). In float64:
    the float32 rounding of |a|^2 - 2ab + |b|^2 is about 1e-7, 3e-4 after the square root, far above SAME."""
    nearest = np.full(len(points), np.inf)
    points = points.astype(np.float64)
    for start in range(0, len(to), chunk):
        block = to[start:start + chunk].astype(np.float64)
        squared = (points ** 2).sum(1)[:, None] - 2 * points @ block.T + (block ** 2).sum(1)[None, :]
        nearest = np.minimum(nearest, np.sqrt(np.clip(squared, 0, None)).min(axis=1))
    return nearest


def k_center(features: np.ndarray, centres: np.ndarray, count: int, first: int) -> tuple[list[int], list[float]]:
    """Greedy k-center: up to `count` rows of `features`, each the farthest from `centres` and the rows picked
    before it; `first` is picked first when there is no centre. Stops early when every row left is a copy
    (distance <= SAME) of a centre or a picked row. Returns (rows, each one's distance when picked)."""
    nearest = _distances(features, centres)
    picks, distances = [], []
    while len(picks) < min(count, len(features)):
        row = first if not picks and not len(centres) else int(np.argmax(nearest))
        if nearest[row] <= SAME:
            break
        picks.append(row)
        distances.append(float(nearest[row]))
        nearest = np.minimum(nearest, _distances(features, features[row:row + 1]))
    return picks, distances


def rank(strategy: str, count: int, seed: int, order: np.ndarray | None, features: np.ndarray | None,
         centres: np.ndarray | None, total: int) -> tuple[list[int], dict[int, float]]:
    """(indices of the suggested images best first, each one's k-center distance where it has one). `order`:
    the images' indices, the most uncertain first (uncertainty and hybrid)."""
    rng = np.random.default_rng(seed)
    if strategy == "random":
        return [int(i) for i in rng.permutation(total)[:count]], {}
    if strategy == "uncertainty":
        return [int(i) for i in order[:count]], {}
    if strategy == "diversity":
        rows, distances = k_center(features, centres, count, first=int(rng.integers(total)))
        return rows, dict(zip(rows, distances))
    pool = order[:max(count, CANDIDATES * count)]  # hybrid: most uncertain first
    rows, distances = k_center(features[pool], centres, count, first=0)
    return [int(pool[r]) for r in rows], {int(pool[r]): d for r, d in zip(rows, distances)}


def annotator_filter(names: list[str]) -> str:
    """The query that makes coco-annotator's dataset page show just these images (module docstring of
    pipelines/annotator/prelabel.py for how it matches names): its page passes the address's query to
    `GET /api/dataset/<id>/data`, which filters the images by each extra argument (a MongoDB query on the
    image's field; `file_name__regex`: the base name matches the pattern)."""
    pattern = "^(" + "|".join(re.escape(n) for n in names) + ")$"
    return "file_name__regex=" + quote(pattern, safe="")


def suggest(run: str, dataset: str, count: int = DEFAULT_COUNT, strategy: str = DEFAULT_STRATEGY, seed: int = 0,
            annotations: str | None = None, log=print) -> Suggestion:
    """Rank DATASET's unlabelled images with RUN's export (module docstring); write the suggested ones."""
    from tqdm import tqdm

    from pipelines.annotator.prelabel import annotated_names, dataset_images, open_dataset, open_export, \
        read_pixels, select_images
    from pipelines.data.sources import newest_export

    if strategy not in STRATEGIES:
        raise UserError(None, f"--strategy {strategy}: one of {', '.join(STRATEGIES)}")
    if count < 1:
        raise UserError(None, f"--count {count} must be 1 or more")
    if strategy == "random":  # the baseline runs no model: a run folder is enough
        from pipelines.runs import run_dir

        folder, export_dir, task = run_dir(run), None, None
        if not folder.is_dir():
            raise UserError(display_path(folder), f"no run here: make config RUN={run} ... first")
    else:
        folder, export_dir, task = open_export(run)
    source, annotations_file = open_dataset(dataset, annotations)
    images, notes = select_images(source, True, annotations_file, drafting=False)
    export = annotations_file or newest_export(source)
    annotated = annotated_names(export) if export else set()
    labelled = [p for p in dataset_images(source) if p.name in annotated]
    result = Suggestion(path=None, strategy=strategy, seed=seed, labelled=len(labelled), notes=notes)
    started = time.perf_counter()
    uncertainty = order = features = centres = None
    reasons: dict[int, str] = {}
    if strategy != "random" and images:
        from pipelines.model_store import FEATURES_OUTPUT, export_identity, read_metadata

        metadata = read_metadata(export_dir) or {}
        serve, part = _suggest_signature(export_dir, task, metadata, labelled_boxes(export) if export else {})
        if getattr(part, "weights", None):
            labels = metadata.get("label_map") or {}
            notes.append("boxes weighted by class, from the labelled boxes per class: " + ", ".join(
                f"{labels.get(str(k), k)} x{w:.2f}" for k, w in sorted(part.weights.items())))
        needs_centres = strategy in ("diversity", "hybrid")
        rng = np.random.default_rng(seed)
        centre_images = [labelled[i] for i in sorted(rng.permutation(len(labelled))[:MAX_CENTRES])] \
            if needs_centres else []
        ties = np.random.default_rng(seed).permutation(len(images))  # equal scores: an order drawn with the seed
        shortlist_size = SHORTLIST * count if part.mirrored and strategy in ("uncertainty", "hybrid") else 0
        model = ":".join(export_identity(export_dir))
        log(f"ranking {len(images)} unlabelled image(s) of {display_path(source)} with {task.name} model {model}"
            + (f" ({len(centre_images)} labelled one(s) run for their features)" if centre_images else ""))
        kept, scores, tie, vectors, unreadable = [], [], [], [], []
        shortlist: list[tuple] = []  # a heap of (score, -tie, row, view): the shortlist_size most uncertain so far
        for n, path in enumerate(tqdm(images + centre_images, desc="suggest", unit="image", mininterval=2.0)):
            try:
                pixels = read_pixels(path)
            except Exception as e:  # noqa: BLE001  (any decoder error: the file is listed, the others go on)
                if n < len(images):
                    unreadable.append(f"{path.relative_to(source).as_posix()} ({type(e).__name__})")
                continue
            outputs = serve(pixels)
            vectors.append(project(outputs[FEATURES_OUTPUT])[0])  # compact from the start
            if n < len(images):
                view = part.view(outputs)
                score, reasons[len(kept)] = part(view)
                if shortlist_size:
                    entry = (score, -int(ties[n]), len(kept), view)
                    (heapq.heappush if len(shortlist) < shortlist_size else heapq.heappushpop)(shortlist, entry)
                kept.append(path)
                scores.append(score)
                tie.append(ties[n])
        if unreadable:
            notes.append(f"{len(unreadable)} file(s) not readable as images: not ranked: {', '.join(unreadable[:5])}"
                         f"{' ...' if len(unreadable) > 5 else ''}")
        second = np.zeros(len(kept), bool)
        if shortlist:
            log(f"second view (the mirror image) of the {len(shortlist)} most uncertain")
            for _, _, row, view in tqdm(sorted(shortlist, reverse=True), desc="suggest: mirror images", unit="image",
                                        mininterval=2.0):
                mirror = np.ascontiguousarray(read_pixels(kept[row])[:, ::-1])
                scores[row], reasons[row] = part(view, part.view(serve(mirror), mirror=True))
                second[row] = True
        all_features = np.stack(vectors) if vectors else np.zeros((0, FEATURE_DIMS), np.float32)
        images, uncertainty = kept, np.asarray(scores, np.float64)
        features, centres = all_features[:len(kept)], all_features[len(kept):]
        # The images with both views first (the shortlist), each group by score; ties in the drawn order.
        order = np.lexsort((np.asarray(tie), -uncertainty, ~second))
    result.unlabelled = len(images)
    if not images:
        result.seconds = time.perf_counter() - started
        return result
    rows, distances = rank(strategy, count, seed, order, features, centres, len(images))
    if strategy in ("diversity", "hybrid") and len(rows) < min(count, len(images)):
        notes.append(f"{min(count, len(images)) - len(rows)} fewer than asked: the "
                     f"{'' if strategy == 'diversity' else 'most uncertain '}images left have the features of labelled "
                     "or suggested ones (copies, or a model too little trained to tell them apart)")
    for place, row in enumerate(rows, start=1):
        path = images[row]
        why = []
        if uncertainty is not None and strategy in ("uncertainty", "hybrid"):
            why.append(f"uncertainty {uncertainty[row]:.2f}: {reasons[row]}")
        if row in distances:
            nearest = "labelled or earlier suggested" if len(centres) else "earlier suggested"
            why.append(f"{distances[row]:.2f} from the nearest {nearest} image" if np.isfinite(distances[row])
                       else "first pick")
        if strategy == "random":
            why.append(f"drawn at random (seed {seed})")
        result.ranked.append({
            "rank": place, "file_name": path.name, "path": path.relative_to(source).as_posix(),
            "uncertainty": None if uncertainty is None else round(float(uncertainty[row]), 4),
            "distance": round(distances[row], 4) if row in distances and np.isfinite(distances[row]) else None,
            "reason": "; ".join(why)})
    result.seconds = time.perf_counter() - started
    name = dataset_name(source)
    document = {"run": run, "dataset": name, "dataset_folder": str(source), "strategy": strategy, "seed": seed,
                "count": count, "unlabelled": result.unlabelled, "labelled": result.labelled,
                "annotations": str(export) if export else None,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": round(result.seconds, 2),
                "coco_annotator_query": annotator_filter([r["file_name"] for r in result.ranked]),
                "notes": notes, "images": result.ranked}
    target = folder / SUGGEST_DIR / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    write_text_atomic(target, json.dumps(document, indent=1) + "\n")
    result.path = target
    return result


def labelled_boxes(export: Path) -> dict[str, int]:
    """{category name: annotations of it} in a COCO file (the labelled set the task's uncertainty weighs by)."""
    from pipelines.data.coco import read_json

    data = read_json(export)
    names = {c.get("id"): str(c.get("name")) for c in data.get("categories") or [] if isinstance(c, dict)}
    counts: dict[str, int] = {}
    for a in data.get("annotations") or []:
        if isinstance(a, dict) and a.get("category_id") in names:
            counts[names[a["category_id"]]] = counts.get(names[a["category_id"]], 0) + 1
    return counts


def _suggest_signature(export_dir: Path, task, metadata: dict, class_counts: dict[str, int]):
    """(serve(uint8 image [H, W, 3]) -> numpy outputs of the export's suggest signature, the task's
    uncertainty part, given the labelled boxes per class); UserError for an export written before the
    signature existed."""
    import tensorflow as tf

    from pipelines.model_store import FEATURES_OUTPUT, INPUT_NAME, SUGGEST_SIGNATURE

    signatures = tf.saved_model.load(str(export_dir / "saved_model")).signatures
    part = task.load("uncertainty")(metadata, class_counts)
    signature = signatures.get(SUGGEST_SIGNATURE)
    produced = set(signature.structured_outputs) if signature is not None else set()
    missing = [key for key in (*part.outputs, FEATURES_OUTPUT) if key not in produced]
    if missing:
        run = export_dir.parent.name
        raise UserError(display_path(export_dir / "saved_model"),
                        f"no '{SUGGEST_SIGNATURE}' signature with {', '.join(missing)} (exported before make suggest "
                        f"existed?): make export RUN={run} again")

    def serve(pixels: np.ndarray) -> dict:  # one image
        return {k: v.numpy() for k, v in signature(**{INPUT_NAME: tf.constant(pixels[None])}).items()}
    return serve, part


def summary_lines(result: Suggestion, run: str, dataset: str) -> list[str]:
    """What `make suggest` prints: notes, the ranked images with their reasons, the file, what to do next."""
    lines = [f"note: {n}" for n in result.notes]
    if not result.unlabelled:
        return [*lines, "no unlabelled image to suggest: nothing written"]
    if not result.ranked:
        return [*lines, "nothing suggested: nothing written"]
    lines.append(f"suggested {len(result.ranked)} of {result.unlabelled} unlabelled image(s) ({result.labelled} "
                 f"labelled), strategy {result.strategy}, seed {result.seed}, in {result.seconds:.1f} s:")
    width = max(len(r["path"]) for r in result.ranked)
    lines += [f"  {r['rank']:>4}  {r['path']:<{width}}  {r['reason']}" for r in result.ranked]
    lines.append(f"wrote {display_path(result.path)}")
    lines.append(f"next: make prelabel RUN={run} DATASET={dataset} SUGGESTED={display_path(result.path)} "
                 "(drafts exactly these images)")
    url, dataset_id = os.environ.get("ANNOTATOR_URL", "").rstrip("/"), os.environ.get("ANNOTATOR_DATASET", "")
    query = annotator_filter([r["file_name"] for r in result.ranked])
    if url and dataset_id.isdigit():
        lines.append(f"in coco-annotator, these images alone: {url}/#/dataset/{dataset_id}?{query}")
    else:
        lines.append("in coco-annotator, these images alone: the dataset's page, .../#/dataset/ID?QUERY with the file's "
                     "coco_annotator_query (ANNOTATOR_URL and ANNOTATOR_DATASET=ID print the whole address)")
    return lines
