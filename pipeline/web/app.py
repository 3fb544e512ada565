"""The web view's application: pages and their JSON twins over a read-only lineage store.

Every page has a JSON twin under /api with the key sets of the CLI's `--json`
(docs/json.md), built by the same functions (pipeline/report.py). The store is opened
read-only (pipeline/store/api.py), so no request can change the lineage.

Everything a candidate wrote (sources, logs, reasons, declarations) is untrusted: the
templates escape it (Jinja autoescape, on for every template), no template puts it in
an attribute or a URL (links carry only integer ids and run ids, which the store made),
and the Content-Security-Policy allows no inline script or style at all.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from jinja2 import Environment, FileSystemLoader
from sqlalchemy.exc import SQLAlchemyError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import (HTMLResponse, JSONResponse, RedirectResponse, Response,
                                 StreamingResponse)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeline import events
from pipeline.cli.output import json_default
from pipeline.report import (candidate_record, detail_of, direction, fmt_design, fmt_score,
                             fmt_share, fmt_steps, fmt_time, lineage_of, run_detail,
                             run_summary, source_diff)
from pipeline.store import (RUN_TERMINAL_STATUSES, LineageStore, StoreError, UnknownCandidate,
                            UnknownRun)
from pipeline.text import is_redis_url
from pipeline.web import figures

HERE = Path(__file__).resolve().parent
COOKIE = "selfprog_web"
LOGS_TAIL = 4000           # characters of a candidate's logs shown on its page
POLL_MS = 1500             # how often a live page asks whether its run changed
log = logging.getLogger("selfprog.web")

# default-src 'self' and nothing inline: a script or style that an LM wrote into a page
# (had escaping failed) would not run. No frames, no plugins, no <base>, forms post here.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
       "frame-ancestors 'none'")
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
]
LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "[::1]", "::1"]


def is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")


# -------------------------------------------------------------- middleware

class Guard:
    """Security headers on every response, the token check, and an access log that
    names method, path and status only (never a query string, a header or a body, so
    the token cannot reach a log)."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token
        # the browser keeps a keyed digest of the token, never the token itself
        self.cookie = hmac.new(token.encode(), b"selfprog-web-session",
                               hashlib.sha256).hexdigest() if token else ""

    def allowed(self, scope: Scope) -> bool:
        if not self.token:
            return True
        path = scope["path"]
        if path.startswith("/static/") or path in ("/login", "/favicon.ico"):
            return True
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        auth = headers.get("authorization", "")
        if auth.startswith("Bearer ") and hmac.compare_digest(auth[7:].encode(),
                                                              self.token.encode()):
            return True
        for part in headers.get("cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE and hmac.compare_digest(value.encode(), self.cookie.encode()):
                return True
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":
            return   # no websockets here: a connection nothing answers is refused
        status = {"code": 0}

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message["headers"] = list(message.get("headers", [])) + SECURITY_HEADERS
            await send(message)

        if self.allowed(scope):
            await self.app(scope, receive, send_with_headers)
        else:
            wants_json = scope["path"].startswith("/api/")
            response = (JSONResponse({"error": "a valid token is required"}, status_code=401)
                        if wants_json else
                        HTMLResponse(render("login.html", failed=False), status_code=401))
            await response(scope, receive, send_with_headers)
        log.info("%s %s %s", scope["method"], scope["path"], status["code"])


# -------------------------------------------------------------- templates

templates = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=True,
                        trim_blocks=True, lstrip_blocks=True)
templates.filters.update(score=fmt_score, design=fmt_design, share=fmt_share,
                         steps=fmt_steps, time=fmt_time,
                         pretty=lambda v: json.dumps(v, indent=2, default=json_default))


def render(name: str, **context: Any) -> str:
    return templates.get_template(name).render(**context)


def to_json(value: Any, status_code: int = 200) -> Response:
    # the CLI's JSON encoding (datetimes as ISO strings); non-finite floats are stored
    # as null by the store, so the output is strict JSON
    return Response(json.dumps(value, default=json_default, allow_nan=False),
                    status_code=status_code, media_type="application/json")


def diff_lines(diff: str) -> list[tuple[str, str]]:
    """A unified diff as (kind, line) pairs; the kind is one of a fixed set of words,
    used as a CSS class, never text from the diff."""
    out = []
    for line in diff.splitlines():
        kind = ("meta" if line.startswith(("---", "+++", "@@")) else
                "add" if line.startswith("+") else "del" if line.startswith("-") else "ctx")
        out.append((kind, line))
    return out


# -------------------------------------------------------------- pages

class WebView:
    """The routes over one read-only store (and the broker's live events, if any)."""

    def __init__(self, store: LineageStore, broker_url: str = "") -> None:
        self.store = store
        self.broker_url = broker_url if is_redis_url(broker_url) else ""

    def runs_page(self, request: Request) -> Response:
        runs = [run_summary(self.store, r.id) for r in self.store.list_runs(200)]
        return HTMLResponse(render("runs.html", runs=runs))

    def runs_api(self, request: Request) -> Response:
        return to_json([run_summary(self.store, r.id) for r in self.store.list_runs(200)])

    def _run_context(self, run_id: str) -> dict[str, Any]:
        run = self.store.get_run(run_id)
        # no sources or logs: the page shows neither, and they are most of the bytes
        its, cands = self.store.iterations(run.id), self.store.candidates(run.id, texts=False)
        detail = detail_of(run, its, cands, self.store.evaluations(run.id))
        return {"run": detail, "live": run.status not in RUN_TERMINAL_STATUSES,
                "version": run_version(detail, cands), "poll_ms": POLL_MS,
                "loss_chart": figures.lm_loss_chart(its),
                "score_chart": figures.score_chart(its, cands),
                "tree": figures.candidate_tree(its, cands, direction(run.task)),
                "events": bool(self.broker_url),
                "candidates": len(cands)}

    def run_page(self, request: Request) -> Response:
        return HTMLResponse(render("run.html", **self._run_context(request.path_params["run_id"])))

    def run_live(self, request: Request) -> Response:
        """The part of a run's page that changes while it runs (the page swaps it in)."""
        return HTMLResponse(render("run_live.html",
                                   **self._run_context(request.path_params["run_id"])))

    def run_api(self, request: Request) -> Response:
        return to_json(run_detail(self.store, request.path_params["run_id"]))

    def run_state(self, request: Request) -> Response:
        """What a live page polls: the run's status and a digest of everything shown."""
        run = self.store.get_run(request.path_params["run_id"])
        cands = self.store.candidates(run.id, texts=False)
        detail = detail_of(run, self.store.iterations(run.id), cands,
                           self.store.evaluations(run.id))
        return to_json({"id": detail["id"], "status": detail["status"],
                        "live": detail["status"] not in RUN_TERMINAL_STATUSES,
                        "version": run_version(detail, cands)})

    async def run_events(self, request: Request) -> Response:
        """The run's live events as server-sent events: what `selfprog-cli watch`
        prints, from the same Redis channel (pipeline/events.py). A live page takes each
        as a cue to ask for the run's state at once instead of at its next poll (the DB
        stays the record: an event lost is a poll later). Only with a broker."""
        if not self.broker_url:
            return to_json({"error": "no broker: live pages poll the database"}, 404)
        run = await run_in_threadpool(self.store.get_run, request.path_params["run_id"])
        follower = await run_in_threadpool(events.Follower, self.broker_url, run.id)

        async def stream():
            try:
                yield ": following\n\n"
                while not await request.is_disconnected():
                    data = await run_in_threadpool(follower.get, 1.0)
                    if data is not None:
                        # re-encoded: one line of JSON, whatever the publisher sent
                        yield f"data: {json.dumps(data, default=str)}\n\n"
            finally:
                follower.close()

        return StreamingResponse(stream(), media_type="text/event-stream")

    def candidates_api(self, request: Request) -> Response:
        run = self.store.get_run(request.path_params["run_id"])
        return to_json([candidate_record(c) for c in self.store.candidates(run.id)])

    def candidate_page(self, request: Request) -> Response:
        c = self.store.get_candidate(request.path_params["candidate_id"])
        parent = self.store.get_candidate(c.parent_id) if c.parent_id is not None else None
        _, lineage = lineage_of(self.store, c.id)
        logs = c.logs or ""
        return HTMLResponse(render(
            "candidate.html", c=candidate_record(c), parent=parent,
            diff=diff_lines(source_diff(parent, c)), same_as_parent=parent is not None
            and parent.source == c.source, lineage=lineage,
            logs_tail=logs[-LOGS_TAIL:], logs_cut=len(logs) > LOGS_TAIL))

    def candidate_api(self, request: Request) -> Response:
        return to_json(candidate_record(self.store.get_candidate(
            request.path_params["candidate_id"])))

    def lineage_api(self, request: Request) -> Response:
        return to_json(lineage_of(self.store, request.path_params["candidate_id"])[1])

    def _compared(self, request: Request) -> list[dict[str, Any]]:
        ids = [request.query_params.get(k, "").strip() for k in ("a", "b")]
        return [run_detail(self.store, i) for i in ids if i]

    def compare_page(self, request: Request) -> Response:
        compared = self._compared(request)
        chart = figures.compare_chart([(d["id"][:8], d["iterations"]) for d in compared])
        choices = [(r.id, r.task, r.preset, r.status) for r in self.store.list_runs(200)]
        return HTMLResponse(render("compare.html", compared=compared, chart=chart,
                                   choices=choices,
                                   chosen=[d["id"] for d in compared] + ["", ""]))

    def compare_api(self, request: Request) -> Response:
        return to_json(dict(zip(("a", "b"), self._compared(request))))

    def login_page(self, request: Request) -> Response:
        return HTMLResponse(render("login.html", failed=False))

    async def login(self, request: Request) -> Response:
        # A form post, not a query string: the token stays out of URLs, history and logs.
        guard: Guard = request.app.state.guard
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        given = (form.get("token") or [""])[0]
        if not guard.token or not hmac.compare_digest(given.encode(), guard.token.encode()):
            return HTMLResponse(render("login.html", failed=True), status_code=401)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, guard.cookie, httponly=True, samesite="strict")
        return response


def run_version(detail: dict[str, Any], candidates: list) -> str:
    """A digest of what a run's page shows; it changes when an iteration or a candidate
    does (the events `watch` follows: stages, candidates finishing, iterations closing)."""
    state = [detail["status"], [(r["arm"], r["index"], r["stage"], r["selected_id"],
                                 r["decision"], r["lm_steps"]) for r in detail["iterations"]],
             [(c.id, c.status, c.score) for c in candidates]]
    return hashlib.sha256(json.dumps(state, default=str).encode()).hexdigest()[:16]


# -------------------------------------------------------------- errors

def _error(request: Request, status: int, message: str) -> Response:
    if request.url.path.startswith("/api/"):
        return to_json({"error": message}, status_code=status)
    return HTMLResponse(render("error.html", status=status, message=message),
                        status_code=status)


async def _not_found(request: Request, exc: Exception) -> Response:
    return _error(request, 404, str(exc) or "not found")


async def _store_error(request: Request, exc: Exception) -> Response:
    log.warning("store error on %s: %s", request.url.path, exc)
    return _error(request, 503, "the lineage database could not be read")


def create_app(store: LineageStore, *, token: str = "", host: str = "127.0.0.1",
               broker_url: str = "") -> ASGIApp:
    """The web view over `store` (open it with read_only=True). With a token every page
    and API call needs it (an `Authorization: Bearer` header, or the cookie /login
    sets); bound to the loopback interface without one, only loopback Host headers
    are answered (a rebound DNS name cannot read the lineage from a browser). With a
    Redis `broker_url`, live pages also follow the run's events."""
    view = WebView(store, broker_url)
    cand = "/candidates/{candidate_id:int}"
    routes = [
        Route("/", view.runs_page),
        Route("/api/runs", view.runs_api),
        Route("/runs/{run_id}", view.run_page),
        Route("/runs/{run_id}/live", view.run_live),
        Route("/api/runs/{run_id}", view.run_api),
        Route("/api/runs/{run_id}/state", view.run_state),
        Route("/api/runs/{run_id}/events", view.run_events),
        Route("/api/runs/{run_id}/candidates", view.candidates_api),
        Route(cand, view.candidate_page),
        Route("/api" + cand, view.candidate_api),
        Route("/api" + cand + "/lineage", view.lineage_api),
        Route("/compare", view.compare_page),
        Route("/api/compare", view.compare_api),
        Route("/login", view.login_page, methods=["GET"]),
        Route("/login", view.login, methods=["POST"]),
        # browsers ask for it on pages without a <link rel=icon> (the JSON ones)
        Route("/favicon.ico", lambda request: RedirectResponse("/static/icon.svg", 301)),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    middleware = []
    if not token and is_loopback(host):
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=LOOPBACK_HOSTS))
    app = Starlette(routes=routes, middleware=middleware,
                    exception_handlers={404: _not_found, UnknownRun: _not_found,
                                        UnknownCandidate: _not_found,
                                        StoreError: _store_error,
                                        SQLAlchemyError: _store_error})
    # the guard is outermost: even a 404 carries the headers, and a request without
    # the token reaches no route
    guard = Guard(app, token)
    app.state.guard = guard
    return guard
