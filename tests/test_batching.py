"""Streams are batched together, and batching changes no stream's results."""

from __future__ import annotations

import concurrent.futures

from conftest import MEDIA
from streamutil import audio_requests, read_wav, run_stream, vad_config
from streaminfer.v1 import streaminfer_pb2 as pb

STREAMS = 32


def signature(outcome) -> list[tuple]:
    return [
        (
            result.first_sequence_number,
            result.last_sequence_number,
            result.is_final,
            result.speech.event_type,
        )
        for result in outcome.results
    ]


def test_concurrent_streams_batch_and_match_solo_runs(channel, server) -> None:
    names = ["Front_Center.wav", "Front_Left.wav", "Front_Right.wav", "Side_Left.wav"]
    inputs = []
    for index in range(STREAMS):
        samples, rate = read_wav(MEDIA / "audio" / names[index % len(names)])
        # Shift each stream so that no two send the same audio.
        inputs.append((samples[index * 37 :], rate))

    solo = [run_stream(channel, vad_config(rate, interim=True), audio_requests(s, rate)) for s, rate in inputs]

    runner = server.server.executor.runners["silero_vad"]
    batches_before, items_before = runner.stats.batches, runner.stats.items
    with concurrent.futures.ThreadPoolExecutor(STREAMS) as pool:
        together = list(
            pool.map(lambda pair: run_stream(channel, vad_config(pair[1], interim=True), audio_requests(*pair)), inputs)
        )
    batches = runner.stats.batches - batches_before
    items = runner.stats.items - items_before

    assert items / batches > 1.0, f"{items} items in {batches} batches: streams were not batched together"
    for index, (alone, batched) in enumerate(zip(solo, together)):
        assert batched.errors == []
        assert signature(batched) == signature(alone), f"stream {index} differs when batched"
        for got, expected in zip(batched.results, alone.results):
            assert abs(got.speech.speech_probability - expected.speech.speech_probability) < 1e-4
        assert batched.answered(pb.MODALITY_AUDIO) == alone.answered(pb.MODALITY_AUDIO)
