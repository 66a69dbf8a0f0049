"""NequIP-family message passing (nequip 0.19.1 and SevenNet 0.13) as a Flax module.

One module reproduces both packages; the config says which variant each
piece follows. Per interaction layer (e3nn conventions throughout):

    sc   = self-connection(x)            e3nn Linear (SevenNet "linear") or
                                         FullyConnectedTensorProduct(x, node attrs)
    x    = Linear_1(x)
    x    = x * pre_norm[type_j]          nequip: 1/sqrt(avg_num_neighbors) on the
                                         sender's features, before the sum
    m_ij = TP_uvu(x_j, Y(r_ij); R(|r_ij|))   weights from a radial MLP
    x_i  = sum_j m_ij / post_norm        SevenNet: the checkpoint's `denominator`
    x    = Linear_2(x) + sc
    x    = Gate(x)                       (+ x_old for a nequip resnet layer)

then a scalar readout, per-type scale and shift, and (nequip) a ZBL pair term.
Edge e points from sender j (neighbour) to receiver i (centre) and carries
r_j - r_i: SevenNet and nequip both gather x[edge_index[1]] onto
edge_index[0] with edge vectors pos[edge_index[1]] - pos[edge_index[0]],
so receivers = edge_index[0] and the vector sign is the same as theirs.

Irreps are kept as tuples of (mul, l, p) and sorted the way e3nn (torch)
sorts them, i.e. by the tuple (l, p), so 0o comes before 0e. e3nn-jax sorts
0e first; its `Irreps.sort` is therefore not used. Features are flat arrays
(N, irreps dim) laid out exactly as the torch package lays them out, so every
parameter leaf maps to one slice of one torch tensor.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import e3nn_jax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
import numpy as np

from sparse_eqv.errors import UnsupportedModelError
from sparse_eqv.models.blocks import (
    RADIAL_WEIGHTS_NAME,
    channel_minor,
    over_edge_blocks,
    per_element_product,
    split_last,
    uvu_edge_product,
)

Irreps = tuple[tuple[int, int, int], ...]  # ((mul, l, p), ...), p = +1 even / -1 odd

# ---------------------------------------------------------------- irreps helpers


def parse_irreps(text: str) -> Irreps:
    """'128x0e+64x1o' -> ((128, 0, 1), (64, 1, -1)); order kept, nothing merged."""
    out = []
    for term in text.replace(" ", "").split("+"):
        if not term:
            continue
        mul, ir = term.split("x") if "x" in term else ("1", term)
        out.append((int(mul), int(ir[:-1]), {"e": 1, "o": -1}[ir[-1]]))
    return tuple(out)


def irreps_str(irreps: Irreps) -> str:
    return "+".join(f"{m}x{l}{'e' if p == 1 else 'o'}" for m, l, p in irreps)


def sort_irreps(irreps: Irreps) -> tuple[Irreps, tuple[int, ...]]:
    """e3nn (torch) `Irreps.sort`: stable sort on (l, p); returns (sorted, p) with p[old] = new."""
    order = sorted(range(len(irreps)), key=lambda i: ((irreps[i][1], irreps[i][2]), i, irreps[i][0]))
    perm = [0] * len(irreps)
    for new, old in enumerate(order):
        perm[old] = new
    return tuple(irreps[i] for i in order), tuple(perm)


def simplify_irreps(irreps: Irreps) -> Irreps:
    """Merge neighbouring chunks of the same irrep (e3nn `simplify`: no sorting)."""
    out: list[list[int]] = []
    for m, l, p in irreps:
        if out and (out[-1][1], out[-1][2]) == (l, p):
            out[-1][0] += m
        elif m > 0:
            out.append([m, l, p])
    return tuple(tuple(x) for x in out)


def ir_product(l1: int, p1: int, l2: int, p2: int) -> list[tuple[int, int]]:
    """Irreps in l1 x l2, in e3nn's order (increasing l)."""
    return [(l, p1 * p2) for l in range(abs(l1 - l2), l1 + l2 + 1)]


def chunks(x: jax.Array, irreps: Irreps) -> list[jax.Array]:
    """Split a flat (N, dim) array into per-chunk (N, mul, 2l+1) views."""
    parts = split_last(x, [m * (2 * l + 1) for m, l, _ in irreps])
    return [part.reshape(x.shape[0], m, 2 * l + 1) for part, (m, l, _) in zip(parts, irreps)]


def flat(blocks: Sequence[jax.Array]) -> jax.Array:
    return jnp.concatenate([b.reshape(b.shape[0], -1) for b in blocks], axis=1)


def conv_instructions(
    irreps_in: Irreps, irreps_sh: Irreps, irreps_out: Irreps, sort_by_output: bool
) -> tuple[list[tuple[int, int, int]], Irreps]:
    """The 'uvu' convolution paths of nequip's InteractionBlock / SevenNet's IrrepsConvolution.

    Every (x chunk, Y chunk, product irrep in irreps_out) gets its own output
    chunk; the chunks are then sorted (e3nn order). SevenNet >= 0.11 also sorts
    the instructions by output chunk (its weight columns follow that order);
    nequip keeps them in construction order.

    Returns:
        instructions [(i_x, i_sh, i_mid)] in weight-column order, irreps_mid.
    """
    allowed = {(l, p) for _, l, p in irreps_out}
    mid, ins = [], []
    for i, (m, l1, p1) in enumerate(irreps_in):
        for j, (_, l2, p2) in enumerate(irreps_sh):
            for ir in ir_product(l1, p1, l2, p2):
                if ir in allowed:
                    ins.append((i, j, len(mid)))
                    mid.append((m, *ir))
    mid_sorted, perm = sort_irreps(tuple(mid))
    ins = [(i, j, perm[k]) for i, j, k in ins]
    if sort_by_output:
        ins = sorted(ins, key=lambda t: t[2])
    return ins, mid_sorted


# ------------------------------------------------------------------ activations

_ACTS = {
    "silu": jax.nn.silu,
    "tanh": jnp.tanh,
    "abs": jnp.abs,
    "sigmoid": jax.nn.sigmoid,
    "relu": jax.nn.relu,
    "ssp": lambda x: jax.nn.softplus(x) - math.log(2.0),
}
# parity of the function: +1 even, -1 odd, 0 neither (e3nn Activation's test)
_ACT_PARITY = {"silu": 0, "tanh": -1, "abs": 1, "sigmoid": 0, "relu": 0, "ssp": 0}


def activation(name: str):
    if name not in _ACTS:
        raise UnsupportedModelError(f"activation {name!r} is not implemented (known: {', '.join(_ACTS)})")
    return _ACTS[name]


def second_moment_scale(name: str) -> float:
    """Gauss-Hermite estimate of e3nn's `normalize2mom` constant <f(z)^2>^-1/2.

    Only the initial value of the constant: e3nn estimates it by Monte Carlo
    (1e6 samples, seed 0), so converters overwrite it with the torch value.
    """
    z, w = np.polynomial.hermite_e.hermegauss(200)
    with jax.ensure_compile_time_eval():
        f = np.asarray(activation(name)(jnp.asarray(z)), dtype=np.float64)
    c = float((w @ f**2 / np.sqrt(2 * np.pi)) ** -0.5)
    return 1.0 if abs(c - 1.0) < 1e-4 else c


def act_output_parity(name: str, p_in: int) -> int:
    """Parity of act(x) for a scalar of parity p_in (e3nn Activation rules)."""
    if p_in == 1:
        return 1
    parity = _ACT_PARITY[name]
    if parity == 0:
        raise UnsupportedModelError(f"activation {name!r} has no parity and cannot act on odd scalars")
    return 1 if parity == 1 else -1


# --------------------------------------------------------------------- specs


@dataclasses.dataclass(frozen=True)
class GateSpec:
    """e3nn Gate: act(scalars) + act(gates) * gated, acts given per chunk."""

    scalars: str
    act_scalars: tuple[str, ...]
    gates: str
    act_gates: tuple[str, ...]
    gated: str

    def layout(self) -> tuple[Irreps, Irreps, list[tuple[int, int]], Irreps]:
        """The gate's input and output irreps.

        As e3nn's `_Sortcut`: scalars, gates and gated are each simplified,
        concatenated and sorted; the input irreps are that list simplified.

        Returns:
            irreps_in (sorted, simplified), the sorted chunk list before
            simplifying, for each of its chunks (group 0/1/2, index in group),
            irreps_out = act(scalars) + gated * act(gates).
        """
        groups = [simplify_irreps(parse_irreps(s)) for s in (self.scalars, self.gates, self.gated)]
        cat = tuple(c for g in groups for c in g)
        owner = [(gi, k) for gi, g in enumerate(groups) for k in range(len(g))]
        sorted_cat, perm = sort_irreps(cat)
        order: list[tuple[int, int]] = [(0, 0)] * len(cat)
        for old, new in enumerate(perm):
            order[new] = owner[old]
        scalars, gates, gated = groups
        if len(self.act_scalars) != len(scalars) or len(self.act_gates) != len(gates):
            raise UnsupportedModelError(f"gate {self}: one activation per (simplified) scalar and gate chunk")
        if sum(m for m, _, _ in gates) != sum(m for m, _, _ in gated):
            raise UnsupportedModelError(f"gate: {self.gates} gates do not match gated irreps {self.gated}")
        out = [(m, 0, act_output_parity(a, p)) for (m, _, p), a in zip(scalars, self.act_scalars)]
        # ElementwiseTensorProduct(gated, gates): split at both chunkings
        gate_parity = [act_output_parity(a, p) for (_, _, p), a in zip(gates, self.act_gates)]
        gated_ends, gate_ends = np.cumsum([m for m, _, _ in gated]), np.cumsum([m for m, _, _ in gates])
        bounds = sorted({0, *gated_ends.tolist(), *gate_ends.tolist()})
        for a, b in zip(bounds, bounds[1:]):
            _, l, p = gated[int(np.searchsorted(gated_ends, a, side="right"))]
            gp = gate_parity[int(np.searchsorted(gate_ends, a, side="right"))]
            out.append((b - a, l, p * gp))
        return simplify_irreps(sorted_cat), sorted_cat, order, tuple(out)


@dataclasses.dataclass(frozen=True)
class MLPSpec:
    """Dense layers x @ (W_k * alpha_k), act(x) * act_scale between layers.

    kind "e3nn": e3nn FullyConnectedNet (alpha = 1/sqrt(h_in), act scaled by
    normalize2mom); "nequip": nequip ScalarMLPFunction with forward weight init
    (alpha = gain/sqrt(h_in), gain sqrt(2) after the first layer when there is
    a nonlinearity); "linear": stacked e3nn Linear 0e->0e layers (no act).
    """

    dims: tuple[int, ...]
    kind: str
    act: str | None

    def alphas(self) -> list[float]:
        out = []
        for k, h_in in enumerate(self.dims[:-1]):
            gain = math.sqrt(2.0) if (self.kind == "nequip" and self.act is not None and k > 0) else 1.0
            out.append(gain / math.sqrt(h_in))
        return out


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    irreps_in: str
    gate: GateSpec
    radial: MLPSpec
    self_connection: str  # "linear" | "tensor_product" | "none"
    sort_instructions: bool
    resnet: bool = False
    modal_linears: tuple[str, ...] = ()  # of "linear_1", "linear_2": inputs get the modality one-hot appended


# --------------------------------------------------------------- flax modules


class E3Linear(nn.Module):
    """e3nn `o3.Linear` without biases: leaf w[i_in,i_out] (mul_in, mul_out) per path.

    out_j = sum_i x_i @ w[i,j] / sqrt(sum_i mul_i), over i with the irrep of j.
    """

    irreps_in: str
    irreps_out: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        irr_in, irr_out = parse_irreps(self.irreps_in), parse_irreps(self.irreps_out)
        xs = chunks(x, irr_in)
        outs = []
        for j, (mo, lo, po) in enumerate(irr_out):
            paths = [i for i, (_, l, p) in enumerate(irr_in) if (l, p) == (lo, po)]
            fan_in = sum(irr_in[i][0] for i in paths)
            acc = jnp.zeros((x.shape[0], mo, 2 * lo + 1), x.dtype)
            for i in paths:
                w = self.param(f"w[{i},{j}]", nn.initializers.normal(1.0), (irr_in[i][0], mo), x.dtype)
                acc = acc + jnp.einsum("nui,uw->nwi", xs[i], w) / math.sqrt(fan_in)
            outs.append(acc)
        return flat(outs)


class ScalarTensorProduct(nn.Module):
    """e3nn `FullyConnectedTensorProduct(x, s -> out)` with s scalar (0e) node attributes.

    Leaf w[i_x,0,i_out] (mul_x, n_attr, mul_out) per path; path normalisation
    'element': out_j = sum_i einsum(x_i, s, w) / sqrt(sum_i mul_i * n_attr).

    Attributes:
        num_types: n_attr when the attributes are one_hot(species) (SevenNet):
            then each node's weight slice is gathered (`blocks.per_element_product`).
        node_block: nodes per block on CPU for that gather.
    """

    irreps_in: str
    irreps_out: str
    num_types: int
    node_block: int | None = 8

    @nn.compact
    def __call__(self, x: jax.Array, attrs: jax.Array | None, species: jax.Array) -> jax.Array:
        """x (N, irreps_in.dim), attrs (N, n_attr) or None for one_hot(species), species (N,) -> (N, irreps_out.dim)."""
        irr_in, irr_out = parse_irreps(self.irreps_in), parse_irreps(self.irreps_out)
        xs = chunks(x, irr_in)
        n_attr = self.num_types if attrs is None else attrs.shape[1]
        outs = []
        for j, (mo, lo, po) in enumerate(irr_out):
            paths = [i for i, (_, l, p) in enumerate(irr_in) if (l, p) == (lo, po)]
            fan_in = sum(irr_in[i][0] * n_attr for i in paths)
            acc = jnp.zeros((x.shape[0], mo, 2 * lo + 1), x.dtype)
            for i in paths:
                w = self.param(f"w[{i},0,{j}]", nn.initializers.normal(1.0), (irr_in[i][0], n_attr, mo), x.dtype)
                if attrs is None:
                    acc = acc + per_element_product(xs[i], species, w, self.node_block) / math.sqrt(fan_in)
                else:
                    acc = acc + jnp.einsum("nui,nv,uvw->nwi", xs[i], attrs, w) / math.sqrt(fan_in)
            outs.append(acc)
        return flat(outs)


class MLP(nn.Module):
    """Dense stack of `MLPSpec`; leaves layer{k} (h_in, h_out) as in torch."""

    spec: MLPSpec

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        alphas = self.spec.alphas()
        n = len(alphas)
        if self.spec.act is not None:
            act = activation(self.spec.act)
            if self.spec.kind == "e3nn":
                scale = self.variable(
                    "constants", "act_scale", lambda: jnp.asarray(second_moment_scale(self.spec.act), x.dtype)
                ).value
            else:
                scale = 1.0
        for k in range(n):
            w = self.param(f"layer{k}", nn.initializers.normal(1.0), (self.spec.dims[k], self.spec.dims[k + 1]), x.dtype)
            x = x @ (w * alphas[k])
            if k < n - 1 and self.spec.act is not None:
                x = act(x) * scale
        return x


class Gate(nn.Module):
    """e3nn `nn.Gate`: scalars -> act, gated irreps times act(gates)."""

    spec: GateSpec

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        _, sorted_chunks, order, _ = self.spec.layout()
        sizes = [len(simplify_irreps(parse_irreps(t))) for t in (self.spec.scalars, self.spec.gates, self.spec.gated)]
        groups: list[list[Any]] = [[None] * n for n in sizes]
        for block, (g, k) in zip(chunks(x, sorted_chunks), order):
            groups[g][k] = block
        scalars, gates, gated = groups
        scales = {}
        for name in set(self.spec.act_scalars) | set(self.spec.act_gates):
            scales[name] = self.variable(
                "constants", f"act_scale_{name}", lambda n=name: jnp.asarray(second_moment_scale(n), x.dtype)
            ).value
        out = [activation(a)(s) * scales[a] for s, a in zip(scalars, self.spec.act_scalars)]
        g = [activation(a)(b[..., 0]) * scales[a] for b, a in zip(gates, self.spec.act_gates)]
        g = jnp.concatenate(g, axis=1) if g else jnp.zeros((x.shape[0], 0), x.dtype)
        start = 0
        for b in gated:
            out.append(b * g[:, start : start + b.shape[1], None])
            start += b.shape[1]
        return flat(out) if out else jnp.zeros((x.shape[0], 0), x.dtype)


def _conv_messages(interaction: "Interaction", acc, x, edges):
    """One block of edges through the radial MLP and the 'uvu' convolution, summed onto receivers.

    Args:
        interaction: the Interaction (its `radial` MLP and `cg_*` constants are created in its scope).
        acc: per irreps_mid chunk (N, 2l+1, mul), the messages summed so far.
        x: (N, irreps_in.dim) node features after linear_1 and pre_norm.
        edges: radial_basis (B, n_basis), sh (B, irreps_sh.dim), senders (B,), receivers (B,);
            a receiver >= N marks a padding edge.

    Returns:
        (acc plus this block's messages, None), the body of `blocks.over_edge_blocks`.
    """
    radial_basis, sh, senders, receivers = edges
    spec = interaction.spec
    irr_in, irr_sh = parse_irreps(spec.irreps_in), parse_irreps(interaction.irreps_sh)
    instructions, irr_mid = conv_instructions(irr_in, irr_sh, spec.gate.layout()[0], spec.sort_instructions)
    n_weights = sum(irr_in[i][0] for i, _, _ in instructions)
    weights = MLP(
        dataclasses.replace(spec.radial, dims=spec.radial.dims + (n_weights,)), name="radial", parent=interaction
    )(radial_basis)
    weights = checkpoint_name(weights, RADIAL_WEIGHTS_NAME)
    # The convolution runs channel-minor: per irrep (E, 2l+1, mul), so every per-edge product is an
    # elementwise loop over contiguous channels and its cotangents reduce over contiguous channels
    # (SevenNet-0, float32 STR train step on 4 x 107 Cu atoms: 3.4-3.7 -> 2.2-2.6 s on 2 cores).
    x_j = channel_minor(chunks(x, irr_in), senders)
    y = chunks(sh, irr_sh)
    y_cg: dict[tuple[int, int, int], jax.Array] = {}  # Y_j contracted with the CG block, (E, 2l1+1, 2l3+1)
    path_weights = split_last(weights, [irr_in[i][0] for i, _, _ in instructions])
    acc = list(acc)
    for (i, j, k), w in zip(instructions, path_weights):
        l1 = irr_in[i][1]
        l2, l3 = irr_sh[j][1], irr_mid[k][1]
        if (l1, j, l3) not in y_cg:
            cg = interaction.variable(
                "constants", f"cg_{l1}_{l2}_{l3}",
                lambda a=l1, b=l2, c=l3: jnp.asarray(e3nn_jax.clebsch_gordan(a, b, c), x.dtype),
            ).value
            # e3nn 'uvu', path normalisation 'element', one path per output chunk: sqrt(2 l3 + 1)
            y_cg[(l1, j, l3)] = math.sqrt(2 * l3 + 1) * jnp.einsum("ej,ijk->eik", y[j][:, 0, :], cg)
        message = uvu_edge_product(x_j[i], y_cg[(l1, j, l3)], w)  # (B, 2l3+1, mul)
        acc[k] = acc[k] + jax.ops.segment_sum(message, receivers, num_segments=acc[k].shape[0])
    return acc, None


class Interaction(nn.Module):
    """One convolution layer (see the module docstring).

    The edges go through the radial MLP, the convolution and the sum onto
    receivers in blocks of at most `edge_block` (`blocks.over_edge_blocks`);
    None runs all edges at once.
    """

    spec: LayerSpec
    irreps_sh: str
    num_types: int
    edge_block: int | None = 512

    @nn.compact
    def __call__(self, x, node_attrs, species, sh, radial_basis, senders, receivers, modality=None):
        spec = self.spec
        irr_in, irr_sh = parse_irreps(spec.irreps_in), parse_irreps(self.irreps_sh)
        gate_in = spec.gate.layout()[0]
        n_node = x.shape[0]
        old_x = x

        if spec.self_connection == "linear":
            sc = E3Linear(spec.irreps_in, irreps_str(gate_in), name="self_connection")(x)
        elif spec.self_connection == "tensor_product":
            sc = ScalarTensorProduct(spec.irreps_in, irreps_str(gate_in), self.num_types, name="self_connection")(
                x, node_attrs, species
            )
        else:
            sc = None

        x = _modal_linear(spec.irreps_in, spec.irreps_in, "linear_1" in spec.modal_linears, modality, "linear_1")(x)
        pre_norm = self.variable("constants", "pre_norm", lambda: jnp.ones((self.num_types,), x.dtype)).value
        x = x * pre_norm[species][:, None]

        _, irr_mid = conv_instructions(irr_in, irr_sh, gate_in, spec.sort_instructions)
        acc = [jnp.zeros((n_node, 2 * l + 1, mul), x.dtype) for mul, l, _ in irr_mid]
        acc = over_edge_blocks(_conv_messages, self, acc, x, (radial_basis, sh, senders, receivers), self.edge_block)
        x = flat([a.transpose(0, 2, 1) for a in acc])
        post_norm = self.variable("constants", "post_norm", lambda: jnp.ones((), x.dtype)).value
        x = x / post_norm

        x = _modal_linear(
            irreps_str(simplify_irreps(irr_mid)), irreps_str(gate_in), "linear_2" in spec.modal_linears, modality, "linear_2"
        )(x)
        if sc is not None:
            x = x + sc
        x = Gate(spec.gate, name="gate")(x)
        if spec.resnet:
            x = x + old_x
        return x


def _modal_linear(irreps_in: str, irreps_out: str, modal: bool, modality, name: str):
    """E3Linear; for a multi-fidelity SevenNet layer its input is x (+) the modality one-hot.

    As sevenn's IrrepsLinear with modalities: irreps_in + "Mx0e", unsimplified,
    so the one-hot is a chunk of its own (leaf w[n_chunks,j]) and counts in
    the fan-in of the scalar outputs.
    """
    if not modal:
        return E3Linear(irreps_in, irreps_out, name=name)
    linear = E3Linear(f"{irreps_in}+{modality.shape[0]}x0e", irreps_out, name=name)
    return lambda x: linear(jnp.concatenate([x, jnp.broadcast_to(modality, (x.shape[0], modality.shape[0]))], axis=1))


def _polynomial_cutoff(x: jax.Array, p: float) -> jax.Array:
    """DimeNet envelope on x = r / r_max."""
    return (
        1.0
        - (p + 1.0) * (p + 2.0) / 2.0 * x**p
        + p * (p + 2.0) * x ** (p + 1.0)
        - p * (p + 1.0) / 2.0 * x ** (p + 2.0)
    )


def _xplor_cutoff(r: jax.Array, r_on: float, r_cut: float) -> jax.Array:
    r2, on2, cut2 = r * r, r_on * r_on, r_cut * r_cut
    return jnp.where(r < r_on, 1.0, (cut2 - r2) ** 2 * (cut2 + 2 * r2 - 3 * on2) / (cut2 - on2) ** 3)


def _zbl_edge_energy(z_i, z_j, r):
    """ZBL screened nuclear repulsion per directed edge (half of the pair), eV (metal units)."""
    x = (z_i**0.23 + z_j**0.23) * r / 0.46850
    psi = (
        0.02817 * jnp.exp(-0.20162 * x)
        + 0.28022 * jnp.exp(-0.40290 * x)
        + 0.50986 * jnp.exp(-0.94229 * x)
        + 0.18175 * jnp.exp(-3.19980 * x)
    )
    return 0.5 * 14.399645 * (z_i * z_j / r) * psi


class NequIP(nn.Module):
    """NequIP / SevenNet energy model: apply(variables, vectors, species, senders, receivers) -> (N,) eV.

    Attributes (see `from_config` for the JSON form):
        num_types: elements in the model's table.
        r_max: cutoff, Å.
        embedding_scale: node embedding = table[type] * scale (1/sqrt(T) for
            SevenNet's one-hot e3nn Linear, 1 for nequip's nn.Embedding).
        node_attrs: "one_hot" (SevenNet) or "embedding" (nequip) operand of a
            tensor-product self-connection.
        num_basis: Bessel functions 2/r_max sin(k_n r)/r (k_n in constants).
        cutoff: ("polynomial", p) | ("polynomial_masked", p) | ("xplor", r_on).
        irreps_sh: spherical harmonics (component normalisation).
        sh_normalize: normalise edge vectors before Y (SevenNet `_normalize_sph`).
        layers: `LayerSpec` per interaction.
        readout: `MLPSpec` from the last features to one scalar; kind
            "linear" is SevenNet's chain of e3nn Linear 0e layers.
        num_modalities: multi-fidelity SevenNet: size of the modality one-hot
            (constants "modality"), appended to the inputs of the linears its
            layers name and, with modal_readout, of the first readout linear.
        zbl_p: polynomial cutoff exponent of a nequip ZBL term, or None.
        return_features: also return each layer's output features (a tuple
            of (N, dim) arrays laid out as `feature_irreps()` says), as
            (node_energies, features); off by default (heads such as
            `sparse_eqv.models.magmom` read them).
    """

    num_types: int
    r_max: float
    embedding_features: int
    embedding_scale: float
    node_attrs: str
    num_basis: int
    cutoff: tuple[str, float]
    irreps_sh: str
    sh_normalize: bool
    layers: tuple[LayerSpec, ...]
    readout: MLPSpec
    zbl_p: float | None = None
    num_modalities: int = 0
    modal_readout: bool = False
    return_features: bool = False

    def feature_irreps(self) -> tuple[str, ...]:
        """Irreps of each layer's output features (what `return_features` returns)."""
        return tuple(layer_output_irreps(spec) for spec in self.layers)

    @nn.compact
    def __call__(self, vectors, species, senders, receivers):
        dtype = vectors.dtype
        r = jnp.sqrt(jnp.sum(vectors**2, axis=-1))
        k = self.variable(
            "constants", "bessel_k", lambda: jnp.arange(1, self.num_basis + 1, dtype=dtype) * math.pi / self.r_max
        ).value
        basis = 2.0 / self.r_max * jnp.sin(k * r[:, None]) / r[:, None]
        kind, value = self.cutoff
        if kind == "xplor":
            envelope = _xplor_cutoff(r, value, self.r_max)
        else:
            envelope = _polynomial_cutoff(r / self.r_max, value)
            if kind == "polynomial_masked":
                envelope = envelope * (r < self.r_max)
        radial_basis = basis * envelope[:, None]
        sh = e3nn_jax.spherical_harmonics(
            self.irreps_sh, vectors, normalize=self.sh_normalize, normalization="component"
        ).array

        table = self.param(
            "embedding", nn.initializers.normal(1.0), (self.num_types, self.embedding_features), dtype
        )
        x = table[species] * self.embedding_scale
        node_attrs = None if self.node_attrs == "one_hot" else x  # None: one_hot(species), gathered by ScalarTensorProduct
        modality = None
        if self.num_modalities:
            modality = self.variable(
                "constants", "modality", lambda: jnp.eye(self.num_modalities, dtype=dtype)[0]
            ).value
        features = []
        for t, spec in enumerate(self.layers):
            x = Interaction(spec, self.irreps_sh, self.num_types, name=f"layer_{t}")(
                x, node_attrs, species, sh, radial_basis, senders, receivers, modality
            )
            features.append(x)
        if self.readout.kind == "linear":
            dims = self.readout.dims
            for k in range(len(dims) - 1):
                x = _modal_linear(
                    f"{dims[k]}x0e", f"{dims[k + 1]}x0e", self.modal_readout and k == 0, modality, f"readout_{k}"
                )(x)
            energy = x[:, 0]
        else:
            energy = MLP(self.readout, name="readout")(x)[:, 0]

        scale = self.variable("constants", "scale", lambda: jnp.ones((self.num_types,), dtype)).value
        shift = self.variable("constants", "shift", lambda: jnp.zeros((self.num_types,), dtype)).value
        energy = energy * scale[species] + shift[species]
        if self.zbl_p is not None:
            z = self.variable("constants", "zbl_atomic_numbers", lambda: jnp.ones((self.num_types,), dtype)).value
            z_i, z_j = z[species[receivers]], z[species[senders]]
            pair = _zbl_edge_energy(z_i, z_j, r) * _polynomial_cutoff(r / self.r_max, self.zbl_p) * (r < self.r_max)
            energy = energy + jax.ops.segment_sum(pair, receivers, num_segments=x.shape[0])
        if self.return_features:
            return energy, tuple(features)
        return energy

    @staticmethod
    def from_config(config: dict[str, Any]) -> "NequIP":
        """Build from the JSON config a converter writes (keys as the attributes)."""
        try:
            layers = tuple(
                LayerSpec(
                    irreps_in=layer["irreps_in"],
                    gate=GateSpec(
                        scalars=layer["gate"]["scalars"],
                        act_scalars=tuple(layer["gate"]["act_scalars"]),
                        gates=layer["gate"]["gates"],
                        act_gates=tuple(layer["gate"]["act_gates"]),
                        gated=layer["gate"]["gated"],
                    ),
                    radial=MLPSpec(tuple(layer["radial"]["hidden"]), layer["radial"]["kind"], layer["radial"]["act"]),
                    self_connection=layer["self_connection"],
                    sort_instructions=layer["sort_instructions"],
                    resnet=layer.get("resnet", False),
                    modal_linears=tuple(layer.get("modal_linears", ())),
                )
                for layer in config["layers"]
            )
            readout = config["readout"]
            return NequIP(
                num_types=len(config["atomic_numbers"]),
                r_max=float(config["r_max"]),
                embedding_features=int(config["embedding"]["features"]),
                embedding_scale=float(config["embedding"]["scale"]),
                node_attrs=config["embedding"]["node_attrs"],
                num_basis=int(config["radial_basis"]["num_basis"]),
                cutoff=(config["radial_basis"]["cutoff"], float(config["radial_basis"]["cutoff_arg"])),
                irreps_sh=config["irreps_sh"],
                sh_normalize=bool(config.get("sh_normalize", True)),
                layers=layers,
                readout=MLPSpec(tuple(readout["dims"]), readout["kind"], readout["act"]),
                zbl_p=config.get("zbl_p"),
                num_modalities=int(config.get("modality", {}).get("count", 0)),
                modal_readout=bool(config.get("modality", {}).get("readout", False)),
            )
        except KeyError as err:
            raise UnsupportedModelError(f"nequip/sevenn config lacks the key {err}") from err


def layer_output_irreps(spec: LayerSpec) -> str:
    """Irreps a layer outputs (the gate's output), as e3nn writes them."""
    return irreps_str(spec.gate.layout()[3])
