import os

from hypothesis import settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
settings.register_profile("tmcore", deadline=None, max_examples=100)
settings.load_profile("tmcore")
