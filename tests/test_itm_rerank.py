"""Retrieval re-ranked by the ITM head (ALBEF / BLIP protocol), `hf-siglip eval --itm_rerank_k`: against a ranking
written out by hand from ITM probabilities computed with plain transformers (the fusion encoder's README recipe),
tie-aware when the head says the same for every pair, refused in one line without a head."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoProcessor, BlipTextModel

import hf_siglip as hs
from cli_helpers import TINY, cli_env, run_train
from hf_siglip.data.embedding import embed_images, embed_texts
from hf_siglip.data.text import normalize_captions
from hf_siglip.itm_scoring import ItmPairScorer, itm_rerank_metrics

ITM = {"itm": {"hidden_size": 24, "num_attention_heads": 2, "num_layers": 1, "seed": 1}}
K = 3


@torch.no_grad()
def plain_itm_probability(folder, images, captions, max_length) -> torch.Tensor:
    """Match probability of each (images[p], captions[p]) with plain transformers classes only, as the fusion
    encoder's README.md shows: vision tower patch tokens, [CLS] + ids, mask ids != pad, 2-way head on [CLS]."""
    model, processor = AutoModel.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)
    fusion = BlipTextModel.from_pretrained(f"{folder}/fusion_encoder", add_pooling_layer=False).eval()
    head = torch.nn.Linear(fusion.config.hidden_size, 2)
    head.load_state_dict(load_file(f"{folder}/fusion_encoder/itm_head.safetensors"))
    pixel_values = processor.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
    ids = processor.tokenizer(list(captions), padding="max_length", truncation=True, max_length=max_length,
                              return_tensors="pt")["input_ids"]
    patches = model.vision_model(pixel_values=pixel_values).last_hidden_state
    start = torch.full((len(ids), 1), fusion.config.itm_cls_token_id)
    mask = torch.cat([torch.ones_like(start), (ids != fusion.config.pad_token_id).long()], dim=1)
    hidden = fusion(input_ids=torch.cat([start, ids], dim=1), attention_mask=mask, encoder_hidden_states=patches,
                    is_decoder=False).last_hidden_state
    return head(hidden[:, 0]).softmax(-1)[:, 1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("itm") / "out"
    run = run_train({**TINY, "output_dir": out, "max_steps": 3, "learning_rate": 3e-3, "disable_tqdm": "true",
                     "objectives": json.dumps(ITM), "itm_rerank_k": K})
    assert run.returncode == 0, run.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def held_out(checkpoint):
    """The run's held-out split as `hf-siglip eval` reads it (from the record), its embeddings and ids."""
    from hf_siglip.cli.evaluate import SiglipEvalArguments, resolve_eval_arguments
    from hf_siglip.cli.train import load_named_splits

    args = SiglipEvalArguments(checkpoint=str(checkpoint))
    resolve_eval_arguments(args)
    demo = load_named_splits(args)[1]
    model, processor = hs.load_dual_encoder(str(checkpoint)), AutoProcessor.from_pretrained(checkpoint)
    images = list(demo["image"])
    texts, text_ids = [], []
    for row, (image_id, cell) in enumerate(zip(demo["image_id"], demo["caption"])):
        captions = normalize_captions(cell, row)[0]
        texts += captions
        text_ids += [image_id] * len(captions)
    image_embeds = embed_images(model, processor, images)
    text_embeds = embed_texts(model, processor, texts, max_length=TINY["max_length"])
    return images, texts, torch.tensor(demo["image_id"]), torch.tensor(text_ids), image_embeds, text_embeds


def distinct_captions(held_out):
    """(images, texts, similarity, positives) with one text per caption string: a string shared by two images, or
    repeated, ties exactly, and the ranking written out by hand needs distinct scores (ties have their own test)."""
    images, texts, image_ids, text_ids, image_embeds, text_embeds = held_out
    owners = {}
    for text, image_id in zip(texts, text_ids.tolist()):
        owners.setdefault(text, set()).add(image_id)
    keep = [index for index, text in enumerate(texts) if len(owners[text]) == 1 and texts.index(text) == index]
    positives = image_ids[:, None] == text_ids[keep][None, :]
    return images, [texts[i] for i in keep], image_embeds @ text_embeds[keep].T, positives


def hand_reranked_recall(similarity, probability, positives, k, ks=(1, 2, 5)):
    """Recall@r of each query's ranking written out: its k best by cosine sorted by ITM probability, then the rest by
    cosine (no ties: checked)."""
    recalls = {r: [] for r in ks}
    for query in range(len(similarity)):
        order = sorted(range(similarity.shape[1]), key=lambda c: -float(similarity[query, c]))
        assert len({float(similarity[query, c]) for c in order}) == len(order)
        front = sorted(order[:k], key=lambda c: -float(probability[query, c]))
        assert len({float(probability[query, c]) for c in front}) == k
        ranking = front + order[k:]
        for r in ks:
            recalls[r].append(float(any(positives[query, c] for c in ranking[:r])))
    return {r: sum(hits) / len(hits) for r, hits in recalls.items()}


def test_rerank_equals_a_ranking_written_out_by_hand(checkpoint, held_out):
    images, texts, similarity, positives = distinct_captions(held_out)
    scorer = ItmPairScorer(str(checkpoint), batch_size=5)  # several image chunks, pairs of each scored together
    metrics = itm_rerank_metrics(scorer, images, texts, similarity, positives, K, ks=(1, 2, 5))
    pairs = [(i, t) for i in range(len(images)) for t in range(len(texts))]
    probability = plain_itm_probability(checkpoint, [images[i] for i, _ in pairs], [texts[t] for _, t in pairs],
                                        TINY["max_length"]).view(len(images), len(texts))
    i2t = hand_reranked_recall(similarity, probability, positives, K)
    t2i = hand_reranked_recall(similarity.T, probability.T, positives.T, K)
    for r in (1, 2, 5):
        assert metrics[f"i2t_itm_recall@{r}"] == pytest.approx(i2t[r], abs=1e-9)
        assert metrics[f"t2i_itm_recall@{r}"] == pytest.approx(t2i[r], abs=1e-9)
    # nothing moves beyond the k re-scored
    assert i2t[5] == hand_reranked_recall(similarity, similarity, positives, K)[5]
    assert metrics["itm_scored_pairs"] <= len(images) * K + len(texts) * K


def test_a_head_that_says_the_same_for_every_pair_gives_the_expected_hits(checkpoint, held_out):
    images, texts, similarity, positives = distinct_captions(held_out)
    scorer = ItmPairScorer(str(checkpoint))
    with torch.no_grad():  # a real head, zeroed: probability 0.5 for every pair, so the k re-scored tie
        scorer.scorer.itm_head.weight.zero_()
        scorer.scorer.itm_head.bias.zero_()
    metrics = itm_rerank_metrics(scorer, images, texts, similarity, positives, K, ks=(1,))
    for prefix, scores, matches in (("i2t", similarity, positives), ("t2i", similarity.T, positives.T)):
        top = scores.topk(K, dim=1).indices
        # a random order of the k tied candidates puts one of the q matches among them first with probability q / k
        expected = matches.gather(1, top).double().sum(1) / K
        assert metrics[f"{prefix}_itm_recall@1"] == pytest.approx(expected.mean().item(), abs=1e-12)
        assert metrics[f"{prefix}_itm_queries_with_ties"] == int(((expected > 0) & (expected < 1)).sum())
    with torch.no_grad():
        scorer.scorer.itm_head.bias.fill_(float("nan"))
    with pytest.raises(ValueError, match="non-finite match probabilities"):
        itm_rerank_metrics(scorer, images, texts, similarity, positives, K)


def test_hf_siglip_eval_reports_both_recalls(checkpoint, held_out, tmp_path):
    from hf_siglip.evaluation import tie_exact_scores

    images, texts, image_ids, text_ids, image_embeds, text_embeds = held_out
    similarity, positives = tie_exact_scores(image_embeds, text_embeds), image_ids[:, None] == text_ids[None, :]
    out = tmp_path / "metrics.json"
    run = subprocess.run([sys.executable, "-m", "hf_siglip", "eval", "--checkpoint", str(checkpoint),
                          "--itm_rerank_k", str(K), "--output_file", str(out)], env=cli_env(), capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads(out.read_text())
    expected = itm_rerank_metrics(ItmPairScorer(str(checkpoint)), images, texts, similarity, positives, K)
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, abs=1e-9), name
    for way in ("i2t", "t2i"):  # the embeddings' recall beside it, equal beyond the k re-scored
        assert metrics[f"{way}_itm_recall@5"] == pytest.approx(metrics[f"{way}_recall@5"], abs=1e-9)
        assert f"{way}_recall@1" in metrics and metrics["itm_rerank_k"] == K
    # hf-siglip train --itm_rerank_k reported the same after training, beside its own recall
    trained = json.loads((checkpoint / "eval_results.json").read_text())["metrics"]
    for name, value in expected.items():
        assert trained[f"eval_{name}"] == pytest.approx(value, abs=1e-9), name
    assert trained["eval_i2t_recall@1"] == pytest.approx(metrics["i2t_recall@1"], abs=1e-6)


def test_reranking_without_an_itm_head_is_refused_in_one_line(checkpoint, tmp_path, capsys):
    from cli_helpers import flags
    from hf_siglip.cli.main import main as cli_main

    bare = tmp_path / "bare"
    shutil.copytree(checkpoint, bare, ignore=shutil.ignore_patterns("fusion_encoder", "checkpoint-*"))
    assert cli_main(["eval", "--checkpoint", str(bare), "--itm_rerank_k", "2"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert "itm_rerank_k" in error[-1] and "fusion_encoder" in error[-1] and "Traceback" not in "".join(error)
    # training that would have no head to re-rank with: refused before any data
    assert cli_main(["train", *flags({**TINY, "output_dir": tmp_path / "out", "itm_rerank_k": 2})]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert "itm_rerank_k" in error[-1] and "itm objective" in error[-1]
    assert not (tmp_path / "out").exists()
