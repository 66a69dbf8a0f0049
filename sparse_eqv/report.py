"""Sparsity report of a fine-tuning run: where the deltas are non-zero, and how large.

    tables = report_tables(run_dir)              # the numbers, as a dict
    figures = write_report(run_dir, out_dir)     # report.json, report.txt, PNG heatmaps

The delta is what the run changed in the params:

    str           the thresholded STR delta the run saved (RUN_DIR/delta/),
                  over the targeted leaves; the base is model/ minus it
    full, elora   model/ minus the base model directory named in run.json
                  ("model"), over the leaves the method trains (ELoRA: the
                  targeted leaves; full: all)
    scratch       refused: a model trained from a fresh initialisation has
                  no base to compare against

Every entry is labelled by `sparse_eqv.models.paths.describe_leaves` (layer,
module, e3nn path, output l, element) and counted in each table:

    totals        params, targeted entries, non-zeros, layer sparsity
                  (zeros among targeted entries) and total sparsity (entries
                  left unchanged among all params), as `sparse_eqv.sparsity`
    layers        embedding, layer_<t>, readout
    modules       the leaf's parent module, "params" for top-level leaves
                  (sparsity.json's "layers")
    leaves        one e3nn instruction each (sparsity.json's "paths")
    paths         e3nn path label, e.g. "1o x 1o -> 0e"; "(none)" for
                  entries of no path (embeddings, hidden MLP layers)
    layer_path    layer x path
    l             order of the output irrep the entry feeds
    elements      element-indexed axes only; "(none)" for the other entries
    element_l     element x l

Each cell holds: size (targeted entries), nonzero, density (nonzero / size),
mean_abs_delta (mean |dW| over the non-zeros), max_abs_delta, and rel_l2
(||dW|| / ||W_base|| over the cell's entries).
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from sparse_eqv.atomic_write import atomic_file
from sparse_eqv.checkpoint import load_model, pytree_checkpointer
from sparse_eqv.curves import LOG_FILE, write_curves
from sparse_eqv.errors import CheckpointError, SparseEqvError
from sparse_eqv.finetune.targets import leaf_path
from sparse_eqv.models.paths import describe_leaves, describe_unknown

NONE = "(none)"
FIGURES = ("layer_path.png", "element_l.png")


# ---------------------------------------------------------------------------
# Reading a run
# ---------------------------------------------------------------------------


Arrays = dict[str, np.ndarray]


def run_delta(run_dir: str | Path) -> tuple[dict[str, Any], dict[str, Any], Arrays, Arrays, int]:
    """(run info, model config, {leaf path: delta}, {leaf path: base value}, n_params) of a run.

    Raises:
        CheckpointError for a directory that is not a finished run, a
        missing delta or base model; SparseEqvError for a scratch run.
    """
    from flax import traverse_util

    run_dir = Path(run_dir)
    if not (run_dir / "run.json").exists():
        raise CheckpointError(f"{run_dir}: not a fine-tuning run directory (no run.json)")
    info = json.loads((run_dir / "run.json").read_text())
    if not (run_dir / "model" / "config.json").exists():
        raise CheckpointError(f"{run_dir}: the run has not finished an epoch yet (no model/)")
    config, variables = load_model(run_dir / "model")
    flat = traverse_util.flatten_dict(variables["params"])
    params = {leaf_path(k): np.asarray(v, np.float64) for k, v in flat.items()}
    n_params = sum(v.size for v in params.values())
    method = info.get("method")
    if method == "str":
        location = run_dir / "delta" / "delta"
        if not location.exists():
            raise CheckpointError(f"{run_dir}: STR run without its delta ({location} is missing)")
        tree = pytree_checkpointer().restore(location.absolute())
        delta = {leaf_path(k): np.asarray(v, np.float64) for k, v in traverse_util.flatten_dict(tree).items()}
        base = {path: params[path] - d for path, d in delta.items()}
        return info, config, delta, base, n_params
    if method in ("full", "elora"):
        base_dir = Path(info["model"])
        if not (base_dir / "config.json").exists():
            raise CheckpointError(f"{run_dir}: its base model directory {base_dir} (run.json \"model\") is missing")
        _, base_variables = load_model(base_dir)
        base_all = {leaf_path(k): np.asarray(v, np.float64)
                    for k, v in traverse_util.flatten_dict(base_variables["params"]).items()}
        targeted = info.get("targeted_leaves") or [p for p in params if p in base_all]
        delta = {path: params[path] - base_all[path] for path in targeted}
        return info, config, delta, {path: base_all[path] for path in targeted}, n_params
    raise SparseEqvError(
        f"{run_dir}: method {method!r}: a report compares fine-tuned weights with a base model "
        "(str, full, elora); a from-scratch run has none"
    )


# ---------------------------------------------------------------------------
# Counting
# ---------------------------------------------------------------------------


class _Cell:
    """Running sums of one table cell."""

    __slots__ = ("size", "nonzero", "abs_sum", "sq_sum", "base_sq_sum", "max_abs")

    def __init__(self):
        self.size = self.nonzero = 0
        self.abs_sum = self.sq_sum = self.base_sq_sum = self.max_abs = 0.0

    def add(self, delta: np.ndarray, base: np.ndarray) -> None:
        self.size += int(delta.size)
        self.nonzero += int(np.count_nonzero(delta))
        magnitude = np.abs(delta)
        self.abs_sum += float(magnitude.sum())
        self.sq_sum += float(np.sum(delta**2))
        self.base_sq_sum += float(np.sum(base**2))
        if magnitude.size:
            self.max_abs = max(self.max_abs, float(magnitude.max()))

    def stats(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "nonzero": self.nonzero,
            "density": self.nonzero / self.size if self.size else 0.0,
            "mean_abs_delta": self.abs_sum / self.nonzero if self.nonzero else None,
            "max_abs_delta": self.max_abs,
            "rel_l2": math.sqrt(self.sq_sum / self.base_sq_sum) if self.base_sq_sum > 0 else None,
        }


def _cells(info, kinds: tuple[str, ...]) -> Iterator[tuple[tuple, tuple]]:
    """(labels, index) of every block of a leaf that carries one label per kind."""
    for combo in itertools.product(*(info.segments(k) for k in kinds)):
        index = [slice(None)] * len(info.shape)
        bounds: dict[int, tuple[int, int]] = {}
        empty = False
        for axis, start, stop, _ in combo:
            if axis is None:
                continue
            lo, hi = bounds.get(axis, (0, info.shape[axis]))
            lo, hi = max(lo, start), min(hi, stop)
            empty |= lo >= hi
            bounds[axis] = (lo, hi)
            index[axis] = slice(lo, hi)
        if not empty:
            yield tuple(NONE if label is None else str(label) for *_, label in combo), tuple(index)


def _path_order(label: str) -> tuple:
    """Columns in e3nn order: by output irrep, convolution paths first, then
    one-hot tensor products, linears, symmetric contractions; "(none)" last."""
    if "->" not in label:
        return (99, 0, 9, label)
    source, out = (s.strip() for s in label.split("->"))
    l, p = (int(out[:-1]), out[-1]) if out[:-1].isdigit() else (98, out)
    if source.startswith("nu="):
        rank = 3
    elif " x " in source:
        rank = 1 if source.split(" x ")[1] in ("Z", "emb") else 0
    else:
        rank = 2
    return (l, p != "e", rank, label)


def _l_order(label: str) -> tuple:
    return (0, int(label)) if label.isdigit() else (1, 0)


def report_tables(run_dir: str | Path) -> dict[str, Any]:
    """The report's numbers (see the module docstring); JSON-serialisable."""
    run_dir = Path(run_dir)
    info, config, delta, base, n_params = run_delta(run_dir)
    described = describe_leaves(config)
    order = [p for p in described if p in delta] + sorted(p for p in delta if p not in described)
    tables: dict[str, dict] = {name: {} for name in ("layers", "modules", "leaves", "paths", "l", "elements")}
    layer_path: dict[str, dict[str, _Cell]] = {}
    element_l: dict[str, dict[str, _Cell]] = {}
    total = _Cell()
    leaf_meta = {}
    for path in order:
        d, w = delta[path], base[path]
        leaf = described.get(path) or describe_unknown(path, d.shape)
        if tuple(leaf.shape) != d.shape:
            raise CheckpointError(f"{run_dir}: leaf {path} has shape {d.shape}, the model's config says {leaf.shape}")
        total.add(d, w)
        module = path.rsplit("/", 1)[0]  # the leaf's parent, as sparsity.layer_view groups
        leaf_meta[path] = {"layer": leaf.layer, "module": module, "shape": list(d.shape)}
        for table, key in (("layers", leaf.layer), ("modules", module), ("leaves", path)):
            tables[table].setdefault(key, _Cell()).add(d, w)
        for (label,), index in _cells(leaf, ("path",)):
            tables["paths"].setdefault(label, _Cell()).add(d[index], w[index])
            layer_path.setdefault(leaf.layer, {}).setdefault(label, _Cell()).add(d[index], w[index])
        for (label,), index in _cells(leaf, ("l",)):
            tables["l"].setdefault(label, _Cell()).add(d[index], w[index])
        for (label,), index in _cells(leaf, ("element",)):
            tables["elements"].setdefault(label, _Cell()).add(d[index], w[index])
        if leaf.element is not None:
            for (element, l), index in _cells(leaf, ("element", "l")):
                element_l.setdefault(element, {}).setdefault(l, _Cell()).add(d[index], w[index])

    symbols = {s: i for i, s in enumerate(_symbols(config))}
    out: dict[str, Any] = {
        "run": str(run_dir.absolute()),
        "method": info.get("method"),
        "model": config.get("model"),
        "source": (config.get("source") or {}).get("file"),
        "totals": {
            "n_params": n_params,
            "n_targeted": total.size,
            "n_delta_nonzero": total.nonzero,
            "layer_sparsity": 1.0 - total.nonzero / total.size if total.size else 0.0,
            "total_sparsity": 1.0 - total.nonzero / n_params if n_params else 0.0,
            **{k: v for k, v in total.stats().items() if k not in ("size", "nonzero", "density")},
        },
    }
    for name in ("layers", "modules", "leaves"):
        out[name] = {key: cell.stats() for key, cell in tables[name].items()}
    for path, meta in leaf_meta.items():
        out["leaves"][path].update(meta)
    out["paths"] = {k: tables["paths"][k].stats() for k in sorted(tables["paths"], key=_path_order)}
    out["layer_path"] = {
        layer: {k: row[k].stats() for k in sorted(row, key=_path_order)} for layer, row in layer_path.items()
    }
    out["l"] = {k: tables["l"][k].stats() for k in sorted(tables["l"], key=_l_order)}
    element_order = sorted(tables["elements"], key=lambda s: symbols.get(s, len(symbols)))
    out["elements"] = {k: tables["elements"][k].stats() for k in element_order}
    out["element_l"] = {
        s: {l: element_l[s][l].stats() for l in sorted(element_l[s], key=_l_order)}
        for s in element_order if s in element_l
    }
    sparsity_file = run_dir / "sparsity.json"
    if sparsity_file.exists():
        out["thresholds"] = json.loads(sparsity_file.read_text()).get("thresholds")
    return out


def _symbols(config: dict[str, Any]) -> list[str]:
    import ase.data

    return [ase.data.chemical_symbols[int(z)] for z in config.get("atomic_numbers", [])]


# ---------------------------------------------------------------------------
# Terminal tables
# ---------------------------------------------------------------------------


def _num(value: float | None, fmt: str = ".2e") -> str:
    return "-" if value is None else format(value, fmt)


def _table(title: str, rows: dict[str, dict[str, Any]], key_name: str) -> str:
    width = max([len(key_name)] + [len(str(k)) for k in rows])
    head = (f"{key_name:<{width}}  {'size':>9} {'non-zero':>9} {'density':>8} "
            f"{'mean|dW|':>9} {'max|dW|':>9} {'|dW|/|W|':>9}")
    lines = [title, head, "-" * len(head)]
    for key, s in rows.items():
        lines.append(
            f"{str(key):<{width}}  {s['size']:>9d} {s['nonzero']:>9d} {s['density']:>8.1%} "
            f"{_num(s['mean_abs_delta']):>9} {_num(s['max_abs_delta']):>9} {_num(s['rel_l2']):>9}"
        )
    return "\n".join(lines)


def format_tables(tables: dict[str, Any]) -> str:
    """The report as plain-text tables (what `sparse-eqv report` prints)."""
    t = tables["totals"]
    parts = [
        f"sparsity report: {tables['run']} ({tables['method']}, {tables['model']} {tables['source'] or ''})".rstrip(),
        f"{t['n_delta_nonzero']:,} non-zero delta entries of {t['n_targeted']:,} targeted "
        f"(layer sparsity {t['layer_sparsity']:.2%}); {t['n_params']:,} params in all "
        f"(total sparsity {t['total_sparsity']:.2%}); mean |dW| {_num(t['mean_abs_delta'])}, "
        f"||dW||/||W|| {_num(t['rel_l2'])}",
        _table("per layer", tables["layers"], "layer"),
        _table("per module", tables["modules"], "module"),
        _table("per e3nn path (l_in x l_filter -> l_out)", tables["paths"], "path"),
        _table("per output l", tables["l"], "l"),
    ]
    if tables["element_l"]:
        parts.append(_table("per element (element-indexed weights)", tables["elements"], "element"))
        ls = sorted({l for row in tables["element_l"].values() for l in row}, key=_l_order)
        width = max(len(s) for s in tables["element_l"])
        lines = ["element x l: non-zero / size", f"{'':<{width}}  " + " ".join(f"{'l=' + l:>13}" for l in ls)]
        for symbol, row in tables["element_l"].items():
            cells = [f"{row[l]['nonzero']:>6d}/{row[l]['size']:<6d}" if l in row else f"{'-':>13}" for l in ls]
            lines.append(f"{symbol:<{width}}  " + " ".join(cells))
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------


def _heatmap_figure(title: str, rows: list[str], columns: list[str], cells: dict[str, dict[str, dict]], xlabel: str):
    """Two panels: density of non-zeros, and mean |dW| over the non-zeros (log scale)."""
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    density = np.full((len(rows), len(columns)), np.nan)
    magnitude = np.full_like(density, np.nan)
    for i, r in enumerate(rows):
        for j, c in enumerate(columns):
            cell = cells.get(r, {}).get(c)
            if cell is not None and cell["size"]:
                density[i, j] = cell["density"]
                if cell["mean_abs_delta"]:
                    magnitude[i, j] = cell["mean_abs_delta"]
    width = min(40.0, 2.5 + 0.45 * len(columns))
    height = min(30.0, 1.8 + 0.35 * len(rows))
    stacked = len(columns) > 2 * len(rows)  # wide tables: one panel above the other
    size = (width, 2 * height + 1.0) if stacked else (2 * width, height)
    figure = Figure(figsize=size, layout="constrained")
    axes = figure.subplots(2, 1) if stacked else figure.subplots(1, 2)
    finite = magnitude[np.isfinite(magnitude)]
    norm = LogNorm(vmin=finite.min(), vmax=max(finite.max(), finite.min() * 1.0001)) if finite.size else None
    panels = ((density, "fraction of entries non-zero", dict(vmin=0.0, vmax=1.0, cmap="viridis")),
              (magnitude, "mean |dW| over non-zeros", dict(norm=norm, cmap="magma")))
    for ax, (values, label, style) in zip(axes, panels):
        ax.set_facecolor("0.85")  # cells with no targeted entries
        image = ax.imshow(np.ma.masked_invalid(values), aspect="auto", interpolation="nearest", **style)
        ax.set_xticks(range(len(columns)), columns, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(rows)), rows, fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_title(label, fontsize=10)
        figure.colorbar(image, ax=ax, shrink=0.8)
        if len(rows) * len(columns) <= 400 and values is density:
            for i, j in zip(*np.nonzero(np.isfinite(values))):
                ax.text(j, i, f"{values[i, j]:.0%}", ha="center", va="center", fontsize=6,
                        color="white" if values[i, j] < 0.5 else "black")
    figure.suptitle(title)
    return figure


def _save(figure, path: Path) -> Path:
    with atomic_file(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    return path


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write report.json, report.txt and the heatmaps into `out_dir`
    (default RUN_DIR/report), each file atomically; returns the PNG paths:
    layer_path.png (layer x e3nn path) and, where the model has
    element-indexed weights among the targeted ones, element_l.png; and the
    learning curves of the run's log.csv, curves.png (`sparse_eqv.curves`)."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "report"
    tables = report_tables(run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_file(out_dir / "report.json") as tmp:
        tmp.write_text(json.dumps(tables, indent=1))
    with atomic_file(out_dir / "report.txt") as tmp:
        tmp.write_text(format_tables(tables))

    figures = []
    name = f"{run_dir.name} ({tables['method']})"
    layers = [layer for layer, row in tables["layer_path"].items() if any(p != NONE for p in row)]
    paths = [p for p in tables["paths"] if p != NONE]
    if layers and paths:
        figure = _heatmap_figure(f"{name}: delta by layer and e3nn path", layers, paths, tables["layer_path"],
                                 "e3nn path (l_in x l_filter -> l_out)")
        figures.append(_save(figure, out_dir / FIGURES[0]))
    if tables["element_l"]:
        ls = sorted({l for row in tables["element_l"].values() for l in row}, key=_l_order)
        figure = _heatmap_figure(f"{name}: element-indexed weights by element and output l",
                                 list(tables["element_l"]), ls, tables["element_l"], "output l")
        figures.append(_save(figure, out_dir / FIGURES[1]))
    if (run_dir / LOG_FILE).exists():
        figures.append(write_curves([run_dir], out_dir / "curves.png", title=f"{name}: learning curves"))
    return figures
