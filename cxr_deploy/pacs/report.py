"""The model's finding as a DICOM Comprehensive SR: a TID 1500 Measurement Report, built with highdicom.

Content tree (what a PACS viewer shows)::

    Imaging Measurement Report (TID 1500)
    ├─ Language, Observation context: device observer "cxr-deploy" (its UID derives from the model id)
    ├─ Procedure reported: SCT 399208008 "Plain chest X-ray"
    ├─ Image library: the source radiograph (SOP class + instance UID)
    └─ Imaging measurements
       └─ Measurement group (TID 1501), tracking id "cxr-deploy <model id>"
          ├─ Algorithm identification (TID 4019): name, version, parameters (model id, threshold,
          │  operating point, backend; a caveat when the image is outside the training population)
          ├─ Source image: the radiograph
          ├─ Qualitative evaluation: SCT 233604007 "Pneumonia" = SCT 52101004 "Present" | 272519000 "Absent"
          ├─ Measurement: 99CXRDPL PNEUMONIA_PROB "Probability of pneumonia", unit UCUM "1"
          └─ Measurement: 99CXRDPL DECISION_THRESH "Decision threshold", unit UCUM "1"

Probability and decision threshold have no standard concept, so they use the private coding scheme
``99CXRDPL`` (DICOM reserves ``99``-prefixed designators for local schemes); the code values stay
within CodeValue's 16 characters (a longer one moves to LongCodeValue, which many readers ignore). Patient and study
attributes come from the source image (highdicom copies them from the evidence): the report goes back
into the study that holds the image.
"""

from __future__ import annotations

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes

from ..decision import number_text
from .uids import DEFAULT_UID_ROOT, derived_uid

PNEUMONIA = hd.sr.CodedConcept("233604007", "SCT", "Pneumonia")
PRESENT = hd.sr.CodedConcept("52101004", "SCT", "Present")
ABSENT = hd.sr.CodedConcept("272519000", "SCT", "Absent")
CHEST_XRAY = hd.sr.CodedConcept("399208008", "SCT", "Plain chest X-ray")
LOCAL_SCHEME = "99CXRDPL"
PROBABILITY = hd.sr.CodedConcept("PNEUMONIA_PROB", LOCAL_SCHEME, "Probability of pneumonia")
THRESHOLD = hd.sr.CodedConcept("DECISION_THRESH", LOCAL_SCHEME, "Decision threshold")
UNITLESS = codes.UCUM.NoUnits
MANUFACTURER = "cxr-deploy"
SR_SERIES_NUMBER = 9901  # high, so the results sort after the acquisition's own series
SC_SERIES_NUMBER = 9902


def build_report(source: pydicom.Dataset, *, probability: float, threshold: float, positive: bool, model_id: str,
                 model_name: str, version: str, backend: str = "", operating_point: str = "default",
                 uid_root: str = DEFAULT_UID_ROOT, caveat: str = "") -> hd.sr.ComprehensiveSR:
    """The TID 1500 report of one scored radiograph (``source``: its data set, pixels not needed)."""
    uid = source.SOPInstanceUID
    algorithm = hd.sr.AlgorithmIdentification(
        name=model_name, version=version,
        parameters=[f"model_id={model_id}", f"threshold={number_text(threshold)}",
                    f"operating_point={operating_point}", f"backend={backend or 'unknown'}",
                    *([f"caveat={caveat}"] if caveat else [])])
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=derived_uid(uid, model_id, "sr-tracking", uid_root),
                                                     identifier=f"cxr-deploy {model_id}"),
        algorithm_id=algorithm,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(PNEUMONIA, PRESENT if positive else ABSENT)],
        # Exact floats: highdicom writes them as FloatingPointValue (FD, exact) besides the 16-character
        # NumericValue (DS), so the two read back give the qualitative evaluation above.
        measurements=[hd.sr.Measurement(PROBABILITY, float(probability), UNITLESS, algorithm_id=algorithm),
                      hd.sr.Measurement(THRESHOLD, float(threshold), UNITLESS)],
    )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derived_uid(uid, model_id, "device", uid_root), name=MANUFACTURER, manufacturer_name=MANUFACTURER,
            model_name=f"{model_name} {model_id}"))
    context = hd.sr.ObservationContext(observer_device_context=observer)
    try:
        content = hd.sr.MeasurementReport(observation_context=context, procedure_reported=CHEST_XRAY,
                                          imaging_measurements=[group], referenced_images=[source])
    except (AttributeError, ValueError, TypeError):
        # highdicom's image library needs descriptors (e.g. ImagerPixelSpacing) that CR images may
        # lack (Type 3 there): the source image stays referenced by the measurement group and in
        # the evidence sequence.
        content = hd.sr.MeasurementReport(observation_context=context, procedure_reported=CHEST_XRAY,
                                          imaging_measurements=[group])
    report = hd.sr.ComprehensiveSR(
        evidence=[source], content=content[0],
        series_instance_uid=derived_uid(uid, model_id, "sr-series", uid_root), series_number=SR_SERIES_NUMBER,
        sop_instance_uid=derived_uid(uid, model_id, "sr-instance", uid_root), instance_number=1,
        manufacturer=MANUFACTURER, is_complete=True, is_final=False, is_verified=False,
    )
    report.SeriesDescription = "cxr-deploy AI result (decision support, not a diagnosis)"
    return report
