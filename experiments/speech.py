"""Speech: spoken-digit recognition on espeak-ng voices (synthetic speech), speaker-independent split.

    python -m experiments.speech [--seeds 5] [--quick]

Data: ten digit words synthesised offline by espeak-ng in 20 voice variants x 3
speeds x 2 pitches, with random shifts and 20 dB white noise; 32-bin log-mel
features computed with torch (no torchaudio). Train on 14 voices, tune on 3
others, test on 3 more (unseen speakers). Model: a small 1-D CNN over time.
Plain SGD against fixed and adaptive micro-batch clipping at b in {1, 8, 64} (C = 1),
each tuned on validation, paired seeds. Synthetic speech: no claim here is about
human speech.
"""

from __future__ import annotations

import time
from pathlib import Path

from torch import nn

from dp_microclip.tools.sweep import SweepSettings

from .common import run_sweep, setup, write_summary
from .speechdata import N_MELS, SPLIT, spoken_digits


def speech_cnn() -> nn.Module:
    """Two Conv1d layers over the 100 frames of 32 mel bins, average over time, a linear head."""
    return nn.Sequential(
        nn.Conv1d(N_MELS, 32, 5, padding=2), nn.ReLU(), nn.MaxPool1d(2),
        nn.Conv1d(32, 48, 5, padding=2), nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(48, 10))


def main(argv=None) -> None:
    args = setup(__doc__.split("\n\n")[0], argv, lambda p: p.add_argument("--epochs", type=int, default=10))
    out = Path(args.out)
    start = time.perf_counter()
    data = spoken_digits()
    epochs = 5 if args.quick else args.epochs
    settings = SweepSettings(methods=("plain", "fixed", "adaptive"), micro_batch_sizes=(1, 8, 64),
                             seeds=tuple(range(args.seeds)), learning_rates=(0.01, 0.03, 0.1, 0.3, 1.0, 3.0), tune_seeds=2,
                             max_grad_norms=(1.0,), batch_size=64, epochs=epochs, name="speech-espeak-digits")
    result, seconds = run_sweep(speech_cnn, data["train"], data["val"], data["test"], settings, out, "speech-sweep",
                                progress=not args.no_progress)
    total = time.perf_counter() - start
    text = (f"espeak-ng spoken digits (synthetic), train voices {', '.join(SPLIT['train'])}; val "
            f"{', '.join(SPLIT['val'])}; test {', '.join(SPLIT['test'])}; {len(data['train'][1])}/"
            f"{len(data['val'][1])}/{len(data['test'][1])} clips; 1-D CNN on 32 log-mel bins; SGD momentum 0.9, "
            f"batch 64, {epochs} epochs, {args.seeds} paired seeds, one CPU thread; this invocation took {total:.0f} s (runs already in the store are read back, not retrained) "
            f"(synthesis cached).\n\n{result.to_markdown()}\n\n![](speech-sweep-vs-b.png)\n")
    write_summary(out, "speech", "Speech: spoken digits (espeak-ng)", text,
                  {"table": result.table(), "seconds": total, "voices": SPLIT})
    print(text)


if __name__ == "__main__":
    main()
