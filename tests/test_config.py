"""params.yaml validation: one clear message per bad key, exit code 2, defaults that validate."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from tasks.config import ParamsError, load_params, parse_params
from tests.conftest import ROOT

VALID = {"data": {"dataset": "cifar10"}}


def test_repository_params_validate():
    params = load_params(ROOT / "params.yaml")
    assert params.model.name == "resnet20_v1"
    assert params.train.lr_milestones == [80, 120, 160, 180]


@pytest.mark.parametrize(
    ("raw", "needles"),
    [
        ({"data": {"dataset": "cifar11"}}, ["data.dataset", "'cifar11'", "cifar10", "imagefolder"]),
        ({"data": {"dataset": "cifar10", "mirorr": "x"}}, ["data.mirorr", "unknown key"]),
        ({**VALID, "trian": {}}, ["trian", "unknown key"]),
        ({**VALID, "train": {"epochs": 0}}, ["train.epochs", "= 0", "greater than or equal to 1"]),
        ({**VALID, "train": {"batch_size": "big"}}, ["train.batch_size", "'big'"]),
        ({**VALID, "model": {"names": ["resnet21_v1"]}},
         ["model.names", "resnet21_v1", "resnet20_v1"]),
        ({**VALID, "model": {"names": ["simple_cnn", "simple_cnn"]}}, ["listed twice"]),
        ({**VALID, "model": {"names": []}}, ["model.names", "at least 1"]),
        ({**VALID, "model": {"name": "resnet20_v1"}}, ["model.names", "names: [resnet20_v1]"]),
        ({**VALID, "preprocess": {"validation": "val"}}, ["preprocess.validation", "holdout"]),
        ({**VALID, "train": {"lr_milestones": [80], "lr_gammas": [0.1, 0.1]}},
         ["1 milestone", "lr_gammas has 2", "one gamma per milestone"]),
        ({**VALID, "train": {"lr_milestones": [120, 80], "lr_gammas": [0.1, 0.1]}},
         ["strictly increasing"]),
        ({"data": {"dataset": "imagefolder"}}, ["data.source", "required"]),
        ({"preprocess": {}}, ["data", "required"]),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(raw, needles):
    with pytest.raises(ParamsError) as error:
        parse_params(raw)
    message = str(error.value)
    for needle in needles:
        assert needle in message, f"{needle!r} missing from: {message}"


def test_every_bad_key_is_reported_at_once():
    with pytest.raises(ParamsError) as error:
        parse_params({"data": {"dataset": "x"}, "train": {"epochs": -1, "optimiser": "adam"}})
    message = str(error.value)
    assert "3 invalid" in message
    assert all(key in message for key in ("data.dataset", "train.epochs", "train.optimiser"))


def test_command_line_exits_2_and_writes_no_stamp(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump({"data": {"dataset": "cifar10"}, "train": {"epochs": "many"}}))
    stamp = tmp_path / "ok"
    result = subprocess.run(
        [sys.executable, "-m", "tasks.config", str(bad), "--stamp", str(stamp)],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert "train.epochs = 'many'" in result.stderr
    assert not stamp.exists()


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "absent.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("data: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(broken)


def test_validating_params_does_not_import_keras():
    # every stage validates params first; it must not pay for importing a deep-learning backend
    code = "import sys, tasks.config as c; c.load_params('params.yaml'); print('keras' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr


def _with_recipes(train: dict, model: str = "resnet20_v1") -> dict:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["train"] = train
    raw["model"] = {"names": [model]}
    return raw


def test_book_recipe_resolves_with_train_keys_winning():
    params = parse_params(_with_recipes({"recipe": "book", "epochs": 7}))
    assert params.train.epochs == 7  # set under train
    assert params.train.optimizer == "adam" and params.train.batch_size == 32  # from the recipe
    assert params.train.milestones() == [80, 120, 160, 180]
    assert params.train.plateau is not None and params.train.plateau.patience == 5


def test_paper_recipe_milestones_are_fractions_of_training():
    params = parse_params(_with_recipes({"recipe": "paper", "epochs": 8}))
    assert params.train.optimizer == "sgd" and params.train.learning_rate == 0.1
    assert params.train.milestones() == [4, 6]
    assert params.train.augment.crop_pad == 4 and params.train.augment.shift == 0.0
    assert params.train.model_options == {"l2": 5e-5}
    assert params.train.warmup_epochs == 0


def test_per_model_part_of_a_recipe_applies_to_that_model_only():
    warm = parse_params(_with_recipes({"recipe": "paper"}, model="resnet110_v1"))
    assert (warm.train.warmup_epochs, warm.train.warmup_lr) == (1, 0.01)
    cold = parse_params(_with_recipes({"recipe": "paper"}, model="resnet56_v1"))
    assert cold.train.warmup_epochs == 0


def test_one_cycle_recipe_and_its_constraint():
    params = parse_params(_with_recipes({"recipe": "one_cycle"}))
    assert params.train.schedule == "one_cycle" and params.train.one_cycle.lr_max == 0.06
    with pytest.raises(ParamsError, match="plateau must be null"):
        parse_params(_with_recipes({"recipe": "one_cycle", "plateau": {"patience": 3}}))


def test_unknown_recipe_lists_the_defined_ones():
    with pytest.raises(ParamsError) as error:
        parse_params(_with_recipes({"recipe": "fast"}))
    assert "train.recipe = 'fast'" in str(error.value)
    assert "book, one_cycle, paper" in str(error.value)


def test_each_listed_model_gets_its_own_recipe():
    raw = {**_with_recipes({"recipe": "paper"}), "model": {"names": ["resnet56_v1", "resnet110_v1"]}}
    assert parse_params(raw).model.name == "resnet56_v1"  # the first, by default
    warm = parse_params(raw, model="resnet110_v1")
    assert warm.model.name == "resnet110_v1" and warm.train.warmup_epochs == 1
    assert parse_params(raw, model="resnet56_v1").train.warmup_epochs == 0
    with pytest.raises(ParamsError, match="'resnet20_v1' is not in model.names.*add it"):
        parse_params(raw, model="resnet20_v1")
