"""Who may drive the page: the Host header names this server, and a page open to the network asks for a password.

A web page the user visits can point a name of its own at 127.0.0.1 (DNS rebinding) and then drive
``bas ui`` as if it were the user; its requests carry its own name in ``Host``, so :class:`HostCheck`
answers only requests addressed to the address the server is bound to or to the loopback names.
Listening on another address (``--host``) opens the page to the network, so it needs ``--auth``.
"""

from __future__ import annotations

import ipaddress
import socket

from bas.core.errors import BasError

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
WILDCARDS = ("0.0.0.0", "::", "")


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_auth(text: str | None) -> tuple[str, str] | None:
    """``--auth USER:PASS`` as gradio's ``auth=(user, password)``."""
    if text is None:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise BasError("--auth takes USER:PASS (such as --auth ann:s3cret), with a user name and a password on either side of the colon.")
    return user, password


def check_exposure(host: str, auth: tuple[str, str] | None) -> None:
    """A page other machines can open must ask for a password."""
    if not is_loopback(host) and auth is None:
        raise BasError(
            f"--host {host} lets other machines on the network open this page and use its workspace; "
            "pass --auth USER:PASS (or set BAS_UI_AUTH=USER:PASS) so that it asks for a password."
        )


def own_address() -> str | None:
    """This machine's address on its network (the one outgoing packets leave from); None without a network."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # UDP: nothing is sent, the kernel only picks a route
            return s.getsockname()[0]
    except OSError:
        return None


def allowed_hosts(host: str, extra: tuple[str, ...] = ()) -> set[str]:
    """The names a request's Host header may give: the loopback names, the bound address and, when
    bound to every address, this machine's names and addresses; plus ``--allow-host`` names."""
    names = {*LOOPBACK_NAMES, host.lower(), *(e.lower() for e in extra)}
    if host in WILDCARDS:
        for name in (socket.gethostname(), socket.getfqdn()):
            names.add(name.lower())
            try:
                names.update(info[4][0] for info in socket.getaddrinfo(name, None))
            except OSError:
                pass
        address = own_address()
        if address:
            names.add(address)
    return {n for n in names if n}


def host_name(header: str) -> str:
    """The name in a Host header, without its port: ``[::1]:7860`` -> ``::1``."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header.rstrip(".")


def page_url(host: str, port: int) -> str:
    """The address to open: this machine's own one when bound to every address (http://0.0.0.0 opens nothing)."""
    if host in WILDCARDS:
        host = own_address() or socket.gethostname()
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


class HostCheck:
    """ASGI middleware: a request whose Host header names another site gets 421 (Misdirected Request)."""

    def __init__(self, app, allowed: set[str]):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            header = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
            if host_name(header).rstrip(".") not in self.allowed:
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                body = (
                    f"bas ui answers only to its own address; this request was addressed to '{header}'. "
                    "Open the address bas ui printed, or start it with --allow-host NAME.\n"
                ).encode()
                await send(
                    {
                        "type": "http.response.start",
                        "status": 421,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)
