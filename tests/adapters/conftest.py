"""Make the repository importable without installation and load the conformance module.

The module is registered as ``adapter_conformance`` (not ``conformance``) so it cannot clash
with another test directory's helper module of the same file name.
"""

import importlib.util
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if str(_HERE.parents[1]) not in sys.path:
    sys.path.insert(0, str(_HERE.parents[1]))

if "adapter_conformance" not in sys.modules:
    _spec = importlib.util.spec_from_file_location("adapter_conformance", _HERE / "conformance.py")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["adapter_conformance"] = _module
    _spec.loader.exec_module(_module)
