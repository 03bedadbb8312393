"""Where training's starting weights come from: ``--weights imagenet | none | FILE | BUNDLE_DIR``.

The runtime's :func:`cxr_deploy.model.build_model` knows ImageNet, random init, state_dict files and
state_dicts; continuing from an existing *bundle* is a training concern, resolved here (so the
runtime's model builder never imports the bundle code that itself builds models).
"""

from __future__ import annotations

from pathlib import Path


def resolve_weights(weights):
    """``weights`` as :func:`~cxr_deploy.model.build_model` takes it: a bundle folder becomes its
    verified state_dict; everything else passes through unchanged."""
    if weights is not None and not isinstance(weights, dict) and Path(str(weights)).is_dir():
        from cxr_deploy.bundle import ModelBundle

        return ModelBundle.load(weights).state_dict()  # fine-tune further from an existing bundle
    return weights
