"""benchmarks/throughput.py's interleaved summary: the ratio is taken against the fastest of
PyTorch's own configurations, and a hand-written one (``bias-sum``) is reported beside it."""

from __future__ import annotations

import pytest

from benchmarks.throughput import counted, summarise_interleaved


def test_ratio_is_against_the_fastest_configuration_with_an_interval() -> None:
    spread = (0.98, 0.99, 1.0, 1.01, 1.02)
    result = {"times": {"ours": [0.30 * f for f in spread],
                        "float32": [0.33 * f for f in spread],
                        "float32+channels_last": [0.32 * f for f in spread]}}
    summary = summarise_interleaved(result, batch=128)
    assert summary["best_reference"] == "float32+channels_last"
    assert summary["ratio"] == pytest.approx(0.32 / 0.30)
    assert summary["ratios"]["float32"] == pytest.approx(0.33 / 0.30)
    low, high = summary["ratio_95"]
    assert low <= summary["ratio"] <= high
    assert summary["steps"] == 5


def test_bias_sum_is_reported_but_not_chosen_as_the_best() -> None:
    result = {"times": {"ours": [0.30] * 5, "float32": [0.33] * 5,
                        "float32+channels_last": [0.32] * 5,
                        "float32+channels_last+bias-sum": [0.27] * 5}}
    summary = summarise_interleaved(result, batch=128)
    assert summary["best_reference"] == "float32+channels_last"
    assert summary["ratio"] == pytest.approx(0.32 / 0.30)
    assert summary["ratios"]["float32+channels_last+bias-sum"] == pytest.approx(0.27 / 0.30)
    assert summary["images_per_s"]["ours"] == pytest.approx(128 / 0.30)


def test_bias_sum_alone_is_still_compared() -> None:
    result = {"times": {"ours": [0.30] * 5, "float32+bias-sum": [0.27] * 5}}
    assert summarise_interleaved(result, batch=128)["best_reference"] == "float32+bias-sum"


def test_counted_reads_whole_options() -> None:
    assert counted("float32+channels_last+inplace+fused-adam+keras-same")
    assert not counted("float32+channels_last+bias-sum")
    assert not counted("float32+bias-skip") and not counted("float32+bias-sum+bias-skip")
    assert counted("float32+bias-summary")  # another word, not the option


def test_results_name_the_commit_and_whether_the_tree_was_clean(tmp_path, monkeypatch) -> None:
    import subprocess

    from benchmarks import throughput

    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              cwd=tmp_path, check=True, capture_output=True,
                              text=True).stdout.strip()

    monkeypatch.setattr(throughput, "ROOT", tmp_path)
    assert throughput.commit() is None  # not a git checkout
    git("init", "-q")
    (tmp_path / "tracked.txt").write_text("one\n")
    git("add", "tracked.txt")
    git("commit", "-qm", "one")
    head = git("rev-parse", "HEAD")
    assert throughput.commit() == head
    (tmp_path / "untracked.txt").write_text("not part of the code timed\n")
    assert throughput.commit() == head
    (tmp_path / "tracked.txt").write_text("two\n")
    assert throughput.commit() == head + "-dirty"


def test_compare_reads_a_speed_key_and_its_values() -> None:
    from benchmarks.precision_accuracy import parse_compare

    assert parse_compare("jit_compile=true,false") == ("jit_compile", [True, False])
    assert parse_compare("precision=float32, mixed_bfloat16") == (
        "precision", ["float32", "mixed_bfloat16"])
    with pytest.raises(ValueError, match="'epochs' is not a speed setting; pick one of precision"):
        parse_compare("epochs=1,2")
    with pytest.raises(ValueError, match="expected KEY=V1,V2"):
        parse_compare("jit_compile")


def test_subset_keeps_the_same_images_for_every_run() -> None:
    import numpy as np

    from benchmarks.precision_accuracy import subset
    from tasks.datasets import Splits

    splits = Splits(np.arange(100).reshape(100, 1), np.arange(100), np.arange(40).reshape(40, 1),
                    np.arange(40), ["a"])
    first, second = subset(splits, 30, 10), subset(splits, 30, 10)
    assert len(first.x_train) == 30 and len(first.x_test) == 10
    np.testing.assert_array_equal(first.y_train, second.y_train)
    np.testing.assert_array_equal(first.x_train[:, 0], first.y_train)  # images keep their labels
    assert len(np.unique(first.y_train)) == 30
    assert len(subset(splits, None, None).x_train) == 100
    with pytest.raises(ValueError, match="--train-images 101: the archive has 100 train images"):
        subset(splits, 101, None)


def test_accuracy_comparison_trains_under_each_setting(tmp_path, capsys) -> None:
    import json

    from benchmarks.precision_accuracy import main
    from tests.archives import make_imagefolder_tar

    archive, _ = make_imagefolder_tar(tmp_path / "images.tar.gz", train_per_class=6,
                                      test_per_class=3, size=(32, 32))
    out = tmp_path / "result.json"
    assert main(["--source", str(archive), "--net", "resnet20_v1", "--epochs", "1",
                 "--seeds", "1", "--compare", "jit_compile=true,false", "--train-images", "12",
                 "--test-images", "6", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert (result["train_images"], result["test_images"]) == (12, 6)
    assert [run["setting"] for run in result["runs"]] == ["jit_compile=true", "jit_compile=false"]
    assert [run["speed"]["jit_compile"] for run in result["runs"]] == [True, False]
    assert set(result["summary"]) == {"jit_compile=true", "jit_compile=false"}
    assert "jit_compile=false" in capsys.readouterr().out
    # a value params.yaml rejects stops the run before anything is decoded or trained
    assert main(["--source", str(archive), "--compare", "threads=2,0"]) == 2
    captured = capsys.readouterr()
    assert "threads=0" in captured.err and "decoded" not in captured.out
    assert main(["--source", str(archive), "--seeds", "1,x"]) == 2
    assert "--seeds '1,x': expected whole numbers" in capsys.readouterr().err


def _precision_result(path, epochs: int, runs: list[tuple[str, int, float]]):
    import json

    path.write_text(json.dumps({
        "net": "resnet20_v1", "recipe": "paper", "epochs": epochs, "train_images": 64,
        "test_images": 32, "backend": "jax",
        "runs": [{"setting": setting, "seed": seed, "best_val_accuracy": best,
                  "last_val_accuracy": best, "seconds": 1.0, "speed": {}}
                 for setting, seed, best in runs]}))
    return path


def test_accuracy_results_of_separate_runs_merge_into_one_summary(tmp_path, capsys) -> None:
    import json

    from benchmarks.precision_accuracy import main

    parts = [_precision_result(tmp_path / f"{p}-{s}.json", 15, [(f"precision={p}", s, acc)])
             for p, s, acc in (("float32", 1, 0.80), ("float32", 2, 0.84),
                               ("mixed_bfloat16", 1, 0.83), ("mixed_bfloat16", 2, 0.85))]
    out = tmp_path / "all.json"
    assert main(["--merge", *map(str, parts), "--json", str(out)]) == 0
    merged = json.loads(out.read_text())
    assert [(r["setting"], r["seed"]) for r in merged["runs"]] == [
        ("precision=float32", 1), ("precision=float32", 2),
        ("precision=mixed_bfloat16", 1), ("precision=mixed_bfloat16", 2)]
    assert merged["summary"]["precision=float32"] == pytest.approx(
        {"mean": 0.82, "min": 0.80, "max": 0.84})
    assert merged["summary"]["precision=mixed_bfloat16"]["mean"] == pytest.approx(0.84)
    assert (merged["epochs"], merged["backend"]) == (15, "jax")
    assert "mean 0.8400 (min 0.8300, max 0.8500) over 2 seed(s)" in capsys.readouterr().out

    # runs of another comparison, a seed given twice, or a foreign file are refused, unwritten
    other = _precision_result(tmp_path / "other.json", 10, [("precision=float32", 3, 0.7)])
    twice = _precision_result(tmp_path / "twice.json", 15, [("precision=float32", 1, 0.7)])
    foreign = tmp_path / "foreign.json"
    foreign.write_text('{"rows": []}')
    for extra, message in ((other, "other.json: epochs 10 where"), (twice, "seed 1 is also in"),
                           (foreign, "foreign.json: not a result of this script")):
        assert main(["--merge", str(parts[0]), str(extra), "--json", str(tmp_path / "x.json")]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "x.json").exists()
    assert main(["--epochs", "1"]) == 2
    assert "--source is required" in capsys.readouterr().err


def test_an_accuracy_comparison_stopped_part_way_keeps_its_finished_runs(tmp_path,
                                                                        monkeypatch) -> None:
    import json

    import tasks.train
    from benchmarks.precision_accuracy import main
    from tests.archives import make_imagefolder_tar

    archive, _ = make_imagefolder_tar(tmp_path / "images.tar.gz", train_per_class=4,
                                      test_per_class=2, size=(32, 32))
    real, calls = tasks.train.train, []

    def train(*args, **kwargs):
        calls.append(kwargs["verbose"])
        if len(calls) == 2:
            raise KeyboardInterrupt  # what a time limit's signal does to the second run
        return real(*args, **kwargs)

    monkeypatch.setattr(tasks.train, "train", train)
    out = tmp_path / "result.json"
    with pytest.raises(KeyboardInterrupt):
        main(["--source", str(archive), "--net", "simple_cnn", "--epochs", "1", "--seeds", "1,2",
              "--precisions", "float32", "--progress", "--json", str(out)])
    result = json.loads(out.read_text())
    assert [(r["setting"], r["seed"]) for r in result["runs"]] == [("precision=float32", 1)]
    assert result["summary"]["precision=float32"]["min"] == result["runs"][0]["best_val_accuracy"]
    assert calls == [2, 2]  # --progress: a line per epoch
