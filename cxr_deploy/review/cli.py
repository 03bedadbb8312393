"""``cxr-deploy review``: a local web page to check results beside their images and record verdicts.

Stack: Starlette + uvicorn (see docs/review.md for why), run in a thread of this process while the
main thread waits under :mod:`cxr_deploy.signals`, as ``pacs listen`` does: Ctrl-C or SIGTERM stop
the server (open requests get two seconds), and the command exits 0 with every verdict on disk
(each one was fsync'ed when it was saved).
"""

from __future__ import annotations

import os
import secrets
import socket
import sys
import threading
import time
from pathlib import Path

import click

from ..errors import CxrDeployError

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
START_TIMEOUT_S = 30.0


class ReviewUsageError(CxrDeployError, click.ClickException):
    """One line on stderr (``cxr-deploy: error: ...``), exit 2."""

    exit_code = 2

    def __init__(self, message: str):
        click.ClickException.__init__(self, message)


@click.command("review")
@click.argument("results", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--labels", "labels_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Labels CSV (path,label; a REVIEWS.csv works too): the table's label column and the slider's truth.")
@click.option("--reviews", "reviews_path", type=click.Path(dir_okay=False), default=None,
              help="Where verdicts are appended (default: <first results>_reviews.csv beside it).")
@click.option("--model", "model_path", type=click.Path(exists=True, file_okay=False), default=None,
              help="The bundle the results came from: its named operating points are marked on the slider.")
@click.option("--class-names", default="NORMAL,PNEUMONIA", show_default=True,
              help="Comma-separated class names (ignored with --model: the bundle's).")
@click.option("--positive-class", default="PNEUMONIA", show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but this machine's loopback opens the results to the network "
                   "(a warning is printed); the token is still required.")
@click.option("--port", type=click.IntRange(0, 65535), default=0, show_default=True,
              help="0 picks a free port; the URL printed has the real one.")
def review_command(results, labels_path, reviews_path, model_path, class_names, positive_class, host, port):
    """Review RESULTS (CSV files of `batch`) in a browser: the original image beside its Grad-CAM
    overlay, filters and sorting, verdicts (agree / disagree / unsure) appended to a reviews file,
    and an operating-point slider with sensitivity and specificity (Wilson 95 % intervals) when
    labels or verdicts give a truth. Prints the URL (with its token) on stdout; Ctrl-C stops it."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    review = _open_session(results, labels_path, reviews_path, model_path, class_names, positive_class)
    if host not in LOCAL_HOSTS:
        click.echo(f"cxr-deploy: warning: listening on {host}: anyone who can reach this address and has the URL "
                   "can read these results and images; use the default 127.0.0.1 unless you mean it", err=True)
    token = secrets.token_urlsafe(32)
    try:
        sock = _listen(host, port)
    except OSError as exc:
        raise ReviewUsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    real_port = sock.getsockname()[1]
    _serve(review, sock, token, f"http://{_url_host(host)}:{real_port}/?token={token}", real_port)


def _open_session(results, labels_path, reviews_path, model_path, class_names, positive_class):
    from ..errors import CxrDeployError
    from ..labels import LabelsError
    from .server import Review
    from .store import VerdictStore
    from .table import Table

    names = tuple(n.strip() for n in class_names.split(",") if n.strip())
    points, note = None, ""
    if model_path:
        from ..bundle import ModelBundle

        try:
            bundle = ModelBundle.load(model_path, verify=False)  # the manifest only: no model is run
        except CxrDeployError as exc:
            raise ReviewUsageError(str(exc)) from None
        names, positive_class = bundle.class_names, bundle.manifest.positive_class
        points = (bundle.manifest.training or {}).get("operating_points") or {}
        note = f"{Path(model_path).name} (model {bundle.model_id})"
    if positive_class not in names:
        raise ReviewUsageError(f"--positive-class {positive_class} is not among the class names {','.join(names)}")
    labels = None
    if labels_path:
        from ..reporting.label_match import LabelIndex

        try:
            labels = LabelIndex.from_csv(labels_path, names, positive_class)
        except LabelsError as exc:
            raise ReviewUsageError(str(exc)) from None
    reviews = Path(reviews_path) if reviews_path else Path(results[0]).with_name(Path(results[0]).stem + "_reviews.csv")
    if os.path.realpath(reviews) in {os.path.realpath(r) for r in results}:
        raise ReviewUsageError(f"--reviews {reviews} is one of the results files; give another file")
    try:
        table = Table(results, names, positive_class, labels)
        store = VerdictStore(reviews)
    except CxrDeployError as exc:
        raise ReviewUsageError(str(exc)) from None
    click.echo(f"reviewing {len(results)} results file(s); verdicts go to {reviews}"
               + (f"; labels: {labels_path}" if labels_path else ""), err=True)
    return Review(table, store, points, note, bundle.model_id if model_path else "")


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)  # the printed URL works from now on: connections wait for the loop
        sock.set_inheritable(False)
    except OSError:
        sock.close()
        raise
    return sock


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _serve(review, sock: socket.socket, token: str, url: str, port: int) -> None:
    import uvicorn

    from ..signals import check as check_stop
    from ..signals import stop_signals_to_main_thread
    from .server import build_app

    app = build_app(review, token, cookie=f"cxr_review_{port}")  # one cookie per port: servers side by side
    config = uvicorn.Config(app, log_config=None, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=2, server_header=False, date_header=False)
    server = uvicorn.Server(config)
    # uvicorn in a thread installs no signal handlers: Ctrl-C/SIGTERM stay with cxr_deploy.signals.
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="cxr-deploy-review", daemon=True)
    with stop_signals_to_main_thread():
        try:
            review.start_loading()  # the first rows are there in milliseconds; the page shows the progress
            thread.start()
            deadline = time.monotonic() + START_TIMEOUT_S
            while not server.started and thread.is_alive() and time.monotonic() < deadline:
                thread.join(0.05)
            if not server.started:
                raise ReviewUsageError("the web server did not start (see the messages above)")
            click.echo(f"review: {url}")
            click.echo("open it in a browser on this machine; Ctrl-C stops the server", err=True)
            sys.stdout.flush()
            while thread.is_alive():
                thread.join(0.5)
                check_stop()  # an interrupt lost in a finalizer still stops the server
        except KeyboardInterrupt:
            click.echo("stopping: every verdict saved so far is in " + str(review.store.path), err=True)
        finally:
            server.should_exit = True
            thread.join(5)
            sock.close()
    click.echo(f"{len(review.store.latest)} verdict(s) in force in {review.store.path}", err=True)
