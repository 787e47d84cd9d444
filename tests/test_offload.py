"""Models spread by accelerate's device_map, with weights offloaded to disk: prunekit prunes them as it prunes the
model in memory (its hooks meet the tensors wherever they are; its attention recomputation calls the modules,
whose own hooks load their weights)."""

import pytest
import torch

import prunekit
from prunekit.testing import assert_pruned, tiny_llava, tiny_llava_inputs


@pytest.mark.parametrize("method, points", [("tops", None), ("fastv", None), ("visionzip", None)])
def test_disk_offloaded_model_prunes_like_the_model_in_memory(tmp_path, method, points):
    from transformers import LlavaForConditionalGeneration

    model = tiny_llava(num_layers=6)
    inputs = tiny_llava_inputs(model)
    model.save_pretrained(tmp_path / "model")
    prunekit.build(method, model, keep_ratio=0.6)
    ref = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
    kept_ref = [s.kept for s in prunekit.pruning_report(model).stages]

    offloaded = LlavaForConditionalGeneration.from_pretrained(
        tmp_path / "model", device_map="auto", max_memory={"cpu": "150KB"}, offload_folder=str(tmp_path / "offload"),
        attn_implementation="sdpa",
    )
    assert "disk" in set(offloaded.hf_device_map.values())
    prunekit.build(method, offloaded, keep_ratio=0.6)
    out = offloaded.generate(**inputs, max_new_tokens=4, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
    report = assert_pruned(offloaded)
    for kept, ref_kept in zip((s.kept for s in report.stages), kept_ref):
        assert all(torch.equal(a, b) for a, b in zip(kept, ref_kept))
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.scores, ref.scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    prunekit.remove(offloaded)
