"""The ``cxr-deploy`` command. Sub-commands are imported only when invoked, so ``batch`` on an
inference box never imports training code and ``--help`` stays fast."""

from __future__ import annotations

import importlib

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
    # The demo trains a model, so it lives with training (the runtime never imports training).
    "demo": ("cxr_deploy.training.demo", "demo_command"),
}

SHORT_HELP = {
    "inspect": "Show what the reader sees in images/folders, or a bundle's manifest.",
    "batch": "Predict over PNG/JPEG/DICOM files and folders into a CSV (+ report, overlays).",
    "evaluate": "Metric report (JSON + HTML) from an existing results CSV and labels.",
    "train": "Fine-tune ResNet50 (two stages) and write a model bundle.",
    "lr-find": "Learning-rate range test: plot loss vs LR and suggest an LR.",
    "sweep": "Grid over optimizer x LR x weight decay x batch size.",
    "export": "Write TorchScript + ONNX (+ fp16/int8) into a bundle, gated by a parity check.",
    "demo": "Whole pipeline on samples/: demo train -> export -> batch -> report.",
}


class LazyGroup(click.Group):
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
