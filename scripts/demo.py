"""The main job: start a server, stream the sample media through it, stop it.

Run with ``make demo``. The server gets a free loopback port. The client
streams the sample speech, the first seconds of the pedestrian video and the
sample text at real-time pace, prints results as they arrive and a summary at
the end. The streaming takes 10 to 15 s, after the server has loaded the
models.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import wave
from typing import IO, TextIO

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
MEDIA = REPO_ROOT / "media"
BIN = pathlib.Path(sys.executable).parent

AUDIO = MEDIA / "audio" / "speech_sample.wav"
VIDEO = MEDIA / "video" / "vtest.avi"
TEXT = MEDIA / "text" / "gpl3_preamble.txt"

# The 559 words of the sample text take 9.3 s at this pace, so the text ends
# with the 9.5 s of speech instead of being cut by --max-seconds.
TEXT_WORDS_PER_MINUTE = 3600
# On a 2-core machine, hog_people took about 0.18 s and haar_faces about
# 0.23 s per 768x576 frame of vtest.avi (the server's INFO log of one demo
# run), so the detectors keep up with at most about 4 frames per second
# there, and with other work on the machine, fewer. The demo sends 2, so its
# frames are not replaced by newer ones (keep-latest) on a busy machine. At
# the file's 10 frames per second the video results lagged the media by 10
# to 20 s on that machine. Pass --video-fps 10 to send every frame.
DEFAULT_VIDEO_FPS = 2.0
SERVER_START_TIMEOUT_S = 300


def _forward_lines(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def start_server(out: TextIO) -> tuple[subprocess.Popen[str], int]:
    """Start ``streaminfer serve`` on a free loopback port and return it with the port."""
    print("starting the streaminfer server on a free port of 127.0.0.1 (loading the models) ...", file=out, flush=True)
    # The progress bars of the model loaders are noise in the demo's output.
    environment = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    server = subprocess.Popen(
        [str(BIN / "streaminfer"), "--log-level", "WARNING", "serve", "--port", "0", "--metrics-port", "0"],
        stdout=subprocess.PIPE,
        text=True,
        env=environment,
    )
    assert server.stdout is not None

    # Lines are read in a thread, so the deadline applies even when the server prints nothing.
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_forward_lines, args=(server.stdout, lines), daemon=True).start()
    started = time.monotonic()
    deadline = started + SERVER_START_TIMEOUT_S
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            server.kill()
            raise SystemExit(f"the server did not listen within {SERVER_START_TIMEOUT_S} s") from None
        if line is None:
            raise SystemExit(f"the server exited with code {server.wait()} before listening")
        match = re.search(r"listening on \S+:(\d+)", line)
        if match:
            print(f"{line.strip()} (ready after {time.monotonic() - started:.1f} s)", file=out, flush=True)
            return server, int(match.group(1))


def stop_server(server: subprocess.Popen[str], out: TextIO) -> None:
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
    print("server stopped", file=out, flush=True)


def _relative(path: pathlib.Path) -> str:
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def describe_stream(port: int, max_seconds: float, video_fps: float) -> list[str]:
    """Return the lines that tell a first-time user what is streamed and how to read the results."""
    with wave.open(str(AUDIO), "rb") as reader:
        audio_seconds = reader.getnframes() / reader.getframerate()
    words = len(TEXT.read_text(encoding="utf-8").split())
    text_amount = f"{words} words"
    if words * 60 / TEXT_WORDS_PER_MINUTE > max_seconds:
        text_amount = f"the first {max_seconds:g} s of its {words} words"
    return [
        f"streaming to 127.0.0.1:{port} at real-time pace, at most {max_seconds:g} s of each medium:",
        f"  audio  {_relative(AUDIO)}, {min(audio_seconds, max_seconds):.1f} s of recorded speech and pauses"
        " -> silero_vad: speech start and end",
        f"  video  {_relative(VIDEO)}, the first {max_seconds:g} s at {video_fps:g} frames/s"
        " -> hog_people and haar_faces: people and faces in each frame",
        f"  text   {_relative(TEXT)}, {text_amount} at {TEXT_WORDS_PER_MINUTE} words/min"
        " -> minilm_embedding: one embedding per sentence",
        "results print as they arrive; each line starts with the media time of the audio,",
        "the sequence number of the video frame, or the sequence numbers of the text chunks",
        "(one line of the file each) that it covers:",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--max-seconds", type=float, default=10.0,
        help="seconds of each medium to stream, by media time (default 10)",
    )
    parser.add_argument(
        "--video-fps", type=float, default=DEFAULT_VIDEO_FPS,
        help=f"video frames per second to send, at most the file's 10 (default {DEFAULT_VIDEO_FPS:g})",
    )
    parser.add_argument(
        "--json", action="store_true",
        help="print one JSON object per line instead of text; the demo's own lines go to stderr",
    )
    options = parser.parse_args()
    out = sys.stderr if options.json else sys.stdout

    stream_arguments = [
        "stream",
        "--audio",
        _relative(AUDIO),
        "--video",
        _relative(VIDEO),
        "--fps",
        f"{options.video_fps:g}",
        "--text",
        _relative(TEXT),
        "--text-wpm",
        str(TEXT_WORDS_PER_MINUTE),
        "--max-seconds",
        f"{options.max_seconds:g}",
    ]
    if options.json:
        stream_arguments.append("--json")
    client = BIN / "streaminfer-client"

    server, port = start_server(out)
    try:
        for line in describe_stream(port, options.max_seconds, options.video_fps):
            print(line, file=out, flush=True)
        started = time.monotonic()
        status = subprocess.call([str(client), *stream_arguments, "--target", f"127.0.0.1:{port}"], cwd=REPO_ROOT)
        print(f"streamed in {time.monotonic() - started:.1f} s", file=out, flush=True)
    except KeyboardInterrupt:
        print("demo interrupted", file=out, flush=True)
        status = 130
    finally:
        stop_server(server, out)

    print(
        f"to run it yourself, start `{_relative(BIN / 'streaminfer')} serve` and in another shell run:",
        file=out,
        flush=True,
    )
    print(f"  {_relative(client)} {' '.join(stream_arguments)}", file=out, flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
