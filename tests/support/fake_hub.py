"""A model hub on loopback: serves a folder in the hub's layout to huggingface_hub (HF_ENDPOINT).

Only what ``snapshot_download`` asks for: the repo info (its file list and commit) and each
file's ``resolve`` URL, with the headers the client reads (X-Repo-Commit, ETag, Content-Length).
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self, repos: dict[str, Path]) -> None:
        self.repos = repos
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
                hub._serve(self, body=False)

            def do_GET(self) -> None:  # noqa: N802
                hub._serve(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _files(self, repo: str) -> list[str]:
        root = self.repos[repo]
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())

    def _serve(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlsplit(handler.path).path)
        self.requests.append(f"{handler.command} {path}")
        for repo, root in self.repos.items():
            info_prefix = f"/api/models/{repo}"
            if path.startswith(info_prefix + "/tree/"):
                entries = [{"type": "file", "path": name, "size": (root / name).stat().st_size,
                            "oid": hashlib.sha1((root / name).read_bytes()).hexdigest()} for name in self._files(repo)]
                folders = sorted({str(Path(name).parent) for name in self._files(repo)} - {"."})
                entries += [{"type": "directory", "path": folder, "oid": COMMIT} for folder in folders]
                self._send(handler, 200, json.dumps(entries).encode(), "application/json", body)
                return
            if path == info_prefix or path.startswith(info_prefix + "/revision/"):
                siblings = [{"rfilename": name, "size": (root / name).stat().st_size} for name in self._files(repo)]
                data = json.dumps({"id": repo, "modelId": repo, "sha": COMMIT, "siblings": siblings,
                                   "private": False, "disabled": False, "gated": False}).encode()
                self._send(handler, 200, data, "application/json", body)
                return
            resolve_prefix = f"/{repo}/resolve/"
            if path.startswith(resolve_prefix):
                name = path[len(resolve_prefix):].split("/", 1)[1]
                file = root / name
                if not file.is_file():
                    break
                data = file.read_bytes()
                etag = hashlib.sha256(data).hexdigest()
                self._send(handler, 200, data, "application/octet-stream", body,
                           {"X-Repo-Commit": COMMIT, "ETag": f'"{etag}"'})
                return
        self._send(handler, 404, b'{"error": "not found"}', "application/json", body)

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, status: int, data: bytes, content_type: str, body: bool,
              headers: dict[str, str] | None = None) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            handler.send_header(key, value)
        handler.end_headers()
        if body:
            handler.wfile.write(data)
