"""Build a network from a plain config dict (e.g. the ``model`` section of a YAML file)."""
from __future__ import annotations

import inspect
from typing import Any, Mapping

from torch import nn

from anomorph.networks.autoencoder import AutoEncoder, VariationalAutoEncoder
from anomorph.networks.morphaeus import MorphAEus

NETWORKS: dict[str, type[nn.Module]] = {
    "ae": AutoEncoder,
    "vae": VariationalAutoEncoder,
    "morphaeus": MorphAEus,
}


def network_arguments(name: str) -> tuple[str, ...]:
    """Constructor keyword names accepted for network ``name``."""
    if name not in NETWORKS:
        raise ValueError(f"unknown network name {name!r}; expected one of {sorted(NETWORKS)}")
    parameters = inspect.signature(NETWORKS[name].__init__).parameters
    return tuple(p for p in parameters if p != "self")


def build_network(config: Mapping[str, Any]) -> nn.Module:
    """``{"name": "ae" | "vae" | "morphaeus", **constructor kwargs}`` -> an untrained network.

    Lists are accepted wherever the constructors take tuples. Raises ValueError for a missing
    or unknown ``name`` and for keys the chosen constructor does not accept (the message lists
    the accepted keys). The config is not modified.
    """
    if "name" not in config:
        raise ValueError(f"network config needs a 'name' (one of {sorted(NETWORKS)}), got keys {sorted(config)}")
    name = str(config["name"]).lower()
    accepted = network_arguments(name)
    kwargs = {key: value for key, value in config.items() if key != "name"}
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} for network {name!r}; accepted keys: {sorted(accepted)}")
    return NETWORKS[name](**kwargs)
