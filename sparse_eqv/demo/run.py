"""`sparse-eqv demo`: the whole workflow on data the project makes itself.

convert SevenNet-0 -> EMT Cu/Ni data -> zero-shot errors -> STR fine-tuning
for a few minutes -> errors again -> export a SevenNet checkpoint and a delta
patch -> reload the checkpoint with sevenn's own calculator -> sparsity report.

Everything goes under one output directory:

    OUT/model/        the converted base model (reused while the checkpoint is the same)
    OUT/data/         train/valid/test extxyz (the EMT set is made once and reused)
    OUT/run/          the fine-tuning run (run.json, log.csv, metrics.json, sparsity.json, model/)
    OUT/finetuned.*   the exported checkpoint (the base's format) and OUT/finetuned.delta
    OUT/report/       sparsity figures
    OUT/jax_cache/    JAX's persistent compilation cache (a second run compiles nothing)
    OUT/summary.json  the numbers printed at the end

The model is fine-tuned in float32 (about twice as fast on CPU as float64);
the exported checkpoint is then compared with the official package's float32
calculator.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Sequence

import ase.io
import numpy as np

from sparse_eqv.atomic_write import atomic_file
from sparse_eqv.checkpoint import CONFIG_FILE, load_for_inference, load_model, save_model
from sparse_eqv.data.frames import Frame
from sparse_eqv.data.readers import read_frames
from sparse_eqv.demo.emt_data import LEVEL_OF_THEORY, write_emt_dataset
from sparse_eqv.errors import DataError
from sparse_eqv.finetune.evaluate import prediction_metrics
from sparse_eqv.finetune.loop import TrainConfig
from sparse_eqv.finetune.run import MethodOptions, default_lr, finetune
from sparse_eqv.inference import Predictor
from sparse_eqv.report import write_report
from weights_convert.convert import convert
from weights_convert.export import export_run
from weights_convert.sevenn import resolve_bundled

SPLITS = ("train", "valid", "test")
RELOAD_FRAMES = 5  # sevenn's calculator takes about a second per frame on 2 CPU cores


def _say(step: str, started: float) -> None:
    print(f"\n== [{time.perf_counter() - started:4.0f} s] {step}", flush=True)


def _use_compilation_cache(directory: Path) -> None:
    """Keep compiled XLA programs under `directory` unless a cache is already set."""
    import jax

    if jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir", str(directory.absolute()))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prepare_model(model: str | Path, directory: Path, dtype: str) -> Path:
    """A model directory for `model`: a sparse_eqv model directory as given,
    else `model` (a checkpoint or a bundled name) converted into `directory`,
    reused when it already holds the same checkpoint in the same dtype."""
    if (Path(model) / CONFIG_FILE).exists():
        return Path(model)
    source = resolve_bundled(str(model)) or Path(model)
    if (directory / CONFIG_FILE).exists() and source.is_file():
        config = json.loads((directory / CONFIG_FILE).read_text())
        if config.get("dtype") == dtype and config.get("source", {}).get("sha256") == _sha256(source):
            print(f"   reusing {directory} (converted from {source.name})")
            return directory
    config, variables = convert(str(model), dtype=dtype)
    save_model(directory, config, variables, overwrite=True)
    print(f"   {model} -> {directory} ({config['source']['kind']}, {len(config['atomic_numbers'])} elements, {dtype})")
    return directory


def write_frames(path: Path, frames: Sequence[Frame]) -> Path:
    """Frames with their labels (energy, forces, stress) as extxyz."""
    images = []
    for frame in frames:
        atoms = frame.to_atoms()
        if frame.energy is not None:
            atoms.info["energy"] = frame.energy
        if frame.stress is not None:
            atoms.info["stress"] = frame.stress
        if frame.forces is not None:
            atoms.arrays["forces"] = frame.forces
        images.append(atoms)
    with atomic_file(path) as tmp:
        ase.io.write(tmp, images, format="extxyz")
    return path


def split_data(data: Path, directory: Path, seed: int) -> dict[str, Path]:
    """The user's labelled file split 70/15/15 % (seeded) into extxyz files."""
    frames = read_frames(data, require_energy=True)
    if len(frames) < 3:
        raise DataError(f"{data}: {len(frames)} frame(s); the demo needs at least 3 (train, valid, test)")
    order = np.random.default_rng(seed).permutation(len(frames))
    n_valid = n_test = max(1, int(round(0.15 * len(frames))))
    parts = {"test": order[:n_test], "valid": order[n_test : n_test + n_valid], "train": order[n_test + n_valid :]}
    stem = Path(data).stem
    return {split: write_frames(directory / f"{stem}_{split}.extxyz", [frames[i] for i in sorted(parts[split])])
            for split in SPLITS}


def official_reload(kind: str, checkpoint: Path, frames: Sequence[Frame]) -> list[dict] | None:
    """Energy (eV) and forces (eV/Å) of `frames` from the official package's
    own calculator on an exported checkpoint, or None where the demo has no
    calculator for this kind (only sevenn's lives in this environment)."""
    if kind != "sevenn":
        return None
    import torch
    from sevenn.calculator import SevenNetCalculator

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)  # sevenn builds in the default dtype and expects float32
    try:
        calculator = SevenNetCalculator(model=str(checkpoint), device="cpu")
        out = []
        for frame in frames:
            atoms = frame.to_atoms()
            atoms.calc = calculator
            out.append({"energy": atoms.get_potential_energy(), "forces": atoms.get_forces()})
        return out
    finally:
        torch.set_default_dtype(previous)


def _print_table(zero: dict, tuned: dict, sparsity: dict, result: dict, seconds: float) -> None:
    rows = [
        ("E MAE (meV/atom, E0 fitted)", zero["e0_fit"]["energy_mae"], tuned["e0_fit"]["energy_mae"]),
        ("F MAE (meV/Å)", zero["raw"]["forces_mae"], tuned["raw"]["forces_mae"]),
        ("stress MAE (meV/Å^3)", zero["raw"]["stress_mae"], tuned["raw"]["stress_mae"]),
    ]
    print("-" * 66)
    print(f"{'test set (' + str(zero['raw']['n_frames']) + ' frames)':34s} {'zero-shot':>14s} {'STR fine-tuned':>15s}")
    for name, before, after in rows:
        if before is not None and after is not None:
            print(f"{name:34s} {before:14.2f} {after:15.2f}")
    if "layer_sparsity" in sparsity:
        print(f"{'layer sparsity (targeted weights)':34s} {'':>14s} {sparsity['layer_sparsity']:15.1%}")
    print(f"{'total sparsity (all weights)':34s} {'':>14s} {sparsity['total_sparsity']:15.1%}")
    print(f"{'fine-tuning: epochs, steps, time':34s} {'':>14s} {result['epochs']:>4d}, {result['steps']:>4d}, "
          f"{result['train_wall_s']:3.0f} s")
    print(f"{'whole demo':34s} {'':>14s} {seconds:13.0f} s")
    print("-" * 66)


def run_demo(output: str | Path = "demo_out", *, data: str | Path | None = None, model: str | Path = "7net-0",
             minutes: float = 3.0, batch_size: int = 4, lr: float | None = None, threshold_decay: float = 0.05,
             seed: int = 0, dtype: str = "float32", n_frames: int = 200, epochs: int = 10_000,
             progress: bool = True, compilation_cache: bool = True) -> dict[str, Any]:
    """Run the demo under `output`; returns the summary it prints (also OUT/summary.json).

    Args:
        data: a labelled file of your own instead of the EMT set (split 70/15/15 %).
        model: checkpoint, bundled name (7net-0) or converted model directory.
        minutes: fine-tuning wall-time budget, compilation included.
        lr: peak learning rate of the STR deltas (None: `finetune.run.default_lr("str")`).
        epochs: at most this many epochs (the time budget usually ends training first).
        n_frames: size of the EMT set.
        compilation_cache: keep compiled programs in OUT/jax_cache.
    """
    started = time.perf_counter()
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    if compilation_cache:
        _use_compilation_cache(output / "jax_cache")

    _say(f"1/6 model: {model}", started)
    model_dir = prepare_model(model, output / "model", dtype)
    config, variables = load_model(model_dir)

    _say("2/6 data", started)
    if data is None:
        splits = write_emt_dataset(output / "data", n_frames=n_frames, seed=seed)
        print(f"   labels: {LEVEL_OF_THEORY}. The base model learnt DFT (SevenNet-0: PBE), so this is a change")
        print("   of reference (a level-of-theory shift), like fine-tuning onto another functional.")
        print("   frames: rattled/strained 8-atom fcc Cu and Cu-Ni cells, a vacancy, a Cu(111) slab")
    else:
        splits = split_data(Path(data), output / "data", seed)
        print(f"   your data: {data}, split 70/15/15 % (seed {seed})")
    frames = {split: read_frames(splits[split]) for split in SPLITS}
    for split in SPLITS:
        print(f"   {split:5s}: {splits[split]} ({len(frames[split])} frames)")

    _say("3/6 zero-shot errors on the test set (the first prediction compiles the model)", started)
    test = frames["test"]
    predictor = Predictor(config, variables)
    zero = prediction_metrics(test, predictor.predict(test), config["atomic_numbers"])
    print(f"   E MAE {zero['e0_fit']['energy_mae']:.2f} meV/atom (after an E0 fit), "
          f"F MAE {zero['raw']['forces_mae']:.2f} meV/Å")

    _say(f"4/6 STR fine-tuning for about {minutes:g} min (the first step compiles the training step)", started)
    run_dir = output / "run"
    lr = default_lr("str") if lr is None else lr
    train_config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, threshold_decay=threshold_decay,
                               time_limit_s=60.0 * minutes, one_budget=True)
    result = finetune(model_dir, run_dir, train=splits["train"], valid=splits["valid"], test=splits["test"],
                      method=MethodOptions(method="str"), config=train_config, overwrite=True,
                      progress=progress)
    print(f"   {result['epochs']} epoch(s), {result['steps']} steps of {batch_size} frames, best epoch "
          f"{result['best_epoch']}, {sum(result['compiles'].values())} compilation(s)")

    tuned_config, tuned_variables = load_for_inference(run_dir)
    # Same architecture, new weights: the compiled prediction is reused.
    predictor.variables = tuned_variables
    tuned_predictions = predictor.predict(test)
    tuned = prediction_metrics(test, tuned_predictions, tuned_config["atomic_numbers"])

    _say("5/6 export and reload with the official package", started)
    suffix = "".join(Path(config["source"]["file"]).suffixes) if "source" in config else ".pth"
    checkpoint, patch = output / f"finetuned{suffix}", output / "finetuned.delta"
    merged = export_run(run_dir, checkpoint, overwrite=True)
    delta = export_run(run_dir, patch, delta_only=True, overwrite=True)
    print(f"   {checkpoint} ({merged['bytes']:,} bytes), {patch} ({delta['bytes']:,} bytes, "
          f"{delta['nnz']} numbers changed)")
    kind = config.get("source", {}).get("kind", config["model"])
    reloaded = test[:RELOAD_FRAMES]
    reference = official_reload(kind, checkpoint, reloaded)
    deviation = None
    if reference is not None:
        deviation = {
            "energy_eV_per_atom": max(abs(r["energy"] - p["energy"]) / f.num_atoms
                                      for f, r, p in zip(reloaded, reference, tuned_predictions)),
            "forces_eV_per_A": max(float(np.abs(r["forces"] - p["forces"]).max())
                                   for r, p in zip(reference, tuned_predictions)),
        }

    _say("6/6 sparsity report", started)
    figures = write_report(run_dir, output / "report")

    seconds = time.perf_counter() - started
    print()
    _print_table(zero, tuned, result["sparsity"], result, seconds)
    if deviation is None:
        print(f"reload check   : skipped (the demo reloads SevenNet checkpoints only; this is {kind})")
    else:
        print(f"reload check   : sevenn's SevenNetCalculator on {checkpoint.name} vs JAX ({config['dtype']}), "
              f"{len(reloaded)} test frames: max |dE| = {deviation['energy_eV_per_atom']:.1e} eV/atom, "
              f"max |dF| = {deviation['forces_eV_per_A']:.1e} eV/Å")
    print(f"base model     : {model_dir}")
    print(f"data           : {splits['train'].parent}")
    print(f"run directory  : {run_dir} (log.csv per epoch, metrics.json, sparsity.json, model/)")
    print(f"checkpoint     : {checkpoint} (loads with the official package)")
    print(f"delta patch    : {patch} (apply with `sparse-eqv apply-delta`)")
    for figure in figures:
        print(f"figure         : {figure}")
    summary = {
        "zero_shot": zero, "finetuned": tuned, "sparsity": result["sparsity"], "epochs": result["epochs"],
        "steps": result["steps"], "train_wall_s": result["train_wall_s"], "compiles": result["compiles"],
        "reload_deviation": deviation, "dtype": config["dtype"], "model_dir": str(model_dir), "run_dir": str(run_dir),
        "data": {split: str(splits[split]) for split in SPLITS}, "checkpoint": str(checkpoint), "patch": str(patch),
        "figures": [str(f) for f in figures], "seconds": seconds,
    }
    with atomic_file(output / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=1, default=float))
    print(f"summary        : {output / 'summary.json'}")
    return summary
