"""The operator console: a FastAPI JSON API over the run store, and one web page.

Every route, the page and its static files included, needs the console token: as
`Authorization: Bearer TOKEN`, or as the HttpOnly cookie the page sets when opened once
with `/?token=TOKEN` (the URL `consortia console` prints). Writes through the cookie
also need the `X-Consortia-Request: 1` header, which a cross-site form cannot send.
Nothing here reads key material or updates: the store holds neither, and the only file
served is a checkpoint's global-model weights (.safetensors).
"""

from __future__ import annotations

import hashlib
import socket
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from sqlalchemy.exc import DBAPIError

from consortia.server.console.auth import ConsoleToken
from consortia.server.store import AmbiguousRun, RunNotRunning, RunStore, UnknownRun

COOKIE = "consortia_token"
# The largest round a query may name: the store's INTEGER column (32-bit in PostgreSQL;
# a larger number failed in the database driver, a 500).
MAX_ROUND = 2**31 - 1
WRITE_HEADER = "x-consortia-request"
STATIC_TYPES = {"index.html": "text/html; charset=utf-8",
                "console.js": "text/javascript; charset=utf-8",
                "console.css": "text/css; charset=utf-8"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; "
                               "base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
UNAUTHORIZED_PAGE = """<!doctype html><meta charset="utf-8"><title>consortia console</title>
<h1>Token needed</h1><p>Open the console with the URL that <code>consortia console</code> printed
(<code>/?token=...</code>), or make a new token with <code>consortia console token</code>.</p>"""


def static_file(name: str) -> bytes:
    return resources.files("consortia.server.console").joinpath("static", name).read_bytes()


def create_app(store: RunStore, token: ConsoleToken) -> FastAPI:
    """The console over `store`, guarded by `token`."""
    app = FastAPI(title="consortia console", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Any) -> Response:
        response = await call_next(request)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    @app.exception_handler(UnknownRun)
    async def unknown_run(_request: Request, err: UnknownRun) -> JSONResponse:
        if isinstance(err, AmbiguousRun):  # the ids let a script choose, as a person would
            return JSONResponse({"detail": str(err), "matches": err.matches}, status_code=409)
        return JSONResponse({"detail": str(err)}, status_code=404)

    @app.exception_handler(DBAPIError)
    async def store_unreadable(request: Request, err: DBAPIError) -> JSONResponse:
        # The store's file removed or damaged, its server down: say so, not a bare 500.
        used = "written" if request.method == "POST" else "read"
        return JSONResponse({"detail": store.unusable(err, used)}, status_code=503)

    def presented_token(request: Request) -> tuple[str | None, str]:
        header = request.headers.get("authorization", "")
        if header[:7].lower() == "bearer ":
            return header[7:].strip(), "bearer"
        return request.cookies.get(COOKIE), "cookie"

    def require_token(request: Request) -> None:
        presented, via = presented_token(request)
        if not token.verify(presented):
            raise HTTPException(401, "missing or invalid console token",
                                headers={"WWW-Authenticate": "Bearer"})
        if via == "cookie" and request.method not in ("GET", "HEAD") \
                and request.headers.get(WRITE_HEADER) != "1":
            raise HTTPException(403, f"a write with the cookie needs the {WRITE_HEADER}: 1 header")

    guarded = [Depends(require_token)]

    def resolved(run_id: str) -> str:
        """The path's run id, or a unique prefix of one (as the CLI takes), made whole.
        Route dependencies run first, so no id is told to a caller without the token."""
        return store.resolve_run(run_id)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page(request: Request, token_param: str | None = Query(None, alias="token")) -> Response:
        if token_param is not None:  # the printed URL: trade the token for a cookie
            if not token.verify(token_param):
                return HTMLResponse(UNAUTHORIZED_PAGE, status_code=401)
            response = RedirectResponse("/", status_code=303)
            response.set_cookie(COOKIE, token_param, httponly=True, samesite="strict", path="/")
            return response
        presented, _ = presented_token(request)
        if not token.verify(presented):
            return HTMLResponse(UNAUTHORIZED_PAGE, status_code=401)
        return HTMLResponse(static_file("index.html"))

    @app.get("/static/{name}", dependencies=guarded, include_in_schema=False)
    def static(name: str) -> Response:
        if name not in STATIC_TYPES:
            raise HTTPException(404, f"no static file {name!r}")
        return Response(static_file(name), media_type=STATIC_TYPES[name])

    @app.get("/api/runs", dependencies=guarded)
    def list_runs() -> list[dict[str, Any]]:
        return store.list_runs()

    @app.get("/api/runs/{run_id}", dependencies=guarded)
    def get_run(run_id: str = Depends(resolved)) -> dict[str, Any]:
        return store.get_run(run_id)

    @app.get("/api/runs/{run_id}/rounds", dependencies=guarded)
    def rounds(run_id: str = Depends(resolved)) -> list[dict[str, Any]]:
        return store.rounds(run_id)

    @app.get("/api/runs/{run_id}/clients", dependencies=guarded)
    def clients(run_id: str = Depends(resolved)) -> list[dict[str, Any]]:
        return store.clients(run_id)

    @app.get("/api/runs/{run_id}/participation", dependencies=guarded)
    def participation(run_id: str = Depends(resolved),
                      round: int | None = Query(None, ge=0, le=MAX_ROUND)
                      ) -> list[dict[str, Any]]:
        return store.participation_rows(run_id, round)

    @app.get("/api/runs/{run_id}/checkpoints", dependencies=guarded)
    def checkpoints(run_id: str = Depends(resolved)) -> list[dict[str, Any]]:
        return store.checkpoints(run_id)

    @app.get("/api/runs/{run_id}/checkpoints/{server_round}/weights", dependencies=guarded)
    def checkpoint_weights(server_round: int = PathParam(ge=0, le=MAX_ROUND),
                           run_id: str = Depends(resolved)) -> FileResponse:
        found = store.checkpoint_file(run_id, server_round)
        if found is None:
            raise HTTPException(404, f"run {run_id} has no checkpoint for round {server_round}")
        path, sha256 = found
        # Only a global model's weights are ever served, whatever a store row says.
        if path.suffix != ".safetensors" or not Path(path).is_file():
            raise HTTPException(404, f"the weights of round {server_round} are not on this "
                                     f"machine ({path.name})")
        # and only the weights the run wrote: the file's hash is the checkpoint's.
        with path.open("rb") as fh:
            actual = hashlib.file_digest(fh, "sha256").hexdigest()
        if actual != sha256:
            raise HTTPException(409, f"the weights file of round {server_round} ({path}) has "
                                     f"SHA-256 {actual}, not the checkpoint's {sha256}: it "
                                     "changed after the run wrote it; restore it from a copy")
        return FileResponse(path, media_type="application/octet-stream",
                            filename=f"{run_id}-round-{server_round:05d}.safetensors")

    @app.get("/api/runs/{run_id}/audit", dependencies=guarded)
    def audit(run_id: str = Depends(resolved),
              limit: int = Query(200, ge=1, le=5000)) -> list[dict[str, Any]]:
        return store.audit_log(run_id, limit)

    @app.post("/api/runs/{run_id}/stop", dependencies=guarded, status_code=202)
    def stop(run_id: str = Depends(resolved)) -> dict[str, Any]:
        try:
            return store.request_stop(run_id, actor="console")
        except RunNotRunning as err:
            raise HTTPException(409, str(err)) from None

    return app


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port for `serve`, or OSError saying why not (a host that does
    not resolve or is not this machine's, a port in use or not allowed). Bound before the
    console says where it is, so it never says a place it is not serving."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def serve(store: RunStore, token: ConsoleToken, host: str = "127.0.0.1", port: int = 8080,
          sock: socket.socket | None = None) -> None:
    """Run the console with uvicorn until interrupted, on `sock` (from `listen`) if given."""
    import uvicorn

    config = uvicorn.Config(create_app(store, token), host=host, port=port, log_level="warning",
                            access_log=False)
    uvicorn.Server(config).run(sockets=[sock if sock is not None else listen(host, port)])
