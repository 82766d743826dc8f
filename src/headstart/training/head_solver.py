"""A head stage that is solved, not sampled: the final layer fitted to convergence on cached features.

While the body is frozen its features are a fixed array, and the final layer of the head is a
multinomial logistic regression on them. :func:`solve_linear` fits it with full-batch L-BFGS to
convergence and chooses its L2 strength (weight decay) by stratified k-fold cross-validation on
the arrays it is given, the training split only: the caller never passes validation data, so the
choice cannot see it.

How (and why):

* **One batched problem.** The k fold models and the model on all rows are fitted together, as
  k + 1 independent columns of one weight tensor: every step is one matrix product of the
  features with all of them, instead of k + 1 small ones and k + 1 line searches in Python.
  The objective is a sum of independent parts, so its minimiser is each part's own minimiser.
* **A path, strong to weak.** The grid is walked from the strongest regularisation down, each
  value warm-started from the previous solution (strongly regularised fits converge in a few
  steps, and each is a good start for the next); the walk stops once the cross-validated score
  has not improved for ``patience`` values.
* **Standardised features.** Each column standardises the features with its own training rows'
  mean and deviation, which conditions L-BFGS well and makes one grid fit every backbone; the
  result is folded back into a weight and bias for the raw features, ready for ``nn.Linear``.
* **Rows of one image stay together.** With augmented views, ``groups`` names the image of each
  row, and folds are drawn over images, so no image is in a fold's training and held-out part.

Example::

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> y = rng.integers(0, 3, 300)
    >>> x = rng.normal(size=(300, 16)).astype("float32") + 3 * np.eye(3, 16, dtype="float32")[y]
    >>> result = solve_linear(x, y, folds=3)
    >>> result.cv_score > 0.9, result.weight.shape
    (True, torch.Size([3, 16]))
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import HeadstartError

# L2 strengths (on the standardised features, loss averaged over rows), strongest first: half a
# decade apart. Measured optima on real photo features sat between 1 and 1e-3 (see bench/head_probe.py).
DEFAULT_GRID: tuple[float, ...] = tuple(float(f"{v:.3g}") for v in np.logspace(1, -4, 11))


@dataclass
class SolveResult:
    """What :func:`solve_linear` found.

    ``weight`` (classes, features) and ``bias`` (classes,) apply to the raw features, as an
    ``nn.Linear`` would; ``weight_decay`` is the chosen L2 strength; ``cv_score`` / ``cv_loss`` the
    held-out accuracy / cross-entropy at it, averaged over all rows of all folds (weighted by the
    class weights when there are any); ``scores`` and
    ``losses`` hold them for every value tried, in the order tried.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    weight_decay: float
    cv_score: float
    cv_loss: float
    scores: dict[float, float]
    losses: dict[float, float]
    folds: int
    seconds: float
    evaluations: int
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the log and the report."""
        tried = ", ".join(f"{k:g}: {v:.1%}" for k, v in self.scores.items())
        return (f"head solved: weight decay {self.weight_decay:g} chosen by {self.folds}-fold CV on the training "
                f"split, CV accuracy {self.cv_score:.2%} (loss {self.cv_loss:.3f}); tried {tried}; "
                f"{self.seconds:.1f}s")

    def to_dict(self) -> dict[str, Any]:
        """Plain data for metrics files and reports (no tensors)."""
        return {"weight_decay": self.weight_decay, "cv_accuracy": self.cv_score, "cv_loss": self.cv_loss,
                "folds": self.folds, "seconds": self.seconds, "evaluations": self.evaluations,
                "scores": {f"{k:g}": v for k, v in self.scores.items()},
                "losses": {f"{k:g}": v for k, v in self.losses.items()}, "notes": list(self.notes)}


def stratified_folds(targets: Sequence[int] | np.ndarray, folds: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """The fold (0..folds-1) of every row, each class dealt round-robin over the folds in a seeded order.

    Returns the folds and notes on classes with fewer rows than folds (they are then missing from
    some held-out parts, and a class with one row cannot be learnt by the fold that holds it out).
    """
    y = np.asarray(targets)
    rng = np.random.default_rng(seed)
    out = np.empty(len(y), dtype=np.int64)
    notes, start = [], 0
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        rows = rows[rng.permutation(len(rows))]
        out[rows] = (start + np.arange(len(rows))) % folds
        start = (start + len(rows)) % folds  # the next class starts where this one stopped: even folds
        if len(rows) < folds:
            notes.append(f"class {int(c)} has {len(rows)} training row(s), fewer than the {folds} folds: "
                         f"it is held out in only {len(rows)} of them")
    return out, notes


def _float_rows(a: Any) -> torch.Tensor:
    """float32 rows from a tensor or an array-like, copied: a cached read-only memmap included."""
    if isinstance(a, torch.Tensor):
        return a.detach().float()
    return torch.from_numpy(np.array(a, dtype=np.float32))


def _fold_rows(y: np.ndarray, folds: int, seed: int, groups: Any) -> tuple[np.ndarray, list[str]]:
    """Folds per row; with ``groups`` the groups are dealt out (stratified by their first row's class)."""
    if groups is None:
        return stratified_folds(y, folds, seed)
    g = np.asarray(groups)
    if len(g) != len(y):
        raise HeadstartError(f"groups has {len(g)} entries for {len(y)} rows; give one group id per row")
    names, first, where = np.unique(g, return_index=True, return_inverse=True)
    per_group, notes = stratified_folds(y[first], folds, seed)
    return per_group[where], notes


def _check_folds(y: np.ndarray, folds: int) -> tuple[int, list[str]]:
    if folds < 2:
        raise HeadstartError(f"cross-validation needs at least 2 folds, got folds={folds}")
    largest = int(np.bincount(y).max())
    if largest < 2:
        raise HeadstartError("every class has a single training image: cross-validation needs at least "
                             "2 images in some class; add images")
    if largest < folds:
        return largest, [f"no class has {folds} training rows: using {largest} folds instead"]
    return folds, []


class _Columns:
    """k fold problems plus the all-rows problem, as columns of one batched logistic regression.

    Column j < k trains on the rows outside fold j; column k trains on every row. Each column
    has its own standardisation (its training rows' mean and deviation) and its own row weights
    (class weights, normalised to a weighted mean over its training rows).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, c: int, fold_of: np.ndarray, folds: int,
                 row_weight: torch.Tensor, smoothing: float, scaling: str = "feature") -> None:
        self.x, self.y, self.c, self.smoothing = x, y, c, smoothing
        fold = torch.as_tensor(fold_of)
        member = torch.stack([fold != j for j in range(folds)] + [torch.ones_like(fold, dtype=torch.bool)])
        # Held-out rows count with their class weight too: with class weights the choice follows
        # the weighted (class-balanced) loss the fit itself minimises.
        self.held_out = (~member[:folds]).to(x.dtype).T * row_weight[:, None]  # (N, k)
        m = member.to(x.dtype)  # (k+1, N)
        counts = m.sum(1, keepdim=True)
        centre = x.mean(0)  # moments about the overall mean: no cancellation for offset features
        xc = x - centre
        mu_c = (m @ xc) / counts  # (k+1, D)
        sd = ((m @ (xc * xc)) / counts - mu_c**2).clamp_min(0).sqrt()
        self.mu = mu_c + centre
        # A feature constant on a column's training rows (a dead ReLU channel) carries nothing it
        # could learn from; an infinite scale gives it weight 0 instead of 1/0 on held-out rows.
        tiny = 1e-5 * float(x.abs().max().clamp_min(1e-12))
        live = sd > tiny
        if scaling == "global":  # one scale for all features (their root-mean-square deviation)
            rms = ((sd * live) ** 2).sum(1, keepdim=True) / live.sum(1, keepdim=True).clamp_min(1)
            sd = rms.sqrt().expand_as(sd)
        self.sd = torch.where(live, sd, torch.full_like(sd, math.inf))
        w = m * row_weight[None, :]
        self.row_w = (w / w.sum(1, keepdim=True)).T.contiguous()  # (N, k+1): weighted mean per column
        self.cols = folds + 1
        self.evaluations = 0

    def logits(self, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(N, k+1, C) logits of every row under every column's model (W, b in standardised units)."""
        V = W / self.sd[:, :, None]  # (k+1, D, C) on raw features
        b0 = b - torch.einsum("jd,jdc->jc", self.mu, V)
        z = self.x @ V.permute(1, 0, 2).reshape(self.x.shape[1], -1)
        return z.view(len(self.x), self.cols, self.c) + b0

    def row_losses(self, z: torch.Tensor) -> torch.Tensor:
        """(N, k+1) cross-entropy of each row under each column, with label smoothing."""
        lse = torch.logsumexp(z, dim=2)
        picked = z.gather(2, self.y.view(-1, 1, 1).expand(-1, self.cols, 1)).squeeze(2)
        nll = lse - picked
        if not self.smoothing:
            return nll
        return (1 - self.smoothing) * nll + self.smoothing * (lse - z.mean(2))

    def fit(self, lam: float, W: torch.Tensor, b: torch.Tensor, max_iter: int, tol: float) -> None:
        """Minimise every column's weighted mean loss + lam/2 |W_j|^2 (biases free), from W, b."""
        params = [W.requires_grad_(True), b.requires_grad_(True)]
        opt = torch.optim.LBFGS(params, lr=1, max_iter=max_iter, max_eval=max_iter + max_iter // 4,
                                tolerance_grad=tol, tolerance_change=1e-12, history_size=20,
                                line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            loss = (self.row_losses(self.logits(W, b)) * self.row_w).sum() + 0.5 * lam * (W * W).sum()
            loss.backward()
            self.evaluations += 1
            return loss

        opt.step(closure)
        W.requires_grad_(False)
        b.requires_grad_(False)

    @torch.no_grad()
    def held_out_scores(self, W: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
        """(accuracy, mean cross-entropy) of each fold's model on its held-out rows, over all rows."""
        z = self.logits(W, b)[:, :-1]  # (N, k, C): the all-rows column has no held-out part
        w = self.held_out  # (N, k): row j of fold f counts (with its class weight) where f holds it out
        nll = (torch.logsumexp(z, 2) - z.gather(2, self.y.view(-1, 1, 1).expand(-1, z.shape[1], 1)).squeeze(2))
        right = (z.argmax(2) == self.y[:, None]).to(z.dtype)
        n = float(w.sum())
        return float((right * w).sum()) / n, float((nll * w).sum()) / n


def solve_linear(
    features: Any,
    targets: Any,
    *,
    num_classes: int | None = None,
    folds: int = 5,
    grid: Sequence[float] = DEFAULT_GRID,
    seed: int = 0,
    class_weights: Any = None,
    label_smoothing: float = 0.0,
    groups: Any = None,
    select: str = "loss",
    patience: int | None = 3,
    max_iter: int = 50,
    tol: float = 1e-3,
    scaling: str = "feature",
) -> SolveResult:
    """Fit a softmax classifier on ``features`` (N, D) by L-BFGS, its L2 strength chosen by k-fold CV.

    ``targets`` are class indices (N,); ``num_classes`` defaults to the largest one + 1.
    Only these rows are used, for the choice and for the final fit: pass the training split.
    ``grid`` lists the L2 strengths to try (walked strongest first, see the module docstring);
    ``select`` is ``loss`` (held-out cross-entropy, the default: accuracy barely moves with the
    scale of the weights, so on small folds it picks almost any strength; the loss does not) or
    ``accuracy`` (ties to the lower held-out loss, then to the stronger value). ``class_weights`` (C,) weight the loss
    per class; ``groups`` (N,) keeps rows of one image in one fold. float16 input is computed in
    float32. The result is deterministic for a given ``seed`` (which only draws the folds).
    """
    start = time.perf_counter()
    if select not in ("accuracy", "loss"):
        raise HeadstartError(f"unknown selection {select!r}: use accuracy or loss")
    if scaling not in ("feature", "global"):
        raise HeadstartError(f"unknown scaling {scaling!r}: use feature or global")
    x = _float_rows(features)
    y_np = np.asarray(targets).astype(np.int64).reshape(-1)
    if x.ndim != 2 or len(x) != len(y_np):
        raise HeadstartError(f"features must be (rows, dims) with one target per row; got {tuple(x.shape)} "
                             f"and {len(y_np)} targets")
    if not torch.isfinite(x).all():
        raise HeadstartError("features contain NaN or infinite values; check the frozen body's output")
    c = int(num_classes or int(y_np.max()) + 1)
    if y_np.min() < 0 or y_np.max() >= c:
        raise HeadstartError(f"targets must lie in 0..{c - 1}, found {y_np.min()}..{y_np.max()}")
    folds, notes = _check_folds(y_np, folds)
    fold_of, fold_notes = _fold_rows(y_np, folds, seed, groups)
    y = torch.as_tensor(y_np)
    cw = torch.ones(c) if class_weights is None else torch.as_tensor(np.asarray(class_weights), dtype=torch.float32)
    cols = _Columns(x, y, c, fold_of, folds, cw[y], label_smoothing, scaling)
    W, b = torch.zeros(cols.cols, x.shape[1], c), torch.zeros(cols.cols, c)
    path = _walk(cols, sorted({float(v) for v in grid}, reverse=True), W, b, select, patience, max_iter, tol)
    chosen = _choose(path, select)
    acc, loss, Wc, bc = path[chosen]
    V = Wc[-1] / cols.sd[-1][:, None]  # the all-rows column, back on raw features
    weight, bias = V.T.contiguous(), (bc[-1] - cols.mu[-1] @ V).contiguous()
    return SolveResult(weight, bias, chosen, acc, loss, {k: v[0] for k, v in path.items()},
                       {k: v[1] for k, v in path.items()}, folds, time.perf_counter() - start,
                       cols.evaluations, notes + fold_notes)


_Path = dict[float, tuple[float, float, torch.Tensor, torch.Tensor]]  # value -> (accuracy, loss, W, b)


def _walk(cols: _Columns, grid: list[float], W: torch.Tensor, b: torch.Tensor, select: str,
          patience: int | None, max_iter: int, tol: float) -> _Path:
    """Fit along ``grid`` (strongest first, warm starts); stop after ``patience`` values without gain."""
    if not grid:
        raise HeadstartError("the weight-decay grid is empty; give at least one value")
    path: _Path = {}
    best, since = -math.inf, 0
    for lam in grid:
        cols.fit(lam, W, b, max_iter, tol)
        acc, loss = cols.held_out_scores(W, b)
        path[lam] = (acc, loss, W.detach().clone(), b.detach().clone())
        score = acc if select == "accuracy" else -loss
        if score > best:
            best, since = score, 0
        else:
            since += 1
            if patience is not None and since >= patience:
                break
    return path


def _choose(path: _Path, select: str) -> float:
    if select == "loss":
        return min(path, key=lambda k: (path[k][1], -k))
    return max(path, key=lambda k: (path[k][0], -path[k][1], k))


# ---------------------------------------------------------------------- heads


def write_linear(layer: nn.Linear, result: SolveResult) -> None:
    """Copy a solution into ``layer`` (its dtype and device kept); the layer must have a bias."""
    if not isinstance(layer, nn.Linear) or layer.bias is None:
        raise HeadstartError(f"the solved head needs a final nn.Linear with a bias, got {layer}")
    if tuple(layer.weight.shape) != tuple(result.weight.shape):
        raise HeadstartError(f"the final layer is {tuple(layer.weight.shape)} but the solution is "
                             f"{tuple(result.weight.shape)} (classes, features)")
    with torch.no_grad():
        layer.weight.copy_(result.weight.to(layer.weight))
        layer.bias.copy_(result.bias.to(layer.bias))


@torch.no_grad()
def final_layer_inputs(head: nn.Module, final: str, features: Any, batch_size: int = 4096) -> torch.Tensor:
    """What ``head``'s final layer (path ``final`` inside it, "" for the head itself) reads, in eval mode.

    For a ``linear`` head (or mobilenet_v2's Dropout + Linear) that is the features themselves; for
    VGG's ``replace`` head it is the output of the pretrained ``classifier[0..5]`` (dropout off);
    for an ``mlp`` head, the last hidden layer's output. ``head``'s train/eval mode is restored.
    """
    layer = head.get_submodule(final) if final else head
    seen: list[torch.Tensor] = []
    hook = layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().float().cpu()))
    was_training = head.training
    head.eval()
    try:
        param = next(head.parameters(), None)
        for i in range(0, len(features), batch_size):
            chunk = _float_rows(features[i:i + batch_size])
            head(chunk.to(param) if param is not None else chunk)
    finally:
        hook.remove()
        head.train(was_training)
    return torch.cat(seen)


def solvable_final(head: nn.Module) -> str | None:
    """The path of ``head``'s final layer inside it ("" for the head itself) when it is a Linear layer, else None.

    The final layer is the last module holding parameters (a trailing Dropout or Flatten holds none).
    """
    holders = [(name, m) for name, m in head.named_modules() if any(True for _ in m.parameters(recurse=False))]
    if not holders or not isinstance(holders[-1][1], nn.Linear) or holders[-1][1].bias is None:
        return None
    return holders[-1][0]


def solve_head(head: nn.Module, final: str, features: Any, targets: Any, **options: Any) -> SolveResult:
    """Solve ``head``'s final layer on what it reads from ``features``, and write it in place.

    The layers before it are left as they are (pretrained for VGG's ``replace`` head, already
    trained for an ``mlp`` head). ``options`` go to :func:`solve_linear`.
    """
    layer = head.get_submodule(final) if final else head
    if not isinstance(layer, nn.Linear):
        raise HeadstartError(f"the head's final layer ({final or 'the head'}) is {type(layer).__name__}, "
                             "not a Linear layer: it cannot be solved, train it with epochs instead")
    inputs = final_layer_inputs(head, final, features)
    result = solve_linear(inputs, targets, num_classes=layer.out_features, **options)
    write_linear(layer, result)
    return result
