"""``cxr-deploy batch``: the runner and its engines, from input files to the results CSV (and the
overlays and DICOM results beside it). The model runtime it drives is :mod:`cxr_deploy.serving`; the
metric report of its CSV, :mod:`cxr_deploy.reporting`.

What a run is asked and what it may touch:

- :mod:`.settings`: :class:`BatchConfig`, :class:`BatchSummary` and the exit codes;
- :mod:`.choices`: the option values of ``batch`` (cheap to import for ``--help``);
- :mod:`.inputs`: input expansion (folders, files, ``@lists``), shards, the checks before any work;
- :mod:`.outputs`: where a run may write (never onto an input), the run lock, resume's missing outputs;
- :mod:`.cli`: ``cxr-deploy batch``.

The local engine:

- :mod:`.runner`: the streaming run (decode window, batches for the model, rows in input order);
- :mod:`.pool`: the decode worker processes and the recovery from a hung or dead worker;
- :mod:`.decode`: what a worker does: file to resized gray (or stored samples), CAM to overlay;
- :mod:`.rows`: one results row from a decoded file and the model's output: where a row's decision is made;
- :mod:`.results_file`: the results CSV, a versioned contract written so a crash never corrupts it;
- :mod:`.overlay`: where an overlay is drawn (Grad-CAM heat over the image, caption, identity), and
  :mod:`.png`, its fast lossless PNG writer;
- :mod:`.progress`: the progress bar.

``--preprocess-on device``:

- :mod:`.staging`: where the per-pixel float work runs and how decoded files become the model's input;
- :mod:`.device_stage`: that work on the model's device (torch);
- :mod:`.shm`: stored samples from the workers through reused shared-memory slots.

The Ray engine (``--engine ray``):

- :mod:`.ray_engine`: the driver; :mod:`.ray_stages`: the decode and model stages on the cluster;
- :mod:`.parts`: per-task result parts and their merge into the one CSV.
"""
