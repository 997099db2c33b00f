"""The benchmark runs in a tiny setting and writes well-formed figures (no timing asserted)."""
import json
import math

from mpafer import bench

REQUIRED = ("clip_ratio", "train_step_ratio", "eval_ratio", "peak_memory_bytes", "trainable_params",
            "checkpoint_bytes")


def test_bench_tiny_writes_json_with_the_required_figures(tmp_path, capsys):
    path = tmp_path / "bench.json"
    bench.main(["--shape", "tiny", "--batch", "2", "--train-batch", "4", "--eval-batch", "4",
                "--repeats", "2", "--warmup", "1", "--device", "cpu", "--no-keep-freed-memory",
                "--json", str(path)])
    printed = capsys.readouterr().out
    for label in ("CLIP towers", "training step", "evaluation", "peak memory", "trainable parameters"):
        assert label in printed
    results = json.loads(path.read_text())
    for key in REQUIRED:
        value = results[key]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, key
    assert isinstance(results["trainable_params"], int) and isinstance(results["checkpoint_bytes"], int)
    settings = results["settings"]
    assert settings["shape"] == "tiny" and settings["train_batch"] == 4 and settings["eval_batch"] == 4
    assert settings["which"] == ["clip", "train", "eval", "memory"]
    for key in ("device", "torch", "threads", "date"):
        assert results[key], key
    assert results["malloc_keeps_freed_memory"] is False  # the test process's allocator is left alone
    assert len(results["times"]["train"]["full"]) == 2 and all(t > 0 for t in results["times"]["eval"]["mpafer"])


def test_bench_with_grad_checkpointing_in_process():
    results = bench.main(["train", "memory", "--shape", "tiny", "--train-batch", "2", "--repeats", "1",
                          "--warmup", "0", "--device", "cpu", "--no-keep-freed-memory", "--grad-checkpointing",
                          "--in-process"])
    assert results["settings"]["grad_checkpointing"] is True
    assert results["train_step_ratio"] > 0 and results["peak_memory_bytes"] > 0
    assert "clip_ratio" not in results
