"""Fine-tuning as functions of the params pytree; no method touches model code.

A method is an object with
    init(base_params, rng) -> tree        trainable tree (frozen base inside)
    labels(tree) -> tree of "frozen" | "delta" | "score" | "dense"
    effective(tree) -> params             what the model runs with

    STR     str.py    base + sign(dW) relu(|dW| - sigmoid(s))   (the paper's method)
    ELoRA   lora.py   base + alpha/r A @ B per e3nn path
    Full    dense.py  every param trained (also `scratch`, from a fresh init)

targets.py chooses the leaves (`--targets`), optim.py the optax partition,
losses.py the loss and metrics, e0s.py the energy reference, loop.py the
jitted data-parallel training with checkpoints, run.py the run directory,
evaluate.py zero-shot / fine-tuned errors.
"""

from sparse_eqv.finetune.dense import Full
from sparse_eqv.finetune.lora import ELoRA
from sparse_eqv.finetune.str import STR, soft_threshold

__all__ = ["ELoRA", "Full", "STR", "soft_threshold"]
