"""The adapter conformance suite on every tiny transformers model."""

import pytest

from tmcore.testing import AdapterConformance

pytest.importorskip("transformers")


class TestTransformersAdapterConformance(AdapterConformance):
    adapter = "transformers"
