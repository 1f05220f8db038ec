"""Speech: spoken-digit recognition on espeak-ng voices (synthetic speech), speaker-independent split.

    python -m experiments.speech [--seeds 10] [--tune-seeds 2] [--quick]

Data: ten digit words synthesised offline by espeak-ng in 20 voice variants x 3
speeds x 2 pitches, with random shifts and 20 dB white noise; 32-bin log-mel
features computed with torch (no torchaudio). Train on 14 voices, tune on 3
others, test on 3 more (unseen speakers); every seed draws which voices go
where (:func:`voice_split`). Model: a small 1-D CNN over time.
Plain SGD against fixed and adaptive micro-batch clipping at b in {1, 8, 64} (C = 1),
each tuned on validation with tuning seeds 1000, 1001, scored over paired
reporting seeds 0..n-1. Adaptive at b = 64 = B is plain SGD (one micro-batch is
scaled by its own norm over itself, 1): with the same learning rate it is the
comparison's built-in null. Synthetic speech: no claim here is about human speech.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dp_microclip.tools.sweep import SweepSettings

from .common import run_sweep, setup, write_summary
from .speechdata import N_MELS, VOICES, spoken_digits


def speech_cnn() -> nn.Module:
    """Two Conv1d layers over the 100 frames of 32 mel bins, average over time, a linear head."""
    return nn.Sequential(
        nn.Conv1d(N_MELS, 32, 5, padding=2), nn.ReLU(), nn.MaxPool1d(2),
        nn.Conv1d(32, 48, 5, padding=2), nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(48, 10))


def voice_split(data: dict, seed: int) -> tuple:
    """Seed ``seed``'s ``(train, val, test)``: the 20 voices of ``spoken_digits()`` dealt 14/3/3 at random, features
    standardised per mel bin with that training split's mean and std."""
    x = torch.cat([data[k][0] for k in ("train", "val", "test")])
    y = torch.cat([data[k][1] for k in ("train", "val", "test")])
    per_voice = len(y) // len(VOICES)  # clips are stored voice by voice, in VOICES order (SPLIT keeps that order)
    order = np.random.default_rng(seed).permutation(len(VOICES))
    groups = (order[:14], order[14:17], order[17:])
    parts = [torch.cat([torch.arange(v * per_voice, (v + 1) * per_voice) for v in g]) for g in groups]
    mean, std = x[parts[0]].mean(dim=(0, 2), keepdim=True), x[parts[0]].std(dim=(0, 2), keepdim=True)
    return tuple(((x[i] - mean) / std, y[i]) for i in parts)


def main(argv=None) -> None:
    args = setup(__doc__.split("\n\n")[0], argv, lambda p: p.add_argument("--epochs", type=int, default=10))
    out = Path(args.out)
    start = time.perf_counter()
    data = spoken_digits()
    epochs = 5 if args.quick else args.epochs
    settings = SweepSettings(methods=("plain", "fixed", "adaptive"), micro_batch_sizes=(1, 8, 64),
                             seeds=tuple(range(args.seeds)), learning_rates=(0.01, 0.03, 0.1, 0.3, 1.0, 3.0),
                             tune_seeds=args.tune_seeds, max_grad_norms=(1.0,), batch_size=64, epochs=epochs,
                             name="speech-espeak-digits-voices-per-seed")
    result, seconds = run_sweep(speech_cnn, lambda seed: voice_split(data, seed), None, None, settings, out,
                                "speech-sweep", progress=not args.no_progress)
    rows = {(r["method"], r["b"]): r for r in result.table()}
    null = rows.get(("adaptive", 64))
    null_text = "" if null is None else (
        f"Built-in null: adaptive b=64 is plain SGD; at lr {null['lr']:g} (plain's: {rows[('plain', None)]['lr']:g}) it "
        f"scores {100 * null['diff_vs_plain']:+.2f} [{100 * null['diff_ci_low']:+.2f}, {100 * null['diff_ci_high']:+.2f}] "
        f"points against plain (per seed {', '.join(f'{100 * (a - b):+.1f}' for a, b in zip(null['test_per_seed'], rows[('plain', None)]['test_per_seed']))}): "
        "the spread a difference with no method effect shows here.\n\n")
    total = time.perf_counter() - start
    text = (f"espeak-ng spoken digits (synthetic), {len(VOICES)} voices dealt anew for every seed into 14 train, "
            f"3 val and 3 test voices (unseen speakers); {len(data['train'][1])}/"
            f"{len(data['val'][1])}/{len(data['test'][1])} clips; 1-D CNN on 32 log-mel bins; SGD momentum 0.9, "
            f"batch 64, {epochs} epochs, {args.seeds} paired reporting seeds, {args.tune_seeds} tuning seeds, one CPU thread; this invocation took {total:.0f} s (runs already in the store are read back, not retrained) "
            f"(synthesis cached).\n\n{null_text}{result.to_markdown()}\n\n![](speech-sweep-vs-b.png)\n")
    write_summary(out, "speech", "Speech: spoken digits (espeak-ng)", text,
                  {"table": result.table(), "seconds": total, "voices": VOICES})
    print(text)


if __name__ == "__main__":
    main()
