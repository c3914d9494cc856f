"""cloudlet-notes: the distribution guest's customised application (a notes list in sqlite).

GET /      JSON: every note (from the sqlite database on disk), this process's instance token
           (random, made at start, kept only in this process's memory) and the guest's boot id
POST /     adds the request body as a note; answers with the new note's id
Listens on 127.0.0.1:8000; nginx serves it on port 80 (/etc/nginx/conf.d/cloudlet-notes.conf).
A synthesized guest that answers with the token read before capture was resumed, not rebooted.
"""

import http.server
import json
import os
import secrets
import sqlite3

DATABASE = os.path.join(os.environ.get("STATE_DIRECTORY", "/var/lib/cloudlet-notes"), "notes.db")
INSTANCE = secrets.token_hex(8)
MAX_NOTE = 4096


def boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def connect() -> sqlite3.Connection:
    db = sqlite3.connect(DATABASE)
    db.execute("CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY, text TEXT NOT NULL)")
    return db


class Handler(http.server.BaseHTTPRequestHandler):
    def answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        with connect() as db:
            notes = [text for (text,) in db.execute("SELECT text FROM notes ORDER BY id")]
        self.answer(200, {"notes": notes, "instance": INSTANCE, "boot_id": boot_id()})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 < length <= MAX_NOTE:
            self.answer(400, {"error": f"a note is 1 to {MAX_NOTE} bytes"})
            return
        text = self.rfile.read(length).decode(errors="replace")
        with connect() as db:
            note_id = db.execute("INSERT INTO notes (text) VALUES (?)", (text,)).lastrowid
        self.answer(201, {"id": note_id})


if __name__ == "__main__":
    connect().close()
    http.server.ThreadingHTTPServer(("127.0.0.1", 8000), Handler).serve_forever()
