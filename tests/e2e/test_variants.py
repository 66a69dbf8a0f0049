"""Several STR variants in one jitted run (`sparse_eqv.finetune.loop.Trainer`, K > 1) on the tiny
SevenNet-architecture model and real SSE-PBE frames: a vmapped run over lambda_tau
(shared batches), killed mid-epoch and resumed, and one over seeds (own split, order,
E0 fit) equal the separate `finetune` runs to 1e-10; the vmapped step equals single
steps and holds an inactive (early-stopped) variant; bad lists are one clear error."""

from __future__ import annotations

import csv
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from sparse_eqv.checkpoint import load_model, pytree_checkpointer, save_model
from sparse_eqv.cli import main
from sparse_eqv.data.readers import read_frames
from sparse_eqv.errors import SparseEqvError
from sparse_eqv.finetune.loop import Trainer, TrainConfig, Variant, make_graphs
from sparse_eqv.finetune.state import TrainState, restore_state
from sparse_eqv.finetune.run import MethodOptions, make_method, make_variants, parse_values, variant_names
from sparse_eqv.finetune.str import STR
from sparse_eqv.models import build_model
from sparse_eqv.testing import kill_at_marker, subprocess_env, tiny_sevenn_config, write_extxyz

TINY_CONFIG = tiny_sevenn_config()

DECAYS, SEED, OTHER_SEED = ("0.01", "0.05", "0.3"), 3, 5
RTOL = 1e-10


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, real_frames_dir):
    """A tiny model (random weights, per-type shift far from PBE) and 10 + 2 SSE-PBE frames."""
    root = tmp_path_factory.mktemp("variants")
    module = build_model(TINY_CONFIG)
    variables = jax.jit(module.init)(  # one compilation instead of many eager ones
        jax.random.PRNGKey(0), jnp.ones((3, 3)), jnp.zeros(2, jnp.int32), jnp.array([0, 1, 0]), jnp.array([1, 0, 1])
    )
    variables = jax.tree.map(np.asarray, variables)
    variables["constants"]["shift"] = np.array([-1.0, -5.0, -4.0, -4.5])
    save_model(root / "model", TINY_CONFIG, variables)
    frames = read_frames(real_frames_dir / "sse-pbe" / "LiGePS-init.system")
    write_extxyz(root / "train.xyz", frames[:10])
    write_extxyz(root / "test.xyz", frames[18:20])  # frames 300-301 of the full file
    return root


def args_for(workdir: Path, out: Path, decays: str, *seed: str) -> list[str]:
    """CLI arguments: 8 training / 2 validation frames split off by the seed, 2 epochs of 2 steps."""
    return [
        "finetune", str(workdir / "model"), "--train", str(workdir / "train.xyz"), "--valid-fraction", "0.2",
        "--test", str(workdir / "test.xyz"), "--method", "str", "--epochs", "2", "--batch-size", "4",
        "--lr", "0.01", "--threshold-decay", decays, *(seed or ("--seed", str(SEED))), "--ema-decay", "0.5",
        "--checkpoint-every", "1", "--quiet", "-o", str(out),
    ]


# One process runs every training (a persistent compilation cache shares what compiles alike);
# the last, the lambda variant run, waits after its step-3 checkpoint to be killed.
DRIVER = """
import json, sys, time
from sparse_eqv.cli import _enable_x64, main
_enable_x64()
from sparse_eqv.finetune import loop

original = loop.save_state

def save_then_wait(directory, state):
    original(directory, state)
    if directory.name == "last" and directory.parent.parent.name == "lambda" and state.runs[0].step == 3:
        open(sys.argv[2], "w").write("3")
        time.sleep(900)  # the test kills us here, mid-epoch, after a checkpoint

loop.save_state = save_then_wait
for args in json.loads(sys.argv[1]):
    print("exit", main(args), flush=True)
"""


@pytest.fixture(scope="module")
def runs(workdir):
    """The separate runs, a K=2 run over seeds, and a K=3 run over lambda_tau killed
    (SIGKILL) in epoch 2 and resumed with --resume."""
    out = workdir / "runs"
    jobs = [args_for(workdir, out / f"separate_{d}_{s}", d, "--seed", str(s))
            for d, s in [(d, SEED) for d in DECAYS] + [("0.3", OTHER_SEED)]]
    jobs.append(args_for(workdir, out / "seeds", "0.3", "--seeds", f"{SEED},{OTHER_SEED}"))
    jobs.append(args_for(workdir, out / "lambda", ",".join(DECAYS)))
    driver, marker, log = workdir / "driver.py", workdir / "checkpointed", workdir / "driver.log"
    driver.write_text(DRIVER)
    env = subprocess_env(workdir)
    with log.open("w") as stdout:
        process = subprocess.Popen([sys.executable, str(driver), json.dumps(jobs), str(marker)], env=env,
                                   stdout=stdout, stderr=subprocess.STDOUT)
        kill_at_marker(process, marker, 1800, lambda: log.read_text()[-3000:])
    assert log.read_text().count("exit 0") == len(jobs) - 1, log.read_text()[-3000:]
    killed = {"summary": (out / "lambda" / "summary.json").exists(),
              "runs": json.loads((out / "lambda" / "checkpoints" / "last" / "state.json").read_text())["runs"]}
    resumed = subprocess.run([sys.executable, "-m", "sparse_eqv.cli", *jobs[-1], "--resume"],
                             env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return {"dir": out, "killed": killed, "stdout": log.read_text() + resumed.stdout}


def assert_close(a, b, what: str) -> None:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, what
    scale = max(float(np.max(np.abs(a))), 1e-300) if a.size else 1.0
    assert float(np.max(np.abs(a - b), initial=0.0)) <= RTOL * scale, what


def compare_tree(a, b, what: str) -> int:
    """Leaf by leaf to RTOL; returns the number of entries compared."""
    fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    assert fa.keys() == fb.keys(), what
    for key in fa:
        assert_close(fa[key], fb[key], f"{what} {'/'.join(map(str, key))}")
    return sum(np.size(x) for x in fa.values())


TIMES = {"wall", "wall_s", "epoch_s", "train_wall_s", "s_per_epoch", "session_wall_s"}


def compare_numbers(a, b, what: str) -> None:
    """JSON-like values: numbers to RTOL, the rest equal; wall times are skipped."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for key in a.keys() - TIMES:
            compare_numbers(a[key], b[key], f"{what}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            compare_numbers(x, y, f"{what}[{i}]")
    elif isinstance(a, (int, float)) and not isinstance(a, bool):
        assert_close(a, b, what)
    else:
        assert a == b, what


def template_state(workdir: Path) -> TrainState:
    """An ordinary run's state of the runs' method and model: the structure their checkpoints restore into."""
    config, variables = load_model(workdir / "model")
    method = make_method(MethodOptions(method="str"), variables["params"], config)
    trainer = Trainer(build_model(config), variables["constants"], method, variables["params"], TrainConfig(ema_decay=0.5))
    return trainer.run_state(trainer.initial_state(), 0)


def compare_states(a, b, what: str) -> None:
    """Two TrainStates: trainable tree, EMA and optimiser state to RTOL, counters and log rows."""
    for name in ("tree", "ema", "opt_state"):
        leaves_a, leaves_b = jax.tree.leaves(getattr(a, name)), jax.tree.leaves(getattr(b, name))
        assert len(leaves_a) == len(leaves_b) > 0, what
        for i, (x, y) in enumerate(zip(leaves_a, leaves_b)):
            assert_close(x, y, f"{what} {name} leaf {i}")
    compare_numbers(a.scalars(), b.scalars(), f"{what} scalars")


def compare_variant(workdir: Path, variant: Path, separate: Path) -> None:
    """A variant directory against the separate run's: merged model, delta patch, best
    state (deltas, scores, EMA, optimiser), metrics, sparsity, run.json and log."""
    assert compare_tree(load_model(separate / "model")[1], load_model(variant / "model")[1], "model") > 300
    delta_a, delta_b = (pytree_checkpointer().restore((d / "delta" / "delta").absolute()) for d in (separate, variant))
    compare_tree(delta_a, delta_b, "delta")
    template = template_state(workdir)
    compare_states(restore_state(separate / "checkpoints" / "best", template),
                   restore_state(variant / "checkpoints" / "best", template), "best state")
    for name in ("metrics.json", "sparsity.json", "run.json"):
        a, b = (json.loads((d / name).read_text()) for d in (separate, variant))
        assert b.pop("variant_of", str(variant.parent.absolute())) == str(variant.parent.absolute())
        compare_numbers(a, b, name)
    rows_a, rows_b = (list(csv.DictReader((d / "log.csv").open())) for d in (separate, variant))
    assert len(rows_a) == len(rows_b) == 2
    for ra, rb in zip(rows_a, rows_b):
        assert ra.keys() == rb.keys()
        for key in ra.keys() - TIMES:
            if ra[key] == "":  # a metric without labels (stress)
                assert rb[key] == "", key
            else:
                assert_close(float(ra[key]), float(rb[key]), f"log.csv {key}")


def final_states(workdir: Path, run: Path, variants: list[Variant]) -> list:
    """Each variant's TrainState from the shared checkpoints/last."""
    config, variables = load_model(workdir / "model")
    method = make_method(MethodOptions(method="str"), variables["params"], config)
    trainer = Trainer(build_model(config), variables["constants"], method, variables["params"], TrainConfig(ema_decay=0.5),
                      variants)
    state = trainer.restore(run / "checkpoints" / "last")
    return [trainer.run_state(state, k) for k in range(len(variants))]


def check_variant_run(workdir: Path, run: Path, variants: list[Variant], separates: list[Path]) -> list:
    names = variant_names(variants)
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == sorted(names + ["checkpoints"])
    template = template_state(workdir)
    finals = final_states(workdir, run, variants)
    for name, final, separate in zip(names, finals, separates):
        compare_variant(workdir, run / name, separate)
        compare_states(restore_state(separate / "checkpoints" / "last", template), final, f"{name} final state")
    summary = json.loads((run / "summary.json").read_text())
    assert list(summary["variants"]) == names
    assert summary["compiles"] == {"train": 1, "eval": 1}
    overview = json.loads((run / "variants.json").read_text())
    assert [v["name"] for v in overview["variants"]] == names
    return finals


def test_lambda_variants_equal_separate_runs(workdir, runs):
    """K=3 lambda_tau variants sharing their batches, killed in epoch 2 and resumed
    == three separate uninterrupted `finetune` runs."""
    assert not runs["killed"]["summary"]
    assert [(r["step"], r["epoch"], r["batch"]) for r in runs["killed"]["runs"]] == [(3, 1, 1)] * 3  # mid-epoch 2
    out = runs["dir"]
    variants = make_variants([float(d) for d in DECAYS], [SEED])
    finals = check_variant_run(workdir, out / "lambda", variants, [out / f"separate_{d}_{SEED}" for d in DECAYS])
    assert json.loads((out / "lambda" / "variants.json").read_text())["shared_batches"]
    # the decay made a difference: the variants' scores differ from each other
    scores = [np.concatenate([np.ravel(s) for s in jax.tree.leaves(f.tree["score"])]) for f in finals]
    assert np.min(np.abs(scores[0] - scores[2])) > 1e-6
    for name in variant_names(variants) + ["seed_3", "seed_5"]:  # the CLI's summary tables
        assert name in runs["stdout"]


def test_seed_variants_equal_separate_runs(workdir, runs):
    """K=2 seed variants (own split, batch order, delta init, E0 fit) == two separate runs."""
    out = runs["dir"]
    variants = make_variants([0.3], [SEED, OTHER_SEED])
    check_variant_run(workdir, out / "seeds", variants, [out / f"separate_0.3_{s}" for s in (SEED, OTHER_SEED)])
    assert not json.loads((out / "seeds" / "variants.json").read_text())["shared_batches"]
    shifts = [json.loads((out / "seeds" / f"seed_{s}" / "run.json").read_text())["e0_shift_eV"] for s in (SEED, OTHER_SEED)]
    assert shifts[0] != shifts[1]


class PairToy(nn.Module):
    """Pair energies sum_j w_a[s_i, s_j] exp(-r^2) + w_b[s_i, s_j] exp(-r^2 / 4) (eV): a
    stand-in model with two layers of one leaf each, quick to trace, for step-level checks."""

    @nn.compact
    def __call__(self, vectors, species, senders, receivers):
        r2 = jnp.sum(vectors**2, axis=-1)
        pair = 0.0
        for name, width in (("a", 1.0), ("b", 4.0)):
            w = self.param(name, nn.initializers.normal(0.5), (4, 4))
            pair = pair + w[species[receivers], species[senders]] * jnp.exp(-r2 / width)
        return jax.ops.segment_sum(pair, receivers, species.shape[0])


def test_variant_step_equals_single_steps_and_holds_inactive(real_frames_dir):
    """Three steps of K=2 variants (lambda_tau 0.01, 3), the second with variant 0
    inactive, against ordinary (K = 1) runs: 2 and 3 steps with each variant's decay."""
    frames = read_frames(real_frames_dir / "sse-pbe" / "LiGePS-init.system")[:4]
    graphs = make_graphs(frames, TINY_CONFIG["atomic_numbers"], TINY_CONFIG["r_max"])
    module = PairToy()
    params = jax.tree.map(np.asarray, module.init(jax.random.PRNGKey(1), jnp.ones((3, 3)), jnp.zeros(2, jnp.int32),
                                                  jnp.array([0, 1, 0]), jnp.array([1, 0, 1]))["params"])
    method = STR(targets=(("a",), ("b",)), per_path=True)
    config = TrainConfig(batch_size=4, lr=0.05, ema_decay=0.5)
    decays = [0.01, 3.0]
    trainer = Trainer(module, {}, method, params, config, make_variants(decays, [0]))
    state = trainer.initial_state()
    batch = trainer.stack_variants([(graphs, frames)], [[0, 1, 2, 3]])
    for active in ([True, True], [False, True], [True, True]):
        trainer.train_step(state, batch, active=active)
    assert [run.step for run in state.runs] == [2, 3]
    for k, (decay, steps) in enumerate(zip(decays, (2, 3))):
        single = Trainer(module, {}, method, params, dataclasses.replace(config, threshold_decay=decay))
        single_state = single.initial_state()
        for _ in range(steps):
            single.train_step(single_state, single.stack(graphs, [0, 1, 2, 3])[0])
        expected, got = single.run_state(single_state, 0), trainer.run_state(state, k)
        for name in ("tree", "ema", "opt_state"):
            for x, y in zip(jax.tree.leaves(getattr(expected, name)), jax.tree.leaves(getattr(got, name))):
                np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-12, atol=1e-15)
        assert single.compiles["train"] == 1


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--threshold-decay", "0.1,abc"], "--threshold-decay '0.1,abc': 'abc' is not a number"),
        (["--threshold-decay", "0.1,0.1"], "--threshold-decay '0.1,0.1': a value is repeated"),
        (["--threshold-decay", "0.1,-1"], "'-1' must be finite and >= 0"),
        (["--seeds", "1,x"], "--seeds '1,x': 'x' is not an integer"),
        (["--threshold-decay", "0.1,0.2", "--method", "full"], "several --threshold-decay values need --method str"),
    ],
)
def test_bad_lists_are_one_clear_error(tmp_path, capsys, extra, expected):
    """Checked before any file is read: no data or model needed."""
    out = tmp_path / "run"
    assert main(args_for(tmp_path, out, "0.05") + extra) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and expected in err, err
    assert not out.exists()


def test_variant_lists_and_names():
    assert parse_values(" 0.01, 0.3", "--threshold-decay", float) == [0.01, 0.3]
    assert parse_values("7", "--seeds", int) == [7]
    variants = make_variants([0.01, 0.3], [1, 2])
    assert variants[1] == Variant(0.01, 2)
    assert variant_names(variants) == ["lambda_0.01_seed_1", "lambda_0.01_seed_2", "lambda_0.3_seed_1", "lambda_0.3_seed_2"]
    assert variant_names(make_variants([1e-5, 0.05], [0])) == ["lambda_1e-05", "lambda_0.05"]
    assert variant_names(make_variants([0.05], [0, 1])) == ["seed_0", "seed_1"]
    with pytest.raises(SparseEqvError, match="'nan' must be finite"):
        parse_values("nan", "--threshold-decay", float)
