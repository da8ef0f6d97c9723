"""Row-sparse gradients: SparseAdam's and Adagrad's lazy rows, the embedding helper."""

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

import mlx_optim
from mlx_optim import RowSparseGrad
from mlx_optim.parity.harness import assert_close

RNG = np.random.default_rng(0)
TABLE = RNG.standard_normal((10, 4)).astype(np.float32)


def _rows_grad(indices, seed=1):
    values = np.random.default_rng(seed).standard_normal((len(indices), 4)).astype(np.float32)
    return indices, values


@pytest.mark.parametrize("cls", [mlx_optim.SparseAdam, mlx_optim.Adagrad])
def test_empty_gradient_changes_nothing_but_counts_a_step(cls):
    opt = cls(learning_rate=0.1)
    params = {"emb": mx.array(TABLE)}
    params = opt.apply_gradients({"emb": RowSparseGrad(mx.array([1, 2]), mx.ones((2, 4)), 10)}, params)
    mx.eval(params, opt.state)
    before = {k: np.array(v) for k, v in opt.state["param_state"]["emb"].items()}
    after = opt.apply_gradients({"emb": RowSparseGrad(mx.zeros((0,), mx.int32), mx.zeros((0, 4)), 10)},
                                params)
    np.testing.assert_array_equal(np.array(after["emb"]), np.array(params["emb"]))
    for key, value in opt.state["param_state"]["emb"].items():
        if key == "step":
            assert value.item() == 2  # torch counts the step too
        else:
            np.testing.assert_array_equal(np.array(value), before[key], err_msg=key)


def test_duplicate_indices_are_summed_and_other_rows_untouched():
    indices, values = _rows_grad([7, 2, 7, 7])
    opt_rows, opt_dense = mlx_optim.SparseAdam(learning_rate=0.1), mlx_optim.SparseAdam(learning_rate=0.1)
    grad = RowSparseGrad(mx.array(indices), mx.array(values), 10)
    dense = np.zeros((10, 4), np.float32)
    np.add.at(dense, indices, values)
    np.testing.assert_allclose(np.array(grad.to_dense()), dense, rtol=1e-6)
    by_rows = opt_rows.apply_gradients({"e": grad}, {"e": mx.array(TABLE)})["e"]
    by_dense = opt_dense.apply_gradients({"e": mx.array(dense)}, {"e": mx.array(TABLE)})["e"]
    np.testing.assert_allclose(np.array(by_rows), np.array(by_dense), rtol=1e-6)
    changed = np.flatnonzero(np.any(np.array(by_rows) != TABLE, axis=1))
    assert changed.tolist() == [2, 7]
    moments = np.array(opt_rows.state["param_state"]["e"]["exp_avg"])
    assert np.flatnonzero(np.any(moments != 0, axis=1)).tolist() == [2, 7]


def _torch_sparse(indices, values):
    return torch.sparse_coo_tensor(torch.tensor([indices]), torch.tensor(values), (10, 4),
                                   check_invariants=True)


@pytest.mark.parametrize("kwargs", [{}, {"lr": 0.5, "lr_decay": 0.1, "initial_accumulator_value": 0.2},
                                    {"lr": 0.1, "maximize": True, "eps": 1e-3}])
def test_adagrad_row_sparse_equals_torch(kwargs):
    from mlx_optim.parity.cases import ours_kwargs

    tparam = torch.tensor(TABLE, requires_grad=True)
    topt = torch.optim.Adagrad([tparam], **kwargs)
    opt = mlx_optim.Adagrad(**ours_kwargs(kwargs))
    params = {"e": mx.array(TABLE)}
    for step in range(6):
        indices, values = _rows_grad([step % 10, 3, (step * 7) % 10, 3], seed=step)
        tparam.grad = _torch_sparse(indices, values)
        topt.step()
        params = opt.apply_gradients({"e": RowSparseGrad(mx.array(indices), mx.array(values), 10)}, params)
        mx.eval(params, opt.state)
    assert_close(params["e"], tparam.detach().numpy(), 1e-6, "param")
    assert_close(opt.state["param_state"]["e"]["sum"], topt.state[tparam]["sum"].numpy(), 1e-6, "sum")


def test_row_sparse_refuses_weight_decay_and_other_optimizers():
    grad = {"e": RowSparseGrad(mx.array([1]), mx.ones((1, 4)), 10)}
    params = {"e": mx.array(TABLE)}
    with pytest.raises(ValueError, match="weight_decay option is not compatible with sparse gradients"):
        mlx_optim.Adagrad(weight_decay=0.1).apply_gradients(grad, params)
    decay_off = mlx_optim.Adagrad(weight_decay=0.1)
    decay_off.weight_decay = 0.0  # as torch: a zero decay takes row-sparse gradients
    assert decay_off.apply_gradients(grad, params)["e"].shape == params["e"].shape
    with pytest.raises(ValueError, match="Adam does not support row-sparse gradients"):
        mlx_optim.Adam().apply_gradients(grad, params)
    with pytest.raises(ValueError, match=r"gradient for 'e' has shape \(12, 4\)"):
        mlx_optim.SparseAdam().apply_gradients({"e": RowSparseGrad(mx.array([1]), mx.ones((1, 4)), 12)}, params)


class Bag(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(50, 4)
        self.out = nn.Linear(4, 1)

    def __call__(self, ids):
        return self.out(self.embedding(ids).mean(axis=1)).squeeze(-1)


def test_embedding_helper_gives_the_dense_gradient_in_rows():
    mx.random.seed(0)
    model = Bag()
    ids = mx.array([[1, 5, 5], [7, 1, 9]])
    y = mx.array([0.5, -1.0])
    loss_fn = lambda ids, y: nn.losses.mse_loss(model(ids), y)
    loss, grads = mlx_optim.embedding_value_and_grad(model, loss_fn)(ids, y)
    dense_loss, dense = nn.value_and_grad(model, lambda m: loss_fn(ids, y))(model)
    assert loss.item() == pytest.approx(dense_loss.item(), rel=1e-6)
    sparse = grads["embedding"]["weight"]
    assert isinstance(sparse, RowSparseGrad) and sparse.indices.size == 6  # one row per id, as torch
    np.testing.assert_allclose(np.array(sparse.to_dense()), np.array(dense["embedding"]["weight"]), atol=1e-7)
    for (path, a), (_, b) in zip(tree_flatten(grads["out"]), tree_flatten(dense["out"])):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-6, err_msg=path)
    # The model is restored: a plain nn.Embedding, no stray attribute or parameter.
    assert type(model.embedding) is nn.Embedding and "_row_tap" not in model.embedding.__dict__
    assert sorted(k for k, _ in tree_flatten(model.parameters())) == [
        "embedding.weight", "out.bias", "out.weight"]


def test_embedding_training_moves_only_looked_up_rows():
    mx.random.seed(1)
    model = Bag()
    before = np.array(model.embedding.weight)
    opt = mlx.optimizers.MultiOptimizer([mlx_optim.SparseAdam(learning_rate=0.05), mlx_optim.Adam(learning_rate=0.05)],
                                        [lambda path, g: path.startswith("embedding")])
    loss_and_grad = mlx_optim.embedding_value_and_grad(model, lambda ids, y: nn.losses.mse_loss(model(ids), y))
    ids, y = mx.array([[3, 4], [4, 8]]), mx.array([1.0, -1.0])
    losses = []
    for _ in range(20):
        loss, grads = loss_and_grad(ids, y)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
        losses.append(loss.item())
    after = np.array(model.embedding.weight)
    assert np.flatnonzero(np.any(after != before, axis=1)).tolist() == [3, 4, 8]
    assert losses[-1] < 0.2 * losses[0]



class Positions(nn.Module):  # token and position embeddings; positions have the ids' shape
    def __init__(self):
        super().__init__()
        self.tok, self.pos, self.out = nn.Embedding(20, 4), nn.Embedding(8, 4), nn.Linear(4, 1)

    def __call__(self, ids):
        pos = mx.broadcast_to(mx.arange(ids.shape[1]), ids.shape)
        return self.out(self.tok(ids) + self.pos(pos)).squeeze(-1).mean(-1)


class Tied(nn.Module):  # the embedding is also the output layer
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(20, 4)

    def __call__(self, ids):
        return self.tok.as_linear(self.tok(ids)).mean((-1, -2))


@pytest.mark.parametrize("cls, name, message", [
    (Positions, "pos", "looked up an array other than the ids"),
    (Tied, "tok", r"used as a linear layer \(as_linear"),
])
def test_embedding_helper_refuses_other_lookups_and_tied_use_unless_dense(cls, name, message):
    """Such an embedding used to get a silently wrong gradient: the rows of ``ids`` (the
    position table) or only the lookup's part of a tied weight's gradient."""
    mx.random.seed(0)
    model = cls()
    ids, y = mx.array([[3, 5, 7], [7, 1, 2]]), mx.array([0.5, -1.0])
    loss_fn = lambda ids, y: nn.losses.mse_loss(model(ids), y)
    with pytest.raises(ValueError, match=message + f".*dense=\\['{name}'\\]"):
        mlx_optim.embedding_value_and_grad(model, loss_fn)(ids, y)
    assert type(model.tok) is nn.Embedding and "_row_ids" not in model.tok.__dict__  # restored
    loss, grads = mlx_optim.embedding_value_and_grad(model, loss_fn, dense=[name])(ids, y)
    dense_loss, dense = nn.value_and_grad(model, lambda m: loss_fn(ids, y))(model)
    assert loss.item() == pytest.approx(dense_loss.item(), rel=1e-6)
    assert isinstance(grads[name]["weight"], mx.array)  # the dense one, whole
    np.testing.assert_allclose(np.array(grads[name]["weight"]), np.array(dense[name]["weight"]), atol=1e-7)
    if cls is Positions:  # the token table stays row-sparse, and right
        assert isinstance(grads["tok"]["weight"], RowSparseGrad)
        np.testing.assert_allclose(np.array(grads["tok"]["weight"].to_dense()),
                                   np.array(dense["tok"]["weight"]), atol=1e-7)
    with pytest.raises(ValueError, match="'nope', which is not an nn.Embedding"):
        mlx_optim.embedding_value_and_grad(model, loss_fn, dense=["nope"])


def test_row_sparse_values_must_be_an_array():
    with pytest.raises(TypeError, match="RowSparseGrad values must be an mx.array, got ndarray"):
        RowSparseGrad(mx.array([1]), np.ones((1, 3), np.float32), 5)
    with pytest.raises(TypeError, match="got list"):
        RowSparseGrad([1], [[1.0, 2.0, 3.0]], 5)


def test_an_embedding_the_loss_does_not_call_gets_no_gradient():
    # torch: an nn.Embedding(sparse=True) unused in a step keeps grad None, so SparseAdam
    # leaves its rows and its step alone; a zero-valued row gradient would move the rows
    # (momentum) and count a step.
    class TwoTables(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Embedding(10, 4), nn.Embedding(10, 4)

        def __call__(self, ids, both):
            out = self.a(ids)
            return (out + self.b(ids) if both else out).sum()

    mx.random.seed(2)
    model = TwoTables()
    loss_and_grad = mlx_optim.embedding_value_and_grad(model, lambda ids, both: model(ids, both))
    opt = mlx_optim.SparseAdam(learning_rate=0.1)
    ids = mx.array([1, 3])
    _, grads = loss_and_grad(ids, True)
    opt.update(model, grads)
    b_before = np.array(model.b.weight)
    _, grads = loss_and_grad(ids, False)
    assert "b" not in grads and isinstance(grads["a"]["weight"], RowSparseGrad)
    opt.update(model, grads)
    np.testing.assert_array_equal(np.array(model.b.weight), b_before)
    assert opt.state["param_state"]["b"]["weight"]["step"].item() == 1
    assert opt.state["param_state"]["a"]["weight"]["step"].item() == 2


def test_a_table_under_two_paths_gets_its_gradient_once():
    # An encoder and a decoder sharing one nn.Embedding: named_modules() lists it twice.
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Embedding(10, 4)
            self.dec = self.enc

        def __call__(self, ids):
            return (self.enc(ids) * mx.arange(4)).sum()

    model = Shared()
    ids = mx.array([1, 3, 3])
    _, grads = mlx_optim.embedding_value_and_grad(model, lambda ids: model(ids))(ids)
    _, dense = nn.value_and_grad(model, lambda m: m(ids))(model)
    sparse = [(k, g) for k, g in tree_flatten(grads)]
    assert len(sparse) == 1 and isinstance(sparse[0][1], RowSparseGrad)
    total = sum(np.array(g) for _, g in tree_flatten(dense))  # MLX splits it between paths
    np.testing.assert_allclose(np.array(sparse[0][1].to_dense()), total)
    # No embedding called and no other parameter: an empty dict, as for a model.
    model = nn.Sequential(nn.Embedding(5, 2))
    _, grads = mlx_optim.embedding_value_and_grad(model, lambda ids: mx.array(0.0))(ids)
    assert grads == {}
