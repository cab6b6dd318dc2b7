"""The data layer: where datasets live (`datadir`), downloading them (`fetch`), chat examples
and their encoding (`chat`, `training`, `collate`) and evaluation suites (`suites`).

Layer 1. Only `collate` imports torch; the dataset registry itself is `emmoe_dist.catalog`.
"""
