import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """Tests marked cuda need a GPU: without one they skip, saying why (scripts/gpu_check.sh
    runs them on a machine that has one)."""
    if torch.cuda.is_available():
        return
    why = "needs a CUDA GPU; torch " + torch.__version__ + " sees none here (scripts/gpu_check.sh runs these on one)"
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture(scope="session")
def smollm2():
    """The bundled default model in float32 on the fast runner (the default), loaded once."""
    from tokenrecycle import Generator
    from tokenrecycle.runners import FastRunner

    generator = Generator("smollm2", dtype="float32", runner="fast")
    assert isinstance(generator.runner, FastRunner)
    return generator


@pytest.fixture(scope="session")
def smollm2_hf():
    """The same model on the transformers runner."""
    from tokenrecycle import Generator

    return Generator("smollm2", dtype="float32", runner="hf")
