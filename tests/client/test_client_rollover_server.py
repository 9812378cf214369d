"""Roll-over against the real server: a session outlives streams the server ends at their maximum duration."""

from __future__ import annotations

import asyncio
import collections
import dataclasses

from conftest import MEDIA, ServerThread, loopback_config
from streaminfer.client import (
    AsyncClient,
    ChunkFailed,
    ChunksAcked,
    Modality,
    StreamEnded,
    StreamEvent,
    StreamRolledOver,
    StreamSession,
    iter_wav_chunks,
    paced_async,
    read_wav_format,
    stream_config,
)

WAV = str(MEDIA / "audio" / "speech_sample.wav")
MAX_STREAM_DURATION_S = 1.0
# Seconds of audio sent at real-time pace: enough for several roll-overs.
AUDIO_SECONDS = 4.0


def test_roll_over_at_max_stream_duration() -> None:
    config = loopback_config()
    config = dataclasses.replace(
        config,
        models=tuple(model for model in config.models if model.name == "silero_vad"),
        limits=dataclasses.replace(config.limits, max_stream_duration_s=MAX_STREAM_DURATION_S),
    )
    server = ServerThread(config).start()

    async def scenario() -> tuple[list[StreamEvent], StreamSession]:
        events: list[StreamEvent] = []
        async with AsyncClient(server.target) as client:
            audio_config = stream_config(["silero_vad"], audio=read_wav_format(WAV))
            session = await client.open_stream(audio_config, roll_over=True)
            async with session:

                async def send() -> None:
                    async for chunk in paced_async(iter_wav_chunks(WAV, chunk_ms=32, max_seconds=AUDIO_SECONDS)):
                        await session.send_audio(chunk.content, chunk.timestamp_s)
                    await session.end_input()

                sender = asyncio.create_task(send())
                async for event in session:
                    events.append(event)
                await sender
        return events, session

    try:
        events, session = asyncio.run(asyncio.wait_for(scenario(), timeout=60))
    finally:
        server.stop()

    acked = collections.Counter(
        number for event in events if isinstance(event, ChunksAcked) for number, _ in event.latencies_s
    )
    rollovers = [event for event in events if isinstance(event, StreamRolledOver)]
    audio = session.stats.modality(Modality.AUDIO)
    assert len(rollovers) >= 2, f"expected a roll-over every {MAX_STREAM_DURATION_S} s, got {len(rollovers)}"
    assert all(event.reason == "MAX_DURATION" for event in rollovers)
    assert len({event.stream_id for event in rollovers}) == len(rollovers)
    assert [event for event in events if isinstance(event, ChunkFailed)] == []
    assert sorted(acked) == list(range(1, audio.sent + 1))
    assert set(acked.values()) == {1}, "some chunk was acked more than once"
    assert audio.acked == audio.sent
    assert audio.failed == 0
    assert session.stats.unexpected_answers == 0
    assert session.stats.rollovers == len(rollovers)
    assert isinstance(events[-1], StreamEnded)
