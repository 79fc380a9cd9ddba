"""The one place where our adapter methods plug into PEFT.

PEFT's own ``register_peft_method`` accepts only names already in its ``PeftType`` enum, so
each method is registered here under its own plain-string peft type (``"LOTR"``, ...) by
writing the three mappings PEFT dispatches on:

- ``PEFT_TYPE_TO_CONFIG_MAPPING``: ``PeftConfig.from_pretrained`` / ``PeftModel.from_pretrained``
  read ``adapter_config.json``'s ``"peft_type"`` and pick the config class here;
- ``PEFT_TYPE_TO_TUNER_MAPPING``: ``get_peft_model``, ``get_peft_model_state_dict`` and
  ``set_peft_model_state_dict`` pick the tuner class (and its state-dict hooks) here;
- ``PEFT_TYPE_TO_PREFIX_MAPPING``: the parameter-name prefix (missing-key filtering on load,
  ``delete_adapter``).

``PeftType`` is a ``str`` enum, so PEFT's own entries (``PeftType.LORA == "LORA"``) and ours
coexist in the same dicts without touching PEFT's behaviour. Saving and loading rely on the
tuner-level state-dict hooks (``BaseTuner._get_adapter_state_dict`` and friends) added in
PEFT 0.21: older versions select checkpoint entries with ``peft_type in list(PeftType)`` and
reject any other type, which is why :data:`PEFT_REQUIREMENT` starts at 0.21.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import peft
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import PeftType

__all__ = ["PEFT_REQUIREMENT", "PeftMethodType", "RegisteredMethod", "check_peft_version", "peft_type_name",
           "register", "registered_methods"]

#: PEFT versions this package is tested against (keep in sync with pyproject.toml).
PEFT_REQUIREMENT = SpecifierSet(">=0.21,<0.22")


class PeftMethodType(str):
    """The peft type of one of our methods, behaving as a member of PEFT's ``PeftType`` enum does.

    It equals and hashes as its plain name (``PeftMethodType("LOTR") == "LOTR"``), so it keys PEFT's mappings and
    is written to ``adapter_config.json`` as ``"LOTR"``; like the enum's members it has ``.value`` / ``.name`` and
    prints as ``PeftType.LOTR``, which ``get_model_status`` (``str(peft_type).partition(".")``) and PEFT's error
    messages (``peft_type.value``) read.
    """

    @property
    def value(self) -> str:
        return str.__str__(self)

    @property
    def name(self) -> str:
        return str.__str__(self)

    def __str__(self) -> str:
        return f"PeftType.{self.value}"


def peft_type_name(peft_type) -> str:
    """The plain name of a peft type (``"LOTR"``, ``"LORA"``), from ours, PEFT's enum or a plain string."""
    return getattr(peft_type, "value", None) or str(peft_type)


@dataclass(frozen=True)
class RegisteredMethod:
    """One of our methods as PEFT sees it."""

    peft_type: str
    prefix: str
    config_cls: type
    model_cls: type


_REGISTERED: dict[str, RegisteredMethod] = {}


def check_peft_version(version: str | None = None) -> None:
    """Fail early on a PEFT without the hooks we rely on; warn outside the tested range.

    Parameters
    ----------
    version : str, optional
        Version to check; default the installed ``peft.__version__``.

    Raises
    ------
    ImportError
        If PEFT lacks ``BaseTuner._get_adapter_state_dict`` (PEFT < 0.21), without which our
        adapters could be trained but never saved.
    """
    version = version or peft.__version__
    if not hasattr(BaseTuner, "_get_adapter_state_dict"):
        raise ImportError(
            f"peft=={version} cannot save adapters of types outside its PeftType enum; "
            f"install a supported version: pip install 'peft{PEFT_REQUIREMENT}'"
        )
    if Version(version).release[:3] and Version(version) not in PEFT_REQUIREMENT:
        warnings.warn(
            f"adapters is tested with peft{PEFT_REQUIREMENT}, found peft=={version}; "
            f"if something breaks, pip install 'peft{PEFT_REQUIREMENT}'",
            stacklevel=2,
        )


def _same_class(a: type, b: type) -> bool:
    # A reloaded module defines new class objects with the same qualified name.
    return a is b or (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def register(peft_type: str, *, prefix: str, config_cls: type, model_cls: type) -> RegisteredMethod:
    """Register one method with PEFT under a peft type string of its own.

    Parameters
    ----------
    peft_type : str
        Upper-case name written to ``adapter_config.json``, e.g. ``"LOTR"``; must not be one of
        PEFT's own ``PeftType`` members.
    prefix : str
        Parameter-name prefix, e.g. ``"lotr_"``; must equal ``model_cls.prefix`` and neither
        contain nor be contained in another registered prefix (PEFT matches prefixes as
        substrings of parameter names).
    config_cls, model_cls : type
        The ``PeftConfig`` subclass (its default ``peft_type`` must be ``peft_type``) and the
        ``BaseTuner`` subclass.

    Returns
    -------
    RegisteredMethod

    Raises
    ------
    ValueError
        On a malformed name or prefix, or a name / prefix clash with PEFT or another method.
    """
    if not peft_type.isupper() or not peft_type.replace("_", "").isalnum():
        raise ValueError(f"peft_type={peft_type!r} must be upper-case letters, digits and '_', e.g. 'LOTR'")
    if peft_type in {member.value for member in PeftType}:
        raise ValueError(
            f"peft_type={peft_type!r} is one of PEFT's own types; register ours under a name of its own"
        )
    if getattr(model_cls, "prefix", None) != prefix:
        raise ValueError(
            f"prefix={prefix!r} differs from {model_cls.__name__}.prefix={getattr(model_cls, 'prefix', None)!r}; "
            "make them equal"
        )
    for mapping, cls in ((PEFT_TYPE_TO_CONFIG_MAPPING, config_cls), (PEFT_TYPE_TO_TUNER_MAPPING, model_cls)):
        if peft_type in mapping and not _same_class(mapping[peft_type], cls):
            raise ValueError(
                f"peft_type={peft_type!r} is already registered to {mapping[peft_type].__qualname__}; "
                "choose another name"
            )
    for other_type, other_prefix in PEFT_TYPE_TO_PREFIX_MAPPING.items():
        if other_type == peft_type:
            continue
        if prefix in other_prefix or other_prefix in prefix:
            raise ValueError(
                f"prefix={prefix!r} overlaps the prefix {other_prefix!r} of peft_type={str(other_type)!r} "
                "(PEFT matches prefixes as substrings of parameter names); choose a prefix neither contains"
            )
    PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
    PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
    PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = prefix
    method = RegisteredMethod(peft_type, prefix, config_cls, model_cls)
    _REGISTERED[peft_type] = method
    return method


def registered_methods() -> dict[str, RegisteredMethod]:
    """Our methods registered so far, by peft type."""
    return dict(_REGISTERED)
