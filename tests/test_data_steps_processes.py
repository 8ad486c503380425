"""Data steps on several processes (decision 7 in docs/ARCHITECTURE.md;
issue 21 item 3): a step that runs a model over the data or
writes files runs once, on the main process, and every process ends with the same rows, counts and random state as
one process would; label_noise, a pure function of (seed, row key), runs on each process alike. One torchrun launch
of 2 gloo processes runs every registered step (tests/scripts/data_steps_ranks.py)."""

import json
import subprocess
import sys
from pathlib import Path
from typing import Callable

from cli_helpers import REPO, cli_env, launcher_binary
from data_fixtures import (
    make_processor,
    make_tiny_siglip,
    save_tiny_blip_captioner,
    save_tiny_vit_teacher,
    write_image_folder,
)
from hf_siglip.data.steps import DATA_STEPS, parse_data_steps

SCRIPT = Path(__file__).parent / "scripts" / "data_steps_ranks.py"
# what runs a model over the data, once per pass: which model it is
MODEL_OF = {"pseudo_captions": "captioner", "cat_filter": "spacy", "positive_groups": "siglip_texts",
            "capfilt": "siglip_images", "concept_targets": "teacher", "image_embedding_cache": "siglip_images"}


def write_inputs(root: Path) -> tuple[Path, Path, Callable[[str], list]]:
    captions = [["a red cat on a mat", "a cat"], ["dog"], ["a small dog near a red box", "a cat"], ["a cat"]] * 3
    rows = [("good", caption) for caption in captions]
    rows[5] = ("garbage", ["a man holds a red sign"])  # an image that does not decode
    folder = write_image_folder(root / "images", rows)
    siglip = root / "siglip"
    processor = make_processor(image_size=32)
    make_tiny_siglip(len(processor.tokenizer), image_size=32).save_pretrained(siglip)
    processor.save_pretrained(siglip)
    blip, vit = save_tiny_blip_captioner(root / "blip"), save_tiny_vit_teacher(root / "vit")
    return folder, siglip, lambda captions_dir: [
        {"pseudo_captions": {"model": blip, "num_captions": 2, "batch_size": 4, "output_dir": captions_dir,
                             "num_shards": 2, "generate_kwargs": {"max_new_tokens": 4}}},
        {"positive_groups": {"model": str(siglip), "image_threshold": None, "text_threshold": 0.999,
                             "batch_size": 4}},
        {"cat_filter": {"min_complexity": 2, "require_action": False, "text_spotting": False}},
        {"capfilt": {"model": None, "top_k": 2, "batch_size": 4}},  # the model being trained: built here
        {"label_noise": {"text": 0.3, "pairing": 0.4}},
        {"concept_targets": {"model": vit, "batch_size": 4}},
        {"caption_sampling": {"k": 2}},
        {"image_augmentation": {"crop_scale": [0.8, 1.0]}},
        {"image_embedding_cache": {"batch_size": 4}},
    ]


def run(command: list, root: Path, out: Path) -> None:
    env = cli_env(HF_DATASETS_CACHE=str(root / "cache"))
    done = subprocess.run(command + [str(out)], capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]


def test_every_step_runs_once_and_every_process_gets_the_same_result(tmp_path):
    folder, siglip, steps = write_inputs(tmp_path)
    assert {name for name, _ in parse_data_steps(steps("x"))} == set(DATA_STEPS)  # every registered step is here
    for name, launcher in (("one", [sys.executable]),
                           ("two", [launcher_binary("torchrun"), "--nproc_per_node", "2", "--master_port", "29711"])):
        run([*launcher, str(SCRIPT), str(folder), str(siglip), json.dumps(steps(str(tmp_path / name / "captions")))],
            tmp_path, tmp_path / name)
    one = json.loads((tmp_path / "one" / "rank0.json").read_text())
    main, other = (json.loads((tmp_path / "two" / f"rank{rank}.json").read_text()) for rank in (0, 1))
    assert (one["processes"], main["processes"], other["processes"]) == (1, 2, 2)

    for single, first, second in zip(one["steps"], main["steps"], other["steps"]):
        name = single["step"]
        # the same rows (captions, group ids, targets, embeddings, image digests), in the same order and columns
        assert first["columns"] == second["columns"] == single["columns"], name
        assert first["rows"] == second["rows"] == single["rows"], name
        assert first["random_state"] == second["random_state"] == single["random_state"], name
        if name in MODEL_OF:  # ran once: on the main process, exactly as often as on one process; never on the other
            assert first["calls"].get(MODEL_OF[name], 0) > 0, name
            assert first["calls"] == single["calls"], name
            assert second["calls"] == {}, name
        else:  # a pure function (label_noise) or the collator's settings: no model
            assert first["calls"] == second["calls"] == {}, name
    assert main["report"] == other["report"] == one["report"]
    assert main["report"]["cat_filter"]["rows_removed"] == 5  # "dog" and "a cat" alone: complexity < 2
    assert main["report"]["pseudo_captions"]["rows"] == 12 and main["report"]["pseudo_captions"]["undecodable_images"]
    groups = main["report"]["positive_groups"]
    assert groups["max_group_size"] > 1 and groups["groups"] < 12  # the shared captions joined rows
    # the model being trained was built once per process, in capfilt, from the same captions
    assert len(main["built_from"]) == len(other["built_from"]) == 1 and main["built_from"] == other["built_from"]
    assert main["sampler_k"] == other["sampler_k"] == 2
    # the captioner's shards were written once and completely; no temporary folder is left anywhere
    assert sorted(p.name for p in (tmp_path / "two" / "captions").iterdir()) == [
        "shard-00000-of-00002", "shard-00001-of-00002"]
    shared = tmp_path / "cache" / "hf_siglip_data_steps"
    assert len(list(shared.iterdir())) == len(MODEL_OF)  # one folder per step the main process ran for the others
    assert not [path for path in tmp_path.rglob("*") if ".tmp" in path.name]


def test_when_the_main_process_fails_the_others_stop_too(tmp_path):
    """The captioner cannot load on the main process: it fails naming it, and the other process, released from its
    wait, stops saying the main process left no result (no hang until --ddp_timeout)."""
    folder = write_image_folder(tmp_path / "images", [("good", "a cat")] * 4)
    steps = [{"pseudo_captions": {"model": str(tmp_path / "no_captioner")}}]
    torchrun = [launcher_binary("torchrun"), "--nproc_per_node", "2", "--master_port", "29712"]
    done = subprocess.run([*torchrun, str(SCRIPT), str(folder), "unused", json.dumps(steps), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120, cwd=REPO,
                          env=cli_env(HF_DATASETS_CACHE=str(tmp_path / "cache")))
    assert done.returncode != 0
    assert "no_captioner" in done.stderr and "the main process left no result" in done.stderr
    assert not (tmp_path / "out").exists()
