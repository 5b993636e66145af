"""The transformers adapter on tiny random-init models of every supported family."""

from __future__ import annotations

import copy

import pytest
import torch

import tmcore
from tmcore import NoAdapterError, TmcoreError, UnsupportedModelError
from tmcore.inputs import split_samples
from tmcore.pooling import mean_pool
from tmcore.registry import registry
from tmcore.testing import tiny_models

tf = pytest.importorskip("transformers")

from tm_transformers.tiny import TEXT_CONFIG  # noqa: E402


def tiny(name: str) -> torch.nn.Module:
    return tiny_models("transformers")[f"transformers:{name}"]()


def inputs_for(model: torch.nn.Module, batch: int = 3, seed: int = 1) -> dict[str, torch.Tensor]:
    """The adapter's example inputs: right-padded sentences of lengths 60, 51, 20, or images."""
    return registry.adapter_for(model).example_inputs(model, batch=batch, seed=seed)


def bert_head(cls: type, **config: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return cls(tf.BertConfig(**{**TEXT_CONFIG, **config})).double().eval()


def installed(name: str) -> bool:
    return name in tmcore.reducers()


# -- what the adapter reports -----------------------------------------------------------------


@pytest.mark.parametrize(
    "name, family, protected, tokens, modality, pool",
    [
        ("bert", "transformers.bert", 1, 64, "text", "avg"),
        ("bert_classifier", "transformers.bert", 1, 64, "text", "token"),
        ("roberta", "transformers.roberta", 1, 64, "text", "avg"),
        ("xlm_roberta_classifier", "transformers.xlm-roberta", 1, 64, "text", "token"),
        ("distilbert", "transformers.distilbert", 1, 64, "text", "avg"),
        ("vit_classifier", "transformers.vit", 1, 65, "vision", "token"),
        ("deit_distilled", "transformers.deit", 2, 66, "vision", "token"),
        ("clip_vision", "transformers.clip", 1, 65, "vision", "token"),
    ],
)
def test_describe(name, family, protected, tokens, modality, pool):
    model = tiny(name)
    info = registry.adapter_for(model).describe(model)
    assert (info.family, info.num_protected, info.num_tokens, info.modality, info.pool) == (
        family,
        protected,
        tokens,
        modality,
        pool,
    )
    assert info.class_token and info.num_layers == 4 and info.dim == 48


def test_flop_model_follows_the_reducer_position():
    model = tiny("clip_vision")
    adapter = registry.adapter_for(model)
    assert adapter.flops(model).position == "attention"
    if installed("pitome"):  # PiToMe reduces after the whole layer on CLIP, as its clip_hf patch
        tmcore.apply(model, "pitome", ratio=0.9)
        assert adapter.flops(model).position == "layer"
    assert (adapter.flops(model).dim, adapter.flops(model).mlp_hidden) == (48, 192)


# -- refusals ---------------------------------------------------------------------------------


def test_unsupported_model_types_are_named():
    torch.manual_seed(0)
    gpt2 = tf.GPT2Model(
        tf.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=10, n_positions=8, bos_token_id=0, eos_token_id=0)
    )
    with pytest.raises(NoAdapterError, match=r"GPT2Model \(model_type 'gpt2'\).*supports transformers encoders: BERT"):
        tmcore.apply(gpt2, "tome", r=1)
    text = tf.CLIPTextModel(tf.CLIPTextConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(NoAdapterError, match="CLIP's text tower is causal"):
        tmcore.apply(text, "tome", r=1)
    decoder = bert_head(tf.BertLMHeadModel, is_decoder=True)
    with pytest.raises(NoAdapterError, match="decoder"):
        tmcore.apply(decoder, "tome", r=1)
    assert all("forward" not in m.__dict__ for m in decoder.modules())


def test_token_heads_need_full_length():
    model = bert_head(tf.BertForTokenClassification, num_labels=4)
    with pytest.raises(UnsupportedModelError, match="full_length=True"):
        tmcore.apply(model, "tome", r=2)
    assert tmcore.get_patch(model) is None


def test_flash_attention_is_refused_at_apply():
    model = tiny("bert")
    model.config._attn_implementation_internal = "flash_attention_2"  # as from_pretrained(attn_implementation=...)
    with pytest.raises(UnsupportedModelError, match=r"'flash_attention_2'.*probabilities.*attn_implementation='sdpa'"):
        tmcore.apply(model, "tome", r=2)
    assert tmcore.get_patch(model) is None and model.config._attn_implementation == "flash_attention_2"


def test_switching_the_attention_after_apply_is_a_clear_error():
    """A reducer reading q / k / probabilities, with the attention routed elsewhere afterwards."""
    model = tiny("bert")
    x = inputs_for(model)
    tmcore.apply(model, "tome", r=2)
    model.set_attn_implementation("eager")
    with pytest.raises(TmcoreError, match=r"dispatches to 'eager'.*attention bias.*tmcore.remove"):
        model(**x)
    tmcore.remove(model)
    assert model.config._attn_implementation == "sdpa"
    if installed("ltmp"):  # reads the attention probabilities
        tmcore.apply(model, "ltmp")
        model.config._attn_implementation_internal = "flash_attention_2"
        with pytest.raises(TmcoreError, match=r"'flash_attention_2'.*nor give the attention probabilities"):
            model(**x)


def test_left_padding_and_4d_masks_are_refused():
    model = tmcore.apply(tiny("bert"), "tome", r=2)
    x = inputs_for(model)
    left = {k: v.flip(1) for k, v in x.items()}
    with pytest.raises(TmcoreError, match="left padding"):
        model(**left)
    mask4d = x["attention_mask"][:, None, None, :].expand(-1, 1, 60, -1)
    with pytest.raises(TmcoreError, match=r"2D \[batch, tokens\] padding mask"):
        model(input_ids=x["input_ids"], attention_mask=mask4d)


# -- attention paths --------------------------------------------------------------------------


def test_attention_interface_is_restored_exactly():
    model = tiny("deit_distilled")
    before = model.config.__dict__.copy()
    tmcore.apply(model, "tome", r=4)
    assert model.config._attn_implementation == "tmcore_sdpa"
    tmcore.remove(model)
    assert model.config.__dict__ == before


def test_sdpa_and_eager_agree(monkeypatch):
    """The fused path (sdpa, with the bias as its mask) and the user's eager choice give the same."""
    x = inputs_for(tiny("bert"))
    outs = []
    for impl in ("sdpa", "eager"):
        model = bert_head(tf.BertModel, attn_implementation=impl)
        tmcore.apply(model, "tome", r=5)
        with torch.no_grad():
            outs.append(model(**x).last_hidden_state)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "reducer, config, fused",
    [("tome", {"r": 4}, True), ("ltmp", {"prune_threshold": 0.004}, False), ("ltmp", {}, True)],
)
def test_fused_attention_unless_the_reducer_reads_the_probabilities(monkeypatch, reducer, config, fused):
    """SDPA stays in use, except where LTMP's prune threshold can fire (it reads the probabilities)."""
    if not installed(reducer):
        pytest.skip(f"{reducer} not installed")
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    calls = []
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "sdpa", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    model = tmcore.apply(tiny("vit_classifier"), reducer, **config)
    with torch.no_grad():
        model(**inputs_for(model))
    assert len(calls) == (4 if fused else 0)


def test_captured_inputs_are_what_the_attention_used(monkeypatch):
    """keys / cls_attn / values as a reducer sees them, from the block's own projections."""
    from tmcore import BaseReducer, bipartite_soft_matching
    from tmcore.registry import Registration, registry

    seen = []

    class Recorder(BaseReducer):
        name = "recorder"
        requires = frozenset({"keys", "cls_attn", "values"})

        def score(self, layer, inputs, state):
            seen.append((inputs.keys, inputs.cls_attn, inputs.values))
            return inputs.keys

        def match(self, layer, scores, state):
            return bipartite_soft_matching(scores, 4, state.num_protected)

    registry.ensure_loaded()
    monkeypatch.setitem(registry.reducers, "recorder", Registration("recorder", Recorder, "tests", "0"))
    model = tmcore.apply(tiny("clip_vision"), "recorder")
    normed = []
    model.encoder.layers[0].layer_norm1.register_forward_hook(lambda m, a, out: normed.append(out))
    with torch.no_grad():
        model(**inputs_for(model))
        attn, y = model.encoder.layers[0].self_attn, normed[0]
        b, n, _ = y.shape
        q, k, v = (p(y).reshape(b, n, 3, 16).transpose(1, 2) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        probs = ((q * attn.scale) @ k.transpose(-1, -2)).softmax(-1)
    keys, cls_attn, values = seen[0]
    torch.testing.assert_close(keys, k.mean(1))
    torch.testing.assert_close(cls_attn, probs[:, :, 0])
    torch.testing.assert_close(values, v)


def test_unpatched_model_sharing_the_config_is_unaffected():
    torch.manual_seed(0)
    config = tf.BertConfig(**TEXT_CONFIG)
    patched, other = tf.BertModel(config).double().eval(), tf.BertModel(config).double().eval()
    assert patched.config is other.config
    x = inputs_for(patched)
    with torch.no_grad():
        ref = other(**x).last_hidden_state
        tmcore.apply(patched, "tome", r=4)
        out = other(**x)
    assert torch.equal(out.last_hidden_state, ref) and "token_sizes" not in out


# -- outputs, padding and pooling -------------------------------------------------------------


def test_outputs_carry_sizes_and_mask_for_mean_pooling():
    model = tiny("bert")
    x = inputs_for(model)
    with torch.no_grad():
        ref = model(**x)
        tmcore.apply(model, "tome", r=0)
        out = model(**x)
    torch.testing.assert_close(out.token_mask, x["attention_mask"], rtol=0, atol=0)
    expected = mean_pool(ref.last_hidden_state, x["attention_mask"])
    torch.testing.assert_close(mean_pool(out.last_hidden_state, out.token_mask, out.token_sizes), expected)
    tmcore.apply(model, "tome", r=4, replace=True)
    with torch.no_grad():
        out = model(**x)
    last = out.to_tuple()[-2:]
    assert out.last_hidden_state.shape[1] < 60 and last[0] is out.token_sizes and last[1] is out.token_mask
    # sizes of real tokens add up to each sentence's length; padding slots weigh nothing
    torch.testing.assert_close((out.token_sizes * out.token_mask).sum(1), x["attention_mask"].sum(1).double())


@pytest.mark.filterwarnings("ignore::tmcore.ScheduleClampWarning")  # r=12 exceeds what 20 tokens allow
@pytest.mark.parametrize("name", ["bert", "distilbert"])  # RoBERTa and XLM-R share the BERT layout
def test_padded_mean_pool_equals_each_sentence_alone(name):
    """Every installed reducer: a padded batch of sentences of different lengths, mean-pooled by
    size over real tokens, equals each sentence run alone, unpadded."""
    model = tiny(name)
    x = inputs_for(model)
    for reg in tmcore.reducers().values():
        if "model" not in getattr(reg.obj, "scopes", {"model"}):  # block scope: diffusion models only
            continue
        for config in reg.obj.example_configs:
            tmcore.apply(model, reg.name, replace=True, **config)
            with torch.no_grad():
                out = model(**x)
                pooled = mean_pool(out.last_hidden_state, out.token_mask, out.token_sizes)
                alone = []
                runtime = tmcore.get_patch(model).runtime
                for i, xi in enumerate(split_samples(x)):
                    with runtime.numbered_from(i if reg.obj.stochastic else 0):  # random baselines draw per sample
                        o = model(**xi)
                    alone.append(mean_pool(o.last_hidden_state, o.token_mask, o.token_sizes))
            torch.testing.assert_close(pooled, torch.cat(alone), rtol=1e-7, atol=1e-9, msg=f"{reg.name} {config}")


def test_full_length_token_heads():
    """Token classification, QA and masked LM get the input length; each position carries its
    group's value; r=0 gives the unpatched outputs (to float64 rounding)."""
    for cls, key, labels in [
        (tf.BertForTokenClassification, "logits", 4),
        (tf.BertForQuestionAnswering, "start_logits", 2),
        (tf.BertForMaskedLM, "logits", 2),
    ]:
        model = bert_head(cls, num_labels=labels)
        x = inputs_for(model)
        with torch.no_grad():
            ref = model(**x)[key]
            tmcore.apply(model, "tome", r=0, full_length=True)
            # not bit for bit: the padded batch's mask reaches SDPA as transformers' own mask
            # unpatched and as tmcore's bias patched, which can take another kernel on another CPU
            torch.testing.assert_close(model(**x)[key], ref, rtol=0, atol=1e-12, msg=cls.__name__)
            tmcore.apply(model, "tome", r=5, full_length=True, replace=True)
            with tmcore.trace(model) as t:
                full = model(**x)[key]
        assert full.shape == ref.shape, cls.__name__
        assert (t.token_counts[-1] < t.token_counts[0]).all(), cls.__name__
    # the head at input position i sees the reduced token its group became
    model = bert_head(tf.BertForTokenClassification, num_labels=4)
    with torch.no_grad():
        tmcore.apply(model.bert, "tome", r=5)
        with tmcore.trace(model.bert) as t:
            reduced = model.classifier(model.bert(**x).last_hidden_state)
        tmcore.remove(model.bert)
        tmcore.apply(model, "tome", r=5, full_length=True)
        full = model(**x).logits
    real = x["attention_mask"].bool()
    gathered = reduced.gather(1, t.source.clamp(min=0).unsqueeze(-1).expand(-1, -1, 4))
    torch.testing.assert_close(full[real], gathered[real])


def test_full_length_vision_keeps_unmerged_tokens():
    model = tiny("vit_classifier")
    x = inputs_for(model)
    tmcore.apply(model, "tome", r=0, full_length=True)
    with torch.no_grad():
        ref = model.vit(**x).last_hidden_state
        tmcore.apply(model, "tome", r=3, full_length=True, replace=True)
        out = model.vit(**x)
    assert out.last_hidden_state.shape == ref.shape
    assert torch.equal(out.token_sizes, torch.ones(3, 65, dtype=torch.float64))


def test_clip_model_patches_its_vision_tower():
    torch.manual_seed(0)
    vision = dict(
        hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3, image_size=32, patch_size=4
    )
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=50)
    clip = tf.CLIPModel(tf.CLIPConfig(text_config=text, vision_config=vision)).double().eval()
    tower = copy.deepcopy(clip.vision_model)
    pixels = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    ids = torch.randint(5, 50, (2, 7))
    with torch.no_grad():
        text_ref = clip.get_text_features(input_ids=ids).pooler_output
        tmcore.apply(clip, "tome", r=4)
        tmcore.apply(tower, "tome", r=4)
        with tmcore.trace(clip) as t:
            image = clip.get_image_features(pixel_values=pixels)
        torch.testing.assert_close(
            image.pooler_output, clip.visual_projection(tower(pixel_values=pixels).pooler_output)
        )
        assert torch.equal(clip.get_text_features(input_ids=ids).pooler_output, text_ref)
    assert t.token_counts == [65, 61, 57] and image.token_sizes.shape == (2, 57)


def test_deepcopy_keeps_its_own_padding_state():
    model = tmcore.apply(tiny("roberta"), "tome", r=4)
    clone = copy.deepcopy(model)
    x = inputs_for(model)
    with torch.no_grad():
        a, b = model(**x), clone(**x)
    torch.testing.assert_close(a.last_hidden_state, b.last_hidden_state, rtol=0, atol=0)
    tmcore.remove(clone)
    assert clone.config._attn_implementation == "sdpa" and model.config._attn_implementation == "tmcore_sdpa"
