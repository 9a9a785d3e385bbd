"""An unmodified pyftpdlib FTP server (Debian's python3-pyftpdlib; run it with
/usr/bin/python3): anonymous, read-only, serving ROOT on PORT.

    ftp_server.py ROOT PORT [--host H] [--permit-foreign]

--host H          address to listen on (default "": 0.0.0.0; "::" makes pyftpdlib open
                  an AF_INET6 socket, dual-stack by Linux's default IPV6_V6ONLY=0)
--permit-foreign  permit_foreign_addresses = True: accept a PORT/EPRT whose IP is not the
                  control connection's peer (pyftpdlib refuses it by default)

Prints `ADDR ip:port` (getsockname of the listening socket; `[ip]:port` for an AF_INET6 one)
once listening. Logs every
command and reply at DEBUG on stderr (`<- PASV`, `-> 227 ...`): the wire, for the test.
"""
import logging
import socket
import sys

from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.handlers import FTPHandler
from pyftpdlib.servers import FTPServer


def main():
    args = sys.argv[1:]
    root, port = args[0], int(args[1])
    host = ""
    permit_foreign = False
    rest = args[2:]
    while rest:
        opt = rest.pop(0)
        if opt == "--host":
            host = rest.pop(0)
        elif opt == "--permit-foreign":
            permit_foreign = True
        else:
            sys.exit(f"ftp_server.py: unknown option {opt}")

    logging.basicConfig(
        stream=sys.stderr, level=logging.DEBUG, format="%(asctime)s %(message)s"
    )
    authorizer = DummyAuthorizer()
    authorizer.add_anonymous(root)

    class Handler(FTPHandler):
        pass

    Handler.authorizer = authorizer
    Handler.permit_foreign_addresses = permit_foreign
    server = FTPServer((host, port), Handler)
    name = server.socket.getsockname()
    ip = f"[{name[0]}]" if server.socket.family == socket.AF_INET6 else name[0]
    print(f"ADDR {ip}:{name[1]}", flush=True)
    server.serve_forever()


main()
