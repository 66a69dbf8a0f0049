"""Fine-tuning end to end on a small SevenNet-architecture model and real
SSE-PBE frames (Li10GeP2S12, tests/data/sse-pbe): run directory and CLI,
merge, equivariance of the fine-tuned model, data parallelism, kill and
resume, baselines, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import ase.io
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from sparse_eqv.checkpoint import load_for_inference, load_model, save_model
from sparse_eqv.cli import main
from sparse_eqv.data.graph import batch_graphs, frame_to_graph
from sparse_eqv.data.readers import read_frames
from sparse_eqv.finetune.dense import Full
from sparse_eqv.finetune.loop import Trainer, TrainConfig, make_graphs
from sparse_eqv.finetune.state import TrainState, restore_state
from sparse_eqv.finetune.run import MethodOptions, fresh_params, make_method
from sparse_eqv.models import build_model
from sparse_eqv.potential import energy_forces_stress
from sparse_eqv.testing import kill_at_marker, subprocess_env, tiny_sevenn_config, write_extxyz

TINY_CONFIG = tiny_sevenn_config()  # SevenNet architecture, l <= 1, 4 channels, two layers
EPOCHS, BATCH = 2, 4


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, real_frames_dir):
    """A tiny model directory (random weights, per-type shift) and SSE-PBE splits as extxyz."""
    root = tmp_path_factory.mktemp("finetune")
    module = build_model(TINY_CONFIG)
    variables = module.init(
        jax.random.PRNGKey(0), jnp.ones((3, 3)), jnp.zeros(2, jnp.int32), jnp.array([0, 1, 0]), jnp.array([1, 0, 1])
    )
    variables = jax.tree.map(np.asarray, variables)
    variables["constants"]["shift"] = np.array([-1.0, -5.0, -4.0, -4.5])  # far from PBE: the E0 fit matters
    save_model(root / "model", TINY_CONFIG, variables)
    frames = read_frames(real_frames_dir / "sse-pbe" / "LiGePS-init.system")
    write_extxyz(root / "train.xyz", frames[:8])
    write_extxyz(root / "valid.xyz", frames[18:20])  # frames 300-301 of the full file
    return root


def finetune_args(workdir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "finetune", str(workdir / "model"), "--train", str(workdir / "train.xyz"), "--valid", str(workdir / "valid.xyz"),
        "--method", "str", "--epochs", str(EPOCHS), "--batch-size", str(BATCH), "--lr", "0.01",
        "--threshold-decay", "0.3", "--ema-decay", "0.5", "--checkpoint-every", "1", "--seed", "3", "--quiet",
        "-o", str(out), *extra,
    ]


@pytest.fixture(scope="module")
def str_run(workdir):
    """An uninterrupted STR run (with EMA) through the CLI, in a subprocess."""
    out = workdir / "run_str"
    done = subprocess.run([sys.executable, "-m", "sparse_eqv.cli", *finetune_args(workdir, out)],
                          env=subprocess_env(workdir), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def test_run_directory_metrics_and_log(str_run):
    for name in ("run.json", "log.csv", "metrics.json", "sparsity.json", "model/config.json", "delta/leaves.json",
                 "checkpoints/last/state.json", "checkpoints/best/state.json"):
        assert (str_run / name).exists(), name
    metrics = json.loads((str_run / "metrics.json").read_text())
    assert metrics["epochs"] == EPOCHS and metrics["steps"] == EPOCHS * 2
    assert metrics["compiles"] == {"train": 1, "eval": 1}  # all SSE frames share one padding budget
    assert 0.0 <= metrics["sparsity"]["layer_sparsity"] <= 1.0
    assert metrics["sparsity"]["total_sparsity"] >= metrics["sparsity"]["layer_sparsity"] * (
        metrics["sparsity"]["n_targeted"] / metrics["sparsity"]["n_params"])
    assert metrics["valid"]["forces_mae"] > 0 and metrics["valid"]["n_frames"] == 2
    rows = (str_run / "log.csv").read_text().splitlines()
    assert len(rows) == 1 + EPOCHS and "valid_forces_mae" in rows[0] and "threshold_median" in rows[0]
    lines = (str_run / "train.log").read_text().splitlines()
    assert [line.split(" step")[0] for line in lines] == [f"epoch {e}/{EPOCHS}" for e in range(1, EPOCHS + 1)]
    assert "layer sparsity" in lines[-1] and "thresholds" in lines[-1]
    run = json.loads((str_run / "run.json").read_text())
    assert run["elements"] == [3, 15, 16, 32]
    assert run["e0s"] == "refit" and set(run["e0_refit_eV"]) == set(run["e0_shift_eV"]) and "params/layer_0/linear_1/w[0,0]" in run["targeted_leaves"]
    # the E0 fit moved the per-type shift of the elements present (Li, P, S, Ge)
    config, variables = load_for_inference(str_run)
    assert not np.allclose(variables["constants"]["shift"], [-1.0, -5.0, -4.0, -4.5])


@pytest.fixture(scope="module")
def predict_fn():
    """One jitted prediction of the tiny architecture, shared by the tests below."""
    module = build_model(TINY_CONFIG)
    return jax.jit(lambda variables, graph: energy_forces_stress(module.apply, variables, graph))


def valid_graph(frames):
    return batch_graphs([frame_to_graph(f, TINY_CONFIG["atomic_numbers"], TINY_CONFIG["r_max"]) for f in frames])


def test_merged_model_predicts_training_time_effective_params(workdir, str_run, predict_fn):
    """model/ holds base + pruned delta; it predicts what STR's effective params predict."""
    config, base = load_model(workdir / "model")
    _, merged = load_for_inference(str_run)
    module = build_model(config)
    method = make_method(MethodOptions(method="str"), base["params"], config)
    trainer = Trainer(module, merged["constants"], method, base["params"], TrainConfig(batch_size=BATCH, ema_decay=0.5))
    state = restore_state(str_run / "checkpoints" / "best", trainer.run_state(trainer.initial_state(), 0))
    graph = valid_graph(read_frames(workdir / "valid.xyz"))
    effective = {"params": method.effective(state.ema), "constants": merged["constants"]}
    a, b = predict_fn(effective, graph), predict_fn(merged, graph)
    for key in ("energy", "forces"):
        scale = np.max(np.abs(a[key]))
        assert np.max(np.abs(a[key] - b[key])) <= 1e-12 * scale
    # the delta patch is exactly the difference to the base, and sparse where reported
    delta_leaves = json.loads((str_run / "delta" / "leaves.json").read_text())
    base_flat = traverse_util.flatten_dict(base["params"])
    merged_flat = traverse_util.flatten_dict(merged["params"])
    changed = {"/".join(("params",) + k) for k in base_flat if not np.array_equal(base_flat[k], merged_flat[k])}
    assert changed <= set(delta_leaves)


def test_fine_tuned_model_is_equivariant(workdir, str_run, predict_fn):
    """Rotating periodic frames (positions and cell) rotates forces and stress, keeps the energies."""
    _, variables = load_for_inference(str_run)
    frames = read_frames(workdir / "valid.xyz")
    rot = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0]
    rot *= np.sign(np.linalg.det(rot))
    rotated = [type(f)(f.numbers, f.positions @ rot.T, f.cell @ rot.T, f.pbc, source="rotated") for f in frames]
    a, b = (jax.tree.map(np.asarray, predict_fn(variables, valid_graph(fs))) for fs in (frames, rotated))
    n = sum(f.num_atoms for f in frames)
    assert np.max(np.abs(b["energy"][:2] - a["energy"][:2])) <= 1e-10 * np.max(np.abs(a["energy"][:2]))
    assert np.max(np.abs(b["forces"][:n] - a["forces"][:n] @ rot.T)) <= 1e-10 * np.max(np.abs(a["forces"][:n]))
    s_rot = np.einsum("ij,gjk,lk->gil", rot, a["stress"][:2], rot)
    assert np.max(np.abs(b["stress"][:2] - s_rot)) <= 1e-10 * np.max(np.abs(a["stress"][:2]))


def test_evaluate_and_predict_accept_run_and_model_dirs(workdir, str_run, tmp_path, capsys):
    out = tmp_path / "zero.json"
    assert main(["evaluate", str(workdir / "model"), "--data", str(workdir / "valid.xyz"), "--json", str(out), "--quiet"]) == 0
    zero = json.loads(out.read_text())
    assert not zero["finetuned"]
    # raw energies of the tiny model sit eV/atom away from PBE; the E0 fit removes that
    assert zero["e0_fit"]["energy_mae"] < zero["raw"]["energy_mae"]
    assert zero["e0_fit"]["forces_mae"] == zero["raw"]["forces_mae"]
    assert main(["evaluate", str(str_run), "--data", str(workdir / "valid.xyz"), "--json", str(out), "--quiet"]) == 0
    tuned = json.loads(out.read_text())
    metrics = json.loads((str_run / "metrics.json").read_text())
    assert tuned["finetuned"]
    np.testing.assert_allclose(tuned["raw"]["forces_mae"], metrics["valid"]["forces_mae"], rtol=1e-9)
    assert main(["predict", str(str_run), "--data", str(workdir / "valid.xyz"), "-o", str(tmp_path / "p.xyz"), "--quiet"]) == 0
    assert len(ase.io.read(tmp_path / "p.xyz", index=":")) == 2


KILL_DRIVER = """
import os, sys, time
from sparse_eqv.cli import _enable_x64
_enable_x64()
from sparse_eqv.finetune import loop

kill_after = int(sys.argv[1])
original = loop.save_state

def save_then_wait(directory, state):
    original(directory, state)
    if directory.name == "last" and state.step == kill_after:
        open(sys.argv[2], "w").write(str(state.step))
        time.sleep(600)  # the test kills us here, mid-epoch, after a checkpoint

loop.save_state = save_then_wait
from sparse_eqv.cli import main
sys.exit(main(sys.argv[3:]))
"""


def test_e0_refit_leaves_no_per_element_offset_on_the_training_frames(workdir, str_run, tmp_path):
    """--e0s refit (the default): the run's model has no least-squares per-element energy offset left
    on its training frames, and the refit moved the E0s (the deltas shifted the energies)."""
    out = tmp_path / "train_eval.json"
    assert main(["evaluate", str(str_run), "--data", str(workdir / "train.xyz"), "--json", str(out), "--quiet"]) == 0
    left = json.loads(out.read_text())["e0_shift_eV"]
    assert all(abs(shift) < 1e-9 for shift in left.values()), left
    refit = json.loads((str_run / "run.json").read_text())["e0_refit_eV"]
    assert max(abs(s) for s in refit.values()) > 1e-6


def test_kill_and_resume_equals_uninterrupted(workdir, str_run, tmp_path):
    """SIGKILL a real training process mid-epoch, resume it: same params as the uninterrupted run."""
    out = tmp_path / "run_killed"
    marker = tmp_path / "checkpointed"
    driver = tmp_path / "driver.py"
    driver.write_text(KILL_DRIVER)
    env = subprocess_env(workdir)
    process = subprocess.Popen([sys.executable, str(driver), "3", str(marker), *finetune_args(workdir, out)], env=env)
    kill_at_marker(process, marker, 600, lambda: "training process ended before the kill")
    assert not (out / "metrics.json").exists()
    state = json.loads((out / "checkpoints" / "last" / "state.json").read_text())
    assert (state["step"], state["epoch"], state["batch"]) == (3, 1, 1)  # mid-epoch 2
    resumed = subprocess.run(
        [sys.executable, "-m", "sparse_eqv.cli", *finetune_args(workdir, out, "--resume")],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = traverse_util.flatten_dict(load_for_inference(str_run)[1])
    b = traverse_util.flatten_dict(load_for_inference(out)[1])
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(b[key], a[key], err_msg="/".join(key))
    log_a = (str_run / "log.csv").read_text().splitlines()
    log_b = (out / "log.csv").read_text().splitlines()
    assert [row.split(",")[:11] for row in log_a] == [row.split(",")[:11] for row in log_b]


DATA_PARALLEL_DRIVER = """
import json, sys
import jax, numpy as np
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_default_matmul_precision", "highest")
from sparse_eqv.checkpoint import load_model
from sparse_eqv.data.readers import read_frames
from sparse_eqv.finetune.loop import Trainer, TrainConfig, make_graphs
from sparse_eqv.finetune.run import MethodOptions, make_method
from sparse_eqv.models import build_model

config, variables = load_model(sys.argv[1])
frames = read_frames(sys.argv[2])
graphs = make_graphs(frames, config["atomic_numbers"], config["r_max"])
module = build_model(config)
method = make_method(MethodOptions(method="str"), variables["params"], config)
result = {}
for n in (1, 2):
    trainer = Trainer(module, variables["constants"], method, variables["params"],
                      TrainConfig(batch_size=4, lr=0.01, threshold_decay=0.3, ema_decay=0.5), n_devices=n)
    state = trainer.initial_state()
    losses = [float(trainer.train_step(state, trainer.stack(graphs, idx)[0])[0]) for idx in ([0, 1, 2, 3], [4, 5, 6, 7], [3, 5, 0])]
    run = trainer.run_state(state, 0)
    result[n] = {"losses": losses, "leaves": [np.asarray(x).tolist() for x in jax.tree.leaves((run.tree, run.ema))],
                 "devices": len(jax.devices())}
print(json.dumps(result))
"""


def test_two_devices_match_one_device(workdir, tmp_path):
    """Data parallel over 2 (forced host) devices gives the 1-device params (and EMA) after 3 steps."""
    driver = tmp_path / "dp.py"
    driver.write_text(DATA_PARALLEL_DRIVER)
    env = subprocess_env(workdir, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    done = subprocess.run([sys.executable, str(driver), str(workdir / "model"), str(workdir / "train.xyz")],
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    one, two = result["1"], result["2"]
    assert two["devices"] == 2
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-12)
    changed = 0
    for a, b, in zip(one["leaves"], two["leaves"]):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(b, a, rtol=1e-11, atol=1e-13)
        changed += a.size
    assert changed > 0


def test_baselines_elora_and_scratch(workdir):
    """ELoRA starts at the base and one step moves the adapted leaves only; scratch starts from a
    fresh initialisation of the same tree and trains every leaf (the `full` method)."""
    config, variables = load_model(workdir / "model")
    module = build_model(config)
    frames = read_frames(workdir / "train.xyz")[:4]
    graphs = make_graphs(frames, config["atomic_numbers"], config["r_max"])
    base = variables["params"]
    fresh = fresh_params(module, graphs[0], seed=7)
    assert jax.tree.structure(fresh) == jax.tree.structure(base)
    assert not np.array_equal(fresh["layer_0"]["linear_1"]["w[0,0]"], base["layer_0"]["linear_1"]["w[0,0]"])
    scratch = Full(name="scratch")
    assert set(jax.tree.leaves(scratch.labels(scratch.init(fresh, None)))) == {"dense"}

    method = make_method(MethodOptions(method="elora", rank=2, alpha=2.0), base, config)
    trainer = Trainer(module, variables["constants"], method, base, TrainConfig(batch_size=4, lr=1e-2))
    state = trainer.initial_state()
    before = jax.tree.leaves(method.effective(trainer.run_state(state, 0).tree))
    assert all(np.array_equal(a, b) for a, b in zip(before, jax.tree.leaves(base)))
    loss = trainer.train_step(state, trainer.stack(graphs, [0, 1, 2, 3])[0])
    assert np.all(np.isfinite(loss))
    after = traverse_util.flatten_dict(method.effective(trainer.run_state(state, 0).tree))
    base_flat = traverse_util.flatten_dict(base)
    moved = {k for k in base_flat if not np.array_equal(after[k], base_flat[k])}
    assert moved == set(method.adapted(base))


@pytest.mark.parametrize("case", ["empty", "element", "forces_shape", "nan_energy"])
def test_bad_input_is_one_clear_error_and_no_run_dir(workdir, tmp_path, capsys, case):
    frames = read_frames(workdir / "train.xyz")[:2]
    good = frames[0]
    if case == "empty":
        bad = tmp_path / "empty.xyz"
        bad.write_text("")
        expected = str(bad)
    elif case == "element":
        numbers = good.numbers.copy()
        numbers[5] = 29  # Cu
        bad = write_extxyz(tmp_path / "cu.xyz", [frames[1], type(good)(numbers, good.positions, good.cell, good.pbc,
                                                                    energy=good.energy, forces=good.forces)])
        expected = f"{bad}:1: element Cu"
    elif case == "forces_shape":
        record = {
            "structure": {"lattice": {"matrix": good.cell.tolist()},
                          "sites": [{"species": [{"element": "Li"}], "xyz": list(map(float, p))} for p in good.positions[:4]]},
            "outputs": {"energy": -10.0, "forces": np.zeros((3, 3)).tolist()},
        }
        bad = tmp_path / "frames.json"
        bad.write_text(json.dumps([record, record]))
        expected = f"{bad}:0: forces have shape (3, 3), expected (4, 3)"
    else:
        nan = type(good)(good.numbers, good.positions, good.cell, good.pbc, energy=float("nan"), forces=good.forces)
        bad = write_extxyz(tmp_path / "nan.xyz", [frames[1], nan])
        expected = f"{bad}:1: energy is not finite"
    out = tmp_path / "run"
    args = finetune_args(workdir, out)
    args[args.index("--train") + 1] = str(bad)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and expected in err, err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run")]


def test_schedules_and_early_stopping(workdir):
    """Host-side epoch logic: plateau lowers the lr, early stopping stops, cosine decays to 0."""
    config, variables = load_model(workdir / "model")
    module = build_model(config)
    method = Full()
    cfg = TrainConfig(plateau_patience=1, plateau_factor=0.5, patience=2)
    trainer = Trainer(module, variables["constants"], method, variables["params"], cfg)
    run = TrainState()
    improved = [trainer.end_epoch(run, {"loss": loss}) for loss in (3.0, 2.0, 2.5, 2.5)]
    assert improved == [True, True, False, False]
    assert run.best_epoch == 1 and run.lr_scale == 0.5 and run.stopped
    assert [row["valid_loss"] for row in run.history] == [3.0, 2.0, 2.5, 2.5]
    cosine = Trainer(module, variables["constants"], method, variables["params"], TrainConfig(schedule="cosine"))
    cosine.total_steps = 10
    scales = [cosine.lr_scale(TrainState(step=step)) for step in (0, 5, 10)]
    np.testing.assert_allclose(scales, [1.0, 0.5, 0.0], atol=1e-15)
