"""Write the ghz stream payloads for ``streaminfer.v1.InferenceService/Stream``.

The messages come from a real recording, media/audio/speech_sample.wav (48 kHz
PCM16 mono), resampled to 16 kHz and cut into 32 ms chunks (512 samples,
1024 bytes). Two files are written next to this script:

* ``audio_messages.json``: a JSON array of StreamRequest messages in the proto3
  JSON mapping (camelCase names, enum names, base64 bytes), for ghz's
  ``data-file`` option: the config, every audio chunk with an increasing
  ``sequenceNumber``, then a CONTROL_ACTION_END_OF_INPUT control.
* ``audio_messages.bin``: the same messages in the protobuf wire format, each
  preceded by its length as a varint (count-delimited), for ghz's
  ``binary-file`` option.

The output depends only on the WAV file, so running the script again gives
the same bytes; tests/test_load_tool_files.py checks that.

Usage, from the repository root:  .venv/bin/python loadtest/ghz/make_messages.py
"""

from __future__ import annotations

import argparse
import base64
import json
import pathlib
import wave

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
DEFAULT_WAV = REPO_ROOT / "media" / "audio" / "speech_sample.wav"

TARGET_RATE = 16_000
CHUNK_MS = 32
CHUNK_SAMPLES = TARGET_RATE * CHUNK_MS // 1000  # 512
FILTER_TAPS = 95  # odd, so the low-pass filter has no delay to undo


def read_pcm16_mono(path: pathlib.Path) -> tuple[np.ndarray, int]:
    """Return the samples of a PCM16 WAV as float64 mono, and its sample rate."""
    with wave.open(str(path), "rb") as wav:
        if wav.getsampwidth() != 2:
            raise ValueError(f"{path}: expected 16-bit PCM, got {8 * wav.getsampwidth()}-bit")
        rate = wav.getframerate()
        channels = wav.getnchannels()
        raw = wav.readframes(wav.getnframes())
    samples = np.frombuffer(raw, dtype="<i2").astype(np.float64)
    if channels > 1:
        samples = samples.reshape(-1, channels).mean(axis=1)
    return samples, rate


def resample_to_16k(samples: np.ndarray, rate: int) -> np.ndarray:
    """Resample by an integer factor: a windowed-sinc low-pass filter, then decimation."""
    if rate == TARGET_RATE:
        filtered = samples
        factor = 1
    else:
        if rate % TARGET_RATE:
            raise ValueError(f"sample rate {rate} Hz is not a multiple of {TARGET_RATE} Hz")
        factor = rate // TARGET_RATE
        cutoff = 0.45 / factor  # cycles per input sample, a little under the new Nyquist
        n = np.arange(FILTER_TAPS) - (FILTER_TAPS - 1) / 2
        taps = 2 * cutoff * np.sinc(2 * cutoff * n) * np.hamming(FILTER_TAPS)
        taps /= taps.sum()
        filtered = np.convolve(samples, taps, mode="same")
    decimated = filtered[::factor]
    return np.clip(np.round(decimated), -32768, 32767).astype("<i2")


def build_messages(wav_path: pathlib.Path, max_seconds: float | None = None) -> list[dict]:
    """Build the stream as proto3-JSON dicts: config, audio chunks, END_OF_INPUT."""
    samples, rate = read_pcm16_mono(wav_path)
    pcm = resample_to_16k(samples, rate)
    if max_seconds is not None:
        pcm = pcm[: int(max_seconds * TARGET_RATE)]
    whole_chunks = len(pcm) // CHUNK_SAMPLES
    messages: list[dict] = [
        {
            "config": {
                "models": [{"model": "silero_vad"}],
                "audioFormat": {
                    "encoding": "AUDIO_ENCODING_LINEAR16",
                    "sampleRateHertz": TARGET_RATE,
                    "audioChannelCount": 1,
                },
                "interimResults": True,
                "label": "ghz",
            }
        }
    ]
    for index in range(whole_chunks):
        chunk = pcm[index * CHUNK_SAMPLES : (index + 1) * CHUNK_SAMPLES].tobytes()
        messages.append(
            {
                "audio": {
                    # int64 is a JSON string in the proto3 mapping.
                    "sequenceNumber": str(index),
                    "audioContent": base64.b64encode(chunk).decode("ascii"),
                }
            }
        )
    messages.append({"control": {"action": "CONTROL_ACTION_END_OF_INPUT"}})
    return messages


def count_delimited(messages: list[dict]) -> bytes:
    """Serialize each message and prefix it with its length as a varint."""
    from google.protobuf import json_format

    from streaminfer.v1 import streaminfer_pb2 as pb

    out = bytearray()
    for message in messages:
        payload = json_format.ParseDict(message, pb.StreamRequest()).SerializeToString()
        length = len(payload)
        while True:
            byte = length & 0x7F
            length >>= 7
            if length:
                out.append(byte | 0x80)
            else:
                out.append(byte)
                break
        out += payload
    return bytes(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wav", type=pathlib.Path, default=DEFAULT_WAV, help="PCM16 WAV to stream")
    parser.add_argument("--out-dir", type=pathlib.Path, default=HERE, help="where the two files go")
    parser.add_argument("--max-seconds", type=float, default=None, help="keep only the start of the audio")
    args = parser.parse_args()

    messages = build_messages(args.wav, args.max_seconds)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    json_path = args.out_dir / "audio_messages.json"
    json_path.write_text(json.dumps(messages, indent=1) + "\n", encoding="utf-8")
    bin_path = args.out_dir / "audio_messages.bin"
    bin_path.write_bytes(count_delimited(messages))
    chunks = len(messages) - 2
    print(f"{json_path}: {len(messages)} messages, {chunks} chunks of {CHUNK_MS} ms ({chunks * CHUNK_MS / 1000:.2f} s)")
    print(f"{bin_path}: {bin_path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
