"""Image-text matching and masked language modelling (hf_siglip.objectives.itm / mlm, on the shared fusion encoder):
hard negatives never share an id with their image or caption (k captions per image, groups; 1 and 2 processes draw
the same pairs), are drawn in proportion to softmax(similarity / temperature) and are harder than uniform ones; MLM
masks as BERT does; through `hf-siglip train`: accumulation 8 x 2 and 2 gloo processes equal one batch of 16, a
killed run resumed from another folder ends bit for bit; the saved fusion encoder scores pairs in plain
transformers, in a process that cannot import hf_siglip; the recipes albef_pretrain and blip_pretrain."""

import copy
import json
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import hf_siglip as hs
from cli_helpers import TINY, cli_env, launcher_binary, logged_losses, run_train, train_command
from conftest import tiny_training_setup
from hf_siglip.errors import UsageError
from hf_siglip.objectives.fusion import CaptionVocabulary
from hf_siglip.objectives.itm import Itm, ItmConfig, draw_negatives, positives_with_identical_captions
from hf_siglip.objectives.mlm import Mlm, MlmConfig, mask_captions
from hf_siglip.training.optimizer_groups import siglip_parameter_groups
from hf_siglip.training.trainer import SiglipTrainer


def grouped_ids(images: int, captions: int, group: int):
    """Image ids where `group` neighbouring images share an id (a positive group), each with `captions` captions."""
    image_ids = torch.arange(images) // group
    return image_ids, image_ids.repeat_interleave(captions)


def test_drawn_negatives_never_share_an_id_and_follow_the_softmax():
    generator = torch.Generator().manual_seed(0)
    image_ids, text_ids = grouped_ids(12, 3, 2)  # k = 3 captions per image, groups of 2 images
    similarity = torch.randn(12, 36, generator=generator)
    positive = image_ids[:, None] == text_ids[None, :]
    uniforms = torch.rand(12, 4, generator=generator, dtype=torch.float64)
    drawn, valid = draw_negatives(similarity, positive, uniforms, 0.5)
    assert valid.all() and not positive.gather(1, drawn).any()
    assert all(len(set(row)) == 4 for row in drawn.tolist())  # without replacement
    # a row whose every candidate is positive draws nothing; one with a single non-positive draws it once
    only = torch.tensor([[True, True, True], [True, False, True]])
    drawn, valid = draw_negatives(torch.zeros(2, 3), only, torch.full((2, 2), 0.99, dtype=torch.float64), 1.0)
    assert valid.tolist() == [[False, False], [True, False]] and drawn[1, 0] == 1
    # frequencies of one row against softmax(s / T) over the non-positives, by an independent count
    row = torch.tensor([[0.9, 0.1, 0.5, -0.3, 0.7]])
    mask = torch.tensor([[False, False, True, False, False]])
    draws = torch.rand(20000, 1, generator=generator, dtype=torch.float64)
    picks, _ = draw_negatives(row.expand(20000, -1), mask.expand(20000, -1), draws, 0.2)
    want = torch.softmax(row.masked_fill(mask, float("-inf")) / 0.2, dim=1)[0]
    frequencies = torch.bincount(picks[:, 0], minlength=5) / 20000
    assert frequencies[2] == 0 and torch.allclose(frequencies, want.float(), atol=0.015)


def test_a_caption_identical_to_one_of_the_images_is_never_a_negative():
    """Captions recur across images ("a red circle"): a caption whose tokens equal one of an image's captions is a
    positive of that image both ways, checked against a brute-force count; draws never pick one."""
    generator = torch.Generator().manual_seed(1)
    image_ids, text_ids = grouped_ids(10, 3, 1)  # 10 images, 3 captions each
    tokens = torch.randint(3, 9, (30, 2), generator=generator)  # few distinct token rows: many repeats
    own = 12  # this process's captions: rows 12..23 (images 4..7)
    i2t, t2i = positives_with_identical_captions(image_ids, text_ids, image_ids, tokens, own, 12)
    rows = [tuple(row) for row in tokens.tolist()]
    said = {i: {rows[c] for c in range(30) if text_ids[c] == i} for i in range(10)}
    assert i2t.tolist() == [[rows[c] in said[i] for c in range(30)] for i in range(10)]
    assert t2i.tolist() == [[rows[t] in said[j] for j in range(10)] for t in range(own, own + 12)]
    assert i2t.sum() > 30 and (i2t[image_ids[:, None] == text_ids[None, :]]).all()  # more than the ids say
    drawn, valid = draw_negatives(torch.randn(10, 30, generator=generator), i2t,
                                  torch.rand(10, 3, generator=generator, dtype=torch.float64), 0.5)
    assert not any(rows[c] in said[i] for i in range(10) for c, ok in zip(drawn[i].tolist(), valid[i]) if ok)


class Collectives:
    """All-gather among threads that stand for processes (a barrier, each rank's value in its slot)."""

    def __init__(self, world: int):
        self.world, self.barrier, self.slots = world, threading.Barrier(world), [None] * world

    def all(self, rank: int, value):
        self.slots[rank] = value
        self.barrier.wait()
        values = list(self.slots)
        self.barrier.wait()
        return values


class ThreadProcess:
    """What prepare_step reads of a trainer (accelerator, step, the trainer's own gathers), one per thread."""

    _gather_rows, _gather_ragged = SiglipTrainer._gather_rows, SiglipTrainer._gather_ragged

    def __init__(self, collectives: Collectives, rank: int, step: int):
        self.accelerator = self
        self.collectives, self.num_processes, self.process_index = collectives, collectives.world, rank
        self.state = type("State", (), {"global_step": step})()

    def gather(self, tensor):
        return torch.cat([value.reshape(-1, *tensor.shape[1:]) if tensor.ndim else value.reshape(1)
                          for value in self.collectives.all(self.process_index, tensor)])

    def reduce(self, tensor, reduction="sum"):
        return sum(self.collectives.all(self.process_index, tensor))

    def pad_across_processes(self, tensor, dim=0):
        longest = max(self.collectives.all(self.process_index, tensor.shape[dim]))
        return torch.nn.functional.pad(tensor, (0, longest - tensor.shape[dim]))


def drawn_pairs(world: int) -> tuple[list, list]:
    """(image, caption, label) of every pair the processes evaluate, and each process's logged means: 16 images in
    groups of 2 (equal ids), 2 captions each, split over `world` processes of 2 micro-batches each."""
    generator = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(16, 8, generator=generator), dim=-1)
    noise = 0.3 * torch.randn(32, 8, generator=generator)
    texts = torch.nn.functional.normalize(images.repeat_interleave(2, 0) + noise, dim=-1)
    image_ids = torch.arange(16) // 2
    text_ids = image_ids.repeat_interleave(2)
    tokens = torch.arange(32)[:, None].repeat(1, 4) + 3  # caption r's tokens say r
    model = tiny_training_setup(n_train=8)[0]
    config = ItmConfig(negatives_per_sample=2, temperature=0.1, seed=5)
    itm = Itm(config, model, type("Args", (), {"objectives": {"itm": config}, "seed": 0})())
    collectives, results = Collectives(world), [None] * world

    def process(rank):
        objective = copy.copy(itm)  # its own plans and token table, one objective per process
        rows = torch.arange(16)[rank * 16 // world:(rank + 1) * 16 // world]
        halves = [rows[:len(rows) // 2], rows[len(rows) // 2:]]
        captions = [torch.cat([2 * part, 2 * part + 1]).sort().values for part in halves]
        batches = [{"image_ids": image_ids[part], "text_ids": text_ids[caption], "input_ids": tokens[caption]}
                   for part, caption in zip(halves, captions)]
        metrics = objective.prepare_step(ThreadProcess(collectives, rank, 7), images[rows],
                                         texts[torch.cat(captions)], batches)
        pairs = []
        for batch, part in zip(batches, halves):
            plan = objective.plans[id(batch)]
            caption = objective.tokens[plan.texts][:, 0] - 3
            pairs += [[int(part[i]), int(c), int(label)] for i, c, label in zip(plan.images, caption, plan.labels)]
        results[rank] = (pairs, metrics)

    threads = [threading.Thread(target=process, args=(rank,)) for rank in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert all(result is not None for result in results)
    return [pair for pairs, _ in results for pair in pairs], [metrics for _, metrics in results]


def test_global_hard_negatives_on_two_processes_are_those_of_one():
    """k = 2 captions per image and groups of 2 images, 2 micro-batches per process: each process draws among the
    global batch and evaluates the pairs of its own images (the processes are threads here, their collectives
    all-gathers among threads; the gloo run below checks the losses on real processes). The pairs of 1 and 2
    processes are the same, no negative shares an id, and hard negatives are more similar than uniform ones."""
    one, (one_metrics,) = drawn_pairs(1)
    two, two_metrics = drawn_pairs(2)
    assert sorted(one) == sorted(two)
    pairs = np.array(one)
    image_group, caption_group, label = pairs[:, 0] // 2, pairs[:, 1] // 4, pairs[:, 2]
    assert (image_group[label == 1] == caption_group[label == 1]).all()
    assert (image_group[label == 0] != caption_group[label == 0]).all()  # never a pair sharing an id
    assert (label == 1).sum() == 32 and (label == 0).sum() == 2 * (16 + 32)
    for metrics in two_metrics:  # the logged means are global: equal on every process and to one process's
        assert metrics == pytest.approx(one_metrics, rel=1e-6)
    assert one_metrics["itm_negative_similarity"] > one_metrics["itm_uniform_similarity"] + 0.2


def test_mlm_masks_as_bert_and_the_same_rows_get_the_same_masks():
    vocabulary = CaptionVocabulary(size=50, pad=0, special=(1,))
    ids = torch.randint(2, 50, (400, 30), generator=torch.Generator().manual_seed(0))
    ids[:, 25:] = 0  # padding
    ids[:, 24] = 1  # a special token
    masked, labels = mask_captions(ids, 0, seed=3, step=5, probability=0.15, vocabulary=vocabulary)
    chosen = labels != -100
    assert not chosen[:, 24:].any() and torch.equal(labels[chosen], ids[chosen])
    assert chosen[:, :24].float().mean().item() == pytest.approx(0.15, abs=0.01)
    replaced = masked[chosen]
    assert (replaced == vocabulary.mask).float().mean().item() == pytest.approx(0.8, abs=0.03)
    kept = (replaced == ids[chosen]).float().mean().item()
    assert kept == pytest.approx(0.1 + 0.1 / 50, abs=0.03)  # kept, or replaced by itself at random
    assert torch.equal(masked[~chosen], ids[~chosen])
    # rows 100.. drawn as a later part (another micro-batch or process), and at another padded length: the same
    later, later_labels = mask_captions(ids[100:, :27], 100, seed=3, step=5, probability=0.15, vocabulary=vocabulary)
    assert torch.equal(later, masked[100:, :27]) and torch.equal(later_labels, labels[100:, :27])
    other_step, _ = mask_captions(ids, 0, seed=3, step=6, probability=0.15, vocabulary=vocabulary)
    assert not torch.equal(other_step, masked)


def test_one_fusion_encoder_for_both_and_bad_settings_are_one_line(tmp_path):
    model, processor, _, _ = tiny_training_setup(n_train=8)
    configs = {"itm": ItmConfig(num_layers=1), "mlm": MlmConfig(hidden_size=64)}
    args = type("A", (), {"objectives": configs, "seed": 0})()
    itm = Itm(configs["itm"], model, args, processing_class=processor)
    mlm = Mlm(configs["mlm"], model, args, processing_class=processor)
    assert itm.fusion is mlm.fusion is model.fusion_encoder
    assert model.fusion_encoder.config.num_hidden_layers == 1 and model.fusion_encoder.config.hidden_size == 64
    # the fusion encoder's own rate: it and both heads train at it, everything else at the run's (logged: group 0)
    fast = {"itm": ItmConfig(learning_rate=2e-4), "mlm": MlmConfig()}
    model = tiny_training_setup(n_train=8)[0]
    arguments = hs.SiglipTrainingArguments(output_dir=str(tmp_path), learning_rate=1e-3, objectives=fast)
    Itm(fast["itm"], model, arguments, processing_class=processor)
    Mlm(fast["mlm"], model, arguments, processing_class=processor)
    groups = siglip_parameter_groups(model, arguments, pretrained_towers=())
    rate = {id(p): group["lr"] for group in groups for p in group["params"]}
    assert groups[0]["lr"] == 1e-3 and len(rate) == len(list(model.parameters()))
    for name, parameter in model.named_parameters():
        own = name.startswith(("fusion_encoder.", "itm_head.", "mlm_head."))
        assert rate[id(parameter)] == (2e-4 if own else 1e-3), name
    with pytest.raises(UsageError, match="share one fusion encoder, but its num_layers differs"):
        clash = {"itm": ItmConfig(num_layers=1), "mlm": MlmConfig(num_layers=2)}
        Itm(clash["itm"], tiny_training_setup(n_train=8)[0], type("A", (), {"objectives": clash, "seed": 0})())
    for name, settings, field in (("itm", {"negatives_per_sample": 0}, "negatives_per_sample"),
                                  ("itm", {"negatives_from": "ring"}, "negatives_from"),
                                  ("itm", {"temperature": 0}, "temperature"),
                                  ("mlm", {"learning_rate": -1.0}, "learning_rate"),
                                  ("mlm", {"mask_probability": 1.0}, "mask_probability"),
                                  ("mlm", {"hidden_size": 30, "num_attention_heads": 4}, "hidden_size")):
        with pytest.raises(ValueError, match=f"objectives.{name}.{field}"):
            hs.SiglipTrainingArguments(output_dir=str(tmp_path), objectives={name: settings})


@pytest.mark.parametrize("train_vision_tower", [True, False])
def test_train_vision_tower_false_keeps_itm_and_mlm_out_of_the_vision_tower(train_vision_tower):
    """ALBEF / BLIP: ITM and MLM train the vision tower through its patch tokens; `train_vision_tower: false`
    (BLIP-2's frozen-encoder reading) leaves it to the pair loss: no gradient reaches it; the fusion encoder learns."""
    model, processor, collator, dataset = tiny_training_setup(n_train=8)
    configs = {"itm": ItmConfig(train_vision_tower=train_vision_tower), "mlm": MlmConfig()}
    args = type("A", (), {"objectives": configs, "seed": 0})()
    objectives = [Itm(configs["itm"], model, args, processing_class=processor),
                  Mlm(configs["mlm"], model, args, processing_class=processor)]
    batch = collator([dataset["train"][i] for i in range(8)])
    batch["pixel_values"] = batch["pixel_values"].float() / 127.5 - 1 if batch["pixel_values"].dtype == torch.uint8 \
        else batch["pixel_values"]
    generator = torch.Generator().manual_seed(0)
    embeds = [torch.nn.functional.normalize(torch.randn(n, 8, generator=generator), dim=-1) for n in (8, 16)]
    for objective in objectives:
        objective.prepare_step(None, *embeds, [batch])
    outputs = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], return_dict=True)
    sum(objective.loss_sum(outputs, batch) for objective in objectives).backward()
    vision = [p.grad for p in model.vision_model.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in vision) == train_vision_tower
    cross_attention = model.fusion_encoder.bert.encoder.layer[0].crossattention.self.key.weight
    assert cross_attention.grad.abs().sum() > 0 and model.itm_head.weight.grad.abs().sum() > 0
    assert model.mlm_head.predictions.transform.dense.weight.grad.abs().sum() > 0


FUSION = {"num_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "seed": 1, "learning_rate": 0.03}
# SGD: Adam would turn the float noise of gradients that are zero in exact arithmetic (attention key biases) into
# steps of the learning rate's size, so 8 x 2 and 16 would differ there by ~1e-4
ITM_MLM = {**TINY, "eval_split": "None", "disable_tqdm": "true", "seed": 3, "optim": "sgd", "learning_rate": 0.05,
           "max_steps": 4,
           "objectives": json.dumps({"itm": {"negatives_per_sample": 2, **FUSION}, "mlm": {"weight": 0.5}}),
           "data_steps": '[{"caption_sampling": {"k": 2}}]'}  # two captions per image: texts != images


def _logged(output_dir, key):
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return [entry[key] for entry in history if key in entry and "train_loss" not in entry]


def _all_weights(output_dir):
    """The dual encoder's weights, the saved fusion encoder's (with its MLM head) and the ITM head."""
    weights = load_file(str(output_dir / "model.safetensors"))
    for name in ("model.safetensors", "itm_head.safetensors"):
        weights.update({f"fusion/{k}": v for k, v in load_file(str(output_dir / "fusion_encoder" / name)).items()})
    return weights


def _max_difference(a, b) -> float:
    first, second = _all_weights(a), _all_weights(b)
    assert first.keys() == second.keys()
    return max((first[name] - second[name]).abs().max().item() for name in first)


def test_accumulation_two_processes_and_a_killed_run_resumed_elsewhere(tmp_path):
    """ITM (global hard negatives) + MLM: 8 x 2 accumulated and 2 gloo processes x 8 equal 1 process x 16 (losses
    and weights to 1e-5); a run killed after its 3rd checkpoint, resumed from checkpoint 2 copied outside its
    output_dir, ends as the uninterrupted run bit for bit. Hard negatives are more similar than uniform ones."""
    one = run_train({**ITM_MLM, "per_device_train_batch_size": 16, "output_dir": tmp_path / "one",
                     "save_strategy": "steps", "save_steps": 1})
    assert one.returncode == 0, one.stderr[-3000:]
    accumulated = subprocess.Popen(train_command({**ITM_MLM, "per_device_train_batch_size": 8,
                                                   "gradient_accumulation_steps": 2,
                                                   "output_dir": tmp_path / "accumulated"}), env=cli_env(),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed = tmp_path / "killed"  # beside the accumulated run: the machine's two cores
    process = subprocess.Popen(train_command({**ITM_MLM, "output_dir": killed, "save_strategy": "steps",
                                              "save_steps": 1}), env=cli_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (killed / "checkpoint-3").exists():
        assert process.poll() is None and time.time() < deadline, "the run ended before checkpoint-3"
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not (killed / "model.safetensors").exists()
    assert accumulated.wait(timeout=300) == 0, accumulated.stderr.read()[-3000:]
    torchrun = [launcher_binary("torchrun"), "--nproc_per_node", "2", "--master_port", "29673"]
    two = run_train({**ITM_MLM, "per_device_train_batch_size": 8, "output_dir": tmp_path / "two"}, torchrun)
    assert two.returncode == 0, two.stderr[-3000:]
    moved = tmp_path / "moved" / "checkpoint-2"
    shutil.copytree(killed / "checkpoint-2", moved)
    resumed = run_train({**ITM_MLM, "output_dir": tmp_path / "elsewhere", "resume_from_checkpoint": moved})
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    for key in ("loss", "itm_loss", "mlm_loss", "itm_negative_similarity", "itm_uniform_similarity"):
        want = _logged(tmp_path / "one", key)
        assert len(want) == 4, key
        assert _logged(tmp_path / "accumulated", key) == pytest.approx(want, rel=1e-5), key
        assert _logged(tmp_path / "two", key) == pytest.approx(want, rel=1e-5), key
        assert _logged(tmp_path / "elsewhere", key)[-2:] == want[2:], key  # steps 3 and 4, resumed
    assert _logged(tmp_path / "one", "loss")[3] != pytest.approx(_logged(tmp_path / "one", "loss")[0], rel=1e-3)
    assert _max_difference(tmp_path / "accumulated", tmp_path / "one") < 1e-5
    assert _max_difference(tmp_path / "two", tmp_path / "one") < 1e-5
    assert _max_difference(tmp_path / "elsewhere", tmp_path / "one") == 0.0
    assert logged_losses(tmp_path / "elsewhere")[-2:] == logged_losses(tmp_path / "one")[2:]
    negatives, uniform = _logged(tmp_path / "one", "itm_negative_similarity"), \
        _logged(tmp_path / "one", "itm_uniform_similarity")
    assert all(hard > easy for hard, easy in zip(negatives, uniform)), (negatives, uniform)
    for name in ("itm.safetensors", "mlm.safetensors"):
        assert (tmp_path / "one" / "checkpoint-2" / name).exists()
    saved = json.loads((tmp_path / "one" / "config.json").read_text())
    assert saved["architectures"] == ["SiglipModel"] and "fusion" not in json.dumps(saved)  # the dual encoder: native
    assert not any(key.startswith(("fusion_encoder", "itm_head", "mlm_head"))
                   for key in load_file(str(tmp_path / "one" / "model.safetensors")))
    card = (tmp_path / "one" / "README.md").read_text()
    assert '"itm": {"itm_weight": 1.0, "itm_negatives_per_sample": 2' in card and "fusion_encoder/" in card
    check_saved_scorer(tmp_path / "one", tmp_path)


BLOCKED_SCORE = r"""
import importlib.abc, json, re, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "hf_siglip" or name.startswith("hf_siglip."):
            raise ImportError("hf_siglip is blocked in this process")
sys.meta_path.insert(0, Block())
folder, images, captions = sys.argv[1], sys.argv[2:4], sys.argv[4:6]
readme = open(f"{folder}/fusion_encoder/README.md").read()
code = readme[readme.index("```python\n") + 10:readme.rindex("```")]
code = code.replace('"path/to/output_dir"', repr(folder))
code = re.sub(r"images = .*\n", "images = [Image.open(path) for path in IMAGES]\n", code)
code = re.sub(r"captions = .*\n", "captions = CAPTIONS\n", code)
scope = {"IMAGES": images, "CAPTIONS": captions}
exec(code, scope)
print(json.dumps({"p": scope["match_probability"].tolist(), "ids": scope["ids"].tolist(),
                  "blocked": "hf_siglip" not in sys.modules}))
"""


def check_saved_scorer(output_dir, tmp_path):
    """The README's snippet (plain transformers, hf_siglip blocked) gives the match probabilities of the trained
    objective (loaded from the last checkpoint's side file into the saved dual encoder) and of load_itm_scorer; the
    saved BlipTextLMHeadModel predicts masked tokens as the trained MLM head does."""
    from PIL import Image
    from transformers import AutoProcessor, BlipTextLMHeadModel

    from hf_siglip.objectives.fusion import load_itm_scorer

    paths = []
    for index, row in enumerate(hs.make_demo_dataset(n_train=1, n_test=2, image_size=16, seed=5)["test"]):
        paths.append(str(tmp_path / f"{index}.png"))
        row["image"].save(paths[-1])
    captions = ["a red circle", "a small blue square"]
    result = subprocess.run([sys.executable, "-c", BLOCKED_SCORE, str(output_dir), *paths, *captions], env=cli_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    plain = json.loads(result.stdout.strip().splitlines()[-1])
    assert plain["blocked"]

    model, processor = hs.load_dual_encoder(str(output_dir)).eval(), AutoProcessor.from_pretrained(output_dir)
    configs = {"itm": ItmConfig(**FUSION), "mlm": MlmConfig()}
    args = type("A", (), {"objectives": configs, "seed": 3})()
    itm, mlm = Itm(configs["itm"], model, args, processor), Mlm(configs["mlm"], model, args, processor)
    itm.load_from(str(output_dir / "checkpoint-4"))
    mlm.load_from(str(output_dir / "checkpoint-4"))
    pixel_values = processor(images=[Image.open(path) for path in paths], return_tensors="pt")["pixel_values"]
    ids = torch.tensor(plain["ids"])
    with torch.no_grad():
        patches = model.vision_model(pixel_values=pixel_values).last_hidden_state
        hidden = itm.fusion.eval()(patches, ids)
        ours = itm.head(hidden[:, 0]).softmax(-1)[:, 1]
        torch.testing.assert_close(torch.tensor(plain["p"]), ours, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(load_itm_scorer(str(output_dir))(pixel_values, ids), ours, rtol=1e-5, atol=1e-6)
        saved = BlipTextLMHeadModel.from_pretrained(output_dir / "fusion_encoder").eval()
        start = torch.full((2, 1), saved.config.itm_cls_token_id)
        logits = saved(input_ids=torch.cat([start, ids], 1), attention_mask=torch.cat(
            [torch.ones_like(start), (ids != saved.config.pad_token_id).long()], 1), encoder_hidden_states=patches,
            is_decoder=False).logits
        torch.testing.assert_close(logits, mlm.head(hidden), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["albef_pretrain", "blip_pretrain"])
def test_itm_recipes(name, tmp_path):
    from test_recipes import run_recipe

    output_dir = run_recipe(name, tmp_path, max_steps=2)
    assert (output_dir / "fusion_encoder" / "itm_head.safetensors").exists()
    assert (output_dir / "captioner").exists() == (name == "blip_pretrain")
    card = (output_dir / "README.md").read_text()
    assert '"itm": {"itm_weight": 1.0' in card and ('"mlm"' in card) == (name == "albef_pretrain")
    assert "teacher_momentum" in card
