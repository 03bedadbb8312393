"""The ``cxr-deploy`` command. Sub-commands are imported only when invoked, so ``batch`` on an
inference box never imports training code and ``--help`` stays fast."""

from __future__ import annotations

import importlib
import sys

import click

from . import __version__
from .errors import ERROR_PREFIX

# name -> (module, attribute). Training/export commands live in their own packages.
COMMANDS = {
    "inspect": ("cxr_deploy.inspect", "inspect_command"),
    "batch": ("cxr_deploy.batch.cli", "batch_command"),
    "evaluate": ("cxr_deploy.reporting.cli", "evaluate_command"),
    "train": ("cxr_deploy.training.cli", "train_command"),
    "lr-find": ("cxr_deploy.training.cli", "lr_find_command"),
    "sweep": ("cxr_deploy.training.cli", "sweep_command"),
    "export": ("cxr_deploy.export.cli", "export_command"),
    "calibrate": ("cxr_deploy.export.calibrate_cli", "calibrate_command"),
    "pacs": ("cxr_deploy.pacs.cli", "pacs_group"),
    "review": ("cxr_deploy.review.cli", "review_command"),
    # The demo orchestrates training, export and batch through their Python APIs.
    "demo": ("cxr_deploy.demo", "demo_command"),
}

SHORT_HELP = {
    "inspect": "Show what the reader sees in images/folders, or a bundle's manifest.",
    "batch": "Predict over PNG/JPEG/DICOM files and folders into a CSV (+ report, overlays).",
    "evaluate": "Metric report (JSON + HTML) from an existing results CSV and labels.",
    "train": "Fine-tune ResNet50 (two stages) and write a model bundle.",
    "lr-find": "Learning-rate range test: plot loss vs LR and suggest an LR.",
    "sweep": "Grid over optimizer x LR x weight decay x batch size.",
    "export": "Write TorchScript + ONNX (+ fp16/int8) into a bundle, gated by a parity check.",
    "calibrate": "Fit temperature and operating points on a site's labelled images into a new bundle.",
    "pacs": "Pull images from a PACS (DICOMweb), push results to it (STOW-RS or C-STORE).",
    "review": "Local review page: results beside their images and overlays; verdicts to a reviews CSV.",
    "demo": "Whole pipeline on samples/: demo train -> export -> batch -> report.",
}


EXIT_INTERRUPTED = 130
INTERRUPTED_MESSAGE = "interrupted (Ctrl-C or SIGTERM); outputs written so far are complete"


def _exit_code(code) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    click.echo(str(code), err=True)  # sys.exit("message"): Python prints it and exits 1
    return 1


def _interrupted() -> int:
    from . import signals

    with signals.deferred(raise_at_end=False):
        click.echo(f"{ERROR_PREFIX} {INTERRUPTED_MESSAGE}", err=True)
    return EXIT_INTERRUPTED


class LazyGroup(click.Group):
    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """Click's standalone mode, with one error prefix for every command (click's own usage
        errors and the commands' ClickExceptions print ``Error:`` by default), and the signal
        contract of :mod:`cxr_deploy.signals`: Ctrl-C/SIGTERM at any moment exit 130, never click's
        ``Aborted!`` / 1, never death by the signal."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        from . import signals
        from .quiet import dicom_warnings_once

        if args is not None:  # run in-process (a test's CliRunner, a script): its host keeps its signals
            with signals.stop_signals_to_main_thread():
                code = self._run(args, prog_name, complete_var, **extra)
            sys.exit(code)
        try:
            signals.install()  # before anything else: parsing, imports, workers, output files
            dicom_warnings_once()
            code = self._run(args, prog_name, complete_var, **extra)
            if signals.interrupted() and code not in (0, EXIT_INTERRUPTED):
                # The interrupt was raised but swallowed on the way (inside a callback or a
                # finalizer: "Exception ignored") and the command went on to fail: it was still
                # interrupted (seen: a SIGTERM in an import lock's callback, then exit 2 for a
                # config it never finished reading). 0 stays: listen and review stop that way.
                code = _interrupted()
            signals.finish()  # every output is complete: a signal from now on changes nothing
        except KeyboardInterrupt:  # landed between the command's end and finish()
            code = _interrupted()  # (no second interrupt is raised while stopping)
            signals.finish()
        if signals.interrupted():
            signals.exit_now(code)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe: nothing more to say
                pass
        sys.exit(code)

    def _run(self, args, prog_name, complete_var, **extra) -> int:
        """Run the command; its exit code."""
        try:
            super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except SystemExit as exc:
            return _exit_code(exc.code)
        except click.exceptions.Exit as exc:
            return exc.exit_code
        except (KeyboardInterrupt, click.exceptions.Abort) as exc:
            # click turns KeyboardInterrupt (and EOF at a prompt) into Abort
            if isinstance(exc, KeyboardInterrupt) or isinstance(exc.__context__, KeyboardInterrupt):
                return _interrupted()
            click.echo("Aborted!", err=True)
            return 1
        except click.ClickException as exc:
            ctx = getattr(exc, "ctx", None)
            if isinstance(exc, click.UsageError) and ctx is not None:
                click.echo(ctx.get_usage(), err=True)
                click.echo(f"Try '{ctx.command_path} {ctx.help_option_names[0]}' for help.", err=True)
            click.echo(f"{ERROR_PREFIX} {' '.join(str(exc.format_message()).split())}", err=True)
            return exc.exit_code
        except ImportError as exc:  # train, export, demo... on an inference-only install (no torch)
            from .errors import TRAIN_EXTRA, torch_is_missing

            if not torch_is_missing(exc):
                raise
            command = next((a for a in (sys.argv[1:] if args is None else args) if a in COMMANDS), "this command")
            click.echo(f"{ERROR_PREFIX} {command} needs PyTorch, which is not installed here: {TRAIN_EXTRA}", err=True)
            return 2
        return 0

    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name]
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx, formatter):
        # Listing must not import every sub-command (torch, onnxruntime, training...).
        rows = [(name, SHORT_HELP.get(name, "")) for name in COMMANDS]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cxr-deploy")
def main():
    """Chest X-ray Normal vs Pneumonia: train, export, and run over real archives.

    Not a medical device: models trained with this tool need local clinical validation.
    """


if __name__ == "__main__":
    main()
