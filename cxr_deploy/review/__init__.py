"""``cxr-deploy review``: a local web page where a reader checks results beside their images and
records verdicts (:mod:`.cli` the command, :mod:`.server` the app and its token gate, :mod:`.table`
rows, paging and filters, :mod:`.store` the append-only REVIEWS.csv, :mod:`.images` what may be
read and how it is rendered, :mod:`.metrics` the operating-point figures; ``static/`` the page)."""
