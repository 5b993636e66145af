import os

from hypothesis import settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
settings.register_profile("tmcore", deadline=None, max_examples=100)
settings.load_profile("tmcore")

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two workers on two cores: one thread each
    import torch

    torch.set_num_threads(1)

pytest_plugins = ["pytester"]  # tests/test_testing_kit.py runs the conformance suite on broken reducers
