"""Real-size throughput: GPT-2 small (124M) and a LLaMA-style model of about 160M, plain vs the engine.

The small bench models are launch-bound on a GPU; the published anchors for
private training (0.83-0.9x of non-private throughput) are on models of this
size and larger. This case measures that regime, built from configs (no
download, no weights):

* ``gpt2-124m``: ``transformers.GPT2Config()`` defaults (12 layers, d=768,
  12 heads, vocabulary 50257), dropout 0;
* ``llama-160m``: ``LlamaConfig`` with 12 layers, d=768, 12 heads, feed-forward
  3072, vocabulary 32000, untied head (162M parameters).

B=16 sequences of T=512 tokens (``--batch-size``, ``--seq-len``), bf16 autocast,
AdamW, one loss per token. Methods: plain PyTorch; the engine at b=1 and b=8,
noise-free and DP (z=1, declared Poisson sampling); Opacus ghost clipping (b=1)
where it runs. Each method: ``--warmup`` steps (attach, layout probe, the first
step's checks), then ``--steps`` timed steps, device-synchronised. Throughput is
tokens per second; the ratio is to plain; peak memory is
``torch.cuda.max_memory_allocated`` over the method's steps (CUDA only).

Run: ``python -m benchmarks.realsize --device cuda --out DIR`` (about 2 minutes
on one H100/H200; ``benchmarks/gpu.sh`` runs it as its ``realsize`` section).
CPU smoke (what the tests run): ``--tiny --device cpu`` (d=32, 2 layers, B=8, T=16).
Writes ``DIR/realsize.md`` (and ``DIR/realsize.json`` with ``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings

import torch
import torch.nn.functional as F

import dp_microclip

from .models import HFWrapper, PerExampleCrossEntropy

MODELS = ("gpt2-124m", "llama-160m")
def per_example_token_mean(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each example's mean token loss, ``(B,)``: with every sequence of the same length, its mean is the plain
    token mean, so the engine rows compute the same loss as plain training."""
    return F.cross_entropy(logits, targets, reduction="none").flatten(1).mean(1)


METHODS = ("plain", "engine b=1", "engine b=8", "DP b=1", "DP b=8", "opacus ghost b=1")


def build(name: str, tiny: bool, seq: int) -> tuple[torch.nn.Module, int]:
    """The model (an ``HFWrapper``: logits ``(B, V, T)``) and its vocabulary size."""
    import transformers as tf

    if name == "gpt2-124m":
        kw = dict(n_embd=32, n_layer=2, n_head=2, vocab_size=128, n_positions=max(seq, 64), bos_token_id=0,
                  eos_token_id=0) if tiny else {}
        cfg = tf.GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **kw)
        return HFWrapper(tf.GPT2LMHeadModel(cfg), lm=True), cfg.vocab_size
    if name == "llama-160m":
        size = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=2, vocab_size=128) if tiny else \
            dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=12, vocab_size=32000)
        cfg = tf.LlamaConfig(max_position_embeddings=max(seq, 64), tie_word_embeddings=False, attention_dropout=0.0,
                             **size)
        return HFWrapper(tf.LlamaForCausalLM(cfg), lm=True), cfg.vocab_size
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_method(method: str, name: str, args, state: dict, batch) -> dict:
    """Warm up and time one method; returns tokens/s, peak memory (MiB) and a note, or the error it raised."""
    device = torch.device(args.device)
    x, y = batch
    model, _ = build(name, args.tiny, args.seq_len)
    model.load_state_dict(state)
    model = model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine, step_model, criterion = None, model, F.cross_entropy
    B = x.shape[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if method.startswith(("engine", "DP")):
            b = int(method.rsplit("=", 1)[1])
            privacy = None
            if method.startswith("DP"):
                privacy = dp_microclip.DP(noise_multiplier=1.0, sample_rate=0.01, expected_batch_size=B,
                                          sampling="poisson", delta=1e-5, accountant="rdp")
            engine = dp_microclip.attach(
                model, opt, micro_batch_size=b, max_grad_norm=1.0, grad_mode=args.grad_mode, privacy=privacy,
                num_groups=B // b if (privacy is not None and b > 1) else None)
        elif method.startswith("opacus"):
            from opacus import PrivacyEngine

            loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x.cpu(), y.cpu()), batch_size=B)
            criterion = PerExampleCrossEntropy()
            step_model, opt, criterion, _ = PrivacyEngine(accountant="rdp").make_private(
                module=model, optimizer=opt, data_loader=loader, noise_multiplier=0.0, max_grad_norm=1.0,
                poisson_sampling=False, grad_sample_mode="ghost", criterion=criterion, loss_reduction="mean",
                batch_first=True)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            if engine is not None:  # one loss per example (mean over its tokens), reduced and checked by the engine
                loss = engine.loss(per_example_token_mean, step_model(x), y)
            else:
                loss = criterion(step_model(x), y)
        loss.backward()
        opt.step()

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(args.warmup):
            step()
        _sync(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        _sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    strategies = ""
    if engine is not None:
        used: dict[str, int] = {}
        for value in (engine.last_strategies or {}).values():
            used[str(value)] = used.get(str(value), 0) + 1
        strategies = ", ".join(f"{k} x{v}" for k, v in sorted(used.items()))
        engine.detach()
    return {"tokens_per_s": B * x.shape[1] * args.steps / seconds, "step_ms": 1e3 * seconds / args.steps,
            "peak_mib": peak, "note": strategies}


def main(argv=None) -> int:
    """Run every model and method, print the markdown table and write it (with JSON) to ``--out``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.realsize", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke: d=32, 2 layers, B=8, T=16, 1+1 steps")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--batch-size", type=int, default=None, help="default 16 (tiny: 8)")
    parser.add_argument("--seq-len", type=int, default=None, help="default 512 (tiny: 16)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 8; tiny: 1)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; tiny: 1)")
    parser.add_argument("--grad-mode", default="bookkeeping", help="the engine's grad_mode (default %(default)s)")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="float32 instead of bf16 autocast")
    parser.add_argument("--budget-s", type=float, default=200.0, help="start no new method after this many seconds")
    parser.add_argument("--out", default="benchmarks/results/gpu")
    parser.add_argument("--json", action="store_true", help="also write realsize.json (gpu.sh does not: 8 files)")
    args = parser.parse_args(argv)
    args.batch_size = args.batch_size or (8 if args.tiny else 16)
    args.seq_len = args.seq_len or (16 if args.tiny else 512)
    args.steps = args.steps or (1 if args.tiny else 8)
    args.warmup = args.warmup or (1 if args.tiny else 3)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    rows: list[dict] = []
    lines = [f"# Real-size throughput ({args.device}{', tiny smoke' if args.tiny else ''})", "",
             f"`python -m benchmarks.realsize --device {args.device}{' --tiny' if args.tiny else ''}`: B={args.batch_size}, "
             f"T={args.seq_len}, {'bf16 autocast' if args.bf16 else 'float32'}, AdamW, grad_mode={args.grad_mode}, "
             f"{args.warmup} warm-up + {args.steps} timed steps per method. Ratio: throughput / plain's.", "",
             "| model | params | method | tokens/s | x plain | step ms | peak MiB | note |",
             "|---|---|---|---|---|---|---|---|"]
    for name in args.models:
        torch.manual_seed(0)
        model, vocab = build(name, args.tiny, args.seq_len)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        count = sum(p.numel() for p in model.parameters())
        params = f"{count / 1e6:.0f}M" if count >= 1e6 else f"{count / 1e3:.0f}K"
        del model
        g = torch.Generator().manual_seed(1)
        x = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=g).to(args.device)
        y = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=g).to(args.device)
        plain = None
        for method in args.methods:
            if time.perf_counter() - t0 > args.budget_s:
                row = {"error": f"skipped: the {args.budget_s:.0f} s budget ran out"}
            else:
                try:
                    row = run_method(method, name, args, state, (x, y))
                except Exception as err:  # a method that cannot run is a result, not a crash
                    row = {"error": " ".join(f"{type(err).__name__}: {err}".split())[:200]}
            row.update(model=name, method=method, params=params)
            if method == "plain" and "tokens_per_s" in row:
                plain = row["tokens_per_s"]
            if "tokens_per_s" in row:
                row["ratio"] = row["tokens_per_s"] / plain if plain else None
                peak = "n/a" if row["peak_mib"] is None else f"{row['peak_mib']:.0f}"
                ratio = "n/a" if row["ratio"] is None else f"{row['ratio']:.2f}x"
                line = (f"| {name} | {params} | {method} | {row['tokens_per_s']:.0f} | {ratio} | "
                        f"{row['step_ms']:.1f} | {peak} | {row['note']} |")
            else:
                line = f"| {name} | {params} | {method} | - | - | - | - | {row['error']} |"
            print(line, flush=True)
            lines.append(line)
            rows.append(row)
            if args.device == "cuda":
                torch.cuda.empty_cache()
            with open(os.path.join(args.out, "realsize.md"), "w") as f:
                f.write("\n".join(lines) + "\n")
            if args.json:
                with open(os.path.join(args.out, "realsize.json"), "w") as f:
                    json.dump({"settings": {k: v for k, v in vars(args).items()}, "rows": rows}, f, indent=2)
    print(f"({time.perf_counter() - t0:.0f} s in all; {os.path.join(args.out, 'realsize.md')})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
