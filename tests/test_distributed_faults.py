"""Distributed runs never hang: a frozen peer ends a 2-process CPU run within --ddp_timeout, with a message."""

import os
import signal
import subprocess
import time

import psutil

from cli_helpers import TINY, cli_env, launcher_binary, train_command

TIMEOUT = 10


def test_a_stopped_peer_ends_a_two_process_run_within_the_ddp_timeout(tmp_path):
    values = {**TINY, "use_cpu": "false", "max_steps": 1000, "eval_split": "None", "disable_tqdm": "true",
              "per_device_train_batch_size": 8, "save_strategy": "steps", "save_steps": 2, "ddp_timeout": TIMEOUT,
              "output_dir": tmp_path / "out"}
    torchrun = [launcher_binary("torchrun"), "--nproc_per_node", "2", "--master_port", "29693"]
    run = subprocess.Popen(train_command(values, torchrun), env=cli_env(), stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    frozen = None
    try:
        deadline = time.time() + 240
        while not (tmp_path / "out" / "checkpoint-2").exists():  # training is under way on both processes
            assert run.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
            time.sleep(0.05)
        workers = psutil.Process(run.pid).children(recursive=True)
        frozen = next(worker for worker in workers if worker.environ().get("LOCAL_RANK") == "1")
        frozen.send_signal(signal.SIGSTOP)
        stopped_at = time.time()
        _, stderr = run.communicate(timeout=TIMEOUT + 120)  # gloo's default would be 30 minutes
        took = time.time() - stopped_at
    finally:
        if run.poll() is None:
            run.kill()
        if frozen is not None and frozen.is_running():
            os.kill(frozen.pid, signal.SIGKILL)
    assert run.returncode != 0
    # the waiting process gives up after the timeout (torchrun then stops the frozen one, after its own grace period)
    assert took < TIMEOUT + 60, took
    message = [line for line in stderr.splitlines() if line.startswith("hf-siglip train: error: ")]
    assert message and "did not answer within --ddp_timeout" in message[0] and "Timed out" in message[0], stderr[-3000:]
