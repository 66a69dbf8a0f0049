"""MACE (mace-torch 0.3.16 `MACE` / `ScaleShiftMACE`) as a Flax module.

    node_energies = MACE.from_config(config).apply(variables, vectors, species, senders, receivers)

The forward pass follows mace-torch step by step (see `mace/modules/models.py`
and `blocks.py`), so a converted checkpoint predicts the same energies:

    E_i = E0[Z_i] + scale * (ZBL_i + sum_t readout_t(h_i^t)) + shift   (ScaleShiftMACE)
    E_i = E0[Z_i] + ZBL_i + sum_t readout_t(h_i^t)                     (MACE)

Supported: interaction blocks RealAgnostic{,Residual,Density,DensityResidual}
InteractionBlock, correlation 1..3 (any per layer), max_ell <= 3, hidden
irreps Cx0e[+Cx1o[+Cx2e]], Bessel radial basis with polynomial cutoff, the
Agnesi distance transform, ZBL pair repulsion, per-element E0s, scale/shift,
one head of a multi-head model (`config["head"]`).

Edge convention: sparse_eqv's vectors point from the centre (receiver) to the
neighbour (sender); mace's `positions[receiver] - positions[sender] + shift`
points the other way, so the model negates them. Messages are summed onto
receivers in both.

Variables:
    params     one leaf per e3nn instruction (see `sparse_eqv.models.blocks`):
               node_embedding/linear/w[0,0] Zx0e,Cx0e
               interactions_t/{linear_up,linear}/w[i,j] ...
               interactions_t/skip_tp/w[i1,i2,o] ...
               interactions_t/{conv_tp_weights,density_fn}/layer{k}
               products_t/symmetric_contractions/w[{ir},nu={nu}]  (n_elements, K, C)
               products_t/linear/w[i,j] ...
               readouts_t/linear/... or readouts_t/{linear_1,linear_2}/...
    constants  atomic_energies (n_elements,), scale_shift/{scale,shift},
               radial_embedding/{bessel_weights,prefactor,r_max}[/agnesi/{a,q,p,covalent_radii}],
               pair_repulsion/{c,a_exp,a_prefactor,covalent_radii},
               interactions_t/avg_num_neighbors (non-density blocks), interactions_t/conv_tp_weights/act_norm,
               interactions_t/conv_tp/w3j_l1_l2_l3, products_t/symmetric_contractions/U[{ir},nu={nu}],
               readouts_t/act_norm
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import math
from typing import Any

import ase.data
import e3nn_jax as e3nn
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
import numpy as np

from sparse_eqv.errors import UnsupportedModelError
from sparse_eqv.models.blocks import (
    ACTIVATIONS,
    EdgeTensorProduct,
    FullyConnectedNet,
    Linear,
    SpeciesTensorProduct,
    agnesi_transform,
    bessel_basis,
    normalize2mom_constant,
    RADIAL_WEIGHTS_NAME,
    over_edge_blocks,
    over_node_blocks,
    polynomial_cutoff,
    simplify_irreps,
    sort_irreps,
    tp_path_weights,
    zbl_edge_energy,
)

INTERACTION_CLASSES = (
    "RealAgnosticInteractionBlock",
    "RealAgnosticResidualInteractionBlock",
    "RealAgnosticDensityInteractionBlock",
    "RealAgnosticDensityResidualInteractionBlock",
)
DISTANCE_TRANSFORMS = ("None", "Agnesi")


# ---------------------------------------------------------------------------
# Structure: the irreps of every block, derived as mace-torch derives them
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LayerIrreps:
    """Irreps of one interaction + product layer (strings, unsimplified where torch is)."""

    interaction: str  # interaction class name
    node_feats: str  # input node features
    target: str  # interaction output = product input
    hidden_out: str  # product output (and residual skip output)
    correlation: int
    use_sc: bool


@dataclasses.dataclass(frozen=True)
class ReadoutIrreps:
    """One readout: linear (irreps_in -> heads x 0e) or non-linear through MLP irreps."""

    nonlinear: bool
    irreps_in: str
    mlp: str  # "" for a linear readout


def sh_irreps(max_ell: int) -> e3nn.Irreps:
    """0e + 1o + 2e + ... up to max_ell (e3nn `Irreps.spherical_harmonics`)."""
    return e3nn.Irreps([(1, (l, (-1) ** l)) for l in range(max_ell + 1)])


def repeat_irreps(irreps: e3nn.Irreps, times: int) -> e3nn.Irreps:
    """torch `irreps * n`: the list repeated n times (e3nn-jax's `*` multiplies multiplicities)."""
    return e3nn.Irreps(list(irreps) * times)


def conv_tp_structure(
    irreps_in: e3nn.Irreps, irreps_edge: e3nn.Irreps, target: e3nn.Irreps
) -> tuple[e3nn.Irreps, list[tuple]]:
    """mace `tp_out_irreps_with_instructions`: sorted 'uvu' outputs that lie in target.

    Returns:
        irreps_mid (sorted, unsimplified) and instructions (i1, i2, i_out, 'uvu', True)
        ordered by i_out.
    """
    entries, instructions = [], []
    for i, (mul, ir_in) in enumerate(irreps_in):
        for j, (_, ir_edge) in enumerate(irreps_edge):
            for ir_out in ir_in * ir_edge:
                if ir_out in target:
                    instructions.append((i, j, len(entries), "uvu", True))
                    entries.append((mul, ir_out))
    irreps_mid, perm = sort_irreps(e3nn.Irreps(entries))
    instructions = sorted(((i, j, perm[k], m, t) for i, j, k, m, t in instructions), key=lambda x: x[2])
    return irreps_mid, instructions


def mace_structure(config: dict[str, Any]) -> tuple[list[LayerIrreps], list[ReadoutIrreps]]:
    """Irreps of every layer and readout, as `mace.modules.models.MACE.__init__` builds them."""
    hidden = e3nn.Irreps(config["hidden_irreps"])
    channels = hidden.count("0e")
    sh = sh_irreps(config["max_ell"])
    interaction_irreps = str(simplify_irreps(sort_irreps(repeat_irreps(sh, channels))[0]))
    n = config["num_interactions"]
    n_heads = len(config["heads"])
    scalars = str(hidden[0])
    hidden_out = scalars if n == 1 else str(hidden)
    correlation = list(config["correlation"])
    layers = [
        LayerIrreps(
            config["interaction_first"],
            f"{channels}x0e",
            interaction_irreps,
            hidden_out,
            correlation[0],
            "Residual" in config["interaction_first"],
        )
    ]
    readouts = []
    if not config["use_last_readout_only"]:
        readouts.append(ReadoutIrreps(False, hidden_out, ""))
    mlp = str(simplify_irreps(repeat_irreps(e3nn.Irreps(config["MLP_irreps"]), n_heads)))
    for i in range(n - 1):
        last = i == n - 2
        out = scalars if last and not config["keep_last_layer_irreps"] else str(hidden)
        layers.append(LayerIrreps(config["interaction"], str(hidden), interaction_irreps, out, correlation[i + 1], True))
        if last:
            readouts.append(ReadoutIrreps(True, out, mlp))
        elif not config["use_last_readout_only"]:
            readouts.append(ReadoutIrreps(False, str(hidden), ""))
    return layers, readouts


def check_supported(config: dict[str, Any], where: str = "config") -> None:
    """Raise UnsupportedModelError for any option outside what this module reproduces."""

    cls = config["mace_class"]

    def fail(option, value, where_cls=None, supported=None):
        hint = f" (supported: {', '.join(supported)})" if supported else ""
        raise UnsupportedModelError(
            f"{where}: {where_cls or cls} option {option}={value!r} is not supported by the Flax MACE{hint}"
        )

    if cls not in ("MACE", "ScaleShiftMACE"):
        fail("model class", cls, supported=("MACE", "ScaleShiftMACE"))
    for key in ("interaction_first", "interaction"):
        if config[key] not in INTERACTION_CLASSES:
            fail(f"{key} (interaction block class)", config[key], supported=INTERACTION_CLASSES)
    if config["distance_transform"] not in DISTANCE_TRANSFORMS:
        fail("distance_transform", config["distance_transform"], supported=DISTANCE_TRANSFORMS)
    if config["gate"] is not None and config["gate"] not in ACTIVATIONS:
        fail("gate", config["gate"], "NonLinearReadoutBlock", supported=tuple(ACTIVATIONS))
    if not 0 <= config["max_ell"] <= 3:
        fail("max_ell", config["max_ell"])
    hidden = e3nn.Irreps(config["hidden_irreps"])
    channels = hidden[0].mul if len(hidden) else 0
    expected = e3nn.Irreps([(channels, (l, (-1) ** l)) for l in range(len(hidden))])
    if len(hidden) == 0 or len(hidden) > 3 or hidden != expected or channels == 0:
        fail("hidden_irreps", config["hidden_irreps"])
    if any(not 1 <= c <= 3 for c in config["correlation"]) or len(config["correlation"]) != config["num_interactions"]:
        fail("correlation", list(config["correlation"]))
    if config["head"] not in config["heads"]:
        fail("head", config["head"])


# ---------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------


def _segment_sum(data: jax.Array, segments: jax.Array, n: int) -> jax.Array:
    return jax.ops.segment_sum(data, segments, num_segments=n)


def _stack_irreps(x: e3nn.IrrepsArray) -> jax.Array:
    """mace `reshape_irreps`: (N, [C x ir1, C x ir2, ...]) -> (N, C, sum dims)."""
    return jnp.concatenate(
        [c if c is not None else jnp.zeros(x.shape[:-1] + (m.mul, m.ir.dim), x.dtype) for c, m in zip(x.chunks, x.irreps)],
        axis=-1,
    )


def _conv_messages(interaction: "InteractionBlock", acc, node_feats, edges):
    """One block of edges through the radial MLP and the conv tensor product, summed onto receivers.

    Args:
        interaction: the InteractionBlock (its `conv_tp_weights` and `conv_tp` are created here, in its scope).
        acc: per irreps_mid chunk (N, 2l+1, mul), the messages summed so far.
        node_feats: (N, node_feats_irreps) after linear_up.
        edges: edge_feats (B, num_bessel), edge_attrs (B, sh dim), cutoff (B,) or None, senders (B,),
            receivers (B,); a receiver >= N marks a padding edge.

    Returns:
        (acc plus this block's messages, None): the body of `nn.scan` over edge blocks.
    """
    edge_feats, edge_attrs, cutoff, senders, receivers = edges
    irreps_in = e3nn.Irreps(interaction.node_feats_irreps)
    irreps_edge = e3nn.Irreps(interaction.edge_attrs_irreps)
    irreps_mid, instructions = conv_tp_structure(irreps_in, irreps_edge, e3nn.Irreps(interaction.target_irreps))
    tp = tp_path_weights(irreps_in, irreps_edge, irreps_mid, instructions)
    weight_numel = sum(int(np.prod(ins.shape)) for ins in tp)
    tp_weights = FullyConnectedNet(
        (interaction.num_bessel,) + tuple(interaction.radial_MLP) + (weight_numel,), "silu", interaction.param_dtype,
        name="conv_tp_weights", parent=interaction,
    )(edge_feats)
    if cutoff is not None:
        tp_weights = tp_weights * cutoff[:, None]
    tp_weights = checkpoint_name(tp_weights, RADIAL_WEIGHTS_NAME)
    mji = EdgeTensorProduct(
        str(irreps_in), str(irreps_edge), str(irreps_mid), tuple(instructions), interaction.param_dtype,
        name="conv_tp", parent=interaction,
    )(node_feats, e3nn.IrrepsArray(irreps_edge, edge_attrs), tp_weights, senders)
    n_nodes = acc[0].shape[0]
    return [a + _segment_sum(m, receivers, n_nodes) for a, m in zip(acc, mji)], None


class InteractionBlock(nn.Module):
    """The four RealAgnostic interaction blocks of mace (`blocks.py`).

    Residual variants return the skip connection skip_tp(h, attrs) to the
    product; the others apply skip_tp to the message. Density variants divide
    the message by 1 + sum_j tanh(MLP(radial)^2) instead of avg_num_neighbors.

    The edges go through the radial MLP, the conv tensor product and the sum
    onto receivers in blocks of at most `edge_block` (`nn.scan`, each block
    rematerialised in the backward passes), so the per-edge tensors
    ((E, 2l+1, C) per path, the (E, weight_numel) radial weights) and their
    cotangents stay cache-sized; None runs all edges at once.
    """

    kind: str
    node_feats_irreps: str
    edge_attrs_irreps: str
    target_irreps: str
    hidden_irreps: str
    num_elements: int
    num_bessel: int
    radial_MLP: tuple[int, ...]
    param_dtype: Any = jnp.float64
    edge_block: int | None = 512

    @nn.compact
    def __call__(self, species, node_feats, edge_attrs, edge_feats, senders, receivers, cutoff):
        """Returns (message IrrepsArray of target irreps (N,), skip IrrepsArray or None).

        skip_tp, mace's FullyConnectedTensorProduct(x, one-hot node attrs), gathers each
        node's element weights (`blocks.SpeciesTensorProduct`) from species (N,).
        """
        residual = "Residual" in self.kind
        density = "Density" in self.kind
        n_nodes = node_feats.shape[0]
        sc = None
        if residual:
            sc = SpeciesTensorProduct(
                self.node_feats_irreps, self.num_elements, self.hidden_irreps, self.param_dtype, name="skip_tp"
            )(node_feats, species)
        node_feats = Linear(self.node_feats_irreps, self.node_feats_irreps, self.param_dtype, name="linear_up")(node_feats)
        irreps_in = e3nn.Irreps(self.node_feats_irreps)
        irreps_edge = e3nn.Irreps(self.edge_attrs_irreps)
        irreps_mid, instructions = conv_tp_structure(irreps_in, irreps_edge, e3nn.Irreps(self.target_irreps))
        if density:
            edge_density = jnp.tanh(
                FullyConnectedNet((self.num_bessel, 1), "silu", self.param_dtype, name="density_fn")(edge_feats) ** 2
            )
            if cutoff is not None:
                edge_density = edge_density * cutoff[:, None]
            node_density = _segment_sum(edge_density, receivers, n_nodes)
        dtype = jnp.result_type(node_feats, edge_feats, edge_attrs.array)  # the messages' dtype: the scan's carry
        acc = [jnp.zeros((n_nodes, ir.dim, mul), dtype) for mul, ir in irreps_mid]
        edges = (edge_feats, edge_attrs.array, cutoff, senders, receivers)
        acc = over_edge_blocks(_conv_messages, self, acc, node_feats, edges, self.edge_block)
        # Summed path by path: the (E, irreps_mid) concatenation of the messages is never built.
        message = e3nn.from_chunks(irreps_mid, [a.transpose(0, 2, 1) for a in acc], (n_nodes,), node_feats.dtype)
        message = Linear(str(irreps_mid), self.target_irreps, self.param_dtype, name="linear")(message)
        if density:
            message = e3nn.IrrepsArray(message.irreps, message.array / (node_density + 1))
        else:
            avg_num_neighbors = self.variable("constants", "avg_num_neighbors", lambda: jnp.asarray(1.0, self.param_dtype))
            message = e3nn.IrrepsArray(message.irreps, message.array / avg_num_neighbors.value)
        if not residual:
            message = SpeciesTensorProduct(
                self.target_irreps, self.num_elements, self.target_irreps, self.param_dtype, name="skip_tp"
            )(message, species)
        return message, sc


@functools.lru_cache(maxsize=None)
def monomial_indices(dim: int, nu: int) -> tuple[np.ndarray, np.ndarray]:
    """The degree-nu monomials of dim variables, and which entries of a (dim,)*nu tensor each collects.

    Returns:
        factors (P, nu) int: the variables of each monomial, sorted tuples
            (P = C(dim + nu - 1, nu));
        entries (P, nu!) int: flat indices into a (dim,)*nu array of the
            distinct permutations of each tuple, padded with dim**nu.
    """
    tuples = list(itertools.combinations_with_replacement(range(dim), nu))
    entries = np.full((len(tuples), math.factorial(nu)), dim**nu)
    for p, t in enumerate(tuples):
        perms = sorted(set(itertools.permutations(t)))
        entries[p, : len(perms)] = [np.ravel_multi_index(q, (dim,) * nu) for q in perms]
    return np.asarray(tuples).reshape(len(tuples), nu), entries


@functools.partial(jax.checkpoint, static_argnums=1)
def monomials(x: jax.Array, nu: int) -> jax.Array:
    """(..., D) -> (..., P): every product x_a x_b ... of nu factors with a <= b <= ...

    Rematerialised: backward passes recompute the nu selected factors (each
    (..., P)) from x instead of keeping them (MACE-MP-0b3-medium size, float32
    train step on 4 x 107 Cu atoms: XLA temporaries 6.36 -> 5.92 GiB).
    """
    factors, _ = monomial_indices(x.shape[-1], nu)
    out = None
    for j in range(nu):  # selections as one-hot products: their gradients are products too, not scatters
        factor = x @ jnp.asarray(np.eye(x.shape[-1])[:, factors[:, j]], x.dtype)
        out = factor if out is None else out * factor
    return out


def monomial_coefficients(u: jax.Array, rows: np.ndarray) -> jax.Array:
    """U (M, D, ..., D, K) with nu D axes -> (M, P', K) for the monomials `rows` of monomial_indices(D, nu).

    The coefficient of each monomial in sum_{a,b,..} U[m, a, b, .., k] x_a x_b ..:
    U summed over the distinct permutations of the monomial's indices.
    """
    m, dim, k, nu = u.shape[0], u.shape[1], u.shape[-1], u.ndim - 2
    flat = jnp.concatenate([u.reshape(m, dim**nu, k), jnp.zeros((m, 1, k), u.dtype)], axis=1)
    _, entries = monomial_indices(dim, nu)
    return flat[:, entries[rows], :].sum(axis=2)


Multiset = tuple[int, ...]  # the sorted l's of the nu inputs one U column couples, e.g. (1, 2, 3)


def u_couplings(u: np.ndarray, l_of_dim: np.ndarray, nu: int) -> list[list[list[int]]]:
    """Per column k of a U_nu matrix ([M,] D, ..., D, K; nu D axes): the multisets of l's its nonzero entries couple.

    l_of_dim (D,) is the l of each axis entry. mace builds every column from
    one coupling path, so each holds one multiset (none if all zero); the
    converter stores these as the config's `product_couplings`.
    """
    u = np.asarray(u).reshape((-1,) + u.shape[u.ndim - nu - 1 :])
    couplings = []
    for k in range(u.shape[-1]):
        support = np.argwhere(u[..., k] != 0)[:, 1:]  # (entries, nu) axis indices
        multisets = sorted({tuple(sorted(int(l) for l in l_of_dim[entry])) for entry in support})
        couplings.append([list(ms) for ms in multisets])  # lists: the config is JSON
    return couplings


def coupling_blocks(couplings: tuple[tuple[Multiset, ...], ...]) -> list[tuple[tuple[Multiset, ...], np.ndarray]]:
    """Group U columns that share monomials: [(multisets, columns)], multisets sorted, columns (K_b,).

    Args:
        couplings: per column k of one U_nu, the multisets of l's its nonzero
            entries couple (one for mace's U; none for an all-zero column).

    Returns:
        The connected components of columns linked by a common multiset: each
        column's monomials lie in its block's multisets only, so a block is a
        dense (P_b, K_b) piece of the otherwise zero (P, K) coefficients.
        All-zero columns are in no block.
    """
    blocks: list[tuple[set, list[int]]] = []
    for k, multisets in enumerate(couplings):
        if not multisets:
            continue
        joined = (set(multisets), [k])
        for block in [b for b in blocks if b[0] & joined[0]]:
            blocks.remove(block)
            joined = (joined[0] | block[0], block[1] + joined[1])
        blocks.append(joined)
    return [(tuple(sorted(ms)), np.asarray(sorted(ks))) for ms, ks in blocks]


def multiset_rows(l_of_dim: np.ndarray, multiset: Multiset) -> np.ndarray:
    """Rows of monomial_indices(D, nu) whose nu factors have the l's `multiset`, in their (lex) order.

    l_of_dim (D,) is the l of each axis of x, non-decreasing (irreps sorted by l).
    """
    factors, _ = monomial_indices(len(l_of_dim), len(multiset))
    return np.flatnonzero((l_of_dim[factors] == np.asarray(multiset)).all(axis=1))


class SymmetricContraction(nn.Module):
    """mace `SymmetricContraction`: per output irrep, sum_nu of U_nu-contracted nu-fold products.

    For each output irrep L (2L+1 = M) and correlation nu, with x (N, C, D)
    the stacked irreps of the input and W_nu[species] (N, K_nu, C):

        out[n, c, m] = sum_nu sum_k W_nu[n, k, c] sum_{a,b,..} U_nu[m, a, b, .., k] x[n, c, a] x[n, c, b] ..

    which equals mace's nested form (out = x . (U_nu . W_nu + out), nu from
    the correlation down to 1). It is evaluated in the basis of monomials:
    the nu-fold product of x has only C(D + nu - 1, nu) distinct entries
    (816 instead of 4096 for D = 16, nu = 3). Each column k of U couples
    one multiset of input l's (`couplings`, read from the checkpoint's U by
    the converter), so the monomial coefficients are block-sparse: per
    block of columns (`coupling_blocks`) the monomials of its multisets,
    built as products of the per-l monomials, contract with a dense
    (P_b, M, K_b) piece. MACE-MP-0b3-medium size, layer 1 (U_3 of 1o: 41616
    monomial-column pairs, 2495 in blocks): energy and gradient of 424 nodes
    on the 2-core CPU of docs/performance.md 1175 -> 277 ms in float64,
    290 -> 166 ms in float32.

    Nodes are contracted in blocks of at most `node_block`, one block after
    the other (`lax.map`), each block rematerialised in the backward passes:
    the (block, C, P) monomials and their cotangents then stay small. On
    the same CPU (float32 STR train step on 4 x 107 Cu atoms) blocks of 128
    nodes took peak RSS from 6.66 to 4.12 GB and the step from 5.1 to
    3.5-3.9 s; with the convolutions over edge blocks as well, blocks of 8
    nodes instead of 128 took the float32 108-atom prediction from 0.51 to
    0.35 s. Each block gathers its nodes' (block, K_nu, C) weights and puts
    their columns in block order; reordering the (n_elements, K_nu, C)
    tables instead copied 7.5 MiB per call in float64 (MP-0b3-medium, layer 1),
    live until the backward pass.

    Attributes:
        irreps_in: each l at most once, sorted by l (mace's interaction target irreps).
        couplings: per output irrep, per nu = 1..correlation, per column k of
            U_nu (K_nu = its length): the multisets of input l's it couples.
        node_block: nodes per block on CPU (None, or another backend: all
            nodes at once; `blocks.over_node_blocks`).
    """

    irreps_in: str
    irreps_out: str
    correlation: int
    num_elements: int
    couplings: tuple[tuple[tuple[tuple[Multiset, ...], ...], ...], ...]
    param_dtype: Any = jnp.float64
    node_block: int | None = 8

    @nn.compact
    def __call__(self, x: e3nn.IrrepsArray, species: jax.Array) -> e3nn.IrrepsArray:
        """x (N, irreps_in) features, species (N,) element indices -> (N, irreps_out)."""
        irreps_in, irreps_out = e3nn.Irreps(self.irreps_in), e3nn.Irreps(self.irreps_out)
        ls = [ir.l for _, ir in irreps_in]
        if ls != sorted(set(ls)):
            raise ValueError(f"SymmetricContraction: irreps_in {irreps_in} must hold each l once, sorted by l")
        l_of_dim = np.asarray([ir.l for _, ir in irreps_in for _ in range(ir.dim)])
        stacked = _stack_irreps(x)  # (N, C, D)
        n, channels, dim = stacked.shape
        # per output irrep, per nu: ([(multisets, (M, P_b, K_b))], columns in block order (K_nu,), W_nu (n_elements, K_nu, C))
        terms = []
        for (_, ir), couplings in zip(irreps_out, self.couplings):
            m_shape = (ir.dim,) if ir.l > 0 else ()
            out_terms = []
            for nu in range(self.correlation, 0, -1):
                k = len(couplings[nu - 1])
                u = self.variable(
                    "constants", f"U[{ir},nu={nu}]", lambda s=m_shape + (dim,) * nu + (k,): jnp.zeros(s, self.param_dtype)
                ).value
                w = self.param(
                    f"w[{ir},nu={nu}]", nn.initializers.normal(1.0 / k), (self.num_elements, k, channels), self.param_dtype
                )
                u = u.reshape((ir.dim,) + u.shape[len(m_shape) :])
                nu_blocks = coupling_blocks(couplings[nu - 1])
                if not nu_blocks:
                    continue
                pieces = []
                for multisets, columns in nu_blocks:
                    rows = np.concatenate([multiset_rows(l_of_dim, ms) for ms in multisets])
                    pieces.append((multisets, monomial_coefficients(u, rows)[:, :, columns]))
                out_terms.append((pieces, np.concatenate([columns for _, columns in nu_blocks]), w))
            terms.append(out_terms)
        offsets = {l: int(np.flatnonzero(l_of_dim == l)[0]) for l in ls}

        def contract(stacked, species):
            powers: dict[tuple[int, int], jax.Array] = {}  # (l, count) -> (n, C, P): monomials of one irrep

            def multiset_monomials(multiset):  # (n, C, P_ms), in multiset_rows order
                out = None
                for l, count in sorted(collections.Counter(multiset).items()):
                    if (l, count) not in powers:
                        x_l = stacked[..., offsets[l] : offsets[l] + 2 * l + 1]
                        powers[l, count] = x_l if count == 1 else monomials(x_l, count)
                    f = powers[l, count]
                    out = f if out is None else (out[..., :, None] * f[..., None, :]).reshape(f.shape[:-1] + (-1,))
                return out

            mono = {
                ms: multiset_monomials(ms)
                for out_terms in terms for pieces, _, _ in out_terms for multisets, _ in pieces for ms in multisets
            }
            chunks = []
            for (_, ir), out_terms in zip(irreps_out, terms):
                out = jnp.zeros(stacked.shape[:2] + (ir.dim,), stacked.dtype)
                for pieces, columns, w in out_terms:
                    basis = jnp.concatenate(
                        [
                            jnp.einsum("zcp,mpk->zcmk", jnp.concatenate([mono[ms] for ms in multisets], axis=-1), coeff)
                            for multisets, coeff in pieces
                        ],
                        axis=-1,
                    )  # (n, C, M, K_nu), columns in block order
                    # this block of nodes' weights, gathered, then put in block order: W_nu itself is not copied
                    out = out + jnp.einsum("zcmk,zkc->zcm", basis, jnp.take(w, species, axis=0, mode="clip")[:, columns])
                chunks.append(out)  # (n, C, 2L+1)
            return chunks

        chunks = over_node_blocks(contract, (stacked, species), self.node_block)
        return e3nn.from_chunks(irreps_out, chunks, (n,), stacked.dtype)


class ProductBlock(nn.Module):
    """mace `EquivariantProductBasisBlock`: symmetric contraction, linear, + skip."""

    irreps_in: str
    irreps_out: str
    correlation: int
    num_elements: int
    couplings: tuple[tuple[tuple[tuple[Multiset, ...], ...], ...], ...]
    use_sc: bool
    param_dtype: Any = jnp.float64

    @nn.compact
    def __call__(self, node_feats, sc, species):
        out = SymmetricContraction(
            self.irreps_in, self.irreps_out, self.correlation, self.num_elements, self.couplings, self.param_dtype,
            name="symmetric_contractions",
        )(node_feats, species)
        out = Linear(self.irreps_out, self.irreps_out, self.param_dtype, name="linear")(out)
        if self.use_sc and sc is not None:
            out = e3nn.IrrepsArray(out.irreps, out.array + sc.array)
        return out


class Readout(nn.Module):
    """mace `LinearReadoutBlock` / `NonLinearReadoutBlock`, evaluated for one head.

    Returns (N,) the chosen head's column.
    """

    irreps_in: str
    nonlinear: bool
    mlp_irreps: str
    gate: str | None
    num_heads: int
    head_index: int
    param_dtype: Any = jnp.float64

    @nn.compact
    def __call__(self, x: e3nn.IrrepsArray) -> jax.Array:
        out_irreps = f"{self.num_heads}x0e"
        if not self.nonlinear:
            return Linear(self.irreps_in, out_irreps, self.param_dtype, name="linear")(x).array[:, self.head_index]
        h = Linear(self.irreps_in, self.mlp_irreps, self.param_dtype, name="linear_1")(x).array
        if self.gate is not None:
            act_norm = self.variable(
                "constants", "act_norm", lambda: jnp.asarray(normalize2mom_constant(self.gate), self.param_dtype)
            ).value
            h = ACTIVATIONS[self.gate](h) * act_norm
        if self.num_heads > 1:
            width = h.shape[-1] // self.num_heads
            mask = np.zeros(h.shape[-1])
            mask[self.head_index * width : (self.head_index + 1) * width] = 1.0
            h = h * jnp.asarray(mask, h.dtype)
        h = e3nn.IrrepsArray(self.mlp_irreps, h)
        return Linear(self.mlp_irreps, out_irreps, self.param_dtype, name="linear_2")(h).array[:, self.head_index]


# ---------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------


class MACE(nn.Module):
    """mace-torch `MACE` / `ScaleShiftMACE` evaluating one head; see the module docstring.

    Attributes mirror mace's constructor arguments (config keys of the same
    name); `product_couplings[t][o][nu - 1]` holds, per column of U_nu of
    layer t's output irrep o, the multisets of input l's it couples (its
    length is K_nu; see `SymmetricContraction`).

    `init` gives random weights and mace's default constants, except the U
    matrices (zeros): they are read from a checkpoint by the converter.
    """

    mace_class: str
    atomic_numbers: tuple[int, ...]
    r_max: float
    num_bessel: int
    num_polynomial_cutoff: int
    max_ell: int
    interaction_first: str
    interaction: str
    num_interactions: int
    hidden_irreps: str
    MLP_irreps: str
    correlation: tuple[int, ...]
    gate: str | None
    radial_MLP: tuple[int, ...]
    pair_repulsion: bool
    distance_transform: str
    apply_cutoff: bool
    use_last_readout_only: bool
    keep_last_layer_irreps: bool
    heads: tuple[str, ...]
    head: str
    product_couplings: tuple[tuple[tuple[tuple[tuple[Multiset, ...], ...], ...], ...], ...]
    dtype: str = "float64"
    return_features: bool = False  # also return each layer's features: (node_energies, (N, dim) per layer)

    CONFIG_KEYS = (
        "mace_class", "atomic_numbers", "r_max", "num_bessel", "num_polynomial_cutoff", "max_ell",
        "interaction_first", "interaction", "num_interactions", "hidden_irreps", "MLP_irreps", "correlation",
        "gate", "radial_MLP", "pair_repulsion", "distance_transform", "apply_cutoff", "use_last_readout_only",
        "keep_last_layer_irreps", "heads", "head", "product_couplings", "dtype",
    )  # fmt: skip

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "MACE":
        """The module a converted model's config describes (lists become tuples)."""
        missing = [k for k in cls.CONFIG_KEYS if k not in config]
        if missing:
            raise UnsupportedModelError(f"MACE config lacks {', '.join(missing)}")
        check_supported(config)

        def frozen(value):
            return tuple(frozen(v) for v in value) if isinstance(value, (list, tuple)) else value

        return cls(**{k: frozen(config[k]) for k in cls.CONFIG_KEYS})

    def config_dict(self) -> dict[str, Any]:
        """The attributes as the config dict `from_config` reads."""
        return {k: getattr(self, k) for k in self.CONFIG_KEYS}

    def feature_irreps(self) -> tuple[str, ...]:
        """Irreps of each layer's output features (the product blocks' outputs)."""
        return tuple(layer.hidden_out for layer in mace_structure(self.config_dict())[0])

    @nn.compact
    def __call__(self, vectors: jax.Array, species: jax.Array, senders: jax.Array, receivers: jax.Array) -> jax.Array:
        """Node energies (N,) eV from edge vectors (E, 3) Å (centre -> neighbour) and species (N,)."""
        dtype = jnp.dtype(self.dtype)
        config = self.config_dict()
        layers, readouts = mace_structure(config)
        n_elements = len(self.atomic_numbers)
        head_index = list(self.heads).index(self.head)
        n_nodes = species.shape[0]

        # Edges as mace sees them: from sender (neighbour) to receiver (centre).
        vectors = -vectors
        lengths = jnp.linalg.norm(vectors, axis=-1)
        z_table = jnp.asarray(self.atomic_numbers)
        z_nodes = z_table[species]
        node_attrs = e3nn.IrrepsArray(f"{n_elements}x0e", jax.nn.one_hot(species, n_elements, dtype=dtype))

        e0s = self.variable("constants", "atomic_energies", lambda: jnp.zeros((n_elements,), dtype)).value
        node_e0 = e0s[species]
        channels = e3nn.Irreps(self.hidden_irreps).count("0e")
        node_feats = Linear(f"{n_elements}x0e", f"{channels}x0e", dtype, name="node_embedding")(node_attrs)
        edge_attrs = e3nn.spherical_harmonics(
            sh_irreps(self.max_ell), vectors / lengths[:, None], normalize=False, normalization="component"
        )
        edge_feats, cutoff = RadialEmbedding(
            self.r_max, self.num_bessel, self.num_polynomial_cutoff, self.distance_transform, self.apply_cutoff,
            self.dtype, name="radial_embedding",
        )(lengths, z_nodes[senders], z_nodes[receivers])

        if self.pair_repulsion:
            pair = self._pair_repulsion(lengths, z_nodes[senders], z_nodes[receivers], receivers, n_nodes, dtype)
        else:
            pair = jnp.zeros_like(node_e0)

        features = []
        for t, layer in enumerate(layers):
            message, sc = InteractionBlock(
                layer.interaction, layer.node_feats, str(sh_irreps(self.max_ell)), layer.target, layer.hidden_out,
                n_elements, self.num_bessel, tuple(self.radial_MLP), dtype, name=f"interactions_{t}",
            )(species, node_feats, edge_attrs, edge_feats, senders, receivers, cutoff)
            node_feats = ProductBlock(
                layer.target, layer.hidden_out, layer.correlation, n_elements, self.product_couplings[t], layer.use_sc,
                dtype, name=f"products_{t}",
            )(message, sc, species)
            features.append(node_feats)

        node_es = [pair]
        for t, readout in enumerate(readouts):
            feats = features[-1] if len(readouts) == 1 else features[t]
            node_es.append(
                Readout(
                    readout.irreps_in, readout.nonlinear, readout.mlp, self.gate, len(self.heads), head_index, dtype,
                    name=f"readouts_{t}",
                )(feats)
            )
        interaction_energy = jnp.sum(jnp.stack(node_es, axis=0), axis=0)
        if self.mace_class == "ScaleShiftMACE":
            scale_shift = self.variable(
                "constants", "scale_shift", lambda: {"scale": jnp.ones((), dtype), "shift": jnp.zeros((), dtype)}
            ).value
            node_energies = node_e0 + (scale_shift["scale"] * interaction_energy + scale_shift["shift"])
        else:
            node_energies = node_e0 + interaction_energy
        if self.return_features:
            return node_energies, tuple(f.array for f in features)
        return node_energies

    def _pair_repulsion(self, lengths, z_u, z_v, receivers, n_nodes, dtype):
        """ZBL node energies (N,) eV (mace `ZBLBasis`), summed onto receivers."""
        zbl = self.variable(
            "constants",
            "pair_repulsion",
            lambda: {
                "c": jnp.asarray([0.1818, 0.5099, 0.2802, 0.02817], dtype),
                "a_exp": jnp.asarray(0.300, dtype),
                "a_prefactor": jnp.asarray(0.4543, dtype),
                "covalent_radii": jnp.asarray(ase.data.covalent_radii, dtype),
            },
        ).value
        radii = zbl["covalent_radii"]
        r_max = radii[z_u] + radii[z_v]
        v_edges = zbl_edge_energy(
            lengths, z_u.astype(dtype), z_v.astype(dtype), r_max, zbl["c"], zbl["a_exp"], zbl["a_prefactor"],
            self.num_polynomial_cutoff,
        )
        return _segment_sum(v_edges, receivers, n_nodes)


class RadialEmbedding(nn.Module):
    """mace `RadialEmbeddingBlock`: Bessel basis of (optionally Agnesi-transformed) lengths times the envelope.

    Returns (edge_feats (E, num_bessel), cutoff (E,) or None): with
    apply_cutoff the envelope is already in edge_feats and cutoff is None.
    """

    r_max: float
    num_bessel: int
    p: int
    distance_transform: str
    apply_cutoff: bool
    dtype: str

    @nn.compact
    def __call__(self, lengths, z_u, z_v):
        """lengths (E,) Å, atomic numbers of sender and receiver (E,)."""
        dtype = jnp.dtype(self.dtype)
        bessel_weights = self.variable(
            "constants", "bessel_weights", lambda: jnp.pi / self.r_max * jnp.arange(1, self.num_bessel + 1, dtype=dtype)
        ).value
        prefactor = self.variable("constants", "prefactor", lambda: jnp.asarray((2.0 / self.r_max) ** 0.5, dtype)).value
        r_max = self.variable("constants", "r_max", lambda: jnp.asarray(self.r_max, dtype)).value
        cutoff = polynomial_cutoff(lengths, r_max, self.p)
        if self.distance_transform == "Agnesi":
            agnesi = self.variable(
                "constants",
                "agnesi",
                lambda: {
                    "a": jnp.asarray(1.0805, dtype),
                    "q": jnp.asarray(0.9183, dtype),
                    "p": jnp.asarray(4.5791, dtype),
                    "covalent_radii": jnp.asarray(ase.data.covalent_radii, dtype),
                },
            ).value
            radii = agnesi["covalent_radii"]
            r_0 = 0.5 * (radii[z_u] + radii[z_v])
            lengths = agnesi_transform(lengths, r_0, agnesi["a"], agnesi["q"], agnesi["p"])
        radial = bessel_basis(lengths, bessel_weights, prefactor)
        if not self.apply_cutoff:
            return radial, cutoff
        return radial * cutoff[:, None], None
