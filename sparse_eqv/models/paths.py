"""What every parameter entry belongs to: layer, e3nn path, output l, element.

    infos = describe_leaves(config)     # {"params/layer_1/linear_2/w[1,1]": LeafInfo, ...}

A pure function of the config a converter writes, derived with the same
structure functions the Flax modules build themselves from (instruction
order, irreps sorting and simplification included), so a description
matches the params tree leaf for leaf (`tests/e2e/test_report.py` checks it
against `jax.eval_shape` of the module and against sevenn's torch modules).

Labels, per entry of a leaf:

    path     the e3nn instruction the entry weights, as irreps:
               "1o x 1o -> 0e"    a convolution path (node irrep x filter
                                  irrep Y_l -> output): the radial MLP's last
                                  layer (one column block per path) and the
                                  linear after the convolution (its input rows
                                  are the concatenated path outputs)
               "1o x Z -> 1o"     a tensor product with the one-hot element
                                  attributes (SevenNet self-connection, MACE
                                  skip_tp); "x emb" with nequip's type embedding
               "1o -> 1o"         a plain e3nn Linear path
               "nu=2 -> 1o"       MACE symmetric-contraction weights of
                                  correlation order nu
             None for entries of no e3nn path (embedding tables, hidden
             layers of radial and readout MLPs)
    l        the order of the irrep the entry's output feeds (0 for readouts
             and embeddings); None for hidden layers of the radial MLPs
    element  chemical symbol, where a leaf has an element-indexed axis
             (embedding tables, one-hot tensor products, MACE's
             symmetric-contraction weights); None elsewhere

Leaves outside the described model (e.g. a magnetic-moment head) are not
listed; `describe_unknown` gives them a layer name and no labels.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Union

import ase.data
import e3nn_jax as e3nn
import numpy as np

from sparse_eqv.errors import UnsupportedModelError
from sparse_eqv.models.blocks import (
    fully_connected_tp_instructions,
    linear_instructions,
    tp_path_weights,
    tp_weight_name,
)
from sparse_eqv.models.mace import MACE, conv_tp_structure, mace_structure, sh_irreps
from sparse_eqv.models.nequip import NequIP, conv_instructions, parse_irreps, simplify_irreps

Label = Union[str, int, None]


@dataclasses.dataclass(frozen=True)
class Split:
    """Labels along one axis: entries [start, stop) of `axis` carry `label`
    (the segments tile the axis)."""

    axis: int
    segments: tuple[tuple[int, int, Label], ...]


@dataclasses.dataclass(frozen=True)
class LeafInfo:
    """One params leaf.

    Attributes:
        layer: "embedding", "layer_<t>", "readout" (or the top module name).
        block: the module holding the leaf, e.g. "layer_1/linear_2"
            ("embedding" for the top-level table).
        shape: the leaf's shape.
        path, l, element: a label for the whole leaf, a `Split` along one
            axis, or None (see the module docstring).
    """

    layer: str
    block: str
    shape: tuple[int, ...]
    path: Label | Split = None
    l: Label | Split = None
    element: Label | Split = None

    def segments(self, kind: str) -> list[tuple[int | None, int, int, Label]]:
        """The `kind` ("path", "l", "element") labels as [(axis, start, stop,
        label)]: one entry with axis None when the whole leaf has one label."""
        value = getattr(self, kind)
        if isinstance(value, Split):
            return [(value.axis, start, stop, label) for start, stop, label in value.segments]
        return [(None, 0, 0, value)]


def describe_leaves(config: dict[str, Any]) -> dict[str, LeafInfo]:
    """{leaf path "params/...": LeafInfo} for every params leaf of the model `config` describes."""
    kind = config.get("model")
    if kind == "mace":
        return _describe_mace(config)
    if kind in ("nequip", "sevenn"):
        return _describe_nequip(config)
    raise UnsupportedModelError(f"config model {kind!r}: no parameter description (known: mace, nequip, sevenn)")


def describe_unknown(path: str, shape: tuple[int, ...]) -> LeafInfo:
    """A leaf `describe_leaves` does not know: its top module as layer, no labels."""
    parts = path.split("/")[1:]
    return LeafInfo(layer=parts[0], module="/".join(parts[:-1]) or parts[0], shape=tuple(shape))


def _symbols(config: dict[str, Any]) -> list[str]:
    return [ase.data.chemical_symbols[int(z)] for z in config["atomic_numbers"]]


def _per_element(axis: int, symbols: list[str]) -> Split:
    return Split(axis, tuple((i, i + 1, s) for i, s in enumerate(symbols)))


def _ir(l: int, p: int) -> str:
    return f"{l}{'e' if p == 1 else 'o'}"


# ---------------------------------------------------------------------------
# NequIP and SevenNet (sparse_eqv.models.nequip)
# ---------------------------------------------------------------------------


def _e3_linear(prefix: str, layer: str, irr_in, irr_out, names: dict[int, str] | None = None,
               rows: dict[int, Split] | None = None) -> dict[str, LeafInfo]:
    """Leaves of `nequip.E3Linear(irr_in, irr_out)`: w[i,j] for equal irreps, j outer, i inner.

    names: label of input chunk i instead of its irrep (the modality one-hot);
    rows: a row Split for input chunk i (convolution paths behind it).
    """
    out = {}
    for j, (mo, lo, po) in enumerate(irr_out):
        for i, (mi, li, pi) in enumerate(irr_in):
            if (li, pi) != (lo, po):
                continue
            source = (names or {}).get(i, _ir(li, pi))
            path = (rows or {}).get(i, f"{source} -> {_ir(lo, po)}")
            out[f"params/{prefix}/w[{i},{j}]"] = LeafInfo(layer, prefix, (mi, mo), path=path, l=lo)
    return out


def _mlp(prefix: str, layer: str, dims, last_columns: Split | None = None, l_columns: Split | None = None,
         l: Label = None) -> dict[str, LeafInfo]:
    """Leaves layer{k} (dims[k], dims[k+1]) of an MLP; the last layer's columns may be split by path."""
    out = {}
    for k in range(len(dims) - 1):
        last = k == len(dims) - 2
        out[f"params/{prefix}/layer{k}"] = LeafInfo(
            layer, prefix, (dims[k], dims[k + 1]),
            path=last_columns if last else None,
            l=(l_columns if last and l_columns is not None else l),
        )
    return out


def _describe_nequip(config: dict[str, Any]) -> dict[str, LeafInfo]:
    module = NequIP.from_config(config)
    symbols = _symbols(config)
    infos: dict[str, LeafInfo] = {
        "params/embedding": LeafInfo(
            "embedding", "embedding", (module.num_types, module.embedding_features),
            l=0, element=_per_element(0, symbols),
        )
    }
    irr_sh = parse_irreps(module.irreps_sh)
    modalities = module.num_modalities
    for t, spec in enumerate(module.layers):
        layer = f"layer_{t}"
        irr_in = parse_irreps(spec.irreps_in)
        gate_in = spec.gate.layout()[0]
        if spec.self_connection == "linear":
            infos.update(_e3_linear(f"{layer}/self_connection", layer, irr_in, gate_in))
        elif spec.self_connection == "tensor_product":
            one_hot = module.node_attrs == "one_hot"
            n_attr = module.num_types if one_hot else module.embedding_features
            for j, (mo, lo, po) in enumerate(gate_in):
                for i, (mi, li, pi) in enumerate(irr_in):
                    if (li, pi) == (lo, po):
                        infos[f"params/{layer}/self_connection/w[{i},0,{j}]"] = LeafInfo(
                            layer, f"{layer}/self_connection", (mi, n_attr, mo),
                            path=f"{_ir(li, pi)} x {'Z' if one_hot else 'emb'} -> {_ir(lo, po)}", l=lo,
                            element=_per_element(1, symbols) if one_hot else None,
                        )
        linear_1_in = irr_in + (((modalities, 0, 1),) if "linear_1" in spec.modal_linears else ())
        infos.update(_e3_linear(f"{layer}/linear_1", layer, linear_1_in, irr_in, names={len(irr_in): "modality"}))

        instructions, irr_mid = conv_instructions(irr_in, irr_sh, gate_in, spec.sort_instructions)

        def conv_path(i, j, k):
            return f"{_ir(*irr_in[i][1:])} x {_ir(*irr_sh[j][1:])} -> {_ir(*irr_mid[k][1:])}"

        # radial MLP: the last layer's columns are the per-path weights, in instruction order
        columns, l_columns, offset = [], [], 0
        for i, j, k in instructions:
            m = irr_in[i][0]
            columns.append((offset, offset + m, conv_path(i, j, k)))
            l_columns.append((offset, offset + m, irr_mid[k][1]))
            offset += m
        infos.update(_mlp(f"{layer}/radial", layer, spec.radial.dims + (offset,),
                          Split(1, tuple(columns)), Split(1, tuple(l_columns))))

        # linear_2 reads the simplified path outputs: chunk i of simplify(irr_mid) is a run
        # of sorted mid chunks, each the output of one instruction
        producer = {k: (i, j, k) for i, j, k in instructions}
        rows: dict[int, Split] = {}
        chunk, row = -1, 0
        previous = None
        for k, (m, l, p) in enumerate(irr_mid):
            if m == 0:
                continue
            if (l, p) != previous:
                chunk, row, previous = chunk + 1, 0, (l, p)
                rows[chunk] = Split(0, ())
            rows[chunk] = Split(0, rows[chunk].segments + ((row, row + m, conv_path(*producer[k])),))
            row += m
        mid = simplify_irreps(irr_mid)
        linear_2_in = mid + (((modalities, 0, 1),) if "linear_2" in spec.modal_linears else ())
        infos.update(_e3_linear(f"{layer}/linear_2", layer, linear_2_in, gate_in, names={len(mid): "modality"},
                                rows=rows))

    readout = module.readout
    if readout.kind == "linear":
        for k in range(len(readout.dims) - 1):
            irr_in = ((readout.dims[k], 0, 1),)
            if module.modal_readout and k == 0:
                irr_in += ((modalities, 0, 1),)
            infos.update(_e3_linear(f"readout_{k}", "readout", irr_in, ((readout.dims[k + 1], 0, 1),),
                                    names={1: "modality"}))
    else:
        infos.update(_mlp("readout", "readout", readout.dims, l=0))
    return infos


# ---------------------------------------------------------------------------
# MACE (sparse_eqv.models.mace)
# ---------------------------------------------------------------------------


def _mace_linear(prefix: str, layer: str, irreps_in: e3nn.Irreps, irreps_out: e3nn.Irreps,
                 paths: dict[int, str] | None = None) -> dict[str, LeafInfo]:
    """Leaves of `blocks.Linear`; paths: the convolution path behind input chunk i."""
    out = {}
    for p in linear_instructions(irreps_in, irreps_out):
        if 0 in p.shape:
            continue
        ir_out = irreps_out[p.i_out].ir
        label = (paths or {}).get(p.i_in, f"{irreps_in[p.i_in].ir} -> {ir_out}")
        out[f"params/{prefix}/{p.name}"] = LeafInfo(layer, prefix, p.shape, path=label, l=ir_out.l)
    return out


def _mace_skip_tp(prefix: str, layer: str, irreps_in: e3nn.Irreps, irreps_out: e3nn.Irreps,
                  symbols: list[str]) -> dict[str, LeafInfo]:
    """`FullyConnectedTensorProduct(x, one-hot Zx0e -> out)`: w[i1,0,o] (mul1, Z, mul_out)."""
    attrs = e3nn.Irreps(f"{len(symbols)}x0e")
    out = {}
    for ins in fully_connected_tp_instructions(irreps_in, attrs, irreps_out):
        ir_out = irreps_out[ins.i_out].ir
        out[f"params/{prefix}/{tp_weight_name(ins, irreps_in, attrs, irreps_out)}"] = LeafInfo(
            layer, prefix, ins.shape, path=f"{irreps_in[ins.i_in1].ir} x Z -> {ir_out}", l=ir_out.l,
            element=_per_element(1, symbols),
        )
    return out


def _describe_mace(config: dict[str, Any]) -> dict[str, LeafInfo]:
    module = MACE.from_config(config)
    layers, readouts = mace_structure(module.config_dict())
    symbols = _symbols(config)
    n_elements = len(symbols)
    channels = e3nn.Irreps(module.hidden_irreps).count("0e")
    infos: dict[str, LeafInfo] = {
        f"params/node_embedding/w[0,0] {n_elements}x0e,{channels}x0e": LeafInfo(
            "embedding", "node_embedding", (n_elements, channels), l=0, element=_per_element(0, symbols),
        )
    }
    edge = sh_irreps(module.max_ell)
    for t, spec in enumerate(layers):
        layer, inter = f"layer_{t}", f"interactions_{t}"
        node_feats, target, hidden = (e3nn.Irreps(s) for s in (spec.node_feats, spec.target, spec.hidden_out))
        if "Residual" in spec.interaction:
            infos.update(_mace_skip_tp(f"{inter}/skip_tp", layer, node_feats, hidden, symbols))
        else:
            infos.update(_mace_skip_tp(f"{inter}/skip_tp", layer, target, target, symbols))
        infos.update(_mace_linear(f"{inter}/linear_up", layer, node_feats, node_feats))
        irreps_mid, instructions = conv_tp_structure(node_feats, edge, target)
        tp = tp_path_weights(node_feats, edge, irreps_mid, instructions)
        by_output = {}
        columns, l_columns = [], []
        for ins in tp:
            label = f"{node_feats[ins.i_in1].ir} x {edge[ins.i_in2].ir} -> {irreps_mid[ins.i_out].ir}"
            by_output[ins.i_out] = label
            stop = ins.start + int(np.prod(ins.shape))
            columns.append((ins.start, stop, label))
            l_columns.append((ins.start, stop, irreps_mid[ins.i_out].ir.l))
        dims = (module.num_bessel,) + tuple(module.radial_MLP) + (columns[-1][1] if columns else 0,)
        infos.update(_mlp(f"{inter}/conv_tp_weights", layer, dims, Split(1, tuple(columns)),
                          Split(1, tuple(l_columns))))
        if "Density" in spec.interaction:
            infos.update(_mlp(f"{inter}/density_fn", layer, (module.num_bessel, 1)))
        # the linear after the convolution reads irreps_mid unsimplified: one input chunk per path
        infos.update(_mace_linear(f"{inter}/linear", layer, irreps_mid, target, paths=by_output))

        prod = f"products_{t}"
        for (_, ir), couplings in zip(hidden, module.product_couplings[t]):
            for nu in range(1, spec.correlation + 1):
                infos[f"params/{prod}/symmetric_contractions/w[{ir},nu={nu}]"] = LeafInfo(
                    layer, f"{prod}/symmetric_contractions", (n_elements, len(couplings[nu - 1]), channels),
                    path=f"nu={nu} -> {ir}", l=ir.l, element=_per_element(0, symbols),
                )
        infos.update(_mace_linear(f"{prod}/linear", layer, hidden, hidden))

    heads = f"{len(module.heads)}x0e"
    for t, readout in enumerate(readouts):
        prefix = f"readouts_{t}"
        if readout.nonlinear:
            mlp = e3nn.Irreps(readout.mlp)
            infos.update(_mace_linear(f"{prefix}/linear_1", "readout", e3nn.Irreps(readout.irreps_in), mlp))
            infos.update(_mace_linear(f"{prefix}/linear_2", "readout", mlp, e3nn.Irreps(heads)))
        else:
            infos.update(_mace_linear(f"{prefix}/linear", "readout", e3nn.Irreps(readout.irreps_in),
                                      e3nn.Irreps(heads)))
    return infos
