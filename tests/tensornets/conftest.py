from format_cases import format_case  # noqa: F401  (the fixture every conformance test takes)
