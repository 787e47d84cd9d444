"""Serve a Qwen2.5-VL or Qwen2-VL checkpoint with vLLM (CPU) and write what it answered:
``python serve_qwen.py MODEL_DIR OUT.json RUNS.json``.

``RUNS.json`` is a list of ``{"name": ..., "prunekit": <a saved block, or null>, "questions": N, "tokens": T,
"images": I}``; each run builds ``vllm.LLM`` on the checkpoint with the block passed in ``hf_overrides`` and asks N test
questions of prunekit.tools.data, one prompt at a time (question i with the images of questions I*i
to I*i+I-1), greedily for T tokens, recording per question the prompt's token count,
the answer's token ids, the indices the model kept, the M-RoPE positions it gave the prompt and how many images it
encoded (read from the model in vLLM's worker). A run whose model or prompt vLLM refuses records the error instead.
Run by tests/test_vllm.py in its own process (vLLM starts worker processes and keeps global state).
"""

from __future__ import annotations

import gc
import json
import os
import sys
import traceback

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# the engine and the model in this process, so that apply_model below reads the model's attributes directly
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from tiny_qwen import prompt  # noqa: E402


def _take(model):
    kept = [k.tolist() for k in getattr(model, "prunekit_last_kept", [])]
    positions = getattr(model, "prunekit_last_positions", None)
    encodes = dict(getattr(model, "prunekit_encodes", {}))
    if hasattr(model, "prunekit_last_kept"):
        model.prunekit_last_kept.clear()
        model.prunekit_last_positions = None
    return kept, None if positions is None else positions.tolist(), encodes


def serve(model: str, run: dict) -> dict:
    from vllm import LLM, SamplingParams

    from prunekit.tools.data import ShapesVQA

    overrides = {} if run.get("prunekit") is None else {"prunekit": run["prunekit"]}
    try:
        llm = LLM(model=model, dtype="float32", max_model_len=512, enforce_eager=True, seed=0,
                  limit_mm_per_prompt={"image": run.get("images", 1)}, hf_overrides=overrides, enable_prefix_caching=False,
                  distributed_executor_backend="uni")
    except Exception as e:  # noqa: BLE001 - the test reads the message
        return {"name": run["name"], "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
    rows = []
    params = SamplingParams(max_tokens=run.get("tokens", 3), temperature=0, ignore_eos=True)
    per = run.get("images", 1)
    samples = list(ShapesVQA("test", run.get("questions", 12) * per, seed=0))
    for i in range(run.get("questions", 12)):
        s = samples[i * per]
        images = [sample.image for sample in samples[i * per : (i + 1) * per]]  # and the next questions' images
        llm.apply_model(_take)
        try:
            (out,) = llm.generate([{"prompt": prompt(s.question, len(images)), "multi_modal_data": {"image": images}}],
                                  params, use_tqdm=False)
        except Exception as e:  # noqa: BLE001 - a prompt the model refuses: the test reads the message
            return {"name": run["name"], "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
        ((kept, positions, encodes),) = llm.apply_model(_take)
        rows.append({"question": s.question, "tokens": list(out.outputs[0].token_ids),
                     "prompt_tokens": len(out.prompt_token_ids), "kept": kept, "positions": positions,
                     "encodes": encodes})
    del llm
    gc.collect()
    return {"name": run["name"], "rows": rows}


def main(argv: list[str]) -> int:
    model, out, runs = argv
    results = [serve(model, run) for run in json.loads(open(runs).read())]
    with open(out, "w") as f:
        json.dump(results, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
