"""``prunekit bench``'s building blocks: batched prompts, the real-depth 7B built on its device, and which
unpruned prefill a selection is compared with (no 7B is materialised: the full-depth one is built on the meta
device, which proves it is created where it is asked to be, in the dtype asked for)."""

import pytest
import torch

from prunekit.tools import bench


def test_model_inputs_are_batch_copies_of_one_prompt_with_their_own_images():
    from prunekit.testing import tiny_llava

    model = tiny_llava(num_layers=2).eval()
    one, three = bench.model_inputs(model), bench.model_inputs(model, batch=3)
    assert three["input_ids"].shape == (3, one["input_ids"].shape[1])
    assert all(torch.equal(row, one["input_ids"][0]) for row in three["input_ids"])
    assert torch.equal(three["attention_mask"], torch.ones_like(three["input_ids"]))
    pixels = three["pixel_values"]
    assert pixels.shape[0] == 3 and not torch.equal(pixels[0], pixels[1]) and not torch.equal(pixels[1], pixels[2])
    with torch.no_grad():
        assert model(**three, logits_to_keep=1).logits.shape[0] == 3


def test_the_real_depth_7b_is_built_on_its_device_in_its_dtype():
    model, setting = bench.build_model("7b", decoder_layers=32, vision_layers=24, device="meta",
                                       dtype=torch.bfloat16)
    params = list(model.parameters())
    assert {p.device.type for p in params} == {"meta"} and {p.dtype for p in params} == {torch.bfloat16}
    assert {b.device.type for b in model.buffers()} == {"meta"}
    assert 7.0e9 < sum(p.numel() for p in params) < 7.1e9  # LLaVA-1.5-7B: 6.74B language model + 0.3B CLIP-L
    assert len(model.model.language_model.layers) == 32
    assert (setting.decoder_layers, setting.vision_layers) == (32, 24) and "all 32 decoder" in setting.name


def test_the_selection_prefill_decoder_is_the_7b_language_model_built_on_its_device():
    decoder = bench.prefill_decoder(bench._long_text_config(), device="meta", dtype=torch.bfloat16)
    assert {p.device.type for p in decoder.parameters()} == {"meta"}
    assert {p.dtype for p in decoder.parameters()} == {torch.bfloat16}
    assert decoder.config.num_hidden_layers == 32 and decoder.config.hidden_size == 4096
    assert decoder.config.max_position_embeddings >= 10816 + bench.PROMPT_TEXT_TOKENS


@pytest.mark.parametrize("prefill, device, layers, kind", [
    ("auto", "cuda", 32, "decoder"),  # the real depth on a GPU: the whole 32-layer decoder
    ("auto", "cpu", 32, "layer"),  # a float32 7B does not fit a CPU machine's memory: one layer x 32
    ("auto", "cuda", 4, "layer"),  # a scaled run: the one-layer estimate, as the model part scales
    ("decoder", "cpu", 4, "decoder"), ("layer", "cuda", 32, "layer"), ("none", "cuda", 32, None),
    (True, "cuda", 32, "decoder"), (False, "cuda", 32, None),
])
def test_which_prefill_a_selection_is_compared_with(prefill, device, layers, kind):
    assert bench.selection_prefill_kind(prefill, device, layers) == kind


def test_an_unknown_selection_prefill_names_the_option_and_the_choices():
    with pytest.raises(ValueError, match="--selection-prefill must be one of auto, decoder, layer, none; got 'full'"):
        bench.selection_prefill_kind("full", "cpu", 4)


def test_selection_rows_carry_the_batch_and_the_decoder_prefill_at_that_batch():
    from transformers import LlamaConfig

    tiny = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=64, max_position_embeddings=512)
    rows = bench.selection_benchmark([(48, 8)], dim=16, batch=[1, 2], repeats=1, prefill="decoder",
                                     decoder_config=tiny, naive_up_to=32, progress=False)
    assert [(r.n, r.k, r.batch) for r in rows] == [(48, 8, 1), (48, 8, 2)]
    for r in rows:
        assert r.prefill == "decoder" and r.prefill_tokens == 48 + bench.PROMPT_TEXT_TOKENS
        assert r.prefill_ms > 0 and r.fraction_of_prefill == r.fast_ms / r.prefill_ms
        assert r.naive_ms is None and r.speedup is None  # above naive_up_to: not run, and said so


def test_nothing_is_hooked_at_the_real_depth():
    model, setting = bench.build_model("tiny", decoder_layers=2)
    with bench._DepthScaler(model, setting, torch.device("cpu")) as depth:
        assert depth.dec_scale == 0 and depth.vis_scale == 0
        assert not depth.dec._handles and not depth.vis._handles
    scaled = bench.ModelSetting("scaled", 2, setting.vision_layers, 8, setting.vision_layers, 64, 0)
    with bench._DepthScaler(model, scaled, torch.device("cpu")) as depth:
        assert depth.dec_scale == 3 and depth.dec._handles and not depth.vis._handles


def test_an_interrupted_run_writes_what_it_measured(tmp_path, monkeypatch):
    import json

    calls = []

    def interrupted(*args, rows, **kwargs):
        rows.append(bench.SelectionRow(64, 8, 16, 1, "cpu", 1.0, None, False, None, 100.0, "layer", 130, "float32"))
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "selection_benchmark", interrupted)
    result = bench.run(tmp_path, parts=["selection"], progress=False)
    assert calls and "interrupted" in result and len(result["selection"]) == 1
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["selection"][0]["fraction_of_prefill"] == 0.01 and "interrupted" in saved
    assert (tmp_path / "bench.md").read_text().startswith("**interrupted")
