"""The model families' names, sizes and default learning rates: what a spec such as `poly:3`
may be, checked before anything runs (the settings, the CLI, the server's parameter schema)
without loading the numeric code of tasks.models, which registers the families themselves."""

from __future__ import annotations

import re

POLY_DEGREES = range(1, 6)
MLP_WIDTHS = range(1, 257)
VALID_FORMS = "linear; poly:K with K = 1..5 (poly:2 is the book's quadratic); mlp:H with H = 1..256 (mlp:13 is the book's network)"
# the JSON-schema pattern of a valid spec, so the Prefect server refuses a bad one as the CLI does
SPEC_PATTERN = r"^(linear|poly:[1-5]|mlp:([1-9]|[1-9][0-9]|1[0-9][0-9]|2[0-4][0-9]|25[0-6]))$"


def parse_spec(spec: str) -> tuple[str, int]:
    """'poly:3' -> ('poly', 3); 'linear' -> ('linear', 1); ValueError naming the valid forms otherwise."""
    match = re.fullmatch(r"(linear)|(poly|mlp):(\d{1,3})", spec.strip().lower()) if isinstance(spec, str) else None
    if match and match[1]:
        return "linear", 1
    if match:
        kind, size = match[2], int(match[3])
        sizes = POLY_DEGREES if kind == "poly" else MLP_WIDTHS
        if size in sizes:
            return kind, size
        what = "the degree K of poly:K" if kind == "poly" else "the width H of mlp:H"
        raise ValueError(f"{what} must be {sizes.start}..{sizes.stop - 1} (got {spec!r}); valid forms: {VALID_FORMS}")
    alias = {"line": "linear", "straight": "linear", "quadratic": "poly:2", "cubic": "poly:3", "quartic": "poly:4",
             "quintic": "poly:5", "mlp": "mlp:13", "network": "mlp:13", "nn": "mlp:13"}.get(str(spec).strip().lower())
    hint = f" (did you mean {alias}?)" if alias else ""
    raise ValueError(f"unknown model {spec!r}{hint}; valid forms: {VALID_FORMS}")


def canonical_spec(spec: str) -> str:
    kind, size = parse_spec(spec)
    return kind if kind == "linear" else f"{kind}:{size}"


# The learning rate of plain gradient descent when --lr is not given, by family and normalization
# (each family's class in tasks.models carries its row as AUTO_LR):
AUTO_LR = {
    # z-scored readings make the MSE's Hessian about 2 I, so 0.5 is nearly a Newton step; the
    # seed's x0.1 readings need its 1e-2; raw readings diverge above about 2e-4
    "linear": {"standard": 0.5, "scale": 1e-2, "none": 1e-4},
    # the basis is orthonormal on the training rows in every normalization: the Hessian is 2 I
    "poly": {"standard": 0.5, "scale": 0.5, "none": 0.5},
    # measured on the shipped readings (mlp:13): with z-scored readings 0.2 diverges, 0.02 and
    # above overfit nine points into a curve that is not monotonic, 0.01 stays smooth; x0.1
    # readings take the book's 1e-3; raw readings are ten times larger again
    "mlp": {"standard": 0.01, "scale": 1e-3, "none": 1e-5},
}


def default_lr(spec: str, normalization: str) -> float:
    return AUTO_LR[parse_spec(spec)[0]][normalization]
