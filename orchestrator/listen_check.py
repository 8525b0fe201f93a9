"""`meshserve serve` checks that its HTTP address is free before any rank starts: a port that another
process holds is found in a moment, not once the engine has loaded (minutes, for a big model)."""
from __future__ import annotations

import errno
import socket

from meshserve.errors import UserError


def check_listen_address(host: str, port: int) -> None:
    """Bind host:port as the HTTP server will (api_server.serve_app: SO_REUSEADDR, as uvicorn does),
    then let it go; a UserError that names the address and the fix if that fails. Port 0 (a free port,
    picked when the server starts) always passes."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    shown = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except (OSError, OverflowError) as err:
        if getattr(err, "errno", None) == errno.EADDRINUSE:
            why = "another process is listening there"
        else:
            why = getattr(err, "strerror", None) or str(err)
        raise UserError(f"cannot listen on {shown} ({why}); pick another --port (0 picks a free one) or "
                        "--host, or stop the process that holds it") from None
