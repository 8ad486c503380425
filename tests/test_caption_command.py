"""The package's `evaluate` metrics (hf_siglip.metrics) and `hf-siglip caption`.

The caption scores are pycocoevalcap's (the COCO caption evaluation), called here directly on the written captions as
the independent count; the retrieval and zero-shot modules give what `hf_siglip.evaluation` gives, chance on constant
embeddings included; every module loads in a process with the Hub and evaluate offline.
"""

import json
import subprocess
import sys

import pytest
import torch

from cli_helpers import TINY, cli_env, run_train

pytest.importorskip("pycocoevalcap")  # the captioning extra
from pycocoevalcap.bleu.bleu import Bleu  # noqa: E402
from pycocoevalcap.cider.cider import Cider  # noqa: E402

from hf_siglip.cli.main import main as cli_main  # noqa: E402
from hf_siglip.evaluation import chance_recall, retrieval_metrics, zero_shot_metrics  # noqa: E402
from hf_siglip.metrics import METRICS, load_metric, metric_path  # noqa: E402
from hf_siglip.metrics.coco import caption_tokens  # noqa: E402

PREDICTIONS = ["A red circle.", "a blue square on grey", "a green triangle", "red red red red"]
REFERENCES = [["a red circle", "a red disc on white"], ["a blue square on grey", "blue square"],
              ["a small green triangle"], ["a yellow star", "a yellow star on black"]]


def coco_scores(predictions, references) -> dict:
    """pycocoevalcap called by hand on its own input format (tokenised, dicts keyed by image)."""
    gts = {i: [caption_tokens(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [caption_tokens(p)] for i, p in enumerate(predictions)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"bleu4": bleu[3], "cider": cider}


def test_caption_scores_are_the_coco_scorers_and_reward_the_right_captions():
    bleu = load_metric("caption_bleu").compute(predictions=PREDICTIONS, references=REFERENCES)
    cider = load_metric("caption_cider").compute(predictions=PREDICTIONS, references=REFERENCES)
    want = coco_scores(PREDICTIONS, REFERENCES)
    assert bleu["bleu4"] == pytest.approx(want["bleu4"], abs=1e-12) and cider["cider"] == pytest.approx(want["cider"])
    perfect = [refs[0] for refs in REFERENCES]
    constant = ["a"] * len(REFERENCES)  # a collapsed captioner
    scores = {name: load_metric("caption_cider").compute(predictions=p, references=REFERENCES)["cider"]
              for name, p in (("perfect", perfect), ("mixed", PREDICTIONS), ("constant", constant))}
    assert scores["perfect"] > scores["mixed"] > scores["constant"] >= 0
    assert scores["constant"] < 0.1
    assert load_metric("caption_bleu").compute(predictions=perfect, references=REFERENCES)["bleu1"] == pytest.approx(
        1.0)  # every word of a reference caption is in its references
    with pytest.raises(ValueError, match="no reference caption"):
        load_metric("caption_cider").compute(predictions=["a"], references=[[]])


def test_retrieval_and_zero_shot_modules_give_the_package_numbers_and_chance_on_constant_embeddings():
    generator = torch.Generator().manual_seed(0)
    images, texts = torch.randn(12, 8, generator=generator), torch.randn(24, 8, generator=generator)
    image_ids, text_ids = torch.arange(12), torch.arange(12).repeat_interleave(2)  # 2 captions per image
    recall = load_metric("retrieval_recall")
    got = recall.compute(image_embeds=images.tolist(), image_ids=image_ids.tolist(), text_embeds=texts.tolist(),
                         text_ids=text_ids.tolist())
    assert got == pytest.approx(retrieval_metrics(images, texts, image_ids, text_ids), abs=1e-6)
    constant = recall.compute(image_embeds=[[1.0] * 8] * 12, image_ids=image_ids.tolist(),
                              text_embeds=[[1.0] * 8] * 24, text_ids=text_ids.tolist())
    assert constant["i2t_recall@1"] == pytest.approx(chance_recall(24, 2, 1))  # 2 of 24 captions match: 1/12
    assert constant["t2i_recall@1"] == pytest.approx(1 / 12)
    labels, classes = torch.arange(12) % 3, torch.randn(3, 8, generator=generator)
    accuracy = load_metric("zero_shot_accuracy")
    got = accuracy.compute(image_embeds=images.tolist(), labels=labels.tolist(), class_embeds=classes.tolist(),
                           ks=(1,))
    assert got == pytest.approx(zero_shot_metrics(images, labels, classes, ks=(1,)), abs=1e-6)
    flat = accuracy.compute(image_embeds=[[1.0] * 8] * 12, labels=labels.tolist(), class_embeds=[[1.0] * 8] * 3,
                            ks=(1,))
    assert flat["zero_shot_top1"] == pytest.approx(1 / 3)


def test_every_metric_loads_offline_in_a_fresh_process(tmp_path):
    script = ("import evaluate, sys; "
              "[evaluate.load(path) for path in sys.argv[1:]]; print('loaded', len(sys.argv) - 1)")
    run = subprocess.run([sys.executable, "-c", script, *(metric_path(name) for name in METRICS)],
                         env=cli_env(HF_EVALUATE_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf")),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and f"loaded {len(METRICS)}" in run.stdout, run.stderr[-2000:]


def test_caption_command_after_training_writes_scored_captions_that_match_the_training_evaluation(tmp_path):
    """`hf-siglip train` with the captioning objective captions the held-out split after training (eval_caption_* in
    eval_results.json and the card's model-index); `hf-siglip caption` on the same folder writes the same scores,
    which pycocoevalcap recomputes from the written captions."""
    out = tmp_path / "out"
    settings = {**TINY, "disable_tqdm": "true", "seed": 3, "output_dir": out,
                "objectives": json.dumps({"captioning": {"hidden_size": 24, "num_attention_heads": 2,
                                                         "max_caption_length": 10}})}
    trained = run_train(settings)
    assert trained.returncode == 0, trained.stderr[-3000:]
    at_training = json.loads((out / "eval_results.json").read_text())["metrics"]
    run = subprocess.run([sys.executable, "-m", "hf_siglip", "caption", "--checkpoint", str(out), "--output_dir",
                          str(tmp_path / "captions")], env=cli_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.startswith(f"Captioned {TINY['demo_test_size']} images of demo, split 'test'"), run.stdout
    rows = [json.loads(line) for line in (tmp_path / "captions" / "captions.jsonl").read_text().splitlines()]
    scores = json.loads((tmp_path / "captions" / "caption_metrics.json").read_text())
    assert len(rows) == TINY["demo_test_size"] and all(row["references"] for row in rows)
    want = coco_scores([row["generated"] for row in rows], [row["references"] for row in rows])
    assert scores["caption_bleu4"] == pytest.approx(want["bleu4"]) and scores["caption_cider"] == pytest.approx(
        want["cider"])
    assert at_training["eval_caption_cider"] == pytest.approx(scores["caption_cider"])
    assert at_training["eval_caption_bleu4"] == pytest.approx(scores["caption_bleu4"])
    card = (out / "README.md").read_text()
    assert "captioning CIDEr-D" in card and "captioning BLEU-4" in card  # the model-index


def test_caption_command_mistakes_are_one_line(tmp_path, capsys):
    trained_without = tmp_path / "plain"
    trained_without.mkdir()
    (trained_without / "config.json").write_text(json.dumps({"model_type": "siglip"}))
    capsys.readouterr()
    assert cli_main(["caption", "--checkpoint", str(trained_without)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "no captioner in it" in error[0], error
    assert cli_main(["caption", "--checkpoint", str(trained_without), "--num_beams", "0"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "num_beams must be a positive integer" in error[0], error
