"""The ``cxr-deploy`` command. Sub-commands are imported only when invoked, so ``batch`` on an
inference box never imports training code and ``--help`` stays fast."""

from __future__ import annotations

import importlib
import sys

import click

from . import __version__

# name -> (module, attribute). Training/export commands live in their own packages.
COMMANDS = {
    "inspect": ("cxr_deploy.inspect", "inspect_command"),
    "batch": ("cxr_deploy.batch.cli", "batch_command"),
    "evaluate": ("cxr_deploy.batch.cli", "evaluate_command"),
    "train": ("cxr_deploy.training.cli", "train_command"),
    "lr-find": ("cxr_deploy.training.cli", "lr_find_command"),
    "sweep": ("cxr_deploy.training.cli", "sweep_command"),
    "export": ("cxr_deploy.export.cli", "export_command"),
    "pacs": ("cxr_deploy.pacs.cli", "pacs_group"),
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
    "pacs": "Pull images from a PACS (DICOMweb), push results to it (STOW-RS or C-STORE).",
    "demo": "Whole pipeline on samples/: demo train -> export -> batch -> report.",
}


ERROR_PREFIX = "cxr-deploy: error:"


def fail(message: str, code: int = 2) -> None:
    """Every command's one-line error: ``cxr-deploy: error: <message>`` on stderr, then exit."""
    click.echo(f"{ERROR_PREFIX} {' '.join(str(message).split())}", err=True)
    sys.exit(code)


class LazyGroup(click.Group):
    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """Click's standalone mode, with one error prefix for every command (click's own usage
        errors and the commands' ClickExceptions print ``Error:`` by default)."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        except click.ClickException as exc:
            ctx = getattr(exc, "ctx", None)
            if isinstance(exc, click.UsageError) and ctx is not None:
                click.echo(ctx.get_usage(), err=True)
                click.echo(f"Try '{ctx.command_path} {ctx.help_option_names[0]}' for help.", err=True)
            fail(exc.format_message(), exc.exit_code)
        sys.exit(0)


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
