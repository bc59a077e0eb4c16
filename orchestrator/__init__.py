"""cross-lingual-subnets: typed study specs expanded into jobs whose artifacts link by lineage."""

__version__ = "0.1.0"
