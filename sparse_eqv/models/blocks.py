"""Building blocks shared by the Flax models, reproducing e3nn (torch) numerics.

Everything here mirrors one piece of the torch packages the checkpoints come
from (e3nn 0.4.4 / 0.6, mace-torch, nequip, sevenn), with the same operation
order so float64 results agree to rounding:

    radial bases and envelopes     bessel_basis, polynomial_cutoff,
                                   agnesi_transform, zbl_edge_energy
    activations                    ACTIVATIONS, normalize2mom_constant
    e3nn.nn.FullyConnectedNet      FullyConnectedNet
    e3nn.o3.Linear                 Linear, linear_instructions
    e3nn.o3.TensorProduct          TPInstruction, tp_path_weights;
                                   EdgeTensorProduct (per-edge weights, channel-minor),
                                   channel_minor, uvu_edge_product
    e3nn.o3.FullyConnectedTP       fully_connected_tp_instructions;
                                   SpeciesTensorProduct, per_element_product
                                   (its second operand one_hot(species))
    e3nn.o3.Irreps.sort (torch)    sort_irreps, simplify_irreps

Irreps are `e3nn_jax.Irreps` (kept unsimplified: "8x0e+8x0e" has two
entries, as in torch). Their torch order differs from e3nn-jax's for odd
parity scalars, so sorting uses `sort_irreps`, never `Irreps.sort`.

Parameters follow e3nn-jax's naming, one leaf per e3nn instruction:
`w[i_in,i_out] 8x0e,8x0e` for a Linear path, `w[i1,i2,i_out] a,b,c` for a
weighted tensor-product path, `layer{k}` for a FullyConnectedNet layer.
Normalisation constants that torch computes by sampling (normalize2mom) and
Clebsch-Gordan blocks are "constants" variables, so a converter can fill them
with the checkpoint's own values.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import e3nn_jax as e3nn
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# ---------------------------------------------------------------------------
# Radial functions (mace.modules.radial)
# ---------------------------------------------------------------------------


def bessel_basis(x: jax.Array, weights: jax.Array, prefactor: jax.Array) -> jax.Array:
    """prefactor * sin(w_n x) / x (MACE `BesselBasis`).

    Args:
        x: (E,) distances, Å (never zero).
        weights: (n,) frequencies n*pi/r_max, 1/Å.
        prefactor: () sqrt(2/r_max).

    Returns:
        (E, n).
    """
    x = x[:, None]
    return prefactor * (jnp.sin(weights * x) / x)


def polynomial_cutoff(x: jax.Array, r_max: jax.Array, p: int) -> jax.Array:
    """Smooth envelope from 1 at x=0 to 0 at r_max, zero beyond (MACE `PolynomialCutoff`).

    Args:
        x: (E,) distances, Å.
        r_max: () or (E,) cutoff radius, Å.
        p: polynomial order.

    Returns:
        (E,) envelope.
    """
    r = x / r_max
    envelope = (
        1.0
        - ((p + 1.0) * (p + 2.0) / 2.0) * r**p
        + p * (p + 2.0) * r ** (p + 1)
        - (p * (p + 1.0) / 2) * r ** (p + 2)
    )
    return jnp.where(x < r_max, envelope, 0.0)


def agnesi_transform(x: jax.Array, r_0: jax.Array, a: jax.Array, q: jax.Array, p: jax.Array) -> jax.Array:
    """Agnesi distance transform 1 / (1 + a (x/r0)^q / (1 + (x/r0)^(q-p))) (MACE `AgnesiTransform`).

    Args:
        x: (E,) distances, Å.
        r_0: (E,) half the sum of the two atoms' covalent radii, Å.
        a, q, p: () transform constants.

    Returns:
        (E,) transformed distances (dimensionless, in (0, 1]).
    """
    r = x / r_0
    return 1.0 / (1 + (a * r**q / (1 + r ** (q - p))))


def zbl_edge_energy(
    x: jax.Array,
    z_u: jax.Array,
    z_v: jax.Array,
    r_max: jax.Array,
    c: jax.Array,
    a_exp: jax.Array,
    a_prefactor: jax.Array,
    p: int,
) -> jax.Array:
    """Half the ZBL screened-Coulomb energy of each directed edge (MACE `ZBLBasis`).

    Args:
        x: (E,) distances, Å.
        z_u, z_v: (E,) atomic numbers of sender and receiver (float).
        r_max: (E,) envelope radius (sum of covalent radii), Å.
        c: (4,) screening coefficients.
        a_exp, a_prefactor: () screening-length constants.
        p: envelope polynomial order.

    Returns:
        (E,) eV; summing over edges onto receivers gives node energies.
    """
    a = a_prefactor * 0.529 / (z_u**a_exp + z_v**a_exp)
    r_over_a = x / a
    phi = (
        c[0] * jnp.exp(-3.2 * r_over_a)
        + c[1] * jnp.exp(-0.9423 * r_over_a)
        + c[2] * jnp.exp(-0.4028 * r_over_a)
        + c[3] * jnp.exp(-0.2016 * r_over_a)
    )
    v_edges = (14.3996 * z_u * z_v) / x * phi
    envelope = polynomial_cutoff(x, r_max, p)
    return 0.5 * v_edges * envelope


# ---------------------------------------------------------------------------
# Activations and their second-moment normalisation (e3nn.math.normalize2mom)
# ---------------------------------------------------------------------------

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "tanh": jnp.tanh,
}
_NUMPY_ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "silu": lambda z: z / (1.0 + np.exp(-z)),
    "tanh": np.tanh,
}


def normalize2mom_constant(name: str) -> float:
    """<f(z)^2>^(-1/2) for z ~ N(0, 1), by Gauss-Hermite quadrature.

    e3nn estimates this by sampling (torch seed 0, 10^6 draws), which differs
    from the exact value in the 4th digit: converted models carry the
    checkpoint's constant; this value only initialises fresh models.
    """
    z, w = np.polynomial.hermite_e.hermegauss(200)
    f = _NUMPY_ACTIVATIONS[name](z)
    return float((np.sum(w * f**2) / np.sqrt(2 * np.pi)) ** -0.5)


class FullyConnectedNet(nn.Module):
    """e3nn `nn.FullyConnectedNet`: x @ (W / sqrt(h_in)) with normalised activation between layers.

    Attributes:
        hs: layer widths (input, hidden..., output).
        act: name in ACTIVATIONS, or None for a linear network.
        param_dtype: dtype of the weights.

    Params: `layer{k}` (h_k, h_{k+1}). Constants: `act_norm` () -- the
    activation's normalize2mom factor (1.0 where e3nn treats it as identity),
    only when some layer has an activation.
    """

    hs: tuple[int, ...]
    act: str | None
    param_dtype: Any = jnp.float64

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(..., hs[0]) -> (..., hs[-1])."""
        n_layers = len(self.hs) - 1
        act_norm = None
        if self.act is not None and n_layers > 1:
            act_norm = self.variable(
                "constants", "act_norm", lambda: jnp.asarray(normalize2mom_constant(self.act), self.param_dtype)
            ).value
        for k, (h_in, h_out) in enumerate(zip(self.hs[:-1], self.hs[1:])):
            w = self.param(f"layer{k}", nn.initializers.normal(1.0), (h_in, h_out), self.param_dtype)
            x = x @ (w / h_in**0.5)
            if k < n_layers - 1 and self.act is not None:
                x = ACTIVATIONS[self.act](x) * act_norm
        return x


# ---------------------------------------------------------------------------
# Irreps helpers with e3nn (torch) ordering
# ---------------------------------------------------------------------------


def sort_irreps(irreps: e3nn.Irreps) -> tuple[e3nn.Irreps, tuple[int, ...]]:
    """e3nn (torch) `Irreps.sort()`: order by (l, p) with p=-1 first; returns (sorted, p).

    p[i] is the new position of entry i (torch's `sort().p`).
    """
    entries = sorted((mul_ir.ir.l, mul_ir.ir.p, i, mul_ir.mul) for i, mul_ir in enumerate(irreps))
    inv = [i for _, _, i, _ in entries]
    perm = [0] * len(inv)
    for new, old in enumerate(inv):
        perm[old] = new
    sorted_irreps = e3nn.Irreps([(mul, (l, p)) for l, p, _, mul in entries])
    return sorted_irreps, tuple(perm)


def simplify_irreps(irreps: e3nn.Irreps) -> e3nn.Irreps:
    """e3nn `Irreps.simplify()`: merge neighbouring equal irreps, drop zero multiplicities."""
    out: list[tuple[int, e3nn.Irrep]] = []
    for mul, ir in irreps:
        if out and out[-1][1] == ir:
            out[-1] = (out[-1][0] + mul, ir)
        elif mul > 0:
            out.append((mul, ir))
    return e3nn.Irreps(out)


def _zeros_if_none(chunk: jax.Array | None, shape: tuple[int, ...], dtype) -> jax.Array:
    return jnp.zeros(shape, dtype) if chunk is None else chunk


def split_last(x: jax.Array, sizes: Sequence[int]) -> list[jax.Array]:
    """(..., sum(sizes)) -> [(..., size)] as one `split`: its cotangent is one concatenation,
    where slices' cotangents would each be zero-padded to the full width and added."""
    return jnp.split(x, np.cumsum(sizes)[:-1].tolist(), axis=-1) if len(sizes) > 1 else [x]


def irreps_chunks(x: e3nn.IrrepsArray) -> list[jax.Array | None]:
    """`x.chunks` ((..., mul, 2l+1) per irrep, None where mul is 0) from one `split` of x.array."""
    parts = split_last(x.array, [m.dim for m in x.irreps])
    lead = x.shape[:-1]
    return [p.reshape(lead + (m.mul, m.ir.dim)) if m.dim else None for p, m in zip(parts, x.irreps)]


# ---------------------------------------------------------------------------
# e3nn.o3.Linear
# ---------------------------------------------------------------------------


class LinearPath(NamedTuple):
    """One e3nn Linear instruction: weight (mul_in, mul_out) at flat offset `start`."""

    name: str
    i_in: int
    i_out: int
    shape: tuple[int, int]
    start: int
    path_weight: float


def linear_instructions(irreps_in: e3nn.Irreps, irreps_out: e3nn.Irreps) -> list[LinearPath]:
    """Instructions of e3nn `o3.Linear(irreps_in, irreps_out)` (all paths, no bias, 'element' norm).

    Order and path weights as e3nn builds them: i_in outer, i_out inner;
    weight 1/sqrt(sum of mul_in over the paths into i_out).
    """
    pairs = [
        (i_in, i_out)
        for i_in, mi in enumerate(irreps_in)
        for i_out, mo in enumerate(irreps_out)
        if mi.ir == mo.ir
    ]
    paths = []
    start = 0
    for i_in, i_out in pairs:
        fan_in = sum(irreps_in[j].mul for j, o in pairs if o == i_out)
        fan_in = 1.0 if fan_in == 0 else fan_in
        shape = (irreps_in[i_in].mul, irreps_out[i_out].mul)
        name = f"w[{i_in},{i_out}] {irreps_in[i_in]},{irreps_out[i_out]}"
        paths.append(LinearPath(name, i_in, i_out, shape, start, fan_in ** (-0.5)))
        start += shape[0] * shape[1]
    return paths


class Linear(nn.Module):
    """e3nn (torch) `o3.Linear` with internal, shared weights and no bias.

    Attributes:
        irreps_in, irreps_out: irreps strings, unsimplified (their entries
            define the instructions, exactly as in torch).
        param_dtype: dtype of the weights.

    Params: one leaf per instruction, named `w[i_in,i_out] {in},{out}`,
    shape (mul_in, mul_out): torch's flat `weight[start:start+mul_in*mul_out]`
    viewed row-major.
    """

    irreps_in: str
    irreps_out: str
    param_dtype: Any = jnp.float64

    @nn.compact
    def __call__(self, x: e3nn.IrrepsArray) -> e3nn.IrrepsArray:
        """(..., irreps_in.dim) -> (..., irreps_out.dim), both mul_ir layout."""
        irreps_in = e3nn.Irreps(self.irreps_in)
        irreps_out = e3nn.Irreps(self.irreps_out)
        if x.irreps != irreps_in:
            raise ValueError(f"Linear expects {irreps_in}, got {x.irreps}")
        lead = x.shape[:-1]
        paths = [p for p in linear_instructions(irreps_in, irreps_out) if 0 not in p.shape]
        weights = {p.name: self.param(p.name, nn.initializers.normal(1.0), p.shape, self.param_dtype) for p in paths}
        chunks = []
        for i_out, mo in enumerate(irreps_out):
            into = [p for p in paths if p.i_out == i_out]
            if not into:
                chunks.append(jnp.zeros(lead + (mo.mul, mo.ir.dim), x.dtype))
                continue
            # The paths into one output share their path weight: one matmul over the stacked inputs.
            inputs = [
                _zeros_if_none(x.chunks[p.i_in], lead + (irreps_in[p.i_in].mul, mo.ir.dim), x.dtype) for p in into
            ]
            w = jnp.concatenate([weights[p.name] for p in into], axis=0)
            stacked = jnp.concatenate(inputs, axis=-2) if len(inputs) > 1 else inputs[0]
            chunks.append(into[0].path_weight * jnp.einsum("uw,...ui->...wi", w, stacked))
        return e3nn.from_chunks(irreps_out, chunks, lead, x.dtype)


def _sum_or_zeros(terms: Sequence[jax.Array], shape: tuple[int, ...], dtype) -> jax.Array:
    """Sum left to right (e3nn's `_sum_tensors`), zeros if there is nothing to sum."""
    if not terms:
        return jnp.zeros(shape, dtype)
    out = terms[0]
    for term in terms[1:]:
        out = out + term
    return out


# ---------------------------------------------------------------------------
# e3nn.o3.TensorProduct
# ---------------------------------------------------------------------------


class TPInstruction(NamedTuple):
    """One e3nn TensorProduct instruction with its final normalisation factor.

    path_weight is e3nn's sqrt(alpha) (irrep and path normalisation included);
    shape is the weight's path_shape; start its offset in the flat weight.
    """

    i_in1: int
    i_in2: int
    i_out: int
    mode: str
    has_weight: bool
    path_weight: float
    shape: tuple[int, ...]
    start: int


def tp_path_weights(
    irreps_in1: e3nn.Irreps,
    irreps_in2: e3nn.Irreps,
    irreps_out: e3nn.Irreps,
    instructions: Sequence[tuple],
    irrep_normalization: str = "component",
    path_normalization: str = "element",
) -> list[TPInstruction]:
    """e3nn `o3.TensorProduct.__init__`'s instruction processing ('uvw' and 'uvu' modes).

    Args:
        instructions: (i_in1, i_in2, i_out, mode, has_weight[, path_weight]).

    Returns:
        TPInstruction list in the given order, flat weight offsets filled in
        for the weighted ones.
    """

    def path_shape(i1, i2, io, mode):
        if mode == "uvw":
            return (irreps_in1[i1].mul, irreps_in2[i2].mul, irreps_out[io].mul)
        if mode == "uvu":
            return (irreps_in1[i1].mul, irreps_in2[i2].mul)
        raise ValueError(f"tensor-product connection mode {mode!r} is not implemented")

    def num_elements(i1, i2, mode):
        return irreps_in1[i1].mul * irreps_in2[i2].mul if mode == "uvw" else irreps_in2[i2].mul

    full = [tuple(ins) if len(ins) == 6 else tuple(ins) + (1.0,) for ins in instructions]
    out = []
    start = 0
    for i1, i2, io, mode, has_weight, weight in full:
        ir1, ir2, ir_out = irreps_in1[i1].ir, irreps_in2[i2].ir, irreps_out[io].ir
        if ir1.p * ir2.p != ir_out.p or not abs(ir1.l - ir2.l) <= ir_out.l <= ir1.l + ir2.l:
            raise ValueError(f"instruction {(i1, i2, io)}: {ir1} x {ir2} does not contain {ir_out}")
        if irrep_normalization == "component":
            alpha = ir_out.dim
        elif irrep_normalization == "norm":
            alpha = ir1.dim * ir2.dim
        else:
            alpha = 1
        if path_normalization == "element":
            x = sum(num_elements(j1, j2, m) for j1, j2, jo, m, _, _ in full if jo == io)
        elif path_normalization == "path":
            x = num_elements(i1, i2, mode) * len([1 for _, _, jo, _, _, _ in full if jo == io])
        else:
            x = 1
        if x > 0.0:
            alpha /= x
        alpha *= weight
        shape = path_shape(i1, i2, io, mode)
        out.append(TPInstruction(i1, i2, io, mode, has_weight, math.sqrt(alpha), shape, start))
        if has_weight:
            start += int(np.prod(shape))
    return out


def per_element_product(x: jax.Array, species: jax.Array, w: jax.Array, node_block: int | None = None) -> jax.Array:
    """out[z, o, i] = sum_u x[z, u, i] w[u, species[z], o]: a 'uvw' path whose second operand is one_hot(species).

    Args:
        x: (Z, mul_in, 2l+1) node features.
        species: (Z,) element indices.
        w: (mul_in, n_elements, mul_out) the path's weight.
        node_block: nodes per block on CPU (`over_node_blocks`); None: all nodes at once.

    Returns:
        (Z, mul_out, 2l+1), without the path's normalisation. Each node's
        (mul_in, mul_out) slice is gathered, where the product with the
        one-hot would cost n_elements times more and transpose w on every
        call (MACE-MP-0b3 skip_tp, 128 x 89 x 128, energy and forces of 22
        nodes on the 2-core CPU: 3.5 -> 0.5 ms in float64, 428 nodes 29 -> 22 ms).
        Over blocks of node_block nodes (`lax.map`, each block recomputed in
        the backward pass) the gathered slices are (node_block, mul_in,
        mul_out) at a time instead of (Z, mul_in, mul_out): 53 MiB per path
        for 422 nodes in float64, kept from the forward pass for the forces.
    """

    def product(x, species):
        return jnp.einsum("zui,uzo->zoi", x, jnp.take(w, species, axis=1, mode="clip"))

    return over_node_blocks(product, (x, species), node_block)


def tp_w3j_keys(
    irreps_in1: e3nn.Irreps, irreps_in2: e3nn.Irreps, irreps_out: e3nn.Irreps, instructions: Sequence[TPInstruction],
) -> list[tuple[int, int, int]]:
    """(l1, l2, l3) of the Clebsch-Gordan blocks `EdgeTensorProduct` reads (paths without an l=0 operand), in first-use order."""
    keys = []
    for ins in instructions:
        l1, l2, lo = irreps_in1[ins.i_in1].ir.l, irreps_in2[ins.i_in2].ir.l, irreps_out[ins.i_out].ir.l
        if 0 in (l1, l2, lo):
            continue
        if (l1, l2, lo) not in keys:
            keys.append((l1, l2, lo))
    return keys


def fully_connected_tp_instructions(
    irreps_in1: e3nn.Irreps, irreps_in2: e3nn.Irreps, irreps_out: e3nn.Irreps
) -> list[TPInstruction]:
    """Instructions of e3nn `o3.FullyConnectedTensorProduct` ('uvw', every allowed path)."""
    instructions = [
        (i1, i2, io, "uvw", True, 1.0)
        for i1, (_, ir1) in enumerate(irreps_in1)
        for i2, (_, ir2) in enumerate(irreps_in2)
        for io, (_, ir_out) in enumerate(irreps_out)
        if ir_out in ir1 * ir2
    ]
    return tp_path_weights(irreps_in1, irreps_in2, irreps_out, instructions)


def tp_weight_name(ins: TPInstruction, irreps_in1, irreps_in2, irreps_out) -> str:
    """Leaf name of a weighted tensor-product path: `w[i1,i2,i_out] a,b,c`."""
    return (
        f"w[{ins.i_in1},{ins.i_in2},{ins.i_out}] "
        f"{irreps_in1[ins.i_in1]},{irreps_in2[ins.i_in2]},{irreps_out[ins.i_out]}"
    )


def w3j_name(key: tuple[int, int, int]) -> str:
    """Constant name of a Clebsch-Gordan block, as e3nn's codegen buffer: `w3j_1_2_1`."""
    return "w3j_{}_{}_{}".format(*key)


class SpeciesTensorProduct(nn.Module):
    """e3nn `o3.FullyConnectedTensorProduct(irreps_in1, "{n}x0e", irreps_out)` applied to one_hot(species).

    Attributes:
        irreps_in1, irreps_out: irreps strings.
        num_elements: n, the one-hot width.
        param_dtype: dtype of the weights.
        node_block: nodes per block on CPU (`per_element_product`).

    Params: one per e3nn instruction, `w[i1,0,i_out] a,nx0e,c`
    (mul1, n, mul_out) per path; each node's slice is gathered
    (`per_element_product`).
    """

    irreps_in1: str
    num_elements: int
    irreps_out: str
    param_dtype: Any = jnp.float64
    node_block: int | None = 8

    @nn.compact
    def __call__(self, x1: e3nn.IrrepsArray, species: jax.Array) -> e3nn.IrrepsArray:
        """(B, in1.dim), (B,) element indices -> (B, out.dim)."""
        in1, in2, out = e3nn.Irreps(self.irreps_in1), e3nn.Irreps(f"{self.num_elements}x0e"), e3nn.Irreps(self.irreps_out)
        if x1.irreps != in1:
            raise ValueError(f"SpeciesTensorProduct expects {in1}, got {x1.irreps}")
        batch, dtype = x1.shape[0], x1.dtype
        chunks1 = irreps_chunks(x1)
        outputs: list[list[jax.Array]] = [[] for _ in out]
        for ins in fully_connected_tp_instructions(in1, in2, out):
            w = self.param(tp_weight_name(ins, in1, in2, out), nn.initializers.normal(1.0), ins.shape, self.param_dtype)
            m1, mo = in1[ins.i_in1], out[ins.i_out]
            if m1.dim == 0 or mo.dim == 0:
                continue
            a = _zeros_if_none(chunks1[ins.i_in1], (batch, m1.mul, m1.ir.dim), dtype)
            norm = 1.0 if mo.ir.l == 0 else 1.0 / math.sqrt(mo.ir.dim)  # e3nn's l2 = 0 code path
            outputs[ins.i_out].append((ins.path_weight * norm) * per_element_product(a, species, w, self.node_block))
        chunks = [_sum_or_zeros(outs, (batch, mo.mul, mo.ir.dim), dtype) for outs, mo in zip(outputs, out)]
        return e3nn.from_chunks(out, chunks, (batch,), dtype)


def channel_minor(blocks: Sequence[jax.Array], rows: jax.Array) -> list[jax.Array]:
    """Per-chunk (N, mul, 2l+1) blocks -> rows `rows` (E,) of each as (E, 2l+1, mul), gathered once."""
    n = blocks[0].shape[0]
    gathered = jnp.concatenate([b.transpose(0, 2, 1).reshape(n, -1) for b in blocks], axis=1)[rows]
    parts = split_last(gathered, [b.shape[1] * b.shape[2] for b in blocks])
    return [part.reshape(-1, b.shape[2], b.shape[1]) for part, b in zip(parts, blocks)]


def uvu_edge_product(x: jax.Array, factor: jax.Array, w: jax.Array) -> jax.Array:
    """One 'uvu' path on edges, channel-minor: out[e, k, u] = w[e, u] sum_q factor[e, q, k] x[e, q, u].

    Args:
        x: (E, 2l1+1, mul) the senders' features.
        factor: (E, 2l1+1, 2l3+1) the edge attribute contracted with the path's CG block.
        w: (E, mul) per-edge path weights.

    Returns:
        (E, 2l3+1, mul). Written as a sum of 2l1+1 broadcast products, so that
        XLA fuses it (and its cotangents) into loops over contiguous channels
        instead of E tiny batched matrix products.
    """
    return sum(factor[:, q, :, None] * x[:, q, None, :] for q in range(x.shape[1])) * w[:, None, :]


def cpu_block(block: int | None) -> int | None:
    """`block` when JAX computes on CPU, else None (no blocks).

    Blocks keep per-edge and per-node tensors cache-sized on CPU
    (docs/performance.md, levers 6 and 11). On a GPU a serial loop over
    small blocks would leave most of the device idle; there the models run
    all edges and nodes at once (not measured: no GPU was lent).
    """
    return block if jax.default_backend() == "cpu" else None


def equal_blocks(a: jax.Array, max_block: int, fill=0) -> jax.Array:
    """(n, ...) -> (n_blocks, b, ...): the fewest equal blocks of b <= max_block rows, padded at the end with fill."""
    n = a.shape[0]
    n_blocks = -(-n // max_block)
    b = -(-n // n_blocks)
    a = jnp.pad(a, ((0, n_blocks * b - n),) + ((0, 0),) * (a.ndim - 1), constant_values=fill)
    return a.reshape((n_blocks, b) + a.shape[1:])


def over_node_blocks(fn, arrays: Sequence[jax.Array], node_block: int | None):
    """fn(*arrays) for arrays of N rows, over equal blocks of at most node_block rows (`lax.map`).

    fn must act row by row. Each block is rematerialised in the backward
    passes, so fn's per-node intermediates exist for one block at a time.
    Padding rows (zeros) are cut from every output leaf, which returns (N, ...).
    node_block: rows per block on CPU (`cpu_block`); None, another backend
    or N <= node_block: one call of fn on all rows.
    """
    n = arrays[0].shape[0]
    node_block = cpu_block(node_block)
    if node_block is None or n <= node_block:
        return fn(*arrays)
    out = jax.lax.map(jax.checkpoint(lambda blocks: fn(*blocks)), tuple(equal_blocks(a, node_block) for a in arrays))
    return jax.tree_util.tree_map(lambda o: o.reshape((-1,) + o.shape[2:])[:n], out)


RADIAL_WEIGHTS_NAME = "radial_weights"  # `checkpoint_name` of a body's per-edge radial MLP output (see over_edge_blocks)


def over_edge_blocks(body, module: nn.Module, acc, node_feats, edges, edge_block: int | None):
    """Run `body` over equal blocks of at most edge_block edges, one after the other (`nn.scan`).

    Each block is rematerialised in the backward passes, so per-edge tensors
    and their cotangents exist for one block at a time. There are at least
    two blocks: a single call of body, rematerialised or not, leaves XLA
    free to schedule each layer's forward tensors (or their recomputation)
    early, so that many layers' per-edge tensors are alive at once
    (SevenNet-0, aspirin, float64 forces: 46 MiB of XLA temporaries with
    one plain call, 36 MiB with one rematerialised call, 15 MiB with two
    blocks). XLA:CPU allocates its temporaries afresh on every call,
    and glibc serves more than 32 MiB by mmap, so every call above that
    faults in and zeroes all of them. Up to two blocks' worth of edges
    (E <= 2 edge_block) the outputs the body names RADIAL_WEIGHTS_NAME (its
    radial MLP's per-edge weights) are kept for the backward pass instead
    of recomputed. That is at most (2 edge_block, n_weights) per layer
    (SevenNet-0, float64: 7.5 MiB), and SevenNet-0's float64 aspirin
    prediction went 0.037-0.038 -> 0.031-0.034 s.

    Args:
        body: `body(module, acc, node_feats, edges) -> (acc, None)`, the
            messages of the edges given added to acc; it creates its
            submodules with `parent=module`, so their variables keep their
            names (params and constants are shared by all blocks).
        acc: pytree of per-node accumulators, e.g. (N, 2l+1, mul) per irrep.
        node_feats: pytree of per-node inputs, the same for every block.
        edges: tuple of (E, ...) arrays or None, the last one the receivers
            (E,) int; padding edges get receiver N (dropped by segment sums,
            whose num_segments is N) and zeros elsewhere.
        edge_block: edges per block on CPU (`cpu_block`); None (or
            another backend, or E < 2): one call of body on all edges.
    """
    n_edges = edges[-1].shape[0]
    edge_block = cpu_block(edge_block)
    if edge_block is None or n_edges < 2:
        return body(module, acc, node_feats, edges)[0]
    policy = jax.checkpoint_policies.save_only_these_names(RADIAL_WEIGHTS_NAME) if n_edges <= 2 * edge_block else None
    edge_block = min(edge_block, -(-n_edges // 2))
    n_nodes = jax.tree_util.tree_leaves(acc)[0].shape[0]
    fills = (0,) * (len(edges) - 1) + (n_nodes,)
    edges = tuple(None if a is None else equal_blocks(a, edge_block, fill) for a, fill in zip(edges, fills))
    scan = nn.scan(
        nn.remat(body, prevent_cse=False, policy=policy),
        variable_broadcast=["params", "constants"],
        split_rngs={"params": False},
        in_axes=(nn.broadcast, 0),
    )
    return scan(module, acc, node_feats, edges)[0]


class EdgeTensorProduct(nn.Module):
    """e3nn `o3.TensorProduct(node irreps, edge attrs, out, 'uvu' instructions, shared_weights=False)`
    on each edge's sender, with e3nn's specialised code paths, channel-minor.

    Attributes:
        irreps_in1: node feature irreps; irreps_in2: edge attribute irreps
            (multiplicity 1 each, e.g. spherical harmonics); irreps_out: output irreps.
        instructions: (i_in1, i_in2, i_out, 'uvu', True[, path_weight]) as given to e3nn.
        param_dtype: dtype of the default CG constants.

    Constants: `w3j_l1_l2_l3` per path without an l=0 operand (defaults from
    e3nn-jax; converters put the checkpoint's blocks there). No params.
    """

    irreps_in1: str
    irreps_in2: str
    irreps_out: str
    instructions: tuple[tuple, ...]
    param_dtype: Any = jnp.float64

    @nn.compact
    def __call__(
        self, node_feats: e3nn.IrrepsArray, edge_attrs: e3nn.IrrepsArray, weights: jax.Array, senders: jax.Array
    ) -> list[jax.Array | None]:
        """(N, in1.dim), (E, in2.dim), (E, weight_numel), (E,) -> per irreps_out chunk (E, 2l+1, mul), None if unused."""
        in1, in2, out = e3nn.Irreps(self.irreps_in1), e3nn.Irreps(self.irreps_in2), e3nn.Irreps(self.irreps_out)
        instructions = tp_path_weights(in1, in2, out, self.instructions)
        if any(ins.mode != "uvu" or not ins.has_weight or in2[ins.i_in2].mul != 1 for ins in instructions):
            raise ValueError("EdgeTensorProduct: only weighted 'uvu' paths with multiplicity-1 edge attributes")
        w3j = {
            key: self.variable(
                "constants", w3j_name(key), lambda k=key: jnp.asarray(e3nn.clebsch_gordan(*k), self.param_dtype)
            ).value
            for key in tp_w3j_keys(in1, in2, out, instructions)
        }
        x = channel_minor(irreps_chunks(node_feats), senders)
        y = [None if c is None else c[:, 0, :] for c in irreps_chunks(edge_attrs)]  # (E, 2l2+1)
        per_path = split_last(weights, [int(np.prod(ins.shape)) for ins in instructions])
        factors: dict[tuple[int, int, int], jax.Array] = {}
        outputs: list[list[jax.Array]] = [[] for _ in out]
        for ins, w in zip(instructions, per_path):
            l1, l2, lo = in1[ins.i_in1].ir.l, in2[ins.i_in2].ir.l, out[ins.i_out].ir.l
            b = y[ins.i_in2]
            w = ins.path_weight * w
            if l2 == 0:  # identity CG block: scale the sender's features
                outputs[ins.i_out].append(x[ins.i_in1] * (b[:, 0] / math.sqrt(2 * lo + 1))[:, None, None] * w[:, None, :])
                continue
            key = (l1, ins.i_in2, lo)
            if key not in factors:
                if l1 == 0:
                    factors[key] = b[:, None, :] / math.sqrt(2 * lo + 1)
                elif lo == 0:
                    factors[key] = b[:, :, None] / math.sqrt(2 * l1 + 1)
                else:
                    factors[key] = jnp.einsum("ej,ijk->eik", b, w3j[(l1, l2, lo)])
            outputs[ins.i_out].append(uvu_edge_product(x[ins.i_in1], factors[key], w))
        return [sum(terms) if terms else None for terms in outputs]
