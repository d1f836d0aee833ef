"""The whole DVC pipeline on the embedded sample, in a scratch copy of the repository, with real DVC.

One module-scoped run (1 epoch) backs every test here: no-op reruns, which stages an edit
re-runs, bad params touching nothing, the metrics DVC reads, and the exports' predictions.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import run, scratch_repo, set_params, stage_environment

NET = "resnet20_v1"
STAGES = ["check-params", "download", "preprocess", f"train@{NET}", f"evaluate@{NET}",
          f"export@{NET}", "report"]


def _ran_stages(output: str) -> list[str]:
    return [stage for stage in STAGES if f"Running stage '{stage}'" in output]


def _tree_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    return stage_environment()


@pytest.fixture(scope="module")
def repo(tmp_path_factory, env) -> Path:
    """A git + DVC copy of this repository that has run the pipeline once (1 epoch)."""
    repo = scratch_repo(tmp_path_factory.mktemp("pipeline") / "repo", env, {"train.epochs": 1})
    result = run(["dvc", "repro"], repo, env)
    assert _ran_stages(result.stdout) == STAGES, result.stdout
    return repo


def test_first_run_writes_every_output(repo):
    for path in ["data/raw/manifest.json", "data/prepared/data.npz", f"models/{NET}/model.keras",
                 f"models/{NET}/params.json", f"metrics/train/{NET}/metrics.json",
                 f"metrics/evaluate/{NET}.json", f"plots/evaluate/{NET}/confusion.csv",
                 f"plots/evaluate/{NET}/confusion.png", f"export/{NET}/model.keras",
                 f"export/{NET}/saved_model/saved_model.pb", f"export/{NET}/check.json",
                 f"backups/{NET}/complete.json", "reports/summary.md"]:
        assert (repo / path).exists(), path
    if shutil.which("dot"):  # the diagram needs Graphviz (scripts/test-data.sh installs it)
        assert (repo / f"models/{NET}/architecture.png").stat().st_size > 0
    assert "stage3_unit3_out" in (repo / f"models/{NET}/summary.txt").read_text()
    run_info = json.loads((repo / f"models/{NET}/params.json").read_text())
    assert run_info["params"]["train"]["epochs"] == 1
    assert run_info["git_commit"]


def test_noop_repro_does_no_work(repo, env):
    # how long it takes is measured by benchmarks/pipeline.py, not asserted here
    result = run(["dvc", "repro"], repo, env)
    assert _ran_stages(result.stdout) == [], result.stdout
    assert "didn't change, skipping" in result.stdout


def test_dvc_reads_the_metrics(repo, env):
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], repo, env).stdout)
    text = json.dumps(shown)
    assert "test" in text and "accuracy" in text
    evaluation = json.loads((repo / f"metrics/evaluate/{NET}.json").read_text())
    assert 0.0 <= evaluation["test"]["accuracy"] <= 1.0
    assert evaluation["test"]["images"] == 200
    assert len(evaluation["per_class_accuracy"]) == 10


def test_exports_predict_what_the_trained_model_predicts(repo):
    import keras
    import tensorflow as tf

    with np.load(repo / "data/prepared/data.npz") as data:
        images = data["x_test"]
    assert images.dtype == np.uint8
    from tasks.modeling import load_model  # registers RandomShift, which the trained model holds

    trained = load_model(repo / f"models/{NET}/model.keras")
    expected = np.asarray(trained.predict(images, verbose=0))
    native = keras.saving.load_model(repo / f"export/{NET}/model.keras")
    np.testing.assert_allclose(native.predict(images, verbose=0), expected, atol=1e-5)
    served = tf.saved_model.load(str(repo / f"export/{NET}/saved_model"))
    np.testing.assert_allclose(served.serve(tf.constant(images)).numpy(), expected, atol=1e-5)
    assert not any(layer.name.startswith("augment_") for layer in native.layers)


def test_bad_params_stop_repro_before_any_output_is_touched(repo, env):
    before = _tree_digest(repo / "models")
    original = (repo / "params.yaml").read_text()
    try:
        set_params(repo, {"train.epochs": 0, "train.optimiser": "adam"})
        result = run(["dvc", "repro"], repo, env, check=False)
    finally:
        (repo / "params.yaml").write_text(original)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "train.epochs = 0" in output and "train.optimiser: unknown key" in output
    assert _ran_stages(result.stdout) == ["check-params"]
    assert _tree_digest(repo / "models") == before


def test_dvc_lock_holds_only_the_stages_of_dvc_yaml(repo):
    # entries of renamed or removed stages would be parsed and validated on every no-op
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert sorted(lock) == sorted(STAGES)


def test_editing_an_unused_recipe_reruns_only_check_params(repo, env):
    chosen = yaml.safe_load((repo / "params.yaml").read_text())["train"]["recipe"]
    other = next(name for name in ("paper", "book") if name != chosen)
    original = (repo / "params.yaml").read_text()
    try:
        set_params(repo, {f"recipes.{other}.epochs": 7})
        result = run(["dvc", "repro"], repo, env)
    finally:
        (repo / "params.yaml").write_text(original)
    assert _ran_stages(result.stdout) == ["check-params"], result.stdout
    recorded = yaml.safe_load((repo / "dvc.lock").read_text())["stages"][f"train@{NET}"]
    assert list(recorded["params"]["params.yaml"]) == [
        "model.options", f"recipes.{chosen}", "speed", "train"]


def test_a_training_param_reruns_only_train_and_what_follows(repo, env):
    set_params(repo, {"train.batch_size": 64})
    result = run(["dvc", "repro"], repo, env)
    assert _ran_stages(result.stdout) == [s for s in STAGES if s not in ("download", "preprocess")]
    run_info = json.loads((repo / f"models/{NET}/params.json").read_text())
    assert run_info["params"]["train"]["batch_size"] == 64
