"""Groups of adapted layers that share tensors (LoTR's factors, MoS's pools): naming and grouping.

A group is named by :func:`group_key`; :func:`group_targets` sorts a tuner's planned targets into groups
(in module order, which fixes each member's index in its group) and checks that a group's members have one
weight shape.
"""

from __future__ import annotations

import re
import warnings
from typing import Sequence, Union

from adapters._delta import Target, weight_matrix

__all__ = ["Share", "group_key", "group_targets"]

#: How targets are grouped: ``"suffix"``, ``"all"`` or ``{group name: [module-name suffixes]}``.
Share = Union[str, dict[str, list[str]]]


def group_key(module_name: str, shape: tuple[int, int], share: Share) -> str:
    """Name of the group that the layer ``module_name`` of weight shape ``(d_out, d_in)`` joins.

    Parameters
    ----------
    module_name : str
        Full module name, e.g. ``"encoder.layer.3.attention.self.query"``.
    shape : tuple of int
        ``(d_out, d_in)`` of the layer.
    share : str or dict
        ``"suffix"``: the name after the last purely numeric component (the layer index), plus
        the shape: ``"attention_self_query_384x384"``. ``"all"``: the shape only,
        ``"all_384x384"``. A dict ``{group: [suffixes]}``: the group whose suffix matches the
        name (exactly or after a ``"."``); shapes are checked by :func:`group_targets`.

    Returns
    -------
    str
        A key valid in ``nn.ParameterDict`` (no ``"."``).

    Raises
    ------
    ValueError
        If a dict ``share`` has no group for ``module_name``, or more than one.
    """
    d_out, d_in = shape
    if share == "all":
        return f"all_{d_out}x{d_in}"
    if share == "suffix":
        parts = module_name.split(".")
        numeric = [i for i, part in enumerate(parts) if part.isdigit()]
        suffix = parts[numeric[-1] + 1 :] if numeric and numeric[-1] + 1 < len(parts) else parts[-1:]
        return re.sub(r"\W", "_", "_".join(suffix)) + f"_{d_out}x{d_in}"
    matches = [
        group
        for group, suffixes in share.items()
        if any(module_name == s or module_name.endswith("." + s) for s in suffixes)
    ]
    if len(matches) != 1:
        found = "no group" if not matches else f"several groups {matches}"
        raise ValueError(
            f"share={share!r} gives {found} for the target {module_name!r}; list its name suffix under exactly "
            "one group"
        )
    return matches[0]


def group_targets(targets: Sequence[Target], share: Share) -> dict[str, list[Target]]:
    """``{group: [members in module order]}`` of the ``(d_out, d_in)`` layers in ``targets``.

    Groups appear in the order of their first member, so drawing one group's tensors after another in this
    order is the order a layer-by-layer injection would draw them in.

    Raises
    ------
    ValueError
        If a member's weight shape differs from its group's first member (possible with a dict ``share``),
        or :func:`group_key` finds no single group for a target.
    """
    groups: dict[str, list[Target]] = {}
    for target in targets:
        shape = tuple(weight_matrix(target.layer).shape)
        group = group_key(target.key, shape, share)
        members = groups.setdefault(group, [])
        have = tuple(weight_matrix(members[0].layer).shape) if members else shape
        if have != shape:
            raise ValueError(
                f"share={share!r} puts {target.key!r} of shape (d_out, d_in)={shape} into group {group!r} of "
                f"shape {have}; members of a group must have one shape: split the group"
            )
        members.append(target)
    if isinstance(share, dict):
        # a named group no target joins is most likely a misspelt suffix: its layers fell into no group (an error
        # above) or another one; say so rather than keep an unused name
        empty = sorted(set(share) - set(groups))
        if empty:
            warnings.warn(f"share groups {empty} match no target layer (suffixes {[share[g] for g in empty]}): they "
                          "are not used; check their spelling", UserWarning, stacklevel=5)
    return groups
