"""The solved head stage: convergence, a choice made on training folds only, determinism, edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from headstart.errors import HeadstartError
from headstart.training.head_solver import (
    final_layer_inputs,
    solve_head,
    solve_linear,
    stratified_folds,
    write_linear,
)


def blobs(n: int, d: int, classes: int, spread: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian classes around random centres; ``spread`` is the noise's scale against the centres'."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, d))
    y = np.arange(n) % classes
    rng.shuffle(y)
    x = centres[y] + spread * rng.normal(size=(n, d))
    return x.astype(np.float32), y


def accuracy(result, x: np.ndarray, y: np.ndarray) -> float:
    logits = torch.as_tensor(x, dtype=torch.float32) @ result.weight.T + result.bias
    return float((logits.argmax(1).numpy() == y).mean())


def test_converges_on_separable_data_and_fills_a_linear_layer():
    x, y = blobs(240, 10, 3, spread=0.05)
    x = x * 7 + 3  # raw features need not be standardised: the solution is folded back
    r = solve_linear(x, y, folds=4)
    assert r.cv_score == 1.0
    assert accuracy(r, x, y) == 1.0
    layer = nn.Linear(10, 3)
    write_linear(layer, r)
    with torch.no_grad():
        assert (layer(torch.as_tensor(x)).argmax(1).numpy() == y).all()
    assert set(r.scores) <= set(r.losses) and r.weight_decay in r.scores
    assert "CV accuracy 100.00%" in r.summary()


def test_features_far_from_zero_are_standardised_without_cancellation():
    # float32 holds 1e4 + x to about 1e-3: the same problem up to that rounding, the same choice.
    x, y = blobs(240, 10, 3, spread=1.5, seed=16)
    near, far = solve_linear(x, y, folds=4), solve_linear(x + 1e4, y, folds=4)
    assert far.weight_decay == near.weight_decay
    assert abs(accuracy(far, x + 1e4, y) - accuracy(near, x, y)) < 0.01
    assert accuracy(near, x, y) > 0.8


def test_validation_labels_never_reach_the_choice():
    xa, ya = blobs(400, 20, 4, spread=1.0, seed=1)
    x, y, xv, yv = xa[:300], ya[:300], xa[300:], ya[300:]  # train, and a separate "validation" split
    first = solve_linear(x, y)
    rng = np.random.default_rng(0)
    yv_permuted = rng.permutation(yv)
    assert not np.array_equal(yv, yv_permuted)
    again = solve_linear(x, y)  # the solver takes the training split only: nothing else to pass
    assert again.weight_decay == first.weight_decay and again.scores == first.scores
    assert torch.equal(again.weight, first.weight)
    # Only validation accuracy moves with the permuted labels; the choice stays where it was.
    assert accuracy(first, xv, yv) != accuracy(first, xv, yv_permuted)
    # And the choice does depend on the training labels it is given (the check above can fail).
    y_noisy = y.copy()
    flip = rng.random(len(y)) < 0.5
    y_noisy[flip] = rng.integers(0, 4, int(flip.sum()))
    assert solve_linear(x, y_noisy).scores != first.scores


def test_noisy_labels_get_stronger_regularisation():
    x, y = blobs(400, 60, 3, spread=2.0, seed=3)
    rng = np.random.default_rng(1)
    noisy = y.copy()
    flip = rng.random(len(y)) < 0.45
    noisy[flip] = rng.integers(0, 3, int(flip.sum()))
    clean_wd = solve_linear(x, y).weight_decay
    noisy_wd = solve_linear(x, noisy).weight_decay
    assert noisy_wd > clean_wd


def test_deterministic_for_a_seed():
    x, y = blobs(200, 16, 3, spread=1.5, seed=4)
    a, b = solve_linear(x, y, seed=7), solve_linear(x, y, seed=7)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias) and a.scores == b.scores
    folds_a, _ = stratified_folds(y, 5, seed=7)
    folds_b, _ = stratified_folds(y, 5, seed=8)
    assert not np.array_equal(folds_a, folds_b)


def test_folds_are_stratified():
    y = np.repeat([0, 1, 2], [50, 30, 20])
    folds, notes = stratified_folds(y, 5, seed=0)
    assert notes == []
    for c, n in ((0, 50), (1, 30), (2, 20)):
        assert np.bincount(folds[y == c], minlength=5).tolist() == [n // 5] * 5


def test_a_class_smaller_than_the_folds_degrades_with_a_note():
    x, y = blobs(120, 8, 3, spread=0.3, seed=5)
    keep = np.concatenate([np.flatnonzero(y != 2), np.flatnonzero(y == 2)[:3]])
    r = solve_linear(x[keep], y[keep], folds=5)
    assert r.folds == 5
    assert any("class 2 has 3 training row(s)" in n for n in r.notes)
    assert accuracy(r, x[keep], y[keep]) > 0.9


def test_every_class_smaller_than_the_folds_uses_fewer_folds():
    x, y = blobs(6, 4, 2, spread=0.1, seed=6)  # 3 rows per class
    r = solve_linear(x, y, folds=5)
    assert r.folds == 3 and any("using 3 folds" in n for n in r.notes)
    with pytest.raises(HeadstartError, match="single training image"):
        solve_linear(x[:2], np.array([0, 1]))


def test_two_classes():
    x, y = blobs(100, 12, 2, spread=0.8, seed=7)
    r = solve_linear(x, y)
    assert r.weight.shape == (2, 12) and r.bias.shape == (2,)
    assert accuracy(r, x, y) > 0.9


def test_float16_input_is_solved_in_float32():
    x, y = blobs(150, 12, 3, spread=1.0, seed=8)
    half = x.astype(np.float16)
    from_numpy = solve_linear(half, y)
    from_torch = solve_linear(torch.as_tensor(half), y)
    as_float = solve_linear(half.astype(np.float32), y)
    assert from_numpy.weight.dtype == torch.float32
    assert torch.equal(from_numpy.weight, as_float.weight) and torch.equal(from_torch.weight, as_float.weight)


def test_reads_a_read_only_memory_map_like_the_feature_cache(tmp_path):
    x, y = blobs(90, 6, 3, spread=0.5, seed=12)
    np.save(tmp_path / "features.npy", x)
    mapped = np.load(tmp_path / "features.npy", mmap_mode="r")  # how training.cache stores features
    from_map = solve_linear(mapped, y)
    assert torch.equal(from_map.weight, solve_linear(x, y).weight)
    head = nn.Sequential(nn.Linear(6, 3))
    assert torch.equal(final_layer_inputs(head, "0", mapped), torch.as_tensor(x))


def test_views_of_one_image_stay_in_one_fold():
    # Random labels, each image seen twice (an identical "augmented view"): without groups a fold
    # holds out rows whose twins it trained on, and memorising looks like skill.
    rng = np.random.default_rng(9)
    x = rng.normal(size=(100, 150)).astype(np.float32)
    y = rng.integers(0, 2, 100)
    x2, y2, g = np.concatenate([x, x]), np.concatenate([y, y]), np.tile(np.arange(100), 2)
    leaky = solve_linear(x2, y2, grid=[1e-4], folds=5)
    grouped = solve_linear(x2, y2, grid=[1e-4], folds=5, groups=g)
    assert leaky.cv_score > 0.8
    assert grouped.cv_score < 0.7


def test_class_weights_move_the_boundary_towards_the_small_class():
    x, y = blobs(330, 2, 2, spread=1.2, seed=10)
    keep = np.concatenate([np.flatnonzero(y == 0), np.flatnonzero(y == 1)[:30]])
    x, y = x[keep], y[keep]
    plain = solve_linear(x, y, grid=[0.01])
    weighted = solve_linear(x, y, grid=[0.01], class_weights=[1.0, 165 / 30])
    recall = lambda r: float((  # noqa: E731
        (torch.as_tensor(x[y == 1]) @ r.weight.T + r.bias).argmax(1) == 1).float().mean())
    assert recall(weighted) > recall(plain)


def test_solve_head_serves_a_head_with_pretrained_layers_before_the_last():
    # VGG's replace head in miniature: layers kept (here: random, standing for pretrained) + new last layer.
    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 3))
    x, y = blobs(240, 20, 3, spread=0.3, seed=11)
    kept = head[0].weight.clone()
    head.train()
    inputs = final_layer_inputs(head, "3", x)
    with torch.no_grad():
        expected = head[:3].eval()(torch.as_tensor(x))
    assert torch.allclose(inputs, expected) and head.training  # eval mode inside, mode restored
    r = solve_head(head, "3", x, y)
    assert torch.equal(head[0].weight, kept)
    with torch.no_grad():
        assert (head.eval()(torch.as_tensor(x)).argmax(1).numpy() == y).mean() > 0.95
    assert r.weight.shape == (3, 32)


def test_user_errors_speak():
    x, y = blobs(60, 4, 3, spread=1.0)
    with pytest.raises(HeadstartError, match="targets must lie in 0..1"):
        solve_linear(x, y, num_classes=2)
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(HeadstartError, match="NaN"):
        solve_linear(bad, y)
    with pytest.raises(HeadstartError, match="final layer is"):
        write_linear(nn.Linear(4, 5), solve_linear(x, y))
    with pytest.raises(HeadstartError, match="not a Linear layer"):
        solve_head(nn.Sequential(nn.Linear(4, 3), nn.ReLU()), "1", x, y)
    with pytest.raises(HeadstartError, match="at least 2 folds"):
        solve_linear(x, y, folds=1)
