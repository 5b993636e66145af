"""The reducer conformance suite for tomesd (it runs on the block-scope models: diffusers' tiny
UNet, DiT, PixArt and SD3; every other model refuses it, which the suite checks)."""

import pytest

from tmcore.testing import ReducerConformance

pytestmark = pytest.mark.slow


class TestToMeSDConformance(ReducerConformance):
    reducer = "tomesd"
