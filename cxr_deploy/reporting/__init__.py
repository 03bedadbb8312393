"""The metric report: results CSV(s) + labels -> report.json, ROC/PR/calibration PNGs and one
self-contained HTML page (``batch --labels`` and ``cxr-deploy evaluate``).

- :mod:`.report`: the metrics (scikit-learn), their confidence intervals and the files;
- :mod:`.report_dir`: the report folder's file names and the guard against replacing what is not ours;
- :mod:`.label_match`: which label belongs to a results row (by absolute path or the longest trailing
  part; or the parent folder's name);
- :mod:`.evaluation_set`: the rows ``evaluate`` may score together (each image once, one model, one
  threshold);
- :mod:`.cli`: ``cxr-deploy evaluate``, and the report steps it shares with ``batch``.
"""
