"""The /spectrogram service, for real: a bentoml server on a free port, WAV files made here."""

from __future__ import annotations

import io
import wave

import httpx
import numpy as np
import pytest
from PIL import Image

from pipelines.serving.audio import read_wav, stft_db
from pipelines.serving.process import ServerProcess


def wav_bytes(samples: np.ndarray, rate: int = 16000, width: int = 2, channels: int = 1) -> bytes:
    if width == 1:
        pcm = np.clip((samples + 1.0) * 128.0, 0, 255).astype(np.uint8)
    else:
        dtype = {2: np.int16, 4: np.int32}[width]
        pcm = (samples * (np.iinfo(dtype).max)).astype(dtype)
    if channels == 2:
        pcm = np.repeat(pcm[:, None], 2, axis=1)
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return out.getvalue()


def tone(hz: float, seconds: float = 1.0, rate: int = 16000) -> np.ndarray:
    return 0.5 * np.sin(2 * np.pi * hz * np.arange(int(seconds * rate)) / rate)


@pytest.mark.parametrize("width,channels", [(1, 1), (2, 1), (2, 2), (4, 1)])
def test_wav_reading_and_stft_find_the_tone(width, channels):
    samples, rate = read_wav(wav_bytes(tone(1500), width=width, channels=channels))
    assert rate == 16000 and samples.ndim == 1 and abs(np.abs(samples).max() - 0.5) < 0.01
    times, freqs, db = stft_db(samples, rate)
    assert freqs[np.argmax(db.mean(axis=1))] == pytest.approx(1500, abs=rate / 2048)
    assert db.max() == 0.0 and db.min() >= -80.0 and times[-1] == pytest.approx(1.0, abs=0.02)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("spectrogram") / "server.log"
    env = {"PIPELINES_MAX_AUDIO_SECONDS": "5", "BENTOML_HOME": str(log.parent / "bentoml")}
    with ServerProcess("pipelines.serving.audio:Spectrogram", env=env, log=log, ready_timeout=90) as running:
        with httpx.Client(base_url=running.url, timeout=60) as client:
            yield client


def test_spectrogram_png(server):
    r = server.post("/spectrogram", files={"audio": ("tone.wav", wav_bytes(tone(440, 2.0)), "audio/wav")})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(r.content)) as img:
        assert img.format == "PNG" and img.size == (800, 400)
        pixels = np.asarray(img.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # a plot, not a blank picture


@pytest.mark.parametrize("data,status,message", [
    (b"", 400, "empty"),
    (b"this is text, not audio", 415, "not a WAV file"),
    (wav_bytes(tone(440))[:30], 400, "truncated or not readable"),
    (wav_bytes(tone(440))[:3000], 400, "truncated or not readable"),
    (wav_bytes(tone(440, 6.0)), 413, "over the limit of 5 s"),
])
def test_bad_audio_is_a_4xx_with_a_json_error(server, data, status, message):
    r = server.post("/spectrogram", files={"audio": ("x.wav", data, "audio/wav")})
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
    ok = server.post("/spectrogram", files={"audio": ("t.wav", wav_bytes(tone(300, 0.5)), "audio/wav")})
    assert ok.status_code == 200  # still serving


def test_audio_is_limited_by_samples_from_the_header(monkeypatch):
    """Seconds are not the cost, samples are: a high declared rate gave 41 MB -> 6.1 GB. The header's
    data size is checked before anything is decoded."""
    from pipelines.serving.images import BadRequest

    data = wav_bytes(tone(440, seconds=2.0, rate=8000), rate=8000)  # 16,000 samples
    monkeypatch.setenv("PIPELINES_MAX_AUDIO_SAMPLES", "10000")
    with pytest.raises(BadRequest, match=r"16000 samples, over the limit of 10000") as info:
        read_wav(data)
    assert info.value.status == 413
    header_only = data[:44]  # a header announcing 16,000 samples, none sent: refused on the header alone
    lying = header_only[:40] + (10**9).to_bytes(4, "little")
    with pytest.raises(BadRequest, match="over the limit of 10000"):
        read_wav(lying + b"\0" * 30_000)
    monkeypatch.setenv("PIPELINES_MAX_AUDIO_SAMPLES", "20000")
    samples, rate = read_wav(data)
    assert len(samples) == 16000 and rate == 8000


def test_stft_columns_are_bounded_and_keep_the_peaks():
    """At most max_frames columns, each the maximum of the frames it covers: the same picture of a
    long recording without its n_fft-times-the-samples memory."""
    rate = 8000
    signal = tone(1000, seconds=30.0, rate=rate)
    signal[rate * 10: rate * 10 + 400] += 0.9  # a click at 10 s
    times, freqs, full = stft_db(signal.astype(np.float32), rate)
    times_b, freqs_b, bounded = stft_db(signal.astype(np.float32), rate, max_frames=100)
    assert bounded.shape[1] <= 100 and full.shape[1] > 400
    group = -(-full.shape[1] // bounded.shape[1])
    pad = -full.shape[1] % group
    pooled = np.pad(full, ((0, 0), (0, pad)), constant_values=-1e9).reshape(full.shape[0], -1, group).max(axis=2)
    np.testing.assert_allclose(bounded, pooled, atol=1e-3)
    click = int(np.argmax(bounded[-50:].max(axis=0)))  # high frequencies: only the click has them
    assert abs(times_b[click] - 10.0) < 30.0 / 100 * 2


@pytest.mark.timeout(60)
@pytest.mark.parametrize("content_type,body,message", [
    ("multipart/form-data; boundary=zz", b"--x\r\ngarbage", "malformed multipart body"),
    ("multipart/form-data", b"--x\r\ngarbage", "Missing boundary"),
    ("multipart/form-data; boundary=B",
     b"".join(b'--B\r\nContent-Disposition: form-data; name="audio"; filename="a%d.wav"\r\n\r\nv\r\n' % i
              for i in range(2)) + b"--B--\r\n", '2 files in the field "audio"'),
])
def test_malformed_uploads_are_a_quick_400(server, content_type, body, message):
    r = server.post("/spectrogram", content=body, headers={"content-type": content_type}, timeout=5)
    assert r.status_code == 400 and message in r.json()["error"], r.text
