"""``fastvlm serve --engine vllm`` for real: vLLM's server comes up with the plugin and answers a chat with an image.

One server start (about 30-40 s on two CPU cores), one request: the command line our
launcher builds (literal chat template, content format, image limit, media domains) is
accepted by vLLM, and the OpenAI answer is complete.
"""

from __future__ import annotations

import os
import subprocess

import httpx

from fastvlm.bench.serve_process import ServerProcess, free_port, serve_command, stop_process, wait_until_healthy
from fastvlm.bench.serve_requests import chat_body, png_data_url, synthetic_image

STARTUP_TIMEOUT_S = 300.0
IMAGE_PX = 64  # resized to the checkpoint's side by the plugin's processor


def test_fastvlm_serve_engine_vllm_answers_a_chat_with_an_image(checkpoints, tmp_path):
    folder = checkpoints["apple"]
    port = free_port()
    flags = ["--engine", "vllm", "--dtype", "fp32", "--max-model-len", "1024", "--log-level", "warning"]
    command = serve_command(folder, port, [*flags, "--", "--enforce-eager"])
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", **os.environ}
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = ServerProcess(base_url=f"http://127.0.0.1:{port}", pid=process.pid, log_path=log_path)
    try:
        wait_until_healthy(server, process, timeout_s=STARTUP_TIMEOUT_S)
        models = httpx.get(f"{server.base_url}/v1/models", trust_env=False).json()
        assert [m["id"] for m in models["data"]] == [folder.name]  # the id our own server would list
        body = chat_body(png_data_url(synthetic_image(IMAGE_PX, 0)), "Describe the image.", max_tokens=4, stream=False)
        answer = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=120, trust_env=False)
        assert answer.status_code == 200, answer.text
        choices = answer.json()["choices"]
        assert choices and choices[0]["message"]["content"] and answer.json()["usage"]["completion_tokens"] >= 1
    finally:
        stop_process(process)
    assert "starting vLLM's server" in log_path.read_text(errors="replace")
