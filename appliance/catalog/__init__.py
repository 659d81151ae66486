"""The model catalog: entries (entry.py), their parsing (parse.py), the catalog itself and digest checks
(store.py), and adding entries to a catalog file (writer.py)."""

from appliance.catalog.entry import ModelEntry, OutputSpec, TensorSpec
from appliance.catalog.store import Catalog, licence_problem, sha256_file, verify

__all__ = ["Catalog", "ModelEntry", "OutputSpec", "TensorSpec",
           "licence_problem", "sha256_file", "verify"]
