"""`sparse-eqv demo`: the whole workflow on data the project makes itself.

convert SevenNet-0 -> EMT Cu/Ni data -> zero-shot errors -> STR fine-tuning
for a few minutes -> errors again -> export a SevenNet checkpoint and a delta
patch -> reload the checkpoint with sevenn's own calculator -> sparsity report.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


from sparse_eqv.demo.emt_data import LEVEL_OF_THEORY, write_emt_dataset


def _say(step: str) -> None:
    print(f"\n== {step}", flush=True)


def _official_reload_deviation(kind: str, checkpoint: Path, frames, predictions) -> float | None:
    """Largest |E_torch - E_jax| per atom (eV) with the official package's
    calculator on the exported checkpoint, or None if that package is not here."""
    if kind != "sevenn":
        return None
    from sevenn.calculator import SevenNetCalculator

    calculator = SevenNetCalculator(model=str(checkpoint), device="cpu")
    worst = 0.0
    for frame, prediction in zip(frames, predictions):
        atoms = frame.to_atoms()
        atoms.calc = calculator
        worst = max(worst, abs(atoms.get_potential_energy() - prediction["energy"]) / frame.num_atoms)
    return worst


def run_demo(output: str | Path = "demo_out", *, data: str | Path | None = None, model: str = "7net-0",
             minutes: float = 4.0, batch_size: int = 4, threshold_decay: float = 0.05, seed: int = 0) -> dict[str, Any]:
    """Run the demo under `output`; returns the summary it prints."""
    from sparse_eqv.checkpoint import load_for_inference, save_model
    from sparse_eqv.data.readers import read_frames
    from sparse_eqv.finetune.evaluate import evaluate
    from sparse_eqv.finetune.loop import TrainConfig
    from sparse_eqv.finetune.run import MethodOptions, finetune
    from sparse_eqv.inference import Predictor
    from weights_convert.convert import convert
    from weights_convert.export import export_run

    started = time.perf_counter()
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)

    _say(f"1/6 convert {model}")
    model_dir = output / "model"
    if not (model_dir / "config.json").exists():
        config, variables = convert(model)
        save_model(model_dir, config, variables)
    config = json.loads((model_dir / "config.json").read_text())
    print(f"   {model} -> {model_dir} ({config['source']['kind']}, {len(config['atomic_numbers'])} elements)")

    _say("2/6 data")
    if data is None:
        splits = write_emt_dataset(output / "data", seed=seed)
        print(f"   {LEVEL_OF_THEORY}: rattled/strained fcc Cu and Cu-Ni, a vacancy and a (111) surface")
        train, valid, test = splits["train"], splits["valid"], splits["test"]
    else:
        train, valid, test = Path(data), None, Path(data)
        print(f"   your data: {train} (10% held out for validation; errors below are on the whole file)")
    for name, path in (("train", train), ("valid", valid), ("test", test)):
        if path is not None:
            print(f"   {name}: {path} ({len(read_frames(path))} frames)")

    _say("3/6 zero-shot")
    zero = evaluate(model_dir, test)

    _say(f"4/6 STR fine-tuning (about {minutes:g} min)")
    run_dir = output / "run"
    options = MethodOptions(method="str")
    common = dict(train=train, valid=valid, test=test, method=options, e0s="fit")
    budget = 60.0 * minutes
    tic = time.perf_counter()
    first = finetune(model_dir, run_dir, config=TrainConfig(epochs=1, batch_size=batch_size, seed=seed,
                                                            threshold_decay=threshold_decay),
                     overwrite=True, **common)
    per_epoch = time.perf_counter() - tic
    epochs = max(1, int(budget // max(per_epoch, 1e-3)))
    result = first
    if epochs > 1:
        result = finetune(model_dir, run_dir, config=TrainConfig(epochs=epochs, batch_size=batch_size, seed=seed,
                                                                 threshold_decay=threshold_decay),
                          resume=True, **common)
    tuned = evaluate(run_dir, test)

    _say("5/6 export")
    checkpoint = output / ("finetuned" + Path(config["source"]["path"]).suffix)
    patch = output / "finetuned.delta"
    merged = export_run(run_dir, checkpoint, overwrite=True)
    delta = export_run(run_dir, patch, delta_only=True, overwrite=True)
    frames = read_frames(test)[:8]
    predictions = Predictor(*load_for_inference(run_dir)).predict(frames)
    deviation = _official_reload_deviation(config["source"]["kind"], checkpoint, frames, predictions)

    _say("6/6 sparsity report")
    report_dir = output / "report"
    try:
        from sparse_eqv.report import write_report

        figures = write_report(run_dir, report_dir)
    except ImportError:
        figures = []

    sparsity = result["sparsity"]
    rows = [
        ("E MAE (meV/atom, E0-fitted)", zero["e0_fit"]["energy_mae"], tuned["e0_fit"]["energy_mae"]),
        ("F MAE (meV/Å)", zero["raw"]["forces_mae"], tuned["raw"]["forces_mae"]),
        ("S MAE (meV/Å^3)", zero["raw"]["stress_mae"], tuned["raw"]["stress_mae"]),
    ]
    print("\n" + "-" * 64)
    print(f"{'test set':32s} {'zero-shot':>14s} {'STR fine-tuned':>15s}")
    for name, before, after in rows:
        if before is not None and after is not None:
            print(f"{name:32s} {before:14.2f} {after:15.2f}")
    print(f"{'layer sparsity (targeted deltas)':32s} {'':>14s} {sparsity.get('layer_sparsity', float('nan')):15.1%}")
    print(f"{'total sparsity (all params)':32s} {'':>14s} {sparsity['total_sparsity']:15.1%}")
    print(f"{'epochs, time':32s} {'':>14s} {result['epochs']:>7d}, {time.perf_counter() - started:5.0f} s")
    print("-" * 64)
    print(f"exported checkpoint : {checkpoint} ({merged['bytes']:,} bytes)")
    print(f"delta patch         : {patch} ({delta['bytes']:,} bytes, {delta['nnz']} numbers changed)")
    if deviation is None:
        print("reload check        : skipped (the official package of this model is not installed here)")
    else:
        print(f"reload check        : sevenn's SevenNetCalculator on the exported checkpoint (float32) vs JAX: "
              f"max |dE| = {deviation:.2e} eV/atom")
    for figure in figures:
        print(f"figure              : {figure}")
    print(f"run directory       : {run_dir} (metrics.json, log.csv, sparsity.json)")
    return {"zero_shot": zero, "finetuned": tuned, "sparsity": sparsity, "reload_deviation_eV_per_atom": deviation,
            "checkpoint": str(checkpoint), "patch": str(patch), "seconds": time.perf_counter() - started,
            "epochs": result["epochs"], "figures": [str(f) for f in figures]}
