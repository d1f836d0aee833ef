"""The one reader of ``params.yaml``: load it, validate it against the schema once, hand on typed values.

Every stage calls :func:`load_params` before doing any work. A wrong value or an unknown
key raises :class:`ParamsError`, whose message names the key, the value and what is
allowed; the stage entry points turn it into exit code 2 before any output is touched.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_PARAMS = Path("params.yaml")
EXIT_BAD_PARAMS = 2

DatasetName = Literal["cifar10", "cifar100", "mnist", "fashion_mnist", "imagefolder", "signs"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataParams(_Section):
    """Which dataset to fetch and from where."""

    dataset: DatasetName = "imagefolder"
    # imagefolder: a directory or .tar.gz of class folders (train/<class>/*, test/<class>/*);
    # signs: the directory holding train_signs.h5 and test_signs.h5
    source: str | None = None
    # a local directory or http(s) URL holding the canonical files, tried before the official host
    mirror: str | None = None
    retries: Annotated[int, Field(ge=0, le=20)] = 4
    timeout_s: Annotated[float, Field(gt=0)] = 60.0

    @model_validator(mode="after")
    def _source_for_local_datasets(self) -> DataParams:
        needs = {
            "imagefolder": "a directory or .tar.gz of class folders",
            "signs": "the directory holding train_signs.h5 and test_signs.h5",
        }
        if self.dataset in needs and not self.source:
            raise ValueError(
                f"data.source is required when data.dataset is {self.dataset!r}: "
                f"set it to {needs[self.dataset]}"
            )
        return self


class PreprocessParams(_Section):
    """How raw pixels become network inputs, and which images validate."""

    # pixel_mean: scale to [0, 1] and subtract the training set's per-pixel mean (the book);
    # channel_standardize: scale to [0, 1], subtract per-channel mean, divide by per-channel std;
    # scale: scale to [0, 1] only
    normalization: Literal["pixel_mean", "channel_standardize", "scale"] = "pixel_mean"
    # test: validate on the test set (the book); holdout: hold out the last images of a
    # seeded shuffle of the training set (the paper's 45k/5k)
    validation: Literal["test", "holdout"] = "test"
    holdout: Annotated[int, Field(ge=1)] = 5000
    seed: int = 0


class ModelParams(_Section):
    """Which registered networks the pipeline trains, with builder overrides.

    ``names`` lists the architectures; dvc.yaml gives each its own train, evaluate and export
    stage (``train@<name>``...). ``name`` is never written in params.yaml: a stage sets it
    through ``load_params(model=...)`` to say which of the listed nets it works on.
    """

    names: list[str] = Field(default_factory=lambda: ["resnet20_v1"], min_length=1)
    # keyword overrides passed to every listed net's builder (e.g. shortcut, l2)
    options: dict[str, Any] = Field(default_factory=dict)
    name: str = "resnet20_v1"

    @field_validator("names")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        from nets import list_models

        known = list_models()
        unknown = [name for name in value if name not in known]
        if unknown:
            raise ValueError(
                f"unknown model(s) {', '.join(map(repr, unknown))}; known models: "
                f"{', '.join(known)}"
            )
        if len(set(value)) != len(value):
            raise ValueError("a model is listed twice: list each architecture once")
        return value


class PlateauParams(_Section):
    """ReduceLROnPlateau settings; its reduction composes with the step schedule."""

    monitor: str = "val_loss"
    factor: Annotated[float, Field(gt=0, lt=1)] = math.sqrt(0.1)
    patience: Annotated[int, Field(ge=0)] = 5
    min_lr: Annotated[float, Field(ge=0)] = 0.5e-6


class AugmentParams(_Section):
    """On-device augmentation (Keras preprocessing layers, active in training only)."""

    shift: Annotated[float, Field(ge=0, lt=1)] = 0.1  # random shift, fraction of height and width
    flip: bool = True  # random horizontal flip
    # the paper's pad-and-crop: a random shift of up to this many pixels, filled with zeros
    # (the mean, after normalisation); 0 turns it off
    crop_pad: Annotated[int, Field(ge=0)] = 0


class OneCycleParams(_Section):
    """The one-cycle policy (fastai): warm up to lr_max, then cosine-anneal; momentum mirrors it."""

    lr_max: Annotated[float, Field(gt=0)] = 1e-2
    div: Annotated[float, Field(gt=1)] = 25.0  # starting rate is lr_max / div
    div_final: Annotated[float, Field(gt=1)] = 1e5  # final rate is lr_max / div_final
    pct_start: Annotated[float, Field(gt=0, lt=1)] = 0.25  # share of steps spent warming up
    moms: tuple[float, float, float] = (0.95, 0.85, 0.95)


class TrainParams(_Section):
    """The training recipe, resolved: a preset from ``recipes`` with the keys set in ``train``."""

    recipe: str = "book"
    epochs: Annotated[int, Field(ge=1)] = 200
    batch_size: Annotated[int, Field(ge=1)] = 32
    optimizer: Literal["adam", "sgd", "rmsprop"] = "adam"
    learning_rate: Annotated[float, Field(gt=0)] = 1e-3
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9  # sgd only
    nesterov: bool = False  # sgd only
    schedule: Literal["step", "one_cycle"] = "step"
    # step schedule: the rate is multiplied by lr_gammas[i] once lr_milestones[i] epochs have
    # completed; lr_milestone_fractions gives the milestones as fractions of train.epochs instead
    lr_milestones: list[Annotated[int, Field(ge=1)]] = Field(default_factory=list)
    lr_milestone_fractions: list[Annotated[float, Field(gt=0, lt=1)]] = Field(default_factory=list)
    lr_gammas: list[Annotated[float, Field(gt=0)]] = Field(default_factory=list)
    warmup_epochs: Annotated[int, Field(ge=0)] = 0  # the paper's ResNet-110 warm-up
    warmup_lr: Annotated[float, Field(gt=0)] = 0.01
    one_cycle: OneCycleParams = Field(default_factory=OneCycleParams)
    plateau: PlateauParams | None = None
    checkpoint_monitor: str = "val_accuracy"
    augment: AugmentParams = Field(default_factory=AugmentParams)
    # overrides preprocess.normalization for this recipe (the book trains DenseNet on [0, 1] pixels)
    normalization: Literal["pixel_mean", "channel_standardize", "scale"] | None = None
    # builder arguments the recipe sets (e.g. the paper's l2); model.options still wins
    model_options: dict[str, Any] = Field(default_factory=dict)
    activation_stats: bool = False  # record per-layer activation statistics and plot them
    seed: int = 42

    def milestones(self) -> list[int]:
        """Step-schedule milestones in completed epochs."""
        if self.lr_milestone_fractions:
            return [max(1, round(f * self.epochs)) for f in self.lr_milestone_fractions]
        return list(self.lr_milestones)

    @model_validator(mode="after")
    def _schedule_shape(self) -> TrainParams:
        if self.lr_milestones and self.lr_milestone_fractions:
            raise ValueError(
                "train.lr_milestones and train.lr_milestone_fractions are both set: use one"
            )
        given = self.lr_milestones or self.lr_milestone_fractions
        if len(given) != len(self.lr_gammas):
            raise ValueError(
                f"the step schedule has {len(given)} milestone(s) but train.lr_gammas has "
                f"{len(self.lr_gammas)}: give one gamma per milestone"
            )
        if list(given) != sorted(set(given)):
            raise ValueError(f"the milestones {list(given)} must be strictly increasing")
        if self.schedule == "one_cycle" and self.optimizer == "rmsprop":
            raise ValueError(
                "train.optimizer = 'rmsprop' cannot cycle momentum: use sgd or adam with "
                "train.schedule: one_cycle"
            )
        if self.schedule == "one_cycle" and self.plateau is not None:
            raise ValueError(
                "train.plateau must be null with train.schedule: one_cycle (the one-cycle "
                "policy sets every step's rate itself)"
            )
        return self


class EvaluateParams(_Section):
    batch_size: Annotated[int, Field(ge=1)] = 256


class SpeedParams(_Section):
    """How the training arithmetic runs (tasks.speed); none of it changes the recipe."""

    # auto: mixed_bfloat16 on a GPU of compute capability >= 8.0 or a CPU with AMX/AVX512-BF16,
    # float32 elsewhere
    precision: Literal["auto", "float32", "mixed_bfloat16", "mixed_float16"] = "auto"
    # XLA compilation of the train step; auto: on under TensorFlow and JAX, off under torch
    jit_compile: Literal["auto"] | bool = "auto"
    steps_per_execution: Annotated[int, Field(ge=1)] = 1
    # intra-op CPU threads for TensorFlow and torch; null: all cores
    threads: Annotated[int, Field(ge=1)] | None = None
    # under the torch backend: copy-free channels-last convolutions, fused batch norm, and
    # plain layers of functional models called without Layer.__call__
    fused_kernels: bool = True
    # Keras' backend for training; auto: the KERAS_BACKEND environment variable, else tensorflow
    backend: Literal["auto", "tensorflow", "jax", "torch"] = "auto"


class Params(_Section):
    """The whole of params.yaml."""

    data: DataParams
    preprocess: PreprocessParams = Field(default_factory=PreprocessParams)
    model: ModelParams = Field(default_factory=ModelParams)
    # named presets for train: {name: {train keys..., per_model: {model name: {train keys}}}}
    recipes: dict[str, dict[str, Any]] = Field(default_factory=dict)
    train: TrainParams = Field(default_factory=TrainParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    speed: SpeedParams = Field(default_factory=SpeedParams)


class ParamsError(ValueError):
    """params.yaml is missing, unreadable, or does not match the schema."""


def _format_errors(path: Path, raw: dict[str, Any], error: ValidationError) -> str:
    lines = [f"{path}: {error.error_count()} invalid setting(s):"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key; remove it or check its spelling")
            continue
        value = item.get("input")
        shown = "" if isinstance(value, dict) else f" = {value!r}"
        lines.append(f"  {key}{shown}: {message}")
    return "\n".join(lines)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict update: nested mappings merge, anything else replaces."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _selected_model(raw: dict[str, Any], path: Path, model: str | None) -> str:
    """The net a stage works on: ``model`` (which must be listed) or the first of model.names."""
    section = raw.get("model") or {}
    if not isinstance(section, dict):
        return model or ModelParams().name  # the schema reports the wrong type
    if "name" in section:
        raise ParamsError(
            f"{path}: model.name is now model.names, a list of architectures: write "
            f"`names: [{section['name']}]` under model"
        )
    names = section.get("names", ModelParams().names)
    if model is None:
        return names[0] if isinstance(names, list) and names else ModelParams().name
    if isinstance(names, list) and model not in names:
        raise ParamsError(
            f"{path}: model {model!r} is not in model.names ({', '.join(map(str, names))}); "
            "add it to the list"
        )
    return model


def resolve_recipe(raw: dict[str, Any], path: Path = DEFAULT_PARAMS,
                   model: str | None = None) -> dict[str, Any]:
    """params with ``train`` resolved for one model: recipe preset, its per-model part, ``train``.

    ``model`` picks the net (default: the first of ``model.names``); the result's
    ``model.name`` says which.
    """
    model_name = _selected_model(raw, path, model)
    if isinstance(raw.get("model") or {}, dict):
        raw = {**raw, "model": {**(raw.get("model") or {}), "name": model_name}}
    train = raw.get("train") or {}
    recipes = raw.get("recipes") or {}
    if not isinstance(train, dict) or not isinstance(recipes, dict):
        return raw  # the schema reports the wrong type
    name = train.get("recipe")
    if name is None:
        return raw
    if name not in recipes:
        raise ParamsError(
            f"{path}: train.recipe = {name!r} is not defined under recipes; defined: "
            f"{', '.join(sorted(recipes)) or 'none'}"
        )
    preset = dict(recipes[name] or {})
    per_model = preset.pop("per_model", None) or {}
    resolved = _merge(_merge(preset, per_model.get(model_name) or {}), train)
    return {**raw, "train": resolved}


def parse_params(raw: dict[str, Any], path: Path = DEFAULT_PARAMS,
                 model: str | None = None) -> Params:
    """Validate a parsed params mapping for one model. Raises ParamsError naming each bad key."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return Params.model_validate(resolve_recipe(raw, path, model))
    except ValidationError as error:
        raise ParamsError(_format_errors(path, raw, error)) from None


def load_params(path: str | Path = DEFAULT_PARAMS, model: str | None = None) -> Params:
    """Read and validate params.yaml.

    Args:
        path: the params file.
        model: the listed net whose recipe to resolve (default: the first of ``model.names``).

    Returns:
        The validated, typed parameters.

    Raises:
        ParamsError: the file is missing, is not YAML, or does not match the schema.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found; run from the repository root") from None
    except yaml.YAMLError as error:
        raise ParamsError(f"{path}: not valid YAML: {error}") from None
    return parse_params(raw or {}, path, model)


def load_params_or_exit(path: str | Path = DEFAULT_PARAMS, model: str | None = None) -> Params:
    """load_params for stage entry points: print the error and exit 2 on bad params."""
    try:
        return load_params(path, model)
    except ParamsError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_PARAMS) from None


def main(argv: list[str] | None = None) -> int:
    """`python -m tasks.config [params.yaml] [--stamp FILE]`: validate, print the resolved params.

    With ``--stamp``, write FILE (fixed content) instead of printing: the pipeline's first stage,
    which makes ``dvc repro`` stop on bad params before any stage output is removed.
    """
    import argparse

    parser = argparse.ArgumentParser(description="Validate params.yaml.")
    parser.add_argument("params", nargs="?", type=Path, default=DEFAULT_PARAMS)
    parser.add_argument("--stamp", type=Path, help="write this file when the params are valid")
    args = parser.parse_args(argv)
    params = load_params_or_exit(args.params)
    for name in params.model.names[1:]:  # every listed net's resolved recipe must be valid too
        load_params_or_exit(args.params, name)
    if args.stamp:
        args.stamp.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.stamp.with_name(args.stamp.name + ".tmp")
        tmp.write_text(f"{args.params} is valid\n")
        tmp.replace(args.stamp)
        print(f"{args.params}: valid")
    else:
        print(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
