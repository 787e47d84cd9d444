"""The bundled model's building blocks and its training script (the shipped weights: test_bundled_model.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from prunekit.tools import bundled
from prunekit.tools.data import COLORS, SHAPES, ShapesVQA

ROOT = Path(__file__).resolve().parents[1]


def test_tokenizer_covers_every_question_and_answer():
    tok = bundled.build_tokenizer()
    unk = tok.convert_tokens_to_ids("<unk>")
    for s in ShapesVQA("train", 120, seed=3):
        ids = tok(bundled.prompt(s.question)).input_ids
        assert unk not in ids and ids[0] == tok.bos_token_id
        assert tok.decode(ids[2:]) == s.question.replace("?", " ?")
        assert len(tok(s.answer, add_special_tokens=False).input_ids) == 1


def test_processor_gives_one_token_per_patch():
    processor = bundled.build_processor()
    s = ShapesVQA("test", 1)[0]
    inputs = processor(images=s.image, text=bundled.prompt(s.question), return_tensors="pt")
    image_id = processor.tokenizer.convert_tokens_to_ids(bundled.IMAGE_TOKEN)
    assert int((inputs["input_ids"] == image_id).sum()) == bundled.GRID ** 2 == 144
    assert inputs["pixel_values"].shape == (1, 3, bundled.IMAGE_SIZE, bundled.IMAGE_SIZE)


def test_patch_labels_match_the_scene():
    for s in ShapesVQA("train", 30, seed=1):
        lab = bundled.patch_labels(s.objects)
        assert int(lab["center"].sum()) == len({(int(o.y * 12), int(o.x * 12)) for o in s.objects})
        present = {(list(COLORS)[c - 1], SHAPES[h - 1]) for c, h in zip(lab["color"].tolist(), lab["shape"].tolist()) if c}
        assert present <= {(o.color, o.shape) for o in s.objects}
        assert (lab["color"] > 0).float().mean() < 0.5  # most patches are background
        assert lab["quadrant"].view(12, 12)[0, 0] == 0 and lab["quadrant"].view(12, 12)[11, 11] == 3


def test_patch_targets_are_sums_of_word_embeddings():
    emb = torch.randn(len(bundled.vocabulary()), 8)
    vocab = bundled.vocabulary()
    labels = {"color": torch.tensor([0, 1]), "shape": torch.tensor([0, 2]), "center": torch.tensor([0, 1]),
              "quadrant": torch.tensor([0, 3])}
    t = bundled.patch_targets(labels, emb)
    e = lambda w: emb[vocab.index(w)]  # noqa: E731
    torch.testing.assert_close(t[0], e("top") + e("left"))
    torch.testing.assert_close(t[1], e("bottom") + e("right") + e(list(COLORS)[0]) + e(SHAPES[1]) + e("<center>"))


def _train_module():
    spec = importlib.util.spec_from_file_location("train_bundled", ROOT / "scripts" / "train_bundled.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_training_script_runs_resumes_and_records(tmp_path, capsys):
    train = _train_module()
    args = ["--work", str(tmp_path / "work"), "--out", str(tmp_path / "model"), "--pool", "16", "--batch", "4",
            "--vision-steps", "3", "--align-steps", "2", "--text-steps", "3", "--text-layers", "2",
            "--text-width", "32", "--text-heads", "2", "--test-size", "6", "--eval-every", "0", "--threads", "1"]
    torch.set_grad_enabled(True)  # the suite runs under no_grad; training needs gradients
    assert train.main(args + ["--stop-after", "vision"]) == 0
    saved = torch.load(tmp_path / "work" / "checkpoint.pt", weights_only=False)
    assert saved["state"]["stage"] == "align" and not (tmp_path / "model").exists()
    assert train.main(args) == 0
    assert "resumed at stage align" in capsys.readouterr().out
    record = json.loads((tmp_path / "model" / "training.json").read_text())
    assert record["seed"] == 0 and set(record["train_seconds"]) == {"vision", "align", "language"}
    assert set(record["test_accuracy"]) == {"color", "shape", "exist", "count", "spatial", "colors", "all"}
    model, processor = bundled.load(tmp_path / "model")
    assert model.dtype == torch.float32 and processor.tokenizer.vocab_size == len(bundled.vocabulary())


def test_load_names_a_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        bundled.load(tmp_path)
