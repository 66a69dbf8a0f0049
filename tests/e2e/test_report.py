"""Sparsity report: its counts against sparsity.json and the exported delta
patch, its segment layout against the Flax modules and sevenn's torch
modules, and the `sparse-eqv report` command.

The STR run directories here are written by `finetune.run.write_best` (what
`finetune` calls for its best epoch) from an STR state with a fixed seed,
without training: the report reads only run.json, model/, delta/ and
sparsity.json, and compiling a train step would add a minute on shared CPUs.
`test_finetuned_run_report_through_the_cli` (slow) trains for real.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from sparse_eqv.checkpoint import load_model, save_model
from sparse_eqv.cli import main
from sparse_eqv.errors import SparseEqvError
from sparse_eqv.finetune.run import MethodOptions, make_method, write_best
from sparse_eqv.finetune.targets import describe, leaf_path
from sparse_eqv.models import build_model
from sparse_eqv.models.paths import Split, describe_leaves
from sparse_eqv.report import report_tables, write_report
from sparse_eqv.testing import tiny_sevenn_checkpoint_config, tiny_sevenn_config, write_extxyz, write_sevenn_checkpoint
from weights_convert.delta_patch import read_patch

SPECIES = ["Li", "P", "S", "Ge"]  # the SSE-PBE elements

TINY_SEVENN = tiny_sevenn_checkpoint_config()

# A MACE with a density first block (non-residual skip_tp, density_fn), a
# residual second block, correlation 2 then 3 and a non-linear last readout.
TINY_MACE = {
    "model": "mace", "mace_class": "ScaleShiftMACE", "atomic_numbers": [3, 15, 16, 32], "r_max": 4.0,
    "num_bessel": 4, "num_polynomial_cutoff": 5, "max_ell": 2,
    "interaction_first": "RealAgnosticDensityInteractionBlock", "interaction": "RealAgnosticResidualInteractionBlock",
    "num_interactions": 2, "hidden_irreps": "4x0e+4x1o", "MLP_irreps": "4x0e", "correlation": [2, 3], "gate": "silu",
    "radial_MLP": [8], "pair_repulsion": False, "distance_transform": "None", "apply_cutoff": True,
    "use_last_readout_only": False, "keep_last_layer_irreps": False, "heads": ["Default"], "head": "Default",
    "product_couplings": [  # [layer][output irrep][nu - 1][U column]: multisets of l's
        [[[[[0]], [[0]]], [[[0, 0]], [[1, 1]], [[2, 2]]]],
         [[[[1]]], [[[0, 1]], [[1, 2]], [[0, 1], [1, 2]], []]]],
        [[[[[0]], [[0]]], [[[0, 0]], [[1, 1]], [[2, 2]]], [[[0, 0, 0]], [[0, 1, 1]], [[1, 1, 2]], [[0, 2, 2]], [[2, 2, 2]]]]],
    ], "dtype": "float64",
}


def abstract_variables(config: dict):
    """jax.eval_shape of the module's init: the variables' shapes and dtypes."""
    module = build_model(config)
    return jax.eval_shape(
        module.init, jax.random.PRNGKey(0), jnp.ones((3, 3)), jnp.zeros(2, jnp.int32), jnp.array([0, 1, 0]),
        jnp.array([1, 0, 1]),
    )


def shapes_of(config: dict) -> dict[str, tuple[int, ...]]:
    """{leaf path: shape} of the module's params."""
    params = abstract_variables(config)["params"]
    return {leaf_path(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(params).items()}


def assert_layout(config: dict) -> dict:
    """describe_leaves names exactly the module's leaves, with their shapes, and every split tiles its axis."""
    infos = describe_leaves(config)
    shapes = shapes_of(config)
    assert set(infos) == set(shapes)
    for path, shape in shapes.items():
        info = infos[path]
        assert info.shape == shape, path
        for kind in ("path", "l", "element"):
            split = getattr(info, kind)
            if isinstance(split, Split):
                ends = [0] + [stop for _, stop, _ in split.segments]
                assert [start for start, _, _ in split.segments] == ends[:-1], (path, kind)
                assert ends[-1] == shape[split.axis], (path, kind)
    return infos


def expand(split: Split) -> list:
    """Per-index labels along a split's axis."""
    return [label for start, stop, label in split.segments for _ in range(start, stop)]


def str_run(root: Path, model_dir: Path, targets: tuple[str, ...], seed: int = 0) -> Path:
    """An STR run directory (run.json, model/, delta/, sparsity.json) as `finetune` leaves it,
    from the STR state at initialisation (threshold 0.01 against deltas ~ N(0, 0.01^2):
    about two thirds of the entries are exact zeros)."""
    config, variables = load_model(model_dir)
    method = make_method(MethodOptions(method="str", targets=targets, init_threshold=0.01), variables["params"], config)
    # STR's initial state {"base", "delta", "score"}, drawn with numpy (compiling
    # jax.random for every leaf shape would dominate this file's runtime)
    layout = jax.eval_shape(method.init, variables["params"], jax.random.PRNGKey(seed))
    rng = np.random.default_rng(seed)
    tree = {
        "base": variables["params"],
        "delta": jax.tree.map(lambda a: method.delta_std * rng.normal(size=a.shape), layout["delta"]),
        "score": jax.tree.map(lambda a: np.full(a.shape, np.log(0.01 / 0.99)), layout["score"]),
    }
    run = root / "run"
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps(
        {"model": str(model_dir.absolute()), "method": "str", "targeted_leaves": describe(method.targets)}))
    write_best(run, config, variables["constants"], variables["params"], method, tree, variables["params"])
    return run


@pytest.fixture(scope="module")
def sevenn_model(tmp_path_factory):
    """The tiny SevenNet checkpoint, converted: (model dir, config)."""
    from weights_convert.convert import convert

    root = tmp_path_factory.mktemp("report")
    checkpoint = write_sevenn_checkpoint(root / "tiny.pth", TINY_SEVENN)
    config, variables = convert(checkpoint)
    save_model(root / "model", config, variables)
    return root / "model", config


@pytest.fixture(scope="module")
def sevenn_run(sevenn_model, tmp_path_factory):
    model_dir, _ = sevenn_model
    return str_run(tmp_path_factory.mktemp("run"), model_dir, ("default", "embedding"))


def patch_counts(patch: Path, config: dict, infos: dict) -> dict:
    """Counts straight from the exported patch: per leaf (non-zeros, sum |delta|), and per
    path / l / element label, by unravelling each patch position inside its leaf."""
    _, deltas = read_patch(patch)
    by_key = {d.key: d for d in deltas}
    leaves, groups = {}, defaultdict(Counter)
    seen = 0
    for path, (key, start, stop, *_) in config["torch_names"].items():
        if not path.startswith("params/") or key not in by_key:
            continue
        delta = by_key[key]
        inside = (delta.indices >= start) & (delta.indices < stop)
        seen += int(inside.sum())
        leaves[path] = (int(inside.sum()), float(np.abs(delta.values[inside]).sum()))
        info = infos[path]
        coords = np.unravel_index(delta.indices[inside] - start, info.shape)
        for kind in ("path", "l", "element"):
            for axis, lo, hi, label in info.segments(kind):
                hit = np.ones(coords[0].size, bool) if axis is None else (coords[axis] >= lo) & (coords[axis] < hi)
                groups[kind]["(none)" if label is None else str(label)] += int(hit.sum())
    assert seen == sum(d.indices.size for d in deltas)  # every patch entry belongs to one leaf
    return {"leaves": leaves, **groups}


def test_report_counts_equal_sparsity_json_and_the_exported_patch(sevenn_model, sevenn_run, tmp_path):
    from weights_convert.export import export_run

    _, config = sevenn_model
    tables = report_tables(sevenn_run)
    spars = json.loads((sevenn_run / "sparsity.json").read_text())
    totals = tables["totals"]
    for key in ("n_params", "n_targeted", "n_delta_nonzero"):
        assert totals[key] == spars["summary"][key], key
    for key in ("layer_sparsity", "total_sparsity"):
        assert totals[key] == pytest.approx(spars["summary"][key], abs=1e-15), key
    assert 0.4 < totals["layer_sparsity"] < 0.9 and totals["n_targeted"] < totals["n_params"]
    for mine, theirs in (("modules", "layers"), ("leaves", "paths")):
        assert {k: (v["size"], v["nonzero"]) for k, v in tables[mine].items()} == {
            k: (v["size"], v["nonzero"]) for k, v in spars[theirs].items()}

    patch = tmp_path / "run.delta"
    summary = export_run(sevenn_run, patch, delta_only=True)
    assert summary["nnz"] == totals["n_delta_nonzero"]
    counted = patch_counts(patch, config, describe_leaves(config))
    for path, row in tables["leaves"].items():
        nonzero, abs_sum = counted["leaves"].get(path, (0, 0.0))
        assert nonzero == row["nonzero"], path
        if nonzero:
            assert abs_sum == pytest.approx(row["mean_abs_delta"] * row["nonzero"], rel=1e-9), path
    for kind, table in (("path", "paths"), ("l", "l"), ("element", "elements")):
        assert {k: v["nonzero"] for k, v in tables[table].items() if v["nonzero"]} == {
            k: n for k, n in counted[kind].items() if n}, kind


def test_views_partition_the_targeted_entries(sevenn_run):
    tables = report_tables(sevenn_run)
    totals = tables["totals"]
    for table in ("layers", "modules", "leaves", "paths", "l", "elements"):
        assert sum(v["size"] for v in tables[table].values()) == totals["n_targeted"], table
        assert sum(v["nonzero"] for v in tables[table].values()) == totals["n_delta_nonzero"], table
    for layer, row in tables["layer_path"].items():
        assert sum(v["nonzero"] for v in row.values()) == tables["layers"][layer]["nonzero"]
        assert sum(v["size"] for v in row.values()) == tables["layers"][layer]["size"]
    for element, row in tables["element_l"].items():
        assert sum(v["size"] for v in row.values()) == tables["elements"][element]["size"]
    # the one-hot tensor products and the embedding table: 4 elements, output l 0 and 1
    assert list(tables["element_l"]) == SPECIES and set(tables["element_l"]["Li"]) == {"0", "1"}
    assert {"0e x 0e -> 0e", "1o x 1o -> 0e", "1o x 1o -> 1e", "0e x Z -> 0e", "1o x Z -> 1o", "0e -> 0e",
            "(none)"} <= set(tables["paths"])


def test_sevennet0_segments_match_the_model_and_sevenn():
    """SevenNet-0's real layout: leaves and shapes as the Flax module makes them; the rows
    of each post-convolution linear and the columns of each radial MLP's last layer
    labelled by the convolution instruction sevenn's own TensorProduct puts there."""
    from weights_convert.convert import convert
    from weights_convert.sevenn import _runtime_model, load_checkpoint

    config, _ = convert("7net-0")
    infos = assert_layout(config)
    assert infos["params/layer_1/linear_2/w[1,1]"].shape == (384, 64)
    path = Path(config["source"]["path"])
    _, model, _ = _runtime_model(load_checkpoint(path), path)
    checked = 0
    for t in range(len(config["layers"])):
        tp = model._modules[f"{t}_convolution"].convolution
        producer = {ins.i_out: ins for ins in tp.instructions}

        def label(ins):
            return f"{tp.irreps_in1[ins.i_in1].ir} x {tp.irreps_in2[ins.i_in2].ir} -> {tp.irreps_out[ins.i_out].ir}"

        columns = [label(ins) for ins in tp.instructions for _ in range(int(np.prod(ins.path_shape)))]
        radial = infos[f"params/layer_{t}/radial/layer{len(config['layers'][t]['radial']['hidden']) - 1}"]
        assert expand(radial.path) == columns
        rows_of_chunk, k = [], 0  # the linear's input chunks are runs of sevenn's sorted path outputs
        linear = model._modules[f"{t}_self_interaction_2"].linear
        for mul, _ in linear.irreps_in:
            rows = []
            while len(rows) < mul:
                rows += [label(producer[k])] * tp.irreps_out[k].mul
                k += 1
            assert len(rows) == mul
            rows_of_chunk.append(rows)
        for ins in linear.instructions:
            leaf = infos[f"params/layer_{t}/linear_2/w[{ins.i_in},{ins.i_out}]"]
            assert expand(leaf.path) == rows_of_chunk[ins.i_in]
            assert leaf.l == linear.irreps_out[ins.i_out].ir.l
            checked += 1
    assert checked == sum("/linear_2/" in p for p in infos) == 13


def test_nequip_and_mace_layouts():
    """NequIP-style options (embedding node attributes, unsorted instructions, MLP readout) and MACE."""

    nequip = tiny_sevenn_config()
    nequip.update(model="nequip", embedding={"features": 4, "scale": 1.0, "node_attrs": "embedding"},
                  readout={"dims": [4, 3, 1], "kind": "nequip", "act": "silu"})
    for layer in nequip["layers"]:
        layer.update(sort_instructions=False, self_connection="tensor_product")
    infos = assert_layout(nequip)
    tp = infos["params/layer_0/self_connection/w[0,0,0]"]
    assert tp.path == "0e x emb -> 0e" and tp.element is None and tp.shape == (4, 4, 6)

    infos = assert_layout(TINY_MACE)
    linear = infos["params/interactions_1/linear/w[1,0] 4x0e,4x0e"]
    assert linear.path == "1o x 1o -> 0e" and linear.l == 0
    contraction = infos["params/products_1/symmetric_contractions/w[0e,nu=3]"]
    assert contraction.shape == (4, 5, 4) and expand(contraction.element) == SPECIES


def test_mace_str_run_report(tmp_path):
    """A MACE run (random weights, STR delta on every role): totals as sparsity.json, and the
    symmetric-contraction and skip_tp element axes in the element x l table and figure."""
    abstract = abstract_variables(TINY_MACE)
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda a: rng.normal(size=a.shape), abstract["params"])
    constants = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract["constants"])
    save_model(tmp_path / "model", TINY_MACE, {"params": params, "constants": constants})
    run = str_run(tmp_path, tmp_path / "model", ("all",))
    tables = report_tables(run)
    spars = json.loads((run / "sparsity.json").read_text())["summary"]
    assert tables["totals"]["n_delta_nonzero"] == spars["n_delta_nonzero"]
    assert tables["totals"]["n_targeted"] == spars["n_targeted"]
    assert set(tables["element_l"]["Ge"]) == {"0", "1", "2"}
    assert {"nu=3 -> 0e", "1o x Z -> 1o", "1o x 1o -> 0e", "1o x 2e -> 1o"} <= set(tables["paths"])
    assert [p.name for p in write_report(run, tmp_path / "out")] == ["layer_path.png", "element_l.png"]


def test_cli_writes_tables_and_figures(sevenn_run, tmp_path, capsys):
    assert main(["report", str(sevenn_run)]) == 0
    out = capsys.readouterr().out
    assert "per e3nn path" in out and "element x l" in out
    for name in ("report.json", "report.txt", "layer_path.png", "element_l.png"):
        assert (sevenn_run / "report" / name).stat().st_size > 0, name
    assert (sevenn_run / "report" / "layer_path.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["report", str(sevenn_run), "-o", str(tmp_path / "elsewhere")]) == 0
    assert (tmp_path / "elsewhere" / "element_l.png").exists()
    assert main(["report", str(tmp_path)]) == 2
    assert "no run.json" in capsys.readouterr().err


def test_full_run_reports_changed_entries_and_scratch_is_refused(sevenn_model, tmp_path):
    model_dir, config = sevenn_model
    _, variables = load_model(model_dir)
    flat = traverse_util.flatten_dict(jax.tree.map(np.array, variables["params"]))
    changed = 0
    for key in sorted(flat)[::3]:
        flat[key].reshape(-1)[:2] += 0.125
        changed += min(2, flat[key].size)
    run = tmp_path / "full"
    new = {"params": traverse_util.unflatten_dict(flat), "constants": variables["constants"]}
    save_model(run / "model", config, new)
    (run / "run.json").write_text(json.dumps({"model": str(model_dir), "method": "full", "targeted_leaves": []}))
    totals = report_tables(run)["totals"]
    assert totals["n_delta_nonzero"] == changed and totals["n_targeted"] == totals["n_params"]
    assert totals["max_abs_delta"] == pytest.approx(0.125)
    (run / "run.json").write_text(json.dumps({"model": str(model_dir), "method": "scratch"}))
    with pytest.raises(SparseEqvError, match="from-scratch run"):
        report_tables(run)


@pytest.mark.slow
def test_finetuned_run_report_through_the_cli(sevenn_model, real_frames_dir, tmp_path):
    """finetune (STR, one epoch on SSE-PBE frames) -> report -> export --delta-only, through the CLI."""

    from sparse_eqv.data.readers import read_frames

    model_dir, _ = sevenn_model
    frames = read_frames(real_frames_dir / "sse-pbe" / "LiGePS-init.system")
    train = write_extxyz(tmp_path / "train.xyz", frames[:2])
    valid = write_extxyz(tmp_path / "valid.xyz", frames[18:19])  # frame 300 of the full file
    run = tmp_path / "run"
    assert main(["finetune", str(model_dir), "--train", str(train), "--valid", str(valid), "--method", "str",
                 "--targets", "all", "embedding", "--init-threshold", "0.01", "--epochs", "1", "--batch-size", "2",
                 "--lr", "0.01", "--e0s", "keep", "--quiet", "-o", str(run)]) == 0
    assert main(["report", str(run)]) == 0
    assert main(["export", str(run), "--delta-only", "-o", str(tmp_path / "run.delta")]) == 0
    totals = json.loads((run / "report" / "report.json").read_text())["totals"]
    summary = json.loads((run / "sparsity.json").read_text())["summary"]
    for key in ("n_params", "n_targeted", "n_delta_nonzero"):
        assert totals[key] == summary[key], key
    _, deltas = read_patch(tmp_path / "run.delta")
    assert sum(d.indices.size for d in deltas) == totals["n_delta_nonzero"] > 0
    assert (run / "report" / "layer_path.png").exists() and (run / "report" / "element_l.png").exists()


def test_report_draws_the_learning_curves_of_a_logged_run(sevenn_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(sevenn_run, run)
    (run / "log.csv").write_text("epoch,step,train_loss,valid_forces_mae,layer_sparsity\n1,10,2.0,50.0,0.3\n2,20,1.0,40.0,0.5\n")
    figures = write_report(run, tmp_path / "out")
    assert [p.name for p in figures][-1] == "curves.png"
    assert figures[-1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
