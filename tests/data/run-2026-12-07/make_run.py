"""Make tests/data/run-2026-12-07: a small STR run written by the code before the one-step refactor (commit 134dca7)."""
import shutil, sys
from pathlib import Path
import ase.io
from sparse_eqv.cli import main
from sparse_eqv.demo.emt_data import emt_frames
import importlib.util
spec = importlib.util.spec_from_file_location("new_testing", "/work/main/sparse_eqv/testing.py")
new_testing = importlib.util.module_from_spec(spec); spec.loader.exec_module(new_testing)
tiny_cuni_checkpoint_config, write_sevenn_checkpoint = new_testing.tiny_cuni_checkpoint_config, new_testing.write_sevenn_checkpoint

out = Path(sys.argv[1]); shutil.rmtree(out, ignore_errors=True); out.mkdir(parents=True)
frames = emt_frames(12, seed=1)
ase.io.write(out / "train.extxyz", frames[:8]); ase.io.write(out / "valid.extxyz", frames[8:12])
write_sevenn_checkpoint(out / "base.pth", tiny_cuni_checkpoint_config(), seed=5)
assert main(["convert", str(out / "base.pth"), "-o", str(out / "base")]) == 0
assert main(["finetune", str(out / "base"), "--train", str(out / "train.extxyz"), "--valid", str(out / "valid.extxyz"),
             "--method", "str", "--epochs", "2", "--batch-size", "4", "--threshold-decay", "0.3", "--quiet",
             "-o", str(out / "run")]) == 0
