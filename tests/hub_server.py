"""A loopback stand-in for the Hugging Face Hub's HTTP API, enough for `huggingface_hub.upload_folder`.

It answers repo creation, branch creation, README metadata validation, the pre-upload query (every
file "regular", so no LFS) and the commit, whose NDJSON body it decodes into `commits`. Any other
request is a 404 and is recorded in `unknown`, so a test sees what the client asked that this does not
serve. The real Hub's checks (tokens, quotas, LFS) are not modelled.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class HubServer:
    def __init__(self):
        self.repos: dict[str, dict] = {}  # repo id -> the create request's body
        self.branches: list[tuple[str, str]] = []
        self.commits: list[dict] = []  # {"repo", "revision", "summary", "files": {path: bytes}}
        self.unknown: list[str] = []
        self.auth: set[str] = set()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hub.auth.add(self.headers.get("Authorization", ""))
                path = self.path.split("?")[0]
                if path == "/api/repos/create":
                    req = json.loads(body)
                    repo = f"{req.get('organization') or 'me'}/{req['name']}"
                    hub.repos[repo] = req
                    return self._reply(200, {"url": f"{hub.url}/{repo}", "name": repo})
                if path == "/api/validate-yaml":
                    return self._reply(200, {"errors": [], "warnings": []})
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(branch|preupload|commit)/(.+)", path)
                if m and m.group(2) == "branch":
                    hub.branches.append((m.group(1), m.group(3)))
                    return self._reply(200, {})
                if m and m.group(2) == "preupload":
                    files = json.loads(body)["files"]
                    return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                       for f in files]})
                if m and m.group(2) == "commit":
                    lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                    header = next(x["value"] for x in lines if x["key"] == "header")
                    files = {x["value"]["path"]: base64.b64decode(x["value"]["content"]) for x in lines if x["key"] == "file"}
                    oid = hashlib.sha1(body).hexdigest()
                    hub.commits.append({"repo": m.group(1), "revision": m.group(3), "summary": header["summary"],
                                        "files": files})
                    return self._reply(200, {"commitUrl": f"{hub.url}/{m.group(1)}/commit/{oid}", "commitOid": oid})
                hub.unknown.append(f"POST {self.path}")
                return self._reply(404, {"error": "not served by the loopback Hub"})

            def do_GET(self):  # noqa: N802
                hub.unknown.append(f"GET {self.path}")
                return self._reply(404, {"error": "not served by the loopback Hub"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
