from pathlib import Path

import pytest

CORPUS = Path(__file__).parent / "data" / "corpus"


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for every integration test in the session."""
    import ray

    from llm_ray.ray_utils import init_ray

    init_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture
def corpus_dir() -> Path:
    return CORPUS
