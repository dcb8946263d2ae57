"""moto's S3 server with its state kept across a restart, for tests that kill the store.

moto keeps buckets and objects in memory, so a plain restart loses them. This launcher
runs moto's own WSGI application behind a small journal: every state-changing request
(PUT, POST, DELETE) that moto answers with success is appended to a file, whole, before
the answer goes back to the client. Started again on the same file, the launcher first
replays the journal into the fresh in-process moto backend and only then opens the port,
so the server that comes back holds every object the killed one acknowledged, and no
client sees it half restored.

(moto's built-in recorder, MOTO_RECORDER_FILEPATH and /moto-api/recorder/, is not used:
it stores an empty body for requests sent with Transfer-Encoding: chunked, which is how
pyarrow's S3 client uploads parts, so replaying it loses those objects.)

Run: python tests/s3_persist.py --port PORT --journal FILE
(or PersistentS3Server(journal, log).start() / .kill() from a test).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import signal
import sys
import threading
from collections.abc import Iterator
from urllib.parse import parse_qsl

MUTATING = ("PUT", "POST", "DELETE")


class Journal:
    """WSGI middleware: append each successful state-changing request to a JSONL file."""

    def __init__(self, app, path: str) -> None:
        self.app, self.path = app, path
        self.lock = threading.Lock()

    def __call__(self, environ, start_response):
        from werkzeug.wsgi import get_input_stream

        method = environ["REQUEST_METHOD"]
        if method not in MUTATING:
            return self.app(environ, start_response)
        # Read the body once (chunked or not) and hand moto a copy of it.
        body = get_input_stream(environ).read()
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        environ.pop("HTTP_TRANSFER_ENCODING", None)
        environ["wsgi.input_terminated"] = False
        status: list[str] = []

        def capture(st, headers, exc_info=None):
            status.append(st)
            return start_response(st, headers, exc_info)

        result = self.app(environ, capture)
        upload_id = None
        query = dict(parse_qsl(environ.get("QUERY_STRING", ""), keep_blank_values=True))
        if method == "POST" and "uploads" in query:
            # A multipart upload's id is random: journal it, so that the server that comes
            # back knows the upload under the id its clients hold.
            data = b"".join(result)
            if hasattr(result, "close"):
                result.close()
            result = [data]
            found = re.search(rb"<UploadId>([^<]+)</UploadId>", data)
            upload_id = found.group(1).decode() if found else None
        if status and status[0][:1] == "2":
            headers = {k[5:].replace("_", "-").title(): v for k, v in environ.items()
                       if k.startswith("HTTP_")}
            if environ.get("CONTENT_TYPE"):
                headers["Content-Type"] = environ["CONTENT_TYPE"]
            entry = {"method": method, "path": environ.get("PATH_INFO", ""),
                     "query": environ.get("QUERY_STRING", ""), "headers": headers,
                     "body": base64.b64encode(body).decode("ascii"), "upload_id": upload_id}
            line = (json.dumps(entry) + "\n").encode("utf-8")
            with self.lock:  # one write per entry: a kill leaves at most the last cut short
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    os.write(fd, line)
                finally:
                    os.close(fd)
        return result


def journal_entries(path: str) -> Iterator[dict]:
    """The journal's entries in order. A server killed while writing leaves its last line
    cut short; that request was never answered, so it is dropped."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


def replay(app, path: str) -> int:
    """Send every journaled request to the WSGI app in process; returns how many.

    A multipart upload created again gets a new random id; it is renamed to the id the
    journal holds, which is the one its clients know (they may still be sending parts).
    """
    from werkzeug.test import Client

    client = Client(app)
    n = 0
    for entry in journal_entries(path):
        headers = {k: v for k, v in entry["headers"].items()
                   if k not in ("Content-Length", "Transfer-Encoding")}
        resp = client.open(entry["path"], query_string=entry["query"],
                           method=entry["method"], headers=headers,
                           data=base64.b64decode(entry["body"]))
        if entry.get("upload_id"):
            found = re.search(rb"<UploadId>([^<]+)</UploadId>", resp.get_data())
            if found:
                bucket = entry["path"].lstrip("/").split("/", 1)[0]
                _rename_upload(bucket, found.group(1).decode(), entry["upload_id"])
        n += 1
    return n


def _rename_upload(bucket_name: str, new: str, old: str) -> None:
    from moto.s3.models import s3_backends

    for account in list(s3_backends.keys()):
        for region in list(s3_backends[account].keys()):
            bucket = s3_backends[account][region].buckets.get(bucket_name)
            if bucket is not None and new in bucket.multiparts:
                upload = bucket.multiparts.pop(new)
                upload.id = old
                bucket.multiparts[old] = upload
                return
    raise RuntimeError(f"replayed multipart upload {new} not found in bucket {bucket_name}")


class PersistentS3Server:
    """This launcher as a child process on a fixed loopback port, killed and started again
    by a test. `url` stays the same across restarts."""

    def __init__(self, journal: str, log: str, port: int | None = None) -> None:
        import socket

        if port is None:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        self.port, self.journal, self.log = port, journal, log
        self.url = f"http://127.0.0.1:{port}"
        self.proc = None

    def start(self, timeout: float = 60.0) -> None:
        import subprocess
        import time
        import urllib.error
        import urllib.request

        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--port", str(self.port),
                 "--journal", self.journal], stdout=out, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"s3 server exited with {self.proc.returncode}; see {self.log}")
            try:
                urllib.request.urlopen(self.url, timeout=2)
                return
            except urllib.error.HTTPError:
                return  # it answered
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(f"s3 server on {self.url} did not answer in {timeout}s")

    def kill(self) -> None:
        """SIGKILL: no shutdown, no flush; what was journaled is what survives."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.proc = None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--journal", required=True)
    args = p.parse_args(argv)
    os.environ.setdefault("MOTO_PORT", str(args.port))

    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import run_simple

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    moto_app = DomainDispatcherApplication(create_backend_app)
    journal = os.path.abspath(args.journal)
    n = replay(moto_app, journal)
    print(f"s3_persist: replayed {n} requests, serving on {args.host}:{args.port}", flush=True)
    run_simple(args.host, args.port, Journal(moto_app, journal), threaded=True,
               use_reloader=False, request_handler=MotoRequestHandler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
