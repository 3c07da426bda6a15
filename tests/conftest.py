import pytest


@pytest.fixture(scope="session")
def smollm2():
    """The bundled default model in float32, loaded once for every test that needs it."""
    from tokenrecycle import Generator

    return Generator("smollm2", dtype="float32")
