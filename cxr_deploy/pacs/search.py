"""The QIDO-RS search of ``pacs pull``: every page of it, and a check that the PACS listed everything.

A PACS caps what one search returns (Orthanc's ``LimitFindInstances``, dcm4chee's QIDO max
results). dicomweb-client's offset paging (``get_remaining``) fetches the pages of a server that
pages; a server that truncates instead (Orthanc 1.10 ignores the offset past its cap) is caught by
comparing each series' instances found with its ``NumberOfSeriesRelatedInstances`` (a series-level
search with the same filters): a short series is searched again on its own, which stays under the
cap for the usual one to three radiographs per series; what is still missing is reported, never a
silent partial pull.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# PatientID too: an instance the spool holds under the same UIDs for another patient is fetched and
# compared (a re-used SOP Instance UID), not counted as already there
UID_FIELDS = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "PatientID"]
SERIES_COUNT = "00201209"  # NumberOfSeriesRelatedInstances


@dataclass
class Listing:
    instances: list = field(default_factory=list)  # (study, series, sop UIDs, patient ID or None), each once
    missing: int = 0  # instances the PACS counts but did not list
    notes: list = field(default_factory=list)  # one line per series listed incompletely


def list_instances(client, *, study_uid: str | None, filters: dict, limit: int | None = None) -> Listing:
    """Every instance matching; with ``limit``, the first ``limit`` of them (what the PACS left out
    matters only when fewer were listed: a capped page is not "the first N")."""
    found = _uids(client.search_for_instances(study_instance_uid=study_uid, search_filters=filters or None,
                                              fields=UID_FIELDS, get_remaining=True))
    counts = {(_value(s, "0020000D"), _value(s, "0020000E")): _count(s) for s in client.search_for_series(
        study_instance_uid=study_uid, search_filters=filters or None,
        fields=["StudyInstanceUID", "NumberOfSeriesRelatedInstances"], get_remaining=True)}
    listing, by_series = Listing(), {}
    for uids in found:
        by_series.setdefault(uids[:2], {})[uids[2]] = uids
    for key in list(by_series) + [k for k in counts if k not in by_series]:
        expected = counts[key] if key in counts else _series_count(client, *key)
        have = by_series.get(key, {})
        if expected is not None and len(have) < expected:  # truncated: this series on its own
            for uids in _uids(client.search_for_instances(*key, fields=UID_FIELDS, get_remaining=True)):
                have.setdefault(uids[2], uids)
            if len(have) < expected:
                listing.missing += expected - len(have)
                listing.notes.append(f"the PACS listed {len(have)} of the {expected} instances of series {key[1]} "
                                     "(it caps search results: raise its limit, e.g. Orthanc's LimitFindInstances, "
                                     "or narrow the search)")
        listing.instances += have.values()
    if limit is not None and len(listing.instances) >= limit:
        return Listing(listing.instances[:limit])
    return listing


def _series_count(client, study: str, series: str) -> int | None:
    found = client.search_for_series(study_instance_uid=study, search_filters={"SeriesInstanceUID": series},
                                     fields=["NumberOfSeriesRelatedInstances"])
    return _count(found[0]) if found else None


def _uids(found) -> list:
    """(study, series, sop, patient) per instance; patient ``None`` when the PACS did not return it."""
    return [(*(_value(a, tag) for tag in ("0020000D", "0020000E", "00080018")),
             _value(a, "00100020") if "00100020" in a else None) for a in found]


def _count(attrs: dict) -> int | None:
    try:
        return int(_value(attrs, SERIES_COUNT))
    except ValueError:
        return None  # not returned by this PACS: the series cannot be checked


def _value(attrs: dict, tag: str) -> str:
    values = (attrs.get(tag) or {}).get("Value") or [""]
    return str(values[0])
