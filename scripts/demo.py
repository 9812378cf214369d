"""The main job: start a server, stream the sample media through it, stop it.

Run with ``make demo``. The server gets a free loopback port; the client
streams the sample speech, the first seconds of the pedestrian video and the
sample text at real-time pace and prints results as they arrive.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import signal
import subprocess
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
MEDIA = REPO_ROOT / "media"
BIN = pathlib.Path(sys.executable).parent


def start_server() -> tuple[subprocess.Popen[str], int]:
    print("starting streaminfer (loading models) ...", flush=True)
    server = subprocess.Popen(
        [str(BIN / "streaminfer"), "--log-level", "WARNING", "serve", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = server.stdout.readline()
        if not line:
            raise SystemExit(f"the server exited with code {server.wait()} before listening")
        match = re.search(r"listening on \S+:(\d+)", line)
        if match:
            print(line.strip(), flush=True)
            return server, int(match.group(1))
    server.kill()
    raise SystemExit("the server did not listen within 300 s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video-seconds", type=float, default=10.0, help="seconds of video to stream (default: 10)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per result line")
    options = parser.parse_args()

    server, port = start_server()
    command = [
        str(BIN / "streaminfer-client"),
        "stream",
        "--target",
        f"127.0.0.1:{port}",
        "--audio",
        str(MEDIA / "audio" / "speech_sample.wav"),
        "--video",
        str(MEDIA / "video" / "vtest.avi"),
        "--max-seconds",
        str(options.video_seconds),
        "--text",
        str(MEDIA / "text" / "gpl3_preamble.txt"),
    ]
    if options.json:
        command.append("--json")
    print("streaming:", " ".join(command[2:]), flush=True)
    try:
        return subprocess.call(command)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        print("server stopped", flush=True)


if __name__ == "__main__":
    sys.exit(main())
