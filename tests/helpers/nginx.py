"""A real nginx (Debian's) running the project's nginx/qwen-chat.conf in front of services under test."""
import re
import shutil
import subprocess

from tests.helpers.live import free_port, listening, wait_for

from app.paths import PROJECT_DIR


class Nginx:
    """nginx/qwen-chat.conf on a free port, its upstream the given services' ports; `replace` edits the site
    text first ({"client_body_timeout 10s;": "client_body_timeout 2s;"}), each edit required to apply."""

    def __init__(self, workdir, upstream_ports, replace=None):
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        site = (PROJECT_DIR / "nginx" / "qwen-chat.conf").read_text()
        site = re.sub(r"(?m)^    server 127\.0\.0\.1:8000( [^;]*);$",
                      lambda line: "\n".join(f"    server 127.0.0.1:{port}{line.group(1)};" for port in upstream_ports),
                      site)
        site = site.replace("    listen 80;\n", f"    listen 127.0.0.1:{self.port};\n")
        site = site.replace("    listen [::]:80;\n", "")
        for old, new in (replace or {}).items():
            assert old in site, f"{old!r} is not in nginx/qwen-chat.conf"
            site = site.replace(old, new)
        (workdir / "qwen-chat.conf").write_text(site)
        (workdir / "nginx.conf").write_text(f"""
daemon off;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {workdir}/access.log;
    client_body_temp_path {workdir}/body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    include {workdir}/qwen-chat.conf;
}}
""")
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        command = [binary, "-p", str(workdir), "-c", str(workdir / "nginx.conf")]
        check = subprocess.run([*command, "-t"], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        self.proc = subprocess.Popen(command)
        wait_for(lambda: listening(self.port), 10, "nginx to listen")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
