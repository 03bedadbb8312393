"""The review web app (Starlette) and its token gate.

Every request needs the session's token, as Jupyter does it: the printed URL carries it once
(``/?token=...``); that first request sets it as an HTTP-only, same-site cookie and redirects to
``/`` so the token leaves the address bar; later requests carry the cookie (or an
``Authorization: token ...`` header, for scripts). A request without it gets 403 and a log line.
State-changing requests must also be JSON (a cross-site form cannot send it) from our own origin.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import secrets
import threading
from importlib import resources

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse as _StarletteJSON
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from ..errors import CxrDeployError
from .images import FileGate, Refused, overlay_info, render_original, window_info
from .metrics import figures, named_points
from .store import ReviewsError
from .table import REVIEW_NAMES, SORT_KEYS, STATUSES, Table

log = logging.getLogger("cxr_deploy.review")
ASSETS = {"app.js": "text/javascript", "app.css": "text/css", "index.html": "text/html"}


class JSONResponse(_StarletteJSON):
    """JSON in ASCII: a path with bytes that are not UTF-8 (kept by Python as surrogates, as the
    results CSV keeps them) is sent as ``\\udcXX`` escapes instead of failing the response."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


class TokenGate:
    """ASGI middleware: the token, checked in constant time, on every request."""

    def __init__(self, app, token: str, cookie: str):
        self.app, self.token, self.cookie = app, token, cookie

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        given = request.query_params.get("token")
        if given is not None and secrets.compare_digest(given.encode(), self.token.encode()):
            response = RedirectResponse("/" if scope["path"] == "/" else scope["path"], status_code=303)
            response.set_cookie(self.cookie, self.token, httponly=True, samesite="strict")
            return await response(scope, receive, send)
        header = request.headers.get("authorization", "")
        presented = request.cookies.get(self.cookie) or (header[6:].strip() if header.lower().startswith("token ") else "")
        if not presented or not secrets.compare_digest(presented.encode(), self.token.encode()):
            client = scope.get("client") or ("?", 0)
            log.warning("refused (403): %s %s from %s: %s token", scope["method"], scope["path"], client[0],
                        "invalid" if presented or given is not None else "no")
            return await Response("403: this review session needs its token (open the URL the command printed)",
                                  status_code=403, media_type="text/plain")(scope, receive, send)
        return await self.app(scope, receive, send)


def filters_of(params, table: Table) -> dict:
    """The filters of a query string, checked (bad values are a 400, never a silent no-filter)."""
    f = {}
    status, decision = params.get("status") or "", params.get("decision") or ""
    if status:
        _check(status in STATUSES, f"status must be one of {', '.join(STATUSES)}")
        f["status"] = status
    if decision:
        _check(decision in table.class_names, f"decision must be one of {', '.join(table.class_names)}")
        f["decision"] = decision
    for name in ("pmin", "pmax"):
        if params.get(name) not in (None, ""):
            f[name] = _number(params[name], name)
    disagree = params.get("disagree") or ""
    _check(disagree in ("", "label", "review", "any"), "disagree must be label, review or any")
    f["disagree"] = disagree
    f["unreviewed"] = params.get("unreviewed") in ("1", "true")
    f["outside"] = params.get("outside") in ("1", "true")
    return f


class BadRequest(CxrDeployError):
    """A request with a bad parameter: 400 and the one-line reason."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise BadRequest(message)


def _number(text: str, name: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise BadRequest(f"{name} must be a number") from None
    _check(math.isfinite(value), f"{name} must be finite")
    return value


class Review:
    """The session: the table, the verdict store, the file gate and the named points."""

    def __init__(self, table: Table, store, operating_points: dict | None = None, model_note: str = "",
                 model_id: str = ""):
        self.table, self.store, self.model_id = table, store, model_id
        self.operating_points, self._points = operating_points, (-1, [])
        self.model_note = model_note
        self.gate = FileGate()
        self.lock = threading.Lock()

    def load(self) -> None:
        """Read the results files into the table, chunk by chunk, each added under the lock (the
        server answers meanwhile; the page shows how far it got)."""
        try:
            for index, part in self.table.chunks():
                with self.lock:
                    keys = self.table.append(index, part)
                    self.gate.add(part["path"] + part.get("overlay_path", []))
                    self.store.refresh()
                    changed = self.store.take_changed()
                    self.table.apply_verdicts(self.store, [k for k in keys if k in self.store.latest] + list(changed))
        except Exception as exc:  # a bad row deep in a file: say so on the page and the terminal
            self.table.error = str(exc)
            log.error("stopped reading the results: %s", exc)
        finally:
            self.table.done = True
        ids = {m for m in self.table.columns.get("model_id", []) if m}
        if self.model_id and ids and self.model_id not in ids:
            log.warning("--model is model %s; the results come from %s: its named points may not apply",
                        self.model_id, ", ".join(sorted(ids)))
        log.info("%d rows read", self.table.n)

    def start_loading(self) -> threading.Thread:
        thread = threading.Thread(target=self.load, name="cxr-deploy-review-load", daemon=True)
        thread.start()
        return thread

    def sync(self) -> None:
        """Take in verdicts other tabs or other reviewers' servers appended."""
        with self.lock:
            self.store.refresh()
            changed = self.store.take_changed()
            if changed:
                self.table.apply_verdicts(self.store, changed)

    @property
    def points(self) -> list[dict]:
        with self.lock:
            if self._points[0] != self.table.n:
                self._points = (self.table.n, named_points(self.table, self.operating_points))
            return self._points[1]

    def row_id(self, text: str) -> int:
        try:
            i = int(text)
        except ValueError:
            raise BadRequest("row ids are numbers") from None
        if not 0 <= i < self.table.n:
            raise Refused(404, "no such row")
        return i

    def meta(self) -> dict:
        t = self.table
        truths = ["labels", "reviews"] if t.labels is not None else ["reviews"]
        return {"rows": t.n, "sources": t.sources, "class_names": list(t.class_names), "positive": t.positive,
                "labels": t.labels_source, "reviews": str(self.store.path), "population": t.has_population,
                "points": self.points, "truth_sources": truths, "model": self.model_note,
                "loading": {"rows": t.n, "done": t.done, "error": t.error},
                "models": sorted({m for m in t.columns.get("model_id", []) if m}) if t.done else [],
                "statuses": {s: int((t.status == k).sum()) for k, s in enumerate(STATUSES)}}

    def rows(self, params) -> dict:
        f = filters_of(params, self.table)
        sort = params.get("sort") or "row"
        _check(sort in SORT_KEYS, f"sort must be one of {', '.join(SORT_KEYS)}")
        descending = params.get("desc") in ("1", "true")
        offset = int(_number(params.get("offset") or "0", "offset"))
        limit = int(_number(params.get("limit") or "50", "limit"))
        with self.lock:
            ids = self.table.select(f, sort, descending)
            page = self.table.page(ids, max(0, offset), max(1, limit))
        return {"total": int(len(ids)), "offset": offset, "rows": page, "complete": self.table.done}

    def neighbour(self, i: int, params) -> dict:
        """The row before/after ``i`` in the current filtered, sorted order (the viewer's keys). A
        row the filters no longer show (just reviewed, under "not yet reviewed") keeps its place:
        next is the first shown row after it in the sort order."""
        step = {"prev": -1, "next": 1}.get(params.get("dir") or "next", 0)
        sort, descending = params.get("sort") or "row", params.get("desc") in ("1", "true")
        _check(sort in SORT_KEYS, f"sort must be one of {', '.join(SORT_KEYS)}")
        with self.lock:
            f = filters_of(params, self.table)
            ids = self.table.select(f, sort, descending)
            if not len(ids):
                return {"id": None, "position": None, "total": 0}
            where = np.flatnonzero(ids == i)
            if len(where):
                at = int(where[0]) + step
            else:
                order = self.table.select({}, sort, descending)
                rank = np.empty(self.table.n, np.int64)
                rank[order] = np.arange(self.table.n)
                at = int(np.searchsorted(rank[ids], rank[i])) - (step < 0)
        at = min(max(at, 0), len(ids) - 1)
        return {"id": int(ids[at]), "position": at, "total": int(len(ids))}

    def detail(self, i: int) -> dict:
        row = self.table.row(i)
        out = self.table.page_row(i)
        out.update({k: row[k] for k in ("model_id", "format", "modality", "error")})
        overlay = overlay_info(self.gate, row) if row["status"] == "ok" else {"ok": False, "reason": "", "caption": ""}
        out["overlay"] = {k: v for k, v in overlay.items() if k != "path"}
        out["window"] = None
        if row["status"] != "skipped":
            try:
                out["window"] = window_info(self.gate.check(row["path"], "image"))
            except Exception:  # unreadable now (moved, corrupt): the image request says why
                out["window"] = None
        entry = self.store.verdict(self.table.key(i))
        out["verdict"] = {k: entry.get(k, "") for k in ("verdict", "correct_class", "reviewer", "comment",
                                                        "reviewed_at")} if entry else None
        return out

    def verdict(self, i: int, body: dict) -> dict:
        row = self.table.row(i)
        try:
            entry = self.store.append(row, verdict=str(body.get("verdict", "")),
                                      correct_class=str(body.get("correct_class") or ""),
                                      comment=str(body.get("comment") or ""), reviewer=str(body.get("reviewer") or ""),
                                      class_names=self.table.class_names)
        except ReviewsError as exc:
            raise BadRequest(str(exc)) from None
        self.sync()
        return {"id": i, "verdict": entry.get("verdict"), "correct_class": entry.get("correct_class", ""),
                "review": REVIEW_NAMES[self.table.review[i]] if self.table.review[i] >= 0 else ""}

    def image(self, i: int, q) -> Response:
        """The input rendered (PNG); ``wc``/``ww``: a window instead of the file's VOI."""
        path = self.gate.check(self.table.row(i)["path"], "image")
        centre = _number(q["wc"], "wc") if q.get("wc") else None
        width = _number(q["ww"], "ww") if q.get("ww") else None
        try:
            data = render_original(path, centre, width)
        except Exception as exc:  # UnreadableImage and friends: say why, in one line
            raise Refused(422, f"cannot render this image: {exc}") from None
        return Response(data, media_type="image/png", headers={"Cache-Control": "no-store"})

    def overlay(self, i: int, q=None) -> Response:
        """The row's overlay file, once it proved to be this row's (see :func:`overlay_info`)."""
        info = overlay_info(self.gate, self.table.row(i))
        if not info["ok"]:
            refused = "another input" in info["reason"] or "outside" in info["reason"]
            raise Refused(403 if refused else 404, info["reason"])
        kind = "image/jpeg" if info["path"].suffix.lower() in (".jpg", ".jpeg") else "image/png"
        return Response(info["path"].read_bytes(), media_type=kind, headers={"Cache-Control": "no-store"})

    def figures(self, q) -> dict:
        threshold = _number(q.get("threshold") or "0.5", "threshold")
        _check(0.0 <= threshold <= 1.0, "threshold must be within [0, 1]")
        source = q.get("source") or "labels"
        _check(source in ("labels", "reviews"), "source must be labels or reviews")
        with self.lock:
            return figures(self.table, threshold, source)


def build_app(review: Review, token: str, cookie: str = "cxr_review") -> TokenGate:
    def handle(work):
        def endpoint(request: Request):
            try:
                return work(request)
            except BadRequest as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)
            except Refused as exc:
                return JSONResponse({"error": exc.reason}, status_code=exc.status)
        return endpoint

    def static(request):
        name = request.path_params.get("name", "index.html")
        if name not in ASSETS:  # a fixed list: no path from a URL ever reaches the file system
            log.warning("refused (404): /static/%s is not one of the page's files", name[:200])
            return Response("404", status_code=404, media_type="text/plain")
        return _asset(name)

    def synced(method):
        def work(request):
            review.sync()
            return JSONResponse(method(request))
        return work

    def row(method):
        return lambda request: method(review.row_id(request.path_params["id"]), request.query_params)

    async def verdict(request: Request):
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return JSONResponse({"error": "send JSON"}, status_code=415)
        origin = request.headers.get("origin")
        if origin and origin.split("//", 1)[-1] != request.headers.get("host"):
            log.warning("refused (403): verdict from origin %s", origin[:100])
            return JSONResponse({"error": "cross-origin request"}, status_code=403)
        try:
            body = json.loads(await request.body())
            _check(isinstance(body, dict), "send a JSON object")
        except (ValueError, BadRequest):
            return JSONResponse({"error": "send a JSON object"}, status_code=400)
        from starlette.concurrency import run_in_threadpool

        work = handle(lambda r: JSONResponse(review.verdict(review.row_id(r.path_params["id"]), body)))
        return await run_in_threadpool(work, request)

    routes = [
        Route("/", handle(static)), Route("/static/{name:path}", handle(static)),
        Route("/api/meta", handle(synced(lambda r: review.meta()))),
        Route("/api/rows", handle(synced(lambda r: review.rows(r.query_params)))),
        Route("/api/row/{id}", handle(synced(row(lambda i, q: review.detail(i))))),
        Route("/api/row/{id}/neighbour", handle(synced(row(review.neighbour)))),
        Route("/api/row/{id}/verdict", verdict, methods=["POST"]),
        Route("/api/metrics", handle(synced(lambda r: review.figures(r.query_params)))),
        Route("/image/{id}", handle(row(review.image))), Route("/overlay/{id}", handle(row(review.overlay))),
    ]
    return TokenGate(Starlette(routes=routes), token, cookie)


@functools.lru_cache(maxsize=None)
def _asset_bytes(name: str) -> bytes:
    return resources.files("cxr_deploy.review").joinpath("static").joinpath(name).read_bytes()


def _asset(name: str) -> Response:
    return Response(_asset_bytes(name), media_type=ASSETS[name],
                    headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
                             "Content-Security-Policy": "default-src 'self'; img-src 'self' blob:; "
                                                        "style-src 'self'; script-src 'self'; frame-ancestors 'none'"})
