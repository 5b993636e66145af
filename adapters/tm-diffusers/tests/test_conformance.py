"""The adapter conformance suite on every tiny diffusers model (UNet, DiT, PixArt, SD3)."""

import pytest

from tmcore.testing import AdapterConformance

pytest.importorskip("diffusers")


class TestDiffusersAdapterConformance(AdapterConformance):
    adapter = "diffusers"
