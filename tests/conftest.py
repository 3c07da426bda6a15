import pytest


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
