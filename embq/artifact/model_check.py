"""The manifest's "model" section checked against its tables (torch-free).

One source of truth for the feature order: a DLRM's config lists its sparse features
(`sparse_feature_names`), and that order is the model's input order (the scripted core, the
Predictor's inputs, the metadata). The manifest's `tables` must list one table `t_<feature>`
per feature in exactly that order, each with the config's rows and width and serving exactly
its feature, and `pooling` must name every table. Anything else is refused: before this check
a reordered `tables` list made the runtime and the Predictor disagree on the order and answer
silently wrong.
"""

from __future__ import annotations

from typing import Any

from embq.artifact.schema import POOLINGS, TableEntry
from embq.errors import ArtifactError

DLRM_TABLE_PREFIX = "t_"  # a DLRM's table for feature f is named t_<f> (`DLRMConfig.table_name`)
MODEL_TYPES = ("dlrm",)


def _int_list(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value
    )


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_dlrm_config(config: Any, where: str) -> dict[str, Any]:
    """The config dict, once its fields have the types and sizes a DLRM needs."""
    if not isinstance(config, dict):
        raise ArtifactError(f"{where}: the model's 'config' must be an object, got {config!r}")
    names = config.get("sparse_feature_names")
    if not isinstance(names, list) or not names or not all(isinstance(f, str) for f in names):
        raise ArtifactError(f"{where}: config 'sparse_feature_names' must be a non-empty list "
                            f"of feature names, got {names!r}")  # fmt: skip
    if len(set(names)) != len(names):
        raise ArtifactError(f"{where}: config 'sparse_feature_names' repeats a name: {names}")
    rows = config.get("num_embeddings")
    if not _int_list(rows) or len(rows) != len(names):
        raise ArtifactError(f"{where}: config 'num_embeddings' must be {len(names)} positive "
                            f"integers (one per feature), got {rows!r}")  # fmt: skip
    for key in ("embedding_dim", "dense_in_features"):
        if not _positive_int(config.get(key)):
            raise ArtifactError(
                f"{where}: config {key!r} must be a positive integer, got {config.get(key)!r}"
            )
    for key in ("dense_arch", "over_arch"):
        if not _int_list(config.get(key)) or not config.get(key):
            raise ArtifactError(f"{where}: config {key!r} must be a non-empty list of positive "
                                f"layer sizes, got {config.get(key)!r}")  # fmt: skip
    return config


def check_model_section(
    model: Any, tables: dict[str, TableEntry], where: str
) -> dict[str, Any] | None:
    """Check the manifest's "model" section against its tables (see the module docstring).

    Args:
        model: the section (None for a bag of tables).
        tables: {name: entry} in manifest order.
        where: the artifact, for messages.

    Returns:
        The section, or None.

    Raises:
        ArtifactError naming the field that disagrees.
    """
    if model is None:
        return None
    if not isinstance(model, dict):
        raise ArtifactError(f"{where}: the manifest's 'model' must be an object or null")
    if "type" not in model:
        return model  # a description without a type: nothing embq serves as a model
    if model.get("type") not in MODEL_TYPES:
        raise ArtifactError(
            f"{where}: model type {model.get('type')!r} is not one this embq reads "
            f"({list(MODEL_TYPES)}); upgrade embq or re-create the artifact"
        )
    config = check_dlrm_config(model.get("config"), where)
    features = config["sparse_feature_names"]
    expected = [DLRM_TABLE_PREFIX + f for f in features]
    listed = list(tables)
    if listed != expected:
        if sorted(listed) == sorted(expected):
            raise ArtifactError(
                f"{where}: the manifest lists the tables in the order {listed}, but the model's "
                f"config orders its features {features}: the config's order is the model's "
                "input order, and the tables must follow it. Re-create the artifact."
            )
        raise ArtifactError(
            f"{where}: the manifest holds tables {listed}, but the model's config needs one "
            f"table per feature: {expected}"
        )
    for feature, name, rows in zip(features, expected, config["num_embeddings"]):
        entry = tables[name]
        if entry.rows != rows or entry.dim != config["embedding_dim"]:
            raise ArtifactError(
                f"{where}: table {name!r} is [{entry.rows}, {entry.dim}], but the model's config "
                f"says [{rows}, {config['embedding_dim']}] for feature {feature!r}"
            )
        if entry.feature_names != [feature]:
            raise ArtifactError(
                f"{where}: table {name!r} serves {entry.feature_names}, but the model's config "
                f"looks feature {feature!r} up in it (and only that feature)"
            )
    pooling = model.get("pooling")
    if not isinstance(pooling, dict) or set(pooling) != set(expected):
        raise ArtifactError(
            f"{where}: the model's 'pooling' must give SUM or MEAN for each of the tables "
            f"{expected}, got {pooling!r}"
        )
    for name, mode in pooling.items():
        if mode not in POOLINGS:
            raise ArtifactError(f"{where}: table {name!r}: pooling {mode!r} is not one of {POOLINGS}")
    return model
