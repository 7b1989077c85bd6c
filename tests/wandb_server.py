"""A loopback stand-in for a W&B server, enough for wandb's login check and `wandb sync`.

It answers the GraphQL operations wandb-core sends for a run (the viewer, the resume status, the
run's upsert, upload URLs for its files) and the file stream, which carries the run's history rows;
it keeps what arrives per run: the upsert's variables (name, group, job type, tags, config), the
history rows in file-stream order, and the uploaded files. Any other operation is answered with an
empty result and recorded in `unknown`, so a test sees what the client asked that this does not
serve. `stall_file_stream` makes it stop answering the file stream, as a server that went away mid-run
does, until it is closed. The real server's checks (keys, quotas, offsets against stored history) are not modelled.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ENTITY = "nash-team"
VIEWER = {"id": "VXNlcjox", "entity": ENTITY, "username": "nash", "name": "nash", "email": "nash@example.com",
          "admin": False, "flags": "{}", "deletedAt": None, "apiKeys": {"edges": []}, "teams": {"edges": []}}
# Answered with empty data: telemetry about the client, not the run.
HARMLESS = {"OrganizationCoreWeaveOrganizationID", "ServerFeaturesQuery", "ServerInfo", "Probe"}


class WandbServer:
    def __init__(self):
        self.runs: dict[str, dict] = {}  # run id -> {"upserts": [variables], "history": [row], "files": {}}
        self.unknown: list[str] = []
        self.keys: set[str] = set()  # the API keys seen in the Authorization header
        self.stall_file_stream = False
        self._closing = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> bytes:
                auth = self.headers.get("Authorization", "")
                if auth.startswith("Basic "):
                    server.keys.add(base64.b64decode(auth[6:]).decode().partition(":")[2])
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def do_POST(self):  # noqa: N802 (http.server's name)
                body = self._body()
                path = self.path.split("?")[0]
                if path == "/graphql":
                    return self._reply({"data": server.graphql(json.loads(body))})
                m = re.fullmatch(r"/files/([^/]+)/([^/]+)/([^/]+)/file_stream", path)
                if m:
                    if server.stall_file_stream:
                        server._closing.wait(600)
                        return
                    server.file_stream(m.group(3), json.loads(body))
                    return self._reply({"exitcode": None, "limits": {}})
                if path.startswith("/sdk/otel/"):  # the client's own metrics
                    return self._reply({})
                server.unknown.append(f"POST {path}")
                self.send_error(404)

            def do_PUT(self):  # noqa: N802
                body = self._body()
                m = re.fullmatch(r"/upload/([^/]+)/(.+)", self.path.split("?")[0])
                if not m:
                    server.unknown.append(f"PUT {self.path}")
                    return self.send_error(404)
                server.run(m.group(1))["files"][m.group(2)] = body
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self):  # noqa: N802
                server.unknown.append(f"GET {self.path}")
                self.send_error(404)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._lock = threading.Lock()

    def run(self, run_id: str) -> dict:
        with self._lock:
            return self.runs.setdefault(run_id, {"upserts": [], "history": [], "files": {}, "events": 0})

    def graphql(self, req: dict) -> dict:
        op = req.get("operationName") or re.search(r"(query|mutation)\s+(\w+)", req["query"]).group(2)
        v = req.get("variables") or {}
        if op in ("Viewer", "GetViewer"):
            return {"viewer": VIEWER}
        project = {"id": "UHJvamVjdDox", "name": v.get("project") or "uncategorized",
                   "entity": {"id": "RW50aXR5OjE=", "name": v.get("entity") or ENTITY}}
        if op == "RunResumeStatus":
            known = self.runs.get(v["name"])
            bucket = None
            if known and known["history"]:
                bucket = {"id": v["name"], "name": v["name"], "displayName": v["name"], "summaryMetrics": "{}",
                          "logLineCount": 0, "historyLineCount": len(known["history"]), "eventsLineCount": 0,
                          "historyTail": json.dumps([json.dumps(known["history"][-1])]), "eventsTail": "[]",
                          "config": "{}", "tags": [], "notes": None, "wandbConfig": "{}"}
            return {"model": {**project, "bucket": bucket}}
        if op == "UpsertBucket":
            run = self.run(v.get("name") or v.get("id"))
            run["upserts"].append(v)
            return {"upsertBucket": {"inserted": len(run["upserts"]) == 1, "bucket": {
                "id": v.get("name"), "name": v.get("name"), "displayName": v.get("displayName"),
                "description": None, "config": v.get("config") or "{}", "sweepName": None,
                "historyLineCount": len(run["history"]), "project": project}}}
        if op == "CreateRunFiles":
            return {"createRunFiles": {"runID": v["run"], "uploadHeaders": [], "files": [
                {"name": f, "uploadUrl": f"{self.url}/upload/{v['run']}/{f}"} for f in v["files"]]}}
        if op not in HARMLESS:
            self.unknown.append(op)
        return {}

    def file_stream(self, run_id: str, body: dict) -> None:
        run = self.run(run_id)
        for name, chunk in (body.get("files") or {}).items():
            if name == "wandb-history.jsonl":
                with self._lock:
                    run["history"].extend(json.loads(line) for line in chunk["content"])
            elif name == "wandb-summary.json":
                run["summary"] = json.loads(chunk["content"][-1])
        if body.get("complete"):
            run["exitcode"] = body.get("exitcode")

    def __enter__(self) -> WandbServer:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._closing.set()
        self.httpd.shutdown()
        self.httpd.server_close()
