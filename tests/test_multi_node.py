"""Two machines on this one: the README's multi-node `accelerate launch` lines, machine ranks 0 and 1 rendezvousing
on 127.0.0.1, train exactly what 2 processes of one machine (`torchrun --nproc_per_node 2`) train."""

import re
import socket
import subprocess

from safetensors.torch import load_file

from cli_helpers import REPO, TINY, cli_env, launcher_binary, logged_losses, run_train, train_command

TWO_PROCESSES = {**TINY, "use_cpu": "false", "max_steps": 3, "eval_split": "None", "disable_tqdm": "true",
                 "per_device_train_batch_size": 8}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def readme_multi_node_flags() -> set[str]:
    """The `accelerate launch` flags of the README's multi-node lines."""
    readme = (REPO / "README.md").read_text()
    block = readme[readme.index("On several machines"):]
    block = block[:block.index("-m hf_siglip train")]
    return set(re.findall(r"(--[a-z_]+)", block[block.index("accelerate launch"):]))


def test_two_machines_train_as_two_processes_of_one(tmp_path):
    port = free_port()
    # each "machine" has its own output folder, as separate disks would; only machine 0 (global rank 0) saves
    machines = []
    for rank in (0, 1):
        accelerate = [launcher_binary("accelerate"), "launch", "--multi_gpu", "--num_machines", "2",
                      "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                      "--main_process_port", str(port)]
        assert {flag for flag in accelerate if flag.startswith("--")} == readme_multi_node_flags()
        machines.append(subprocess.Popen(train_command({**TWO_PROCESSES, "output_dir": tmp_path / f"node{rank}"},
                                                       accelerate),
                                         env=cli_env(ACCELERATE_USE_CPU="1"), stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True))
    try:
        outputs = [machine.communicate(timeout=240) for machine in machines]
    finally:
        for machine in machines:
            machine.kill()
    for machine, (_, stderr) in zip(machines, outputs):
        assert machine.returncode == 0, stderr[-3000:]

    torchrun = [launcher_binary("torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())]
    one_machine = run_train({**TWO_PROCESSES, "output_dir": tmp_path / "one"}, torchrun)
    assert one_machine.returncode == 0, one_machine.stderr[-3000:]

    assert not (tmp_path / "node1" / "model.safetensors").exists()  # rank 1 of 2 does not save
    assert len(logged_losses(tmp_path / "node0")) == 3
    assert logged_losses(tmp_path / "node0") == logged_losses(tmp_path / "one")
    two_machines, one = load_file(str(tmp_path / "node0" / "model.safetensors")), \
        load_file(str(tmp_path / "one" / "model.safetensors"))
    assert two_machines.keys() == one.keys()
    worst = max((two_machines[name] - one[name]).abs().max().item() for name in one)
    assert worst <= 1e-6, f"weights differ by up to {worst}"
