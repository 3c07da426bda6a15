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


@pytest.fixture(scope="session", autouse=True)
def saved_tables_of_this_session(tmp_path_factory):
    """Runs keep their recycling table in the cache (hot start across runs): tests must neither
    read nor write the user's. The cache is a fresh folder here, whose converted models, GGUFs
    and tuning profiles are the user's own (converting again would take minutes). Subprocesses
    inherit it."""
    from tokenrecycle.models import cache_root

    user_cache, session_cache = cache_root(), tmp_path_factory.mktemp("cache")
    for shared in ("models", "gguf", "profiles"):
        (user_cache / shared).mkdir(parents=True, exist_ok=True)
        (session_cache / shared).symlink_to(user_cache / shared, target_is_directory=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TOKENRECYCLE_CACHE", str(session_cache))
        yield session_cache


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
