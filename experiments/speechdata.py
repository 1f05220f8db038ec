"""Spoken digits synthesised offline with espeak-ng over several voices, as log-mel features (numpy/torch only).

It is synthetic speech: every result on it is a result on espeak-ng voices, not on human speakers.
Needs ``apt-get install -y espeak-ng`` (no torchaudio, no download). Clips are cached under
``~/.cache/dp-microclip/`` (about 10 MB), so only the first call synthesises (about a minute).
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import wave
from pathlib import Path

import numpy as np
import torch

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: espeak-ng voice variants (en + variant): train on the first 14, validate on the next 3, test on the last 3.
VOICES = ("m1", "m2", "m3", "m4", "m5", "f1", "f2", "f3", "croak", "klatt", "adam", "steph", "linda", "max",
          "m6", "f4", "whisper", "m7", "f5", "klatt2")
SPLIT = {"train": VOICES[:14], "val": VOICES[14:17], "test": VOICES[17:]}
SPEEDS, PITCHES = (130, 160, 190), (35, 65)
RATE, N_FFT, HOP, N_MELS, FRAMES = 22050, 512, 220, 32, 100


def _mel_filters(n_mels=N_MELS, n_fft=N_FFT, rate=RATE, fmin=60.0, fmax=8000.0) -> torch.Tensor:
    """Triangular mel filterbank ``(n_mels, n_fft // 2 + 1)`` (HTK mel scale)."""
    mel = lambda f: 2595 * np.log10(1 + f / 700)  # noqa: E731
    inv = lambda m: 700 * (10 ** (m / 2595) - 1)  # noqa: E731
    points = inv(np.linspace(mel(fmin), mel(fmax), n_mels + 2))
    freqs = np.linspace(0, rate / 2, n_fft // 2 + 1)
    fb = np.zeros((n_mels, len(freqs)))
    for i in range(n_mels):
        lo, mid, hi = points[i:i + 3]
        fb[i] = np.clip(np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)), 0, None)
    return torch.tensor(fb, dtype=torch.float32)


def log_mel(signal: np.ndarray) -> torch.Tensor:
    """``(N_MELS, FRAMES)`` log-mel spectrogram of a mono float signal, padded or cut to 1 s."""
    x = torch.from_numpy(signal.astype(np.float32))
    x = torch.cat([x[:1], x[1:] - 0.97 * x[:-1]])  # pre-emphasis
    spec = torch.stft(x, N_FFT, HOP, window=torch.hann_window(N_FFT), return_complex=True).abs().square()
    mel = torch.log(_mel_filters() @ spec + 1e-6)
    out = torch.full((N_MELS, FRAMES), float(np.log(1e-6)))
    n = min(FRAMES, mel.shape[1])
    out[:, :n] = mel[:, :n]
    return out


def _synth(word: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    raw = subprocess.run(["espeak-ng", "-v", f"en+{voice}", "-s", str(speed), "-p", str(pitch), "--stdout", word],
                         check=True, capture_output=True).stdout
    with wave.open(io.BytesIO(raw)) as w:
        frames = w.readframes(w.getnframes())
    return np.frombuffer(frames, dtype=np.int16).astype(np.float32) / 32768.0


def spoken_digits(seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{"train", "val", "test"} -> (features (N, 32, 100), digit labels)``, split by voice.

    Each clip gets a random shift (0-100 ms of leading silence) and white noise at 20 dB SNR,
    drawn from ``seed`` (deterministic). Features are standardised per mel bin with the
    training split's mean and std.

    Raises:
        SystemExit: with the install command when espeak-ng is missing.
    """
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dp-microclip" / f"spoken-digits-{seed}.pt"
    if cache.exists():
        return torch.load(cache)
    if shutil.which("espeak-ng") is None:
        raise SystemExit("espeak-ng is not installed: `apt-get install -y espeak-ng` (the speech data is synthesised "
                         "offline with it).")
    rng = np.random.default_rng(seed)
    parts = {}
    for split, voices in SPLIT.items():
        feats, labels = [], []
        for voice in voices:
            for label, word in enumerate(WORDS):
                for speed in SPEEDS:
                    for pitch in PITCHES:
                        s = _synth(word, voice, speed, pitch)
                        s = np.concatenate([np.zeros(int(rng.integers(0, RATE // 10)), np.float32), s])
                        power = float(np.mean(s ** 2)) + 1e-12
                        s = s + rng.normal(0, np.sqrt(power / 100), len(s)).astype(np.float32)
                        feats.append(log_mel(s))
                        labels.append(label)
        parts[split] = (torch.stack(feats), torch.tensor(labels))
    mean = parts["train"][0].mean(dim=(0, 2), keepdim=True)
    std = parts["train"][0].std(dim=(0, 2), keepdim=True)
    parts = {k: ((x - mean) / std, y) for k, (x, y) in parts.items()}
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(parts, cache)
    return parts


def pooled(x: torch.Tensor) -> torch.Tensor:
    """``(N, 64)``: mean and std over time of each mel bin (the speech side of the domain mix)."""
    return torch.cat([x.mean(2), x.std(2)], dim=1)
