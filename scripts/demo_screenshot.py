"""Screenshot of a finished run of the speech web demo, for the README: docs/demo.png.

    python scripts/demo_screenshot.py [--task automatic-speech-recognition] [--out docs/demo.png]

Launches `lightpipe.demo(pipeline(task))` on 127.0.0.1, opens it in headless Chromium (Debian: apt-get install
chromium), clicks the first example and Submit through the DevTools protocol (over --remote-debugging-pipe: no
extra Python package), waits for the output, and saves a PNG (palette-reduced to stay small).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class DevTools:
    """The Chrome DevTools protocol over --remote-debugging-pipe: JSON messages, each ended by a NUL byte, written
    to the browser's fd 3 and read from its fd 4."""

    def __init__(self, browser: str, width: int, height: int):
        import fcntl

        def high(fd: int) -> int:  # away from 3 and 4, which the child's descriptors become
            moved = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
            os.close(fd)
            return moved

        to_browser_r, self._to_browser = map(high, os.pipe())
        self._from_browser, from_browser_w = map(high, os.pipe())
        self.profile = tempfile.mkdtemp(prefix="lightpipe-shot-")
        args = [browser, "--headless=new", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu",
                "--hide-scrollbars", "--no-first-run", "--disable-extensions", "--mute-audio",
                f"--user-data-dir={self.profile}", f"--window-size={width},{height}", "about:blank"]

        def fds():  # the protocol's fixed descriptors: the browser reads 3 and writes 4
            os.dup2(to_browser_r, 3)
            os.dup2(from_browser_w, 4)

        # close_fds=False: the descriptors made in fds() must survive (closing runs after preexec_fn).
        self.process = subprocess.Popen(args, preexec_fn=fds, close_fds=False,
                                        stdout=subprocess.DEVNULL, stderr=None if os.environ.get("SHOT_DEBUG") else subprocess.DEVNULL)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0

    def call(self, method: str, session: str | None = None, **params):
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise RuntimeError("the browser closed the DevTools pipe")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def evaluate(self, session: str, expression: str):
        result = self.call("Runtime.evaluate", session, expression=expression, returnByValue=True,
                           awaitPromise=True)
        return result.get("result", {}).get("value")

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except Exception:  # noqa: BLE001 - closing anyway
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        shutil.rmtree(self.profile, ignore_errors=True)


CLICK_EXAMPLE = """
(() => {
  const example = document.querySelector('.gallery-item, [data-testid="examples"] button, table.table tbody tr');
  if (!example) return 'no example';
  example.click();
  return 'clicked';
})()
"""
READY = "[...document.querySelectorAll('button')].some(b => b.innerText.trim() === 'Submit')"
SUBMIT = """
(() => {
  const buttons = [...document.querySelectorAll('button')].filter(b => b.innerText.trim() === 'Submit');
  if (!buttons.length) return 'no submit';
  buttons[0].click();
  return 'submitted';
})()
"""
OUTPUT = """
(() => {
  const areas = [...document.querySelectorAll('textarea')];
  return areas.length ? areas[areas.length - 1].value : '';
})()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, timeout: float, what: str):
    end = time.time() + timeout
    while time.time() < end:
        value = check()
        if value:
            return value
        time.sleep(0.25)
    raise TimeoutError(f"timed out waiting for {what}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="automatic-speech-recognition")
    parser.add_argument("--model", default=None)
    parser.add_argument("--out", default=str(ROOT / "docs" / "demo.png"))
    parser.add_argument("--width", type=int, default=1100)
    parser.add_argument("--height", type=int, default=470)
    parser.add_argument("--browser", default=shutil.which("chromium") or shutil.which("chromium-browser")
                        or shutil.which("google-chrome"))
    args = parser.parse_args()
    if not args.browser:
        sys.exit("no Chromium found: apt-get install chromium")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import lightpipe

    pipe = lightpipe.pipeline(args.task, model=args.model)
    app = lightpipe.demo(pipe)
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    browser = DevTools(args.browser, args.width, args.height)
    try:
        target = browser.call("Target.createTarget", url=f"http://127.0.0.1:{port}/")["targetId"]
        session = browser.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        browser.call("Emulation.setDeviceMetricsOverride", session, width=args.width, height=args.height,
                     deviceScaleFactor=1, mobile=False)
        wait_for(lambda: browser.evaluate(session, READY), 60, "the page")
        clicked = wait_for(lambda: browser.evaluate(session, CLICK_EXAMPLE) == "clicked", 30, "the examples")
        time.sleep(1.5)  # the example's file loads into the input
        assert clicked and browser.evaluate(session, SUBMIT) == "submitted"
        text = wait_for(lambda: (browser.evaluate(session, OUTPUT) or "").strip(), 120, "the output")
        time.sleep(1.0)  # the page settles (progress bar gone)
        print(f"output: {text}")
        shot = browser.call("Page.captureScreenshot", session, format="png", captureBeyondViewport=False)
    finally:
        browser.close()
        app.close()
    png = base64.b64decode(shot["data"])
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, optimize=True)
    print(f"{out}: {out.stat().st_size // 1024} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
