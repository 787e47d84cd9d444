"""TOPS presets: picked from a model's config as loaded by the user's own from_pretrained (local files)."""

import pytest

import prunekit
from prunekit.registry import registry
from prunekit_plugins.methods.tops import PRESETS

ADAPTER_OF_FAMILY = {"llava": "llava", "llava_next": "llava_next", "qwen2_5_vl": "qwen2_5_vl",
                     "internvl": "internvl", "llava_onevision": "llava_onevision"}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_is_found_from_a_saved_config(preset, tmp_path):
    import transformers

    spec = PRESETS[preset]
    adapter = registry.get("adapters", ADAPTER_OF_FAMILY[spec["family"]])
    model = adapter.tiny(num_layers=spec["num_layers"])
    model.save_pretrained(tmp_path)
    loaded = getattr(transformers, type(model).__name__).from_pretrained(tmp_path, attn_implementation="sdpa")
    named = {} if spec.get("auto", True) else {"preset": preset}
    prunekit.build("tops", loaded, keep_tokens=8 if spec["layers"] else 2, **named)
    stages = loaded.__dict__["_prunekit_patch"].layer_stages
    patch = loaded.__dict__["_prunekit_patch"]
    if spec["layers"] is None:
        assert stages == [] and patch.budget_per == spec["budget_per"]
    else:
        assert [s.layer for s in stages] == list(spec["layers"])
    rows = adapter.tiny_rows(loaded)
    loaded.generate(**rows[-1], max_new_tokens=2, do_sample=False)  # the preset runs
    assert prunekit.inspect(loaded).stages


def test_unknown_preset_names_the_presets():
    model = registry.get("adapters", "llava").tiny()
    with pytest.raises(ValueError, match="llava-next-13b"):
        prunekit.build("tops", model, preset="llava-next-31b")


def test_preset_weights_follow_the_budget():
    from prunekit.interfaces import ModelSpec
    from prunekit_plugins.methods.tops import Tops, TopsConfig

    spec = ModelSpec(family="llava_next", num_layers=32, hidden_size=4096)
    assert Tops(TopsConfig(keep_tokens=320))._decoder_weights(PRESETS["llava-next-7b"], 320.0) == (0.5, 0.4)
    assert Tops(TopsConfig(keep_tokens=160))._decoder_weights(PRESETS["llava-next-7b"], 160.0) == (0.5, 0.5)
    assert [s.layer for s in Tops(TopsConfig(keep_tokens=320)).plan(spec)] == [None, 12, 24]
    assert Tops(TopsConfig(keep_tokens=128))._decoder_weights(PRESETS["internvl3-8b"], 128.0) == (0.3, 0.2)
