"""CAT (spaCy parse + Tesseract OCR on rendered text) and CapFilt (tiny SigLIP) on real data."""

import datasets
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from data_fixtures import jpeg_bytes, make_processor, make_tiny_siglip, random_rgb
from hf_siglip.data import capfilt, caption_complexity_and_action, cat_filter


def _spacy():
    pytest.importorskip("spacy")
    from hf_siglip.data import load_spacy
    try:
        return load_spacy()
    except ImportError as error:
        pytest.skip(str(error))


def _tesseract():
    pytest.importorskip("pytesseract")
    import pytesseract
    try:
        pytesseract.get_tesseract_version()
    except Exception:
        pytest.skip("tesseract binary not installed")


def _sign(text):
    image = Image.new("RGB", (220, 64), "white")
    ImageDraw.Draw(image).text((10, 14), text, fill="black", font=ImageFont.load_default(size=30))
    return image


def test_complexity_and_action_from_the_parse():
    nlp = _spacy()
    texts = ["cat", "a man riding a horse on the beach", "the dog runs", "a large red circle", "two people"]
    complexity, action = caption_complexity_and_action(nlp.pipe(texts))
    assert complexity[0] == 0 and complexity[1] >= 2 and complexity[3] == 3
    assert action == [False, True, True, False, False]


def test_cat_filter_counts_each_criterion_and_reads_text_in_images():
    _spacy()
    _tesseract()
    blank = Image.new("RGB", (220, 64), (90, 140, 200))
    rows = [
        (blank, ["a man riding a horse on the beach", "horse"]),   # second fails complexity + action
        (_sign("STOP"), ["a woman holds a sign that says stop"]),  # text-spotting
        (_sign("STOP"), ["a woman walks past a red sign"]),        # OCR word not in caption: kept
        (blank, ["a large red circle"]),                            # no action: row removed
        (blank, [None, "   "]),                                     # no usable caption: removed, counted
    ]
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.List(datasets.Value("string"))})
    dataset = datasets.Dataset.from_dict({"image": [r[0] for r in rows], "caption": [r[1] for r in rows]},
                                         features=features)
    out, report = cat_filter(dataset, min_complexity=2)
    assert [list(c) for c in out["caption"]] == [["a man riding a horse on the beach"],
                                                 ["a woman walks past a red sign"]]
    assert report["rows"] == 5 and report["rows_removed"] == 3
    assert report["captions"] == 5 and report["captions_kept"] == 2
    assert report["captions_failed_text_spotting"] == 1 and report["captions_failed_action"] == 2
    assert report["captions_failed_complexity"] == 1 and report["empty_captions"] == 2
    assert report["rows_removed_text_spotting"] == 1 and report["rows_removed_action"] == 1
    assert report["rows_removed_complexity"] == 0 and report["rows_removed_no_usable_caption"] == 1
    assert out[0]["image"].mode == "RGB"  # image column untouched, still decoded
    # streaming: same rows, report filled while consuming
    stream, stream_report = cat_filter(dataset.to_iterable_dataset(), min_complexity=2)
    assert [r["caption"] for r in stream] == [list(c) for c in out["caption"]]
    assert stream_report == report
    # criteria switch off independently; num_proc gives the same result
    relaxed, relaxed_report = cat_filter(dataset, min_complexity=None, require_action=False, text_spotting=False,
                                         num_proc=2, batch_size=2)
    assert len(relaxed) == 4 and relaxed_report["captions_kept"] == 5


def test_cat_missing_column_raises():
    _spacy()
    with pytest.raises(KeyError, match="text"):
        cat_filter(datasets.Dataset.from_dict({"caption": ["a"]}), caption_column="text", text_spotting=False)


def test_capfilt_keeps_best_or_thresholded_captions():
    processor = make_processor(image_size=32)
    model = make_tiny_siglip(len(processor.tokenizer))
    rng = np.random.default_rng(0)
    images = [{"bytes": jpeg_bytes(random_rgb(rng, 32)), "path": None} for _ in range(5)]
    images[4] = {"bytes": b"garbage", "path": None}
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.List(datasets.Value("string")),
                                  "pseudo": datasets.List(datasets.Value("string"))})
    dataset = datasets.Dataset.from_dict({
        "image": images,
        "caption": [["a red cat"], ["a blue dog", ""], [], ["the man"], ["a woman"]],
        "pseudo": [["a green circle", "a square"], ["red"], ["x"], [], ["y"]],
    }, features=features)
    best, report = capfilt(dataset, model, processor, caption_columns=["caption", "pseudo"], top_k=1)
    assert all(len(c) == 1 for c in best["caption_filtered"][:4])
    for row in best.select(range(4)):
        candidates = [c for c in row["caption"] + row["pseudo"] if c.strip()]
        assert row["caption_filtered"][0] == candidates[int(np.argmax(row["capfilt_scores"]))]
    assert report["undecodable_images"] == 1 and list(best["caption_filtered"])[4] == ["a woman", "y"]
    # thresholded: keep exactly those at or above the threshold (at least the best one)
    scores = best["capfilt_scores"][0]
    threshold = float(sorted(scores)[1])
    thresholded, _ = capfilt(dataset, model, processor, caption_columns=["caption", "pseudo"], threshold=threshold)
    kept = thresholded["caption_filtered"][0]
    candidates = ["a red cat", "a green circle", "a square"]
    assert kept == [c for c, s in zip(candidates, scores) if s >= threshold - 1e-6]
    assert report["captions"] == 9 and report["rows_removed"] == 0 and report["empty_captions"] == 1
    # streaming gives the same choice and, once consumed, the same report
    stream, stream_report = capfilt(dataset.to_iterable_dataset(), model, processor,
                                    caption_columns=["caption", "pseudo"], top_k=1)
    assert [r["caption_filtered"] for r in stream] == list(best["caption_filtered"])
    assert stream_report == report
