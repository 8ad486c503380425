"""Running `hf-siglip` as users do: the same flags at tiny sizes, in a subprocess (or in-process for speed)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).parent.parent
RECIPES = REPO / "hf_siglip" / "recipes"  # installed with the package; recipes/ links to it
# The demo and a new model at tiny sizes; any recipe or test overrides what it needs.
TINY = dict(demo_train_size=32, demo_test_size=16, demo_image_size=16, image_size=16, max_steps=2,
            per_device_train_batch_size=16, per_device_eval_batch_size=16, hidden_size=32, intermediate_size=48,
            num_hidden_layers=1, num_attention_heads=2, patch_size=8, max_length=12, logging_steps=1,
            use_cpu="true", bf16="false")


def flags(values: dict) -> list[str]:
    return [item for name, value in values.items() for item in (f"--{name}", str(value))]


def cli_env(**extra) -> dict:
    # one thread per process: several processes share this machine's 2 cores
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


def train_command(values: dict, launcher: list[str] | None = None) -> list[str]:
    return [*(launcher or [sys.executable]), "-m", "hf_siglip", "train", *flags(values)]


def run_train(values: dict, launcher: list[str] | None = None, env: dict | None = None,
              timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(train_command(values, launcher), env=env or cli_env(), capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def logged_losses(output_dir: Path) -> list[float]:
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


def launcher_binary(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def warning_lines(stderr: str) -> list[str]:
    """Lines of stderr that warn (progress bars, which redraw with carriage returns, are not warnings)."""
    lines = [part for line in stderr.splitlines() for part in line.split("\r")]
    return [line for line in lines if "warn" in line.lower() or line.startswith("[transformers]")]
