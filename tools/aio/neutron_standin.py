"""STAND-IN for neutron-server, not Neutron: answers the read-only calls Nova makes for servers
booted with `--nic none` (empty lists of ports, networks, security groups, ...). Without any
network API, `server show/list` fail with HTTP 500. Bound to 127.0.0.1:9696 only."""

import json
import re
import sys
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

_COLLECTION = re.compile(r"^/v2\.0/([a-z_-]+)(?:\.json)?$")


def app(environ, start_response):
    path, method = environ.get("PATH_INFO", ""), environ["REQUEST_METHOD"]
    if path in ("", "/"):
        body = {"versions": [{"id": "v2.0", "status": "CURRENT",
                              "links": [{"rel": "self", "href": "http://127.0.0.1:9696/v2.0/"}]}]}
    elif method == "GET" and (m := _COLLECTION.match(path)):
        body = {m.group(1).replace("-", "_"): []}
    else:
        start_response("404 Not Found", [("Content-Type", "application/json")])
        return [b'{"NeutronError": {"type": "NotFound", "message": "neutron stand-in"}}']
    data = json.dumps(body).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(data)))])
    return [data]


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Quiet(WSGIRequestHandler):
    def log_message(self, fmt, *args):
        sys.stderr.write("neutron stand-in: " + fmt % args + "\n")


if __name__ == "__main__":
    make_server("127.0.0.1", 9696, app, server_class=_Server, handler_class=_Quiet).serve_forever()
