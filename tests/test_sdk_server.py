"""The client SDK against the real server: async and sync clients, pacing off."""

from __future__ import annotations

import asyncio
import threading

import pytest

from conftest import MEDIA
from streaminfer.client import (
    AsyncClient,
    Modality,
    NotFoundError,
    SyncClient,
    iter_text_chunks,
    iter_wav_chunks,
    read_wav_format,
    stream_config,
)
from streaminfer.v1 import streaminfer_pb2 as pb

WAV = MEDIA / "audio" / "speech_sample.wav"


def test_async_client_streams_wav(server) -> None:
    async def run() -> tuple[list[pb.StreamResult], object]:
        config = stream_config(["silero_vad"], audio=read_wav_format(str(WAV)))
        results = []
        async with AsyncClient(server.target) as client:
            async with await client.open_stream(config) as session:

                async def send() -> None:
                    for chunk in iter_wav_chunks(str(WAV), chunk_ms=32):
                        await session.send_audio(chunk.content, chunk.timestamp_s)
                    await session.end_input()

                sender = asyncio.create_task(send())
                async for result in session.results():
                    results.append(result.proto)
                await sender
        return results, session.stats.modality(Modality.AUDIO)

    results, audio = asyncio.run(run())

    ends = [result for result in results if result.speech.event_type == pb.SPEECH_EVENT_TYPE_SPEECH_END]
    assert len(ends) == 8
    assert audio.sent == audio.acked > 250
    assert audio.failed == 0
    assert len(audio.latencies_s) == audio.acked


def test_sync_client_text_and_errors(server) -> None:
    text = (MEDIA / "text" / "gpl3_preamble.txt").read_text()
    config = stream_config(["minilm_embedding"])
    embeddings = []
    with SyncClient(server.target) as client:
        names = {model.name for model in client.list_models()}
        assert {"silero_vad", "minilm_embedding", "hog_people", "haar_faces"} <= names

        with client.open_stream(config) as session:

            def send() -> None:
                for chunk in iter_text_chunks(text):
                    session.send_text(chunk.content)
                session.end_input()

            sender = threading.Thread(target=send)
            sender.start()
            for result in session.results():
                embeddings.append(result.proto.embedding)
            sender.join(timeout=60)

        with pytest.raises(NotFoundError) as error:
            client.get_model("no_such_model")

    assert len(embeddings) >= 20
    assert all(len(embedding.values) == 384 for embedding in embeddings)
    assert error.value.code.name == "NOT_FOUND"
    assert "no_such_model" in error.value.details


def test_sdk_keeps_to_window_at_full_speed(server, monkeypatch: pytest.MonkeyPatch) -> None:
    from streaminfer.server import metrics
    from streaminfer.server.session import Session

    responses = Session.responses

    async def slow_to_resume(self: Session):
        # A busy event loop may run the reader before the response generator
        # resumes after a write: the client then already holds the credit.
        async for message in responses(self):
            yield message
            await asyncio.sleep(0.002)

    monkeypatch.setattr(Session, "responses", slow_to_resume)

    async def run() -> int:
        config = stream_config(["silero_vad"], audio=read_wav_format(str(WAV)))
        async with AsyncClient(server.target) as client:
            async with await client.open_stream(config) as session:

                async def send() -> None:
                    # As fast as the window lets it: about 48 s of silence.
                    for _ in range(1500):
                        await session.send_audio(bytes(1024))
                    await session.end_input()

                sender = asyncio.create_task(send())
                async for _ in session.results():
                    pass
                await sender
                return sum(counts.acked for counts in session.stats.modalities.values())

    overruns_before = metrics.WINDOW_OVERRUNS._value.get()
    assert asyncio.run(run()) == 1500
    # The SDK sends a chunk only for credit it holds, so the server never sees it beyond the window.
    assert metrics.WINDOW_OVERRUNS._value.get() == overruns_before
