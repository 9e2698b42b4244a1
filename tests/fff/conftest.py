import pytest

from algos.fff import kernels


@pytest.fixture(params=["kernels", "pytorch"])
def backend(request, monkeypatch):
    """Runs a test on the compiled kernels (neuron form; leaf form's routing), then on the PyTorch path."""
    if request.param == "pytorch":
        monkeypatch.setattr(kernels, "ENABLED", False)
    elif not kernels.ENABLED:
        pytest.skip("numba is not installed")
    return request.param
