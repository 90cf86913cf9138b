"""
A minimal wsgw app in Flask: it prints each open/message/close event the
gateway POSTs and answers a message by echoing it to its connection through
/tapr/ws/conn/send.

    .venv/bin/pip install flask
    .venv/bin/python examples/flask_app.py [PORT (8888)] [GATEWAY (http://127.0.0.1:40010)]
"""

import json
import sys
import urllib.request

from flask import Flask, request

app = Flask(__name__)
port = int(sys.argv[1]) if len(sys.argv) > 1 else 8888
gateway = sys.argv[2] if len(sys.argv) > 2 else "http://127.0.0.1:40010"


@app.post("/ws/message")
def event():
    event = request.get_json()
    print(event["action"], event["conn_id"], event["user_name"], json.dumps(event["data"]), flush=True)
    if event["action"] == "message":
        reply = {"conn_id": event["conn_id"], "payload": {"event": "echo", "data": event["data"]}}
        urllib.request.urlopen(gateway + "/tapr/ws/conn/send", json.dumps(reply).encode(), timeout=5).close()
    return {}  # answered after the send, so one connection's replies keep their order


if __name__ == "__main__":
    app.run("127.0.0.1", port)  # Flask's development server; in production, gunicorn or waitress
