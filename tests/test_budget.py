"""``--budget``: durations, the choice between fine-tuning plans, and a whole run on a fake clock."""

from __future__ import annotations

import pytest
import torch

from headstart.config import RunConfig, apply_overrides
from headstart.errors import HeadstartError
from headstart.jobs.train import prepare
from headstart.training import budget
from headstart.training import fit as fit_module
from headstart.training.budget import (
    MAX_EPOCHS,
    MIN_EPOCHS,
    PREFIX_VIEWS,
    Candidate,
    Plan,
    choose,
    parse_duration,
    replan,
)
from headstart.training.fit import fit


def test_durations_need_units():
    assert parse_duration("15m") == 900 and parse_duration("1h30m") == 5400
    assert parse_duration("90s") == 90 and parse_duration("2.5h") == 9000 and parse_duration(" 1H ") == 3600
    for bad in ("15", "abc", "0m", "15 minutes", "", "m"):
        with pytest.raises(HeadstartError, match="budget"):
            parse_duration(bad)


def plans() -> list[Candidate]:
    # The last 1 / 2 groups from the cached prefix (an extraction once), or the whole network.
    return [Candidate(1, 5, extract_s=30, epoch_s=10), Candidate(2, 5, extract_s=20, epoch_s=20),
            Candidate(5, 5, extract_s=0, epoch_s=100)]


def test_the_deepest_plan_that_fits_eight_epochs_is_chosen_else_the_deepest_with_three():
    chosen = choose(plans(), left_s=900)  # the whole network fits 9 epochs
    assert chosen is not None and chosen.groups == 5 and chosen.epochs == 9
    chosen = choose(plans(), left_s=400)  # the whole network fits 4, the last 2 groups 19: long before deep
    assert chosen is not None and chosen.groups == 2 and chosen.epochs == 19
    chosen = choose(plans(), left_s=100)  # none fits 8: the last 2 fit 4, the last 1 fits 7
    assert chosen is not None and chosen.groups == 2 and chosen.epochs == 4 >= MIN_EPOCHS


def test_a_tight_budget_picks_the_cheaper_plan_and_none_when_nothing_fits():
    chosen = choose(plans(), left_s=65)  # fewer than 3 epochs for each: the one that fits most
    assert chosen is not None and chosen.groups == 1 and chosen.epochs == 3
    chosen = choose(plans(), left_s=55)
    assert chosen is not None and chosen.groups == 1 and chosen.epochs == 2 < MIN_EPOCHS
    assert choose(plans(), left_s=25) is None
    many = choose(plans(), left_s=1e6)
    assert many is not None and many.groups == 5 and many.epochs == MAX_EPOCHS


def chosen_plan(left_s: float) -> dict:
    cs = plans()
    return Plan(1000, left_s, cs, choose(cs, left_s)).to_dict()


def test_the_planned_length_is_refitted_once_to_the_first_epochs_real_time():
    plan = chosen_plan(900)  # the whole network, 9 epochs of an estimated 100 s
    # It ran in 80 s and 790 s are left: 9 more fit, 10 in all; the estimate stays on record.
    assert "now runs 10 epoch(s), not 9" in replan(plan, epoch_s=80, left_s=790, done=1)
    assert plan["epochs"] == 10 and plan["candidates"][plan["chosen"]]["epochs"] == 9
    assert plan["refit"] == {"after": 1, "epoch_s": 80, "view_s": 0.0, "planned": 9, "epochs": 10}
    assert replan(plan, epoch_s=10, left_s=790, done=2) is None and plan["epochs"] == 10  # only once
    slow = chosen_plan(900)  # it ran in 150 s: 750 s left hold 5 more, not 8
    assert "now runs 6 epoch(s), not 9" in replan(slow, epoch_s=150, left_s=750, done=1)
    fast = chosen_plan(900)
    replan(fast, epoch_s=1, left_s=800, done=1)
    assert fast["epochs"] == MAX_EPOCHS
    same = chosen_plan(900)
    assert replan(same, epoch_s=100, left_s=800, done=1) is None and "epochs" not in same


def test_a_refit_counts_the_cached_views_still_to_extract():
    cs = [Candidate(3, 5, extract_s=150, epoch_s=10, views=5), Candidate(5, 5, extract_s=0, epoch_s=100)]
    plan = Plan(1000, 300, cs, choose(cs, 300)).to_dict()
    assert plan["chosen"] == 0  # the whole network fits 3 epochs, the prefix plan 15
    # Epochs 2-5 each extract a view first (30 s, as the first one took): 9 epochs cost 8 x 10 + 4 x 30.
    assert "now runs 9 epoch(s)" in replan(plan, epoch_s=10, left_s=200, done=1, view_s=30)
    no_views = Plan(1000, 300, cs, choose(cs, 300)).to_dict()
    replan(no_views, epoch_s=10, left_s=200, done=1)
    assert no_views["refit"]["epochs"] == 21  # without the views: 20 more of 10 s


class FakeClock:
    """Time moves only when the test says so: an epoch costs what its plan says."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def run_on_fake_clock(tmp_path, monkeypatch, budget_text: str, real: float = 1.0, **overrides):
    """A run whose epochs cost ``real`` times what the planner's timed steps estimate."""
    clock = FakeClock()
    monkeypatch.setattr(budget, "now", clock)
    # Measured costs per plan (prefix seconds per image, seconds per step, per validated image):
    # the whole network (5 groups of resnet18) is 10x dearer per step than the last groups.
    monkeypatch.setattr(budget, "_time_plan", lambda net, cfg, k, x, y: (
        (0.0, 50.0, 0.0, 0) if k >= len(net.groups) else (0.01, 5.0, 0.0, 1000)))
    real_epoch = fit_module._run_epoch

    def epoch_with_cost(job, sr, inputs, epoch):
        whole = sr.stage.freeze == "none"
        clock.t += real * (50.0 * 4 if whole else 5.0 * 4)  # 4 steps per epoch at the measured step cost
        return real_epoch(job, sr, inputs, epoch)

    monkeypatch.setattr(fit_module, "_run_epoch", epoch_with_cost)
    base = {"model.name": "resnet18", "model.weights": "none", "model.input_size": 32, "data.source": "digits",
            "data.limit_train": 128, "data.limit_val": 32, "data.batch_size": 32, "train.progress": False,
            "train.device": "cpu", "cache.dir": str(tmp_path / "cache"), "train.budget": budget_text}
    cfg = apply_overrides(RunConfig(), base | overrides)
    net, data = prepare(cfg)
    lines: list[str] = []
    start = clock.t
    result = fit(net, data, cfg, say=lines.append)
    return result, clock.t - start, "\n".join(lines)


def test_a_run_stays_within_its_budget_and_shows_the_plan(tmp_path, monkeypatch):
    result, took, text = run_on_fake_clock(tmp_path, monkeypatch, "30m")
    assert result.plan is not None
    chosen = result.plan["candidates"][result.plan["chosen"]]
    # 1,800 s: the whole network costs 200 s an epoch, so it fits 9 epochs: the deepest with 8.
    assert chosen["groups"] == 5 and chosen["epochs"] == 9
    assert took <= 1800 * 1.1
    assert "fine-tuning plans, timed over a few steps" in text and "<- chosen" in text
    finetune = [r for r in result.history if r["stage"] == "finetune"]
    assert 1 <= len(finetune) <= 9
    # At 15 minutes the whole network fits 4 epochs, the last 4 groups (on 5 cached views) 12.
    result, took, text = run_on_fake_clock(tmp_path, monkeypatch, "15m")
    chosen = result.plan["candidates"][result.plan["chosen"]]
    assert chosen["groups"] == 4 and chosen["views"] == PREFIX_VIEWS and "(5 views)" in text
    assert result.plan["refit"]["after"] == 2  # once an augmented view's extraction was timed
    assert took <= 900 * 1.1


def test_a_stage_faster_than_estimated_runs_longer_on_a_refitted_schedule(tmp_path, monkeypatch):
    # The whole network's epochs take half the 200 s its timed steps promised.
    result, took, text = run_on_fake_clock(tmp_path, monkeypatch, "27m", real=0.5, **{"train.patience": 50})
    plan = result.plan
    assert plan["candidates"][plan["chosen"]]["epochs"] == 8 and plan["refit"]["epoch_s"] == 100
    assert plan["candidates"][plan["chosen"]]["groups"] == 5
    assert plan["epochs"] == 16  # 1 done, then 1,520 s left: 15 more
    finetune = [r for r in result.history if r["stage"] == "finetune"]
    assert len(finetune) == 16 and took <= 27 * 60
    assert "now runs 16 epoch(s), not 8" in text and "epoch 16/16" in text
    # The warm-up (half the stage) now spans 8 epochs: the rate still rises at the 5th to 8th epochs'
    # starts, where the planned 8-epoch schedule was already decaying, and it decays to the end.
    lr = [max(r["lrs"].values()) for r in finetune]
    assert lr[4] < lr[5] < lr[6] < lr[7] and all(a > b > 0 for a, b in zip(lr[8:], lr[9:]))


def test_a_tight_budget_fine_tunes_the_last_groups_only(tmp_path, monkeypatch):
    result, took, text = run_on_fake_clock(tmp_path, monkeypatch, "3m")
    chosen = result.plan["candidates"][result.plan["chosen"]]
    assert chosen["groups"] < chosen["of"]  # the whole network would fit no 3 epochs of 200 s
    assert took <= 180 * 1.1
    assert "the last" in text


def test_explicit_fine_tuning_wins_and_the_budget_only_bounds_the_time(tmp_path, monkeypatch):
    result, took, text = run_on_fake_clock(tmp_path, monkeypatch, "10m", **{"train.finetune_epochs": 10})
    assert result.plan is None and "fine-tuning plans" not in text
    finetune = [r for r in result.history if r["stage"] == "finetune"]
    assert len(finetune) < 10 and took <= 600 * 1.1  # 200 s per epoch: stopped when the next would not fit
    assert "the stage ends here" in text


def test_plans_are_timed_for_real_on_a_copy_that_leaves_the_network_alone(tmp_path):
    base = {"model.name": "resnet18", "model.weights": "none", "model.input_size": 32, "data.source": "digits",
            "data.limit_train": 64, "data.limit_val": 32, "data.batch_size": 16, "train.progress": False,
            "train.device": "cpu", "cache.dir": str(tmp_path / "cache")}
    cfg = apply_overrides(RunConfig(), base)
    net, data = prepare(cfg)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    candidates = budget.measure_plans(net, data, cfg, torch.device("cpu"))
    assert [c.groups for c in candidates] == [1, 2, 3, 4, 5]
    assert budget.candidate_groups(12) == [1, 2, 3, 6, 9, 11, 12]
    assert all(c.epoch_s > 0 for c in candidates)
    assert [c.views for c in candidates] == [PREFIX_VIEWS] * 4 + [1]  # prefix plans train on augmented views
    assert all(c.extract_s > 0 for c in candidates[:-1]) and candidates[-1].extract_s == 0  # the whole network: none
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_prefix_plans_keep_the_views_whose_cache_fits_and_are_dropped_when_none_fits(tmp_path, monkeypatch):
    base = {"model.name": "resnet18", "model.weights": "none", "model.input_size": 32, "data.source": "digits",
            "data.limit_train": 64, "data.limit_val": 32, "data.batch_size": 16, "train.progress": False,
            "train.device": "cpu", "cache.dir": str(tmp_path / "cache"), "cache.max_gb": 1.0}
    cfg = apply_overrides(RunConfig(), base)
    net, data = prepare(cfg)
    # Bytes per image of each prefix: the last 1 and 4 groups' are too big for one view, the last 2's fits 2.
    sizes = {1: 2**30, 2: 2**30 // (64 * 2 + 32), 3: 1000, 4: 2**31}
    monkeypatch.setattr(budget, "_time_plan", lambda net, cfg, k, x, y: (
        (0.0, 5.0, 0.0, 0) if k >= len(net.groups) else (0.01, 1.0, 0.0, sizes[k])))
    candidates = budget.measure_plans(net, data, cfg, torch.device("cpu"))
    assert [(c.groups, c.views) for c in candidates] == [(2, 2), (3, PREFIX_VIEWS), (5, 1)]
    two, five = candidates[0], candidates[1]
    assert two.extract_s / five.extract_s == pytest.approx((64 * 2 + 32) / (64 * PREFIX_VIEWS + 32), rel=1e-6)


def test_a_deeper_plan_timed_faster_than_a_shallower_one_is_pooled_with_it(tmp_path, monkeypatch):
    base = {"model.name": "resnet18", "model.weights": "none", "model.input_size": 32, "data.source": "digits",
            "data.limit_train": 64, "data.limit_val": 32, "data.batch_size": 16, "train.progress": False,
            "train.device": "cpu", "cache.dir": str(tmp_path / "cache")}
    cfg = apply_overrides(RunConfig(), base)
    net, data = prepare(cfg)
    steps = {1: 1.0, 2: 2.0, 3: 9.0, 4: 5.0, 5: 10.0}  # the last 4 groups timed faster than the last 3
    monkeypatch.setattr(budget, "_time_plan", lambda net, cfg, k, x, y: (0.0 if k == 5 else 0.01, steps[k], 0.0, 4))
    candidates = budget.measure_plans(net, data, cfg, torch.device("cpu"))
    per_step = [c.epoch_s / 4 for c in candidates]  # 64 images / 16 a batch = 4 steps an epoch
    assert per_step[:2] == pytest.approx([1.0, 2.0]) and per_step[2] == per_step[3] == pytest.approx(7.0)
    assert per_step[4] > per_step[3] and [c.pooled for c in candidates] == [False, False, True, True, False]
    lines = budget.Plan(900, 800, candidates, budget.choose(candidates, 800)).lines()
    assert sum("s/epoch*->" in line for line in lines) == 2 and "* pooled: a deeper plan timed faster" in lines[-1]


def test_a_resumed_budget_run_keeps_its_plan(tmp_path, monkeypatch):
    """Stopped in the planned stage, the run resumes into the same stage, refitted length included: the planner
    does not run again."""
    import headstart as hs

    clock = FakeClock()
    monkeypatch.setattr(budget, "now", clock)
    monkeypatch.setattr(budget, "_time_plan", lambda net, cfg, k, x, y: (
        (0.0, 5.0, 0.0, 0) if k >= len(net.groups) else (0.01, 5.0, 0.0, 1000)))
    real_epoch, seen = fit_module._run_epoch, []

    def epoch_then_stop(job, sr, inputs, epoch):
        clock.t += 10.0  # half the 20 s an epoch was estimated at
        if sr.stage.name == "finetune":
            seen.append(epoch)
            if len(seen) == 2:
                raise KeyboardInterrupt  # a kill during the second fine-tuning epoch
        return real_epoch(job, sr, inputs, epoch)

    monkeypatch.setattr(fit_module, "_run_epoch", epoch_then_stop)
    base = {"model.name": "resnet18", "model.weights": "none", "model.input_size": 32, "data.source": "digits",
            "data.limit_train": 128, "data.limit_val": 32, "data.batch_size": 32, "train.progress": False,
            "train.device": "cpu", "cache.dir": str(tmp_path / "cache"), "train.budget": "3m",
            "output": str(tmp_path / "runs"), "name": "r", "report": False, "tensorboard": False,
            "train.patience": 50}
    cfg = apply_overrides(RunConfig(), base)
    with pytest.raises(KeyboardInterrupt):
        hs.train(cfg, say=lambda _: None)
    saved = torch.load(tmp_path / "runs" / "r" / "last.pt", map_location="cpu", weights_only=True)
    plan = saved["train_state"]["plan"]
    assert plan is not None and plan["chosen"] is not None
    assert plan["candidates"][plan["chosen"]]["epochs"] < plan["epochs"]  # refitted: twice as fast
    monkeypatch.setattr(budget, "measure_plans", lambda *a, **k: pytest.fail("the plan was measured again"))
    lines: list[str] = []
    result = hs.train(cfg, resume=tmp_path / "runs" / "r", say=lines.append)
    assert result.plan == plan
    assert seen[2:] and seen[2] == 1  # it went on with the planned stage's second epoch
    assert [r["stage"] for r in result.history][:2] == ["head", "finetune"]
    assert sum(r["stage"] == "finetune" for r in result.history) == plan["epochs"]


def test_the_report_says_what_the_budget_chose_and_what_its_first_epoch_changed(tmp_path):
    from headstart.report.choices import budget_notes
    from headstart.report.run import RunRecord

    plan = chosen_plan(900)
    replan(plan, epoch_s=80, left_s=790, done=1)
    history = [{"stage": "head"}] + [{"stage": "finetune"}] * 6
    html = budget_notes(RunRecord(tmp_path, summary={"budget_plan": plan, "wall_seconds": 420}, history=history))
    assert "the whole network (chosen)" in html and "Fine-tuning ran 6 epoch(s)" in html
    assert "set to 10 epoch(s) instead of 9" in html
    assert "After 1 epoch(s), an epoch took" in html
    assert "an epoch took" not in budget_notes(RunRecord(tmp_path, summary={"budget_plan": chosen_plan(900)}))


def test_the_budget_stage_is_not_stopped_early_before_half_of_its_decay():
    from headstart.config import StageConfig, TrainConfig
    from headstart.training.state import FitState

    stage, tc = StageConfig(name="finetune", epochs=12, warmup=0.5), TrainConfig()
    # warm-up: epochs 1-6; half of the decay: 7-9; counted: 10-12
    assert [budget.patience_counts(stage, done, tc, 4) for done in (1, 6, 7, 9, 10, 12)] == [
        False, False, False, False, True, True]
    # A warm-up capped at 60 steps of a 1,200-step stage (5%): half of the decay is over after 6.3 epochs.
    capped = StageConfig(name="finetune", epochs=12, warmup=0.5, warmup_steps=60)
    assert [budget.patience_counts(capped, done, tc, 100) for done in (6, 7)] == [False, True]
    state = FitState()
    rows = [(0.871, 0.456), (0.859, 0.461), (0.871, 0.470), (0.853, 0.480), (0.85, 0.5), (0.85, 0.5),
            (0.85, 0.5), (0.85, 0.5), (0.85, 0.5)]  # no improvement after the first
    for done, (acc, loss) in enumerate(rows, 1):
        state.track_best({"val_acc": acc, "val_loss": loss}, 2, counts=budget.patience_counts(stage, done, tc, 4))
    assert not state.stopped and state.bad_epochs == 0
    for done in (10, 11):  # past half of the decay the same epochs count
        state.track_best({"val_acc": 0.85, "val_loss": 0.5}, 2, counts=budget.patience_counts(stage, done, tc, 4))
    assert state.stopped
