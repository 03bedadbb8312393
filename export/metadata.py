"""What every exported file says about itself, so a lone ``model.onnx`` still says how to feed it.

The same JSON document (:func:`artifact_metadata`) goes into

- ONNX ``metadata_props`` under the key ``cxr_deploy`` (plus a few flat keys for tools such as
  Netron that show properties as strings: ``class_names``, ``positive_class``, ``threshold``,
  ``preprocessing``, ``model_id``, ``package_version``);
- TorchScript ``_extra_files`` as ``cxr_deploy.json``
  (``torch.jit.load(path, _extra_files={"cxr_deploy.json": ""})``);
- the bundle manifest entry of the artifact (``metadata`` field), where ``export --check`` compares
  it with what is embedded, so a model file copied in from another bundle is caught.
"""

from __future__ import annotations

import json
from pathlib import Path

from cxr_deploy import __version__
from cxr_deploy.artifacts import INPUT_NAME, OUTPUT_NAMES
from cxr_deploy.bundle import ModelBundle

METADATA_KEY = "cxr_deploy"  # ONNX metadata_props key holding the full JSON document
EXTRA_FILE = "cxr_deploy.json"  # inside TorchScript and torch.export archives
METADATA_FORMAT = "cxr-deploy-model-metadata"
METADATA_VERSION = 1

# Fields that must match the bundle manifest for an artifact to belong to it.
IDENTITY_FIELDS = ("model_id", "class_names", "positive_class", "threshold", "preprocessing")


def artifact_metadata(bundle: ModelBundle, *, precision: str = "fp32") -> dict:
    """The self-description embedded in each artifact (pure JSON types)."""
    spec = bundle.spec
    size, cam_size = spec.input_size, spec.input_size // 32
    classes = list(bundle.class_names)
    return {
        "format": METADATA_FORMAT,
        "format_version": METADATA_VERSION,
        "package_version": __version__,
        "model_id": bundle.model_id,
        "architecture": bundle.manifest.architecture,
        "class_names": classes,
        "positive_class": bundle.manifest.positive_class,
        "positive_index": bundle.manifest.positive_index,
        "threshold": bundle.threshold,
        "temperature": bundle.manifest.temperature,  # already applied inside the graph
        "preprocessing": spec.to_dict(),
        "precision": precision,
        "input": {
            "name": INPUT_NAME, "dtype": "float32", "layout": "NCHW",
            "shape": ["N", spec.channels, size, size],
            "semantics": ("preprocessed batch: the reader's 2-D [0,1] gray image through the "
                          "'preprocessing' spec (resize policy, then (x - mean[c]) / std[c] per channel)"),
        },
        "outputs": {
            OUTPUT_NAMES[0]: {
                "dtype": "float32", "shape": ["N", len(classes)],
                "semantics": ("softmax probabilities (not logits), columns in class_names order; "
                              f"predict {bundle.manifest.positive_class} when "
                              f"probabilities[:, positive_index] >= threshold"),
            },
            OUTPUT_NAMES[1]: {
                "dtype": "float32", "shape": ["N", cam_size, cam_size],
                "semantics": ("class-activation map of the positive class at layer4 (equals Grad-CAM "
                              "for this linear head), ReLU'd and divided by its per-image maximum "
                              "(values in [0,1], all zeros when nothing is positive); covers the "
                              "preprocessed (letterboxed/cropped) input square"),
            },
            **_population_output(bundle),
        },
    }


def _population_output(bundle) -> dict:
    """The third output, for a bundle with population statistics (cxr_deploy.in_population)."""
    from cxr_deploy import in_population

    threshold = in_population.threshold_of(bundle)
    if threshold is None:
        return {}
    return {in_population.SCORE_OUTPUT: {
        "dtype": "float32", "shape": ["N"], "threshold": threshold,
        "semantics": (f"Mahalanobis distance of {in_population.FEATURE} from the nearest training class "
                      "mean (shared covariance fitted on the training split); above threshold: outside "
                      "the training population")}}


def to_json(metadata: dict) -> str:
    return json.dumps(metadata, sort_keys=True, separators=(",", ":"))


def onnx_metadata_props(metadata: dict) -> dict[str, str]:
    """String key/values for ``ModelProto.metadata_props``."""
    return {
        METADATA_KEY: to_json(metadata),
        "class_names": json.dumps(metadata["class_names"]),
        "positive_class": metadata["positive_class"],
        "threshold": repr(float(metadata["threshold"])),
        "preprocessing": json.dumps(metadata["preprocessing"], sort_keys=True),
        "model_id": metadata["model_id"],
        "package_version": metadata["package_version"],
        "precision": metadata["precision"],
    }


def read_onnx_metadata(path: str | Path) -> dict:
    """The embedded document of an ONNX file (reads the graph structure, not the weights' values)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    if METADATA_KEY not in props:
        raise ValueError(f"{path} carries no '{METADATA_KEY}' metadata: not exported by cxr-deploy")
    return json.loads(props[METADATA_KEY])


def read_archive_metadata(path: str | Path) -> dict:
    """The embedded document of a TorchScript (``.ts``) or torch.export (``.pt2``) file, without
    loading it."""
    import zipfile

    # Both are zip archives with extra files under <archive>/extra/. Reading the zip directly
    # avoids deserializing a 100 MB model just to read a few hundred bytes.
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            if name.endswith("/extra/" + EXTRA_FILE):
                return json.loads(archive.read(name))
    raise ValueError(f"{path} carries no {EXTRA_FILE}: not exported by cxr-deploy")



def identity_mismatches(embedded: dict, expected: dict) -> list[str]:
    """Fields where an artifact's embedded metadata disagrees with its bundle (empty when fine)."""
    return [f"{key}: file says {embedded.get(key)!r}, bundle says {expected.get(key)!r}"
            for key in IDENTITY_FIELDS if embedded.get(key) != expected.get(key)]
