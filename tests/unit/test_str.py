"""Unit tests of the pure fine-tuning pieces on small pytrees: soft threshold,
STR / ELoRA parametrisations, labels and optimiser state, target selection,
sparsity counts, losses, E0 fit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from sparse_eqv import sparsity
from sparse_eqv.data.frames import Frame
from sparse_eqv.errors import SparseEqvError
from sparse_eqv.finetune import e0s
from sparse_eqv.finetune.dense import Full
from sparse_eqv.finetune.lora import ELoRA
from sparse_eqv.finetune.losses import LossWeights, error_metrics, loss_sums, total_loss
from sparse_eqv.finetune.optim import make_optimizer, state_size
from sparse_eqv.finetune.str import LAYER_SCORE, STR, soft_threshold
from sparse_eqv.finetune.targets import leaf_roles, select_targets


def toy_params():
    """Leaf names as the Flax models write them (sparse_eqv.models)."""
    rng = np.random.default_rng(0)
    return {
        "embedding": rng.normal(size=(3, 4)),
        "layer_0": {
            "linear_1": {"w[0,0]": rng.normal(size=(4, 4)), "w[1,1]": rng.normal(size=(2, 2))},
            "radial": {"layer0": rng.normal(size=(8, 16)), "layer1": rng.normal(size=(16, 6))},
            "self_connection": {"w[0,0,0]": rng.normal(size=(4, 3, 4))},
            "symmetric_contractions": {"w[0e,nu=1]": rng.normal(size=(3, 2, 4))},
        },
        "readout": {"layer0": rng.normal(size=(4, 2)), "layer1": rng.normal(size=(2, 1))},
    }


def flat(tree):
    return traverse_util.flatten_dict(tree)


# -- soft threshold -------------------------------------------------------


def test_soft_threshold_values_zeros_and_gradients():
    x = jnp.array([-0.3, -0.1, -0.05, 0.0, 0.05, 0.1, 0.3])
    d = 0.1
    np.testing.assert_allclose(soft_threshold(x, d), [-0.2, 0.0, 0.0, 0.0, 0.0, 0.0, 0.2], atol=1e-15)
    assert np.all(np.asarray(soft_threshold(x, d))[1:6] == 0.0)  # exact zeros, not round-off
    # d/dx = 1 outside the dead zone, 0 inside; d/dd = -sign(x) outside
    gx = jax.vmap(jax.grad(soft_threshold), in_axes=(0, None))(x, d)
    gd = jax.vmap(jax.grad(soft_threshold, argnums=1), in_axes=(0, None))(x, d)
    np.testing.assert_array_equal(gx, [1, 0, 0, 0, 0, 0, 1])
    np.testing.assert_array_equal(gd, [1, 0, 0, 0, 0, 0, -1])


def test_str_init_defaults_groups_and_effective():
    params = toy_params()
    targets = select_targets(params, {})
    method = STR(targets)
    tree = method.init(params, jax.random.PRNGKey(0))
    deltas = flat(tree["delta"])
    assert set(deltas) == set(targets)
    all_delta = np.concatenate([np.ravel(d) for d in deltas.values()])
    assert abs(all_delta.std() - 0.01) < 0.002
    # one score per layer (module), sigmoid(s) = 1e-3
    scores = flat(tree["score"])
    assert set(scores) == {k[:-1] + (LAYER_SCORE,) for k in targets}
    np.testing.assert_allclose([jax.nn.sigmoid(s) for s in scores.values()], 1e-3, rtol=1e-12)
    per_path = STR(targets, per_path=True).init(params, jax.random.PRNGKey(0))
    assert set(flat(per_path["score"])) == set(targets)

    effective = flat(method.effective(tree))
    for key, base in flat(params).items():
        if key in targets:
            np.testing.assert_allclose(effective[key], base + soft_threshold(deltas[key], 1e-3), rtol=0, atol=1e-15)
        else:
            assert np.array_equal(effective[key], base)
    # a threshold above every |delta| gives back the base exactly
    closed = {**tree, "score": jax.tree.map(lambda s: jnp.full_like(s, 10.0), tree["score"])}
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(method.effective(closed)), jax.tree.leaves(params)))


def test_labels_and_frozen_leaves_have_no_optimizer_state():
    params = toy_params()
    method = STR(select_targets(params, {}))
    tree = method.init(params, jax.random.PRNGKey(1))
    labels = method.labels(tree)
    assert set(jax.tree.leaves(labels["base"])) == {"frozen"}
    assert set(jax.tree.leaves(labels["delta"])) == {"delta"}
    assert set(jax.tree.leaves(labels["score"])) == {"score"}
    opt = make_optimizer(labels, lr=1e-2, threshold_decay=0.3)
    state = opt.init(tree)
    trainable = sum(np.size(x) for x in jax.tree.leaves((tree["delta"], tree["score"])))
    assert state_size(state) == 2 * trainable + 2  # Adam mu, nu (+ a step count) of deltas and scores only
    assert state_size(state) < 2 * sum(np.size(x) for x in jax.tree.leaves(params))

    # zero gradients: the base and the deltas stay, the scores decay toward 0 (lambda_tau)
    grads = jax.tree.map(jnp.zeros_like, tree)
    updates, _ = opt.update(grads, state, tree)
    new = optax.apply_updates(tree, updates)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new["base"]), jax.tree.leaves(params)))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new["delta"]), jax.tree.leaves(tree["delta"])))
    for s_new, s_old in zip(jax.tree.leaves(new["score"]), jax.tree.leaves(tree["score"])):
        np.testing.assert_allclose(s_new, s_old * (1 - 1e-2 * 0.3), rtol=1e-12)


def test_full_method_is_all_dense():
    params = toy_params()
    method = Full()
    tree = method.init(params, jax.random.PRNGKey(0))
    assert set(jax.tree.leaves(method.labels(tree))) == {"dense"}
    state = make_optimizer(method.labels(tree), lr=1e-3).init(tree)
    assert state_size(state) == 2 * sum(np.size(x) for x in jax.tree.leaves(params)) + 1


# -- targets --------------------------------------------------------------


def test_target_roles_presets_patterns_and_config_roles():
    params = toy_params()
    roles = {"/".join(k): r for k, r in leaf_roles(params, {}).items()}
    assert roles == {
        "embedding": "other",
        "layer_0/linear_1/w[0,0]": "linear",
        "layer_0/linear_1/w[1,1]": "linear",
        "layer_0/radial/layer0": "radial_mlp",
        "layer_0/radial/layer1": "radial_mlp",
        "layer_0/self_connection/w[0,0,0]": "tensor_product",
        "layer_0/symmetric_contractions/w[0e,nu=1]": "symmetric_contraction",
        "readout/layer0": "linear",
        "readout/layer1": "linear",
    }
    default = {"/".join(k) for k in select_targets(params, {})}
    assert default == {k for k, r in roles.items() if r in ("linear", "tensor_product")}
    everything = {"/".join(k) for k in select_targets(params, {}, ["all"])}
    assert everything == set(roles) - {"embedding"}
    by_pattern = {"/".join(k) for k in select_targets(params, {}, ["layer_0/linear_1", "params/readout/layer1"])}
    assert by_pattern == {"layer_0/linear_1/w[0,0]", "layer_0/linear_1/w[1,1]", "readout/layer1"}
    glob = {"/".join(k) for k in select_targets(params, {}, ["*/radial/*"])}
    assert glob == {"layer_0/radial/layer0", "layer_0/radial/layer1"}
    # the config's roles override the names
    config = {"param_roles": {"params/embedding": "linear", "params/readout": "other"}}
    declared = {"/".join(k) for k in select_targets(params, config)}
    assert "embedding" in declared and "readout/layer0" not in declared
    with pytest.raises(SparseEqvError, match="selects no parameter"):
        select_targets(params, {}, ["no_such_layer"])
    with pytest.raises(SparseEqvError, match="role"):
        leaf_roles(params, {"param_roles": {"params/embedding": "bias"}})


# -- ELoRA ----------------------------------------------------------------


def test_elora_starts_at_base_and_has_low_rank():
    params = toy_params()
    method = ELoRA(select_targets(params, {}, ["all"]), rank=2, alpha=4.0)
    tree = method.init(params, jax.random.PRNGKey(0))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(method.effective(tree)), jax.tree.leaves(params)))
    lora = flat(tree["lora"])
    assert lora[("layer_0", "self_connection", "w[0,0,0]", "A")].shape == (12, 2)  # (4*3, r)
    assert lora[("layer_0", "self_connection", "w[0,0,0]", "B")].shape == (2, 4)
    assert set(jax.tree.leaves(method.labels(tree)["lora"])) == {"delta"}
    trained = {**tree, "lora": jax.tree.map(lambda x: x + 0.1, tree["lora"])}
    for key, d in method.deltas(trained).items():
        matrix = np.asarray(d).reshape(-1, d.shape[-1])
        assert np.linalg.matrix_rank(matrix) <= 2
        a, b = flat(trained["lora"])[key + ("A",)], flat(trained["lora"])[key + ("B",)]
        np.testing.assert_allclose(matrix, 2.0 * a @ b, rtol=1e-12)


# -- sparsity -------------------------------------------------------------


def test_sparsity_counts_prune_and_merge():
    params = toy_params()
    targets = select_targets(params, {})
    method = STR(targets, per_path=True)
    tree = method.init(params, jax.random.PRNGKey(3))
    # thresholds so that a known share of entries is cut: 0.01 * 0.6745 is the median of |N(0, 0.01^2)|
    tree["score"] = jax.tree.map(lambda s: jnp.full_like(s, np.log(0.01 / 0.99)), tree["score"])
    delta = sparsity.prune(method, tree)
    zeros = sum(int(np.sum(d == 0)) for d in delta.values())
    size = sum(d.size for d in delta.values())
    assert sparsity.layer_sparsity(delta) == zeros / size
    assert 0.6 < zeros / size < 0.75  # P(|x| < sigma) = 0.683
    merged = sparsity.merge(params, delta)
    effective = method.effective(tree)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(effective)):
        np.testing.assert_array_equal(a, b)
    n_total = sum(np.size(x) for x in jax.tree.leaves(params))
    assert sparsity.total_sparsity(params, merged) == 1 - (size - zeros) / n_total
    paths = sparsity.path_view(delta)
    assert sum(v["size"] - v["nonzero"] for v in paths.values()) == zeros
    layers = sparsity.layer_view(delta)
    assert sum(v["size"] for v in layers.values()) == size
    assert "params/layer_0/linear_1" in layers


# -- losses ---------------------------------------------------------------


def _graph(n_atoms, energy, forces, stress, weight=(1.0, 1.0, 1.0)):
    import jraph

    return jraph.GraphsTuple(
        nodes={"positions": np.zeros((n_atoms, 3)), "species": np.zeros(n_atoms, np.int32), "forces": forces},
        edges={"shifts": np.zeros((0, 3))},
        senders=np.zeros(0, np.int32),
        receivers=np.zeros(0, np.int32),
        globals={
            "cell": np.eye(3)[None], "energy": np.array([energy]), "stress": stress[None],
            "energy_weight": np.array([weight[0]]), "forces_weight": np.array([weight[1]]),
            "stress_weight": np.array([weight[2]]),
        },
        n_node=np.array([n_atoms], np.int32),
        n_edge=np.array([0], np.int32),
    )


def test_loss_sums_add_up_over_shards_and_huber():
    from sparse_eqv.data.graph import GraphBudget, batch_graphs

    rng = np.random.default_rng(0)
    graphs = [_graph(n, rng.normal(), rng.normal(size=(n, 3)), rng.normal(size=(3, 3))) for n in (2, 3, 4, 5)]
    graphs[1] = _graph(3, 1.0, np.zeros((3, 3)), np.zeros((3, 3)), weight=(1.0, 0.0, 0.0))  # no force label

    def predict(graph):
        n = graph.nodes["positions"].shape[0]
        return {"energy": jnp.arange(graph.n_node.shape[0], dtype=float), "forces": jnp.ones((n, 3)),
                "stress": jnp.zeros((graph.n_node.shape[0], 3, 3))}

    weights = LossWeights(energy=1.0, forces=10.0, stress=0.5)
    whole = batch_graphs(graphs, GraphBudget(32, 8, 6))
    halves = [batch_graphs(graphs[:2], GraphBudget(32, 8, 6)), batch_graphs(graphs[2:], GraphBudget(32, 8, 6))]
    s_whole = loss_sums(predict(whole), whole, weights)
    s_parts = [loss_sums(predict(h), h, weights) for h in halves]
    assert float(s_whole["forces_count"]) == 3 * (2 + 4 + 5)
    combined = {k: s_parts[0][k] + s_parts[1][k] for k in s_whole}
    # the per-shard predictions differ (energy = arange), so compare the count/denominators only for E
    for k in ("forces", "forces_count", "stress", "stress_count", "energy_count"):
        np.testing.assert_allclose(combined[k], s_whole[k], rtol=1e-14)
    manual_f = sum(np.sum((1.0 - g.nodes["forces"]) ** 2) for i, g in enumerate(graphs) if i != 1) / 33
    loss = total_loss({**s_whole, "energy": 0.0 * s_whole["energy"], "stress": 0.0 * s_whole["stress"]}, weights)
    np.testing.assert_allclose(loss, 10.0 * manual_f, rtol=1e-12)
    huber = loss_sums(predict(whole), whole, LossWeights(huber_delta=1e6))
    np.testing.assert_allclose(huber["forces"], s_whole["forces"], rtol=1e-12)  # Huber = square for small errors
    small = loss_sums(predict(whole), whole, LossWeights(huber_delta=1e-3))
    assert float(small["forces"]) < float(s_whole["forces"])


def test_error_metrics_units():
    frames = [
        Frame(np.array([3, 3]), np.zeros((2, 3)), np.eye(3) * 5, np.ones(3, bool), energy=-1.0,
              forces=np.zeros((2, 3)), stress=np.zeros((3, 3)), source="a:0"),
        Frame(np.array([3]), np.zeros((1, 3)), np.zeros((3, 3)), np.zeros(3, bool), energy=-2.0, source="a:1"),
    ]
    preds = [
        {"energy": -0.998, "forces": np.full((2, 3), 0.01), "stress": np.full((3, 3), 0.001)},
        {"energy": -2.0, "forces": np.zeros((1, 3)), "stress": np.zeros((3, 3))},
    ]
    m = error_metrics(frames, preds)
    np.testing.assert_allclose(m["energy_mae"], 0.5 * (1.0 + 0.0))  # 2 meV / 2 atoms, 0
    np.testing.assert_allclose(m["forces_mae"], 10.0)
    np.testing.assert_allclose(m["stress_rmse"], 1.0)
    shifted = error_metrics(frames, preds, np.array([-0.002, 0.0]))
    np.testing.assert_allclose(shifted["energy_mae"], 0.0, atol=1e-12)


# -- E0 fit ---------------------------------------------------------------


def test_e0_fit_recovers_shift_and_updates_constant():
    rng = np.random.default_rng(1)
    numbers = [3, 15, 16]
    true = np.array([-0.3, 1.2, 0.0])
    frames, predicted = [], []
    for g in range(6):
        z = rng.choice(numbers[:2], size=rng.integers(2, 6))
        counts = np.array([(z == n).sum() for n in numbers])
        model_energy = rng.normal()
        frames.append(Frame(z, np.zeros((len(z), 3)), np.zeros((3, 3)), np.zeros(3, bool),
                            energy=model_energy + counts @ true, source=f"x:{g}"))
        predicted.append(model_energy)
    shift = e0s.fit_e0_shift(frames, predicted, numbers)
    np.testing.assert_allclose(shift, true, atol=1e-12)  # S absent: 0
    config = {"atomic_numbers": numbers}
    variables = {"params": {}, "constants": {"shift": np.zeros(3), "scale": np.ones(3), "bessel_k": np.ones(3)}}
    new = e0s.shift_e0s(config, variables, shift)
    np.testing.assert_allclose(new["constants"]["shift"], true, atol=1e-12)
    assert np.array_equal(new["constants"]["scale"], np.ones(3))
    mace_like = {"params": {}, "constants": {"atomic_energies": np.ones(3)}}
    assert e0s.e0_key({**config, "e0_constant": "constants/atomic_energies"}, mace_like["constants"]) == ("atomic_energies",)
    with pytest.raises(SparseEqvError, match="--e0s keep"):
        e0s.e0_key(config, {"scale_shift": {"shift": np.zeros(())}})


def test_valid_fraction_split_is_seeded_and_disjoint(tmp_path):
    from sparse_eqv.errors import DataError
    from sparse_eqv.finetune.run import split_frames

    frames = [Frame(np.array([3]), np.zeros((1, 3)), np.zeros((3, 3)), np.zeros(3, bool), energy=float(i),
                    source=f"f:{i}") for i in range(10)]
    train, valid = split_frames(frames, 0.2, seed=1, path=tmp_path)
    assert len(valid) == 2 and len(train) == 8
    assert {f.source for f in train}.isdisjoint(f.source for f in valid)
    assert [f.source for f in split_frames(frames, 0.2, seed=1, path=tmp_path)[1]] == [f.source for f in valid]
    with pytest.raises(DataError, match="cannot be split"):
        split_frames(frames[:1], 0.5, seed=0, path=tmp_path)
    with pytest.raises(SparseEqvError, match="strictly between"):
        split_frames(frames, 1.0, seed=0, path=tmp_path)
