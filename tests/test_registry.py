"""Plugin discovery through real entry points: distributions written as ``*.dist-info`` folders
on ``sys.path``, exactly what ``pip install`` leaves behind, found by ``importlib.metadata``."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

import tmcore
from tmcore import PluginError, PluginLoadWarning, UnknownReducerError
from tmcore.reducer import CONTRACT_ATTRIBUTES, CONTRACT_METHODS, TokenReducer, check_reducer
from tmcore.registry import registry

THIRD_PARTY = '''
import tmcore
from tmcore import BaseReducer, Plan, ReducerConfig
from pydantic import Field


class KeepFirstConfig(ReducerConfig):
    keep: int = Field(ge=1, description="tokens kept")


class KeepFirst(BaseReducer):
    """A do-nothing reducer with a config, for discovery tests."""

    name = "keep_first"
    config_model = KeepFirstConfig
    requires = frozenset()
    merge_only = False

    def score(self, layer, inputs, state):
        return None

    def match(self, layer, scores, state):
        return None


@tmcore.hookimpl
def tmcore_register_reducers(register):
    register(KeepFirst)
'''


def _install(site: Path, dist: str, module: str, source: str, entry: str | None = None) -> None:
    """Write a minimal installed distribution: a module plus its dist-info with an entry point."""
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / f"{dist.replace('-', '_')}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(f"[tmcore]\n{entry or module} = {module}\n")


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    monkeypatch.undo()
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", "")).startswith(str(tmp_path)):
            del sys.modules[name]
    registry.reload()


def test_third_party_plugin_is_discovered(site):
    _install(site, "tm-keep-first", "tm_keep_first", THIRD_PARTY)
    registry.reload()
    by_name = tmcore.reducers()
    assert by_name["keep_first"].distribution == "tm-keep-first"
    assert by_name["keep_first"].version == "1.2.3"
    assert "tome" in by_name
    plugin = tmcore.plugins()["tm-keep-first"]
    assert plugin.reducers == ["keep_first"] and plugin.error is None


def test_broken_plugin_is_skipped_with_a_warning(site):
    _install(site, "tm-broken", "tm_broken", "raise RuntimeError('boom at import')\n")
    _install(site, "tm-keep-first", "tm_keep_first", THIRD_PARTY)
    with pytest.warns(PluginLoadWarning, match=r"tm-broken 1\.2\.3.*RuntimeError: boom at import"):
        registry.reload()
    names = set(tmcore.reducers())
    assert {"keep_first", "tome"} <= names
    assert tmcore.plugins()["tm-broken"].error == "RuntimeError: boom at import"


def test_plugin_whose_hook_raises_is_skipped(site):
    source = "import tmcore\n\n@tmcore.hookimpl\ndef tmcore_register_reducers(register):\n    raise KeyError('nope')\n"
    _install(site, "tm-raises", "tm_raises", source)
    with pytest.warns(PluginLoadWarning, match="tm-raises"):
        registry.reload()
    assert "tome" in tmcore.reducers()


def test_duplicate_name_names_both_distributions(site):
    source = (
        "import tmcore\nfrom tm_tome import ToMe\n\n"
        "@tmcore.hookimpl\ndef tmcore_register_reducers(register):\n    register(ToMe)\n"
    )
    _install(site, "tm-tome-fork", "tm_tome_fork", source)
    with pytest.raises(
        PluginError, match=r"'tome' is registered twice: by tm-tome 0\.1\.0 .* and by tm-tome-fork 1\.2\.3"
    ):
        registry.reload()


def test_invalid_registration_fails_loudly(site):
    source = "import tmcore\n\n@tmcore.hookimpl\ndef tmcore_register_reducers(register):\n    register(object)\n"
    _install(site, "tm-bad", "tm_bad", source)
    with pytest.raises(PluginError, match="tm-bad registered an invalid reducer"):
        registry.reload()


def test_env_selects_and_disables_distributions(site, monkeypatch):
    _install(site, "tm-keep-first", "tm_keep_first", THIRD_PARTY)
    monkeypatch.setenv("TMCORE_PLUGINS", "tm_keep_first,tm-timm")
    registry.reload()
    assert set(tmcore.reducers()) == {"keep_first"}
    assert set(tmcore.adapters()) == {"timm"}
    monkeypatch.delenv("TMCORE_PLUGINS")
    monkeypatch.setenv("TMCORE_DISABLE_PLUGINS", "tm-keep-first")
    registry.reload()
    assert "keep_first" not in tmcore.reducers()
    assert "tome" in tmcore.reducers()


def test_unknown_reducer_lists_installed_and_pip_name(monkeypatch):
    registry.ensure_loaded()
    monkeypatch.delitem(registry.reducers, "tomecis")  # as if tm-tomecis were not installed
    with pytest.raises(UnknownReducerError) as err:
        tmcore.apply(object(), "tomecis", k=2)
    msg = str(err.value)
    assert "unknown reducer 'tomecis'" in msg and "tome (tm-tome)" in msg and "pip install tm-tomecis" in msg
    with pytest.raises(UnknownReducerError, match="Did you mean 'tome'"):
        tmcore.apply(object(), "tomee", r=1)


def test_env_names_that_match_nothing_are_reported(site, monkeypatch):
    monkeypatch.setenv("TMCORE_PLUGINS", "tm-tome,tm-timm,tm-nosuch")
    with pytest.warns(PluginLoadWarning, match=r"TMCORE_PLUGINS names tm-nosuch, which matches no installed"):
        registry.reload()
    assert set(tmcore.reducers()) == {"tome"}
    monkeypatch.delenv("TMCORE_PLUGINS")
    monkeypatch.setenv("TMCORE_DISABLE_PLUGINS", "tm-tomecis,tm_typo")
    with pytest.warns(PluginLoadWarning, match=r"TMCORE_DISABLE_PLUGINS names tm-typo"):
        registry.reload()


def test_a_disabled_reducer_is_told_apart_from_a_missing_one(site, monkeypatch):
    monkeypatch.setenv("TMCORE_PLUGINS", "tm-tome,tm-timm")
    registry.reload()
    with pytest.raises(UnknownReducerError) as err:
        tmcore.apply(object(), "pitome", ratio=0.9)
    msg = str(err.value)
    assert "tm-pitome, which is installed but not loaded: not in TMCORE_PLUGINS=tm-tome,tm-timm" in msg, msg
    assert "pip install tm-pitome" not in msg
    with pytest.raises(UnknownReducerError, match=r"Installed but not loaded: .*tm-ltmp \(not in TMCORE_PLUGINS"):
        tmcore.apply(object(), "nosuch")
    monkeypatch.delenv("TMCORE_PLUGINS")
    monkeypatch.setenv("TMCORE_DISABLE_PLUGINS", "tm-ppt")
    registry.reload()
    with pytest.raises(
        UnknownReducerError, match=r"installed but not loaded: disabled by TMCORE_DISABLE_PLUGINS=tm-ppt"
    ):
        tmcore.apply(object(), "ppt")


def _model_from(module: str) -> object:
    """An instance of a module-less model class that says it comes from ``module``."""
    import torch

    return type("SomeModel", (torch.nn.Module,), {"__module__": module})()


def test_no_adapter_hints_at_the_models_own_library(site, monkeypatch):
    """A BERT user is not told to install timm: the hint follows the library the class comes from."""
    hints = {
        "transformers.models.fancy": "SomeModel is not among the transformers families tm-transformers supports",
        "timm.models.convnext": "SomeModel is not among the timm families tm-timm supports",
        "mylab.nets": "mylab models need an adapter of their own: tmcore new-plugin NAME --adapter",
    }
    for module, hint in hints.items():
        with pytest.raises(tmcore.NoAdapterError) as err:
            tmcore.apply(_model_from(module), "tome", r=2)
        assert hint in str(err.value) and "tmcore[timm]" not in str(err.value), str(err.value)
    monkeypatch.setenv("TMCORE_DISABLE_PLUGINS", "tm-transformers")
    registry.reload()
    with pytest.raises(tmcore.NoAdapterError, match="tm-transformers is installed but not loaded: disabled by"):
        tmcore.apply(_model_from("transformers.models.bert.modeling_bert"), "tome", r=2)


@pytest.mark.parametrize("name", [None, 3, ["tome"], b"tome"])
def test_a_reducer_name_that_is_not_a_string(name):
    with pytest.raises(UnknownReducerError, match=r"allowed: a registered reducer name, a string: .*tome \(tm-tome\)"):
        tmcore.apply(object(), name)


def _conforming_members() -> dict:
    """Every member of the reducer contract, taken from a real reducer (not a BaseReducer subclass,
    so that leaving one out really leaves it out)."""
    from tm_tome import ToMe

    return {name: getattr(ToMe, name) for name in (*CONTRACT_ATTRIBUTES, *CONTRACT_METHODS)}


def test_the_protocol_names_the_whole_contract():
    members = set(TokenReducer.__annotations__) | {n for n in vars(TokenReducer) if not n.startswith("_")}
    assert set(CONTRACT_ATTRIBUTES) | set(CONTRACT_METHODS) <= members
    assert check_reducer(type("Complete", (), _conforming_members())) == []


@pytest.mark.parametrize("member", [m for m in (*CONTRACT_ATTRIBUTES, *CONTRACT_METHODS) if m != "name"])
def test_a_reducer_missing_part_of_the_contract_is_refused_at_load_naming_it(member, site):
    source = (
        "import tmcore\nfrom tm_tome import ToMe\n\n"
        f"members = {{k: getattr(ToMe, k) for k in {list(_conforming_members())!r} if k != {member!r}}}\n"
        "Partial = type('Partial', (), {**members, 'name': 'partial'})\n\n"
        "@tmcore.hookimpl\ndef tmcore_register_reducers(register):\n    register(Partial)\n"
    )
    _install(site, "tm-partial", "tm_partial", source)
    with pytest.raises(PluginError, match=rf"tm-partial registered an invalid reducer .*{member}"):
        registry.reload()


def test_a_reducer_with_a_wrong_attribute_type_is_refused():
    bad = type("Bad", (), {**_conforming_members(), "position": "mlp", "example_configs": [{"r": 1}]})
    problems = check_reducer(bad)
    assert any("`position` must be one of ['attention', 'layer', 'start']" in p for p in problems), problems
    assert any("`example_configs` must be a tuple of config dicts" in p for p in problems), problems


def test_an_adapter_must_implement_the_family_methods(site):
    source = (
        "import tmcore\n\nclass Half(tmcore.Adapter):\n    name = 'half'\n\n"
        "    @classmethod\n    def handles(cls, model):\n        return False\n\n"
        "@tmcore.hookimpl\ndef tmcore_register_adapters(register):\n    register(Half)\n"
    )
    _install(site, "tm-half", "tm_half", source)
    with pytest.raises(PluginError, match=r"does not implement describe\(\), blocks\(\), patch_block\(\), flops\(\)"):
        registry.reload()


def test_listings_are_mappings_by_name():
    reducers, adapters, plugins = tmcore.reducers(), tmcore.adapters(), tmcore.plugins()
    assert "tome" in reducers and reducers["tome"].distribution == "tm-tome"
    assert list(reducers) == sorted(reducers) and "timm" in adapters
    assert plugins["tm-tome"].reducers == ["tome"] and plugins["tm-timm"].adapters == ["timm"]
    with pytest.raises(TypeError):
        reducers["x"] = reducers["tome"]  # read-only views


def test_every_hook_spec_is_in_the_contributing_hook_reference():
    import inspect
    from pathlib import Path

    from tmcore import hookspecs

    text = (Path(__file__).parents[1] / "CONTRIBUTING.md").read_text()
    reference = text[text.index("### Hook reference") :].split("\n## ")[0]
    specs = [n for n, f in vars(hookspecs).items() if inspect.isfunction(f) and hasattr(f, "tmcore_spec")]
    assert specs, "no hook specs found"
    for name in specs:
        params = ", ".join(inspect.signature(getattr(hookspecs, name)).parameters)
        assert f"`{name}({params})`" in reference, f"hook spec {name}({params}) is missing from the hook reference"
