"""PACS integration: DICOM results written with highdicom, and ``cxr-deploy pacs pull | push | listen``.

DICOM results (``batch --dicom-out``):

- :mod:`.uids`: deterministic UIDs for the objects we write (a rerun replaces, never duplicates),
  and which UIDs may name a file;
- :mod:`.report`: the Comprehensive SR, TID 1500 Measurement Report with the model's finding;
- :mod:`.capture`: the Secondary Capture of the Grad-CAM overlay ("NOT FOR DIAGNOSTIC USE" burned in);
- :mod:`.sanitize`: the one gate for source attributes copied into both (invalid values, lengths,
  character set);
- :mod:`.results`: both objects for one scored input, written atomically.

Talking to a PACS:

- :mod:`.config`: the one TOML file for the PACS endpoints (and the listener's settings);
- :mod:`.dicomweb`: the DICOMweb client, set up from the config (https verification, auth);
- :mod:`.transfer`: ``pull`` into the spool and ``push`` of results (STOW-RS or C-STORE);
- :mod:`.search`: pull's QIDO-RS search, every page, checked against the series' instance counts;
- :mod:`.network`: timeouts, which failures are retried and the back-off budget, URL redaction;
- :mod:`.spool`: where pulled or received instances wait to be scored (and the rule for a SOP
  Instance UID that arrives again);
- :mod:`.listen`: the C-STORE SCP that receives, scores and pushes;
- :mod:`.passes`: its scoring passes (when one runs, what it pushes, each instance's log line);
- :mod:`.scp_server`: its association server (association limit, timeouts, TLS handshakes off the accept loop);
- :mod:`.intake`: the size cap and a full disk, enforced while an instance arrives;
- :mod:`.retention`: which received instances may leave the spool, and when;
- :mod:`.resident`: its model, session and decode workers, loaded once (verified again when the bundle changes);
- :mod:`.pusher`: its results sent to the PACS from a thread of their own;
- :mod:`.metrics`: its Prometheus ``/metrics`` and ``/health``;
- :mod:`.cli`: ``cxr-deploy pacs``.
"""
