import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import ClassVar

import pytest

from radapter.errors import RAdapterError
from train.describe import describe_classes, load_cached, main


class FakeChat(BaseHTTPRequestHandler):
    """A minimal OpenAI-compatible chat-completions server."""

    seen: ClassVar[list] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeChat.seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        prompt = body["messages"][-1]["content"]
        if "broken" in prompt:
            self.send_response(500)
            self.end_headers()
            return
        name = prompt.split(" of a ", 1)[-1].split(" of an ", 1)[-1].split(":")[0]
        answer = {"choices": [{"message": {"role": "assistant", "content": f' "round {name} shape" '}}]}
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = HTTPServer(("127.0.0.1", 0), FakeChat)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    FakeChat.seen = []
    yield f"http://127.0.0.1:{httpd.server_port}/v1"
    httpd.shutdown()


def test_describes_caches_and_never_writes_the_key(server, tmp_path, monkeypatch):
    monkeypatch.setenv("MY_KEY", "sekret-123")
    out = tmp_path / "core_descriptions.json"
    got = describe_classes(["apple", "ice skate"], out, server, "fake-model", api_key_env="MY_KEY")
    assert got == {"apple": "round apple shape", "ice skate": "round ice skate shape"}
    assert FakeChat.seen[0]["path"] == "/v1/chat/completions"
    assert FakeChat.seen[0]["auth"] == "Bearer sekret-123"
    assert FakeChat.seen[0]["body"]["model"] == "fake-model"
    assert "not its usual background" in FakeChat.seen[0]["body"]["messages"][-1]["content"]
    assert "sekret" not in out.read_text()
    assert load_cached(out) == got
    describe_classes(["apple", "pear"], out, server, "fake-model")  # only the new class is asked
    assert len(FakeChat.seen) == 3


def test_cli_with_image_folder(server, tmp_path, capsys):
    for c in ("cat", "dog"):
        (tmp_path / "data" / c).mkdir(parents=True)
    assert main(["--folder", str(tmp_path / "data"), "--url", server, "--model", "m"]) == 0
    assert set(json.loads((tmp_path / "data" / "core_descriptions.json").read_text())) == {"cat", "dog"}


def test_errors_are_one_line(server, tmp_path, capsys):
    with pytest.raises(RAdapterError, match="HTTP 500"):
        describe_classes(["broken thing"], tmp_path / "d.json", server, "m")
    with pytest.raises(RAdapterError, match="cannot reach"):
        describe_classes(["x"], tmp_path / "d.json", "http://127.0.0.1:9/v1", "m")
    (tmp_path / "names.txt").write_text("")
    assert main(["--classes", str(tmp_path / "names.txt"), "--url", server, "--model", "m"]) == 2
    assert "no class names" in capsys.readouterr().err
