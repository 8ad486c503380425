"""`python benchmarks/gpu.py --tiny` (the GPU benchmark at tiny sizes on CPU): every section runs the same functions
as the device run, prints every row and writes every section to the JSON; what cannot run here says why."""

import json
import subprocess
import sys

from cli_helpers import REPO, cli_env


def test_gpu_benchmark_tiny_prints_every_row_and_writes_every_section(tmp_path):
    run = subprocess.run([sys.executable, "benchmarks/gpu.py", "--tiny", "--out", str(tmp_path)], cwd=REPO,
                         env=cli_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_results.json").read_text())
    assert set(results["sections"]) == {"loss", "step", "max_batch", "data"}
    assert results["meta"]["tiny"] is True and results["meta"]["torch"]
    for section, part in results["sections"].items():
        assert part["rows"], section
        assert f"### {section} (" in run.stdout  # its elapsed time
        for row in part["rows"]:
            assert "failed" not in row, row
            assert f"| {row['name']} |" in run.stdout, row["name"]
            if "skipped" in row:
                assert row["skipped"].strip(), row  # a reason, not an empty cell

    loss = results["sections"]["loss"]["rows"]
    assert {row["batch"] for row in loss} == {64, 256}
    kernel = [row for row in loss if row["name"].startswith("siglip-kernel")]
    assert len(kernel) == 2 and all("skipped" in row for row in kernel)  # Triton: CUDA only
    ours = [row for row in loss if row["name"].startswith("hf_siglip")]
    assert all(row["ms"] > 0 for row in ours)
    for batch in (64, 256):  # the tile size changes memory, not the loss; open_clip agrees within bf16 rounding
        default, wide, *open_clip = [row for row in loss if row["batch"] == batch and "skipped" not in row]
        assert abs(wide["loss"] - default["loss"]) <= 1e-5 * abs(default["loss"])
        for row in open_clip:
            assert row["loss_rel_diff"] < 1e-2

    step = {row["name"]: row for row in results["sections"]["step"]["rows"]}
    trainer, plain = step["SiglipTrainer (hf SiglipModel, hf_siglip loss)"], \
        step["plain loop (hf SiglipModel, hf_siglip loss, AdamW)"]
    assert trainer["pairs_per_s"] > 0 and plain["pairs_per_s"] > 0
    assert trainer["GFLOPs_per_pair"] == plain["GFLOPs_per_pair"] > 0  # one model, one count
    assert trainer["peak_fraction"] == "unknown"  # no GPU peak for a CPU

    searched = [row for row in results["sections"]["max_batch"]["rows"] if "skipped" not in row]
    assert {row["activation_checkpointing"] for row in searched} == {False, True}
    assert all(row["largest_batch"] == 8 and row["result"] == ">= 8 (bound)" for row in searched)  # no OOM on CPU

    data = results["sections"]["data"]["rows"]
    assert [row["workers"] for row in data] == [0, 2]
    assert all(row["images"] == 64 and row["images_per_s"] > 0 for row in data)
