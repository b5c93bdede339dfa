"""Trains the cross-encoder (respcache/cross.py: a LoRA delta on all-MiniLM-L6-v2 and a head on [CLS]) on
the tune split of labelled pairs, in three steps; the held-out split is only scored, never trained on:

    python -m respcache.train_cross prepare --pairs ../shared/data/qqp-dev.jsonl --embeddings-cache emb.npz
    python -m respcache.train_cross train               # on a GPU (torch, transformers): build/cross/out
    python -m respcache.train --pairs ../shared/data/qqp-dev.jsonl --embeddings-cache emb.npz \\
        --cross-logits build/cross/out/logits.npy --out v.npz   # the verifier on top, chosen out of fold

An experiment: the lookup does not run the cross-encoder (docs/caching.md says why).

`prepare` writes, under --workdir, the base weights in float16 (the GPU machine gets no wheel), the
tokenized rows and rows.json: what a lookup sees (each tune `text_b` against its nearest `text_a` of its
fold, as respcache/train.py builds them) and the pairs themselves. `train` fits one cross-encoder per fold on
the other folds and scores that fold (the verifier learns from scores on questions the cross-encoder never
saw, as at serving), then one on every fold: the final one, which also scores the held-out rows so that
its precision can be read before anything else is built on it."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from respcache.cross import HEAD, LORA_TARGETS, MAX_TOKENS, WEIGHTS

WORKDIR = Path("build/cross")
RANK = 16
ALPHA = 32.0


def prepare(args: argparse.Namespace) -> None:
    from safetensors.numpy import load_file, save_file
    from tokenizers import Tokenizer

    from respcache.embedder import model_dir
    from respcache.pairs import bucket, groups, load_pairs, split
    from respcache.train import CANDIDATES, FOLDS, embed_all, nearest

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    tune, held_out = split(load_pairs(args.pairs))
    vec = embed_all([t for p in tune + held_out for t in (p.text_a, p.text_b)], args.embeddings_cache)
    rows: list[dict] = []

    def lookups(part, fold: int) -> None:
        entries = sorted({p.text_a for p in part})
        matrix = np.stack([vec[t] for t in entries])
        queries = np.stack([vec[p.text_b] for p in part])
        seen = set()
        for n, (p, top) in enumerate(zip(part, nearest(matrix, queries, CANDIDATES), strict=True)):
            for rank, i in enumerate(top):
                c = entries[i]
                seen.add((p.text_b, c))
                rows.append({"q": p.text_b, "c": c, "label": int(p.label == 1 and c == p.text_a), "fold": fold,
                             "query": n, "rank": rank, "cos": float(matrix[i] @ vec[p.text_b])})
        if fold >= 0:  # the pairs themselves: Quora's non-duplicates are near misses, the hardest negatives
            for p in part:
                if (p.text_b, p.text_a) not in seen:
                    rows.append({"q": p.text_b, "c": p.text_a, "label": p.label, "fold": fold, "query": -1,
                                 "rank": -1, "cos": float(vec[p.text_a] @ vec[p.text_b])})

    fold_of = [bucket(g, "fold") % FOLDS for g in groups(tune)]
    for f in range(FOLDS):
        lookups([p for p, k in zip(tune, fold_of, strict=True) if k == f], f)
    lookups(held_out, -1)
    tokenizer = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tokenizer.enable_truncation(MAX_TOKENS)
    tokenizer.no_padding()
    encodings = tokenizer.encode_batch([(r["q"], r["c"]) for r in rows])
    lengths = np.array([len(e.ids) for e in encodings])
    np.savez_compressed(
        work / "data.npz", ids=np.concatenate([e.ids for e in encodings]).astype(np.int32),
        types=np.concatenate([e.type_ids for e in encodings]).astype(np.int8),
        offsets=np.concatenate([[0], np.cumsum(lengths)]), label=np.array([r["label"] for r in rows], np.float32),
        fold=np.array([r["fold"] for r in rows], np.int8),
        # Word for word the same text is the metric's false hit but the same question: the verifier's
        # identical-text feature refuses it; the cross-encoder learns only what the words mean.
        trainable=np.array([r["q"].strip().lower() != r["c"].strip().lower() for r in rows]))
    (work / "rows.json").write_text(json.dumps(rows))
    base = load_file(str(model_dir() / "model.safetensors"))
    save_file({k: v.astype(np.float16) for k, v in base.items() if v.dtype == np.float32}, str(work / "base16.safetensors"))
    (work / "config.json").write_text((model_dir() / "config.json").read_text())
    print(f"{len(rows)} rows ({int((np.array([r['fold'] for r in rows]) >= 0).sum())} tune), "
          f"mean length {lengths.mean():.1f} tokens -> {work}")


def train(args: argparse.Namespace) -> None:
    """Needs torch and transformers only (and a GPU to be quick)."""
    import torch
    from safetensors.torch import load_file
    from transformers import BertConfig, BertModel

    work, out = args.workdir, args.out
    out.mkdir(parents=True, exist_ok=True)
    data = np.load(work / "data.npz")
    offsets, ids, types = data["offsets"], data["ids"], data["types"]
    label, fold, trainable = data["label"], data["fold"], data["trainable"]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    config = BertConfig(**json.loads((work / "config.json").read_text()))
    base = {k: v.float() for k, v in load_file(str(work / "base16.safetensors")).items()}

    class LoRA(torch.nn.Module):
        def __init__(self, linear: torch.nn.Linear) -> None:
            super().__init__()
            self.linear = linear
            self.a = torch.nn.Parameter(torch.randn(args.rank, linear.in_features) / args.rank)
            self.b = torch.nn.Parameter(torch.zeros(linear.out_features, args.rank))

        def forward(self, x):
            return self.linear(x) + (torch.nn.functional.dropout(x, 0.1, self.training) @ self.a.T @ self.b.T) * (
                args.alpha / args.rank)

    class Cross(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = BertModel(config, add_pooling_layer=False)
            self.bert.load_state_dict({k: v for k, v in base.items() if not k.startswith("pooler")}, strict=False)
            self.bert.requires_grad_(False)
            self.targets = {}
            for n, layer in enumerate(self.bert.encoder.layer):
                for name in LORA_TARGETS:
                    parent, attr = layer.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1]
                    setattr(parent, attr, LoRA(getattr(parent, attr)))
                    self.targets[f"encoder.layer.{n}.{name}"] = getattr(parent, attr)
            self.dense = torch.nn.Linear(384, 384)  # BERT's classifier: tanh(dense([CLS])), from the pooler
            self.dense.load_state_dict({"weight": base["pooler.dense.weight"], "bias": base["pooler.dense.bias"]})
            self.out = torch.nn.Linear(384, 1)

        def forward(self, i, t, m):
            h = self.bert(input_ids=i, token_type_ids=t, attention_mask=m).last_hidden_state[:, 0]
            return self.out(torch.tanh(self.dense(torch.nn.functional.dropout(h, 0.1, self.training))))[:, 0]

    def batches(rows: np.ndarray, shuffle: bool, rng: np.random.Generator):
        rows = rng.permutation(rows) if shuffle else rows
        chunk = args.batch * 50  # sorted by length within a chunk: little padding, still shuffled
        out = []
        for s in range(0, len(rows), chunk):
            part = rows[s:s + chunk]
            part = part[np.argsort(offsets[part + 1] - offsets[part], kind="stable")]
            out += [part[j:j + args.batch] for j in range(0, len(part), args.batch)]
        for b in (rng.permutation(len(out)) if shuffle else range(len(out))):
            rs = out[b]
            length = int((offsets[rs + 1] - offsets[rs]).max())
            i = np.zeros((len(rs), length), np.int64)
            t = np.zeros((len(rs), length), np.int64)
            m = np.zeros((len(rs), length), np.int64)
            for k, r in enumerate(rs):
                a, z = offsets[r], offsets[r + 1]
                i[k, :z - a], t[k, :z - a], m[k, :z - a] = ids[a:z], types[a:z], 1
            yield rs, *(torch.from_numpy(x).to(dev) for x in (i, t, m))

    def fit(rows: np.ndarray, seed: int) -> Cross:
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        model = Cross().to(dev)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
        total = args.epochs * -(-len(rows) // args.batch)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, s / (0.06 * total)) * max(0.0, 1 - s / total))
        y = torch.from_numpy(label).to(dev)
        model.train()
        for _ in range(args.epochs):
            for rs, i, t, m in batches(rows, True, rng):
                with torch.autocast(dev, dtype=torch.bfloat16):
                    logit = model(i, t, m)
                loss = torch.nn.functional.binary_cross_entropy_with_logits(logit.float(), y[torch.from_numpy(rs).to(dev)])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        return model.eval()

    @torch.no_grad()
    def score(model: Cross, rows: np.ndarray, into: np.ndarray) -> None:
        for rs, i, t, m in batches(rows, False, np.random.default_rng(0)):
            with torch.autocast(dev, dtype=torch.bfloat16):
                into[rs] = model(i, t, m).float().cpu().numpy()

    logits = np.full(len(label), np.nan, np.float32)
    folds = sorted(int(f) for f in set(fold.tolist()) if f >= 0)
    for f in folds + [-1]:
        start = time.perf_counter()
        model = fit(np.nonzero((fold >= 0) & (fold != f) & trainable)[0], seed=f + 1)
        score(model, np.nonzero(fold == f)[0], logits)
        rs = fold == f
        acc = float(((logits[rs] > 0) == (label[rs] > 0.5)).mean())
        print(f"fold {f}: trained in {time.perf_counter() - start:.0f} s, accuracy on its rows {acc:.3f}", flush=True)
    np.save(out / "logits.npy", logits)
    arrays = {}
    for name, mod in model.targets.items():
        arrays[name + ".lora_a"] = mod.a.detach().cpu().numpy().astype(np.float16)
        arrays[name + ".lora_b"] = (mod.b.detach().cpu().numpy() * (args.alpha / args.rank)).astype(np.float16)
    for name, lin in ((HEAD[0], model.dense), (HEAD[1], model.out)):
        arrays[name + ".weight"] = lin.weight.detach().cpu().numpy().astype(np.float16)
        arrays[name + ".bias"] = lin.bias.detach().cpu().numpy().astype(np.float32)
    np.savez_compressed(out / WEIGHTS.name, **arrays)
    print(f"wrote {out / WEIGHTS.name} and {out / 'logits.npy'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="step", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--pairs", required=True)
    p.add_argument("--embeddings-cache", type=Path, default=None)
    p.add_argument("--workdir", type=Path, default=WORKDIR)
    t = sub.add_parser("train")
    t.add_argument("--workdir", type=Path, default=WORKDIR)
    t.add_argument("--out", type=Path, default=WORKDIR / "out")
    t.add_argument("--epochs", type=int, default=3)
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--lr", type=float, default=5e-4)
    t.add_argument("--rank", type=int, default=RANK)
    t.add_argument("--alpha", type=float, default=ALPHA)
    args = ap.parse_args()
    (prepare if args.step == "prepare" else train)(args)


if __name__ == "__main__":
    main()
