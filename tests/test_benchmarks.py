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
