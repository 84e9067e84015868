"""`POST /spectrogram`: a WAV file in, its short-time Fourier transform as a PNG out.

    bentoml serve pipelines.serving.audio:Spectrogram --port 3000     (make serve-spectrogram)

The audio example users of function-style deployments know, as a small service of its own: it
needs no model. The spectrogram is the magnitude of the STFT (Hann window of 2048 samples,
hop n_fft/4) in dB relative to its loudest bin (floor -80 dB), drawn with time in seconds across
and frequency in Hz on a log scale up; stereo is mixed down to mono. Bad input (not a WAV file,
an empty or truncated one, audio longer than PIPELINES_MAX_AUDIO_SECONDS, default 600, or with
more samples than PIPELINES_MAX_AUDIO_SAMPLES, default 28.8 million, checked from the header) is a
4xx with {"error": "..."}. Memory stays a few times the samples': the STFT is taken a block of
frames at a time and at most 2000 time columns are kept for the picture.
"""

from __future__ import annotations

import asyncio
import io
import struct
import warnings
from pathlib import Path

import bentoml
import numpy as np
from starlette.responses import Response

from pipelines.common import env_number
from pipelines.serving import guard, hardening
from pipelines.serving.images import BadRequest, error_response

N_FFT = 2048
FLOOR_DB = -80.0
DEFAULT_MAX_SECONDS = 600.0
DEFAULT_MAX_SAMPLES = 48_000 * 600  # ten minutes at 48 kHz
MAX_COLUMNS = 2000  # time columns drawn: the PNG is 800 pixels wide


def max_seconds() -> float:
    return env_number("PIPELINES_MAX_AUDIO_SECONDS", DEFAULT_MAX_SECONDS)


def max_samples() -> int:
    return int(env_number("PIPELINES_MAX_AUDIO_SAMPLES", DEFAULT_MAX_SAMPLES))


def _declared_samples(data: bytes) -> int | None:
    """Sample frames the WAV header's fmt and data chunks announce (before any is decoded)."""
    pos, block_align = 12, None
    while pos + 8 <= len(data):
        chunk, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        if chunk == b"fmt " and pos + 22 <= len(data):
            block_align = struct.unpack("<H", data[pos + 20:pos + 22])[0]
        if chunk == b"data":
            return min(size, len(data) - pos - 8) // block_align if block_align else None
        pos += 8 + size + (size & 1)
    return None


def read_wav(data: bytes) -> tuple[np.ndarray, int]:
    """WAV bytes -> (mono float32 samples in [-1, 1], sample rate); BadRequest when unusable."""
    from scipy.io import wavfile

    if not data:
        raise BadRequest("the uploaded audio is empty")
    if data[:4] not in (b"RIFF", b"RIFX", b"RF64") or data[8:12] != b"WAVE":
        raise BadRequest("the uploaded audio is not a WAV file (RIFF/WAVE header expected)", 415)
    declared = _declared_samples(data) if data[:4] == b"RIFF" else None
    if declared is not None and declared > max_samples():
        raise BadRequest(f"the audio has {declared} samples, over the limit of {max_samples()} "
                         "(PIPELINES_MAX_AUDIO_SAMPLES)", 413)
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
    if len(samples) > max_samples():
        raise BadRequest(f"the audio has {len(samples)} samples, over the limit of {max_samples()} "
                         "(PIPELINES_MAX_AUDIO_SAMPLES)", 413)
    if len(samples) / rate > max_seconds():
        raise BadRequest(f"the audio is {len(samples) / rate:.0f} s long, over the limit of {max_seconds():.0f} s "
                         "(PIPELINES_MAX_AUDIO_SECONDS)", 413)
    return samples, int(rate)


def stft_db(samples: np.ndarray, rate: int, n_fft: int = N_FFT,
            max_frames: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(frame times s, bin frequencies Hz, magnitude dB [bins, frames]) of the STFT, 0 dB = the loudest bin.

    Computed a block of frames at a time (memory a few times the samples', not n_fft times); with
    `max_frames`, neighbouring frames are merged by their maximum so that at most that many columns
    come back (a picture has no more pixels across)."""
    n_fft = min(n_fft, 1 << int(np.floor(np.log2(max(len(samples), 16)))))  # short clips: a smaller window
    hop = n_fft // 4
    padded = np.pad(samples, (n_fft // 2, n_fft // 2))
    count = 1 + (len(padded) - n_fft) // hop
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop][:count]
    window = np.hanning(n_fft).astype(np.float32)
    group = max(1, -(-count // max_frames)) if max_frames else 1
    columns = -(-count // group)
    magnitude = np.zeros((n_fft // 2 + 1, columns), np.float32)
    block = group * max(1, 4096 // group)
    for start in range(0, count, block):
        part = np.abs(np.fft.rfft(frames[start:start + block] * window, axis=1)).astype(np.float32)
        if group > 1:
            pad = -len(part) % group
            part = np.pad(part, ((0, pad), (0, 0))).reshape(-1, group, part.shape[1]).max(axis=1)
        magnitude[:, start // group:start // group + len(part)] = part.T
    db = 20.0 * np.log10(np.maximum(magnitude, 1e-10) / max(float(magnitude.max()), 1e-10))
    return np.arange(columns) * hop * group / rate, np.fft.rfftfreq(n_fft, 1.0 / rate), np.maximum(db, FLOOR_DB)


def spectrogram_png(data: bytes) -> bytes:
    """WAV bytes -> PNG of the spectrogram (time across, log frequency up, dB in colour)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    samples, rate = read_wav(data)
    times, freqs, db = stft_db(samples, rate, max_frames=MAX_COLUMNS)
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
            data = await asyncio.to_thread(hardening.upload_bytes, audio)
            png = await asyncio.to_thread(spectrogram_png, data)
        except BadRequest as e:
            return error_response(e)
        return Response(png, media_type="image/png")


guard.install(Spectrogram, {"/spectrogram": "audio"})
