"""`qwen-chat`: the service, under gunicorn with app/gunicorn_conf.py, as scripts/serve and the systemd unit run it.

    qwen-chat [gunicorn options]     e.g. --bind 0.0.0.0:8000 (else server.host and server.port)
"""
import sys


def main(argv=None):
    from gunicorn.app.wsgiapp import run

    args = sys.argv[1:] if argv is None else list(argv)
    sys.argv = ["qwen-chat", "--config", "python:app.gunicorn_conf", *args]
    return run()


if __name__ == "__main__":
    sys.exit(main())
