"""Which parameter leaves a fine-tuning method touches (`--targets`).

Every params leaf has a role. A converted model says the roles in its
config, `config["param_roles"] = {pattern: role}`, where a pattern is a leaf
path "params/<module>/.../<leaf>" prefix (whole components) or an fnmatch
glob on it (the longest matching pattern wins). Without that map, a leaf is
classified by its path (the naming of `sparse_eqv.models`), first rule wins:

    symmetric_contraction  under a module named *symmetric_contraction*
    radial_mlp             under a module named *radial*, *mlp*,
                           *conv_tp_weights* or *density* (MLPs of |r_ij|)
    linear                 under a module named *readout* (readouts are
                           linear maps of scalars, also when stacked)
    tensor_product         leaves `w[i1,i2,i_out]`: internal weights of a
                           weighted tensor product (e.g. a self-connection)
    linear                 leaves `w[i_in,i_out]`: e3nn linear layers
    radial_mlp             other FullyConnectedNet leaves `layer{k}`
    other                  anything else, e.g. an embedding table (chosen
                           only by an explicit pattern or param_roles)

`--targets default` (the paper's reference) = linear + tensor_product;
`all` adds symmetric_contraction and radial_mlp; any other word is a role
name or a leaf-path pattern.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Any, Iterable, Sequence

from flax import traverse_util

from sparse_eqv.errors import SparseEqvError

Key = tuple[str, ...]

ROLES = ("linear", "tensor_product", "symmetric_contraction", "radial_mlp", "other")
PRESETS = {
    "default": ("linear", "tensor_product"),
    "all": ("linear", "tensor_product", "symmetric_contraction", "radial_mlp"),
}

_LINEAR_LEAF = re.compile(r"^w\[\d+,\d+\]")  # e3nn Linear path w[i_in,i_out]
_TP_LEAF = re.compile(r"^w\[\d+,\d+,\d+\]")  # weighted tensor-product path w[i1,i2,i_out]
_MLP_LEAF = re.compile(r"^layer\d+$")  # e3nn FullyConnectedNet layer
# Modules holding MLPs of the edge length (nequip/sevenn "radial", MACE "conv_tp_weights", "density_fn").
_RADIAL_MODULES = ("radial", "mlp", "conv_tp_weights", "density")


def leaf_path(key: Key) -> str:
    """The leaf's path as written in configs: "params/a/b/w[0,1] ..."."""
    return "/".join(("params",) + tuple(key))


def _matches(path: str, pattern: str) -> bool:
    pattern = pattern if pattern.startswith("params/") else "params/" + pattern
    if path == pattern or path.startswith(pattern.rstrip("/") + "/"):
        return True
    return fnmatch.fnmatchcase(path, pattern)


def _role_by_name(key: Key) -> str:
    modules, leaf = [k.lower() for k in key[:-1]], key[-1]
    if any("symmetric_contraction" in m for m in modules):
        return "symmetric_contraction"
    if any(word in m for m in modules for word in _RADIAL_MODULES):
        return "radial_mlp"
    if any("readout" in m for m in modules):
        return "linear"
    if _TP_LEAF.match(leaf):
        return "tensor_product"
    if _LINEAR_LEAF.match(leaf):
        return "linear"
    if _MLP_LEAF.match(leaf):
        return "radial_mlp"
    return "other"


def leaf_roles(params: Any, config: dict[str, Any]) -> dict[Key, str]:
    """The role of every params leaf, keyed by flattened key (params order)."""
    declared: dict[str, str] = dict(config.get("param_roles") or {})
    for pattern, role in declared.items():
        if role not in ROLES:
            raise SparseEqvError(f"config.json param_roles: {pattern!r} has role {role!r}; known: {', '.join(ROLES)}")
    roles = {}
    for key in traverse_util.flatten_dict(params):
        path = leaf_path(key)
        hits = [(len(p), r) for p, r in declared.items() if _matches(path, p)]
        roles[key] = max(hits)[1] if hits else _role_by_name(key)
    return roles


def select_targets(params: Any, config: dict[str, Any], targets: Sequence[str] | None = None) -> tuple[Key, ...]:
    """Flattened keys of the leaves that `--targets` names, in params order.

    Args:
        targets: words, each a preset (default, all), a role, or a leaf-path
            pattern; None means ["default"].

    Raises:
        SparseEqvError when a word selects nothing or the selection is empty.
    """
    roles = leaf_roles(params, config)
    chosen: set[Key] = set()
    for word in targets or ["default"]:
        if word in PRESETS or word in ROLES:
            wanted = PRESETS.get(word, (word,))
            hits = {key for key, role in roles.items() if role in wanted}
        else:
            hits = {key for key in roles if _matches(leaf_path(key), word)}
        if not hits:
            examples = ", ".join(leaf_path(k) for k in list(roles)[:4])
            raise SparseEqvError(
                f"--targets {word!r} selects no parameter of this model (presets: {', '.join(PRESETS)}; "
                f"roles: {', '.join(ROLES)}; or a leaf-path pattern such as {examples})"
            )
        chosen |= hits
    return tuple(key for key in roles if key in chosen)


def describe(keys: Iterable[Key]) -> list[str]:
    """Leaf paths of keys, for logs and run.json."""
    return [leaf_path(k) for k in keys]
