"""Patched models under ``torch.compile`` as users run them: recompiles (batch sizes, a second
model), threads sharing one compiled model, and inductor itself. The per-reducer checks (one graph
with ``fullgraph=True``, eager's outputs and trace, no host sync) are in the conformance suite."""

from __future__ import annotations

import threading
import warnings

import pytest
import torch
import torch._dynamo.utils

import tmcore
from tmcore.registry import registry
from tmcore.testing import run, tiny_models
from tmcore.testing.conformance import compile_counting_graphs

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

MODELS = ["timm:vit", "transformers:bert"]  # one model per adapter: images, and padded text


def _installed(name: str) -> None:
    if name not in tiny_models():
        pytest.skip(f"{name.split(':')[0]} is not installed")


def _graphs_for(name: str, patched: bool, batches: list[int], models: int = 1) -> int:
    """Graphs dynamo compiles for ``models`` fresh models run at ``batches`` (one cache)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for _ in range(models):
        model = tiny_models()[name]()
        if patched:
            tmcore.apply(model, "tome", r=3)
        compiled = torch.compile(model, backend="aot_eager")
        for batch in batches:
            with torch.no_grad():
                run(compiled, registry.adapter_for(model).example_inputs(model, batch=batch))
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("name", MODELS)
def test_new_batch_sizes_cost_one_recompile_and_a_second_model_none(name):
    """As for the unpatched model: the second batch size makes the batch dimension dynamic (one
    recompile), later sizes reuse it; a second model patched the same way reuses the first's
    graphs (the patch travels on the modules, which dynamo guards by value)."""
    _installed(name)
    for patched in (False, True):
        assert _graphs_for(name, patched, [3, 5, 7, 4, 3]) == 2, (name, patched)
        assert _graphs_for(name, patched, [3], models=3) == 1, (name, patched)


@pytest.mark.parametrize("name", MODELS)
def test_threads_share_one_compiled_model(name):
    _installed(name)
    model = tmcore.apply(tiny_models()[name](), "tome", r=3)
    adapter = registry.adapter_for(model)
    inputs = [adapter.example_inputs(model, seed=s) for s in range(4)]
    with torch.no_grad():
        expected = [run(model, x) for x in inputs]
        compiled, graphs = compile_counting_graphs(model)
        run(compiled, inputs[0])
    results: dict[int, list[torch.Tensor]] = {i: [] for i in range(4)}
    barrier = threading.Barrier(4)

    def work(i: int) -> None:
        with torch.no_grad():
            for _ in range(5):
                barrier.wait()
                results[i].append(run(compiled, inputs[i]))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i in range(4):
        assert len(results[i]) == 5
        for out in results[i]:
            torch.testing.assert_close(out, expected[i], rtol=1e-9, atol=1e-9)
    assert len(graphs) == 1, "other threads recompiled"


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("reducer", ["tome", "pitome"])
def test_inductor_fullgraph_equals_eager(name, reducer):
    """The default backend, generated kernels included (float64: to 1e-9)."""
    _installed(name)
    model = tmcore.apply(tiny_models()[name](), reducer, **registry.get_reducer(reducer).obj.example_configs[0])
    x = registry.adapter_for(model).example_inputs(model)
    torch._dynamo.reset()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = run(model, x)
        out = run(torch.compile(model, fullgraph=True), x)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


def test_per_shape_caches_eagerly_and_traces_silently():
    from tmcore.compiling import per_shape

    calls: list[int] = []

    @per_shape(maxsize=8)
    def half(n: int) -> int:
        calls.append(n)
        return n // 2

    assert [half(6), half(6), half(8)] == [3, 3, 4] and calls == [6, 8]
    assert half.cache_info().hits == 1
    compiled = torch.compile(lambda x: x[:, : half(x.shape[1])], fullgraph=True, backend="aot_eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # dynamo warns on every lru_cache it meets
        assert compiled(torch.ones(2, 10)).shape == (2, 5)


def test_a_schedule_capped_for_a_new_length_warns_without_breaking_the_graph():
    """The cap for a length first seen in the forward warns from inside the compiled graph."""
    _installed("transformers:bert")
    from tmcore.errors import ScheduleClampWarning

    model = tiny_models()["transformers:bert"]()
    with pytest.warns(ScheduleClampWarning):
        tmcore.apply(model, "tome", r=30)
    inputs = registry.adapter_for(model).example_inputs(model)
    short = {k: v[:, :20] for k, v in inputs.items()}
    with torch.no_grad():
        ref = run(model, short)
        compiled, graphs = compile_counting_graphs(model, fullgraph=True)
        with pytest.warns(ScheduleClampWarning, match=r"lengths of a compiled graph .* block 0 \(r=30\)"):
            out = run(compiled, short)
    assert len(graphs) == 1
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


def _text(length: int, batch: int = 3) -> dict[str, torch.Tensor]:
    ids = torch.randint(5, 40, (batch, length), generator=torch.Generator().manual_seed(length))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, length // 2 :] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize(
    ("reducer", "config", "graphs"),
    [
        (None, {}, 2),
        ("tome", {"r": 2}, 2),
        ("ppt", {"layers": [1, 2]}, 2),  # r=8 is capped at these lengths: the warning must not specialise
        ("topk", {"keep_rate": 0.7}, 2),
        ("pitome", {"ratio": 0.9}, 4),  # padded_bounds: static sizes per length, as documented
    ],
)
def test_new_text_lengths_cost_one_recompile_except_pitome_padded(reducer, config, graphs):
    """Padded text at lengths 16, 24, 32, 20: the second length makes the length dynamic, as for
    the unpatched model; PiToMe's padded plan has a static size per length (README: pad to a
    multiple), one graph each."""
    _installed("transformers:bert")
    model = tiny_models()["transformers:bert"]()
    if reducer:
        tmcore.apply(model, reducer, **config)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for length in (16, 24, 32, 20):
            torch.testing.assert_close(run(compiled, _text(length)), run(model, _text(length)), rtol=1e-9, atol=1e-9)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
