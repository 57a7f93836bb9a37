"""``bas ui``: the local web page (gradio), started on 127.0.0.1 with a workspace folder."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import time
from pathlib import Path

import click

from bas.core import io
from bas.core.errors import BasError
from bas.core.model import default_model

MAX_UPLOAD = "200mb"


def check_port(host: str, port: int) -> None:
    """Refuse, before anything is made, an address the page could not listen on (a port another server holds)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: a port left in TIME_WAIT is free
            probe.bind(address)
    except OSError as exc:
        raise BasError(f"Cannot listen on {host}:{port} ({exc.strerror or exc}); pass another --port (or --host).") from None


@click.command("ui")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but a loopback address lets other machines open the page, and needs --auth.")
@click.option("--port", type=click.IntRange(1, 65535), default=7860, show_default=True, help="The TCP port to listen on.")
@click.option("--auth", envvar="BAS_UI_AUTH", default=None, metavar="USER:PASS",
              help="Ask for this user name and password before showing the page (needed with --host; or set BAS_UI_AUTH).")
@click.option("--allow-host", multiple=True, metavar="NAME",
              help="Another name the page may be addressed by (such as a reverse proxy's); requests addressed to any other are refused.")
@click.option("--workspace", type=click.Path(path_type=Path), default=Path("bas-workspace"), show_default=True,
              help="The only folder the page reads and writes: scenes/, runs/, exports/ and uploads (created if missing).")
@click.option("--model", default=None, help="The model the Extract tab starts with (hub id or pipeline folder) [default: bas run's, stabilityai/stable-diffusion-2-1-base].")
@click.option("--sam-model", default=None, help="The SAM checkpoint the Scene tab starts with [default: facebook/sam-vit-base].")
@click.option("--device", default="auto", show_default=True, help="The device the page's SAM, generation and extraction fields start with.")
def ui(host, port, auth, allow_host, workspace, model, sam_model, device):
    """Make masks by clicking, extract, generate and export in the browser: bas ui --workspace DIR.

    A local web page over the same code as the commands: the Scene tab makes masks with SAM clicks
    or uploaded PNGs and saves scenes/NAME, the Extract tab runs `bas run` in the background (one
    at a time per device), Generate samples from a finished run, Export downloads a zip.
    """
    from bas.plugins.sam_masks import DEFAULT_CHECKPOINT
    from bas.ui.workspace import Workspace

    from bas.ui.access import HostCheck, allowed_hosts, check_exposure, page_url, parse_auth

    credentials = parse_auth(auth)
    check_exposure(host, credentials)
    if importlib.util.find_spec("gradio") is None:  # before the workspace is created: a refused command leaves nothing behind
        raise BasError("bas ui needs gradio; install it with: pip install 'bas[ui]'.")
    io.check_output_folder(Path(workspace).expanduser(), "--workspace")  # a path below a file: one line, not mkdir's error
    check_port(host, port)  # a port in use: refused before the workspace is made (launch checks again, as it binds)
    ws = Workspace(workspace)
    # gradio keeps uploads (and what it serves) in its temporary folder: make that one part of the
    # workspace, before gradio is imported, and turn off its telemetry
    os.environ["GRADIO_TEMP_DIR"] = str(ws.uploads)
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.pop("GRADIO_SHARE", None)
    from starlette.middleware import Middleware

    from bas.ui.app import CSS, PAGE_JS, App

    app = App(ws, model=model or default_model(), sam_model=sam_model or DEFAULT_CHECKPOINT, device=device)
    demo = app.build()
    try:
        demo.queue(default_concurrency_limit=4).launch(
            server_name=host, server_port=port, share=False, prevent_thread_lock=True, quiet=True, show_error=False,
            allowed_paths=[str(ws.root)], max_file_size=MAX_UPLOAD, ssr_mode=False, enable_monitoring=False,
            mcp_server=False, footer_links=["api", "settings"], css=CSS, js=PAGE_JS, auth=credentials,
            app_kwargs={"middleware": [Middleware(HostCheck, allowed=allowed_hosts(host, allow_host))]},
        )
    except OSError as exc:
        raise BasError(f"Cannot listen on {host}:{port} ({exc}); pass another --port.") from exc
    app.serve_reports(demo.server_app)
    # Ctrl-C and a service manager's SIGTERM both stop cleanly (a shell's background job starts with SIGINT ignored)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    click.echo(f"bas ui: {page_url(host, port)} (workspace {ws.root}{'; it asks for the --auth password' if credentials else ''}); Ctrl-C stops it.", err=True)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        if any(j.state in ("running", "stopping") for j in app.jobs.jobs.values()):
            click.echo("Stopping: the running extraction finishes its step and saves a checkpoint (Resume continues it) ...", err=True)
        app.jobs.close()
        demo.close()
        click.echo("Stopped.", err=True)
