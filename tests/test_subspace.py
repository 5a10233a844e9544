"""sparsetune.subspace: fit recovers a planted subspace, training in it matches brute force."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as hst
from scipy.linalg import subspace_angles
from torch import nn

import sparsetune as st
from sparsetune import subspace
from sparsetune.delta import BaseModelMismatchError
from sparsetune.files import FileFormatError


# -- helpers ------------------------------------------------------------------------------------
def _flat_size(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _delta(model: nn.Module, vector: torch.Tensor, support: torch.Tensor | None = None,
           method: str = "m") -> st.SparseDelta:
    """theta0 + support * vector as a SparseDelta on ``support`` (default: every entry)."""
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    tuned = copy.deepcopy(model)
    bits, offset = {}, 0
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            k = p.numel()
            keep = (torch.ones(k, dtype=torch.bool) if support is None
                    else support[offset: offset + k]).view(p.shape)
            p.add_(vector[offset: offset + k].view(p.shape).to(p.dtype) * keep)
            bits[name] = keep
            offset += k
    return st.SparseDelta.extract(tuned, base, st.Mask(bits), method=method)


def _stacked_basis(space: subspace.Subspace, model: nn.Module) -> torch.Tensor:
    """U as a dense (m, d) matrix over every model entry (0 off the covered coordinates)."""
    rows = []
    for name, p in model.named_parameters():
        full = torch.zeros(p.numel(), space.dim, dtype=torch.float64)
        if name in space.names:
            idx = space.index(name)
            full[slice(None) if idx is None else idx] = space.basis(name).double()
        rows.append(full)
    return torch.cat(rows)


def _planted(model, dim, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(_flat_size(model), dim, generator=gen, dtype=torch.float64))
    coords = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    return q, coords


def _mse(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


# -- fit ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", subspace.FIT_METHODS)
def test_fit_recovers_a_planted_subspace_from_full_solutions(make_mlp, method):
    model = make_mlp(0)
    q, coords = _planted(model, dim=3, n=7)
    deltas = [_delta(model, q @ c, method=f"full{i}") for i, c in enumerate(coords)]
    space = subspace.fit(deltas, 3, method=method, dtype=torch.float64)
    u = _stacked_basis(space, model)
    assert np.max(subspace_angles(u.numpy(), q.numpy())) < 1e-6
    assert torch.allclose(u.T @ u, torch.eye(3, dtype=torch.float64), atol=1e-10)
    assert float(space.reconstruction_error.max()) < 1e-6
    # Fitted coordinates reconstruct each solution exactly: U z_i = x_i.
    for delta, z in zip(deltas, space.coordinates):
        dense = delta.to_dense()
        recon = space.reconstruct(z)
        assert all(torch.allclose(recon[n], dense[n], atol=1e-9) for n in dense)


def test_joint_recovers_a_subspace_observed_only_on_supports_where_svd_cannot(make_mlp):
    """Sparse solutions of one planted subspace: 'joint' (S2) treats off-support entries as
    missing and recovers it; 'svd' reads them as zeros and does not."""
    model = make_mlp(1)
    m, dim, n = _flat_size(model), 3, 10
    q, coords = _planted(model, dim, n, seed=1)
    gen = torch.Generator().manual_seed(2)
    observed = torch.rand(n, m, generator=gen) < 0.3
    for j in range(m):  # every entry seen by dim + 2 solutions: identifiable
        observed[torch.randperm(n, generator=gen)[: dim + 2], j] = True
    deltas = [_delta(model, q @ c, observed[i], f"sparse{i}") for i, c in enumerate(coords)]
    joint = subspace.fit(deltas, dim, method="joint", dtype=torch.float64, ridge=1e-12,
                         iterations=2000, tol=1e-15)
    svd = subspace.fit(deltas, dim, method="svd", dtype=torch.float64)
    angle = np.max(subspace_angles(_stacked_basis(joint, model).numpy(), q.numpy()))
    assert angle < 1e-5
    assert float(joint.reconstruction_error.max()) < 1e-5
    assert np.max(subspace_angles(_stacked_basis(svd, model).numpy(), q.numpy())) > 0.1
    assert float(svd.reconstruction_error.max()) > 0.1
    # The joint objective never increases over the iterations.
    history = np.array(joint.fit_history)
    assert np.all(np.diff(history) <= 1e-12 * history[0])


def test_svd_matches_numpy_principal_directions(make_mlp):
    """Off a planted subspace, 'svd' is the top-d uncentred PCA of the zero-filled solutions."""
    model = make_mlp(2)
    gen = torch.Generator().manual_seed(3)
    m = _flat_size(model)
    x = torch.randn(6, m, generator=gen, dtype=torch.float64)
    support = torch.rand(6, m, generator=gen) < 0.5
    deltas = [_delta(model, x[i], support[i]) for i in range(6)]
    space = subspace.fit(deltas, 2, dtype=torch.float64)
    left, _, _ = np.linalg.svd((x * support).T.numpy(), full_matrices=False)
    coords_union = _stacked_basis(space, model).numpy()
    assert np.max(subspace_angles(coords_union, left[:, :2])) < 1e-8


def test_coordinates_are_ordered_by_the_energy_they_carry(make_mlp):
    model = make_mlp(0)
    q, _ = _planted(model, dim=3, n=1)
    scales = torch.tensor([10.0, 3.0, 0.5], dtype=torch.float64)
    gen = torch.Generator().manual_seed(5)
    deltas = [_delta(model, q @ (scales * torch.randn(3, generator=gen, dtype=torch.float64)))
              for _ in range(12)]
    space = subspace.fit(deltas, 3, dtype=torch.float64)
    energy = space.coordinates.pow(2).sum(0)
    assert torch.all(energy[:-1] >= energy[1:])


# -- project / reconstruct / decode -------------------------------------------------------------
@given(hst.integers(0, 2**16), hst.floats(0.2, 0.9))
def test_project_then_reconstruct_round_trips_inside_the_subspace(make_mlp, seed, density):
    """A point of the subspace, seen on any support that determines it, projects to itself."""
    model = make_mlp(0)
    q, coords = _planted(model, dim=2, n=4, seed=seed % 7)
    space = subspace.fit([_delta(model, q @ c) for c in coords], 2, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(2, generator=gen, dtype=torch.float64)
    point = _stacked_basis(space, model) @ z
    support = torch.rand(_flat_size(model), generator=gen) < density
    support[:4] = True  # enough entries to determine two coordinates
    found = space.project(_delta(model, point, support))
    assert torch.allclose(found, z, atol=1e-8)
    recon = space.reconstruct(found, _delta(model, point, support))
    dense = _delta(model, point, support).to_dense()
    assert all(torch.allclose(recon[n], dense[n], atol=1e-9) for n in dense)


def test_project_is_the_least_squares_fit_on_the_support(make_mlp):
    model = make_mlp(0)
    q, coords = _planted(model, dim=2, n=3)
    space = subspace.fit([_delta(model, q @ c) for c in coords], 2, dtype=torch.float64)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(_flat_size(model), generator=gen, dtype=torch.float64)
    support = torch.rand(_flat_size(model), generator=gen) < 0.5
    u = _stacked_basis(space, model)[support]
    expected = torch.linalg.lstsq(u, x[support].unsqueeze(1)).solution[:, 0]
    assert torch.allclose(space.project(_delta(model, x, support)), expected, atol=1e-10)


def test_decode_gives_the_delta_of_theta_z_on_the_mask(make_mlp):
    model = make_mlp(0)
    q, coords = _planted(model, dim=2, n=3)
    space = subspace.fit([_delta(model, q @ c) for c in coords], 2, dtype=torch.float64)
    z = torch.tensor([0.3, -1.2], dtype=torch.float64)
    mask = st.Mask({n: torch.rand(p.shape, generator=torch.Generator().manual_seed(0)) < 0.5
                    for n, p in model.named_parameters()})
    delta = space.decode(z, model, mask)
    expected = space.reconstruct(z, mask)
    dense = delta.to_dense()
    assert all(torch.allclose(dense[n], expected[n], atol=1e-12) for n in expected)
    assert delta.support() == st.Mask({n: mask[n] for n in delta.names})
    # apply_to writes the same point into the base in place.
    target = space.apply_to(copy.deepcopy(model), z, mask)
    delta.apply_to(model_copy := copy.deepcopy(model))
    for (n, a), b in zip(target.named_parameters(), model_copy.parameters()):
        assert torch.allclose(a, b, atol=1e-12), n


# -- optimisation in the subspace ---------------------------------------------------------------
def _regression_problem(seed=0):
    """A linear model with MSE: the loss is a convex quadratic in z."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Linear(4, 2).double()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 4, generator=gen, dtype=torch.float64)
    y = torch.randn(32, 2, generator=gen, dtype=torch.float64)
    q, coords = _planted(model, dim=2, n=4, seed=seed)
    space = subspace.fit([_delta(model, q @ c) for c in coords], 2, dtype=torch.float64)
    return model, space, [(x, y)]


def test_training_in_the_subspace_finds_the_best_point_of_a_brute_force_grid():
    model, space, data = _regression_problem()
    before = copy.deepcopy(model.state_dict())
    # Brute force: the loss on a fine grid of the whole (2-D) subspace.
    grid = space.landscape(model, _mse, data, grid=81, limits=(-4, 4, -4, 4))
    row, col = np.unravel_index(int(grid.values.argmin()), grid.values.shape)
    best_z = torch.tensor([float(grid.xs[col]), float(grid.ys[row])], dtype=torch.float64)
    assert 0 < row < 80 and 0 < col < 80, "the minimiser must lie inside the grid"
    result = space.train(model, _mse, data, steps=800, lr=0.05)
    step = float(grid.xs[1] - grid.xs[0])
    assert torch.all((result.z - best_z).abs() <= step)
    trained = space.evaluate(model, _mse, data, result.z)
    assert trained <= float(grid.values.min()) + 1e-9
    assert result.losses[-1] < result.losses[0]
    # The model was never modified and no gradient was written into it.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_training_on_a_mask_where_the_basis_is_nearly_degenerate_reaches_the_exact_optimum():
    """On the mask, U's two columns are nearly parallel (condition number ~ 400): whitened
    coordinates still reach the exact minimiser, computed from the float64 Hessian."""
    model, _, data = _regression_problem()
    m = _flat_size(model)  # weight (2, 4) then bias (2): entries 0, 1 are weight[0, 0:2]
    e = torch.eye(m, dtype=torch.float64)
    space = subspace.fit([_delta(model, e[0] + e[2]), _delta(model, e[0] - e[2] + 5e-3 * e[1])],
                         2, dtype=torch.float64)
    support = torch.zeros(m, dtype=torch.bool)
    support[:2] = True
    mask = st.Mask({"weight": support[:8].view(2, 4), "bias": support[8:]})
    x, y = data[0]
    w0, b0 = model.weight.detach(), model.bias.detach()

    def loss_at(a):  # the loss with weight[0, 0:2] moved by a
        w = w0.clone()
        w[0, :2] = w[0, :2] + a
        return ((x @ w.T + b0 - y) ** 2).mean()

    zero = torch.zeros(2, dtype=torch.float64)
    hess = torch.func.hessian(loss_at)(zero)
    grad = torch.func.grad(loss_at)(zero)
    best = -torch.linalg.solve(hess, grad)
    result = space.train(model, _mse, data, steps=400, lr=0.05, mask=mask)
    moved = space.reconstruct(result.z, mask)["weight"][0, :2]
    assert torch.allclose(moved, best, atol=1e-4), (moved, best)
    assert space.reconstruct(result.z, mask)["weight"].reshape(-1)[2:].abs().max() == 0
    assert float(loss_at(moved)) == pytest.approx(float(loss_at(best)), rel=1e-6, abs=1e-9)


def test_landscape_values_are_the_loss_at_each_grid_point(tmp_path):
    model, space, data = _regression_problem(seed=1)
    land = space.landscape(model, _mse, data, grid=3, axes=(1, 0), path=tmp_path / "l.png")
    assert (tmp_path / "l.png").stat().st_size > 1000
    for r in range(3):
        for c in range(3):
            z = torch.zeros(2, dtype=torch.float64)
            z[1], z[0] = land.xs[c], land.ys[r]
            probe = copy.deepcopy(model)
            space.apply_to(probe, z)
            with torch.no_grad():
                expected = float(_mse(probe, data[0]))
            assert float(land.values[r, c]) == pytest.approx(expected, rel=1e-12)
    assert sum(len(v) for v in land.points.values()) == len(space.labels)


def test_training_on_a_mask_moves_only_the_masked_coordinates(make_mlp, make_batches):
    model = make_mlp(0)
    q, coords = _planted(model, dim=2, n=3)
    space = subspace.fit([_delta(model, q @ c) for c in coords], 2, dtype=torch.float64)
    mask = st.Mask({n: torch.zeros(p.shape, dtype=torch.bool) if n.startswith("fc1")
                    else torch.ones(p.shape, dtype=torch.bool)
                    for n, p in model.named_parameters()})
    result = space.train(model, _mse, make_batches(3), steps=5, lr=0.1, mask=mask)
    delta = space.decode(result.z, model, mask)
    assert set(delta.names) == {"fc2.weight", "fc2.bias"}


# -- files --------------------------------------------------------------------------------------
def test_save_load_round_trip(make_mlp, tmp_path):
    model = make_mlp(0)
    q, coords = _planted(model, dim=2, n=3)
    support = torch.rand(_flat_size(model), generator=torch.Generator().manual_seed(0)) < 0.5
    deltas = [_delta(model, q @ c, support, f"m{i}") for i, c in enumerate(coords)]
    space = subspace.fit(deltas, 2, method="joint")
    path = space.save(tmp_path / "s.safetensors")
    loaded = subspace.Subspace.load(path)
    assert loaded.labels == space.labels and loaded.method == "joint"
    assert loaded.base_fingerprint == space.base_fingerprint
    assert torch.equal(loaded.coordinates, space.coordinates)
    assert torch.equal(loaded.reconstruction_error, space.reconstruction_error)
    assert loaded.fit_history == space.fit_history
    for name in space.names:
        assert torch.equal(loaded.basis(name), space.basis(name))
        a, b = loaded.index(name), space.index(name)
        assert (a is None and b is None) or torch.equal(a, b)
    assert not list(tmp_path.glob(".*.tmp"))


def test_load_refuses_other_files_and_damaged_ones(make_mlp, tmp_path):
    model = make_mlp(0)
    q, coords = _planted(model, dim=1, n=2)
    space = subspace.fit([_delta(model, q @ c) for c in coords], 1)
    delta_file = _delta(model, q @ coords[0]).save(tmp_path / "d.safetensors")
    with pytest.raises(FileFormatError, match="expected a sparsetune subspace file"):
        subspace.Subspace.load(delta_file)
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = space.save(tmp_path / "s.safetensors")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    tensors.pop("basis:fc1.weight")
    save_file(tensors, tmp_path / "bad.safetensors", metadata=metadata)
    with pytest.raises(FileFormatError, match=r"missing \['basis:fc1.weight'\]"):
        subspace.Subspace.load(tmp_path / "bad.safetensors")


# -- bad input ----------------------------------------------------------------------------------
def test_bad_input_raises_clear_errors(make_mlp, make_batches):
    model = make_mlp(0)
    q, coords = _planted(model, dim=2, n=3)
    deltas = [_delta(model, q @ c) for c in coords]
    with pytest.raises(st.InvalidArgumentError, match="deltas is empty"):
        subspace.fit([], 1)
    with pytest.raises(st.InvalidArgumentError, match="must all be SparseDelta"):
        subspace.fit([deltas[0], "x"], 1)
    with pytest.raises(st.InvalidArgumentError, match="dim must be an integer >= 1, got dim=0"):
        subspace.fit(deltas, 0)
    with pytest.raises(st.InvalidArgumentError, match="at most the number of solutions \\(3\\)"):
        subspace.fit(deltas, 4)
    with pytest.raises(st.InvalidArgumentError, match="span only 2 dimensions"):
        subspace.fit([*deltas, _delta(model, q @ (coords[0] + coords[1]))], 3)
    with pytest.raises(st.InvalidArgumentError, match="method must be one of"):
        subspace.fit(deltas, 1, method="pca")
    with pytest.raises(st.InvalidArgumentError, match="labels must name each of the 3"):
        subspace.fit(deltas, 1, labels=["a"])
    other = make_mlp(5)
    with pytest.raises(BaseModelMismatchError, match="different base models"):
        subspace.fit([deltas[0], _delta(other, q @ coords[0])], 1)
    space = subspace.fit(deltas, 2)
    with pytest.raises(BaseModelMismatchError, match="another base model"):
        space.project(_delta(other, q @ coords[0]))
    with pytest.raises(BaseModelMismatchError, match="not the base"):
        space.train(other, _mse, make_batches(1), steps=1)
    with pytest.raises(st.InvalidArgumentError, match="z must be a floating-point tensor of "
                       "shape \\(2,\\)"):
        space.reconstruct(torch.zeros(3))
    with pytest.raises(st.InvalidArgumentError, match="steps must be an integer >= 1"):
        space.train(model, _mse, make_batches(1), steps=0)
    with pytest.raises(st.InvalidArgumentError, match="lr must be a number > 0"):
        space.train(model, _mse, make_batches(1), steps=1, lr=-1.0)
    with pytest.raises(st.InvalidArgumentError, match="data is empty"):
        space.train(model, _mse, [], steps=1)
    with pytest.raises(st.InvalidArgumentError, match="scalar floating-point"):
        space.train(model, lambda m, b: m(b[0]), make_batches(1), steps=1)
    with pytest.raises(st.InvalidArgumentError, match="axes must be two different"):
        space.landscape(model, _mse, make_batches(1), axes=(0, 0))
    with pytest.raises(st.InvalidArgumentError, match="limits must be"):
        space.landscape(model, _mse, make_batches(1), limits=(1, 0, 0, 1))


def test_project_refuses_entries_outside_the_coordinates_unless_told(make_mlp):
    model = make_mlp(0)
    m = _flat_size(model)
    inside = torch.zeros(m, dtype=torch.bool)
    inside[: m // 2] = True
    gen = torch.Generator().manual_seed(0)
    deltas = [_delta(model, torch.randn(m, generator=gen, dtype=torch.float64), inside)
              for _ in range(2)]
    space = subspace.fit(deltas, 2, dtype=torch.float64)
    assert space.num_coordinates == m // 2
    wide = _delta(model, torch.randn(m, generator=gen, dtype=torch.float64))
    with pytest.raises(st.InvalidArgumentError, match=f"{m - m // 2} entries outside"):
        space.project(wide)
    assert space.project(wide, strict=False).shape == (2,)


def _minilm_deltas(model, count=2):
    """Sparse random changes of the head and one bias of the embedded MiniLM."""
    names = ["classifier.weight", "classifier.bias", "bert.encoder.layer.5.output.dense.bias"]
    gen = torch.Generator().manual_seed(0)
    base = {n: p.detach() for n, p in model.named_parameters()}
    deltas = []
    for i in range(count):
        tuned = copy.deepcopy(model)
        bits = {}
        with torch.no_grad():
            for n, p in tuned.named_parameters():
                bits[n] = torch.full(p.shape, n in names)
                if n in names:
                    p.add_(0.05 * torch.randn(p.shape, generator=gen))
        deltas.append(st.SparseDelta.extract(tuned, base, st.Mask(bits), method=f"r{i}"))
    return deltas


def test_real_minilm_trains_in_a_subspace_of_sparse_deltas():
    """The embedded MiniLM: a subspace of two sparse deltas, two training steps through it."""
    model, tokenizer = st.data.load_model(2, seed=0, attn_implementation="sdpa")
    space = subspace.fit(_minilm_deltas(model), 2)
    assert space.num_coordinates == 2 * 384 + 2 + 384
    task = st.data.load_task("rotten_tomatoes", max_examples=40)
    data = list(st.data.batches(task.train, tokenizer, batch_size=4, max_length=16))[:2]
    result = space.train(model, lambda m, b: m(**b).loss, data, steps=2, lr=0.1)
    assert result.z.shape == (2,) and all(np.isfinite(result.losses))
    assert all(p.grad is None for p in model.parameters())


# -- command line -------------------------------------------------------------------------------
def test_cli_fit_writes_a_subspace_and_bad_input_exits_2(make_mlp, tmp_path, capsys):
    from sparsetune.cli import main

    model = make_mlp(0)
    q, coords = _planted(model, dim=2, n=3)
    files = [str(_delta(model, q @ c, method=f"m{i}").save(tmp_path / f"d{i}.safetensors"))
             for i, c in enumerate(coords)]
    out = tmp_path / "s.safetensors"
    assert main(["subspace", "fit", *files, "--dim", "2", "--method", "joint",
                 "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Subspace(dim=2, method='joint'" in printed and f"wrote {out}" in printed
    loaded = subspace.Subspace.load(out)
    assert loaded.labels == ["m0", "m1", "m2"]
    assert main(["subspace", "fit", *files, "--dim", "5", "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dim must be at most the number of solutions (3)" in err[0]


@pytest.mark.slow
def test_cli_train_and_landscape_on_the_embedded_model(tmp_path, capsys):
    from sparsetune.cli import main

    model, _ = st.data.load_model(2, seed=0, attn_implementation="sdpa")
    files = [str(d.save(tmp_path / f"d{i}.safetensors"))
             for i, d in enumerate(_minilm_deltas(model))]
    space_file = str(tmp_path / "s.safetensors")
    assert main(["subspace", "fit", *files, "--dim", "2", "--output", space_file]) == 0
    common = ["--max-examples", "40", "--batch-size", "4", "--max-length", "16", "--no-progress"]
    out_delta = tmp_path / "trained.safetensors"
    assert main(["subspace", "train", space_file, *common, "--steps", "2", "--lr", "0.1",
                 "--mask", files[0], "--output", str(out_delta)]) == 0
    printed = capsys.readouterr().out
    assert "test accuracy:" in printed and out_delta.exists()
    assert st.SparseDelta.load(out_delta).support() == st.SparseDelta.load(files[0]).support()
    png = tmp_path / "l.png"
    assert main(["subspace", "landscape", space_file, *common, "--grid", "2", "--examples",
                 "4", "--output", str(png)]) == 0
    assert png.stat().st_size > 1000
    assert main(["subspace", "train", space_file, *common, "--steps", "1",
                 "--model-seed", "3"]) == 2
    assert "not the base the subspace was fitted over" in capsys.readouterr().err


@pytest.mark.slow
def test_benchmark_quick_configuration(tmp_path):
    from benchmarks import subspace as bench

    result = bench.main(["--quick", "--methods", "bitfit", "lora", "--output-dir",
                         str(tmp_path)])
    written = json.loads((tmp_path / "subspace-quick.json").read_text())
    assert written["status"] == result["status"] == "complete"
    task = written["tasks"]["rotten_tomatoes"]
    assert {r["method"] for r in task["solutions"]} == {"bitfit", "lora"}
    for fit in ("svd", "joint"):
        assert set(task["fits"][fit]["transfer"]) == {"bitfit", "lora"}
        assert (tmp_path / f"subspace-rotten_tomatoes-{fit}-quick.png").exists()
    # Resumable: a second run trains nothing and reuses the cached solutions.
    again = bench.main(["--quick", "--methods", "bitfit", "lora", "--output-dir",
                        str(tmp_path)])
    assert all(r["cached"] for r in again["tasks"]["rotten_tomatoes"]["solutions"])


def test_benchmark_keeps_tasks_of_an_earlier_run(tmp_path):
    from benchmarks import subspace as bench

    path = tmp_path / "subspace.json"
    assert bench._previous_tasks(path) == {}
    path.write_text(json.dumps({"command": "benchmarks/subspace.py --seeds 0", "started": "t0",
                                "config": {"seeds": [0]},
                                "tasks": {"rotten_tomatoes": {"fits": {"svd": {}}}}}))
    kept = bench._previous_tasks(path)
    assert kept == {"rotten_tomatoes": {"fits": {"svd": {}}, "config": {"seeds": [0]},
                                        "command": "benchmarks/subspace.py --seeds 0",
                                        "started": "t0"}}
    path.write_text("{not json")
    assert bench._previous_tasks(path) == {}


@pytest.mark.parametrize("method", ["svd", "joint"])
def test_normalize_gives_every_solution_equal_weight(make_mlp, method):
    """Two small, nearly parallel solutions and one 100x larger orthogonal one, d = 1: the
    plain fit spends its direction on the large one; the normalised fit on the shared one."""
    model = make_mlp()
    size = _flat_size(model)
    e = torch.eye(size, dtype=torch.float64)
    small_a, small_b, large = e[0], e[0] + 0.1 * e[1], 100 * e[2]
    deltas = [_delta(model, v, method=m) for v, m in
              ((small_a, "a"), (small_b, "b"), (large, "c"))]
    plain = subspace.fit(deltas, 1, method=method, dtype=torch.float64)
    scaled = subspace.fit(deltas, 1, method=method, dtype=torch.float64, normalize=True)
    torch.testing.assert_close(plain.reconstruction_error,
                               torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64),
                               atol=1e-6, rtol=0)
    err = scaled.reconstruction_error
    assert float(err[0]) < 0.06 and float(err[1]) < 0.06 and float(err[2]) > 0.999
    # Coordinates are those of the solutions as given: projecting gives them back.
    for i, d in enumerate(deltas):
        torch.testing.assert_close(scaled.project(d).double(), scaled.coordinates[i],
                                   atol=1e-6, rtol=1e-6)
    with pytest.raises(st.errors.InvalidArgumentError, match="all zero"):
        subspace.fit([*deltas, _delta(model, 0 * small_a, method="zero")], 1, normalize=True)
