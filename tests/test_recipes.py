"""Every recipe end to end through `dvc exp run -S` on the embedded sample, and the MNIST-sized
nets on the real Fashion-MNIST through the pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run, scratch_repo, stage_environment

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    return stage_environment()


@pytest.fixture(scope="module")
def sample_repo(tmp_path_factory, env) -> Path:
    repo = scratch_repo(tmp_path_factory.mktemp("recipes") / "repo", env, {"train.epochs": 1})
    run(["dvc", "repro", "preprocess"], repo, env)  # shared by every recipe below
    return repo


# CI runs the paper recipe here; the book recipe is the default every pipeline test runs, and
# one-cycle runs in CI on Fashion-MNIST below. `pytest -m slow` runs all three here.
@pytest.mark.parametrize("recipe", [pytest.param("book", marks=pytest.mark.slow), "paper",
                                    pytest.param("one_cycle", marks=pytest.mark.slow)])
def test_recipe_runs_end_to_end(sample_repo, env, recipe):
    result = run(["dvc", "exp", "run", "-S", f"train.recipe={recipe}", "-S", "train.epochs=2"],
                 sample_repo, env)
    assert "Running stage 'train@resnet20_v1'" in result.stdout
    run_info = json.loads((sample_repo / "models/resnet20_v1/params.json").read_text())
    train = run_info["params"]["train"]
    assert train["recipe"] == recipe and train["epochs"] == 2
    expected_optimizer = {"book": "adam", "paper": "sgd", "one_cycle": "adam"}[recipe]
    assert train["optimizer"] == expected_optimizer
    evaluation = json.loads((sample_repo / "metrics/evaluate/resnet20_v1.json").read_text())
    assert evaluation["test"]["images"] == 200
    schedule = (sample_repo / "plots/train/resnet20_v1/schedule.csv").read_text().splitlines()
    assert schedule[0].startswith("step,learning_rate")
    rates = [float(line.split(",")[1]) for line in schedule[1:]]
    if recipe == "paper":
        # 2 epochs, milestones at 50% and 75%: epoch 1 at 0.1, epoch 2 at 0.01
        assert rates == pytest.approx([0.1, 0.01])
    if recipe == "one_cycle":
        assert max(rates) == pytest.approx(0.06, rel=0.02) and rates[-1] < 1e-3
        assert (sample_repo / "plots/train/resnet20_v1/colour_dim.png").stat().st_size > 0
    assert (sample_repo / "export/resnet20_v1/check.json").exists()


@pytest.fixture(scope="module")
def fashion_repo(tmp_path_factory, env) -> Path:
    if not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("install the Debian package dataset-fashion-mnist for these tests")
    repo = scratch_repo(tmp_path_factory.mktemp("fashion") / "repo", env, {
        "data.dataset": "fashion_mnist", "data.source": None,
        "data.mirror": str(DEBIAN_FASHION_MNIST), "train.epochs": 1, "model.options": {},
    })
    run(["dvc", "repro", "preprocess"], repo, env)
    return repo


# One epoch of mnist_cnn at listing 2.1's batch of 128 (469 steps) measured 84.6% here; at 32
# (1,875 steps, the batch the book uses for the Y-network) it clears 85%.
# mnist_cnn (1,875 steps, about 2 minutes here) runs with `pytest -m slow`
@pytest.mark.parametrize(
    ("model", "recipe", "batch_size"),
    [("simple_cnn", "one_cycle", 64),
     pytest.param("mnist_cnn", "book", 32, marks=pytest.mark.slow)],
)
def test_mnist_nets_on_real_fashion_mnist(fashion_repo, env, model, recipe, batch_size):
    run(["dvc", "exp", "run", "-S", f"model.names=[{model}]", "-S", f"train.recipe={recipe}",
         "-S", "train.epochs=1", "-S", f"++train.batch_size={batch_size}"], fashion_repo, env)
    evaluation = json.loads((fashion_repo / f"metrics/evaluate/{model}.json").read_text())
    accuracy = evaluation["test"]["accuracy"]
    print(f"\n{model} ({recipe}, 1 epoch) on Fashion-MNIST: test accuracy {accuracy:.4f}")
    assert evaluation["test"]["images"] == 10_000
    assert accuracy >= 0.85
    if recipe == "one_cycle":
        for name in ("activation_stats.png", "colour_dim.png", "activations.csv"):
            assert (fashion_repo / "plots/train" / model / name).stat().st_size > 0
