"""The config tree: one declaration per setting gives the flag, the YAML key, ``--set`` and the checks.

No training here: the parser, the YAML reader and :func:`validate` on their own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest

from headstart.cli import build_parser
from headstart.cli.flags import add_config_flags, resolve_config
from headstart.config import (
    RunConfig,
    TrainConfig,
    apply_overrides,
    from_dict,
    load_yaml,
    setting,
    settings,
    to_dict,
    validate,
)
from headstart.errors import HeadstartError

# ---------------------------------------------------------------------- one declaration per setting


@dataclass
class TrainPlus(TrainConfig):
    warmup_epochs: int = setting(0, at_least=0, help="epochs of linear warmup before the first stage")


@dataclass
class RunPlus(RunConfig):
    train: TrainPlus = field(default_factory=TrainPlus)


def _train_help(capsys) -> str:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["train", "--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


def test_a_new_field_with_its_help_gives_the_flag_the_yaml_key_and_set(tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    add_config_flags(parser, cls=RunPlus)
    text = " ".join(parser.format_help().split())
    assert "--warmup-epochs N" in text
    assert "epochs of linear warmup before the first stage (default: 0) [train.warmup_epochs]" in text

    args = parser.parse_args(["--warmup-epochs", "2", "--lr", "0.5"])
    cfg = resolve_config(args)
    assert isinstance(cfg, RunPlus) and cfg.train.warmup_epochs == 2 and cfg.train.lr == 0.5

    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("train:\n  warmup_epochs: 3\n")
    assert load_yaml(yaml_file, RunPlus).train.warmup_epochs == 3
    assert apply_overrides(RunPlus(), {"train.warmup_epochs": "4"}).train.warmup_epochs == 4
    with pytest.raises(HeadstartError, match=r"train\.warmup_epochs \(--warmup-epochs\) is -1"):
        resolve_config(parser.parse_args(["--warmup-epochs", "-1"]))
    # The stock tree has no such key: the flag came from the declaration alone.
    with pytest.raises(HeadstartError, match="unknown config key train.warmup_epochs"):
        apply_overrides(RunConfig(), {"train.warmup_epochs": 1})


def test_a_field_without_help_is_refused_when_flags_are_made():
    @dataclass
    class Bare(RunConfig):
        extra: int = 3

    with pytest.raises(TypeError, match="extra has no help"):
        settings(Bare)


# Every flag the hand-written table had, with its key: the generated parser keeps them all.
OLD_FLAGS = {
    "--model": "model.name", "--weights": "model.weights", "--input-size": "model.input_size",
    "--head": "head.kind", "--hidden": "head.hidden", "--dropout": "head.dropout",
    "--activation": "head.activation", "--head-batchnorm": "head.batchnorm", "--data": "data.source",
    "--data-root": "data.root", "--val-split": "data.val_split", "--batch-size": "data.batch_size",
    "--workers": "data.workers", "--no-augment": "data.augment", "--strict": "data.strict",
    "--in-memory": "data.in_memory", "--batch-transforms": "data.batch_transforms",
    "--limit-train": "data.limit_train", "--limit-val": "data.limit_val", "--freeze": "train.freeze",
    "--epochs": "train.epochs", "--lr": "train.lr", "--optimizer": "train.optimizer",
    "--weight-decay": "train.weight_decay", "--warmup": "train.warmup", "--scheduler": "train.scheduler",
    "--label-smoothing": "train.label_smoothing", "--finetune-epochs": "train.finetune_epochs",
    "--finetune-unfreeze": "train.finetune_unfreeze", "--finetune-lr": "train.finetune_lr",
    "--layer-decay": "train.layer_decay", "--schedule": "train.schedule", "--patience": "train.patience",
    "--checkpoint-minutes": "train.checkpoint_minutes", "--seed": "train.seed", "--device": "train.device",
    "--no-progress": "train.progress", "--finetune-bn": "train.finetune_bn", "--no-cache": "cache.enabled",
    "--cache-views": "cache.views", "--cache-dir": "cache.dir", "--no-tensorboard": "tensorboard",
    "--no-report": "report", "--output": "output", "--name": "name",
}


def test_every_old_flag_is_still_there_with_its_key(capsys):
    declared = {s.flag: s.key for s in settings() if s.flag}
    assert {f: declared.get(f) for f in OLD_FLAGS} == OLD_FLAGS
    assert len(declared) == len({s.flag for s in settings() if s.flag})  # no flag declared twice
    help_text = " ".join(_train_help(capsys).split())
    for flag, key in declared.items():
        assert flag in help_text and f"[{key}]" in help_text


@pytest.mark.parametrize("argv,key,value", [
    (["--no-cache"], "cache.enabled", False),
    (["--no-augment"], "data.augment", False),
    (["--head-batchnorm"], "head.batchnorm", True),
    (["--in-memory", "no"], "data.in_memory", False),
    (["--in-memory", "auto"], "data.in_memory", None),
    (["--batch-transforms", "yes"], "data.batch_transforms", True),
    (["--hidden", "512,256"], "head.hidden", [512, 256]),
    (["--head", "mlp"], "head.kind", "mlp"),
    (["--lr", "auto"], "train.lr", "auto"),
    (["--finetune-lr", "1e-4"], "train.finetune_lr", 1e-4),
    (["--input-size", "48"], "model.input_size", 48),
])
def test_flags_keep_their_behaviour(argv, key, value):
    cfg = resolve_config(build_parser().parse_args(["train", *argv]))
    section, _, leaf = key.rpartition(".")
    assert getattr(getattr(cfg, section) if section else cfg, leaf) == value


def test_every_default_reads_in_words_and_true_booleans_turn_off_with_no():
    for s in settings():
        assert s.help and s.shown and s.shown != "None", s.key
        if s.default is True:
            assert s.flag.startswith("--no-"), s.key


def test_declared_choices_match_what_the_code_accepts():
    from headstart.data.transforms import AUTO_AUGMENT
    from headstart.models.network import ACTIVATIONS, BN_POLICIES
    from headstart.runtime.precision import PRECISIONS
    from headstart.training.optim import SCHEDULERS

    choices = {s.key: s.choices for s in settings()}
    assert choices["data.auto_augment"] == AUTO_AUGMENT
    assert choices["head.activation"] == tuple(ACTIVATIONS)
    assert choices["train.finetune_bn"] == BN_POLICIES
    assert choices["train.precision"] == PRECISIONS
    assert choices["train.scheduler"] == SCHEDULERS


# ---------------------------------------------------------------------- values are checked on the way in


BAD = [
    ({"train.lr": -1.0}, "train.lr (--lr) is -1.0"),
    ({"train.lr": math.nan}, "train.lr (--lr) is nan, not a finite number"),
    ({"train.lr": "fast"}, "give a number or one of: auto"),
    ({"train.finetune_lr": -3e-4}, "train.finetune_lr (--finetune-lr)"),
    ({"train.finetune_lr": "inf"}, "not a finite number"),
    ({"model.input_size": 0}, "model.input_size (--input-size) is 0"),
    ({"data.workers": -1}, "data.workers (--workers) is -1"),
    ({"train.epochs": -1}, "train.epochs (--epochs) is -1"),
    ({"train.finetune_epochs": -2}, "train.finetune_epochs"),
    ({"train.epochs": True}, "train.epochs: expected a whole number, got True"),
    ({"train.epochs": "2.5"}, "train.epochs: expected a whole number, got '2.5'"),
    ({"train.epochs": "inf"}, "train.epochs: expected a whole number"),
    ({"data.batch_size": 0}, "data.batch_size"),
    ({"data.val_split": 1.0}, "data.val_split"),
    ({"data.limit_train": 0}, "data.limit_train"),
    ({"head.dropout": 1.0}, "head.dropout"),
    ({"head.hidden": "64,0"}, "head.hidden (--hidden) is 0"),
    ({"train.optimizer": "adam"}, "give one of: adamw, radam, sgd"),
    ({"train.freeze": False}, "quote it in YAML"),
    ({"train.stages": [{"epochs": -1}]}, "train.stages[0].epochs"),
    ({"train.stages": [{"lr": -0.1}]}, "train.stages[0].lr"),
    ({"train.stages": [{"lr_mult": "head=x"}]}, "train.stages[0].lr_mult.head"),
    ({"train.stages": [{"lr_mult": "head"}]}, "expected name=value pairs"),
    ({"cache.views": 0}, "cache.views (--cache-views)"),
    ({"train.patience": 0}, "train.patience"),
]


@pytest.mark.parametrize("override,words", BAD, ids=[str(o) for o, _ in BAD])
def test_a_bad_value_is_one_clear_line(override, words):
    with pytest.raises(HeadstartError) as info:
        apply_overrides(RunConfig(), override)
    message = str(info.value)
    assert words in message and "\n" not in message
    assert "give" in message or "expected" in message  # says what to do


@pytest.mark.parametrize("override", [{"train.lr": 0.0}, {"train.lr": "auto"}, {"train.epochs": 0},
                                      {"data.workers": 0}, {"model.input_size": None}, {"train.epochs": "3"},
                                      {"train.epochs": 3.0}, {"train.stages": [{"lr": "auto", "epochs": 0}]}])
def test_edge_values_that_mean_something_are_accepted(override):
    apply_overrides(RunConfig(), override)


def test_a_yaml_boolean_where_a_number_belongs_is_refused(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  epochs: true\n")
    with pytest.raises(HeadstartError, match=r"train\.epochs: expected a whole number, got True \(YAML reads"):
        load_yaml(path)


def test_validate_checks_a_tree_built_in_python():
    cfg = RunConfig()
    cfg.train.lr = -1
    with pytest.raises(HeadstartError, match=r"train\.lr"):
        validate(cfg)
    cfg.train.lr, cfg.train.epochs = 0.01, True
    with pytest.raises(HeadstartError, match=r"train\.epochs"):
        validate(cfg)
    cfg.train.epochs = 2
    assert validate(cfg) == cfg and to_dict(validate(cfg)) == to_dict(cfg)
    assert from_dict(RunConfig, to_dict(RunConfig())) == RunConfig()


@pytest.mark.parametrize("kind,words", [("folder", "is a folder"), ("binary", "is not a text file"),
                                        ("list", "holds a list, not a mapping"), ("scalar", "holds a str")])
def test_a_config_file_that_is_not_a_yaml_mapping_is_one_line(tmp_path, kind, words):
    path = tmp_path / "run.yaml"
    if kind == "folder":
        path.mkdir()
    elif kind == "binary":
        path.write_bytes(bytes(range(256)) * 4)
    else:
        path.write_text("- a\n- b\n" if kind == "list" else "just words\n")
    with pytest.raises(HeadstartError) as info:
        load_yaml(path)
    assert str(path) in str(info.value) and words in str(info.value) and "\n" not in str(info.value)
