"""`POST /spectrogram`: a WAV file in, its short-time Fourier transform as a PNG out.

    bentoml serve pipelines.serving.audio:Spectrogram --port 3000     (make serve-spectrogram)

The audio example users of function-style deployments know, as a small service of its own: it
needs no model. The spectrogram is the magnitude of the STFT (Hann window of 2048 samples,
hop n_fft/4) in dB relative to its loudest bin (floor -80 dB), drawn with time in seconds across
and frequency in Hz on a log scale up; stereo is mixed down to mono. Bad input (not a WAV file,
an empty or truncated one, audio longer than PIPELINES_MAX_AUDIO_SECONDS, default 600) is a 4xx
with {"error": "..."}.
"""

from __future__ import annotations

import asyncio
import io
import os
import struct
import warnings
from pathlib import Path

import bentoml
import numpy as np
from starlette.responses import Response

from pipelines.serving.images import BadRequest
from pipelines.serving.service import error_response

N_FFT = 2048
FLOOR_DB = -80.0
DEFAULT_MAX_SECONDS = 600.0


def max_seconds() -> float:
    raw = os.environ.get("PIPELINES_MAX_AUDIO_SECONDS", "")
    try:
        return float(raw) if raw else DEFAULT_MAX_SECONDS
    except ValueError:
        return DEFAULT_MAX_SECONDS


def read_wav(data: bytes) -> tuple[np.ndarray, int]:
    """WAV bytes -> (mono float32 samples in [-1, 1], sample rate); BadRequest when unusable."""
    from scipy.io import wavfile

    if not data:
        raise BadRequest("the uploaded audio is empty")
    if data[:4] not in (b"RIFF", b"RIFX", b"RF64") or data[8:12] != b"WAVE":
        raise BadRequest("the uploaded audio is not a WAV file (RIFF/WAVE header expected)", 415)
    try:
        with warnings.catch_warnings():
            # A data chunk shorter than its header says is read partially with a warning: refuse it.
            warnings.simplefilter("error", wavfile.WavFileWarning)
            rate, samples = wavfile.read(io.BytesIO(data))
    except (ValueError, EOFError, OSError, struct.error, wavfile.WavFileWarning) as e:
        raise BadRequest(f"the uploaded WAV file is truncated or not readable ({e})") from None
    if rate <= 0 or samples.size == 0:
        raise BadRequest("the uploaded WAV file holds no samples")
    if samples.dtype == np.uint8:  # 8-bit PCM is unsigned, centred on 128
        samples = (samples.astype(np.float64) - 128.0) / 128.0
    elif samples.dtype.kind == "i":  # signed PCM (16, 24 as 32, 32 bits): full scale is -min
        samples = samples.astype(np.float64) / -float(np.iinfo(samples.dtype).min)
    samples = samples.astype(np.float32)
    if samples.ndim == 2:
        samples = samples.mean(axis=1)
    if len(samples) / rate > max_seconds():
        raise BadRequest(f"the audio is {len(samples) / rate:.0f} s long, over the limit of {max_seconds():.0f} s "
                         "(PIPELINES_MAX_AUDIO_SECONDS)", 413)
    return samples, int(rate)


def stft_db(samples: np.ndarray, rate: int, n_fft: int = N_FFT) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(frame times s, bin frequencies Hz, magnitude dB [bins, frames]) of the STFT, 0 dB = the loudest bin."""
    n_fft = min(n_fft, 1 << int(np.floor(np.log2(max(len(samples), 16)))))  # short clips: a smaller window
    hop = n_fft // 4
    padded = np.pad(samples, (n_fft // 2, n_fft // 2))
    count = 1 + (len(padded) - n_fft) // hop
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop][:count]
    magnitude = np.abs(np.fft.rfft(frames * np.hanning(n_fft).astype(np.float32), axis=1)).T
    db = 20.0 * np.log10(np.maximum(magnitude, 1e-10) / max(float(magnitude.max()), 1e-10))
    return np.arange(count) * hop / rate, np.fft.rfftfreq(n_fft, 1.0 / rate), np.maximum(db, FLOOR_DB)


def spectrogram_png(data: bytes) -> bytes:
    """WAV bytes -> PNG of the spectrogram (time across, log frequency up, dB in colour)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    samples, rate = read_wav(data)
    times, freqs, db = stft_db(samples, rate)
    figure = Figure(figsize=(8, 4), dpi=100)
    ax = figure.add_subplot()
    lowest = max(freqs[1], 20.0) if len(freqs) > 1 else 1.0
    keep = freqs >= lowest  # the 0 Hz bin has no place on a log axis
    mesh = ax.pcolormesh(times, freqs[keep], db[keep], shading="nearest", cmap="magma", vmin=FLOOR_DB, vmax=0.0)
    ax.set_yscale("log")
    ax.set_ylim(lowest, rate / 2)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("frequency (Hz)")
    ax.set_title(f"{len(samples) / rate:.2f} s at {rate} Hz")
    figure.colorbar(mesh, ax=ax, label="dB")
    figure.tight_layout()
    out = io.BytesIO()
    figure.savefig(out, format="png")
    return out.getvalue()


@bentoml.service(name="spectrogram", traffic={"timeout": 60})
class Spectrogram:
    """WAV in, spectrogram PNG out."""

    @bentoml.api(route="/spectrogram")
    async def spectrogram(self, audio: Path):
        """Multipart `audio` file (WAV: PCM 8/16/24/32-bit or float, mono or stereo) -> PNG spectrogram."""
        try:
            data = await asyncio.to_thread(Path(audio).read_bytes)
            png = await asyncio.to_thread(spectrogram_png, data)
        except BadRequest as e:
            return error_response(e)
        return Response(png, media_type="image/png")
