"""FSDP. accelerate 1.15 switches FSDP on only for accelerator processes (its AcceleratorState enables the FSDP
plugin for MULTI_GPU / XPU / NPU... distributed types, never MULTI_CPU), so the `fsdp` accelerate config
cannot shard anything on this CPU machine. What is tested here instead:

* torch's own FSDP2 (`fully_shard` per encoder layer and at the root, the wrapping fsdp.yaml asks for) on two gloo
  processes trains the model with the ring loss exactly as DDP does, and the gathered full weights save with
  `save_pretrained` and load with `from_pretrained`;
* `hf-siglip train` launched with fsdp.yaml on CPU says, in one warning, that it runs DDP instead.
"""

import json
import subprocess

import pytest
import torch

from cli_helpers import REPO, TINY, cli_env, launcher_binary, run_train
from hf_siglip import SiglipBottleneckModel

SCRIPT = REPO / "tests" / "scripts" / "fsdp_steps.py"


def run_steps(mode: str, out_dir, port: int) -> list[float]:
    torchrun = [launcher_binary("torchrun"), "--nproc_per_node", "2", "--master_port", str(port)]
    run = subprocess.run([*torchrun, str(SCRIPT), mode, str(out_dir)], capture_output=True, text=True,
                         env=cli_env(), timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads((out_dir / "losses.json").read_text())


def test_fsdp2_sharded_weights_train_like_ddp_and_save_for_from_pretrained(tmp_path):
    fsdp = run_steps("fsdp", tmp_path / "fsdp", 29681)
    ddp = run_steps("ddp", tmp_path / "ddp", 29682)
    assert fsdp == pytest.approx(ddp, rel=1e-5)
    assert fsdp[-1] < fsdp[0]  # it trains
    sharded = SiglipBottleneckModel.from_pretrained(tmp_path / "fsdp").state_dict()
    replicated = SiglipBottleneckModel.from_pretrained(tmp_path / "ddp").state_dict()
    initial = SiglipBottleneckModel(SiglipBottleneckModel.config_class.from_pretrained(tmp_path / "ddp"))
    assert sharded.keys() == replicated.keys()
    # three AdamW steps of lr 1e-2 move weights by ~3e-2; the two runs agree to fp32 reduction order
    worst = max((sharded[name] - replicated[name]).abs().max().item() for name in sharded)
    assert worst < 1e-5, worst
    assert not torch.equal(sharded["text_model.head.weight"], initial.state_dict()["text_model.head.weight"])


def test_the_fsdp_config_on_cpu_warns_that_it_runs_ddp(tmp_path):
    accelerate = [launcher_binary("accelerate"), "launch", "--config_file",
                  str(REPO / "hf_siglip" / "recipes" / "accelerate_configs" / "fsdp.yaml"), "--num_processes", "2",
                  "--mixed_precision", "no", "--main_process_port", "29683"]
    values = {**TINY, "use_cpu": "false", "max_steps": 1, "eval_split": "None", "disable_tqdm": "true",
              "per_device_train_batch_size": 8, "output_dir": tmp_path / "out"}
    run = run_train(values, accelerate)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr.count("the accelerate config asks for FSDP but these processes run") == 1
