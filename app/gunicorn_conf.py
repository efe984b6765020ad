"""gunicorn settings for qwen-chat: `qwen-chat` (app/cli.py) runs gunicorn with them.

The address comes from the service's own configuration (server.host, server.port); a --bind on the
command line wins. The app, and with it the runner, is created in the worker, never in the master.
"""
from app import config as qwen_config
from app.paths import PROJECT_DIR

_server = qwen_config.load()["server"]

wsgi_app = "wsgi:app"
chdir = str(PROJECT_DIR)
bind = [f"{_server['host']}:{_server['port']}"]
# One card takes one runner, so one worker process. Its threads carry the requests waiting for the card
# (and /health, which never waits).
workers = 1
# gunicorn's gthread worker, reading each request whole in its event loop before a thread takes it: a slow
# or silent client holds no thread (app/http_worker.py).
worker_class = "app.http_worker.WholeRequestWorker"
threads = _server["threads"]
# Open connections: served, arriving, kept alive or closing (systemd's LimitNOFILE leaves room for them).
worker_connections = _server["max_connections"]
# With gthread, `timeout` is the worker's heartbeat to the master, not a limit on a request: streams of
# several minutes are fine. graceful_timeout bounds how long a stop waits for the running generation.
timeout = 120
graceful_timeout = 30
keepalive = 75
# gunicorn's control socket lives in $HOME by default; the service user has none, and we do not use it.
control_socket_disable = True
accesslog = "-"
errorlog = "-"
loglevel = "info"
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(L)ss'


def post_worker_init(worker):
    """SIGTERM (systemctl stop, a gunicorn reload): stop taking requests, cancel the running generation and
    "q" the runner at once, instead of waiting out streams that can last minutes. gunicorn then finishes the
    (now short) requests in flight and the worker exits."""
    import signal
    import threading

    backend = worker.wsgi.extensions["qwen"]
    graceful = signal.getsignal(signal.SIGTERM)

    def on_term(signum, frame):
        threading.Thread(target=backend.stop, name="shutdown", daemon=True).start()
        graceful(signum, frame)

    signal.signal(signal.SIGTERM, on_term)
