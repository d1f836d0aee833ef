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
