import pytest
import torch

from prunekit.testing import tiny_llava, tiny_llava_inputs


@pytest.fixture(scope="session")
def llava():
    return tiny_llava()


@pytest.fixture
def model(llava):
    """The shared tiny LLaVA, guaranteed unpatched before and after each test."""
    import prunekit

    prunekit.remove(llava)
    yield llava
    prunekit.remove(llava)


@pytest.fixture(scope="session")
def llava8():
    """A deeper tiny LLaVA (8 decoder layers) so multi-stage in-LLM methods have room for their layers."""
    return tiny_llava(num_layers=8)


@pytest.fixture
def deep_model(llava8):
    import prunekit

    prunekit.remove(llava8)
    yield llava8
    prunekit.remove(llava8)


@pytest.fixture(scope="session")
def inputs(llava):
    return tiny_llava_inputs(llava)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def unpad_row(inputs, b, images_per_row=1):
    """Row ``b`` alone, with its left padding removed and only its own images."""
    first = int(inputs["attention_mask"][b].nonzero()[0])
    return {
        "input_ids": inputs["input_ids"][b : b + 1, first:],
        "attention_mask": inputs["attention_mask"][b : b + 1, first:],
        "pixel_values": inputs["pixel_values"][b * images_per_row : (b + 1) * images_per_row],
    }
