"""PACS integration: DICOM results written with highdicom.

- :mod:`.uids`: deterministic UIDs for the objects we write (a rerun replaces, never duplicates);
- :mod:`.report`: the Comprehensive SR, TID 1500 Measurement Report with the model's finding;
- :mod:`.capture`: the Secondary Capture of the Grad-CAM overlay ("NOT FOR DIAGNOSTIC USE" burned in);
- :mod:`.results`: both objects for one scored input, written atomically (used by ``batch --dicom-out``).
"""
