"""`make demo`: the fake provider and Fluxgate, one chat completion and one stream through it.

Starts `python -m demo.fake_upstream` and `fluxgate-supervisor start` on
demo/fluxgate.yaml, waits until the proxy answers its health check, sends
one completion and one streamed completion with the official `openai` SDK,
prints the answers, and stops both processes whatever happens.
With `--free-ports` it picks unused ports instead of 8080/9100 (the tests use this).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam

HERE = Path(__file__).resolve().parent
DEMO_CONFIG = HERE / "fluxgate.yaml"
SUPERVISOR = str(Path(sys.executable).parent / "fluxgate-supervisor")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{url}: the process serving it exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.05)  # nothing to wait on but the port opening
    raise SystemExit(f"{url} did not answer within {timeout:.0f} s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--free-ports", action="store_true", help="use unused ports")
    args = parser.parse_args(argv)

    config = yaml.safe_load(DEMO_CONFIG.read_text())
    proxy_port, upstream_port = 8080, 9100
    if args.free_ports:
        proxy_port, upstream_port = _free_port(), _free_port()
        config["server"]["bind_address"] = f"127.0.0.1:{proxy_port}"
        config["upstreams"]["openai"]["target_url"] = f"http://127.0.0.1:{upstream_port}"
    client_key = config["api_keys"]["static"][0]["key"]

    with tempfile.TemporaryDirectory(prefix="fluxgate-demo-") as tmp:
        config_path = Path(tmp) / "fluxgate.yaml"
        config_path.write_text(yaml.safe_dump(config))
        env = {**os.environ, "FLUXGATE_LOG": os.environ.get("FLUXGATE_LOG", "INFO")}
        upstream = subprocess.Popen(
            [sys.executable, "-m", "demo.fake_upstream", "--port", str(upstream_port)],
            cwd=HERE.parent,
        )
        proxy = subprocess.Popen([SUPERVISOR, "start", "--config", str(config_path)], env=env)
        try:
            _wait_http(f"http://127.0.0.1:{upstream_port}/v1/models", upstream)
            _wait_http(f"http://127.0.0.1:{proxy_port}/_fluxgate/health", proxy)
            client = OpenAI(
                base_url=f"http://127.0.0.1:{proxy_port}/openai/v1", api_key=client_key,
                max_retries=0,
            )  # fmt: skip
            messages: list[ChatCompletionMessageParam] = [
                {"role": "user", "content": "Say hello through Fluxgate"}
            ]
            reply = client.chat.completions.create(model="demo-model", messages=messages)
            print(f"\ncompletion: {reply.choices[0].message.content}")
            print("stream:     ", end="", flush=True)
            stream = client.chat.completions.create(
                model="demo-model",
                messages=messages,
                stream=True,
            )
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    print(chunk.choices[0].delta.content, end="", flush=True)
            print("\n")
        finally:
            _stop(proxy)
            _stop(upstream)
    return 0


if __name__ == "__main__":
    sys.exit(main())
