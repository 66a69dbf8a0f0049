"""`sparse-eqv finetune --config FILE.yaml`: options from a file, flags over the
file, bad files refused naming file and key, and RUN_DIR/config.yaml repeating a
run to the bit (tiny model, tiny generated data)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import yaml

from sparse_eqv.checkpoint import load_model
from sparse_eqv.cli import build_parser, main
from sparse_eqv.config_file import resolve
from sparse_eqv.errors import SparseEqvError
from sparse_eqv.testing import write_labelled_frames, write_tiny_model


def _resolve(argv: list[str]):
    """The effective options of `sparse-eqv finetune ARGV`, and the notes resolving them printed."""
    notes: list[str] = []
    return resolve(build_parser().parse_args(["finetune", *argv]), report=notes.append), notes


def _config(path, text: str):
    path.write_text(text)
    return str(path)


# ---------------------------------------------------------------------------
# Reading, checking and merging (no training)
# ---------------------------------------------------------------------------


def test_file_gives_every_kind_of_option_and_flags_override_it(tmp_path):
    config = _config(tmp_path / "run.yaml", (
        "model: models/tiny\ntrain: train.xyz\nthreshold-decay: 0.01,0.3\nlr: 1e-3\nepochs: 5\ntargets: all\n"
        "per_path: true\nvalid: v.xyz\noutput: runs/a\n"))
    args, notes = _resolve(["--config", config, "--epochs", "7", "--lr", "0.001", "-o", "runs/b"])
    assert args.model.name == "tiny" and args.threshold_decay == "0.01,0.3" and args.targets == ["all"]
    assert args.lr == 0.001 and args.epochs == 7 and args.per_path is True and args.output.name == "b"
    assert args.seed == 0 and args.method == "str" and args.valid_fraction == 0.1  # parser defaults
    # One line per flag that changes the file's value, naming the key and both values (--lr agrees: silent).
    assert notes == [f"note: --epochs 7 on the command line overrides `epochs: 5` in {config}",
                     f"note: --output runs/b on the command line overrides `output: runs/a` in {config}"]


def test_a_flag_replaces_the_files_value_of_an_exclusive_partner(tmp_path):
    config = _config(tmp_path / "run.yaml", "model: m\ntrain: t.xyz\nvalid: v.xyz\noutput: o\n")
    args, notes = _resolve(["--config", config, "--valid-fraction", "0.2"])
    assert args.valid is None and args.valid_fraction == 0.2
    assert notes == [f"note: --valid-fraction 0.2 on the command line replaces `valid: v.xyz` in {config} "
                     "(they exclude each other)"]


@pytest.mark.parametrize("text, message", [
    ("threshold_dacay: 0.1", "unknown option `threshold_dacay` (did you mean `threshold_decay`?)"),
    ("threshold-dacay: 0.1", "unknown option `threshold-dacay` (did you mean `threshold-decay`?)"),
    ("epochs: ten", "`epochs:` 'ten': expected an integer"),
    ("epochs: 1.5", "`epochs:` 1.5: expected an integer"),
    ("lr: fast", "`lr:` 'fast': expected a number, or null"),
    ("method: strr", "`method:` 'strr': expected one of str, full, elora, scratch"),
    ("per-path: 1", "`per-path:` 1: expected true or false"),
    ("train: 3", "`train:` 3: expected a path"),
    ("targets: []", "`targets:` []: expected a string, or a list of them"),
    ("batch-size: 1\nbatch_size: 2", "`batch_size` given twice"),
    ("valid: v.xyz\nvalid-fraction: 0.3", "`valid` and `valid_fraction` exclude each other"),
    ("- epochs", "expected a mapping of option names to values, found a list"),
    ("epochs: [1", "line 1: not valid YAML"),
])
def test_bad_files_are_refused_naming_file_key_and_expectation(tmp_path, text, message):
    config = _config(tmp_path / "bad.yaml", text)
    with pytest.raises(SparseEqvError) as error:
        _resolve(["--config", config, "m", "--train", "t.xyz", "-o", "o"])
    assert str(error.value).startswith(config) and message in str(error.value)


def test_required_options_may_come_from_either_place(tmp_path):
    with pytest.raises(SparseEqvError, match="`train` is required: give --train on the command line or `train:`"):
        _resolve(["m", "-o", "o"])
    config = _config(tmp_path / "run.yaml", "train: t.xyz\n")
    assert _resolve(["--config", config, "m", "-o", "o"])[0].train.name == "t.xyz"


def test_cli_reports_a_bad_file_as_an_error(tmp_path, capsys):
    config = _config(tmp_path / "bad.yaml", "epoch: 3\n")
    assert main(["finetune", "--config", config, "m", "--train", "t.xyz", "-o", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"sparse-eqv finetune: error: {config}: unknown option `epoch` (did you mean `epochs`?); "
        "the keys are the long options of `sparse-eqv finetune --help`")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------
# RUN_DIR/config.yaml repeats the run
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune_config")
    write_tiny_model(root / "model", seed=0)
    write_labelled_frames(root / "train.xyz", 6, seed=0, teacher_seed=1)
    return root


def _params(run_dir):
    return jax.tree.leaves(load_model(run_dir / "model")[1]["params"])


def test_config_yaml_repeats_the_run_bitwise(workdir, capsys, monkeypatch):
    monkeypatch.chdir(workdir)  # relative paths in the first file: written back absolute
    first = _config(workdir / "first.yaml", (
        "model: model\ntrain: train.xyz\nvalid-fraction: 0.34\nepochs: 2\nbatch-size: 2\nseed: 5\n"
        "threshold-decay: 0.3\nlr: 2e-2\nema_decay: 0.5\nquiet: true\n"))
    assert main(["finetune", "--config", first, "-o", "run1", "--checkpoint-every", "1"]) == 0
    written = yaml.safe_load((workdir / "run1" / "config.yaml").read_text())
    assert written["model"] == str(workdir / "model") and written["train"] == str(workdir / "train.xyz")
    assert written["output"] == str(workdir / "run1") and written["checkpoint_every"] == 1
    assert written["lr"] == 0.02 and written["seed"] == 5 and written["threshold_decay"] == "0.3"
    assert "valid" not in written and "overwrite" not in written and "resume" not in written
    capsys.readouterr()

    assert main(["finetune", "--config", str(workdir / "run1" / "config.yaml"), "-o", str(workdir / "run2")]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if "on the command line" in line]
    assert notes == [f"note: --output {workdir / 'run2'} on the command line overrides `output: {workdir / 'run1'}` "
                     f"in {workdir / 'run1' / 'config.yaml'}"]
    first_params, second_params = _params(workdir / "run1"), _params(workdir / "run2")
    assert len(first_params) == len(second_params) > 0
    for a, b in zip(first_params, second_params):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(first_params, jax.tree.leaves(
        load_model(workdir / "model")[1]["params"])))  # the run did train
    again = yaml.safe_load((workdir / "run2" / "config.yaml").read_text())
    assert {k: v for k, v in again.items() if k != "output"} == {k: v for k, v in written.items() if k != "output"}


def test_variants_run_writes_its_config_yaml(workdir):
    out = workdir / "variants"
    assert main(["finetune", str(workdir / "model"), "--train", str(workdir / "train.xyz"), "--epochs", "1",
                 "--batch-size", "2", "--threshold-decay", "0.01,0.3", "--quiet", "-o", str(out)]) == 0
    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written["threshold_decay"] == "0.01,0.3" and written["output"] == str(out)
    assert (out / "lambda_0.01").is_dir() and (out / "lambda_0.3").is_dir()
