"""FLUSH finishes buffered work of one modality, or all, while the stream stays open."""

from __future__ import annotations

import queue

import numpy as np

from conftest import MEDIA
from streamutil import audio_requests, read_wav
from streaminfer.v1 import streaminfer_pb2 as pb
from streaminfer.v1 import streaminfer_pb2_grpc as pb_grpc


def open_stream(channel, config: pb.StreamConfig):
    """Return a queue to put requests on (None half-closes) and the response iterator."""
    requests: queue.Queue[pb.StreamRequest | None] = queue.Queue()

    def messages():
        yield pb.StreamRequest(config=config)
        while (request := requests.get(timeout=60)) is not None:
            yield request

    responses = pb_grpc.InferenceServiceStub(channel).Stream(messages(), timeout=120)
    return requests, responses


def read_until(responses, predicate) -> list[pb.StreamResponse]:
    seen = []
    for response in responses:
        seen.append(response)
        if predicate(response):
            return seen
    raise AssertionError(f"the stream ended first; saw {seen}")


def test_flush_audio_keeps_text_pending(channel) -> None:
    samples, rate = read_wav(MEDIA / "audio" / "Front_Center.wav")
    audio = audio_requests(samples, rate)
    last_audio = audio[-1].audio.sequence_number
    config = pb.StreamConfig(
        models=[pb.ModelSelection(model="silero_vad"), pb.ModelSelection(model="minilm_embedding")],
        audio_format=pb.AudioFormat(encoding=pb.AUDIO_ENCODING_LINEAR16, sample_rate_hertz=rate),
    )
    requests, responses = open_stream(channel, config)
    read_until(responses, lambda r: r.HasField("session_accepted"))

    requests.put(pb.StreamRequest(text=pb.TextChunk(sequence_number=0, text=b"An unfinished sentence")))
    for request in audio:
        requests.put(request)
    requests.put(
        pb.StreamRequest(control=pb.StreamControl(action=pb.CONTROL_ACTION_FLUSH, modality=pb.MODALITY_AUDIO))
    )
    seen = read_until(
        responses,
        lambda r: any(a.modality == pb.MODALITY_AUDIO and a.last_sequence_number == last_audio for a in r.acks),
    )

    segments = [
        result for response in seen for result in response.results
        if result.speech.event_type == pb.SPEECH_EVENT_TYPE_SPEECH_END
    ]
    assert len(segments) == 2
    assert not any(ack.modality == pb.MODALITY_TEXT for response in seen for ack in response.acks)
    assert not any(result.model == "minilm_embedding" for response in seen for result in response.results)

    requests.put(None)
    rest = list(responses)
    embeddings = [result.embedding.text for response in rest for result in response.results if result.HasField("embedding")]
    assert embeddings == ["An unfinished sentence"]
    assert any(ack.modality == pb.MODALITY_TEXT and ack.last_sequence_number == 0 for r in rest for ack in r.acks)
    assert rest[-1].HasField("stream_end")


def test_flush_all_closes_open_speech(channel) -> None:
    samples, rate = read_wav(MEDIA / "audio" / "Front_Center.wav")
    # Cut in the middle of the second word, so a segment is open.
    cut = samples[: int(rate * 1.1)]
    requests, responses = open_stream(channel, pb.StreamConfig(
        models=[pb.ModelSelection(model="silero_vad")],
        audio_format=pb.AudioFormat(encoding=pb.AUDIO_ENCODING_LINEAR16, sample_rate_hertz=rate),
    ))
    read_until(responses, lambda r: r.HasField("session_accepted"))
    for request in audio_requests(cut, rate):
        requests.put(request)
    requests.put(pb.StreamRequest(control=pb.StreamControl(action=pb.CONTROL_ACTION_FLUSH)))

    seen = read_until(
        responses,
        lambda r: sum(res.speech.event_type == pb.SPEECH_EVENT_TYPE_SPEECH_END for res in r.results) > 0
        and any(res.speech.event_type == pb.SPEECH_EVENT_TYPE_SPEECH_END and res.end_time.seconds >= 1 for res in r.results),
    )
    ends = [
        result for response in seen for result in response.results
        if result.speech.event_type == pb.SPEECH_EVENT_TYPE_SPEECH_END
    ]
    assert len(ends) == 2
    last_end = ends[-1].end_time.seconds + ends[-1].end_time.nanos / 1e9
    assert abs(last_end - len(cut) / rate) < 0.05

    # The stream goes on after the flush.
    more = np.zeros(rate // 10, dtype="<i2").tobytes()
    requests.put(pb.StreamRequest(audio=pb.AudioChunk(sequence_number=1000, audio_content=more)))
    requests.put(None)
    rest = list(responses)
    assert any(ack.last_sequence_number == 1000 for response in rest for ack in response.acks)
    assert rest[-1].HasField("stream_end")


def test_long_sentence_does_not_stall_window(channel, server) -> None:
    window = server.config.limits.max_chunks_in_flight
    words = [f"word{i} ".encode() for i in range(window * 2)]
    config = pb.StreamConfig(models=[pb.ModelSelection(model="minilm_embedding")])
    requests, responses = open_stream(channel, config)
    read_until(responses, lambda r: r.HasField("session_accepted"))

    for sequence_number, word in enumerate(words):
        requests.put(pb.StreamRequest(text=pb.TextChunk(sequence_number=sequence_number, text=word)))
    requests.put(None)
    rest = list(responses)

    acked = sorted(seq for r in rest for ack in r.acks for seq in range(ack.first_sequence_number, ack.last_sequence_number + 1))
    assert acked == list(range(len(words)))
    texts = [result.embedding.text for r in rest for result in r.results]
    assert len(texts) >= 2, "the stalled window was not flushed before the end of input"
    assert " ".join(texts).split() == [word.decode().strip() for word in words]
